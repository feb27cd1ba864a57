"""Which twin of a hot-path module a test runs on: the pure-Python one or the compiled one.

Every hot-path module of the protocol layer is one source, ``rpcresults/protocol/_<stem>_py.py``:
as it is, it is the pure-Python twin; compiled by Cython (typed by ``_<stem>_c.pxd``) it is
``rpcresults.protocol._<stem>_c``. The ``twin`` fixture (conftest) is parametrized over ``TWINS``
and loads both modules of a twin through :func:`load_twin`, so the same tests run on both; tests
that use it carry the ``twins`` marker.

A compiled twin that cannot be imported is a loud failure, never a silent skip: a broken
or missing build must not pass as green. The one exception is a run with
``RPCRESULTS_NO_EXTENSIONS`` set (CI runs the suite once with and once without it): there
the compiled params are skipped, with that reason.
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest

__all__ = ('TWINS', 'STEMS', 'NO_EXTENSIONS_VAR', 'BUILD_HINT', 'Twin', 'load_twin', 'module_name')

#: The fixture params, in order.
TWINS = ('pure', 'compiled')
#: The twinned modules: ``rpcresults/protocol/_<stem>_py.py``.
STEMS = ('frames', 'table', 'memo', 'decode', 'writer', 'join')

NO_EXTENSIONS_VAR = 'RPCRESULTS_NO_EXTENSIONS'

BUILD_HINT = ('build it with `pip install -e .` (from the project root, in an environment that has '
              'Cython and a C compiler such as gcc with the Python headers), or set '
              f'{NO_EXTENSIONS_VAR}=1 to test the pure-Python twin only')


def module_name(kind: str, module_stem: str) -> str:
    """``rpcresults.protocol._<stem>_py`` for 'pure', ``rpcresults.protocol._<stem>_c`` for 'compiled'."""
    if kind == 'pure':
        return f'rpcresults.protocol._{module_stem}_py'
    if kind == 'compiled':
        return f'rpcresults.protocol._{module_stem}_c'
    raise ValueError(f'unknown twin {kind!r}; expected one of {TWINS}')


def load_twin(kind: str, module_stem: str) -> ModuleType:
    """The module of twin ``kind`` ('pure' or 'compiled') of ``rpcresults.protocol._<module_stem>_*``.

    'compiled' skips when ``RPCRESULTS_NO_EXTENSIONS`` is set and fails (with how to
    build the extension) when the extension cannot be imported.
    """
    name = module_name(kind, module_stem)
    if kind == 'compiled':
        if os.environ.get(NO_EXTENSIONS_VAR):
            pytest.skip(f'{NO_EXTENSIONS_VAR} is set: the compiled twin {name} is not tested in this run')
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            problem = f'{type(exc).__name__}: {exc}'
        else:
            problem = ''
        if problem:  # failed outside the except block: the report shows this message, not a chain
            pytest.fail(f'the compiled twin {name} cannot be imported ({problem}): the C extension was '
                        f'not built; {BUILD_HINT}', pytrace=False)
        if not (getattr(module, '__file__', '') or '').endswith(('.so', '.pyd')):
            pytest.fail(f'{name} was imported from {module.__file__!r}, which is not a compiled '
                        f'extension; {BUILD_HINT}', pytrace=False)
        return module
    return importlib.import_module(name)


class Twin:
    """One implementation of the protocol layer: ``kind`` and its modules (``frames``, ``table``, ...)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.frames = load_twin(kind, 'frames')
        self.table = load_twin(kind, 'table')
        self.memo = load_twin(kind, 'memo')
        self.decode = load_twin(kind, 'decode')
        self.writer = load_twin(kind, 'writer')
        self.join = load_twin(kind, 'join')

    def __repr__(self) -> str:
        return f'<Twin {self.kind}>'
