"""The per-task state table: where every reply lands (pure-Python twin).

One table per reply queue. It holds, per task id somebody holds a result for,
the newest state; it routes each reply to the waiters of that id (per-waiter
``on_message``, ready results into the waiter's bucket); replies for ids nobody
holds a result for go into a bounded early-arrival buffer whose evictions are
counted and remembered, so asking for an evicted id fails fast.

No I/O here: replies come in as ``(correlation_id, content_type,
content_encoding, body)`` or as already-decoded metas; waking a waiter is a
callable the driver gives (an Event's ``set``, a future's resolver).
Thread-safe: one lock guards every structure; user callbacks run outside it.
"""
from __future__ import annotations

import json
import json.scanner
import logging
import threading
import weakref
from collections import deque
from typing import Any, Callable, Deque, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from .exceptions import ContentDisallowed, MalformedResult, ReplyQueueLost, ResultEvicted

logger = logging.getLogger('rpcresults.state')

__all__ = ('StateTable', 'Waiter', 'READY_STATES', 'index_results', 'fill_values')

READY_STATES = frozenset({'SUCCESS', 'FAILURE', 'REVOKED'})

_decoder = json.JSONDecoder()
_json_decode = _decoder.decode
_json_scan = json.scanner.make_scanner(_decoder)


def fast_json(text: str) -> Any:
    """``json.loads(text)`` through the C scanner directly; the full decoder handles the rest."""
    try:
        value, end = _json_scan(text, 0)
    except StopIteration:
        return _json_decode(text)  # leading white space, or not JSON: its own error
    if end != len(text):
        return _json_decode(text)  # trailing white space, or extra data: its own error
    return value

#: How often (in evictions) the eviction warning repeats after the first.
EVICTION_WARN_EVERY = 1000

Decoder = Callable[[bytes, Optional[str], Optional[str]], Any]
Meta = Dict[str, Any]


def is_ready(meta: Any) -> bool:
    """A stored entry is final: a ready meta, or an error to hand to the waiter."""
    if meta is None:
        return False
    if isinstance(meta, BaseException):
        return True
    return meta.get('status') in READY_STATES


class Waiter:
    """One wait (a ``get()``, a join, an await): ids still to come, ready ones in ``bucket``.

    ``wake`` is called (from the draining thread) whenever the bucket grows or an
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
        """Call ``wake`` (a driver's callable); its failure is logged, never raised into dispatch."""
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

    def fail(self, error: BaseException) -> None:
        """Hand ``error`` to this waiter and wake it."""
        if self.error is None:
            self.error = error
        self.notify()


class _OwnerRef(weakref.ref):
    """Weak reference to a result object that keeps its task id tracked while alive."""

    __slots__ = ('task_id',)


class _Entry:
    """A tracked task id: newest meta (or error), live owner refs, attached waiters."""

    __slots__ = ('meta', 'owners', 'waiters')

    def __init__(self) -> None:
        self.meta: Any = None
        self.owners: List[_OwnerRef] = []
        self.waiters: List[Waiter] = []


class StateTable:
    """Newest state per tracked task id, the early-arrival buffer, and the counters."""

    def __init__(self, decode: Optional[Decoder] = None, buffer_max: int = 10000,
                 keep_late: bool = True, fast_json: bool = False) -> None:
        self._decode = decode
        self._fast_json = fast_json
        self.buffer_max = max(int(buffer_max), 0)
        self.keep_late = keep_late
        self._lock = threading.Lock()
        self._tracked: Dict[str, _Entry] = {}
        self._early: Dict[str, Any] = {}
        remembered = max(10 * self.buffer_max, 1024)  # ids are small; forgetting one means a hang
        self._evicted: Dict[str, None] = {}
        self._abandoned: Dict[str, None] = {}
        self._remember_max = remembered
        self._collected: Deque[_OwnerRef] = deque()
        self._on_collected = self._collected.append
        self.received = 0
        self.dispatched = 0
        self.buffered = 0
        self.evicted = 0
        self.late = 0
        self.late_dropped = 0
        self.malformed = 0
        self.duplicates = 0

    # -- tracking ----------------------------------------------------------------------------
    def track(self, task_id: str, owner: Any) -> None:
        """Keep ``task_id`` tracked while ``owner`` (a result object) lives; claim a buffered reply."""
        self.track_many(((task_id, owner),))

    def track_many(self, pairs: Iterable[Tuple[str, Any]]) -> None:
        """``track(task_id, owner)`` for each pair, under one lock."""
        on_collected = self._on_collected
        with self._lock:
            self._reap()
            tracked = self._tracked
            for task_id, owner in pairs:
                ref = _OwnerRef(owner, on_collected)
                ref.task_id = task_id
                entry = tracked.get(task_id)
                if entry is None:
                    entry = tracked[task_id] = _Entry()
                    self._abandoned.pop(task_id, None)
                    if task_id in self._early:
                        entry.meta = self._early.pop(task_id)
                    elif task_id in self._evicted:
                        entry.meta = ResultEvicted([task_id])
                entry.owners.append(ref)

    def untrack(self, task_id: str) -> None:
        """Stop tracking ``task_id`` now (all owners); its waiters are detached."""
        with self._lock:
            self._tracked.pop(task_id, None)

    def is_tracked(self, task_id: str) -> bool:
        return task_id in self._tracked

    def _reap(self) -> None:
        """Drop owner refs whose result objects were collected (lock held)."""
        collected = self._collected
        tracked = self._tracked
        while collected:
            ref = collected.popleft()
            entry = tracked.get(ref.task_id)
            if entry is None:
                continue
            try:
                entry.owners.remove(ref)
            except ValueError:
                continue
            if not entry.owners and not entry.waiters:
                del tracked[ref.task_id]
                if not is_ready(entry.meta):
                    self._remember(self._abandoned, ref.task_id)

    def _remember(self, ids: Dict[str, None], task_id: str) -> None:
        ids[task_id] = None
        if len(ids) > self._remember_max:
            del ids[next(iter(ids))]

    # -- lookups -----------------------------------------------------------------------------
    def meta(self, task_id: str) -> Any:
        """Newest meta (or error) known for ``task_id``, else ``None``; raises if it was evicted."""
        entry = self._tracked.get(task_id)
        if entry is not None:
            return entry.meta
        meta = self._early.get(task_id)
        if meta is None and task_id in self._evicted:
            raise ResultEvicted([task_id])
        return meta

    def pending_ids(self) -> List[str]:
        """Tracked ids without a final state."""
        with self._lock:
            self._reap()
            return [tid for tid, entry in self._tracked.items() if not is_ready(entry.meta)]

    def forget(self, task_id: str) -> None:
        """Drop whatever is known of ``task_id`` (buffered reply, tracked state, eviction mark)."""
        with self._lock:
            self._early.pop(task_id, None)
            self._evicted.pop(task_id, None)
            entry = self._tracked.get(task_id)
            if entry is not None and not entry.waiters:
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
                if is_ready(entry.meta):
                    waiter.bucket.append((task_id, entry.meta))
                    if isinstance(entry.meta, ReplyQueueLost):
                        entry.meta = None  # told once: a wait after this one waits for a real reply
                else:
                    entry.waiters.append(waiter)
                    waiter.remaining += 1

    def unwatch(self, waiter: Waiter, task_ids: Iterable[str]) -> None:
        """Detach ``waiter`` from every id it may still be attached to (timeout, cancel, done)."""
        with self._lock:
            tracked = self._tracked
            for task_id in task_ids:
                entry = tracked.get(task_id)
                if entry is not None and entry.waiters:
                    try:
                        entry.waiters.remove(waiter)
                    except ValueError:
                        pass
            waiter.remaining = 0
            self._reap()

    def fail_pending(self, make_error: Callable[[List[str]], BaseException]) -> List[str]:
        """Give every waiter of an unfinished id ``make_error(its ids)``; returns all such ids."""
        with self._lock:
            self._reap()
            pending = [tid for tid, entry in self._tracked.items() if not is_ready(entry.meta)]
            per_waiter: Dict[int, Tuple[Waiter, List[str]]] = {}
            for tid in pending:
                entry = self._tracked[tid]
                for waiter in entry.waiters:
                    per_waiter.setdefault(id(waiter), (waiter, []))[1].append(tid)
                if not entry.waiters:
                    entry.meta = make_error([tid])  # told to the next wait, once (see watch)
        for waiter, ids in per_waiter.values():
            waiter.fail(make_error(ids))
        return pending

    # -- replies -----------------------------------------------------------------------------
    def deliver_body(self, correlation_id: Optional[str], content_type: Optional[str],
                     content_encoding: Optional[str], body: bytes) -> bool:
        """Decode one raw reply and dispatch it; returns False when it was dropped as malformed."""
        try:
            if (self._fast_json and content_type == 'application/json'
                    and (content_encoding == 'utf-8' or content_encoding is None)
                    and b'"__type__"' not in body):
                payload = fast_json(body.decode('utf-8'))  # kombu's result: no type markers to revive
            else:
                payload = self._decode(body, content_type, content_encoding)  # type: ignore[misc]
        except ContentDisallowed as exc:
            return self.deliver_error(correlation_id, exc, f'refused content type {content_type!r}')
        except Exception as exc:  # any codec error is the sender's fault, not ours
            reason = f'undecodable {content_type!r} body ({type(exc).__name__}: {exc})'
            return self.deliver_error(correlation_id, MalformedResult(correlation_id or '?', reason), reason)
        if not isinstance(payload, Mapping):
            reason = f'body is a {type(payload).__name__}, not a result mapping'
            return self.deliver_error(correlation_id, MalformedResult(correlation_id or '?', reason), reason)
        status = payload.get('status')
        if not isinstance(status, str):
            reason = 'result mapping has no status'
            return self.deliver_error(correlation_id, MalformedResult(correlation_id or '?', reason), reason)
        task_id = correlation_id or payload.get('task_id')
        if not isinstance(task_id, str) or not task_id:
            return self.deliver_error(None, None, 'reply has neither a correlation_id nor a task_id')
        if not isinstance(payload, dict):
            payload = dict(payload)
        if payload.get('task_id') != task_id:
            payload['task_id'] = task_id
        self.deliver(task_id, payload)
        return True

    def deliver_many(self, deliveries: Iterable[Tuple[int, Optional[str], Optional[str], Optional[str], bytes]]) -> int:
        """Dispatch parsed deliveries ``(tag, correlation_id, content_type, content_encoding, body)``."""
        count = 0
        for _, correlation_id, content_type, content_encoding, body in deliveries:
            try:
                self.deliver_body(correlation_id, content_type, content_encoding, body)
            except Exception:  # a bug must not cost the replies after this one
                logger.exception('error while dispatching the reply for %s', correlation_id)
            count += 1
        return count

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
            if is_ready(entry.meta) and not isinstance(entry.meta, BaseException):
                return False
            entry.meta = error
            waiters, entry.waiters = entry.waiters, []
        for waiter in waiters:
            waiter.bucket.append((task_id, error))
            waiter.remaining -= 1
            waiter.notify()
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
            ready = meta.get('status') in READY_STATES
            if old is not None and not isinstance(old, BaseException) and old.get('status') in READY_STATES:
                self.duplicates += 1
                return
            entry.meta = meta
            self.dispatched += 1
            waiters = entry.waiters
            if not waiters:
                return
            if ready:
                entry.waiters = []
            else:
                waiters = list(waiters)  # watch/unwatch may change the live list meanwhile
        for waiter in waiters:
            on_message = waiter.on_message
            if on_message is not None:
                try:
                    on_message(meta)
                except Exception as exc:  # the user's callback: its error belongs to its waiter
                    waiter.fail(exc)
            if ready:
                waiter.bucket.append((task_id, meta))
                waiter.remaining -= 1
                waiter.notify()

    def _buffer(self, task_id: str, meta: Any) -> None:
        """Keep a reply nobody holds a result for (lock held); evict the oldest past the bound."""
        early = self._early
        if task_id in self._abandoned:
            self.late += 1
            if not self.keep_late:
                self.late_dropped += 1
                return
        if task_id in early:
            old = early.pop(task_id)
            if is_ready(old) and not is_ready(meta):
                meta = old
        else:
            self.buffered += 1
        early[task_id] = meta
        self._evicted.pop(task_id, None)
        while len(early) > self.buffer_max:
            victim = next(iter(early))
            del early[victim]
            self._remember(self._evicted, victim)
            self.evicted += 1
            if self.evicted == 1 or self.evicted % EVICTION_WARN_EVERY == 0:
                logger.warning(
                    'early-arrival buffer full (result_buffer_max=%d): evicted the reply for %s '
                    '(%d evicted so far); a get() for an evicted id raises ResultEvicted',
                    self.buffer_max, victim, self.evicted)

    # -- introspection -----------------------------------------------------------------------
    def counters(self) -> Dict[str, int]:
        """Counters and sizes a user can log."""
        return {
            'received': self.received,
            'dispatched': self.dispatched,
            'buffered': self.buffered,
            'evicted': self.evicted,
            'late': self.late,
            'late_dropped': self.late_dropped,
            'malformed_dropped': self.malformed,
            'duplicates': self.duplicates,
            'tracked': len(self._tracked),
            'buffer_size': len(self._early),
        }

    def clear(self) -> None:
        """Forget everything (used in a forked child)."""
        with self._lock:
            self._tracked.clear()
            self._early.clear()
            self._evicted.clear()
            self._abandoned.clear()
            self._collected.clear()


def index_results(results: Sequence[Any]) -> Tuple[Dict[str, List[Any]], Dict[str, List[int]]]:
    """``(results by id, member positions by id)`` for a join (duplicate ids share one entry)."""
    by_id: Dict[str, List[Any]] = {}
    positions: Dict[str, List[int]] = {}
    for index, result in enumerate(results):
        task_id = result.id
        same = by_id.get(task_id)
        if same is None:
            by_id[task_id] = [result]
            positions[task_id] = [index]
        else:
            same.append(result)
            positions[task_id].append(index)
    return by_id, positions


def fill_values(bucket: Deque[Tuple[str, Any]], by_id: Dict[str, List[Any]],
                positions: Dict[str, List[int]], values: List[Any], cache: Any) -> Optional[Tuple[str, Any]]:
    """Place plain successes from ``bucket`` into ``values``; stop at the first other item and return it.

    A plain success (a SUCCESS meta without children) becomes the final state of
    its results, exactly as ``AsyncResult._maybe_set_cache`` would make it.
    """
    while bucket:
        task_id, meta = bucket.popleft()
        if type(meta) is not dict or meta.get('status') != 'SUCCESS' or meta.get('children'):
            return task_id, meta
        for result in by_id[task_id]:
            if result._cache is None:
                if result._then is None:
                    result._cache = meta
                else:
                    result._maybe_set_cache(meta)
        if cache is not None:
            cache[task_id] = meta
        value = meta.get('result')
        for index in positions[task_id]:
            values[index] = value
    return None
