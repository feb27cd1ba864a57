# cython: language_level=3, boundscheck=False, wraparound=False
"""The per-task state table (compiled twin of ``rpcresults/_state_py.py``).

Same classes, same methods, same counters, same order of effects as the pure
twin, which is the readable reference; the tests run on both.
"""
import json
import json.scanner
import logging
import threading
import weakref
from collections import deque

from rpcresults.exceptions import ContentDisallowed, MalformedResult, ReplyQueueLost, ResultEvicted

logger = logging.getLogger('rpcresults.state')

__all__ = ('StateTable', 'Waiter', 'READY_STATES', 'index_results', 'fill_values')

READY_STATES = frozenset({'SUCCESS', 'FAILURE', 'REVOKED'})
EVICTION_WARN_EVERY = 1000

cdef object _decoder = json.JSONDecoder()
cdef object _json_decode = _decoder.decode
cdef object _json_scan = json.scanner.make_scanner(_decoder)


cpdef object fast_json(str text):
    """``json.loads(text)`` through the C scanner directly; the full decoder handles the rest."""
    try:
        value, end = _json_scan(text, 0)
    except StopIteration:
        return _json_decode(text)
    if end != len(text):
        return _json_decode(text)
    return value
cdef str _SUCCESS = 'SUCCESS'
cdef str _FAILURE = 'FAILURE'
cdef str _REVOKED = 'REVOKED'
cdef str _JSON = 'application/json'
cdef str _UTF8 = 'utf-8'


cdef inline bint _ready_status(object status):
    return status == _SUCCESS or status == _FAILURE or status == _REVOKED


cdef inline bint _is_ready(object meta):
    if meta is None:
        return False
    if isinstance(meta, BaseException):
        return True
    return _ready_status((<dict>meta).get('status') if type(meta) is dict else meta.get('status'))


def is_ready(meta):
    """A stored entry is final: a ready meta, or an error to hand to the waiter."""
    return _is_ready(meta)


cdef class Waiter:
    """One wait (a ``get()``, a join, an await): ids still to come, ready ones in ``bucket``."""

    cdef public Py_ssize_t remaining
    cdef public object bucket
    cdef public object on_message
    cdef public object wake
    cdef public object error
    cdef object __weakref__

    def __init__(self, on_message=None, wake=None):
        self.remaining = 0
        self.bucket = deque()
        self.on_message = on_message
        self.wake = wake
        self.error = None

    cpdef notify(self):
        """Call ``wake`` (a driver's callable); its failure is logged, never raised into dispatch."""
        wake = self.wake
        if wake is not None:
            try:
                wake()
            except Exception:
                logger.exception('a waiter wake-up callback failed')

    @property
    def done(self):
        """Nothing more to wait for: every id is in the bucket (or was taken from it)."""
        return self.remaining <= 0

    def fail(self, error):
        """Hand ``error`` to this waiter and wake it."""
        if self.error is None:
            self.error = error
        self.notify()


cdef inline void _notify(Waiter waiter, task_id, meta, bint ready) except *:
    on_message = waiter.on_message
    if on_message is not None:
        try:
            on_message(meta)
        except Exception as exc:
            waiter.fail(exc)
    if ready:
        waiter.bucket.append((task_id, meta))
        waiter.remaining -= 1
        waiter.notify()


class _OwnerRef(weakref.ref):
    """Weak reference to a result object that keeps its task id tracked while alive."""

    __slots__ = ('task_id',)


cdef class _Entry:
    """A tracked task id: newest meta (or error), live owner refs, attached waiters.

    ``owners`` and ``waiters`` hold one object directly and become lists only
    for two or more: fewer long-lived objects per tracked id, less GC work.
    """

    cdef public object meta
    cdef object owners
    cdef object waiters

    def __init__(self):
        self.meta = None
        self.owners = None
        self.waiters = None

    cdef inline void add_owner(self, ref) except *:
        if self.owners is None:
            self.owners = ref
        elif type(self.owners) is list:
            (<list>self.owners).append(ref)
        else:
            self.owners = [self.owners, ref]

    cdef inline bint remove_owner(self, ref) except -1:
        if self.owners is ref:
            self.owners = None
            return True
        if type(self.owners) is list:
            try:
                (<list>self.owners).remove(ref)
            except ValueError:
                return False
            if not self.owners:
                self.owners = None
            return True
        return False

    cdef inline void add_waiter(self, waiter) except *:
        if self.waiters is None:
            self.waiters = waiter
        elif type(self.waiters) is list:
            (<list>self.waiters).append(waiter)
        else:
            self.waiters = [self.waiters, waiter]

    cdef inline void remove_waiter(self, waiter) except *:
        if self.waiters is waiter:
            self.waiters = None
        elif type(self.waiters) is list:
            try:
                (<list>self.waiters).remove(waiter)
            except ValueError:
                pass
            if not self.waiters:
                self.waiters = None

    cdef inline list waiter_list(self):
        if self.waiters is None:
            return []
        if type(self.waiters) is list:
            return list(<list>self.waiters)
        return [self.waiters]


cdef class StateTable:
    """Newest state per tracked task id, the early-arrival buffer, and the counters."""

    cdef object _decode
    cdef bint _fast_json
    cdef public Py_ssize_t buffer_max
    cdef public bint keep_late
    cdef object _lock
    cdef dict _tracked
    cdef dict _early
    cdef dict _evicted
    cdef dict _abandoned
    cdef Py_ssize_t _remember_max
    cdef object _collected
    cdef object _on_collected
    cdef public Py_ssize_t received
    cdef public Py_ssize_t dispatched
    cdef public Py_ssize_t buffered
    cdef public Py_ssize_t evicted
    cdef public Py_ssize_t late
    cdef public Py_ssize_t late_dropped
    cdef public Py_ssize_t malformed
    cdef public Py_ssize_t duplicates

    def __init__(self, decode=None, buffer_max=10000, keep_late=True, fast_json=False):
        self._decode = decode
        self._fast_json = fast_json
        self.buffer_max = max(int(buffer_max), 0)
        self.keep_late = keep_late
        self._lock = threading.Lock()
        self._tracked = {}
        self._early = {}
        self._evicted = {}
        self._abandoned = {}
        self._remember_max = max(10 * self.buffer_max, 1024)
        self._collected = deque()
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
    def track(self, task_id, owner):
        """Keep ``task_id`` tracked while ``owner`` (a result object) lives; claim a buffered reply."""
        self.track_many(((task_id, owner),))

    def track_many(self, pairs):
        """``track(task_id, owner)`` for each pair, under one lock."""
        cdef _Entry entry
        on_collected = self._on_collected
        with self._lock:
            self._reap()
            for task_id, owner in pairs:
                ref = _OwnerRef(owner, on_collected)
                ref.task_id = task_id
                entry = self._tracked.get(task_id)
                if entry is None:
                    entry = _Entry()
                    self._tracked[task_id] = entry
                    self._abandoned.pop(task_id, None)
                    if task_id in self._early:
                        entry.meta = self._early.pop(task_id)
                    elif task_id in self._evicted:
                        entry.meta = ResultEvicted([task_id])
                entry.add_owner(ref)

    def untrack(self, task_id):
        """Stop tracking ``task_id`` now (all owners); its waiters are detached."""
        with self._lock:
            self._tracked.pop(task_id, None)

    def is_tracked(self, task_id):
        return task_id in self._tracked

    cdef void _reap(self) except *:
        """Drop owner refs whose result objects were collected (lock held)."""
        cdef _Entry entry
        collected = self._collected
        while collected:
            ref = collected.popleft()
            entry = self._tracked.get(ref.task_id)
            if entry is None:
                continue
            if not entry.remove_owner(ref):
                continue
            if entry.owners is None and entry.waiters is None:
                del self._tracked[ref.task_id]
                if not _is_ready(entry.meta):
                    self._remember(self._abandoned, ref.task_id)

    cdef void _remember(self, dict ids, task_id) except *:
        ids[task_id] = None
        if len(ids) > self._remember_max:
            del ids[next(iter(ids))]

    # -- lookups -----------------------------------------------------------------------------
    def meta(self, task_id):
        """Newest meta (or error) known for ``task_id``, else ``None``; raises if it was evicted."""
        cdef _Entry entry = self._tracked.get(task_id)
        if entry is not None:
            return entry.meta
        meta = self._early.get(task_id)
        if meta is None and task_id in self._evicted:
            raise ResultEvicted([task_id])
        return meta

    def pending_ids(self):
        """Tracked ids without a final state."""
        cdef _Entry entry
        with self._lock:
            self._reap()
            return [tid for tid, entry in self._tracked.items() if not _is_ready(entry.meta)]

    def forget(self, task_id):
        """Drop whatever is known of ``task_id`` (buffered reply, tracked state, eviction mark)."""
        cdef _Entry entry
        with self._lock:
            self._early.pop(task_id, None)
            self._evicted.pop(task_id, None)
            entry = self._tracked.get(task_id)
            if entry is not None and entry.waiters is None:
                entry.meta = None

    # -- waiting -----------------------------------------------------------------------------
    def watch(self, Waiter waiter, task_ids):
        """Attach ``waiter`` to tracked ids; those already final go straight into its bucket."""
        cdef _Entry entry
        with self._lock:
            for task_id in task_ids:
                entry = self._tracked.get(task_id)
                if entry is None:
                    raise KeyError(f'task {task_id!r} is not tracked; track() it before watch()')
                if _is_ready(entry.meta):
                    waiter.bucket.append((task_id, entry.meta))
                    if isinstance(entry.meta, ReplyQueueLost):
                        entry.meta = None
                else:
                    entry.add_waiter(waiter)
                    waiter.remaining += 1

    def unwatch(self, Waiter waiter, task_ids):
        """Detach ``waiter`` from every id it may still be attached to (timeout, cancel, done)."""
        cdef _Entry entry
        with self._lock:
            for task_id in task_ids:
                entry = self._tracked.get(task_id)
                if entry is not None and entry.waiters is not None:
                    entry.remove_waiter(waiter)
            waiter.remaining = 0
            self._reap()

    def fail_pending(self, make_error):
        """Give every waiter of an unfinished id ``make_error(its ids)``; returns all such ids."""
        cdef _Entry entry
        cdef dict per_waiter = {}
        with self._lock:
            self._reap()
            pending = [tid for tid, entry in self._tracked.items() if not _is_ready(entry.meta)]
            for tid in pending:
                entry = self._tracked[tid]
                for waiter in entry.waiter_list():
                    per_waiter.setdefault(id(waiter), (waiter, []))[1].append(tid)
                if entry.waiters is None:
                    entry.meta = make_error([tid])
        for waiter, ids in per_waiter.values():
            waiter.fail(make_error(ids))
        return pending

    # -- replies -----------------------------------------------------------------------------
    def deliver_body(self, correlation_id, content_type, content_encoding, body):
        """Decode one raw reply and dispatch it; returns False when it was dropped as malformed."""
        try:
            if (self._fast_json and content_type == _JSON
                    and (content_encoding is None or content_encoding == _UTF8)
                    and b'"__type__"' not in body):
                payload = fast_json(body.decode('utf-8'))
            else:
                payload = self._decode(body, content_type, content_encoding)
        except ContentDisallowed as exc:
            return self.deliver_error(correlation_id, exc, f'refused content type {content_type!r}')
        except Exception as exc:
            reason = f'undecodable {content_type!r} body ({type(exc).__name__}: {exc})'
            return self.deliver_error(correlation_id, MalformedResult(correlation_id or '?', reason), reason)
        if type(payload) is not dict:
            from collections.abc import Mapping
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
        if type(payload) is not dict:
            payload = dict(payload)
        if payload.get('task_id') != task_id:
            payload['task_id'] = task_id
        self.deliver(task_id, payload)
        return True

    def deliver_many(self, deliveries):
        """Dispatch parsed deliveries ``(tag, correlation_id, content_type, content_encoding, body)``."""
        cdef Py_ssize_t count = 0
        cdef tuple item
        for item in deliveries:
            try:
                self.deliver_body(item[1], item[2], item[3], item[4])
            except Exception:
                logger.exception('error while dispatching the reply for %s', item[1])
            count += 1
        return count

    def deliver_error(self, task_id, error, reason):
        """A reply that cannot become a meta: its waiters get ``error``; else a counted, logged drop."""
        cdef _Entry entry
        cdef Waiter waiter
        self.received += 1
        self.malformed += 1
        if not task_id or error is None:
            logger.warning('dropped a malformed reply for %s: %s', task_id or 'an unknown task', reason)
            return False
        logger.warning('malformed reply for task %s: %s', task_id, reason)
        with self._lock:
            entry = self._tracked.get(task_id)
            if entry is None:
                self._buffer(task_id, error)
                return False
            if _is_ready(entry.meta) and not isinstance(entry.meta, BaseException):
                return False
            entry.meta = error
            waiters = entry.waiter_list()
            entry.waiters = None
        for waiter in waiters:
            waiter.bucket.append((task_id, error))
            waiter.remaining -= 1
            waiter.notify()
        return False

    def deliver(self, task_id, meta):
        """Dispatch one decoded meta: to its tracked entry and waiters, else to the early buffer."""
        cdef _Entry entry
        cdef bint ready
        with self._lock:
            self.received += 1
            if self._collected:
                self._reap()
            entry = self._tracked.get(task_id)
            if entry is None:
                self._buffer(task_id, meta)
                return
            old = entry.meta
            ready = _ready_status(meta.get('status'))
            if old is not None and not isinstance(old, BaseException) and _ready_status(old.get('status')):
                self.duplicates += 1
                return
            entry.meta = meta
            self.dispatched += 1
            waiters = entry.waiters
            if waiters is None:
                return
            if ready:
                entry.waiters = None
            elif type(waiters) is list:
                waiters = list(<list>waiters)
        if type(waiters) is list:
            for waiter in <list>waiters:
                _notify(<Waiter>waiter, task_id, meta, ready)
        else:
            _notify(<Waiter>waiters, task_id, meta, ready)

    cdef void _buffer(self, task_id, meta) except *:
        """Keep a reply nobody holds a result for (lock held); evict the oldest past the bound."""
        cdef dict early = self._early
        if task_id in self._abandoned:
            self.late += 1
            if not self.keep_late:
                self.late_dropped += 1
                return
        if task_id in early:
            old = early.pop(task_id)
            if _is_ready(old) and not _is_ready(meta):
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
    def counters(self):
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

    def clear(self):
        """Forget everything (used in a forked child)."""
        with self._lock:
            self._tracked.clear()
            self._early.clear()
            self._evicted.clear()
            self._abandoned.clear()
            self._collected.clear()


def index_results(results):
    """``(results by id, member positions by id)`` for a join (duplicate ids share one entry)."""
    cdef dict by_id = {}
    cdef dict positions = {}
    cdef Py_ssize_t index = 0
    cdef list same
    for result in results:
        task_id = result.id
        same = by_id.get(task_id)
        if same is None:
            by_id[task_id] = [result]
            positions[task_id] = [index]
        else:
            same.append(result)
            (<list>positions[task_id]).append(index)
        index += 1
    return by_id, positions


def fill_values(bucket, dict by_id, dict positions, list values, cache):
    """Place plain successes from ``bucket`` into ``values``; stop at the first other item and return it."""
    cdef tuple item
    cdef Py_ssize_t index
    popleft = bucket.popleft
    while bucket:
        item = popleft()
        task_id = item[0]
        meta = item[1]
        if type(meta) is not dict or (<dict>meta).get('status') != _SUCCESS or (<dict>meta).get('children'):
            return item
        for result in <list>by_id[task_id]:
            if result._cache is None:
                if result._then is None:
                    result._cache = meta
                else:
                    result._maybe_set_cache(meta)
        if cache is not None:
            cache[task_id] = meta
        value = (<dict>meta).get('result')
        for index in <list>positions[task_id]:
            values[index] = value
    return None
