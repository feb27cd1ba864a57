"""The one fork mechanism: what must reset in a forked child registers here.

``register(obj.method)`` calls ``obj.method()`` in every child forked while ``obj``
is alive (held weakly); a plain function stays registered for good. Callbacks run
in registration order; one that fails is logged and the others still run.
"""
from __future__ import annotations

import logging
import os
import threading
import weakref
from typing import Any, Callable, List, Union

__all__ = ('register',)

logger = logging.getLogger(__name__)

_callbacks: List[Union['weakref.WeakMethod[Any]', Callable[[], Any]]] = []
_lock = threading.Lock()
_prune_at = 64  # dead entries are dropped when the list reaches this size (then twice the live ones)


def register(callback: Callable[[], Any]) -> None:
    """Call ``callback()`` in every forked child (a bound method only while its object lives)."""
    entry: Any = weakref.WeakMethod(callback) if hasattr(callback, '__self__') else callback
    global _prune_at
    with _lock:
        if len(_callbacks) >= _prune_at:
            _callbacks[:] = [item for item in _callbacks if not _dead(item)]
            _prune_at = max(64, 2 * len(_callbacks))
        _callbacks.append(entry)


def _dead(item: Any) -> bool:
    return isinstance(item, weakref.WeakMethod) and item() is None


def _run_after_fork() -> None:
    global _lock
    _lock = threading.Lock()  # the parent's lock may have been held by another thread at fork time
    for item in list(_callbacks):
        callback = item() if isinstance(item, weakref.WeakMethod) else item
        if callback is None:
            continue
        try:
            callback()
        except Exception:  # one broken object must not keep the others stale
            logger.exception('after-fork reset failed for %r', callback)


if hasattr(os, 'register_at_fork'):
    os.register_at_fork(after_in_child=_run_after_fork)
