"""Two edge rules of the state table, on both twins (the ``twin`` fixture).

* Evicted ids are remembered compactly. A reply nobody holds a result for is evicted from the
  early-arrival buffer past ``buffer_max``; its id is remembered (as a 64-bit fingerprint) so
  that asking for it raises ResultEvicted instead of waiting forever, for up to
  ``remember_max`` ids (default ``max(100 * buffer_max, 100_000)``), far beyond the old
  bound of ``max(10 * buffer_max, 1024)``. Past ``remember_max`` the oldest evicted id is
  forgotten: it then reads as unknown and waits like one. Remembering one costs under 40 bytes.
* A final state outlives its result objects. Once every owner of an id with a final state is
  collected, a new owner (or ``meta()``) still reads that state, whenever the old owners are
  reaped; a later reply for it is a counted duplicate that replaces nothing; such kept finals
  are bounded by ``buffer_max`` (the oldest forgotten first). An id whose owners are collected
  before its final state came is abandoned: a reply for it later is counted as late.

Everything is asserted through the table's public methods and ``counters()``.
"""
from __future__ import annotations

import gc
import json
import logging
import tracemalloc
import uuid
from typing import Any, Optional

import pytest

from rpcresults import serialization
from rpcresults.exceptions import ResultEvicted

pytestmark = pytest.mark.twins

JSON = 'application/json'
#: The bound on remembered evicted ids before ``remember_max``: ``max(10 * buffer_max, 1024)``.
OLD_REMEMBER_BOUND = 1024


def _decode(body: bytes, content_type: Optional[str], content_encoding: Optional[str]) -> Any:
    return serialization.decode(body, content_type, content_encoding, serialization.accept_set(None))


def body(task_id: str, status: str, result: Any = None) -> bytes:
    return json.dumps({'status': status, 'result': result, 'traceback': None, 'children': [],
                       'date_done': None, 'task_id': task_id}).encode()


def reply(table: Any, task_id: str, status: str, result: Any = None) -> bool:
    return table.deliver_body(task_id, JSON, 'utf-8', body(task_id, status, result))


def make(twin: Any, buffer_max: int, **options: Any) -> Any:
    return twin.table.StateTable(_decode, buffer_max=buffer_max, **options)


def is_evicted(table: Any, task_id: str) -> bool:
    """``meta(task_id)`` raises ResultEvicted naming ``task_id`` (True), or returns None (False)."""
    try:
        meta = table.meta(task_id)
    except ResultEvicted as exc:
        assert exc.task_ids == (task_id,)
        return True
    assert meta is None, f'{task_id} is neither evicted nor unknown: {meta!r}'
    return False


class Owner:
    """Stands in for a result object: the table tracks an id while its owner lives."""


@pytest.fixture
def quiet_table_log(caplog: pytest.LogCaptureFixture):
    """No eviction warnings are made (nor kept by the log capture) while a test floods a table."""
    with caplog.at_level(logging.ERROR, logger='rpcresults.state'):
        yield


# -- rule 5: evicted ids are remembered, compactly, up to remember_max ------------------------------
BUFFER = 10
REMEMBER = 5_000


def test_evicted_ids_are_remembered_past_the_old_bound_up_to_remember_max(twin, quiet_table_log) -> None:
    table = make(twin, BUFFER, remember_max=REMEMBER)
    assert table.remember_max == REMEMBER
    ids = [f'flood-{n}' for n in range(REMEMBER + 1_000)]
    first = 4_000  # 3,990 evicted: more than the old bound, fewer than remember_max
    for n, task_id in enumerate(ids[:first]):
        reply(table, task_id, 'SUCCESS', n)
    counters = table.counters()
    assert counters['evicted'] == first - BUFFER
    assert counters['evicted_remembered'] == first - BUFFER
    assert counters['buffer_size'] == BUFFER
    assert first - BUFFER > OLD_REMEMBER_BOUND
    # every evicted id fails fast, the very first one too (evicted 3,989 evictions ago)
    assert all(is_evicted(table, task_id) for task_id in ids[:first - BUFFER])
    for n in range(first - BUFFER, first):  # the newest BUFFER are still kept
        assert table.meta(ids[n])['result'] == n

    for n, task_id in enumerate(ids[first:], start=first):
        reply(table, task_id, 'SUCCESS', n)
        if n % 250 == 0:
            assert table.counters()['evicted_remembered'] <= REMEMBER
    counters = table.counters()
    evicted = len(ids) - BUFFER
    assert counters['evicted'] == evicted
    assert counters['evicted_remembered'] == REMEMBER  # bounded by remember_max
    forgotten = evicted - REMEMBER  # the oldest evicted ids, forgotten first
    assert not any(is_evicted(table, task_id) for task_id in ids[:forgotten])
    assert all(is_evicted(table, task_id) for task_id in ids[forgotten:evicted])


def test_a_remembered_evicted_id_fails_fast_and_a_forgotten_one_waits_like_an_unknown_id(
        twin, quiet_table_log) -> None:
    remember = 2_000
    table = make(twin, BUFFER, remember_max=remember)
    ids = [f'flood-{n}' for n in range(remember + BUFFER + 500)]
    for n, task_id in enumerate(ids):
        reply(table, task_id, 'SUCCESS', n)
    forgotten, remembered = ids[0], ids[500]  # 500 evicted ids are forgotten; ids[500] is the oldest kept

    keep = Owner()
    table.track(remembered, keep)
    assert isinstance(table.meta(remembered), ResultEvicted)
    waiter = twin.table.Waiter()
    table.watch(waiter, [remembered])
    assert waiter.done and [tid for tid, _ in waiter.bucket] == [remembered]
    assert isinstance(waiter.bucket[0][1], ResultEvicted)

    owner = Owner()
    table.track(forgotten, owner)
    assert table.meta(forgotten) is None  # unknown again: no error, it waits
    waiter = twin.table.Waiter()
    table.watch(waiter, [forgotten])
    assert not waiter.done and not waiter.bucket
    reply(table, forgotten, 'SUCCESS', 'redelivered')  # a reply that does come is delivered
    assert waiter.done and waiter.bucket[0][1]['result'] == 'redelivered'


@pytest.mark.parametrize('buffer_max,expected', [
    (10, 100_000), (0, 100_000), (1_000, 100_000), (5_000, 500_000), (10_000, 1_000_000)])
def test_default_remember_max(twin, buffer_max: int, expected: int) -> None:
    assert make(twin, buffer_max).remember_max == expected
    assert make(twin, buffer_max, remember_max=None).remember_max == expected
    assert make(twin, buffer_max, remember_max=1_234).remember_max == 1_234


def test_by_default_an_id_evicted_far_beyond_the_old_bound_still_fails_fast(twin, quiet_table_log) -> None:
    table = make(twin, BUFFER)  # remember_max: 100,000
    ids = [f'flood-{n}' for n in range(30_000)]
    for n, task_id in enumerate(ids):
        reply(table, task_id, 'SUCCESS', n)
    counters = table.counters()
    assert counters['evicted'] == counters['evicted_remembered'] == len(ids) - BUFFER
    assert is_evicted(table, ids[0])  # evicted 29,989 evictions ago: 29 x the old bound
    assert is_evicted(table, ids[len(ids) - BUFFER - OLD_REMEMBER_BOUND - 1])


REMEMBERED = 100_000
BYTES_PER_ID = 40


def test_remembering_an_evicted_id_costs_under_40_bytes(twin, quiet_table_log) -> None:
    """tracemalloc: the growth of a table that evicted (and remembers) 100,000 uuid4 ids, once
    the id strings and their replies are dropped, divided by the ids it remembers."""
    table = make(twin, BUFFER, remember_max=REMEMBERED)
    prefix = str(uuid.uuid4())[:24]  # 'xxxxxxxx-xxxx-4xxx-yxxx-': each id below is a uuid4 string
    assert uuid.UUID(f'{prefix}{0:012x}').version == 4
    for n in range(BUFFER):
        table.deliver(f'{prefix}{n:012x}', {'status': 'SUCCESS', 'result': n})
    gc.collect()
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        for n in range(BUFFER, BUFFER + REMEMBERED):  # each id string is made (traced) and dropped here
            table.deliver(f'{prefix}{n:012x}', {'status': 'SUCCESS', 'result': n})
        gc.collect()
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    counters = table.counters()
    assert counters['evicted'] == REMEMBERED
    assert counters['evicted_remembered'] == REMEMBERED
    assert counters['buffer_size'] == BUFFER
    per_id = (after - before) / REMEMBERED
    assert per_id < BYTES_PER_ID, f'{per_id:.1f} bytes per remembered evicted id'
    assert is_evicted(table, f'{prefix}{0:012x}')  # what the memory holds still answers


# -- rule 6: a final state outlives its dropped result objects -------------------------------------
def test_a_final_state_is_read_after_its_owner_is_dropped_every_time(twin) -> None:
    """1,000 ids, one after another: track, final reply, drop the owner; then ``meta()`` and a new
    owner read the final state. The old owner is reaped at different points: not yet (``meta()``
    before any other operation), by ``counters()``, by an unrelated reply, or by the new
    ``track()`` itself; a cyclic owner only by ``gc.collect()``."""
    table = make(twin, 100)
    other = Owner()
    table.track('unrelated', other)
    gc.collect()
    for n in range(1_000):
        task_id = f'task-{n}'
        owner = Owner()
        if n % 5 == 4:
            owner.cycle = owner  # type: ignore[attr-defined]  (only the cycle collector frees it)
        table.track(task_id, owner)
        status = 'FAILURE' if n % 7 == 0 else 'SUCCESS'
        reply(table, task_id, status, n)
        del owner
        if n % 5 == 4:
            gc.collect()
        way = n % 4
        if way == 1:
            assert table.counters()['tracked'] == 1  # reaped: only 'unrelated' is tracked
        elif way == 2:
            reply(table, 'unrelated', 'STARTED', n)
        meta = table.meta(task_id)
        assert meta is not None and meta['status'] == status and meta['result'] == n, (n, meta)
        again = Owner()
        table.track(task_id, again)
        assert table.meta(task_id)['result'] == n
        waiter = twin.table.Waiter()
        table.watch(waiter, [task_id])
        assert waiter.done and waiter.bucket[0][1]['status'] == status, n
        del again
    counters = table.counters()
    assert counters['tracked'] == 1
    assert counters['dispatched'] == 1_000 + 250
    assert counters['duplicates'] == 0 and counters['late'] == 0 and counters['evicted'] == 0


def test_a_later_reply_for_a_kept_final_state_is_a_duplicate_and_replaces_nothing(twin) -> None:
    table = make(twin, 100)
    for task_id in ('a', 'b'):
        owner = Owner()
        table.track(task_id, owner)
        reply(table, task_id, 'SUCCESS', f'first {task_id}')
        del owner
    gc.collect()
    counters = table.counters()
    assert counters['tracked'] == 0 and counters['finished'] == 2  # both are kept finals now
    before = table.counters()
    reply(table, 'a', 'SUCCESS', 'second')
    reply(table, 'a', 'FAILURE', 'third')
    reply(table, 'a', 'STARTED', 'fourth')
    reply(table, 'b', 'SUCCESS', 'second')
    after = table.counters()
    assert after['duplicates'] == before['duplicates'] + 4
    assert after['received'] == before['received'] + 4
    assert after['buffered'] == before['buffered'] and after['buffer_size'] == before['buffer_size']
    assert after['late'] == before['late'] and after['finished'] == 2
    assert table.meta('a')['result'] == 'first a'
    assert table.meta('b')['result'] == 'first b'
    owner = Owner()
    table.track('a', owner)
    meta = table.meta('a')
    assert meta['status'] == 'SUCCESS' and meta['result'] == 'first a'


def test_a_duplicate_before_the_dropped_owner_is_reaped_replaces_nothing(twin) -> None:
    table = make(twin, 100)
    owner = Owner()
    owner.cycle = owner  # type: ignore[attr-defined]  (freed by gc.collect() only)
    table.track('t', owner)
    reply(table, 't', 'SUCCESS', 'first')
    del owner
    gc.collect()
    reply(table, 't', 'SUCCESS', 'second')  # the first operation after the collection
    counters = table.counters()
    assert counters['duplicates'] == 1
    assert counters['tracked'] == 0 and counters['finished'] == 1
    assert table.meta('t')['result'] == 'first'


def test_kept_final_states_are_bounded_by_buffer_max_and_the_oldest_go_first(twin) -> None:
    buffer_max, total = 10, 50
    table = make(twin, buffer_max)
    ids = [f'kept-{n}' for n in range(total)]
    for n, task_id in enumerate(ids):
        owner = Owner()
        table.track(task_id, owner)
        reply(table, task_id, 'SUCCESS', n)
        del owner
        assert table.counters()['finished'] <= buffer_max
    gc.collect()
    counters = table.counters()
    assert counters['finished'] == buffer_max
    assert counters['tracked'] == 0
    for n, task_id in enumerate(ids):
        if n < total - buffer_max:  # pushed out: remembered as evicted, so a new wait fails fast
            with pytest.raises(ResultEvicted):
                table.meta(task_id)
        else:
            assert table.meta(task_id)['result'] == n
    assert counters['evicted_remembered'] == total - buffer_max
    owner = Owner()
    table.track(ids[0], owner)
    waiter = twin.table.Waiter()
    table.watch(waiter, [ids[0]])
    assert waiter.done
    assert isinstance(waiter.bucket[0][1], ResultEvicted)
    newest = Owner()
    table.track(ids[-1], newest)  # claimed by a new owner: no longer among the kept finals
    assert table.meta(ids[-1])['result'] == total - 1
    assert table.counters()['finished'] == buffer_max - 1


def test_owner_dropped_before_the_final_state_abandons_the_id_and_a_later_reply_is_late(twin) -> None:
    table = make(twin, 100)
    owner = Owner()
    table.track('abandoned', owner)
    reply(table, 'abandoned', 'STARTED', {'pid': 1})
    del owner
    gc.collect()
    counters = table.counters()
    assert counters['tracked'] == 0 and counters['finished'] == 0
    assert table.meta('abandoned') is None  # an unfinished state is not kept for a next owner
    reply(table, 'abandoned', 'SUCCESS', 'late')
    counters = table.counters()
    assert counters['late'] == 1 and counters['late_dropped'] == 0
    assert counters['duplicates'] == 0
    assert counters['buffer_size'] == 1
    assert table.meta('abandoned')['result'] == 'late'  # kept (keep_late=True) for a next result object
    again = Owner()
    table.track('abandoned', again)
    assert table.meta('abandoned')['result'] == 'late'
    assert table.counters()['buffer_size'] == 0


def test_a_late_reply_is_dropped_without_keep_late(twin) -> None:
    table = make(twin, 100, keep_late=False)
    owner = Owner()
    table.track('abandoned', owner)
    del owner
    gc.collect()
    reply(table, 'abandoned', 'SUCCESS', 'late')
    counters = table.counters()
    assert counters['late'] == 1 and counters['late_dropped'] == 1 and counters['buffer_size'] == 0
    assert table.meta('abandoned') is None


def test_abandoned_ids_are_remembered_up_to_remember_max(twin) -> None:
    remember = 5
    table = make(twin, 100, remember_max=remember)
    ids = [f'abandoned-{n}' for n in range(8)]
    for task_id in ids:
        owner = Owner()
        table.track(task_id, owner)
        del owner
    gc.collect()
    assert table.counters()['tracked'] == 0
    for task_id in ids:
        reply(table, task_id, 'SUCCESS', task_id)
    counters = table.counters()
    assert counters['late'] == remember  # the oldest three were forgotten: their replies are just early
    assert counters['buffered'] == len(ids)


def test_a_final_state_outlives_an_owner_reaped_while_a_waiter_was_attached(twin) -> None:
    """The owner is collected (and reaped) while a wait is attached to its id; then the final
    reply reaches that waiter. The id is then held by nothing: it must end up among the kept
    finals (bounded by buffer_max), not stay tracked for ever."""
    buffer_max, total = 10, 30
    table = make(twin, buffer_max)
    for n in range(total):
        task_id = f'waited-{n}'
        owner = Owner()
        table.track(task_id, owner)
        waiter = twin.table.Waiter()
        table.watch(waiter, [task_id])
        del owner
        gc.collect()
        table.counters()  # reaps the collected owner while the waiter is still attached
        reply(table, task_id, 'SUCCESS', n)
        assert waiter.done and waiter.bucket[0][1]['result'] == n
        table.unwatch(waiter, [task_id])  # what a finished wait does
        assert table.meta(task_id)['result'] == n
    counters = table.counters()
    assert counters['tracked'] == 0, f'{counters["tracked"]} ids with neither owner nor waiter stay tracked'
    assert counters['finished'] <= buffer_max


def test_an_id_whose_owner_was_reaped_during_a_timed_out_wait_is_abandoned(twin) -> None:
    table = make(twin, 100)
    owner = Owner()
    table.track('timed-out', owner)
    waiter = twin.table.Waiter()
    table.watch(waiter, ['timed-out'])
    del owner
    gc.collect()
    table.counters()  # reaps the collected owner while the waiter is still attached
    table.unwatch(waiter, ['timed-out'])  # the wait times out
    assert table.counters()['tracked'] == 0
    reply(table, 'timed-out', 'SUCCESS', 'late')
    assert table.counters()['late'] == 1



# -- settings and encodings at the table's edge ----------------------------------------------------
@pytest.mark.parametrize('bad', [0, -5])
def test_remember_max_below_one_is_refused(twin, bad: int) -> None:
    with pytest.raises(ValueError, match='remember_max'):
        make(twin, BUFFER, remember_max=bad)


def test_an_invented_content_encoding_is_refused_without_a_codec_lookup(twin, monkeypatch) -> None:
    """Only the stdlib's own encoding names are looked up: a lookup of any other name is remembered
    by the stdlib forever, so a sender inventing names would grow the process without bound."""
    import codecs
    looked_up = []
    real = codecs.lookup
    monkeypatch.setattr(codecs, 'lookup', lambda name: looked_up.append(name) or real(name))
    table = make(twin, BUFFER)
    for n in range(50):
        assert table.deliver_body(f'id-{n}', JSON, f'x-invented-{n}', b'{"status": "SUCCESS"}') is False
    assert looked_up == []
    assert table.counters()['malformed_dropped'] == 50
    text = json.dumps({'task_id': 'ok', 'status': 'SUCCESS', 'result': 'caf\u00e9'}).encode('latin-1')
    assert table.deliver_body('ok', JSON, 'ISO-8859-1', text) is True
    assert table.meta('ok')['result'] == 'caf\u00e9'


def test_an_empty_content_encoding_is_read_as_utf8_as_kombu_does(twin) -> None:
    table = make(twin, BUFFER)
    data = json.dumps({'task_id': 'e', 'status': 'SUCCESS', 'result': 'caf\u00e9'}, ensure_ascii=False)
    assert table.deliver_body('e', JSON, '', data.encode('utf-8')) is True
    assert table.meta('e')['result'] == 'caf\u00e9'
