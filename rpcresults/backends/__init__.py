"""Result backends, chosen by URL scheme (``rpc://``, ``rpc+direct://``, ``redis://``, ``cache+memory://``, ``disabled://``)."""
from __future__ import annotations

from importlib import import_module
from typing import Any, Dict, Tuple, Type

from ..exceptions import ImproperlyConfigured

__all__ = ('BACKEND_ALIASES', 'by_name', 'by_url')

#: URL scheme -> "module:Class".
BACKEND_ALIASES: Dict[str, str] = {
    'rpc': 'rpcresults.backends.rpc:RPCBackend',
    'rpc+direct': 'rpcresults.backends.direct:DirectReplyBackend',
    'redis': 'rpcresults.backends.kv:RedisBackend',
    'rediss': 'rpcresults.backends.kv:RedisBackend',
    'cache+memory': 'rpcresults.backends.kv:MemoryBackend',
    'memory': 'rpcresults.backends.kv:MemoryBackend',
    'disabled': 'rpcresults.backends.base:DisabledBackend',
}


def by_name(name: str) -> Type[Any]:
    """The backend class for an alias or a ``module:Class`` path."""
    path = BACKEND_ALIASES.get(name, name)
    module_name, sep, attr = path.partition(':')
    if not sep:
        raise ImproperlyConfigured(f'unknown result backend {name!r}: use one of {sorted(BACKEND_ALIASES)} '
                                   'or "module:Class"')
    try:
        return getattr(import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ImproperlyConfigured(f'cannot load result backend {path!r}: {exc}') from exc


def by_url(url: str) -> Tuple[Type[Any], str]:
    """``(backend class, url)`` for a backend URL such as ``rpc://`` or ``redis://host:6379/0``."""
    scheme = url.split('://', 1)[0] if '://' in url else url
    return by_name(scheme), url
