"""Memory stays bounded: replies nobody waits for, and waits that time out.

* 50,000 replies for ids nobody holds a result for, with ``result_buffer_max=10000``: the
  early-arrival buffer never holds more than the bound, evictions are counted and logged
  (rate-limited), and a ``get()`` for an evicted id raises ResultEvicted naming it instead of
  waiting. Checked on both state-table twins in-process and once per CI pass on the broker.
* 10,000 timed-out waits (``get(timeout=0)`` one by one, and one 10,000-member join that times
  out) leave no tracked id, no waiter and no wake-up event behind, and the memory they leave
  grows by a few bytes per wait at most (tracemalloc, 1,000 vs 10,000 waits).

Results are published raw (py-amqp, Celery's format); nothing asserts on timings.
"""
from __future__ import annotations

import gc
import json
import logging
import tracemalloc
import weakref
from datetime import datetime, timezone
from typing import Any, Iterable, List, Tuple

import amqp
import pytest

from rpcresults import ResultSet, protocol
from rpcresults.exceptions import ResultEvicted, TimeoutError
from tests.conftest import make_app, new_id
from tests.helpers import bound

pytestmark = pytest.mark.twins  # the bounds hold on the twin this pass selected, and on both tables

BUFFER_MAX = 10_000
FLOOD = 50_000
EVICTED = FLOOD - BUFFER_MAX


# -- helpers ---------------------------------------------------------------------------------
def result_body(task_id: str, value: Any) -> bytes:
    """Celery's rpc:// body for a SUCCESS of ``task_id``."""
    return json.dumps({'status': 'SUCCESS', 'result': value, 'traceback': None, 'children': [],
                       'date_done': datetime.now(timezone.utc).isoformat(), 'task_id': task_id}).encode()


def publish_results(channel: Any, queue: str, pairs: Iterable[Tuple[str, Any]]) -> None:
    """Publish a SUCCESS for each ``(task_id, value)`` to ``queue`` as Celery's worker does."""
    for task_id, value in pairs:
        channel.basic_publish(amqp.Message(result_body(task_id, value), correlation_id=task_id,
                                           content_type='application/json', content_encoding='utf-8'),
                              exchange='', routing_key=queue)


def eviction_warnings(caplog: pytest.LogCaptureFixture) -> List[logging.LogRecord]:
    return [r for r in caplog.records
            if r.name == 'rpcresults.state' and r.levelno == logging.WARNING and 'evict' in r.getMessage()]


def live_waiters(module: Any = protocol) -> int:
    """How many ``Waiter`` objects of ``module``'s twin exist right now."""
    gc.collect()
    kind = module.Waiter
    return sum(1 for obj in gc.get_objects() if type(obj) is kind)


class Owner:
    """Stands in for a result object: the table tracks an id while its owner lives."""


@pytest.fixture
def bounded_app(broker_url: str):
    application = make_app(broker_url, result_buffer_max=BUFFER_MAX)
    yield application
    application.close()


# -- 50,000 replies nobody waits for ----------------------------------------------------------
def test_unwaited_flood_stays_within_the_bound_on_both_twins(twin, caplog):
    """The table alone (no broker): the bound holds at every point of the flood."""
    module = twin.table
    table = module.StateTable(decode=lambda body, ctype, cenc: json.loads(body), buffer_max=BUFFER_MAX)
    ids = [new_id() for _ in range(FLOOD)]
    biggest = 0
    with caplog.at_level(logging.WARNING, logger='rpcresults.state'):
        for n, task_id in enumerate(ids):
            table.deliver_body(task_id, 'application/json', 'utf-8', result_body(task_id, n))
            if n % 1000 == 0:
                biggest = max(biggest, table.counters()['buffer_size'])
    counters = table.counters()
    assert max(biggest, counters['buffer_size']) <= BUFFER_MAX
    assert counters['buffer_size'] == BUFFER_MAX
    assert counters['received'] == counters['buffered'] == FLOOD
    assert counters['evicted'] == EVICTED
    assert counters['tracked'] == 0
    warnings = eviction_warnings(caplog)
    assert warnings, 'evictions must be logged'
    assert len(warnings) <= EVICTED // 100, 'the eviction warning must be rate-limited, not one per reply'
    for task_id in (ids[0], ids[EVICTED // 2], ids[EVICTED - 1]):  # the oldest went first
        with pytest.raises(ResultEvicted) as info:
            table.meta(task_id)
        assert info.value.task_ids == (task_id,) and task_id in str(info.value)
    assert table.meta(ids[EVICTED])['result'] == EVICTED  # the newest BUFFER_MAX are kept
    assert table.meta(ids[-1])['result'] == FLOOD - 1
    owner = Owner()
    table.track(ids[0], owner)  # a result made for an evicted id learns it at once
    assert isinstance(table.meta(ids[0]), ResultEvicted)


def test_unwaited_flood_on_the_broker_is_bounded_and_evicted_ids_fail_fast(bounded_app, raw, caplog):
    """The real path: 50,000 replies in the reply queue, drained by one unrelated get()."""
    client = bounded_app.backend
    client.result_consumer.start()
    ids = [new_id() for _ in range(FLOOD)]
    publish_results(raw.channel(), client.oid, ((task_id, n) for n, task_id in enumerate(ids)))
    sentinel = bound(client, new_id())
    client.add_pending_result(sentinel)
    publish_results(raw.channel(), client.oid, [(sentinel.id, 'after the flood')])
    with caplog.at_level(logging.WARNING, logger='rpcresults.state'):
        assert sentinel.get(timeout=120) == 'after the flood'  # the queue is FIFO: the flood came first
    stats = client.stats()
    assert stats['received'] == FLOOD + 1
    assert stats['buffer_size'] == BUFFER_MAX
    assert stats['evicted'] == EVICTED
    assert stats['reconnects'] == 0
    assert eviction_warnings(caplog)

    for task_id in (ids[0], ids[EVICTED - 1]):
        with pytest.raises(ResultEvicted) as info:  # raised from what is known, not a TimeoutError
            bound(client, task_id).get(timeout=30)
        assert task_id in info.value.task_ids and task_id in str(info.value)
    assert bound(client, ids[EVICTED]).get(timeout=30) == EVICTED
    assert bound(client, ids[-1]).get(timeout=30) == FLOOD - 1
    assert client.stats()['buffer_size'] == BUFFER_MAX - 2  # the two claimed replies left the buffer


# -- 10,000 waits that time out ---------------------------------------------------------------
MEMO_BUFFER = 100       # keeps the table's memo of abandoned ids small (10 x, at least 1,024 ids)
WARM_UP = 2_000         # past the memo's bound, so what the memo holds no longer grows
FIRST, TOTAL = 1_000, 10_000
BYTES_PER_WAIT = 48     # a leaked id string alone is ~85 bytes; a waiter with its deque ~700


def test_timed_out_waits_leave_nothing_in_the_table_on_both_twins(twin):
    """The table alone: watch, then unwatch (what a timeout does), then drop the result."""
    module = twin.table
    table = module.StateTable(decode=lambda body, ctype, cenc: json.loads(body), buffer_max=MEMO_BUFFER)
    refs = []
    for _ in range(TOTAL):
        task_id, owner, waiter = new_id(), Owner(), module.Waiter()
        table.track(task_id, owner)
        table.watch(waiter, [task_id])
        table.unwatch(waiter, [task_id])
        refs.append(weakref.ref(waiter))
        del owner, waiter
    gc.collect()
    table.pending_ids()  # any operation reaps the collected owners
    assert table.counters()['tracked'] == 0
    assert not any(ref() is not None for ref in refs), 'the table kept a waiter after unwatch'
    assert live_waiters(module) == 0


def test_10000_timed_out_gets_leave_nothing_behind(broker_url):
    """get(timeout=0) that times out, 10,000 times: no tracked id, no waiter, no wake-up event,
    and memory after 10,000 waits within a few bytes per wait of memory after 1,000."""
    application = make_app(broker_url, result_buffer_max=MEMO_BUFFER)
    try:
        client = application.backend
        client.result_consumer.start()
        base_waiters = live_waiters()

        def time_out(count: int) -> None:
            for _ in range(count):
                with pytest.raises(TimeoutError):
                    bound(client, new_id()).get(timeout=0)

        time_out(WARM_UP)
        gc.collect()
        tracemalloc.start()
        try:
            time_out(FIRST)
            gc.collect()
            after_first, _ = tracemalloc.get_traced_memory()
            time_out(TOTAL - FIRST)
            gc.collect()
            after_all, _ = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        growth = after_all - after_first
        assert growth <= (TOTAL - FIRST) * BYTES_PER_WAIT, (
            f'{growth} bytes more after {TOTAL} timed-out waits than after {FIRST}: '
            f'{growth / (TOTAL - FIRST):.0f} bytes per wait')
        client.result_consumer.table.pending_ids()  # reaps what was collected
        stats = client.stats()
        assert stats['tracked'] == 0
        assert live_waiters() <= base_waiters  # older ones may be collected meanwhile; none may be added
        assert stats['waits'] == 0  # closed, so their wake-up events left the reader election
    finally:
        application.close()


def test_join_of_10000_that_times_out_leaves_nothing_behind(app, client, raw):
    """One join over 10,000 members, a few of which arrive, times out: once the members are
    dropped nothing of them is tracked or waiting, and the backend still serves."""
    client.result_consumer.start()
    base_waiters = live_waiters()
    members = [bound(client, new_id()) for _ in range(TOTAL)]
    publish_results(raw.channel(), client.oid, ((r.id, n) for n, r in enumerate(members[:10])))
    with pytest.raises(TimeoutError):
        ResultSet(members, app=app).join_native(timeout=1)
    assert client.stats()['tracked'] == TOTAL  # alive members stay tracked: a later join may finish
    assert live_waiters() <= base_waiters
    refs = [weakref.ref(member) for member in members]
    del members
    gc.collect()
    assert not any(ref() is not None for ref in refs), 'a timed-out join kept its members alive'
    probe = bound(client, new_id())
    publish_results(raw.channel(), client.oid, [(probe.id, 'still serving')])
    assert probe.get(timeout=30) == 'still serving'
    stats = client.stats()
    assert stats['tracked'] <= 1  # the probe itself, while it lives
    assert stats['received'] == 11
    assert stats['waits'] == 0  # closed, so their wake-up events left the reader election
