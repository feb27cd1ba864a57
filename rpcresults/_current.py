"""The default app: the one that objects built without an app use, made on first use.

``rpcresults.app`` registers the ``App`` class here when it is imported (the package
imports it first), so result objects and backends reach the default app without
importing the module that builds them.
"""
from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, Callable, Optional

from . import _fork

if TYPE_CHECKING:  # pragma: no cover
    from .app import App

__all__ = ('default_app', 'set_default_app', 'app_or_default', 'set_app_type')

_lock = threading.Lock()
_default: Optional['App'] = None
_app_type: Optional[Callable[[], Any]] = None


def _reset_after_fork() -> None:
    global _lock
    _lock = threading.Lock()  # a parent thread may have held it at fork time


_fork.register(_reset_after_fork)


def set_app_type(factory: Callable[[], Any]) -> None:
    """What :func:`default_app` builds (``rpcresults.app.App``, registered by that module)."""
    global _app_type
    _app_type = factory


def default_app() -> 'App':
    """The app used by objects built without one (created on first use)."""
    global _default
    if _default is None:
        with _lock:
            if _default is None:
                if _app_type is None:  # pragma: no cover  (the package imports rpcresults.app first)
                    raise RuntimeError('rpcresults.app was not imported')
                _default = _app_type()
    return _default  # type: ignore[return-value]


def set_default_app(app: Optional['App']) -> Optional['App']:
    """Replace the default app (``None`` forgets it so the next use builds a new one); returns the old one."""
    global _default
    previous, _default = _default, app
    return previous


def app_or_default(app: Optional['App']) -> 'App':
    """``app`` itself, else the default app."""
    return app if app is not None else default_app()
