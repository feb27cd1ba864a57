"""Every public name, and every public method our classes define, says what it is for (issue 5, docs)."""
from __future__ import annotations

import importlib
import inspect
from typing import Iterator, Tuple

import pytest

MODULES = (
    'rpcresults', 'rpcresults.app', 'rpcresults.states', 'rpcresults.exceptions', 'rpcresults.result',
    'rpcresults.client', 'rpcresults.responder', 'rpcresults.aio', 'rpcresults.backends',
    'rpcresults.backends.base', 'rpcresults.backends.rpc', 'rpcresults.backends.direct',
    'rpcresults.backends.kv', 'rpcresults.backends.asynchronous', 'rpcresults.contrib.celery',
)


def public_objects() -> Iterator[Tuple[str, object]]:
    seen = set()
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        yield module_name, module
        for name in getattr(module, '__all__', ()):
            obj = getattr(module, name)
            if not (inspect.isclass(obj) or inspect.isfunction(obj)) or id(obj) in seen:
                continue
            if not getattr(obj, '__module__', '').startswith('rpcresults'):
                continue  # re-exported from kombu/celery
            seen.add(id(obj))
            yield f'{module_name}.{name}', obj
            if inspect.isclass(obj):
                for attr, member in vars(obj).items():
                    if attr.startswith('_') or not (inspect.isfunction(member) or isinstance(member, property)):
                        continue
                    if _inherits_doc(obj, attr):
                        continue
                    yield f'{module_name}.{name}.{attr}', member


def _inherits_doc(cls: type, attr: str) -> bool:
    """An override of a documented method (ours or Celery's) keeps that method's contract."""
    for base in cls.__mro__[1:]:
        member = base.__dict__.get(attr)
        if member is not None and getattr(member, '__doc__', None):
            return True
    return False


OBJECTS = list(public_objects())


@pytest.mark.parametrize('name,obj', OBJECTS, ids=[name for name, _ in OBJECTS])
def test_has_a_docstring(name: str, obj: object) -> None:
    doc = inspect.getdoc(obj) if not isinstance(obj, property) else obj.__doc__
    assert doc and doc.strip(), f'{name} has no docstring'
