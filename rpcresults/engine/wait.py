"""Waiting for results, written once: "wait for these ids until this deadline".

A :class:`Wait` registers a waiter in a table (the state table of a reply
consumer, or the poll table of a key-value backend), hands out what arrives in
batches, applies the timeout and error rules, and unregisters on every way out:
done, timeout, error, cancel, or abandoned. Its :meth:`Wait.steps` is the only
wait loop; the pumps below run it, and a driver only supplies "block until woken
or until the deadline": a drainer for threads or green threads (``block``), or an
asyncio driver (``ablock``).

Everything that waits comes through here: ``AsyncResult.get``/``aget``,
``ResultSet.join_native``/``ajoin_native``/``iter_native``/``aiter_native``/``join``
and the key-value backends' ``get_many``. What they wait on is a *source* (a
backend's consumer, or a polling source), which offers:

* ``prepare(by_id) -> (batch of ids already final, ids to wait for)`` (tracking them);
* ``open(ids, deadline, on_message) -> Wait``;
* ``drainer`` (sync) and ``aio_driver`` (asyncio);
* ``settle(result, meta) -> meta``: makes a final meta a result object's state;
* ``remember``: ``None``, or ``remember(task_id, meta)`` for a backend's result cache.

The timeout rule: a wait looks at least once (``timeout=0`` reads what already
arrived), then raises :class:`~rpcresults.exceptions.TimeoutError` once its
deadline has passed with nothing new. Errors of ours (a lost queue, an evicted or
malformed reply) arrive in the batch as exceptions; the task's own states as metas.
"""
from __future__ import annotations

import time
from collections import deque
from typing import Any, Callable, Deque, Dict, Iterator, List, Optional, Sequence, Tuple

from .. import states
from .._meta import ErrorMeta, error_meta
from ..exceptions import TaskRevokedError, TimeoutError
from ..protocol import Waiter, fill_values, index_results

__all__ = ('Wait', 'BLOCK', 'deadline_after', 'batches', 'ABatches', 'settle_all', 'fill_bucket',
           'iter_ready', 'join_values', 'wait_one', 'aiter_ready', 'ajoin_values', 'await_one',
           'outcome')

Meta = Dict[str, Any]
Batch = Deque[Tuple[str, Any]]


class _Block:
    """The step that asks the driver to block until woken or until the deadline."""

    def __repr__(self) -> str:
        return 'BLOCK'


BLOCK = _Block()


def deadline_after(timeout: Optional[float]) -> Optional[float]:
    """The monotonic deadline ``timeout`` seconds from now (None: no deadline)."""
    return None if timeout is None else time.monotonic() + timeout


class Wait:
    """One wait for ``ids`` until ``deadline``: watched in ``table`` from creation until :meth:`close`."""

    __slots__ = ('table', 'waiter', 'ids', 'deadline', 'looked', 'closed', 'slot', '__weakref__')

    def __init__(self, table: Any, ids: Sequence[str], deadline: Optional[float],
                 on_message: Optional[Callable[[Meta], Any]] = None) -> None:
        self.table = table
        self.ids = ids
        self.deadline = deadline
        self.waiter = Waiter(on_message)
        self.looked = False  # blocked once: a passed deadline now means a timeout
        self.closed = False
        self.slot: Any = None  # the driver's own state (its event, its loop)
        table.watch(self.waiter, ids)

    @property
    def has_news(self) -> bool:
        """Something for the waiting code: a final state, an error, or nothing left to wait for."""
        return self.waiter.has_news

    def remaining(self) -> Optional[float]:
        """Seconds to the deadline (0 once passed; None without one)."""
        if self.deadline is None:
            return None
        return max(self.deadline - time.monotonic(), 0.0)

    def expired(self) -> bool:
        """True once the deadline has passed."""
        return self.deadline is not None and time.monotonic() >= self.deadline

    def steps(self) -> Iterator[Any]:
        """The wait loop: a non-empty batch (empty it before the next step), or :data:`BLOCK`.

        Ends when every id arrived; raises the waiter's error, or the timeout.
        """
        waiter = self.waiter
        while True:
            if waiter.bucket:
                yield waiter.bucket
            elif waiter.error is not None:
                raise waiter.error
            elif waiter.remaining <= 0:
                return
            elif self.looked and self.expired():
                raise TimeoutError('The operation timed out.')
            else:
                yield BLOCK
                self.looked = True

    def close(self) -> None:
        """Stop watching (idempotent)."""
        if not self.closed:
            self.closed = True
            self.table.unwatch(self.waiter, self.ids)


def batches(source: Any, by_id: Dict[str, List[Any]], timeout: Optional[float],
            on_message: Optional[Callable[[Meta], Any]] = None,
            on_interval: Optional[Callable[[], Any]] = None) -> Iterator[Batch]:
    """Batches of final ``(task_id, meta or error)`` for ``by_id``'s ids, the known ones first."""
    deadline = deadline_after(timeout)
    initial, waiting = source.prepare(by_id)
    if initial:
        yield initial
    if not waiting:
        return
    drainer = source.drainer
    wait = source.open(waiting, deadline, on_message)
    try:
        drainer.attach(wait)
        for step in wait.steps():
            if step is BLOCK:
                drainer.block(wait)
                if on_interval is not None:
                    on_interval()
            else:
                yield step
    finally:
        drainer.detach(wait)
        wait.close()


class ABatches:
    """:func:`batches` for asyncio: ``async for batch in ABatches(...)``; :meth:`close` when leaving early."""

    def __init__(self, source: Any, by_id: Dict[str, List[Any]], timeout: Optional[float]) -> None:
        self.source = source
        self.deadline = deadline_after(timeout)
        self.initial: Optional[Batch]
        self.initial, self.waiting = source.prepare(by_id)
        self.wait: Optional[Wait] = None
        self._steps: Optional[Iterator[Any]] = None
        self.finished = False

    def __aiter__(self) -> 'ABatches':
        return self

    async def __anext__(self) -> Batch:
        initial, self.initial = self.initial, None
        if initial:
            return initial
        if self.finished:
            raise StopAsyncIteration
        try:
            if self._steps is None:
                if not self.waiting:
                    raise StopAsyncIteration
                self.wait = self.source.open(self.waiting, self.deadline, None)
                self.source.aio_driver.attach(self.wait)
                self._steps = self.wait.steps()
            for step in self._steps:
                if step is BLOCK:
                    await self.source.aio_driver.ablock(self.wait)
                else:
                    return step  # type: ignore[no-any-return]
        except BaseException:
            self.close()
            raise
        self.close()
        raise StopAsyncIteration

    def close(self) -> None:
        """Stop waiting: unwatch whatever is still watched."""
        self.finished = True
        wait = self.wait
        if wait is not None and not wait.closed:
            self.source.aio_driver.detach(wait)
            wait.close()


# -- what the waits hand back --------------------------------------------------------------------
def settle_all(source: Any, by_id: Dict[str, List[Any]], task_id: str, meta: Any) -> Meta:
    """Make ``meta`` the final state of every result for ``task_id``; an error of ours becomes an ErrorMeta."""
    if isinstance(meta, BaseException):
        return error_meta(task_id, meta)
    settle = source.settle
    settled = meta
    for result in by_id[task_id]:
        settled = settle(result, meta)  # as Celery yields it: exceptions and children rebuilt
    remember = source.remember
    if remember is not None:
        remember(task_id, settled)
    return settled


def fill_bucket(source: Any, bucket: Batch, by_id: Dict[str, List[Any]], positions: Dict[str, List[int]],
                values: List[Any], propagate: bool) -> None:
    """Place one batch into ``values`` (member order), emptying it; with ``propagate`` a failure raises.

    Plain successes are placed by the protocol layer's ``fill_values``; anything
    else (failures, errors, children) comes back here to be settled one by one.
    """
    settle, remember = source.settle, source.remember
    while bucket:
        item = fill_values(bucket, by_id, positions, values, settle, remember)
        if item is None:
            return
        task_id, meta = item
        meta = settle_all(source, by_id, task_id, meta)
        value = meta.get('result')
        if propagate and meta.get('status') in states.PROPAGATE_STATES:
            raise value if isinstance(value, BaseException) else TaskRevokedError(task_id)
        for index in positions[task_id]:
            values[index] = value


def outcome(result: Any, meta: Any, propagate: bool, callback: Optional[Callable[..., Any]] = None) -> Any:
    """What a finished wait for ``result`` returns: its value, or its exception (raised with ``propagate``).

    Errors of ours (:class:`ErrorMeta`) come from this wait and are never kept by the
    result; anything else is the result's own state.
    """
    if isinstance(meta, ErrorMeta):
        error = meta['result']
        if propagate:
            raise error
        if callback is not None:
            callback(result.id, error)
        return error
    return result.maybe_throw(callback=callback, propagate=propagate)


# -- sync ------------------------------------------------------------------------------------------
def iter_ready(source: Any, results: Sequence[Any], timeout: Optional[float] = None,
               on_message: Optional[Callable[[Meta], Any]] = None,
               on_interval: Optional[Callable[[], Any]] = None) -> Iterator[Tuple[str, Meta]]:
    """``(task_id, meta)`` for each distinct id as its final state arrives (arrival order)."""
    by_id, _ = index_results(results)
    for bucket in batches(source, by_id, timeout, on_message, on_interval):
        while bucket:
            task_id, meta = bucket.popleft()
            yield task_id, settle_all(source, by_id, task_id, meta)


def join_values(source: Any, results: Sequence[Any], timeout: Optional[float] = None,
                propagate: bool = True, on_message: Optional[Callable[[Meta], Any]] = None,
                on_interval: Optional[Callable[[], Any]] = None) -> List[Any]:
    """Every result's value, in member order (the hot path of ``ResultSet.join_native``)."""
    by_id, positions = index_results(results)
    values: List[Any] = [None] * len(results)
    for bucket in batches(source, by_id, timeout, on_message, on_interval):
        fill_bucket(source, bucket, by_id, positions, values, propagate)
    return values


def wait_one(source: Any, result: Any, timeout: Optional[float] = None, propagate: bool = True,
             on_message: Optional[Callable[[Meta], Any]] = None,
             on_interval: Optional[Callable[[], Any]] = None,
             callback: Optional[Callable[..., Any]] = None) -> Any:
    """Block until ``result`` is final; its value, or its exception (``AsyncResult.get``)."""
    meta: Any = None
    for item in iter_ready(source, [result], timeout, on_message, on_interval):
        meta = item[1]
    return outcome(result, meta, propagate, callback)


# -- asyncio ---------------------------------------------------------------------------------------
class aiter_ready:  # noqa: N801  (used like an async generator function)
    """``async for task_id, meta in aiter_ready(...)``: each distinct id as it becomes final.

    Leaving early (``break``) unwatches once the iterator is dropped; ``await it.aclose()``
    does it at once.
    """

    def __init__(self, source: Any, results: Sequence[Any], timeout: Optional[float] = None) -> None:
        self.source = source
        self.by_id, _ = index_results(results)
        self.batches = ABatches(source, self.by_id, timeout)
        self.bucket: Batch = deque()

    def __aiter__(self) -> 'aiter_ready':
        return self

    async def __anext__(self) -> Tuple[str, Meta]:
        if not self.bucket:
            self.bucket = await self.batches.__anext__()
        task_id, meta = self.bucket.popleft()
        return task_id, settle_all(self.source, self.by_id, task_id, meta)

    async def aclose(self) -> None:
        """Stop waiting now."""
        self.batches.close()

    def __del__(self) -> None:
        try:
            self.batches.close()
        except Exception:  # interpreter shutdown
            pass


async def ajoin_values(source: Any, results: Sequence[Any], timeout: Optional[float] = None,
                       propagate: bool = True) -> List[Any]:
    """:func:`join_values` without blocking the loop."""
    by_id, positions = index_results(results)
    values: List[Any] = [None] * len(results)
    batches_ = ABatches(source, by_id, timeout)
    try:
        async for bucket in batches_:
            fill_bucket(source, bucket, by_id, positions, values, propagate)
    finally:
        batches_.close()
    return values


async def await_one(source: Any, result: Any, timeout: Optional[float] = None,
                    propagate: bool = True) -> Any:
    """:func:`wait_one` without blocking the loop (``AsyncResult.aget``)."""
    meta: Any = None
    iterator = aiter_ready(source, [result], timeout)
    try:
        async for item in iterator:
            meta = item[1]
    finally:
        await iterator.aclose()
    return outcome(result, meta, propagate)

