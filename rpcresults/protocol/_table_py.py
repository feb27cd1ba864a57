"""The per-task state table: where every reply lands. No I/O, no waiting: a driver wakes waiters.

One table per reply queue. It holds, per task id somebody holds a result object for, the newest
state, and routes each reply to the waiters of that id (per-waiter ``on_message``; final states into
the waiter's bucket). Replies for ids nobody holds a result for go into a bounded early-arrival
buffer whose evictions are counted and remembered, so asking for an evicted id fails fast.

Replies come in as ``(correlation_id, content_type, content_encoding, body)`` or as decoded metas;
waking a waiter is a callable its driver gives (an Event's ``set``, a loop's ``call_soon_threadsafe``).
Thread-safe: ``_lock`` guards the entries, the buffer and the memos; callbacks (``on_message``,
wake-ups) run outside it. Tracking is tied to result objects' lifetimes through weak references; a
collected owner is reaped at the next operation or ``counters()``.

This file is both twins: run as it is, it is the pure-Python table; compiled by Cython as
``rpcresults.protocol._table_c`` with the C types of ``_table_c.pxd``, it is the compiled one.
"""
from __future__ import annotations

import logging
import threading
import weakref
from collections import deque
from collections.abc import Mapping
from importlib import import_module
from typing import Any, Callable, Deque, Dict, Iterable, List, Optional, Sequence, Tuple

from ..exceptions import ContentDisallowed, MalformedResult, ReplyQueueLost, ResultEvicted

# The modules of this same twin: _memo_py and _decode_py beside _table_py, _memo_c and _decode_c
# beside _table_c.
IdMemo = import_module(__name__.replace('._table_', '._memo_')).IdMemo
decode_body = import_module(__name__.replace('._table_', '._decode_')).decode_body

logger = logging.getLogger('rpcresults.state')

__all__ = ('StateTable', 'Waiter', 'is_final', 'MARKER_TYPE')

_SUCCESS = 'SUCCESS'
_FAILURE = 'FAILURE'
_REVOKED = 'REVOKED'
#: The content type of a poll marker: a client publishes one to its own reply queue and reads until it
#: is back, so it read every reply ahead of it (FIFO). Only the newest marker's body is kept (``marker``).
MARKER_TYPE = 'application/x-rpcresults-marker'
_MARKER = MARKER_TYPE

EVICTION_WARN_EVERY = 1000  # how often (in evictions) the eviction warning repeats after the first

Decoder = Callable[[bytes, Optional[str], Optional[str]], Any]
Meta = Dict[str, Any]
Delivery = Tuple[int, Optional[str], Optional[str], Optional[str], bytes]


def _final_status(status: Any) -> bool:
    return status == _SUCCESS or status == _FAILURE or status == _REVOKED


def is_final(meta: Any) -> bool:
    """A stored entry is final: a SUCCESS/FAILURE/REVOKED meta, or an error to hand to the waiter."""
    if meta is None:
        return False
    if isinstance(meta, BaseException):
        return True
    return _final_status(meta.get('status'))


# An entry's owners and waiters: None, one item, or a list of two or more. Most ids have one
# owner and at most one waiter, so this spares two lists per tracked id (less work for the GC).
def _add(slot: Any, item: Any) -> Any:
    if slot is None:
        return item
    if type(slot) is list:
        slot.append(item)
        return slot
    return [slot, item]


def _remove(slot: Any, item: Any) -> Any:
    if slot is item:
        return None
    if type(slot) is list:
        try:
            slot.remove(item)
        except ValueError:
            return slot
        if len(slot) == 1:
            return slot[0]
    return slot


def _items(slot: Any) -> List[Any]:
    if slot is None:
        return []
    if type(slot) is list:
        return list(slot)
    return [slot]


class Waiter:
    """One wait (a ``get()``, a join, an await): how many ids are still to come, final ones in ``bucket``.

    ``wake`` is called (from the dispatching thread) whenever the bucket grows or an
    error is set; ``on_message`` receives every state of the waiter's ids.
    """

    __slots__ = ('remaining', 'bucket', 'on_message', 'wake', 'error', '__weakref__')

    def __init__(self, on_message: Optional[Callable[[Meta], Any]] = None,
                 wake: Optional[Callable[[], Any]] = None) -> None:
        self.remaining = 0
        self.bucket: Deque[Tuple[str, Any]] = deque()
        self.on_message = on_message
        self.wake = wake
        self.error: Optional[BaseException] = None

    def notify(self) -> None:
        """Call ``wake``; its failure is logged, never raised into the dispatch."""
        wake = self.wake
        if wake is not None:
            try:
                wake()
            except Exception:
                logger.exception('a waiter wake-up callback failed')

    @property
    def done(self) -> bool:
        """Nothing more to wait for: every id is in the bucket (or was taken from it)."""
        return self.remaining <= 0

    @property
    def has_news(self) -> bool:
        """Something for the waiting code to act on: a final state, an error, or nothing left."""
        return bool(self.bucket) or self.error is not None or self.remaining <= 0

    def fail(self, error: BaseException) -> None:
        """Hand ``error`` to this waiter (the first one wins) and wake it."""
        if self.error is None:
            self.error = error
        self.notify()

    def arrived(self, task_id: str, meta: Any) -> None:
        """A final state (or an error) for one of this waiter's ids."""
        self.bucket.append((task_id, meta))
        self.remaining -= 1
        self.notify()


def _tell(waiter: Waiter, task_id: str, meta: Meta, final: bool) -> None:
    """Hand one state to a waiter: ``on_message`` first, then the bucket when it is final."""
    on_message = waiter.on_message
    if on_message is not None:
        try:
            on_message(meta)
        except Exception as exc:  # the user's callback: its error belongs to its waiter
            waiter.fail(exc)
    if final:
        waiter.arrived(task_id, meta)


class _OwnerRef(weakref.ref):
    """Weak reference to a result object that keeps its task id tracked while alive."""

    __slots__ = ('task_id',)


class _Entry:
    """A tracked task id: newest meta (or error), owner refs and attached waiters (see ``_add``)."""

    __slots__ = ('meta', 'owners', 'waiters')

    def __init__(self) -> None:
        self.meta: Any = None
        self.owners: Any = None
        self.waiters: Any = None

    def owned_by(self, owner: Any) -> bool:
        for ref in _items(self.owners):
            if ref() is owner:
                return True
        return False


class StateTable:
    """Newest state per tracked task id, the early-arrival buffer, and the counters."""

    def __init__(self, decode: Optional[Decoder] = None, buffer_max: int = 10000,
                 keep_late: bool = True, fast_json: bool = False,
                 remember_max: Optional[int] = None) -> None:
        self._decode = decode
        self._fast_json = fast_json
        self.buffer_max = max(int(buffer_max), 0)
        self.keep_late = keep_late
        #: How many evicted ids (and, apart, ids abandoned unfinished) are remembered.
        self.remember_max = max(100 * self.buffer_max, 100_000) if remember_max is None else int(remember_max)
        if self.remember_max < 1:
            raise ValueError(f'remember_max must be 1 or more (None: the default), not {remember_max!r}')
        self._lock = threading.Lock()
        self._tracked: Dict[str, _Entry] = {}
        self._early: Dict[str, Any] = {}
        self._finished: Dict[str, Any] = {}  # final metas of ids whose result objects are gone
        self._evicted = IdMemo(self.remember_max)
        self._abandoned = IdMemo(self.remember_max)
        self._collected: Deque[_OwnerRef] = deque()
        self._on_collected = self._collected.append
        self.received = 0
        self.marker = b''
        self.dispatched = 0
        self.buffered = 0
        self.evicted = 0
        self.late = 0
        self.late_dropped = 0
        self.malformed = 0
        self.duplicates = 0

    # -- tracking ----------------------------------------------------------------------------
    def track(self, task_id: str, owner: Any) -> None:
        """Keep ``task_id`` tracked while ``owner`` (a result object) lives; claim a buffered reply.

        Tracking the same owner again does nothing.
        """
        self.track_many(((task_id, owner),))

    def track_many(self, pairs: Iterable[Tuple[str, Any]]) -> None:
        """``track(task_id, owner)`` for each pair, under one lock."""
        on_collected = self._on_collected
        with self._lock:
            self._reap()
            tracked = self._tracked
            for task_id, owner in pairs:
                entry = tracked.get(task_id)
                if entry is None:
                    entry = tracked[task_id] = _Entry()
                    if self._abandoned:
                        self._abandoned.discard(task_id)
                    if task_id in self._early:
                        entry.meta = self._early.pop(task_id)
                    elif task_id in self._finished:
                        entry.meta = self._finished.pop(task_id)
                    elif self._evicted and task_id in self._evicted:
                        entry.meta = ResultEvicted([task_id])
                elif entry.owned_by(owner):
                    continue
                ref = _OwnerRef(owner, on_collected)
                ref.task_id = task_id
                entry.owners = _add(entry.owners, ref)

    def _reap(self) -> None:
        """Drop owner refs whose result objects were collected (lock held)."""
        collected = self._collected
        tracked = self._tracked
        while collected:
            ref = collected.popleft()
            entry = tracked.get(ref.task_id)
            if entry is None:
                continue
            entry.owners = _remove(entry.owners, ref)  # an entry outlives none of its owner refs
            if entry.owners is None and entry.waiters is None:
                self._release(ref.task_id, entry)

    def _release(self, task_id: str, entry: _Entry) -> None:
        """Stop tracking an id nothing holds or waits on any more (lock held): an unfinished one is
        remembered as abandoned; a final state is kept, among the last ``buffer_max``, past which
        the oldest is remembered as evicted."""
        del self._tracked[task_id]
        meta = entry.meta
        if not is_final(meta):
            self._abandoned.add(task_id)
        elif not isinstance(meta, BaseException):
            finished = self._finished
            finished[task_id] = meta
            while len(finished) > self.buffer_max:
                victim = next(iter(finished))
                del finished[victim]
                self._evicted.add(victim)

    # -- lookups -----------------------------------------------------------------------------
    def meta(self, task_id: str) -> Any:
        """Newest meta (or error) known for ``task_id``, else ``None``; raises if it was evicted."""
        entry = self._tracked.get(task_id)
        if entry is not None:
            return entry.meta
        meta = self._early.get(task_id)
        if meta is None:
            meta = self._finished.get(task_id)
            if meta is None and self._evicted and task_id in self._evicted:
                raise ResultEvicted([task_id])
        return meta

    def pending_ids(self) -> List[str]:
        """Tracked ids without a final state."""
        with self._lock:
            self._reap()
            return [tid for tid, entry in self._tracked.items() if not is_final(entry.meta)]

    def forget(self, task_id: str) -> None:
        """Drop whatever is known of ``task_id`` (buffered reply, tracked state, eviction mark)."""
        with self._lock:
            self._early.pop(task_id, None)
            self._finished.pop(task_id, None)
            self._evicted.discard(task_id)
            entry = self._tracked.get(task_id)
            if entry is not None and entry.waiters is None:
                entry.meta = None

    # -- waiting -----------------------------------------------------------------------------
    def watch(self, waiter: Waiter, task_ids: Iterable[str]) -> None:
        """Attach ``waiter`` to tracked ids; those already final go straight into its bucket."""
        with self._lock:
            tracked = self._tracked
            for task_id in task_ids:
                entry = tracked.get(task_id)
                if entry is None:
                    raise KeyError(f'task {task_id!r} is not tracked; track() it before watch()')
                if is_final(entry.meta):
                    waiter.bucket.append((task_id, entry.meta))
                    if isinstance(entry.meta, ReplyQueueLost):
                        entry.meta = None  # told once: a wait after this one waits for a real reply
                else:
                    entry.waiters = _add(entry.waiters, waiter)
                    waiter.remaining += 1

    def unwatch(self, waiter: Waiter, task_ids: Iterable[str]) -> None:
        """Detach ``waiter`` from every id it may still be attached to (timeout, cancel, done)."""
        with self._lock:
            tracked = self._tracked
            for task_id in task_ids:
                entry = tracked.get(task_id)
                if entry is not None and entry.waiters is not None:
                    entry.waiters = _remove(entry.waiters, waiter)
                    if entry.waiters is None and entry.owners is None:  # its owners went while it waited
                        self._release(task_id, entry)
            waiter.remaining = 0
            self._reap()

    def fail_pending(self, make_error: Callable[[List[str]], BaseException]) -> List[str]:
        """Give every waiter of an unfinished id ``make_error(its ids)``; returns all such ids.

        An unfinished id nobody waits on now keeps the error for its next wait, once.
        """
        per_waiter: Dict[int, Tuple[Waiter, List[str]]] = {}
        with self._lock:
            self._reap()
            pending = [tid for tid, entry in self._tracked.items() if not is_final(entry.meta)]
            for tid in pending:
                entry = self._tracked[tid]
                for waiter in _items(entry.waiters):
                    per_waiter.setdefault(id(waiter), (waiter, []))[1].append(tid)
                if entry.waiters is None:
                    entry.meta = make_error([tid])
        for waiter, ids in per_waiter.values():
            waiter.fail(make_error(ids))
        return pending

    # -- replies -----------------------------------------------------------------------------
    def deliver_body(self, correlation_id: Optional[str], content_type: Optional[str],
                     content_encoding: Optional[str], body: bytes) -> bool:
        """Decode one raw reply and dispatch it; False when it was dropped or refused as malformed."""
        if content_type == _MARKER:
            self.marker = bytes(body)
            return True
        try:
            payload = decode_body(body, content_type, content_encoding, self._decode, self._fast_json)
        except ContentDisallowed as exc:
            return self.deliver_error(correlation_id, exc, f'refused content type {content_type!r}')
        except Exception as exc:  # any codec error is the sender's fault, not ours
            reason = f'undecodable {content_type!r} body ({type(exc).__name__}: {exc})'
            return self.deliver_error(correlation_id, MalformedResult(correlation_id or '?', reason), reason)
        if type(payload) is not dict:
            if not isinstance(payload, Mapping):
                reason = f'body is a {type(payload).__name__}, not a result mapping'
                return self.deliver_error(correlation_id, MalformedResult(correlation_id or '?', reason),
                                          reason)
            payload = dict(payload)
        status = payload.get('status')
        if not isinstance(status, str):
            reason = 'result mapping has no status'
            return self.deliver_error(correlation_id, MalformedResult(correlation_id or '?', reason), reason)
        task_id = correlation_id or payload.get('task_id')
        if not isinstance(task_id, str) or not task_id:
            return self.deliver_error(None, None, 'reply has neither a correlation_id nor a task_id')
        if payload.get('task_id') != task_id:
            payload['task_id'] = task_id
        self.deliver(task_id, payload)
        return True

    def deliver_many(self, deliveries: Sequence[Delivery]) -> int:
        """Dispatch parsed deliveries ``(tag, correlation_id, content_type, content_encoding, body)``.

        A reply whose dispatch fails (a bug, a hostile payload) is not lost silently: its
        waiters get the error at once.
        """
        count = 0
        for item in deliveries:
            correlation_id = item[1]
            try:
                self.deliver_body(correlation_id, item[2], item[3], item[4])
            except Exception as exc:
                self.dispatch_failed(correlation_id, exc)
            count += 1
        return count

    def dispatch_failed(self, correlation_id: Optional[str], exc: BaseException) -> None:
        """A reply could not be dispatched: log it and hand the error to its waiters (never raises)."""
        logger.error('error while dispatching the reply for %s', correlation_id,
                     exc_info=(type(exc), exc, exc.__traceback__))
        reason = f'the reply could not be dispatched ({type(exc).__name__}: {exc})'
        try:
            self.deliver_error(correlation_id, MalformedResult(correlation_id or '?', reason), reason)
        except Exception:  # nothing more we can do for this reply; the next one must still pass
            logger.exception('could not report the failed reply for %s', correlation_id)

    def deliver_error(self, task_id: Optional[str], error: Optional[BaseException], reason: str) -> bool:
        """A reply that cannot become a meta: its waiters get ``error``; else a counted, logged drop."""
        self.received += 1
        self.malformed += 1
        if not task_id or error is None:
            logger.warning('dropped a malformed reply for %s: %s', task_id or 'an unknown task', reason)
            return False
        logger.warning('malformed reply for task %s: %s', task_id, reason)
        with self._lock:
            entry = self._tracked.get(task_id)
            if entry is None:
                self._buffer(task_id, error)  # a later get() for this id gets the error, not a hang
                return False
            if is_final(entry.meta) and not isinstance(entry.meta, BaseException):
                return False
            entry.meta = error
            waiters = _items(entry.waiters)
            entry.waiters = None
            if entry.owners is None:
                self._release(task_id, entry)
        for waiter in waiters:
            waiter.arrived(task_id, error)
        return False

    def deliver(self, task_id: str, meta: Meta) -> None:
        """Dispatch one decoded meta: to its tracked entry and waiters, else to the early buffer."""
        with self._lock:
            self.received += 1
            if self._collected:
                self._reap()
            entry = self._tracked.get(task_id)
            if entry is None:
                self._buffer(task_id, meta)
                return
            old = entry.meta
            if old is not None and not isinstance(old, BaseException) and _final_status(old.get('status')):
                self.duplicates += 1
                return
            entry.meta = meta
            self.dispatched += 1
            waiters = entry.waiters
            if waiters is None:
                return
            final = _final_status(meta.get('status'))
            if final:
                entry.waiters = None
                if entry.owners is None:
                    self._release(task_id, entry)
            elif type(waiters) is list:
                waiters = list(waiters)  # watch/unwatch may change the live list meanwhile
        if type(waiters) is list:
            for waiter in waiters:
                _tell(waiter, task_id, meta, final)
        else:
            _tell(waiters, task_id, meta, final)

    def _buffer(self, task_id: str, meta: Any) -> None:
        """Keep a reply nobody holds a result for (lock held); evict the oldest past the bound."""
        early = self._early
        if task_id in self._finished:  # its final state is known already: a redelivery, or a straggler
            self.duplicates += 1
            return
        if self._abandoned and task_id in self._abandoned:
            self.late += 1
            if not self.keep_late:
                self.late_dropped += 1
                return
        if task_id in early:
            old = early.pop(task_id)
            if is_final(old) and not is_final(meta):
                meta = old
        else:
            self.buffered += 1
        early[task_id] = meta
        if self._evicted:
            self._evicted.discard(task_id)
        while len(early) > self.buffer_max:
            victim = next(iter(early))
            del early[victim]
            self._evicted.add(victim)
            self.evicted += 1
            if self.evicted == 1 or self.evicted % EVICTION_WARN_EVERY == 0:
                logger.warning(
                    'early-arrival buffer full (result_buffer_max=%d): evicted the reply for %s '
                    '(%d evicted so far); a get() for an evicted id raises ResultEvicted',
                    self.buffer_max, victim, self.evicted)

    # -- introspection -----------------------------------------------------------------------
    def counters(self) -> Dict[str, int]:
        """Counters and sizes a user can log (collected result objects are reaped first)."""
        with self._lock:
            self._reap()
            tracked = len(self._tracked)
            buffered = len(self._early)
            finished = len(self._finished)
            remembered = len(self._evicted)
        return {
            'received': self.received,
            'dispatched': self.dispatched,
            'buffered': self.buffered,
            'evicted': self.evicted,
            'late': self.late,
            'late_dropped': self.late_dropped,
            'malformed_dropped': self.malformed,
            'duplicates': self.duplicates,
            'tracked': tracked,
            'buffer_size': buffered,
            'finished': finished,
            'evicted_remembered': remembered,
        }
