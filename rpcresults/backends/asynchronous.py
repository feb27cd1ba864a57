"""Backends that wait on a consumer instead of polling: ``AsyncBackendMixin`` and ``BaseResultConsumer``.

A :class:`BaseResultConsumer` puts together, for one reply queue: the state
table (protocol layer), the :class:`~rpcresults.engine.connection.ReplyConnection`
that fills it, the reader election, and the drivers that block waits on it (a
drainer for threads or green threads, the asyncio driver). It is the *source*
of every wait of its backend (see :mod:`rpcresults.engine.wait`). Celery's names
(``start``, ``stop``, ``drain_events``, ``consume_from``, ``cancel_for``,
``on_after_fork``; ``Drainer`` and its registry) are kept.
"""
from __future__ import annotations

import logging
import time
import weakref
from collections import deque
from typing import Any, Callable, Deque, Dict, Iterable, List, Optional, Sequence, Tuple

from .. import states
from .._meta import error_meta, pending_meta
from ..engine.asyncio_driver import AsyncDriver
from ..engine.connection import FIRST_CONNECT_BUDGET, ReplyConnection
from ..engine.replyqueue import ReplyQueue
from ..engine.drivers import Drainer, detect_environment, drainer_for, drainers, register_drainer
from ..engine.green import EventletDrainer, GeventDrainer, GreenDrainer  # registers them too
from ..engine.reader import ReaderElection
from ..engine.wait import Wait, deadline_after
from ..exceptions import ReplyQueueLost, ResultBackendClosed, ResultEvicted, TimeoutError
from .waiting import Waiting

__all__ = ('AsyncBackendMixin', 'BaseResultConsumer', 'Drainer', 'GreenDrainer', 'GeventDrainer',
           'EventletDrainer', 'drainers', 'register_drainer', 'detect_environment')

logger = logging.getLogger(__name__)

Meta = Dict[str, Any]

#: How long a poll (``state``, ``get_task_meta``) waits for the replies its queue holds.
POLL_BUDGET = 2.0
#: While another thread reads, how often a poll looks whether that reader stopped.
QUEUED_LOOK = 0.005


class BaseResultConsumer:
    """Reads one reply queue into the state table, and is what the backend's waits wait on."""

    #: How long ``stop()`` waits for a reading thread to finish its read before it drops the
    #: connection under it (no handshake) instead of closing it politely.
    STOP_GRACE = 0.25

    def __init__(self, backend: Any, app: Any, accept: Any, table: Any, queue: ReplyQueue) -> None:
        self.backend = backend
        self.app = app
        self.accept = accept
        self.table = table
        self.connection = ReplyConnection(app, table, queue, lost_error=ReplyQueueLost)
        self.election = ReaderElection()
        self.drainer: Drainer = drainer_for(self)
        self.aio_driver = AsyncDriver(self)
        self._waits: 'weakref.WeakSet[Wait]' = weakref.WeakSet()

    @property
    def name(self) -> str:
        """The reply queue's name (for logs and thread names)."""
        return self.connection.queue.name

    # -- Celery's consumer API ---------------------------------------------------------------
    def start(self, initial_task_id: Optional[str] = None, **kwargs: Any) -> None:
        """Connect and begin consuming (idempotent); after :meth:`stop` it opens the backend again."""
        self.connection.reopen()
        self.connection.open(None)

    def stop(self) -> None:
        """Close the reply connection; every wait in progress raises :class:`ResultBackendClosed`.

        With nobody reading, handled replies are acked, the consumer cancelled and the
        connection closed politely; when a thread is blocked reading, the connection is
        dropped without a handshake instead (that ends the read; the broker requeues
        the unacked replies). Nothing reconnects until a new wait or :meth:`start`.
        """
        self.connection.refuse_reconnects()
        self.fail_waiters(ResultBackendClosed())
        polite = self.election.lead_within(self.STOP_GRACE)
        try:
            self.connection.close(polite)
        finally:
            if polite:
                self.election.resign()

    def drain_events(self, timeout: Optional[float] = None) -> None:
        """Block up to ``timeout`` for replies and dispatch what arrives (at most one read)."""
        deadline = deadline_after(timeout)
        if not self.election.try_lead():
            return
        try:
            self.connection.read(timeout, deadline)
            self.connection.read_available(deadline=deadline)
        finally:
            self.election.resign()

    def consume_from(self, task_id: str) -> None:
        """Make sure replies for ``task_id`` are consumed: one queue serves every id, so: :meth:`start`."""
        self.start()

    def cancel_for(self, task_id: str) -> None:
        """Nothing to cancel per task: the reply queue is shared by every id."""

    def on_after_fork(self) -> None:
        """Forget the parent's connection, state and waits in a forked child.

        The table is replaced, not cleared: a parent thread may have held its lock at
        fork time, and results made in the parent re-track themselves in the new one.
        """
        self.table = self.backend.new_table()
        self.connection.forget_after_fork()
        self.connection.table = self.table
        self.election = ReaderElection()
        self.drainer = drainer_for(self)
        self.aio_driver = AsyncDriver(self)  # its thread does not exist in the child
        self._waits = weakref.WeakSet()

    # -- the wait core's source --------------------------------------------------------------
    def settled(self, result: Any) -> Optional[Meta]:
        """The final meta ``result`` holds, else None."""
        return result.settled  # type: ignore[no-any-return]

    def settle(self, result: Any, meta: Meta) -> Meta:
        """Make ``meta`` the final state of ``result``; the meta as it now holds it."""
        return result.settle(meta)  # type: ignore[no-any-return]

    def cached(self, task_id: str) -> Optional[Meta]:
        """A final meta for ``task_id`` from the backend's result cache, else None."""
        return self.backend.cached_final(task_id)  # type: ignore[no-any-return]

    @property
    def remember(self) -> Optional[Callable[[str, Meta], Any]]:
        """Where final metas go besides the result objects: the backend's result cache, if enabled."""
        backend = self.backend
        return backend.cache_final if backend.caches_finals else None

    def track(self, result: Any) -> None:
        """Keep ``result``'s id tracked while the result object lives (tracking it twice does nothing)."""
        self.table.track(result.id, result)

    def prepare(self, by_id: Dict[str, List[Any]]) -> Tuple[Deque[Tuple[str, Any]], List[str]]:
        """``(batch of ids already final, ids still to wait for)``; tracks the latter."""
        initial: Deque[Tuple[str, Any]] = deque()
        waiting: List[str] = []
        to_track = []
        for task_id, same in by_id.items():
            first = same[0]
            known = self.settled(first)
            if known is not None:
                initial.append((task_id, known))
            else:
                waiting.append(task_id)
                to_track.append((task_id, first))
        if to_track:
            self.table.track_many(to_track)
        return initial, waiting

    def open(self, task_ids: List[str], deadline: Optional[float],
             on_message: Optional[Callable[[Meta], Any]]) -> Wait:
        """A wait on the table; a wait begun after :meth:`stop` opens the backend again."""
        self.connection.reopen()
        wait = Wait(self.table, task_ids, deadline, on_message)
        self._waits.add(wait)
        return wait

    def read_until(self, until: Callable[[], bool], deadline: Optional[float], give_up_at: Optional[float],
                   wait_input: Optional[Callable[[Any, Optional[float]], bool]] = None) -> None:
        """Read as the leader until ``until()`` or ``deadline`` (reconnects give up at ``give_up_at``)."""
        self.connection.read_until(until, deadline, give_up_at, wait_input)

    def read_now(self, limit: Optional[int] = None, queued: bool = False) -> Tuple[int, bool]:
        """Read what already arrived, never blocking on a reconnect: ``(count, exhausted)``.

        With ``queued``, also every reply the reply queue holds now (see
        :meth:`ReplyConnection.read_queued`), for up to ``POLL_BUDGET`` seconds; while
        another thread reads, this one marks the queue and waits for that reader to
        dispatch what is ahead of the marker. A connection found broken is only dropped; the next
        blocking wait rebuilds it. A backend that never connected makes one attempt,
        bounded by ``FIRST_CONNECT_BUDGET`` seconds.
        """
        connection = self.connection
        deadline = time.monotonic() + (POLL_BUDGET if queued else FIRST_CONNECT_BUDGET)
        if not self.election.try_lead():
            if queued:
                self._await_queued(deadline)
            return 0, True
        try:
            if queued:
                return connection.read_queued(limit, deadline)
            return connection.read_available(limit, deadline=deadline, recover=False)
        except (ResultBackendClosed, TimeoutError) + connection.recoverable() as exc:
            logger.debug('no replies read for %s now: %r', self.name, exc)
            return 0, True
        finally:
            self.election.resign()

    def _await_queued(self, deadline: float) -> None:
        """Another thread reads: mark the queue (once that thread connected), wait until it
        dispatched what was ahead of the marker, taking over the read if it stops first; up to
        ``deadline``."""
        connection, election = self.connection, self.election
        arrived: Optional[Callable[[], bool]] = None
        while connection.marks_beside_reader or arrived is not None:
            if arrived is None:
                arrived = connection.ask_queued()
            elif arrived():
                return
            if election.lead_within(QUEUED_LOOK):  # the reader resigned: read on ourselves
                try:
                    if arrived is None:
                        connection.read_queued(None, deadline)
                    while arrived is not None and not arrived() and time.monotonic() < deadline:
                        connection.read(max(deadline - time.monotonic(), 0), deadline, recover=False)
                    connection.read_available(deadline=deadline, recover=False)
                except (ResultBackendClosed, TimeoutError) + connection.recoverable() as exc:
                    logger.debug('no replies read for %s now: %r', self.name, exc)
                finally:
                    election.resign()
                return
            if time.monotonic() >= deadline:
                return

    def poll(self, task_id: str, backlog_limit: int, backlog_error: type) -> Meta:
        """``get_task_meta``: read up to ``backlog_limit`` replies the queue holds, then look ``task_id`` up.

        Every reply read lands in the state table (the newest per id wins); more than
        ``backlog_limit`` replies in the way raise ``backlog_error(task_id)``. A final
        state already in the table is returned without asking the broker.
        """
        known = self.final_meta(task_id)
        if known is not None:
            return known
        _, exhausted = self.read_now(backlog_limit, queued=True)
        if not exhausted:
            raise backlog_error(task_id)
        return self.lookup(task_id)

    def final_meta(self, task_id: str) -> Optional[Meta]:
        """``task_id``'s final meta when the table (or the result cache) already holds it."""
        meta = self.lookup(task_id)
        return meta if meta['status'] in states.READY_STATES else None

    def lookup(self, task_id: str) -> Meta:
        """The newest state known for ``task_id`` as a meta (PENDING when nothing arrived)."""
        try:
            meta = self.table.meta(task_id)
        except ResultEvicted as exc:
            return error_meta(task_id, exc)
        if meta is None:
            return self.cached(task_id) or pending_meta(task_id)
        if isinstance(meta, BaseException):
            return error_meta(task_id, meta)
        return meta  # type: ignore[no-any-return]

    def current_meta(self, result: Any, limit: Optional[int] = 65536) -> Meta:
        """The newest state of ``result`` after reading the replies its queue holds (bounded by
        ``POLL_BUDGET``; no broker round trip when its final state is already known)."""
        self.track(result)
        known = self.final_meta(result.id)
        if known is not None:
            return known
        self.read_now(limit, queued=True)
        return self.lookup(result.id)

    def fail_waiters(self, error: BaseException) -> None:
        """Hand ``error`` to every wait in progress: blocking ones and asyncio awaits."""
        for wait in list(self._waits):
            wait.waiter.fail(error)

    def stats(self) -> Dict[str, int]:
        """The connection's counters and what is going on now.

        ``waits``: waits in progress (blocking and asyncio); ``reading``: 1 while a thread
        reads the socket; ``connected``: 1 while consuming; ``aio_waits``: awaits the
        asyncio reader thread reads for; ``aio_reader``: 1 while that thread runs;
        ``aio_readers_started``: how many such threads were started; the drainer's own
        (green drainers: ``green_waits``, ``green_readers_started``).
        """
        counters = self.connection.stats()
        hub = self.aio_driver.hub
        counters.update(
            waits=sum(1 for wait in list(self._waits) if not wait.closed),
            reading=int(self.election.reading), connected=int(self.connection.connected),
            aio_waits=hub.pending, aio_reader=int(hub.running), aio_readers_started=hub.threads_started)
        counters.update(self.drainer.stats())
        return counters


class AsyncBackendMixin(Waiting):
    """Joins and waits driven by a result consumer (Celery's ``AsyncBackendMixin``)."""

    is_async = True
    result_consumer: BaseResultConsumer

    def wait_source(self, interval: float = 0.5) -> BaseResultConsumer:
        """The reply consumer: every wait of this backend waits on it."""
        return self.result_consumer

    def add_pending_result(self, result: Any, weak: bool = False) -> Any:
        """Track ``result`` so replies for it are kept for it (for as long as it lives)."""
        self.result_consumer.track(result)
        return result

    def add_pending_results(self, results: Iterable[Any], weak: bool = False) -> None:
        """:meth:`add_pending_result` for each of ``results`` (Celery's batch form)."""
        for result in results:
            self.add_pending_result(result, weak=weak)

    def remove_pending_result(self, result: Any) -> Any:
        """Nothing to do: tracking ends by itself when the result object is collected."""
        self.on_result_fulfilled(result)
        return result

    def current_meta(self, result: Any) -> Meta:
        """The newest known state of ``result`` (reads what already arrived, never blocks)."""
        return self.result_consumer.current_meta(result)

    def known_meta(self, result: Any) -> Meta:
        """The newest state of ``result`` in the state table (no read)."""
        consumer = self.result_consumer
        consumer.track(result)
        return consumer.lookup(result.id)

    def refresh(self, results: Sequence[Any]) -> None:
        """Track ``results`` (so replies for them are kept), then read what their queue holds
        unless every one of them is known final."""
        consumer = self.result_consumer
        pending = [(result.id, result) for result in results if result.settled is None]
        if pending:
            consumer.table.track_many(pending)
            if any(consumer.final_meta(task_id) is None for task_id, _ in pending):
                consumer.read_now(queued=True)

    def watch_then(self, result: Any) -> None:
        """Fire ``result``'s ``then()`` callbacks from whichever thread reads its final reply."""
        consumer = self.result_consumer
        consumer.track(result)
        wait = Wait(consumer.table, [result.id], None)

        def on_news() -> None:
            bucket = wait.waiter.bucket
            while bucket:
                task_id, meta = bucket.popleft()
                if not isinstance(meta, BaseException):
                    result.settle(meta)
            if wait.waiter.done:
                wait.close()

        wait.waiter.wake = on_news
        on_news()
