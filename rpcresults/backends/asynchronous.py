"""Waiting on a consumer instead of polling: AsyncBackendMixin, BaseResultConsumer, drainers.

Many threads may wait on one consumer at once. One of them at a time (the
leader) reads the socket; every reply it reads is routed by the state table to
the waiter it belongs to, which is woken through its own event. When the leader
is done it wakes the others so one of them takes over. Nobody holds a lock
around a whole wait, and nobody polls.

Which drainer a consumer uses depends on the environment, as in Celery: under
gevent or eventlet monkey-patching a :class:`GreenDrainer` (one green reader,
green events) replaces the default one. The asyncio driver (``rpcresults.aio``)
runs its reader thread through :meth:`Drainer.serve`, taking turns with
synchronous waiters.
"""
from __future__ import annotations

import functools
import importlib
import logging
import sys
import threading
import time
from collections import deque
from typing import (TYPE_CHECKING, Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence,
                    Set, Tuple, Type)

from .. import states
from .._consume import wait_readable
from .._drain import StateTable, Waiter, fill_values, index_results
from ..exceptions import ResultBackendClosed, ResultEvicted, TaskRevokedError, TimeoutError

if TYPE_CHECKING:  # pragma: no cover
    from ..result import AsyncResult, ResultSet

__all__ = ('AsyncBackendMixin', 'BaseResultConsumer', 'Drainer', 'GreenDrainer', 'GeventDrainer',
           'EventletDrainer', 'drainers', 'register_drainer', 'detect_environment', 'error_meta',
           'ResultBackendClosed', 'wait_outcome')

Meta = Dict[str, Any]

logger = logging.getLogger(__name__)

#: Default of ``give_up_at``: the drain's own deadline.
_SAME: Any = object()

#: How long a background reader (green drainer, asyncio driver) reads before it looks
#: again whether anyone still waits.
READ_SLICE = 1.0

#: Longest sleep of a reader that polls a socket owned by another green hub (see GreenDrainer).
POLL_SLICE = 0.25

drainers: Dict[str, Type['Drainer']] = {}


def register_drainer(name: str) -> Callable[[Type['Drainer']], Type['Drainer']]:
    """Register a drainer class for an environment (``default``, ``eventlet``, ``gevent``, ...)."""
    def _register(cls: Type['Drainer']) -> Type['Drainer']:
        drainers[name] = cls
        return cls
    return _register


def detect_environment() -> str:
    """The concurrency environment this process runs in (``default`` unless monkey-patched)."""
    import sys
    for name in ('eventlet', 'gevent'):
        module = sys.modules.get(name)
        if module is None:
            continue
        patcher = sys.modules.get(f'{name}.patcher') or sys.modules.get(f'{name}.monkey')
        is_patched = getattr(patcher, 'is_monkey_patched', None) or getattr(patcher, 'is_module_patched', None)
        try:
            if is_patched is not None and is_patched('socket'):
                return name
        except Exception:  # a library we do not control: treat as unpatched
            continue
    return 'default'


def wait_outcome(result: 'AsyncResult', meta: Any, propagate: bool,
                 callback: Optional[Callable[..., Any]] = None) -> Any:
    """What a finished wait returns: the value, or the exception (raised when ``propagate``).

    Our own errors (:class:`ErrorMeta`: lost queue, evicted, malformed) come from what
    this wait got and are never cached; anything else is the result's own state.
    """
    if isinstance(meta, ErrorMeta):
        error = meta['result']
        if propagate:
            raise error
        if callback is not None:
            callback(result.id, error)
        return error
    return result.maybe_throw(callback=callback, propagate=propagate)


class ErrorMeta(dict):
    """A FAILURE meta carrying an error of ours (malformed reply, eviction, lost queue).

    Result objects raise it but never cache it: a real reply may still replace it.
    """


def error_meta(task_id: str, error: BaseException) -> Meta:
    """The :class:`ErrorMeta` for ``error`` about ``task_id``."""
    return ErrorMeta(task_id=task_id, status=states.FAILURE, result=error, traceback=None,
                     children=None, date_done=None)


@register_drainer('default')
class Drainer:
    """Drives a consumer for waiters in threads: one leader reads, the others sleep on events."""

    def __init__(self, consumer: 'BaseResultConsumer') -> None:
        self.consumer = consumer
        self._leader = threading.Lock()
        self._sleepers: Set[threading.Event] = set()
        self._sleepers_lock = threading.Lock()
        self._waiting: Set[Waiter] = set()

    def wait(self, waiter: Waiter, deadline: Optional[float],
             on_interval: Optional[Callable[[], Any]] = None) -> bool:
        """Until ``waiter`` has something (ready ids, an error, nothing left): True; False at deadline."""
        event = threading.Event()
        waiter.wake = event.set
        with self._sleepers_lock:
            self._sleepers.add(event)
            self._waiting.add(waiter)
        has_news = lambda: bool(waiter.bucket) or waiter.error is not None or waiter.done  # noqa: E731
        first = True
        try:
            while True:
                event.clear()
                if has_news():
                    return True
                now = time.monotonic()
                if not first and deadline is not None and now >= deadline:
                    return False
                first = False
                if self._leader.acquire(blocking=False):
                    waiter.wake = None  # the reader checks its own waiter after every read
                    try:
                        self._lead(has_news, deadline, deadline)
                    finally:
                        waiter.wake = event.set
                        self._leader.release()
                        self._wake_sleepers()
                else:
                    event.wait(None if deadline is None else max(deadline - now, 0.0))
                if on_interval is not None:
                    on_interval()
        finally:
            waiter.wake = None
            with self._sleepers_lock:
                self._sleepers.discard(event)
                self._waiting.discard(waiter)

    def _lead(self, until: Callable[[], bool], deadline: Optional[float], give_up_at: Optional[float]) -> None:
        """Read as the leader until ``until()`` or ``deadline`` (reconnects give up at ``give_up_at``)."""
        self.consumer.drain_events_until(until, deadline, give_up_at=give_up_at)

    def fail_waiters(self, error: BaseException) -> None:
        """Hand ``error`` to every wait in progress through this drainer (the backend closed)."""
        with self._sleepers_lock:
            waiters = list(self._waiting)
        for waiter in waiters:
            waiter.fail(error)
        self._wake_sleepers()

    def serve(self, until: Callable[[], bool], slice_end: float, give_up_at: Optional[float],
              event: threading.Event) -> None:
        """One turn of a background reader (the asyncio driver's thread).

        Lead a read until ``until()`` or ``slice_end`` (reconnects give up at
        ``give_up_at``); when another thread leads, sleep on ``event`` instead: it
        is set when that leader is done (see :meth:`add_sleeper`).
        """
        if self._leader.acquire(blocking=False):
            try:
                self._lead(until, slice_end, give_up_at)
            finally:
                self._leader.release()
                self._wake_sleepers()
        else:
            event.wait(max(slice_end - time.monotonic(), 0.0))

    def add_sleeper(self, event: threading.Event) -> None:
        """Set ``event`` whenever a leader finishes (so its owner may take over reading)."""
        with self._sleepers_lock:
            self._sleepers.add(event)

    def discard_sleeper(self, event: threading.Event) -> None:
        """Stop setting ``event`` when a leader finishes (undoes :meth:`add_sleeper`)."""
        with self._sleepers_lock:
            self._sleepers.discard(event)

    def drain_now(self, limit: Optional[int] = None) -> Tuple[int, bool]:
        """Read what the socket already holds, without blocking, unless another thread is reading."""
        if not self._leader.acquire(blocking=False):
            return 0, True
        try:
            return self.consumer.drain_available(limit)
        finally:
            self._leader.release()
            self._wake_sleepers()

    def _wake_sleepers(self) -> None:
        with self._sleepers_lock:
            sleepers = list(self._sleepers)
        for event in sleepers:
            event.set()


class BaseResultConsumer:
    """Reads replies into the state table; subclasses own the transport (``drain_events``)."""

    def __init__(self, backend: Any, app: Any, accept: Any, table: StateTable) -> None:
        self.backend = backend
        self.app = app
        self.accept = accept
        self.table = table
        self.drainer: Drainer = drainers.get(detect_environment(), drainers['default'])(self)

    # -- the transport (subclasses) ----------------------------------------------------------
    def start(self) -> None:
        """Connect and begin consuming (idempotent)."""
        raise NotImplementedError

    def stop(self) -> None:
        """Stop consuming and release the connection."""

    def drain_events(self, timeout: Optional[float] = None) -> None:
        """Block up to ``timeout`` for replies and dispatch what arrives."""
        raise NotImplementedError

    def drain_available(self, limit: Optional[int] = None) -> Tuple[int, bool]:
        """Dispatch replies already received, without blocking: ``(count, exhausted)``."""
        raise NotImplementedError

    def consume_from(self, task_id: str) -> None:
        """Make sure replies for ``task_id`` are consumed (one queue serves every id)."""
        self.start()

    def cancel_for(self, task_id: str) -> None:
        """Nothing to cancel per task: the reply queue is shared by every id."""

    def reply_socket(self) -> Any:
        """The socket replies arrive on, when there is one we can poll (None otherwise)."""
        transport = getattr(getattr(self, '_replies', None), '_transport', None)
        return getattr(transport, 'sock', None)

    # -- closing -----------------------------------------------------------------------------
    #: Set by ``stop()``: readers raise :class:`ResultBackendClosed` instead of reconnecting,
    #: until a new wait (or an explicit ``start()``) opens the backend again.
    closed: bool = False

    def allow_reopen(self) -> None:
        """A new wait after ``stop()``: let the next read connect again (connects nothing here)."""
        self.closed = False

    def fail_waiters(self, error: BaseException) -> None:
        """Hand ``error`` to every wait in progress: blocking ones and asyncio awaits."""
        self.drainer.fail_waiters(error)
        hub = self.aio_hub
        if hub is not None:
            hub.fail_all(error)

    def on_after_fork(self) -> None:
        """Forget the parent's connection and state in a forked child.

        The table is replaced, not cleared: a parent thread may have held its lock at
        fork time, and results made in the parent re-track themselves in the new one.
        """
        self.table = self.backend._new_table()
        self.aio_hub = None  # its thread does not exist in the child

    # -- waiting -----------------------------------------------------------------------------
    #: The deadline of the wait being driven (reconnects give up by then).
    deadline: Optional[float] = None
    #: The asyncio driver of this consumer (``rpcresults.aio``), made on the first await.
    aio_hub: Any = None

    def drain_events_until(self, until: Callable[[], bool], deadline: Optional[float],
                           give_up_at: Any = _SAME) -> None:
        """Dispatch replies until ``until()`` holds or ``deadline`` passes (at least one pass).

        Reconnects give up at ``give_up_at`` (default: ``deadline``): a background
        reader reads in short slices on behalf of waits that may have no deadline.
        """
        self.deadline = deadline if give_up_at is _SAME else give_up_at
        try:
            self._drain_until(until, deadline)
        finally:
            self.deadline = None

    def _drain_until(self, until: Callable[[], bool], deadline: Optional[float]) -> None:
        while True:
            self.drain_available()
            if until():
                return
            if deadline is None:
                remaining: Optional[float] = None
            else:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
            self.drain_events(timeout=remaining)
            if until():
                return

    def track(self, result: 'AsyncResult') -> None:
        """Keep ``result``'s id tracked while the result object lives."""
        table = self.table
        if result._tracked_by is not table:
            table.track(result.id, result)
            result._tracked_by = table

    def _batches(self, by_id: Dict[str, List['AsyncResult']], timeout: Optional[float],
                 on_message: Optional[Callable[[Meta], Any]],
                 on_interval: Optional[Callable[[], Any]]) -> Iterator[Any]:
        """One wait session: yields a deque of ready ``(task_id, meta)`` whenever it has some.

        The consumer empties each deque before resuming. Ids already final come first;
        the rest are tracked, watched, and unwatched when the session ends (done,
        timeout, error or abandoned).
        """
        initial, waiting = self.prepare_wait(by_id)
        if initial:
            yield initial
        if not waiting:
            return
        self.start()
        table = self.table
        waiter = Waiter(on_message)
        table.watch(waiter, waiting)
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                if waiter.bucket:
                    yield waiter.bucket
                if waiter.error is not None:
                    raise waiter.error
                if waiter.done and not waiter.bucket:
                    return
                if not self.drainer.wait(waiter, deadline, on_interval):
                    raise TimeoutError('The operation timed out.')
        finally:
            table.unwatch(waiter, waiting)

    def prepare_wait(self, by_id: Dict[str, List['AsyncResult']]) -> Tuple[Any, List[str]]:
        """``(deque of (id, meta) already final, ids still to wait for)``; tracks the latter."""
        table = self.table
        initial: Any = deque()
        waiting: List[str] = []
        to_track = []
        for task_id, same in by_id.items():
            first = same[0]
            cached = first._cache
            if cached is not None:
                initial.append((task_id, cached))
            else:
                waiting.append(task_id)
                if first._tracked_by is not table:
                    to_track.append((task_id, first))
        if to_track:
            table.track_many(to_track)
            for _, result in to_track:
                result._tracked_by = table
        return initial, waiting

    def _settle(self, by_id: Dict[str, List['AsyncResult']], task_id: str, meta: Any) -> Meta:
        """Make ``meta`` (or an error) the final state of every result for ``task_id``."""
        if isinstance(meta, BaseException):
            return error_meta(task_id, meta)
        for result in by_id[task_id]:
            result._maybe_set_cache(meta)
        settled = by_id[task_id][0]._cache or meta  # as Celery yields it: exceptions and children rebuilt
        cache = self.backend._cache
        if cache.limit:
            cache[task_id] = settled
        return settled

    def iter_ready(self, results: Sequence['AsyncResult'], timeout: Optional[float] = None,
                   on_message: Optional[Callable[[Meta], Any]] = None,
                   on_interval: Optional[Callable[[], Any]] = None) -> Iterator[Tuple[str, Meta]]:
        """``(task_id, meta)`` for each distinct id as its final state arrives (arrival order)."""
        by_id, _ = index_results(results)
        for bucket in self._batches(by_id, timeout, on_message, on_interval):
            while bucket:
                task_id, meta = bucket.popleft()
                yield task_id, self._settle(by_id, task_id, meta)

    def join_values(self, results: Sequence['AsyncResult'], timeout: Optional[float] = None,
                    propagate: bool = True, on_message: Optional[Callable[[Meta], Any]] = None,
                    on_interval: Optional[Callable[[], Any]] = None) -> List[Any]:
        """Every result's value, in member order (the hot path of ``ResultSet.join_native``)."""
        by_id, positions, values, sink = self.join_state(results)
        for bucket in self._batches(by_id, timeout, on_message, on_interval):
            self.fill_bucket(bucket, by_id, positions, values, sink, propagate)
        return values

    def join_state(self, results: Sequence['AsyncResult']) -> Tuple[Dict[str, List['AsyncResult']],
                                                                     Dict[str, List[int]], List[Any], Any]:
        """``(by_id, positions, values, sink)`` for a join of ``results`` (sync or asyncio)."""
        by_id, positions = index_results(results)
        cache = self.backend._cache
        return by_id, positions, [None] * len(results), cache if cache.limit else None

    def fill_bucket(self, bucket: Any, by_id: Dict[str, List['AsyncResult']], positions: Dict[str, List[int]],
                    values: List[Any], sink: Any, propagate: bool) -> None:
        """Place one batch of ready replies into ``values`` (member order), emptying ``bucket``.

        Plain successes are placed by the compiled ``fill_values``; anything else
        (failures, errors, children) comes back here to be settled one by one, and
        with ``propagate`` the first failure is raised.
        """
        while bucket:
            item = fill_values(bucket, by_id, positions, values, sink)
            if item is None:
                break
            task_id, meta = item
            meta = self._settle(by_id, task_id, meta)
            value = meta.get('result')
            if propagate and meta.get('status') in states.PROPAGATE_STATES:
                raise value if isinstance(value, BaseException) else TaskRevokedError(task_id)
            for index in positions[task_id]:
                values[index] = value

    def current_meta(self, result: 'AsyncResult', limit: Optional[int] = 65536) -> Meta:
        """The newest state of ``result`` after reading what already arrived (never blocks)."""
        self.track(result)
        self.start()
        self.drainer.drain_now(limit)
        return self.lookup(result.id)

    def lookup(self, task_id: str) -> Meta:
        """The table's newest state for ``task_id`` as a meta (PENDING when nothing arrived)."""
        try:
            meta = self.table.meta(task_id)
        except ResultEvicted as exc:
            return error_meta(task_id, exc)
        if meta is None:
            cached = self.backend._cache.get(task_id)
            if cached is not None:
                return cached
            return {'task_id': task_id, 'status': states.PENDING, 'result': None, 'traceback': None,
                    'children': None, 'date_done': None}
        if isinstance(meta, BaseException):
            return error_meta(task_id, meta)
        return meta


class AsyncBackendMixin:
    """Joins and waits driven by a result consumer (Celery's ``AsyncBackendMixin``)."""

    is_async = True
    result_consumer: BaseResultConsumer

    def add_pending_result(self, result: 'AsyncResult', weak: bool = False) -> 'AsyncResult':
        """Track ``result`` so replies for it are kept for it (for as long as it lives)."""
        self.result_consumer.track(result)
        return result

    def add_pending_results(self, results: Iterable['AsyncResult'], weak: bool = False) -> None:
        """:meth:`add_pending_result` for each of ``results`` (Celery's batch form)."""
        for result in results:
            self.add_pending_result(result, weak=weak)

    def remove_pending_result(self, result: 'AsyncResult') -> 'AsyncResult':
        """Nothing to do: tracking ends by itself when the result object is collected."""
        self.on_result_fulfilled(result)
        return result

    def on_result_fulfilled(self, result: 'AsyncResult') -> None:
        """Called once a waited result is final (hook)."""

    def wait_for_pending(self, result: 'AsyncResult', timeout: Optional[float] = None,
                         interval: float = 0.5, no_ack: bool = True,
                         on_message: Optional[Callable[[Meta], Any]] = None,
                         on_interval: Optional[Callable[[], Any]] = None,
                         callback: Optional[Callable[..., Any]] = None, propagate: bool = True) -> Any:
        """Block until ``result`` is final, then return its value (or raise its exception)."""
        meta: Any = None
        for _, meta in self.result_consumer.iter_ready([result], timeout=timeout, on_message=on_message,
                                                       on_interval=on_interval):
            pass
        self.on_result_fulfilled(result)
        return wait_outcome(result, meta, propagate, callback)

    def iter_native(self, result: 'ResultSet', timeout: Optional[float] = None, interval: float = 0.5,
                    no_ack: bool = True, on_message: Optional[Callable[[Meta], Any]] = None,
                    on_interval: Optional[Callable[[], Any]] = None) -> Iterator[Tuple[str, Any]]:
        """``(task_id, meta)`` for each member as it becomes final; nested sets yield their members."""
        from ..result import ResultSet
        leaves = []
        for node in result.results:
            if isinstance(node, ResultSet):
                yield getattr(node, 'id', None), node.results  # type: ignore[misc]
            else:
                leaves.append(node)
        yield from self.result_consumer.iter_ready(leaves, timeout=timeout, on_message=on_message,
                                                   on_interval=on_interval)

    def current_meta(self, result: 'AsyncResult') -> Meta:
        """The newest known state of ``result`` (reads what already arrived, never blocks)."""
        return self.result_consumer.current_meta(result)

    def watch_then(self, result: 'AsyncResult') -> None:
        """Fire ``result``'s ``then()`` callbacks from whichever thread reads its final reply."""
        consumer = self.result_consumer
        consumer.track(result)
        waiter = Waiter()

        def on_news() -> None:
            while waiter.bucket:
                task_id, meta = waiter.bucket.popleft()
                if isinstance(meta, BaseException):
                    meta = error_meta(task_id, meta)
                result._maybe_set_cache(meta)
            if waiter.error is not None and result._cache is None:
                result._maybe_set_cache(error_meta(result.id, waiter.error))

        waiter.wake = on_news
        consumer.table.watch(waiter, [result.id])
        if waiter.bucket:
            on_news()


class GreenDrainer(Drainer):
    """Drives a consumer for green threads (gevent, eventlet): one reader, everyone else sleeps.

    While anybody waits, one green thread of our own reads the socket in slices of
    :data:`READ_SLICE`; each reply wakes exactly its waiters through their green
    events. Waiters never read, so one killed or timed-out green thread never
    leaves the reading half done; the reader ends when nobody waits. An error the
    reader cannot recover from (a reconnect that gave up) goes to every waiter.

    Several OS threads (monkey-patched without ``thread``) each have a hub of their
    own, and a green thread cannot switch to another thread's hub. The reader lives
    on the hub of the thread that started it; waiters of other threads take turns
    leading instead (:meth:`_wait_elsewhere`), sleeping on green events of their own
    hub. A reader that died, or whose thread ended, is replaced. A socket is read by
    polling it from the current hub when another hub owns it (gevent binds sockets to
    the hub that made them).
    """

    def __init__(self, consumer: 'BaseResultConsumer') -> None:
        super().__init__(consumer)
        self._waits: Dict[Waiter, Tuple[Optional[float], int]] = {}  # waiter -> (deadline, OS thread)
        self._reader: Any = None
        self._reader_thread: Optional[int] = None  # OS thread id of the reader's hub
        self._generation = 0
        self.readers_started = 0

    # -- the green library (subclasses) ------------------------------------------------------
    #: The green library's module name: ``gevent`` or ``eventlet`` (both have spawn and sleep).
    library = ''

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

    def set_from_other_threads(self, event: Any) -> Optional[Callable[[], None]]:
        """How another OS thread sets ``event`` (called in the event's own thread); None: it cannot."""
        return None

    def owns_socket(self, sock: Any) -> bool:
        """Whether the current hub may block on ``sock`` (else it is polled)."""
        return True

    # -- waiting -----------------------------------------------------------------------------
    def wait(self, waiter: Waiter, deadline: Optional[float],
             on_interval: Optional[Callable[[], Any]] = None) -> bool:
        has_news = lambda: bool(waiter.bucket) or waiter.error is not None or waiter.done  # noqa: E731
        if has_news():
            return True
        if deadline is not None and time.monotonic() >= deadline:
            self.drain_now()  # a zero timeout looks once at what already arrived
            return has_news()
        event = self.new_event()
        waiter.wake = event.set
        if not self._join_reader(waiter, deadline):
            waiter.wake = None
            return self._wait_elsewhere(waiter, deadline, on_interval)
        try:
            while True:
                event.clear()
                if has_news():
                    return True
                if deadline is None:
                    event.wait(None)
                else:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return False
                    event.wait(remaining)
                if on_interval is not None:
                    on_interval()
        finally:
            waiter.wake = None
            self._waits.pop(waiter, None)

    def _join_reader(self, waiter: Waiter, deadline: Optional[float]) -> bool:
        """Register ``waiter`` with the reader of this thread's hub (started if needed).

        False when a live reader runs on another OS thread's hub.
        """
        ident = self.thread_ident()
        with self._sleepers_lock:
            if self._reader is not None and not self._reader_alive():
                stale = self._reader_thread
                for other, (_, thread) in list(self._waits.items()):
                    if thread == stale:  # green threads of an ended thread never come back
                        self._waits.pop(other, None)
                self._reader = None
            if self._reader is not None and self._reader_thread != ident:
                return False
            self._waits[waiter] = (deadline, ident)
            if self._reader is None:
                self.readers_started += 1
                self._generation += 1
                self._reader_thread = ident
                generation = self._generation
                self._reader = self.spawn(lambda: self._read(generation))
        return True

    def _reader_alive(self) -> bool:
        reader = self._reader
        if reader is None or getattr(reader, 'dead', False):
            return False
        return self._reader_thread in sys._current_frames()

    def _wait_elsewhere(self, waiter: Waiter, deadline: Optional[float],
                        on_interval: Optional[Callable[[], Any]]) -> bool:
        """Wait from a hub other than the reader's: lead in turns, sleeping on a green event."""
        event = self.new_event()
        wake = self.call_in_thread_of(event)
        waiter.wake = wake
        with self._sleepers_lock:
            self._sleepers.add(wake)  # type: ignore[arg-type]  # anything with set()
            self._waiting.add(waiter)
        has_news = lambda: bool(waiter.bucket) or waiter.error is not None or waiter.done  # noqa: E731
        try:
            while True:
                event.clear()
                if has_news():
                    return True
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    return False
                if self._leader.acquire(blocking=False):
                    waiter.wake = None
                    try:
                        end = now + POLL_SLICE if deadline is None else min(deadline, now + POLL_SLICE)
                        self._poll_lead(has_news, end, deadline)
                    finally:
                        waiter.wake = wake
                        self._leader.release()
                        self._wake_sleepers()
                    self.sleep(0)  # let the reader's hub (and this one's green threads) have a turn
                else:
                    event.wait(POLL_SLICE if deadline is None else min(POLL_SLICE, max(deadline - now, 0.0)))
                if on_interval is not None:
                    on_interval()
        finally:
            waiter.wake = None
            with self._sleepers_lock:
                self._sleepers.discard(wake)  # type: ignore[arg-type]
                self._waiting.discard(waiter)

    def _wake_sleepers(self) -> None:
        with self._sleepers_lock:
            sleepers = list(self._sleepers)
        for event in sleepers:
            (event.set if hasattr(event, 'set') else event)()

    def _lead(self, until: Callable[[], bool], deadline: Optional[float], give_up_at: Optional[float]) -> None:
        sock = self.consumer.reply_socket()
        if sock is None or self.owns_socket(sock):
            super()._lead(until, deadline, give_up_at)
        else:
            self._poll_lead(until, deadline, give_up_at)

    def _poll_lead(self, until: Callable[[], bool], deadline: Optional[float],
                   give_up_at: Optional[float]) -> None:
        """Lead without blocking inside the socket: poll it from this hub, then read what came."""
        consumer = self.consumer
        consumer.deadline = give_up_at
        try:
            while True:
                consumer.drain_available()
                if until():
                    return
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    return
                sock = consumer.reply_socket()
                if sock is not None and self.owns_socket(sock):  # reconnected from this hub
                    consumer._drain_until(until, deadline)
                    return
                wait_readable(sock, POLL_SLICE if deadline is None else min(POLL_SLICE, deadline - now))
        finally:
            consumer.deadline = None

    @property
    def waiting(self) -> int:
        """How many green threads wait through this drainer's reader now."""
        return len(self._waits)

    def fail_waiters(self, error: BaseException) -> None:
        for waiter in list(self._waits):
            waiter.fail(error)
        super().fail_waiters(error)

    def _all_have_news(self) -> bool:
        return all(w.bucket or w.error is not None or w.done for w in list(self._waits))

    def _give_up_at(self) -> Optional[float]:
        deadlines = [deadline for deadline, _ in list(self._waits.values())]
        if not deadlines or any(d is None for d in deadlines):
            return None
        return max(deadlines)  # type: ignore[type-var]

    def _read(self, generation: int) -> None:
        try:
            while self._waits and self._generation == generation:
                if self._all_have_news() or not self._leader.acquire(blocking=False):
                    self.sleep(0.001)  # let the woken ones run (or drain_now finish)
                    continue
                try:
                    self._lead(self._all_have_news, time.monotonic() + READ_SLICE, self._give_up_at())
                except Exception as exc:  # the waiters' error, as it would be a sync get()'s
                    logger.warning('green reader for %r failed: %r', self.consumer, exc)
                    for waiter in list(self._waits):
                        waiter.fail(exc)
                finally:
                    self._leader.release()
                    self._wake_sleepers()  # a background reader (asyncio driver) may take over
        finally:
            with self._sleepers_lock:
                if self._generation == generation:
                    self._reader = None


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
        return _EventletEvent()
