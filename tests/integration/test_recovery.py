"""Faults and recovery against the real broker.

The shared RabbitMQ is never stopped or reconfigured: a client whose broker
URL goes through a TcpProxy of the test's own (tests/proxy.py) has its
connection cut there, while results are published by a worker backend on the
direct URL. Queues touched here are the tests' own reply queues only.

Nothing here can hang: every wait is bounded (``get``/``join`` timeouts,
bounded polls, thread joins with a timeout, a forked child that is killed if
it does not report back), and no assertion depends on elapsed time.
"""
from __future__ import annotations

import json
import os
import select
import threading
import time
import traceback
from typing import Any, Callable, Dict, Iterator, List, Optional

import pytest

from rpcresults import App, AsyncResult, ResultSet, states
from rpcresults.exceptions import ReplyQueueLost, TimeoutError

from ..conftest import make_app, new_id
from ..proxy import TcpProxy
from tests.helpers import Call, attach_waiter, bound, queue_counts, reap, started_listener, wait_until


# -- helpers ---------------------------------------------------------------------------------
def publish(worker: Any, oid: str, pairs: Any) -> None:
    """Publish SUCCESS ``value`` for each ``(task_id, value)`` to reply queue ``oid``."""
    for task_id, value in pairs:
        worker.mark_as_done(task_id, value, request={'reply_to': oid, 'correlation_id': task_id})


def round_trip(client: Any, worker: Any, value: Any = 'ping') -> Any:
    """Declare and consume the reply queue (if not yet), publish one result, get it."""
    client.result_consumer.start()
    task_id = new_id()
    publish(worker, client.oid, [(task_id, value)])
    return bound(client, task_id).get(timeout=15)


# -- fixtures --------------------------------------------------------------------------------
@pytest.fixture
def proxied_app(proxy: TcpProxy, broker_url: str) -> Iterator[Callable[..., App]]:
    """Factory of apps whose broker URL goes through ``proxy`` (no heartbeats); closed after."""
    apps: List[App] = []

    def factory(**conf: Any) -> App:
        conf.setdefault('broker_heartbeat', 0)
        application = make_app(proxy.url_for(broker_url), **conf)
        apps.append(application)
        return application

    yield factory
    for application in apps:
        application.close()


# -- connection cut mid-join -----------------------------------------------------------------
N_JOIN = 20000  # two cuts while 20,000 results drain
FIRST_CUT, SECOND_CUT = 4000, 12000
STAGES = [(0, 8000), (8000, 16000), (16000, N_JOIN)]


class Gate:
    """``on_message`` that holds the reading thread at chosen counts until the test releases it,
    so a cut lands while the broker has pushed results the client has not read (or acked) yet."""

    def __init__(self, points: Any) -> None:
        self.count = 0
        self.reached = {point: threading.Event() for point in points}
        self.released = {point: threading.Event() for point in points}

    def __call__(self, meta: Dict[str, Any]) -> None:
        self.count += 1
        if self.count in self.reached:
            self.reached[self.count].set()
            self.released[self.count].wait(60)

    def wait(self, point: int, timeout: float) -> None:
        assert self.reached[point].wait(timeout), f'the reader never got to result {point}'

    def release(self, point: Optional[int] = None) -> None:
        for key, event in self.released.items():
            if point is None or key == point:
                event.set()


@pytest.mark.parametrize('mode', ['join_native', 'iter_native'])
def test_cut_twice_mid_join_loses_and_duplicates_nothing(mode, proxy, proxied_app, worker):
    app = proxied_app()
    client = app.backend
    assert round_trip(client, worker) == 'ping'
    base_received = client.stats()['received']

    ids = [new_id() for _ in range(N_JOIN)]
    values = [{'n': n, 'id': task_id} for n, task_id in enumerate(ids)]
    resultset = ResultSet([bound(client, task_id) for task_id in ids], app=app)
    gate = Gate([FIRST_CUT, SECOND_CUT])

    def collect() -> Any:
        if mode == 'join_native':
            return resultset.join_native(timeout=60, on_message=gate)
        return [(task_id, meta['status'], meta['result'])
                for task_id, meta in resultset.iter_native(timeout=60, on_message=gate)]

    # published in stages, so each cut happens while the join still has results to come, and
    # while results delivered by the broker are unread (and unacked) on the client's side
    publish(worker, client.oid, zip(ids[:STAGES[0][1]], values[:STAGES[0][1]]))
    call = Call(collect, name=f'{mode}-thread')
    call.start()
    try:
        for point, (start, stop) in zip((FIRST_CUT, SECOND_CUT), STAGES[1:]):
            gate.wait(point, 30)
            assert client.stats()['received'] - base_received >= point
            # the link goes dead: the next results leave the broker but never reach the client
            assert proxy.stall() >= 1
            publish(worker, client.oid, zip(ids[start:stop], values[start:stop]))
            wait_until(proxy.held, 30, 'results in flight on the dead link')
            assert proxy.cut() >= 1
            gate.release(point)
        got = call.result(timeout=90)
    finally:
        gate.release()

    if mode == 'join_native':
        assert got == values  # every value, in member order
    else:
        yielded_ids = [task_id for task_id, _, _ in got]
        assert len(yielded_ids) == N_JOIN
        assert len(set(yielded_ids)) == N_JOIN, 'an id was yielded more than once'
        assert set(yielded_ids) == set(ids)
        by_id = dict(zip(ids, values))
        assert all(status == states.SUCCESS and result == by_id[task_id] for task_id, status, result in got)
    assert gate.count == N_JOIN  # each id reached its waiter exactly once

    stats = client.stats()
    assert stats['reconnects'] >= 2
    assert proxy.accepted >= 3
    assert stats['received'] - base_received >= N_JOIN
    # and the connection it ended on still works
    assert round_trip(client, worker, 'after') == 'after'


# -- a single get() across a cut ---------------------------------------------------------------
@pytest.mark.parametrize('publish_when', ['at_once', 'after_reconsume'])
def test_get_waiting_across_a_cut_receives_result_published_after_it(publish_when, proxy, proxied_app,
                                                                      worker, raw):
    app = proxied_app()
    client = app.backend
    assert round_trip(client, worker) == 'ping'
    result = bound(client, new_id())
    seen = threading.Event()
    call = Call(lambda: result.get(timeout=30, on_message=started_listener(seen)), name='get-thread')
    call.start()
    attach_waiter(client, worker, result.id, seen)

    assert proxy.cut() == 1
    if publish_when == 'after_reconsume':
        wait_until(lambda: client.stats()['reconnects'] >= 1, 20, 'the client to notice the cut')
        wait_until(lambda: proxy.accepted >= 2 and (queue_counts(raw, client.oid) or (0, 0))[1] == 1,
                   20, 'the client to consume its reply queue again', interval=0.02)
    publish(worker, client.oid, [(result.id, 'after-the-cut')])

    assert call.result(timeout=40) == 'after-the-cut'
    assert client.stats()['reconnects'] >= 1
    assert proxy.accepted >= 2


# -- results published while the client is disconnected -----------------------------------------
def test_results_published_while_disconnected_are_not_lost(proxy, proxied_app, worker, raw):
    app = proxied_app()
    client = app.backend
    assert round_trip(client, worker) == 'ping'

    assert proxy.cut() == 1
    # the broker has dropped our consumer: nobody reads the reply queue now
    wait_until(lambda: queue_counts(raw, client.oid) == (0, 0), 20, 'the consumer to be gone', interval=0.02)
    ids = [new_id() for _ in range(100)]
    publish(worker, client.oid, ((task_id, n) for n, task_id in enumerate(ids)))
    wait_until(lambda: queue_counts(raw, client.oid) == (100, 0), 20, '100 results waiting in the queue',
               interval=0.02)

    received_before = client.stats()['received']
    values = ResultSet([bound(client, task_id) for task_id in ids], app=app).join_native(timeout=30)
    assert values == list(range(100))
    stats = client.stats()
    assert stats['reconnects'] >= 1
    assert stats['received'] - received_before >= 100
    assert queue_counts(raw, client.oid) == (0, 1)  # all acked, consumed again


# -- reply queue deleted while results are pending ------------------------------------------------
def test_reply_queue_deleted_while_pending_raises_reply_queue_lost(client, worker, raw):
    assert round_trip(client, worker) == 'ping'
    results = [bound(client, new_id()) for _ in range(3)]
    for result in results:
        client.add_pending_result(result)
    waited = results[0]
    seen = threading.Event()
    call = Call(lambda: waited.get(timeout=20, on_message=started_listener(seen)), name='get-thread')
    call.start()
    attach_waiter(client, worker, waited.id, seen)
    assert queue_counts(raw, client.oid) is not None

    channel = raw.channel()
    channel.queue_delete(client.oid)
    channel.close()

    _, error = call.outcome(timeout=25)
    assert not isinstance(error, TimeoutError), 'the get timed out instead of reporting the lost queue'
    assert isinstance(error, ReplyQueueLost), f'expected ReplyQueueLost, got {error!r}'
    assert waited.id in error.task_ids
    assert client.stats()['queues_lost'] >= 1

    # results[1] was pending too, with nobody waiting: its next wait is told of the loss, once
    with pytest.raises(ReplyQueueLost) as lost:
        results[1].get(timeout=15)
    assert lost.value.task_ids == (results[1].id,)

    # the queue is back and consumed; results published to it now arrive (waiting again is allowed)
    info = wait_until(lambda: queue_counts(raw, client.oid), 10, 'the reply queue to be re-declared')
    assert info[1] == 1
    publish(worker, client.oid, [(results[1].id, 'second'), (waited.id, 'again')])
    assert results[1].get(timeout=15) == 'second'
    assert waited.get(timeout=15) == 'again'


# -- reply queue expired while the client could not connect ---------------------------------------
def test_reply_queue_expired_while_disconnected_raises_reply_queue_lost(proxy, proxied_app, worker, raw):
    app = proxied_app(result_reply_queue_expires=1)  # x-expires = 1000 ms
    client = app.backend
    assert round_trip(client, worker) == 'ping'
    result = bound(client, new_id())
    other = bound(client, new_id())
    seen = threading.Event()
    call = Call(lambda: result.get(timeout=30, on_message=started_listener(seen)), name='get-thread')
    call.start()
    attach_waiter(client, worker, result.id, seen)

    proxy.pause()  # keep the client out ...
    assert proxy.cut() == 1
    # ... until its queue expired (a passive declare restarts the expiry timer: poll slower than it)
    gone = False
    for _ in range(10):
        time.sleep(1.5)
        if queue_counts(raw, client.oid) is None:
            gone = True
            break
    assert gone, 'the reply queue did not expire'
    assert call.is_alive(), f'the get ended while the client was kept out: {call.error!r}'
    assert proxy.refused >= 1  # the client did try to come back meanwhile
    proxy.resume()

    _, error = call.outcome(timeout=40)
    assert isinstance(error, ReplyQueueLost), f'expected ReplyQueueLost, got {error!r}'
    assert result.id in error.task_ids
    stats = client.stats()
    assert stats['queues_lost'] >= 1
    assert stats['reconnects'] >= 1

    # the re-declared queue works
    assert queue_counts(raw, client.oid) is not None
    publish(worker, client.oid, [(other.id, 'later')])
    assert other.get(timeout=15) == 'later'


# -- fork ------------------------------------------------------------------------------------
def _send(fd: int, message: Dict[str, Any]) -> None:
    data = (json.dumps(message) + '\n').encode()
    while data:
        data = data[os.write(fd, data):]


class _Lines:
    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buffer = b''

    def read(self, timeout: float) -> Dict[str, Any]:
        deadline = time.monotonic() + timeout
        while b'\n' not in self.buffer:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f'no message from the child within {timeout} s'
            ready, _, _ = select.select([self.fd], [], [], remaining)
            if ready:
                chunk = os.read(self.fd, 65536)
                assert chunk, 'the child closed its pipe without reporting'
                self.buffer += chunk
        line, self.buffer = self.buffer.split(b'\n', 1)
        return json.loads(line)


def _child(app: App, write_fd: int, parent_probe_id: str) -> None:
    """Runs in the forked child; reports to the parent, never returns."""
    code = 1
    report: Dict[str, Any] = {'phase': 'done'}
    try:
        report['thread_oid'] = app.thread_oid
        backend = app.backend
        report['backend_oid'] = backend.oid
        child_worker = app.create_backend()
        backend.result_consumer.start()
        task_id = new_id()
        publish(child_worker, backend.oid, [(task_id, 'child-value')])
        report['round_trip'] = AsyncResult(task_id, backend=backend, app=app).get(timeout=15)
        report['received_after_round_trip'] = backend.stats()['received']
        stop_id = new_id()
        _send(write_fd, {'phase': 'ready', 'oid': backend.oid, 'stop_id': stop_id})
        # consume (wait) while the parent gets a result of its own, until the parent says stop
        report['stop'] = AsyncResult(stop_id, backend=backend, app=app).get(timeout=30)
        report['received_final'] = backend.stats()['received']
        report['probe_status'] = backend.result_consumer.lookup(parent_probe_id)['status']
        child_worker.close()
        backend.close()
        code = 0
    except BaseException:
        report['error'] = traceback.format_exc()
    finally:
        try:
            _send(write_fd, report)
        finally:
            os._exit(code)


def test_fork_child_gets_new_oid_and_never_parent_results(app, client, worker):
    assert round_trip(client, worker, 'parent-before') == 'parent-before'
    parent_thread_oid = app.thread_oid
    parent_backend_oid = client.oid
    probe_id = new_id()

    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover  (the child)
        os.close(read_fd)
        _child(app, write_fd, probe_id)
    os.close(write_fd)
    lines = _Lines(read_fd)
    try:
        ready = lines.read(timeout=30)
        assert ready['phase'] == 'ready', ready
        # a result for the parent while the child consumes: only the parent gets it
        publish(worker, client.oid, [(probe_id, 'parent-value')])
        assert bound(client, probe_id).get(timeout=15) == 'parent-value'
        publish(worker, ready['oid'], [(ready['stop_id'], 'stop')])
        report = lines.read(timeout=40)
    finally:
        child_status = reap(pid, 20)
        os.close(read_fd)

    assert 'error' not in report, report.get('error')
    assert child_status is not None and os.waitstatus_to_exitcode(child_status) == 0
    assert report['thread_oid'] != parent_thread_oid
    assert report['backend_oid'] != parent_backend_oid
    assert ready['oid'] == report['backend_oid']
    assert report['round_trip'] == 'child-value'
    assert report['stop'] == 'stop'
    assert report['received_final'] == report['received_after_round_trip'] + 1
    assert report['probe_status'] == states.PENDING

    # the parent is untouched: same identity, and its connection still works
    assert app.thread_oid == parent_thread_oid
    assert client.oid == parent_backend_oid
    assert app.backend is client
    assert round_trip(client, worker, 'parent-after') == 'parent-after'


# -- many threads ----------------------------------------------------------------------------
N_THREADS = 32
PER_THREAD = 100


def test_many_threads_each_with_its_own_backend(app, worker):
    oids: Dict[int, str] = {}
    barrier = threading.Barrier(N_THREADS)

    def run(k: int) -> List[Any]:
        try:
            backend = app.backend  # this thread's own
            oids[k] = backend.oid
            backend.result_consumer.start()
            ids = [new_id() for _ in range(PER_THREAD)]
            results = [app.AsyncResult(task_id) for task_id in ids]
            barrier.wait(timeout=30)
            publish(worker, backend.oid, ((task_id, f'{k}:{n}') for n, task_id in enumerate(ids)))
            return ResultSet(results, app=app).join_native(timeout=60)
        finally:
            app.close()

    calls = [Call(lambda k=k: run(k), name=f'own-{k}') for k in range(N_THREADS)]
    for call in calls:
        call.start()
    for k, call in enumerate(calls):
        assert call.result(timeout=90) == [f'{k}:{n}' for n in range(PER_THREAD)]
    assert len(set(oids.values())) == N_THREADS
    assert app.thread_oid not in oids.values()


def test_many_threads_sharing_one_backend(app, client, worker):
    client.result_consumer.start()
    ids = {k: [new_id() for _ in range(PER_THREAD)] for k in range(N_THREADS)}
    barrier = threading.Barrier(N_THREADS + 1)

    def run(k: int) -> List[Any]:
        results = [bound(client, task_id) for task_id in ids[k]]
        barrier.wait(timeout=30)
        return ResultSet(results, app=app).join_native(timeout=60)

    calls = [Call(lambda k=k: run(k), name=f'shared-{k}') for k in range(N_THREADS)]
    for call in calls:
        call.start()
    barrier.wait(timeout=30)
    # interleaved: every thread's results arrive mixed with everybody else's
    publish(worker, client.oid, ((ids[k][n], f'{k}:{n}') for n in range(PER_THREAD) for k in range(N_THREADS)))
    for k, call in enumerate(calls):
        assert call.result(timeout=90) == [f'{k}:{n}' for n in range(PER_THREAD)]
    assert client.stats()['received'] >= N_THREADS * PER_THREAD


# -- a broker outage longer than the wait -----------------------------------------------------------
def test_wait_during_an_outage_ends_with_its_timeout_not_the_retry_budget(proxy, proxied_app, worker):
    """Reconnecting is bounded by the waiter's deadline (else ~100 retries); the next wait tries again."""
    app = proxied_app()
    client = app.backend
    assert round_trip(client, worker) == 'ping'
    pending = bound(client, new_id())
    proxy.pause()
    proxy.cut()
    call = Call(lambda: pending.get(timeout=2), name='get-during-outage')
    call.start()
    _, error = call.outcome(timeout=60)  # a hang guard, not a timing: the retry budget is minutes
    assert error is not None, 'get() returned a value while no broker could be reached'
    proxy.resume()
    publish(worker, client.oid, [(pending.id, 'after')])
    assert pending.get(timeout=20) == 'after'
    assert client.stats()['reconnects'] >= 1
