"""asyncio driver: ``await result``, ``aget``, ``ajoin_native``, ``aiter_native`` without blocking the loop.

How it is driven. Awaits register a :class:`Waiter` in the consumer's state
table, exactly as a blocking ``get()`` does; the table wakes exactly the
waiter a reply belongs to. Replies are read by one background thread per
result consumer (:class:`Hub`), which runs the same blocking drain the
synchronous waiters use (``Drainer.serve`` -> ``drain_events_until``), taking
turns with them through the drainer's leader lock. A waiter's wake-up is
``loop.call_soon_threadsafe`` on the loop that awaits it (coalesced: one
callback per burst), so each await resolves on its own loop, and sync and async
waiters, and loops in several threads, share one consumer.

Why a thread and not ``loop.add_reader`` on the socket: reconnects must keep
working. ``ResultConsumer._recover`` replaces the connection and socket, and
``ensure_connection`` retries with sleeps, which would block the loop; py-amqp
may already hold bytes in its read buffer that no readiness event announces;
heartbeats need their own timer; and a socket cannot be watched by several
loops, nor read by a loop while a synchronous thread of the same process leads
the read. The thread runs the proven blocking path (recovery, acks,
heartbeats, queue-loss reports) unchanged; the loop only ever touches the
state table (no I/O, no blocking lock held across I/O).

Cancellation and timeouts. A timeout is a loop timer (``timeout=0`` first reads
what the socket already holds, in the loop's executor, as ``get(timeout=0)``
does); when it fires, or the
awaiting task is cancelled, the waiter is unwatched (removed from the table)
and from the hub before the exception leaves the await. The hub thread reads
only while some await still waits for a reply, and ends when none is left.
Timeouts raise :class:`rpcresults.exceptions.TimeoutError`, which is both a
builtin ``TimeoutError`` and an ``asyncio.TimeoutError``. An await whose loop
was closed under it is dropped by the hub thread. ``backend.close()`` ends every
await in progress with :class:`ResultBackendClosed`.
"""
from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import deque
from typing import (TYPE_CHECKING, Any, AsyncIterator, Deque, Dict, List, Optional, Sequence, Set,
                    Tuple)

from . import states
from ._drain import Waiter, index_results
from .backends.asynchronous import READ_SLICE, ResultBackendClosed, wait_outcome
from .exceptions import TimeoutError

if TYPE_CHECKING:  # pragma: no cover
    from .result import AsyncResult, ResultSet

__all__ = ('Hub', 'hub_for', 'wait_result', 'join_native', 'iter_native', 'NativeIterator',
           'ResultBackendClosed')

logger = logging.getLogger(__name__)

Meta = Dict[str, Any]

#: Polling interval for backends that cannot be waited on (key-value backends).
POLL_INTERVAL = 0.5

_hubs_lock = threading.Lock()


def _reset_after_fork() -> None:
    """A parent thread may have held the lock at fork time: the child starts with a free one."""
    global _hubs_lock
    _hubs_lock = threading.Lock()


if hasattr(os, 'register_at_fork'):
    os.register_at_fork(after_in_child=_reset_after_fork)


def _is_async(backend: Any) -> bool:
    return bool(getattr(backend, 'is_async', False))


class Hub:
    """One consumer's reader thread for asyncio awaits (any number of loops)."""

    def __init__(self, consumer: Any) -> None:
        self.consumer = consumer
        self._lock = threading.Lock()
        self._sessions: Set['_Session'] = set()
        self._thread: Optional[threading.Thread] = None
        self._event: Optional[threading.Event] = None
        self.threads_started = 0
        self.errors = 0

    # -- introspection -----------------------------------------------------------------------
    @property
    def pending(self) -> int:
        """Awaits in progress on this consumer."""
        return len(self._sessions)

    def waiters(self) -> List[Waiter]:
        """The table waiters of the awaits in progress."""
        return [session.waiter for session in tuple(self._sessions)]

    @property
    def thread(self) -> Optional[threading.Thread]:
        """The reader thread, while there is one."""
        return self._thread

    # -- sessions ----------------------------------------------------------------------------
    def add(self, session: '_Session') -> None:
        """Register an await; starts the reader thread when there is none, else wakes it."""
        with self._lock:
            self._sessions.add(session)
            if self._thread is None:
                self._event = threading.Event()
                self._thread = threading.Thread(target=self._run, args=(self._event,), daemon=True,
                                                name=f'rpcresults-aio-{self.consumer.backend.oid}')
                self.threads_started += 1
                self._thread.start()
            elif self._event is not None:
                self._event.set()

    def wake(self) -> None:
        """Make the reader thread look at its awaits again (one of them lost its loop)."""
        event = self._event
        if event is not None:
            event.set()

    def fail_all(self, error: BaseException) -> None:
        """Hand ``error`` to every await in progress (the backend was closed)."""
        for session in tuple(self._sessions):
            session.waiter.fail(error)

    def remove(self, session: '_Session') -> None:
        """Unregister an await; with none left, the reader thread ends once it stops reading."""
        with self._lock:
            self._sessions.discard(session)
            if not self._sessions and self._event is not None:
                self._event.set()  # the thread ends as soon as it is not reading

    def _busy(self) -> bool:
        """Some await still waits for a reply (not merely for the loop to take it)."""
        for session in tuple(self._sessions):
            waiter = session.waiter
            if waiter.remaining > 0 and waiter.error is None and not session.loop.is_closed():
                return True
        return False

    def _idle(self) -> bool:
        return not self._busy()

    def _give_up_at(self) -> Optional[float]:
        """When a reconnect may give up: the latest deadline of the busy awaits (None: never)."""
        latest = 0.0
        for session in tuple(self._sessions):
            if session.loop.is_closed():
                continue
            if session.deadline is None:
                return None
            latest = max(latest, session.deadline)
        return latest

    def _run(self, event: threading.Event) -> None:
        drainer = self.consumer.drainer
        drainer.add_sleeper(event)
        try:
            while True:
                self._drop_orphans()
                with self._lock:
                    if not self._sessions:
                        self._thread = None
                        self._event = None
                        return
                    busy = self._busy()
                    give_up_at = self._give_up_at()
                if not busy:
                    event.wait(READ_SLICE)
                    event.clear()
                    continue
                event.clear()
                try:
                    drainer.serve(self._idle, time.monotonic() + READ_SLICE, give_up_at, event)
                except Exception as exc:  # what a blocking get() would raise: its awaits raise it
                    self.errors += 1
                    level = logging.DEBUG if isinstance(exc, ResultBackendClosed) else logging.WARNING
                    logger.log(level, 'asyncio reader for %s failed: %r', self.consumer.backend.oid, exc)
                    for session in tuple(self._sessions):
                        if session.waiter.remaining > 0:
                            session.waiter.fail(exc)
        except BaseException:  # never leave awaits hanging on a dead thread
            logger.exception('asyncio reader thread crashed')
            with self._lock:
                self._thread = None
                self._event = None
                sessions = tuple(self._sessions)
            for session in sessions:
                session.waiter.fail(RuntimeError('the rpcresults asyncio reader thread crashed'))
            raise
        finally:
            drainer.discard_sleeper(event)


    def _drop_orphans(self) -> None:
        """Forget awaits whose loop was closed under them: nobody will ever take their result."""
        for session in tuple(self._sessions):
            if session.loop.is_closed():
                logger.debug('dropping an await of %s left on a closed loop', self.consumer.backend.oid)
                session.close()


def hub_for(consumer: Any) -> Hub:
    """The :class:`Hub` of ``consumer`` (made on first use)."""
    hub = consumer.aio_hub
    if hub is None:
        with _hubs_lock:
            hub = consumer.aio_hub
            if hub is None:
                hub = consumer.aio_hub = Hub(consumer)
    return hub


class _Session:
    """One await on a set of ids: a table waiter whose wake-ups land on one loop."""

    __slots__ = ('consumer', 'table', 'hub', 'loop', 'waiter', 'waiting', 'event', 'scheduled',
                 'timed_out', 'deadline', 'timer', 'closed', '__weakref__')

    def __init__(self, consumer: Any, waiting: List[str], timeout: Optional[float]) -> None:
        self.consumer = consumer
        self.table = consumer.table
        self.hub = hub_for(consumer)
        self.loop = asyncio.get_running_loop()
        self.waiter = Waiter(None, self._wake_threadsafe)
        self.waiting = waiting
        self.event = asyncio.Event()
        self.scheduled = False
        self.timed_out = False
        self.closed = False
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.timer = None if timeout is None else self.loop.call_later(max(timeout, 0.0), self._time_up)
        consumer.allow_reopen()  # a new await after backend.close() opens it again
        self.table.watch(self.waiter, waiting)
        if self.waiter.remaining > 0 and (timeout is None or timeout > 0):  # timeout=0 only looks once
            self.hub.add(self)

    def _wake_threadsafe(self) -> None:
        """Called by whichever thread dispatched a reply: one loop callback per burst."""
        if self.scheduled:
            return
        self.scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._on_wake)
        except RuntimeError:  # the loop is closed: nobody is left to wake; the hub drops us
            self.hub.wake()

    def _on_wake(self) -> None:
        self.scheduled = False
        self.event.set()

    def _time_up(self) -> None:
        self.timed_out = True
        self.event.set()

    async def next_bucket(self) -> Optional[Deque[Tuple[str, Any]]]:
        """The deque of ready ``(task_id, meta)`` when it has some; None when all were taken."""
        waiter = self.waiter
        while True:
            if waiter.bucket:
                return waiter.bucket
            if waiter.error is not None:
                raise waiter.error
            if waiter.done:
                return None
            if self.timed_out:
                raise TimeoutError('The operation timed out.')
            self.event.clear()
            await self.event.wait()

    def close(self) -> None:
        """Unwatch the ids and leave the hub (done, timed out, cancelled or abandoned)."""
        if self.closed:
            return
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
        self.waiter.wake = None
        self.table.unwatch(self.waiter, self.waiting)
        self.hub.remove(self)


class _Batches:
    """Ready ``(task_id, meta)`` batches of one wait (the async twin of ``_batches``)."""

    def __init__(self, consumer: Any, by_id: Dict[str, List['AsyncResult']],
                 timeout: Optional[float]) -> None:
        self.consumer = consumer
        self.initial, waiting = consumer.prepare_wait(by_id)
        self.session = _Session(consumer, waiting, timeout) if waiting else None
        self.look_first = timeout is not None and timeout <= 0

    def __aiter__(self) -> '_Batches':
        return self

    async def __anext__(self) -> Deque[Tuple[str, Any]]:
        bucket = await self.next()
        if bucket is None:
            raise StopAsyncIteration
        return bucket

    async def next(self) -> Optional[Deque[Tuple[str, Any]]]:
        """The next non-empty batch (the caller empties it), or None when every id was settled."""
        if self.initial:
            return self.initial
        if self.session is None:
            return None
        if self.look_first:  # as get(timeout=0): read what the socket already holds, off the loop
            self.look_first = False
            if not self.session.waiter.bucket:
                await asyncio.get_running_loop().run_in_executor(None, self.consumer.drainer.drain_now)
        return await self.session.next_bucket()

    def close(self) -> None:
        if self.session is not None:
            self.session.close()


# -- single results --------------------------------------------------------------------------
async def _check_parents(result: 'AsyncResult') -> None:
    """Raise the error of a failed parent, from what is already known (no I/O on the loop)."""
    from .result import _exception_value
    for node in reversed(list(result._parents())):
        meta = node._cache
        if meta is None:
            backend = node.backend
            if _is_async(backend):
                consumer = backend.result_consumer
                consumer.track(node)
                meta = node._maybe_set_cache(consumer.lookup(node.id))
            else:
                await asyncio.get_running_loop().run_in_executor(None, node.maybe_throw)
                continue
        if meta.get('status') in states.PROPAGATE_STATES:
            meta = _exception_value(node.backend, meta)
            node.throw(meta.get('result'), meta.get('traceback'))


async def wait_result(result: 'AsyncResult', timeout: Optional[float] = None, propagate: bool = True,
                      follow_parents: bool = True) -> Any:
    """``AsyncResult.aget``: the value (or the task's exception) without blocking the loop."""
    if result.ignored:
        return None
    if follow_parents and propagate and result.parent is not None:
        await _check_parents(result)
    if result._cache is not None:
        return result.maybe_throw(propagate=propagate)
    backend = result.backend
    if not _is_async(backend):
        async for _ in _poll_ready([result], timeout):
            pass
        return result.maybe_throw(propagate=propagate)
    backend.add_pending_result(result)
    consumer = backend.result_consumer
    meta: Any = None
    by_id = {result.id: [result]}
    batches = _Batches(consumer, by_id, timeout)
    try:
        async for bucket in batches:
            while bucket:
                task_id, raw = bucket.popleft()
                meta = consumer._settle(by_id, task_id, raw)
    finally:
        batches.close()
    backend.on_result_fulfilled(result)
    return wait_outcome(result, meta, propagate)


async def _poll_ready(results: Sequence['AsyncResult'],
                      timeout: Optional[float]) -> AsyncIterator[Tuple[str, Meta]]:
    """For backends without a consumer: look each pending result up in an executor, every interval."""
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    pending: Dict[str, 'AsyncResult'] = {}
    for result in results:
        pending.setdefault(result.id, result)
    while True:
        for task_id, result in list(pending.items()):
            meta = await loop.run_in_executor(None, result._get_task_meta)
            if meta.get('status') in states.READY_STATES:
                del pending[task_id]
                yield task_id, meta
        if not pending:
            return
        if deadline is not None and loop.time() >= deadline:
            raise TimeoutError('The operation timed out.')
        delay = POLL_INTERVAL if deadline is None else min(POLL_INTERVAL, max(deadline - loop.time(), 0))
        await asyncio.sleep(delay)


# -- result sets -----------------------------------------------------------------------------
async def join_native(resultset: 'ResultSet', timeout: Optional[float] = None,
                      propagate: bool = True) -> List[Any]:
    """``ResultSet.ajoin_native``: every member's value, in member order."""
    from .result import AsyncResult, ResultSet
    results = resultset.results
    if not results:
        return []
    backend = resultset.backend
    if not (_is_async(backend) and all(type(r) is AsyncResult and r._backend is backend for r in results)):
        return await _join_one_by_one(results, timeout, propagate, ResultSet)
    consumer = backend.result_consumer
    by_id, positions, values, sink = consumer.join_state(results)
    batches = _Batches(consumer, by_id, timeout)
    try:
        async for bucket in batches:
            consumer.fill_bucket(bucket, by_id, positions, values, sink, propagate)
    finally:
        batches.close()
    return values


async def _join_one_by_one(results: Sequence[Any], timeout: Optional[float], propagate: bool,
                           result_set_type: type) -> List[Any]:
    """Mixed members (nested sets, eager results, other backends): one after the other."""
    deadline = None if timeout is None else time.monotonic() + timeout
    values = []
    for result in results:
        remaining = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        if isinstance(result, result_set_type):
            values.append(await join_native(result, remaining, propagate))
        else:
            values.append(await wait_result(result, remaining, propagate))
    return values


class NativeIterator:
    """``async for task_id, meta in resultset.aiter_native()``: each member as it becomes final.

    Leaving the loop early (``break``) unwatches at once when the iterator is
    dropped; ``await it.aclose()`` does it explicitly.
    """

    def __init__(self, resultset: 'ResultSet', timeout: Optional[float]) -> None:
        self.resultset = resultset
        self.timeout = timeout
        self._ready: Deque[Tuple[Any, Any]] = deque()
        self._leaves: Optional[List['AsyncResult']] = None
        self._batches: Optional[_Batches] = None
        self._by_id: Dict[str, List['AsyncResult']] = {}
        self._poll: Any = None
        self._finished = False

    def __aiter__(self) -> 'NativeIterator':
        return self

    def _start(self) -> None:
        from .result import ResultSet
        leaves = []
        for node in self.resultset.results:
            if isinstance(node, ResultSet):
                self._ready.append((getattr(node, 'id', None), node.results))
            else:
                leaves.append(node)
        self._leaves = leaves
        if not leaves:
            return
        backend = self.resultset.backend
        if _is_async(backend):
            self._by_id, _ = index_results(leaves)
            self._batches = _Batches(backend.result_consumer, self._by_id, self.timeout)
        else:
            self._poll = _poll_ready(leaves, self.timeout).__aiter__()

    async def __anext__(self) -> Tuple[str, Any]:
        if self._leaves is None:
            self._start()
        if self._ready:
            return self._ready.popleft()
        try:
            if self._batches is not None and not self._finished:
                bucket = await self._batches.next()
                if bucket is not None:
                    task_id, meta = bucket.popleft()
                    return task_id, self._batches.consumer._settle(self._by_id, task_id, meta)
            elif self._poll is not None and not self._finished:
                return await self._poll.__anext__()
        except BaseException:
            self.close()
            raise
        self.close()
        raise StopAsyncIteration

    def close(self) -> None:
        """Stop waiting: unwatch whatever is still watched."""
        self._finished = True
        if self._batches is not None:
            self._batches.close()

    async def aclose(self) -> None:
        """Stop iterating early: unwatch what is still watched (and close the poll for non-RPC backends)."""
        self.close()
        if self._poll is not None:
            await self._poll.aclose()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass


def iter_native(resultset: 'ResultSet', timeout: Optional[float] = None) -> NativeIterator:
    """``ResultSet.aiter_native``: an async iterator of ``(task_id, meta)``."""
    return NativeIterator(resultset, timeout)
