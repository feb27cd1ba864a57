"""Bodies in and out: kombu codecs, the accept allow-list, exceptions <-> dicts.

Decoding never imports a module: an exception class is looked up only among
modules already imported, anything that is not an exception class is refused
with :class:`SecurityError`, and an unknown class becomes a synthetic subclass
of :class:`Exception` carrying the sender's name. Only subclasses of
:class:`Exception` are rebuilt as themselves: a payload naming ``SystemExit``,
``KeyboardInterrupt`` or any other ``BaseException`` outside it gets such a
stand-in too, so ``except Exception`` still catches what ``get()`` raises.
"""
from __future__ import annotations

import sys
import threading
from typing import Any, Collection, Dict, FrozenSet, Mapping, Optional, Tuple

from kombu.serialization import dumps as _kombu_dumps
from kombu.serialization import loads as _kombu_loads
from kombu.serialization import prepare_accept_content, registry

from .exceptions import SecurityError

__all__ = (
    'accept_set', 'encode', 'decode', 'prepare_exception', 'exception_to_python',
    'ensure_serializable', 'EXCEPTION_ABLE_CODECS', 'synthetic_exception_class',
)

#: Codecs that can carry exception instances themselves.
EXCEPTION_ABLE_CODECS = frozenset({'pickle'})

#: Where synthetic exception classes claim to live when the sender gave no module.
_SYNTHETIC_MODULE = 'rpcresults.exceptions'

_synthetic_lock = threading.Lock()
_synthetic: Dict[Tuple[str, str], type] = {}


def accept_set(accept: Optional[Collection[str]]) -> FrozenSet[str]:
    """Content types (MIME) for a list of codec names or MIME types; ``None`` means json only."""
    names = ['json'] if accept is None else list(accept)
    return frozenset(prepare_accept_content(names))


def encode(data: Any, serializer: str) -> Tuple[str, str, bytes]:
    """Serialize ``data`` with a kombu codec: ``(content_type, content_encoding, body)``."""
    content_type, content_encoding, body = _kombu_dumps(data, serializer=serializer)
    if isinstance(body, str):
        body = body.encode(content_encoding or 'utf-8')
    return content_type, content_encoding, body


def decode(body: bytes, content_type: Optional[str], content_encoding: Optional[str],
           accept: FrozenSet[str]) -> Any:
    """Deserialize a body whose content type is in ``accept``; refuse (never decode) the rest."""
    return _kombu_loads(body, content_type, content_encoding, accept=accept)


def ensure_serializable(items: Any, serializer: str) -> Tuple[Any, ...]:
    """Exception args as the codec can carry them: unencodable items become their ``repr``."""
    result = []
    for item in items:
        try:
            _kombu_dumps(item, serializer=serializer)
        except Exception:  # any codec failure: fall back to a readable string
            item = repr(item)
        result.append(item)
    return tuple(result)


def prepare_exception(exc: BaseException, serializer: str) -> Any:
    """An exception as it travels: ``{"exc_type", "exc_message", "exc_module"}`` (or itself for pickle)."""
    if serializer in EXCEPTION_ABLE_CODECS:
        return exc
    cls = type(exc)
    return {
        'exc_type': getattr(cls, '__qualname__', cls.__name__),
        'exc_message': list(ensure_serializable(exc.args, serializer)),
        'exc_module': cls.__module__,
    }


def synthetic_exception_class(name: str, module: Optional[str]) -> type:
    """A stand-in Exception subclass for a class this process does not have (cached by name)."""
    key = (module or _SYNTHETIC_MODULE, name)
    with _synthetic_lock:
        cls = _synthetic.get(key)
        if cls is None:
            short = name.rsplit('.', 1)[-1] or 'UnknownException'
            cls = type(short, (Exception,), {'__module__': key[0], '__qualname__': name})
            _synthetic[key] = cls
        return cls


def _lookup_class(name: str, module: Optional[str]) -> Any:
    if module is None:
        return synthetic_exception_class(name, None)
    obj: Any = sys.modules.get(module)
    if obj is None:
        return synthetic_exception_class(name, module)
    for part in name.split('.'):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            return synthetic_exception_class(name, module)
    return obj


def exception_to_python(exc: Any) -> Optional[BaseException]:
    """Rebuild an exception from its wire form; refuses non-exception classes with SecurityError."""
    if not exc:
        return None
    if isinstance(exc, BaseException):
        return exc
    if not isinstance(exc, Mapping):
        raise SecurityError(
            'expected an exception mapping with exc_type/exc_message/exc_module, '
            f'got {type(exc).__name__}: {exc!r:.200}')
    try:
        name = exc['exc_type']
    except KeyError:
        raise SecurityError(f'exception payload has no exc_type: {dict(exc)!r:.200}') from None
    if not isinstance(name, str) or not name:
        raise SecurityError(f'exception payload has an invalid exc_type: {name!r:.100}')
    module = exc.get('exc_module')
    if module is not None and not isinstance(module, str):
        raise SecurityError(f'exception payload has an invalid exc_module: {module!r:.100}')
    message = exc.get('exc_message', ())
    cls = _lookup_class(name, module)
    if not isinstance(cls, type) or not issubclass(cls, BaseException):
        where = name if module is None else f'{module}.{name}'
        raise SecurityError(f'expected an exception class, got {where} with payload {message!r:.200}')
    if not issubclass(cls, Exception):
        # SystemExit, KeyboardInterrupt, GeneratorExit, CancelledError: raised by get(), they would
        # escape ``except Exception`` and stop the caller's thread; a stand-in with the name cannot
        cls = synthetic_exception_class(name, module)
    args = tuple(message) if isinstance(message, (list, tuple)) else (message,)
    try:
        return cls(*args)
    except Exception:  # the class refuses these args: keep the information readable
        fallback = synthetic_exception_class(name, module)
        return fallback(*args)


def known_codec(name: str) -> bool:
    """True when kombu has a codec registered under ``name``."""
    return name in registry._encoders
