"""Drainers for green threads (gevent, eventlet): one green reader per hub, everyone else asleep.

While anybody waits, one green thread of our own (:func:`~rpcresults.engine.reader.read_for`)
reads the socket; each reply wakes exactly its waiters through their green events.
Waiters never read, so one killed or timed-out green thread never leaves the
reading half done; the reader ends when nobody waits. An error the reader cannot
recover from (a reconnect that gave up) goes to every waiter it read for.

Several OS threads (monkey-patched without ``thread``) each have a hub of their
own, and a green thread cannot switch to another thread's hub. The reader lives
on the hub of the thread that started it; waiters of other threads take turns
leading instead, sleeping on green events of their own hub, and poll the socket
when another hub owns it (gevent binds sockets to the hub that made them). A
reader that died, or whose thread ended, is replaced.

gevent and eventlet are optional: they are imported only when a drainer of theirs is used.
"""
from __future__ import annotations

import functools
import importlib
import logging
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional

from .channel import wait_readable
from .drivers import Drainer, register_drainer
from ..exceptions import ResultBackendClosed
from .reader import read_for

__all__ = ('GreenDrainer', 'GeventDrainer', 'EventletDrainer', 'POLL_SLICE')

logger = logging.getLogger(__name__)

#: Longest sleep of a waiter whose hub does not run the reader, and of a poll of a socket another hub owns.
POLL_SLICE = 0.25

HOME, ELSEWHERE = 'home', 'elsewhere'


class GreenDrainer(Drainer):
    """:class:`Drainer` for green threads; subclasses name the library and its events."""

    #: The green library's module name: ``gevent`` or ``eventlet`` (both have spawn and sleep).
    library = ''

    def __init__(self, consumer: Any) -> None:
        super().__init__(consumer)
        self._lock = threading.Lock()
        self._waits: Dict[Any, int] = {}  # wait -> the OS thread it waits in (home waits only)
        self._reader: Any = None
        self._reader_thread: Optional[int] = None  # OS thread id of the reader's hub
        self._reader_wake: Optional[Callable[[], None]] = None
        self._generation = 0
        self.readers_started = 0

    # -- the green library (subclasses) ------------------------------------------------------
    def spawn(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` in a new green thread of the library (the reader); returns its handle."""
        return importlib.import_module(self.library).spawn(fn)

    def sleep(self, seconds: float) -> None:
        """Sleep ``seconds`` without blocking other green threads."""
        importlib.import_module(self.library).sleep(seconds)

    def new_event(self) -> Any:
        """A resettable green event: ``set()``, ``clear()``, ``wait(timeout)``."""
        raise NotImplementedError

    def thread_ident(self) -> int:
        """The id of the OS thread (not the green thread) running the caller."""
        return _original_get_ident(self.library)()

    def set_from_other_threads(self, event: Any) -> Optional[Callable[[], None]]:
        """How another OS thread sets ``event`` (called in the event's own thread); None: it cannot."""
        return None

    def owns_socket(self, sock: Any) -> bool:
        """Whether the current hub may block on ``sock`` (else it is polled)."""
        return True

    def call_in_thread_of(self, event: Any) -> Callable[[], None]:
        """A ``set`` for ``event`` that any OS thread may call: direct in the thread that made it,
        through :meth:`set_from_other_threads` elsewhere (best effort: waits are sliced anyway)."""
        get_ident = self.thread_ident
        home = get_ident()
        elsewhere = self.set_from_other_threads(event)

        def set_event() -> None:
            if get_ident() == home:
                event.set()
            elif elsewhere is not None:
                elsewhere()
        return set_event

    # -- the driver --------------------------------------------------------------------------
    def attach(self, wait: Any) -> None:
        """Join the reader of this hub (a green event to wake on), or take turns from another hub."""
        event = self.new_event()
        if self._join_reader(wait):
            wait.slot = (HOME, event, event.set)
            wait.waiter.wake = event.set
        else:
            wake = self.call_in_thread_of(event)
            wait.slot = (ELSEWHERE, event, wake)
            wait.waiter.wake = wake
            self.consumer.election.add_sleeper(wake)

    def block(self, wait: Any) -> None:
        """Until ``wait`` has news or its deadline: sleep while the reader reads, or lead in turns."""
        mode, event, wake = wait.slot
        event.clear()
        if wait.has_news:
            return
        if wait.expired():
            self.consumer.read_now()  # a zero timeout looks once at what already arrived
            return
        if mode == HOME:
            self._wake_reader()  # this wait may need a read again
            event.wait(wait.remaining())
            return
        election = self.consumer.election
        if election.try_lead():
            wait.waiter.wake = None  # the reader looks at its own wait after every read
            try:
                end = time.monotonic() + POLL_SLICE
                if wait.deadline is not None:
                    end = min(end, wait.deadline)
                self.consumer.read_until(lambda: wait.has_news, end, wait.deadline, self._wait_input)
            finally:
                wait.waiter.wake = wake
                election.resign()
            self.sleep(0)  # let the reader's hub (and this one's green threads) have a turn
        else:
            remaining = wait.remaining()
            event.wait(POLL_SLICE if remaining is None else min(POLL_SLICE, remaining))

    def detach(self, wait: Any) -> None:
        """Leave the reader (or the election) and wake the reader to look again."""
        wait.waiter.wake = None
        if wait.slot is None:
            return
        mode, _, wake = wait.slot
        if mode == HOME:
            with self._lock:
                self._waits.pop(wait, None)
            self._wake_reader()
        else:
            self.consumer.election.discard_sleeper(wake)

    @property
    def waiting(self) -> int:
        """How many green threads wait through this drainer's reader now."""
        return len(self._waits)

    def stats(self) -> Dict[str, int]:
        """``green_waits`` (green threads served by the reader now) and ``green_readers_started``."""
        return {'green_waits': len(self._waits), 'green_readers_started': self.readers_started}

    # -- the reader --------------------------------------------------------------------------
    def _join_reader(self, wait: Any) -> bool:
        """Register ``wait`` with the reader of this thread's hub (started if needed).

        False when a live reader runs on another OS thread's hub.
        """
        ident = self.thread_ident()
        with self._lock:
            if self._reader is not None and not self._reader_alive():
                stale = self._reader_thread
                for other, thread in list(self._waits.items()):
                    if thread == stale:  # green threads of an ended thread never come back
                        self._waits.pop(other, None)
                self._reader = None
            if self._reader is not None and self._reader_thread != ident:
                return False
            self._waits[wait] = ident
            if self._reader is None:
                self.readers_started += 1
                self._generation += 1
                self._reader_thread = ident
                generation = self._generation
                event = self.new_event()
                self._reader_wake = event.set
                self._reader = self.spawn(lambda: self._read(generation, event))
        self._wake_reader()
        return True

    def _reader_alive(self) -> bool:
        reader = self._reader
        if reader is None or getattr(reader, 'dead', False):
            return False
        return self._reader_thread in sys._current_frames()

    def _wake_reader(self) -> None:
        wake = self._reader_wake
        if wake is not None:
            wake()

    def _read(self, generation: int, event: Any) -> None:
        def waits() -> List[Any]:
            return list(self._waits) if self._generation == generation else []

        def pause(seconds: float) -> None:
            event.wait(seconds)
            event.clear()

        election = self.consumer.election
        election.add_sleeper(event.set)  # a poll that read meanwhile may have left work for us
        try:
            read_for(self.consumer, waits, pause, self._fail, self._wait_input)
        finally:
            election.discard_sleeper(event.set)
            with self._lock:
                if self._generation == generation:
                    self._reader = None
                    self._reader_wake = None

    def _fail(self, error: BaseException, waits: List[Any]) -> None:
        level = logging.DEBUG if isinstance(error, ResultBackendClosed) else logging.WARNING
        logger.log(level, 'green reader for %r failed: %r', self.consumer, error)
        for wait in waits:
            wait.waiter.fail(error)

    def _wait_input(self, sock: Any, timeout: Optional[float]) -> bool:
        """Poll a socket another hub owns (True); a socket of this hub is read blocking (False)."""
        if sock is None or self.owns_socket(sock):
            return False
        wait_readable(sock, POLL_SLICE if timeout is None else min(POLL_SLICE, timeout))
        return True


def _original_get_ident(library: str) -> Callable[[], int]:
    """``_thread.get_ident`` as it was before ``library`` monkey-patched it (an OS thread id)."""
    if library == 'gevent':
        from gevent.monkey import get_original
        return get_original('_thread', 'get_ident')  # type: ignore[no-any-return]
    from eventlet.patcher import original
    return original('_thread').get_ident  # type: ignore[no-any-return]


@register_drainer('gevent')
class GeventDrainer(GreenDrainer):
    """:class:`GreenDrainer` on gevent greenlets and ``gevent.event.Event``."""

    library = 'gevent'

    def new_event(self) -> Any:
        """A ``gevent.event.Event``."""
        from gevent.event import Event
        return Event()

    def set_from_other_threads(self, event: Any) -> Optional[Callable[[], None]]:
        """A callback run on the hub of the thread that made ``event``, thread-safely."""
        import gevent
        return functools.partial(gevent.get_hub().loop.run_callback_threadsafe, event.set)

    def owns_socket(self, sock: Any) -> bool:
        """gevent sockets wait on the hub that made them: only that hub may block on one."""
        import gevent
        hub = getattr(sock, 'hub', None)
        return hub is None or hub is gevent.get_hub()


class _EventletEvent:
    """A resettable event over eventlet's one-shot ``Event``."""

    __slots__ = ('_event',)

    def __init__(self) -> None:
        from eventlet.event import Event
        self._event = Event()

    def set(self) -> None:
        if not self._event.ready():
            self._event.send(True)

    def clear(self) -> None:
        if self._event.ready():
            self._event.reset()

    def wait(self, timeout: Optional[float]) -> bool:
        return bool(self._event.wait(timeout))


@register_drainer('eventlet')
class EventletDrainer(GreenDrainer):
    """:class:`GreenDrainer` on eventlet green threads.

    Eventlet hubs take no calls from other OS threads, so a waiter of another thread
    notices its reply within :data:`POLL_SLICE` instead of being woken.
    """

    library = 'eventlet'

    def new_event(self) -> Any:
        """A resettable event over eventlet's one-shot ``Event``."""
        return _EventletEvent()
