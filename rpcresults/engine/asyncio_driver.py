"""The asyncio driver of waits on a reply consumer: ``await`` without blocking the loop.

An await registers its :class:`~rpcresults.engine.wait.Wait` exactly as a
blocking ``get()`` does; the state table wakes exactly the wait a reply belongs
to, through ``loop.call_soon_threadsafe`` on the loop that awaits it (coalesced:
one callback per burst), so each await resolves on its own loop, and sync and
async waits, and loops in several threads, share one consumer. The deadline is a
loop timer; cancelling the awaiting task leaves through the wait's clean-up.

The socket is read by one background thread per consumer (:class:`Hub`, running
:func:`~rpcresults.engine.reader.read_for`), taking turns with blocking waiters
through the reader election. It runs the same blocking read path (recovery,
acks, heartbeats, queue-loss reports); the loop only ever touches the state
table. The thread reads only while some await still waits for a reply, and ends
when none is left. An await whose loop was closed under it is dropped.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any, List, Optional, Set

from ..exceptions import ResultBackendClosed
from .reader import read_for

__all__ = ('AsyncDriver', 'Hub')

logger = logging.getLogger(__name__)


class _Slot:
    """One await's loop, its event, and its deadline timer."""

    __slots__ = ('loop', 'event', 'scheduled', 'timer')

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.event = asyncio.Event()
        self.scheduled = False
        self.timer: Optional[asyncio.TimerHandle] = None

    def wake_threadsafe(self) -> None:
        """Called by whichever thread dispatched a reply: one loop callback per burst."""
        if self.scheduled:
            return
        self.scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._on_wake)
        except RuntimeError:  # the loop is closed: nobody is left to wake; the hub drops the wait
            pass

    def _on_wake(self) -> None:
        self.scheduled = False
        self.event.set()


class AsyncDriver:
    """``attach``/``ablock``/``detach`` for awaits on ``consumer``."""

    def __init__(self, consumer: Any) -> None:
        self.consumer = consumer
        self.hub = Hub(consumer)

    def attach(self, wait: Any) -> None:
        """Wake-ups of ``wait`` land on the running loop; its deadline is a loop timer."""
        loop = asyncio.get_running_loop()
        slot = _Slot(loop)
        wait.slot = slot
        wait.waiter.wake = slot.wake_threadsafe
        remaining = wait.remaining()
        if remaining is not None:
            slot.timer = loop.call_later(remaining, slot.event.set)
        if remaining is None or remaining > 0:  # timeout=0 only looks once
            self.hub.add(wait)

    async def ablock(self, wait: Any) -> None:
        """Until ``wait`` has news or its deadline passed."""
        slot: _Slot = wait.slot
        slot.event.clear()
        if wait.has_news:
            return
        if wait.expired():
            if not wait.looked:  # as get(timeout=0): read what already arrived, off the loop
                await slot.loop.run_in_executor(None, self.consumer.read_now)
            return
        self.hub.wake()  # this wait may need a read again
        await slot.event.wait()

    def detach(self, wait: Any) -> None:
        """Undo :meth:`attach` (done, timed out, cancelled or abandoned)."""
        wait.waiter.wake = None
        slot = wait.slot
        if slot is not None and slot.timer is not None:
            slot.timer.cancel()
        self.hub.remove(wait)


class Hub:
    """One consumer's reader thread for awaits (any number of loops)."""

    def __init__(self, consumer: Any) -> None:
        self.consumer = consumer
        self._lock = threading.Lock()
        self._waits: Set[Any] = set()
        self._thread: Optional[threading.Thread] = None
        self._event = threading.Event()
        self.threads_started = 0
        self.errors = 0

    @property
    def pending(self) -> int:
        """Awaits this hub reads for now."""
        return len(self._waits)

    @property
    def running(self) -> bool:
        """True while the reader thread runs."""
        return self._thread is not None

    def add(self, wait: Any) -> None:
        """Read for ``wait`` too; starts the reader thread when there is none."""
        with self._lock:
            self._waits.add(wait)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True,
                                                name=f'rpcresults-aio-{self.consumer.name}')
                self.threads_started += 1
                self._thread.start()
        self._event.set()

    def remove(self, wait: Any) -> None:
        """Stop reading for ``wait``; with none left, the thread ends once it stops reading."""
        with self._lock:
            self._waits.discard(wait)
        self._event.set()

    def wake(self) -> None:
        """Make the reader thread look at its waits again."""
        self._event.set()

    def _live(self) -> List[Any]:
        """The waits to read for; those whose loop was closed under them are dropped."""
        with self._lock:
            waits = list(self._waits)
        live = []
        for wait in waits:
            if wait.slot.loop.is_closed():
                logger.debug('dropping an await of %s left on a closed loop', self.consumer.name)
                self.remove(wait)
                wait.close()
            else:
                live.append(wait)
        return live

    def _pause(self, seconds: float) -> None:
        self._event.wait(seconds)
        self._event.clear()

    def _fail(self, error: BaseException, waits: List[Any]) -> None:
        self.errors += 1
        level = logging.DEBUG if isinstance(error, ResultBackendClosed) else logging.WARNING
        logger.log(level, 'asyncio reader for %s failed: %r', self.consumer.name, error)
        for wait in waits:
            wait.waiter.fail(error)

    def _run(self) -> None:
        election = self.consumer.election
        election.add_sleeper(self._event.set)
        try:
            while True:
                read_for(self.consumer, self._live, self._pause, self._fail)
                with self._lock:
                    if not self._waits:  # none was added since read_for saw none
                        self._thread = None
                        return
        except BaseException:  # never leave awaits hanging on a dead thread
            logger.exception('asyncio reader thread crashed')
            with self._lock:
                self._thread = None
                waits = list(self._waits)
            for wait in waits:
                wait.waiter.fail(RuntimeError('the rpcresults asyncio reader thread crashed'))
            raise
        finally:
            election.discard_sleeper(self._event.set)
