"""The per-task state table (``StateTable``, ``Waiter``): dispatch, buffering, eviction, weak tracking.

Written against the ``impl`` fixture so the same tests run on every implementation
(the pure-Python twin and the compiled one, via tests/twins.py).
"""
from __future__ import annotations

import gc
import json
import logging
import pickle
import random
import sys
import threading
from types import ModuleType
from typing import Any, Dict, List, Optional

import pytest

from rpcresults import serialization
from rpcresults.exceptions import ContentDisallowed, MalformedResult, ReplyQueueLost, ResultEvicted

JSON = 'application/json'
PICKLE = 'application/x-python-serialize'

IMPLEMENTATIONS = {'pure': 'rpcresults.protocol._table_py', 'compiled': 'rpcresults.protocol._table_c'}


@pytest.fixture
def impl(twin) -> ModuleType:
    """The module holding ``StateTable`` and ``Waiter`` for one implementation (see tests/twins.py)."""
    module = twin.table
    assert module.__name__ == IMPLEMENTATIONS[twin.kind]
    return module


def _decode(body: bytes, content_type: Optional[str], content_encoding: Optional[str]) -> Any:
    return serialization.decode(body, content_type, content_encoding, serialization.accept_set(None))


@pytest.fixture
def make_table(impl):
    def make(buffer_max: int = 100, keep_late: bool = True):
        return impl.StateTable(decode=_decode, buffer_max=buffer_max, keep_late=keep_late)
    return make


@pytest.fixture
def table(make_table):
    return make_table()


class Owner:
    """Stands in for a result object: the table tracks an id while its owner lives."""


class Recorder:
    """A waiter's ``wake`` and ``on_message``, counting calls."""

    def __init__(self) -> None:
        self.wakes = 0
        self.messages: List[Dict[str, Any]] = []

    def wake(self) -> None:
        self.wakes += 1

    def on_message(self, meta: Dict[str, Any]) -> None:
        self.messages.append(meta)


def body(task_id: Optional[str], status: str, result: Any = None, **extra: Any) -> bytes:
    meta: Dict[str, Any] = {'status': status, 'result': result, 'traceback': None, 'children': None,
                            'date_done': None}
    if task_id is not None:
        meta['task_id'] = task_id
    meta.update(extra)
    return json.dumps(meta).encode()


def reply(table, task_id: str, status: str, result: Any = None) -> bool:
    return table.deliver_body(task_id, JSON, 'utf-8', body(task_id, status, result))


def new_waiter(impl, recorder: Optional[Recorder] = None, with_on_message: bool = False):
    recorder = recorder or Recorder()
    waiter = impl.Waiter(on_message=recorder.on_message if with_on_message else None, wake=recorder.wake)
    return waiter, recorder


UNPICKLED = {'flag': False}


def _set_flag() -> str:
    UNPICKLED['flag'] = True
    return 'unpickled'


class PickleBomb:
    def __reduce__(self):
        return _set_flag, ()


# -- dispatch -------------------------------------------------------------------------------

def test_reply_for_tracked_id_goes_to_its_waiter(impl, table) -> None:
    owner = Owner()
    table.track('t1', owner)
    waiter, rec = new_waiter(impl)
    table.watch(waiter, ['t1'])
    assert waiter.remaining == 1
    assert not waiter.done

    assert reply(table, 't1', 'SUCCESS', {'answer': 42}) is True

    assert len(waiter.bucket) == 1
    task_id, meta = waiter.bucket[0]
    assert task_id == 't1'
    assert meta['status'] == 'SUCCESS'
    assert meta['result'] == {'answer': 42}
    assert meta['task_id'] == 't1'
    assert waiter.remaining == 0
    assert waiter.done
    assert rec.wakes == 1
    assert waiter.error is None
    assert table.meta('t1')['status'] == 'SUCCESS'
    counters = table.counters()
    assert counters['received'] == 1
    assert counters['dispatched'] == 1
    assert counters['buffered'] == 0


def test_correlation_id_wins_over_body_task_id(impl, table) -> None:
    owner = Owner()
    table.track('corr', owner)
    waiter, _ = new_waiter(impl)
    table.watch(waiter, ['corr'])
    assert table.deliver_body('corr', JSON, 'utf-8', body('other-id', 'SUCCESS', 1)) is True
    assert [tid for tid, _ in waiter.bucket] == ['corr']
    assert waiter.bucket[0][1]['task_id'] == 'corr'


def test_missing_correlation_id_falls_back_to_task_id(impl, table) -> None:
    owner = Owner()
    table.track('by-body', owner)
    waiter, _ = new_waiter(impl)
    table.watch(waiter, ['by-body'])
    assert table.deliver_body(None, JSON, 'utf-8', body('by-body', 'SUCCESS', 5)) is True
    assert waiter.bucket[0][0] == 'by-body'
    assert waiter.bucket[0][1]['result'] == 5


def test_unready_state_does_not_fill_the_bucket(impl, table) -> None:
    owner = Owner()
    table.track('s', owner)
    waiter, rec = new_waiter(impl)
    table.watch(waiter, ['s'])
    reply(table, 's', 'STARTED', {'pid': 1, 'hostname': 'h'})
    assert len(waiter.bucket) == 0
    assert waiter.remaining == 1
    assert rec.wakes == 0
    assert table.meta('s')['status'] == 'STARTED'
    assert table.pending_ids() == ['s']


def test_watch_after_final_reply_fills_bucket_at_once(impl, table) -> None:
    owner = Owner()
    table.track('done', owner)
    reply(table, 'done', 'FAILURE', {'exc_type': 'ValueError', 'exc_message': ['x'], 'exc_module': 'builtins'})
    waiter, _ = new_waiter(impl)
    table.watch(waiter, ['done'])
    assert waiter.remaining == 0
    assert [(tid, meta['status']) for tid, meta in waiter.bucket] == [('done', 'FAILURE')]


def test_watch_untracked_id_raises_key_error(impl, table) -> None:
    waiter, _ = new_waiter(impl)
    with pytest.raises(KeyError):
        table.watch(waiter, ['never-tracked'])


def test_on_message_sees_every_state_of_its_own_ids_only(impl, table) -> None:
    owner = Owner()
    table.track('a', owner)
    table.track('b', owner)
    waiter_a, rec_a = new_waiter(impl, with_on_message=True)
    waiter_b, rec_b = new_waiter(impl, with_on_message=True)
    table.watch(waiter_a, ['a'])
    table.watch(waiter_b, ['b'])

    reply(table, 'a', 'STARTED', {'pid': 1, 'hostname': 'w'})
    reply(table, 'b', 'STARTED', {'pid': 2, 'hostname': 'w'})
    reply(table, 'a', 'PROGRESS', {'done': 50})
    reply(table, 'a', 'SUCCESS', 'A')
    reply(table, 'b', 'PROGRESS', {'done': 10})
    reply(table, 'b', 'SUCCESS', 'B')

    assert [(m['task_id'], m['status']) for m in rec_a.messages] == [
        ('a', 'STARTED'), ('a', 'PROGRESS'), ('a', 'SUCCESS')]
    assert [(m['task_id'], m['status']) for m in rec_b.messages] == [
        ('b', 'STARTED'), ('b', 'PROGRESS'), ('b', 'SUCCESS')]
    assert rec_a.messages[1]['result'] == {'done': 50}
    assert [(tid, m['result']) for tid, m in waiter_a.bucket] == [('a', 'A')]
    assert [(tid, m['result']) for tid, m in waiter_b.bucket] == [('b', 'B')]


def test_one_waiter_over_many_ids(impl, table) -> None:
    owner = Owner()
    ids = [f'm{n}' for n in range(5)]
    for task_id in ids:
        table.track(task_id, owner)
    waiter, rec = new_waiter(impl)
    table.watch(waiter, ids)
    assert waiter.remaining == 5
    for task_id in reversed(ids):
        reply(table, task_id, 'SUCCESS', task_id.upper())
    assert [tid for tid, _ in waiter.bucket] == list(reversed(ids))
    assert waiter.done
    assert rec.wakes == 5


def test_two_waiters_on_the_same_id_both_get_it(impl, table) -> None:
    owner = Owner()
    table.track('shared', owner)
    w1, _ = new_waiter(impl)
    w2, _ = new_waiter(impl)
    table.watch(w1, ['shared'])
    table.watch(w2, ['shared'])
    reply(table, 'shared', 'SUCCESS', 7)
    assert [tid for tid, _ in w1.bucket] == ['shared']
    assert [tid for tid, _ in w2.bucket] == ['shared']


# -- ready states are sticky ----------------------------------------------------------------

def test_ready_state_is_not_replaced_by_a_later_unready_one(impl, table) -> None:
    owner = Owner()
    table.track('sticky', owner)
    reply(table, 'sticky', 'SUCCESS', 'final')
    reply(table, 'sticky', 'STARTED', {'pid': 3, 'hostname': 'late'})
    meta = table.meta('sticky')
    assert meta['status'] == 'SUCCESS'
    assert meta['result'] == 'final'


def test_second_success_is_counted_as_duplicate_and_ignored(impl, table) -> None:
    owner = Owner()
    table.track('dup', owner)
    waiter, rec = new_waiter(impl, with_on_message=True)
    table.watch(waiter, ['dup'])
    reply(table, 'dup', 'SUCCESS', 'first')
    reply(table, 'dup', 'SUCCESS', 'second')
    assert table.counters()['duplicates'] == 1
    assert table.meta('dup')['result'] == 'first'
    assert [m['result'] for _, m in waiter.bucket] == ['first']
    assert [m['result'] for m in rec.messages] == ['first']


def test_buffered_ready_state_is_not_replaced_by_a_later_unready_one(impl, table) -> None:
    reply(table, 'early-sticky', 'SUCCESS', 'final')
    reply(table, 'early-sticky', 'STARTED')
    owner = Owner()
    table.track('early-sticky', owner)
    assert table.meta('early-sticky')['status'] == 'SUCCESS'
    assert table.meta('early-sticky')['result'] == 'final'


# -- early-arrival buffer -------------------------------------------------------------------

def test_reply_for_untracked_id_is_buffered_then_claimed(impl, table) -> None:
    assert reply(table, 'early', 'SUCCESS', 'kept') is True
    counters = table.counters()
    assert counters['buffered'] == 1
    assert counters['buffer_size'] == 1
    assert counters['dispatched'] == 0
    assert counters['tracked'] == 0
    assert table.meta('early')['result'] == 'kept'

    owner = Owner()
    table.track('early', owner)
    assert table.counters()['buffer_size'] == 0
    assert table.counters()['tracked'] == 1
    waiter, _ = new_waiter(impl)
    table.watch(waiter, ['early'])
    assert waiter.remaining == 0
    assert [(tid, m['result']) for tid, m in waiter.bucket] == [('early', 'kept')]


def test_buffered_unready_state_then_final_reply_after_track(impl, table) -> None:
    reply(table, 'pre', 'STARTED')
    owner = Owner()
    table.track('pre', owner)
    assert table.meta('pre')['status'] == 'STARTED'
    waiter, _ = new_waiter(impl)
    table.watch(waiter, ['pre'])
    assert waiter.remaining == 1
    reply(table, 'pre', 'SUCCESS', 1)
    assert [tid for tid, _ in waiter.bucket] == ['pre']


def test_buffer_bound_evicts_oldest_counts_and_warns(impl, make_table, caplog) -> None:
    buffer_max, extra = 5, 3
    table = make_table(buffer_max=buffer_max)
    ids = [f'flood-{n}' for n in range(buffer_max + extra)]
    with caplog.at_level(logging.WARNING):
        for task_id in ids:
            reply(table, task_id, 'SUCCESS', task_id)
    counters = table.counters()
    assert counters['evicted'] == extra
    assert table.evicted == extra
    assert counters['buffer_size'] == buffer_max
    assert counters['buffered'] == buffer_max + extra
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and 'evict' in r.getMessage()]
    assert warnings, 'an eviction must be logged'

    evicted, kept = ids[:extra], ids[extra:]
    for task_id in evicted:
        with pytest.raises(ResultEvicted) as info:
            table.meta(task_id)
        assert task_id in info.value.task_ids
        assert task_id in str(info.value)
    for task_id in kept:
        assert table.meta(task_id)['result'] == task_id


def test_tracking_an_evicted_id_gives_result_evicted(impl, make_table) -> None:
    table = make_table(buffer_max=2)
    for task_id in ('old', 'mid', 'new'):
        reply(table, task_id, 'SUCCESS', task_id)
    owner = Owner()
    table.track('old', owner)
    meta = table.meta('old')
    assert isinstance(meta, ResultEvicted)
    assert meta.task_ids == ('old',)
    waiter, _ = new_waiter(impl)
    table.watch(waiter, ['old'])
    assert waiter.remaining == 0
    assert len(waiter.bucket) == 1
    assert waiter.bucket[0][0] == 'old'
    assert isinstance(waiter.bucket[0][1], ResultEvicted)


def test_zero_buffer_keeps_nothing_but_counts(impl, make_table) -> None:
    table = make_table(buffer_max=0)
    reply(table, 'x', 'SUCCESS', 1)
    assert table.counters()['evicted'] == 1
    assert table.counters()['buffer_size'] == 0
    with pytest.raises(ResultEvicted):
        table.meta('x')


# -- weak tracking --------------------------------------------------------------------------

def test_counters_drop_a_collected_owner_at_once(impl, table) -> None:
    owner = Owner()
    table.track('weak', owner)
    assert table.counters()['tracked'] == 1
    assert table.pending_ids() == ['weak']
    del owner
    gc.collect()
    assert table.counters()['tracked'] == 0  # no other table operation in between
    assert table.pending_ids() == []


def test_late_reply_after_owner_collected_is_counted(impl, table) -> None:
    owner = Owner()
    table.track('late', owner)
    del owner
    gc.collect()
    reply(table, 'late', 'SUCCESS', 'too late')
    counters = table.counters()
    assert counters['tracked'] == 0
    assert counters['late'] == 1
    assert counters['late_dropped'] == 0
    assert table.meta('late')['result'] == 'too late'  # kept (keep_late=True)


def test_late_reply_dropped_when_keep_late_is_false(impl, make_table) -> None:
    table = make_table(keep_late=False)
    owner = Owner()
    table.track('late', owner)
    del owner
    gc.collect()
    reply(table, 'late', 'SUCCESS', 'too late')
    counters = table.counters()
    assert counters['tracked'] == 0
    assert counters['late'] == 1
    assert counters['late_dropped'] == 1
    assert counters['buffer_size'] == 0
    assert table.meta('late') is None


def test_id_stays_tracked_while_any_owner_lives(impl, table) -> None:
    first, second = Owner(), Owner()
    table.track('two-owners', first)
    table.track('two-owners', second)
    del first
    gc.collect()
    table.pending_ids()
    assert table.counters()['tracked'] == 1
    waiter, _ = new_waiter(impl)
    table.watch(waiter, ['two-owners'])
    reply(table, 'two-owners', 'SUCCESS', 1)
    assert [tid for tid, _ in waiter.bucket] == ['two-owners']
    assert table.counters()['late'] == 0
    del second
    gc.collect()
    table.pending_ids()
    assert table.counters()['tracked'] == 0


def test_tracking_the_same_owner_again_adds_no_second_reference(impl, table) -> None:
    owner = Owner()
    for _ in range(3):
        table.track('again', owner)
    table.track_many([('again', owner), ('again', owner)])
    assert table.counters()['tracked'] == 1
    del owner
    gc.collect()  # one collection reaps it: no stale reference of the repeats keeps the id
    assert table.counters()['tracked'] == 0


# -- unwatch, fail_pending, forget ------------------------------------------------------------

def test_unwatch_removes_the_waiter(impl, table) -> None:
    owner = Owner()
    table.track('u', owner)
    waiter, rec = new_waiter(impl, with_on_message=True)
    table.watch(waiter, ['u'])
    table.unwatch(waiter, ['u'])
    assert waiter.remaining == 0
    reply(table, 'u', 'STARTED')
    reply(table, 'u', 'SUCCESS', 1)
    assert len(waiter.bucket) == 0
    assert rec.messages == []
    assert rec.wakes == 0
    assert table.meta('u')['status'] == 'SUCCESS'


def test_unwatch_leaves_other_waiters_attached(impl, table) -> None:
    owner = Owner()
    table.track('u2', owner)
    gone, _ = new_waiter(impl)
    stays, _ = new_waiter(impl)
    table.watch(gone, ['u2'])
    table.watch(stays, ['u2'])
    table.unwatch(gone, ['u2'])
    reply(table, 'u2', 'SUCCESS', 1)
    assert len(gone.bucket) == 0
    assert [tid for tid, _ in stays.bucket] == ['u2']


def test_fail_pending_names_only_each_waiters_own_ids(impl, table) -> None:
    owner = Owner()
    for task_id in ('a', 'b', 'c', 'finished'):
        table.track(task_id, owner)
    reply(table, 'finished', 'SUCCESS', 1)
    w1, rec1 = new_waiter(impl)
    w2, rec2 = new_waiter(impl)
    table.watch(w1, ['a', 'b', 'finished'])
    table.watch(w2, ['c'])

    pending = table.fail_pending(lambda ids: ReplyQueueLost(ids, 'queue gone'))

    assert sorted(pending) == ['a', 'b', 'c']
    assert isinstance(w1.error, ReplyQueueLost)
    assert sorted(w1.error.task_ids) == ['a', 'b']
    assert isinstance(w2.error, ReplyQueueLost)
    assert w2.error.task_ids == ('c',)
    assert rec1.wakes >= 1
    assert rec2.wakes >= 1


def test_forget_drops_buffered_reply_and_eviction_mark(impl, make_table) -> None:
    table = make_table(buffer_max=1)
    reply(table, 'f1', 'SUCCESS', 1)
    reply(table, 'f2', 'SUCCESS', 2)
    table.forget('f1')
    table.forget('f2')
    assert table.meta('f1') is None
    assert table.meta('f2') is None


# -- malformed replies ----------------------------------------------------------------------

MALFORMED = {
    'invalid-json': (JSON, b'{"status": "SUCCESS", "result": ', MalformedResult),
    'json-list': (JSON, b'["SUCCESS", 1]', MalformedResult),
    'no-status': (JSON, b'{"task_id": "t", "result": 1}', MalformedResult),
    'status-not-str': (JSON, b'{"task_id": "t", "status": 1}', MalformedResult),
    'pickle': (PICKLE, pickle.dumps({'status': 'SUCCESS', 'result': PickleBomb()}), ContentDisallowed),
}


@pytest.mark.parametrize('case', sorted(MALFORMED))
def test_malformed_reply_for_tracked_id_reaches_its_waiter(impl, table, case, caplog) -> None:
    content_type, raw, expected = MALFORMED[case]
    UNPICKLED['flag'] = False
    owner = Owner()
    table.track('bad', owner)
    table.track('good', owner)
    bad_waiter, bad_rec = new_waiter(impl)
    good_waiter, _ = new_waiter(impl)
    table.watch(bad_waiter, ['bad'])
    table.watch(good_waiter, ['good'])

    with caplog.at_level(logging.WARNING):
        assert table.deliver_body('bad', content_type, 'utf-8' if content_type == JSON else 'binary', raw) is False

    assert table.counters()['malformed_dropped'] == 1
    assert len(bad_waiter.bucket) == 1
    task_id, error = bad_waiter.bucket[0]
    assert task_id == 'bad'
    assert isinstance(error, expected)
    if isinstance(error, MalformedResult):
        assert error.task_id == 'bad'
        assert 'bad' in str(error)
    assert bad_waiter.remaining == 0
    assert bad_rec.wakes == 1
    assert UNPICKLED['flag'] is False
    assert any(r.levelno == logging.WARNING for r in caplog.records)

    assert reply(table, 'good', 'SUCCESS', 'fine') is True
    assert [(tid, m['result']) for tid, m in good_waiter.bucket] == [('good', 'fine')]
    assert len(bad_waiter.bucket) == 1


@pytest.mark.parametrize('case', sorted(MALFORMED))
def test_malformed_reply_for_untracked_id_is_counted_and_its_error_kept(impl, table, case) -> None:
    """Counted as malformed; its error waits in the bounded buffer for whoever asks for the id."""
    content_type, raw, expected = MALFORMED[case]
    UNPICKLED['flag'] = False
    assert table.deliver_body('nobody', content_type, 'utf-8', raw) is False
    counters = table.counters()
    assert counters['malformed_dropped'] == 1
    assert counters['buffer_size'] == 1
    assert isinstance(table.meta('nobody'), expected)
    owner = Owner()
    table.track('nobody', owner)
    waiter, _ = new_waiter(impl)
    table.watch(waiter, ['nobody'])
    assert len(waiter.bucket) == 1 and isinstance(waiter.bucket[0][1], expected)
    assert UNPICKLED['flag'] is False


def test_reply_without_correlation_id_or_task_id_is_dropped(impl, table, caplog) -> None:
    owner = Owner()
    table.track('bystander', owner)
    waiter, rec = new_waiter(impl)
    table.watch(waiter, ['bystander'])
    with caplog.at_level(logging.WARNING):
        assert table.deliver_body(None, JSON, 'utf-8', body(None, 'SUCCESS', 1)) is False
    counters = table.counters()
    assert counters['malformed_dropped'] == 1
    assert counters['buffer_size'] == 0
    assert len(waiter.bucket) == 0
    assert rec.wakes == 0
    assert any(r.levelno == logging.WARNING for r in caplog.records)
    assert reply(table, 'bystander', 'SUCCESS', 2) is True
    assert [(tid, m['result']) for tid, m in waiter.bucket] == [('bystander', 2)]


def test_malformed_reply_after_final_does_not_replace_it(impl, table) -> None:
    owner = Owner()
    table.track('final', owner)
    reply(table, 'final', 'SUCCESS', 'ok')
    assert table.deliver_body('final', JSON, 'utf-8', b'not json') is False
    assert table.meta('final')['result'] == 'ok'


# -- user callbacks -------------------------------------------------------------------------

def test_raising_on_message_fails_only_its_waiter(impl, table) -> None:
    owner = Owner()
    table.track('a', owner)
    table.track('b', owner)
    boom = ValueError('callback exploded')

    def bad_on_message(meta):
        raise boom

    rec_bad = Recorder()
    bad = impl.Waiter(on_message=bad_on_message, wake=rec_bad.wake)
    same_id, rec_same = new_waiter(impl, with_on_message=True)
    other_id, rec_other = new_waiter(impl, with_on_message=True)
    table.watch(bad, ['a'])
    table.watch(same_id, ['a'])
    table.watch(other_id, ['b'])

    reply(table, 'a', 'SUCCESS', 'A')
    reply(table, 'b', 'SUCCESS', 'B')

    assert bad.error is boom
    assert rec_bad.wakes >= 1
    assert same_id.error is None
    assert [(tid, m['result']) for tid, m in same_id.bucket] == [('a', 'A')]
    assert [m['result'] for m in rec_same.messages] == ['A']
    assert other_id.error is None
    assert [(tid, m['result']) for tid, m in other_id.bucket] == [('b', 'B')]
    assert table.meta('a')['result'] == 'A'


# -- threads --------------------------------------------------------------------------------

def test_many_threads_each_get_exactly_their_own_ids(impl, make_table) -> None:
    threads_n, per_thread = 8, 500
    table = make_table(buffer_max=threads_n * per_thread)
    ids_by_thread = [[f't{t}-{n}' for n in range(per_thread)] for t in range(threads_n)]
    all_ids = [task_id for ids in ids_by_thread for task_id in ids]
    bodies = [(task_id, body(task_id, 'SUCCESS', task_id)) for task_id in all_ids]
    random.Random(1234).shuffle(bodies)

    barrier = threading.Barrier(threads_n + 1)
    received: Dict[int, List[Any]] = {}
    problems: List[BaseException] = []
    owners = [Owner() for _ in range(threads_n)]

    def waiting_thread(index: int) -> None:
        try:
            event = threading.Event()
            waiter = impl.Waiter(wake=event.set)
            barrier.wait()
            for task_id in ids_by_thread[index]:
                table.track(task_id, owners[index])
            table.watch(waiter, ids_by_thread[index])
            for _ in range(2000):  # safety net against a hang, not a timing check
                event.clear()
                if len(waiter.bucket) >= per_thread:
                    break
                event.wait(0.05)
            received[index] = list(waiter.bucket)
            assert waiter.error is None
        except BaseException as exc:  # reported below
            problems.append(exc)

    def delivering_thread() -> None:
        try:
            barrier.wait()
            for task_id, raw in bodies:
                assert table.deliver_body(task_id, JSON, 'utf-8', raw) is True
        except BaseException as exc:
            problems.append(exc)

    workers = [threading.Thread(target=waiting_thread, args=(i,)) for i in range(threads_n)]
    workers.append(threading.Thread(target=delivering_thread))
    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often: more interleavings of track/watch/deliver
    try:
        for thread in workers:
            thread.start()
        for thread in workers:
            thread.join(60)
    finally:
        sys.setswitchinterval(switch_interval)
    assert not problems, problems
    for index in range(threads_n):
        got = received[index]
        assert len(got) == per_thread
        assert sorted(tid for tid, _ in got) == sorted(ids_by_thread[index])
        assert all(meta['result'] == tid for tid, meta in got)
    counters = table.counters()
    assert counters['received'] == threads_n * per_thread
    assert counters['evicted'] == 0
    assert counters['malformed_dropped'] == 0
    assert counters['buffer_size'] == 0


def test_track_racing_delivery_of_the_same_id_never_loses_it(impl, make_table) -> None:
    """Each round one thread tracks+watches an id while another delivers its reply at the same moment."""
    rounds = 1500
    table = make_table(buffer_max=rounds)
    ids = [f'race-{n}' for n in range(rounds)]
    bodies = {task_id: body(task_id, 'SUCCESS', task_id) for task_id in ids}
    owner = Owner()
    waiters = [impl.Waiter() for _ in ids]
    start = [threading.Barrier(2) for _ in ids]
    problems: List[BaseException] = []

    def tracker() -> None:
        try:
            for index, task_id in enumerate(ids):
                start[index].wait()
                table.track(task_id, owner)
                table.watch(waiters[index], [task_id])
        except BaseException as exc:
            problems.append(exc)

    def deliverer() -> None:
        try:
            for index, task_id in enumerate(ids):
                start[index].wait()
                table.deliver_body(task_id, JSON, 'utf-8', bodies[task_id])
        except BaseException as exc:
            problems.append(exc)

    threads = [threading.Thread(target=tracker), threading.Thread(target=deliverer)]
    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    finally:
        sys.setswitchinterval(switch_interval)
    assert not problems, problems
    lost = [task_id for index, task_id in enumerate(ids)
            if [tid for tid, _ in waiters[index].bucket] != [task_id]]
    assert lost == []
    assert all(table.meta(task_id)['result'] == task_id for task_id in ids)
    assert table.counters()['buffer_size'] == 0
