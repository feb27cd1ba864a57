"""Waiting on a backend that can only be polled (key-value stores): the wait core over a poll table.

A :class:`PollSource` is what such a backend's waits wait on (see
:mod:`rpcresults.engine.wait`): its table fetches the ids a wait still waits for
in one store round (``backend.poll_round``), and its drivers block by sleeping
``interval`` between rounds, in a thread or on an asyncio loop (the round then
runs in the loop's executor). The first round runs at once.
"""
from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Any, Callable, Deque, Dict, Iterable, List, Optional, Set, Tuple

from ..protocol import Waiter, is_final
from .wait import Wait

__all__ = ('PollSource', 'PollTable', 'PollDrainer', 'AsyncPollDriver')

Meta = Dict[str, Any]


class PollTable:
    """The table of one polled wait: its pending ids, fetched in rounds by :meth:`refresh`."""

    def __init__(self, fetch: Callable[[Set[str]], Dict[str, Meta]], max_rounds: Optional[int] = None) -> None:
        self._fetch = fetch
        self._max_rounds = max_rounds
        self.rounds = 0
        self._waiter: Optional[Waiter] = None
        self._pending: Set[str] = set()

    def watch(self, waiter: Waiter, task_ids: Iterable[str]) -> None:
        """Attach the wait's ``waiter`` to ``task_ids``."""
        self._waiter = waiter
        self._pending = set(task_ids)
        waiter.remaining = len(self._pending)

    def unwatch(self, waiter: Waiter, task_ids: Iterable[str]) -> None:
        """Detach it (the wait ended)."""
        self._pending = set()
        waiter.remaining = 0
        self._waiter = None

    def refresh(self) -> None:
        """One store round: every state is shown to ``on_message``, final ones go to the bucket."""
        waiter = self._waiter
        if waiter is None or not self._pending:
            return
        on_message = waiter.on_message
        for task_id, meta in self._fetch(set(self._pending)).items():
            if on_message is not None:
                on_message(meta)
            if task_id in self._pending and is_final(meta):
                self._pending.discard(task_id)
                waiter.arrived(task_id, meta)
        self.rounds += 1
        if self._max_rounds is not None and self.rounds >= self._max_rounds:
            waiter.remaining = 0  # as Celery's max_iterations: stop without a timeout


class PollDrainer:
    """Blocks a thread between rounds: ``interval`` seconds, or less at the deadline."""

    def __init__(self, interval: float) -> None:
        self.interval = interval

    def attach(self, wait: Any) -> None:
        """Nothing to set up: nobody wakes a polled wait."""

    def block(self, wait: Any) -> None:
        """Sleep until the next round (the first one runs at once), then run it."""
        if wait.looked:
            remaining = wait.remaining()
            time.sleep(self.interval if remaining is None else min(self.interval, remaining))
        wait.table.refresh()

    def detach(self, wait: Any) -> None:
        """Nothing to undo."""


class AsyncPollDriver(PollDrainer):
    """:class:`PollDrainer` on an asyncio loop: it sleeps on the loop, the round runs in the executor."""

    async def ablock(self, wait: Any) -> None:
        """Sleep on the loop until the next round, then run it off the loop."""
        if wait.looked:
            remaining = wait.remaining()
            await asyncio.sleep(self.interval if remaining is None else min(self.interval, remaining))
        await asyncio.get_running_loop().run_in_executor(None, wait.table.refresh)


class PollSource:
    """What the waits of a polled ``backend`` wait on (the wait core's source)."""

    def __init__(self, backend: Any, interval: float = 0.5, max_rounds: Optional[int] = None) -> None:
        self.backend = backend
        self.max_rounds = max_rounds
        self.drainer = PollDrainer(interval)
        self.aio_driver = AsyncPollDriver(interval)
        self.remember = backend.cache_final if backend.caches_finals else None

    @staticmethod
    def settle(result: Any, meta: Meta) -> Meta:
        """Make ``meta`` the final state of ``result``."""
        return result.settle(meta)  # type: ignore[no-any-return]

    def prepare(self, by_id: Dict[str, List[Any]]) -> Tuple[Deque[Tuple[str, Any]], List[str]]:
        """``(batch of ids already final, ids to poll for)``: final ones from the results or the cache."""
        initial: Deque[Tuple[str, Any]] = deque()
        waiting = []
        for task_id, same in by_id.items():
            known = same[0].settled if same else None
            if known is None:
                known = self.backend.cached_final(task_id)
            if known is not None:
                initial.append((task_id, known))
            else:
                waiting.append(task_id)
        return initial, waiting

    def open(self, task_ids: List[str], deadline: Optional[float],
             on_message: Optional[Callable[[Meta], Any]]) -> Any:
        """A wait for ``task_ids``, polled through ``backend.poll_round``."""
        return Wait(PollTable(self.backend.poll_round, self.max_rounds), task_ids, deadline, on_message)

