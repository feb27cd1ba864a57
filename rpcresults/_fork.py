"""One ``os.register_at_fork`` hook for every object that must reset in a forked child."""
from __future__ import annotations

import logging
import os
import threading
import weakref
from typing import Any

logger = logging.getLogger(__name__)

_objects: 'weakref.WeakSet[Any]' = weakref.WeakSet()
_lock = threading.Lock()


def register(obj: Any) -> None:
    """Call ``obj._after_fork()`` in every child forked while ``obj`` is alive."""
    with _lock:
        _objects.add(obj)


def _run_after_fork() -> None:
    global _lock
    _lock = threading.Lock()  # the parent's lock may have been held by another thread at fork time
    for obj in list(_objects):
        try:
            obj._after_fork()
        except Exception:  # one broken object must not keep the others stale
            logger.exception('after-fork reset failed for %r', obj)


if hasattr(os, 'register_at_fork'):
    os.register_at_fork(after_in_child=_run_after_fork)
