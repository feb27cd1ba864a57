"""Drainers: how a waiting thread blocks "until woken or until the deadline" on a reply consumer.

A drainer is the driver of a blocking wait (see :mod:`rpcresults.engine.wait`):
``attach(wait)`` once, ``block(wait)`` each time the wait has nothing to hand
out, ``detach(wait)`` at the end. The default :class:`Drainer` is for OS threads:
the thread that wins the reader election reads the socket for everybody, the
others sleep on an event of their own that the state table sets when a reply for
them arrives, or that a resigning leader sets so one of them takes over.

Which drainer a consumer uses depends on the environment, as in Celery: under
gevent or eventlet monkey-patching the green drainers of
:mod:`rpcresults.engine.green` (registered when it is imported) replace the default one.
"""
from __future__ import annotations

import sys
import threading
import time
from typing import Any, Callable, Dict, Type

__all__ = ('Drainer', 'drainers', 'register_drainer', 'detect_environment', 'drainer_for')

drainers: Dict[str, Type['Drainer']] = {}


def register_drainer(name: str) -> Callable[[Type['Drainer']], Type['Drainer']]:
    """Register a drainer class for an environment (``default``, ``eventlet``, ``gevent``, ...)."""
    def _register(cls: Type['Drainer']) -> Type['Drainer']:
        drainers[name] = cls
        return cls
    return _register


def detect_environment() -> str:
    """The concurrency environment this process runs in (``default`` unless monkey-patched)."""
    for name in ('eventlet', 'gevent'):
        if name not in sys.modules:
            continue
        patcher = sys.modules.get(f'{name}.patcher') or sys.modules.get(f'{name}.monkey')
        is_patched = getattr(patcher, 'is_monkey_patched', None) or getattr(patcher, 'is_module_patched', None)
        try:
            if is_patched is not None and is_patched('socket'):
                return name
        except Exception:  # a library we do not control: treat as unpatched
            continue
    return 'default'


@register_drainer('default')
class Drainer:
    """Blocks OS threads: the elected reader reads for everyone, the others sleep on their own event."""

    def __init__(self, consumer: Any) -> None:
        self.consumer = consumer

    def attach(self, wait: Any) -> None:
        """Give ``wait`` an event its replies set, and make it a sleeper of the reader election."""
        event = threading.Event()
        wait.slot = (event, event.set)
        wait.waiter.wake = event.set
        self.consumer.election.add_sleeper(event.set)

    def block(self, wait: Any) -> None:
        """Until ``wait`` has news or its deadline passed: read as the leader, or sleep."""
        event, wake = wait.slot
        event.clear()
        if wait.has_news:
            return
        consumer = self.consumer
        deadline = wait.deadline
        if deadline is not None and time.monotonic() >= deadline:
            consumer.read_now()  # a zero timeout looks once at what already arrived
            return
        election = consumer.election
        if election.try_lead():
            wait.waiter.wake = None  # the reader looks at its own wait after every read
            try:
                consumer.read_until(lambda: wait.has_news, deadline, deadline)
            finally:
                wait.waiter.wake = wake
                election.resign()
        else:
            event.wait(wait.remaining())

    def stats(self) -> Dict[str, int]:
        """Counters of this drainer (the thread drainer has none)."""
        return {}

    def detach(self, wait: Any) -> None:
        """Undo :meth:`attach`."""
        if wait.slot is not None:
            self.consumer.election.discard_sleeper(wait.slot[1])
        wait.waiter.wake = None


def drainer_for(consumer: Any) -> Drainer:
    """The drainer for ``consumer`` in this process's environment."""
    return drainers.get(detect_environment(), drainers['default'])(consumer)
