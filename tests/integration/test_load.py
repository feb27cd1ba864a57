"""Load on the real broker: many threads on one backend, 100,000 results from
four publisher processes, a thousand concurrent ``get()`` calls.

Results are published as a Celery worker publishes them (raw py-amqp, Celery's JSON body and
properties), never through rpcresults, so only the consuming side is under test. Each test
checks that every waiter got exactly its own values, each once, and that the backend's
counters agree with what was published. Every wait is bounded; nothing asserts on timings.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import uuid
from datetime import datetime, timezone
from typing import Any, Iterable, List, Tuple

import amqp

from rpcresults import ResultSet
from tests.conftest import new_id
from tests.helpers import Call, bound, raw_connection, wait_until

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# -- publishing as a worker ------------------------------------------------------------------
def result_body(task_id: str, value: Any, date_done: str) -> bytes:
    """Celery's rpc:// body for a SUCCESS of ``task_id`` (keys in Celery's order)."""
    return json.dumps({'status': 'SUCCESS', 'result': value, 'traceback': None, 'children': [],
                       'date_done': date_done, 'task_id': task_id}).encode('utf-8')


def publish_results(channel: Any, queue: str, pairs: Iterable[Tuple[str, Any]]) -> int:
    """Publish a SUCCESS for each ``(task_id, value)`` to ``queue`` as Celery's worker does."""
    date_done = datetime.now(timezone.utc).isoformat()
    publish = channel.basic_publish
    count = 0
    for task_id, value in pairs:
        message = amqp.Message(result_body(task_id, value, date_done), correlation_id=task_id,
                               content_type='application/json', content_encoding='utf-8',
                               application_headers={}, delivery_mode=1, priority=0)
        publish(message, exchange='', routing_key=queue)
        count += 1
    return count


def numbered_id(base: int, n: int) -> str:
    """Task id number ``n`` of a run (UUID-shaped; a publisher process rebuilds it from ``base``)."""
    return str(uuid.UUID(int=(base + n) % (1 << 128)))


def publish_slice(broker_url: str, queue: str, base: int, first: int, total: int, step: int) -> None:
    """Body of a publisher process: results ``first, first+step, ...`` below ``total`` (value = n),
    newest first so each process publishes against member order, over its own connection."""
    connection = raw_connection(broker_url)
    try:
        numbers = range(first, total, step)[::-1]
        publish_results(connection.channel(), queue, ((numbered_id(base, n), n) for n in numbers))
    finally:
        connection.close()  # after the broker has read every frame sent before it


def start_publisher(broker_url: str, queue: str, base: int, first: int, total: int,
                    step: int) -> subprocess.Popen:
    code = ('import sys; from tests.integration.test_load import publish_slice; '
            'publish_slice(sys.argv[1], sys.argv[2], *map(int, sys.argv[3:]))')
    return subprocess.Popen([sys.executable, '-c', code, broker_url, queue, str(base), str(first),
                             str(total), str(step)], cwd=REPO_ROOT)


# -- 64 threads x 200 results on one backend --------------------------------------------------
SHARED_THREADS = 64
SHARED_EACH = 200


def test_64_threads_on_one_backend_each_get_exactly_their_own(app, client, raw):
    """Every thread joins its own 200 on the shared backend and sees each of its ids once,
    while the replies of all 64 arrive interleaved in one queue."""
    client.result_consumer.start()
    ids = {k: [new_id() for _ in range(SHARED_EACH)] for k in range(SHARED_THREADS)}
    ready = threading.Barrier(SHARED_THREADS + 1)

    def run(k: int) -> Tuple[List[Any], List[Tuple[str, Any]]]:
        results = [bound(client, task_id) for task_id in ids[k]]
        client.add_pending_results(results)  # tracked before anything is published
        ready.wait(timeout=60)
        arrivals: List[Tuple[str, Any]] = []
        mode = k % 3  # three ways to wait, all sharing one drainer
        if mode == 0:
            return ResultSet(results, app=app).join_native(timeout=120), arrivals
        if mode == 1:
            ResultSet(results, app=app).join_native(timeout=120, callback=lambda i, v: arrivals.append((i, v)))
            values = dict(arrivals)
            return [values.get(task_id) for task_id in ids[k]], arrivals
        return [result.get(timeout=120) for result in results], arrivals

    calls = [Call(lambda k=k: run(k), name=f'shared-{k}') for k in range(SHARED_THREADS)]
    for call in calls:
        call.start()
    ready.wait(timeout=60)
    order = [(ids[k][n], f'{k}:{n}') for k in range(SHARED_THREADS) for n in range(SHARED_EACH)]
    random.Random(4).shuffle(order)
    publish_results(raw.channel(), client.oid, order)

    for k, call in enumerate(calls):
        values, arrivals = call.result(timeout=180)
        assert values == [f'{k}:{n}' for n in range(SHARED_EACH)], f'thread {k} got values not its own'
        if k % 3 == 1:  # the callback hears each of its ids exactly once
            assert sorted(task_id for task_id, _ in arrivals) == sorted(ids[k])
    total = SHARED_THREADS * SHARED_EACH
    stats = client.stats()
    assert stats['received'] == total
    assert stats['dispatched'] == total
    assert stats['duplicates'] == 0
    assert stats['buffered'] == 0 and stats['evicted'] == 0  # nothing arrived for an untracked id
    assert stats['malformed_dropped'] == 0
    assert stats['reconnects'] == 0


# -- 100,000 results from 4 publisher processes -------------------------------------------------
PUBLISHERS = 4
TOTAL = 100_000


def test_100k_results_from_4_publisher_processes_joined_while_published(app, client, broker_url, raw):
    """join_native, started before the publishers, returns all 100,000 values in member order,
    each received once; the reply queue is empty afterwards."""
    base = uuid.uuid4().int
    members = [bound(client, numbered_id(base, n)) for n in range(TOTAL)]
    client.add_pending_results(members)
    client.result_consumer.start()
    join = Call(lambda: ResultSet(members, app=app).join_native(timeout=300), name='join-100k')
    join.start()
    publishers = [start_publisher(broker_url, client.oid, base, k, TOTAL, PUBLISHERS)
                  for k in range(PUBLISHERS)]
    try:
        codes = [p.wait(timeout=300) for p in publishers]
    finally:
        for p in publishers:
            if p.poll() is None:
                p.kill()
                p.wait(10)
    assert codes == [0] * PUBLISHERS
    values = join.result(timeout=300)
    assert len(values) == TOTAL
    missing = [n for n, value in enumerate(values) if value != n]
    assert not missing, f'{len(missing)} members got a wrong or no value, first at {missing[:5]}'
    stats = client.stats()
    assert stats['received'] == TOTAL
    assert stats['dispatched'] == TOTAL
    assert stats['duplicates'] == 0
    assert stats['buffered'] == 0 and stats['evicted'] == 0
    assert stats['reconnects'] == 0
    channel = raw.channel()
    assert channel.queue_declare(client.oid, passive=True).message_count == 0


# -- 1,000 concurrent get() calls -------------------------------------------------------------
GETTERS = 1000


def test_1000_concurrent_gets_each_receive_their_own(client, raw):
    """A thousand threads blocked in get() on one backend while their results arrive in random
    order: each returns its own value."""
    client.result_consumer.start()
    ids = [new_id() for _ in range(GETTERS)]
    previous = threading.stack_size(512 * 1024)  # 1,000 threads: keep each stack small
    try:
        calls = [Call(lambda task_id=task_id: bound(client, task_id).get(timeout=180), name=f'get-{n}')
                 for n, task_id in enumerate(ids)]
        for call in calls:
            call.start()
    finally:
        threading.stack_size(previous)
    # every get() is waiting (its id tracked by a live result) before anything is published
    wait_until(lambda: client.stats()['tracked'] >= GETTERS, timeout=120, what='1,000 waiting get() calls')
    order = list(enumerate(ids))
    random.Random(7).shuffle(order)
    publish_results(raw.channel(), client.oid, ((task_id, n) for n, task_id in order))
    for n, call in enumerate(calls):
        assert call.result(timeout=180) == n
    stats = client.stats()
    assert stats['received'] == GETTERS
    assert stats['dispatched'] == GETTERS
    assert stats['buffered'] == 0 and stats['duplicates'] == 0
    # a wait is closed only after its wake-up event left the reader election (detach, then close)
    assert stats['waits'] == 0, 'a finished get() left its wait (and wake-up event) behind'

