"""Who reads a reply socket now: one reader at a time, everyone else asleep until woken.

Any thread or green thread that waits may become the reader (the leader): it
reads replies for everybody, and the state table wakes exactly the waiters each
reply belongs to. When the leader resigns, the sleepers are woken so one of
them can take over. :func:`read_for` is the loop of a background reader that
reads on behalf of waits that never read themselves (green threads' reader,
the asyncio driver's thread).
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, List, Optional, Sequence, Set

__all__ = ('ReaderElection', 'read_for', 'READ_SLICE')

logger = logging.getLogger(__name__)

#: How long a background reader reads before it looks again at who still waits.
READ_SLICE = 1.0

Wake = Callable[[], Any]


class ReaderElection:
    """One leader reads; sleepers (wake-up callables) are called whenever a leader resigns."""

    def __init__(self) -> None:
        self._leader = threading.Lock()
        self._sleepers: Set[Wake] = set()
        self._sleepers_lock = threading.Lock()

    @property
    def reading(self) -> bool:
        """True while somebody leads the read."""
        return self._leader.locked()

    def try_lead(self) -> bool:
        """Become the reader unless somebody else is (never blocks)."""
        return self._leader.acquire(blocking=False)

    def lead_within(self, timeout: float) -> bool:
        """Become the reader, waiting up to ``timeout`` seconds for the current one to resign."""
        return self._leader.acquire(timeout=timeout)

    def resign(self) -> None:
        """Stop reading and wake every sleeper (one of them may take over)."""
        self._leader.release()
        self.wake_all()

    def add_sleeper(self, wake: Wake) -> None:
        """Call ``wake()`` whenever a leader resigns, until :meth:`discard_sleeper`."""
        with self._sleepers_lock:
            self._sleepers.add(wake)

    def discard_sleeper(self, wake: Wake) -> None:
        """Undo :meth:`add_sleeper`."""
        with self._sleepers_lock:
            self._sleepers.discard(wake)

    def wake_all(self) -> None:
        """Wake every sleeper now."""
        with self._sleepers_lock:
            sleepers = list(self._sleepers)
        for wake in sleepers:
            try:
                wake()
            except Exception:
                logger.exception('a reader wake-up callback failed')


def read_for(consumer: Any, waits: Callable[[], Sequence[Any]], pause: Callable[[float], Any],
             on_error: Callable[[BaseException, List[Any]], Any],
             wait_input: Optional[Callable[[Any, Optional[float]], bool]] = None) -> None:
    """Read replies on behalf of ``waits()`` until it is empty.

    Each turn either leads a read of up to :data:`READ_SLICE` (until every wait
    has news), or calls ``pause(seconds)`` while another thread leads or nobody
    needs a read. ``pause`` must return early when woken: when a leader resigns,
    and when a wait is added or blocks again. A read that fails (a reconnect that
    gave up) goes to ``on_error(error, the waits that were waiting)``. ``wait_input`` is
    passed on to the consumer's ``read_until``.
    """
    election = consumer.election
    while True:
        current = waits()
        if not current:
            return
        waiting = [wait for wait in current if not wait.has_news]
        if not waiting or not election.try_lead():
            pause(READ_SLICE)
            continue
        try:
            consumer.read_until(lambda waiting=waiting: all(wait.has_news for wait in waiting),
                                time.monotonic() + READ_SLICE, _latest(current), wait_input)
        except Exception as exc:
            on_error(exc, waiting)
        finally:
            election.resign()


def _latest(waits: Sequence[Any]) -> Optional[float]:
    """When a reconnect on behalf of ``waits`` may give up: their latest deadline (None: never)."""
    latest = 0.0
    for wait in waits:
        if wait.deadline is None:
            return None
        latest = max(latest, wait.deadline)
    return latest

