"""What the green scripts share: monkey-patching with the library named first on the command line,
and, once patched, spawn/sleep/join for it, a bounded poll and a ticker proving the hub runs.

Call :func:`patch` before importing anything else (threading above all); everything else here
imports the green library lazily, after the patching.
"""
from __future__ import annotations

import sys
import time
from typing import Any, Callable, List

LIBRARY = ''


def patch(threads: bool = True) -> str:
    """Monkey-patch with ``sys.argv[1]`` (gevent or eventlet); ``threads=False`` keeps real OS threads."""
    global LIBRARY
    library = sys.argv[1]
    if library == 'gevent':
        from gevent import monkey
        monkey.patch_all(thread=threads)
    elif library == 'eventlet':
        import eventlet
        eventlet.monkey_patch(**({} if threads else {'thread': False}))  # naming thread=True patches only it
    else:
        raise SystemExit(f'unknown green library {library!r}')
    LIBRARY = library
    return library


def spawn(fn: Callable[[], Any]) -> Any:
    """Start ``fn`` in a green thread of this OS thread's hub."""
    if LIBRARY == 'gevent':
        import gevent
        return gevent.spawn(fn)
    import eventlet
    return eventlet.spawn(fn)


def sleep(seconds: float) -> None:
    if LIBRARY == 'gevent':
        import gevent
        gevent.sleep(seconds)
    else:
        import eventlet
        eventlet.sleep(seconds)


def join_all(threads: List[Any], timeout: float) -> bool:
    """Whether every green thread ended within ``timeout``."""
    if LIBRARY == 'gevent':
        import gevent
        return len(gevent.joinall(threads, timeout=timeout)) == len(threads)
    import eventlet
    with eventlet.Timeout(timeout, False):
        for thread in threads:
            thread.wait()
        return True
    return False


def outcome(thread: Any, timeout: float) -> Any:
    """A green thread's value, the repr of what it raised, or 'still waiting' after ``timeout``."""
    if LIBRARY == 'gevent':
        thread.join(timeout)
        if not thread.ready():
            return 'still waiting'
        return thread.value if thread.successful() else repr(thread.exception)
    import eventlet
    with eventlet.Timeout(timeout, False):
        try:
            return thread.wait()
        except Exception as exc:  # reported
            return repr(exc)
    return 'still waiting'


def wait_for(predicate: Callable[[], Any], timeout: float) -> bool:
    """Poll ``predicate`` (green sleeps in between) until true; False at the deadline."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        sleep(0.005)
    return True


class Ticker:
    """A green thread counting while it runs: proof that waiting blocks only the waiter."""

    def __init__(self) -> None:
        self.ticks = 0
        self.running = True
        self.thread = spawn(self._run)

    def _run(self) -> None:
        while self.running:
            self.ticks += 1
            sleep(0.001)

    def ticked_on(self, count: int, timeout: float) -> bool:
        """Whether it ticks ``count`` more times within ``timeout``."""
        before = self.ticks
        return wait_for(lambda: self.ticks >= before + count, timeout)

    def stop(self, timeout: float = 5) -> None:
        self.running = False
        join_all([self.thread], timeout)
