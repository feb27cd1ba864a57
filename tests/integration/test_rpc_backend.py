"""RPCBackend and its ResultConsumer against the real RabbitMQ.

Every test talks to the shared broker for real: the reply queue's declaration is checked with raw
py-amqp (passive declares and re-declares that the broker must accept or refuse), results are
published by a second backend acting as the worker, and the client collects them through its own
consumer. Nothing of kombu or py-amqp is mocked.
"""
from __future__ import annotations

import builtins
import collections
import gc
import json
import os
import random
import threading
import time
from datetime import timedelta
from types import SimpleNamespace
from typing import Any, Callable, Dict, List, Optional, Tuple

import amqp
import kombu
import pytest

from rpcresults import AsyncResult, GroupResult, ResultSet, states
from rpcresults.backends.rpc import RPCBackend, ResultConsumer
from rpcresults.exceptions import BacklogLimitExceeded, ResultEvicted, TaskRevokedError, TimeoutError
from tests.helpers import closing_apps, queue_counts, report_from_child, wait_until
from tests.conftest import make_app, new_id, request_for

WAIT = 10.0  # generous upper bound for anything that should take milliseconds


class BillingError(Exception):
    """A user exception class that exists in the client process (found by module and name)."""


# -- helpers ----------------------------------------------------------------------------------------

def redeclare(conn: amqp.Connection, name: str, **kwargs: Any) -> Any:
    """Declare ``name`` again on a fresh channel (a refusal closes only that channel)."""
    channel = conn.channel()
    ok = channel.queue_declare(name, **kwargs)
    channel.close()
    return ok



def pump_until(backend: RPCBackend, predicate: Callable[[], bool], timeout: float = WAIT,
               what: str = 'replies') -> None:
    """Let ``backend``'s consumer read replies (blocking reads, no polling) until ``predicate()``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise AssertionError(f'gave up after {timeout} s waiting for {what}; stats={backend.stats()}')
        backend.result_consumer.drain_events(timeout=0.2)


def received_at_least(backend: RPCBackend, count: int) -> Callable[[], bool]:
    return lambda: backend.stats()['received'] >= count


def basic_get_wait(conn: amqp.Connection, queue: str) -> amqp.Message:
    channel = conn.channel()
    message = wait_until(lambda: channel.basic_get(queue, no_ack=True), what=f'a message in {queue}')
    return message




@pytest.fixture
def private_queue(raw: amqp.Connection) -> str:
    """A queue of the test's own (exclusive to the raw connection) to read published messages from."""
    name = f'rpcresults-test-{new_id()}'
    raw.channel().queue_declare(name, exclusive=True, auto_delete=True)
    return name


@pytest.fixture
def other_app(broker_url: str):
    """Factory of extra apps (own reply queues, own settings); closed after the test."""
    yield from closing_apps(lambda **conf: make_app(broker_url, **conf))


def expected_expires_ms(app: Any) -> int:
    value = app.conf.result_reply_queue_expires
    if isinstance(value, timedelta):
        value = value.total_seconds()
    return int(value * 1000)


# -- the reply queue --------------------------------------------------------------------------------
def test_reply_queue_is_durable_not_auto_delete_with_x_expires(app, client, raw):
    assert queue_counts(raw, client.oid) is None  # nothing declared before the consumer starts
    client.result_consumer.start()
    assert queue_counts(raw, client.oid) == (0, 1)

    ours = {'durable': True, 'auto_delete': False, 'exclusive': False,
            'arguments': {'x-expires': expected_expires_ms(app)}}
    assert expected_expires_ms(app) == 60_000
    ok = redeclare(raw, client.oid, **ours)
    assert ok.queue == client.oid and ok.consumer_count == 1

    different = [
        dict(ours, arguments={'x-expires': 59_000}),
        dict(ours, arguments={}),
        dict(ours, auto_delete=True),
        dict(ours, durable=False),
    ]
    for kwargs in different:
        with pytest.raises(amqp.exceptions.PreconditionFailed) as excinfo:
            redeclare(raw, client.oid, **kwargs)
        assert excinfo.value.code == 406, kwargs
        assert 'PRECONDITION_FAILED' in str(excinfo.value)
    # the refusals did not disturb the consumer
    assert queue_counts(raw, client.oid) == (0, 1)


@pytest.mark.parametrize('setting, expected_ms', [(17.5, 17_500), (timedelta(seconds=42), 42_000)])
def test_reply_queue_x_expires_follows_the_setting(other_app, raw, setting, expected_ms):
    application = other_app(result_reply_queue_expires=setting)
    backend = application.backend
    backend.result_consumer.start()
    redeclare(raw, backend.oid, durable=True, auto_delete=False, arguments={'x-expires': expected_ms})
    with pytest.raises(amqp.exceptions.PreconditionFailed):
        redeclare(raw, backend.oid, durable=True, auto_delete=False, arguments={'x-expires': 60_000})


def test_auto_delete_true_is_honoured(other_app, raw):
    application = other_app()
    backend = RPCBackend(application, auto_delete=True)
    try:
        assert backend.auto_delete is True
        backend.result_consumer.start()
        assert queue_counts(raw, backend.oid) == (0, 1)
        args = {'x-expires': expected_expires_ms(application)}
        redeclare(raw, backend.oid, durable=True, auto_delete=True, arguments=args)
        with pytest.raises(amqp.exceptions.PreconditionFailed):
            redeclare(raw, backend.oid, durable=True, auto_delete=False, arguments=args)
    finally:
        backend.close()
    # an auto-delete queue goes away with its last consumer
    wait_until(lambda: queue_counts(raw, backend.oid) is None, what='the auto-delete queue to vanish')


def test_default_queue_outlives_the_consumer_and_keeps_replies(app, client, worker, raw):
    """close() stops consuming; the queue (not auto-delete) keeps what arrives for the next consumer."""
    client.result_consumer.start()
    assert queue_counts(raw, client.oid) == (0, 1)
    client.close()
    wait_until(lambda: queue_counts(raw, client.oid) == (0, 0), what='the consumer to go away')

    tid = new_id()
    worker.mark_as_done(tid, 'kept for you', request=request_for(client, tid))
    wait_until(lambda: queue_counts(raw, client.oid) == (1, 0), what='the reply to wait in the queue')

    again = app.create_backend()  # same thread, same oid: the client coming back
    try:
        assert again.oid == client.oid
        assert AsyncResult(tid, backend=again).get(timeout=WAIT) == 'kept for you'
    finally:
        again.close()


def test_as_uri_and_native_join(app, client):
    assert client.as_uri() == 'rpc://'
    assert client.as_uri(include_password=False) == 'rpc://'
    assert RPCBackend.supports_native_join is True
    assert client.supports_native_join is True
    result = app.AsyncResult(new_id())
    assert result.supports_native_join is True
    assert ResultSet([result, app.AsyncResult(new_id())]).supports_native_join is True


def test_binding(app, client, broker_url, raw):
    queue = client.binding  # a property, as in Celery
    assert isinstance(queue, kombu.Queue)
    assert queue.name == client.oid
    assert queue.routing_key == client.oid
    assert queue.exchange.name == ''
    assert queue.durable is True
    assert queue.auto_delete is False
    assert queue.exclusive is False
    assert queue.expires == pytest.approx(60.0)

    with kombu.Connection(broker_url) as conn:
        channel = conn.channel()
        bound = client.binding(channel)
        assert bound.is_bound and bound.channel is channel
        bound.declare()
        assert queue_counts(raw, client.oid) == (0, 0)
        # what binding() declares is exactly what the consumer declares: no conflict either way
        client.result_consumer.start()
        assert queue_counts(raw, client.oid) == (0, 1)


def test_oid_and_backend_are_per_thread(app):
    main_oid = app.backend.oid
    assert app.backend.oid == main_oid
    assert app.backend is app.backend
    assert app.thread_oid == main_oid

    seen: Dict[int, Tuple[str, str, str, int]] = {}
    errors: List[BaseException] = []

    def in_thread(index: int) -> None:
        try:
            first = app.backend.oid
            seen[index] = (first, app.backend.oid, app.thread_oid, id(app.backend))
        except BaseException as exc:  # reported below
            errors.append(exc)
        finally:
            app.close()

    threads = [threading.Thread(target=in_thread, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
    assert not errors
    (a1, a2, a3, _), (b1, b2, b3, _) = seen[0], seen[1]
    assert a1 == a2 == a3
    assert b1 == b2 == b3
    assert len({a1, b1, main_oid}) == 3
    assert app.backend.oid == main_oid  # the main thread's backend is unchanged


# -- worker side: where results go ------------------------------------------------------------------
def test_destination_for_objects_and_mappings(worker):
    tid = new_id()
    assert worker.destination_for(tid, SimpleNamespace(reply_to='q1', correlation_id='c1')) == ('q1', 'c1')
    assert worker.destination_for(tid, SimpleNamespace(reply_to='q1', correlation_id=None)) == ('q1', tid)
    assert worker.destination_for(tid, {'reply_to': 'q2', 'correlation_id': 'c2'}) == ('q2', 'c2')
    assert worker.destination_for(tid, {'reply_to': 'q2'}) == ('q2', tid)
    with pytest.raises(RuntimeError, match=tid):
        worker.destination_for(tid, None)


def test_no_reply_to_publishes_nothing(worker):
    tid = new_id()
    assert worker.store_result(tid, 'ignored', states.SUCCESS, request={'correlation_id': tid}) == 'ignored'


def _incoming_request(kind: str, raw: amqp.Connection, broker_url: str, reply_to: str,
                      task_id: str, correlation_id: str) -> Any:
    """Publish a request (task protocol v2 shape) and read it back as the worker would see it."""
    queue = f'rpcresults-requests-{new_id()}'
    channel = raw.channel()
    channel.queue_declare(queue, auto_delete=False, arguments={'x-expires': 30_000})  # kombu reads it too
    channel.basic_publish(
        amqp.Message(json.dumps([[1, 2], {}, {'callbacks': None, 'errbacks': None, 'chain': None,
                                                'chord': None}]),
                     content_type='application/json', content_encoding='utf-8',
                     reply_to=reply_to, correlation_id=correlation_id,
                     application_headers={'task': 'proj.add', 'id': task_id}),
        exchange='', routing_key=queue)
    if kind == 'amqp':
        return basic_get_wait(raw, queue)
    conn = kombu.Connection(broker_url)
    try:
        bound = kombu.Queue(queue, no_declare=True)(conn.channel())
        return wait_until(lambda: bound.get(no_ack=True), what='the request via kombu')
    finally:
        conn.release()


@pytest.mark.parametrize('kind', ['amqp', 'kombu'])
def test_destination_for_the_incoming_message_itself(kind, app, client, worker, raw, broker_url):
    tid = new_id()
    message = _incoming_request(kind, raw, broker_url, reply_to=client.oid, task_id=tid, correlation_id=tid)
    assert isinstance(message, amqp.Message if kind == 'amqp' else kombu.Message)
    assert worker.destination_for(tid, message) == (client.oid, tid)

    other = _incoming_request(kind, raw, broker_url, reply_to='elsewhere', task_id=tid, correlation_id='cid-9')
    assert worker.destination_for(tid, other) == ('elsewhere', 'cid-9')

    result = app.AsyncResult(tid)
    assert result.state == states.PENDING  # tracks it and starts consuming: the queue exists now
    worker.mark_as_done(tid, {'answer': 42}, request=message)
    assert result.get(timeout=WAIT) == {'answer': 42}


def test_on_task_call_declares_the_reply_queue_before_any_consumer(app, client, worker, raw, broker_url):
    tid = new_id()
    assert queue_counts(raw, client.oid) is None
    with kombu.Connection(broker_url) as conn:
        producer = kombu.Producer(conn.channel())
        client.on_task_call(producer, tid)
        assert queue_counts(raw, client.oid) == (0, 0)  # declared, nobody consumes yet
        redeclare(raw, client.oid, durable=True, auto_delete=False,
                  arguments={'x-expires': expected_expires_ms(app)})

        worker.mark_as_done(tid, 'early bird', request=request_for(client, tid))
        wait_until(lambda: queue_counts(raw, client.oid) == (1, 0), what='the reply to wait in the queue')
    assert app.AsyncResult(tid).get(timeout=WAIT) == 'early bird'


def test_reply_properties_and_on_reply_declare(client):
    tid = new_id()
    assert client.reply_properties(tid) == {'reply_to': client.oid, 'correlation_id': tid}
    assert client.on_reply_declare(tid) is None


def test_on_out_of_band_result_is_kept_for_a_later_get(app, client):
    tid = new_id()
    client.on_out_of_band_result(tid, {'task_id': tid, 'status': states.SUCCESS, 'result': 'oob',
                                       'traceback': None, 'children': None, 'date_done': None})
    assert app.AsyncResult(tid).get(timeout=WAIT) == 'oob'


# -- get_task_meta ----------------------------------------------------------------------------------
def test_get_task_meta_pending_for_unknown(app, client):
    tid = new_id()
    meta = client.get_task_meta(tid)
    assert meta['status'] == states.PENDING
    assert meta.get('result') is None
    assert client.poll(tid)['status'] == states.PENDING
    assert client.get_state(tid) == states.PENDING
    assert app.AsyncResult(tid).state == states.PENDING


def test_get_task_meta_returns_the_newest_state(app, client, worker, raw, broker_url):
    tid = new_id()
    request = request_for(client, tid)
    with kombu.Connection(broker_url) as conn:
        client.on_task_call(kombu.Producer(conn.channel()), tid)
    worker.mark_as_started(tid, request=request, pid=4321, hostname='w1@box')
    worker.store_result(tid, {'current': 2, 'total': 3}, 'PROGRESS', request=request)
    wait_until(lambda: queue_counts(raw, client.oid) == (2, 0), what='two states waiting')

    # both unready states are read; the newer one (PROGRESS) must win
    meta = wait_until(lambda: (m := client.get_task_meta(tid))['status'] == 'PROGRESS' and m,
                      what='PROGRESS to be the newest state')
    assert meta['result'] == {'current': 2, 'total': 3}
    assert meta['task_id'] == tid

    worker.mark_as_done(tid, 'final', request=request)
    meta = wait_until(lambda: (m := client.get_task_meta(tid))['status'] in states.READY_STATES and m,
                      what='the final state')
    assert meta['status'] == states.SUCCESS
    assert meta['result'] == 'final'
    assert client.get_task_meta(tid)['status'] == states.SUCCESS  # stays final
    assert client.get_result(tid) == 'final'


def test_get_task_meta_started_then_success_keeps_success(client, worker, raw, broker_url):
    tid = new_id()
    request = request_for(client, tid)
    with kombu.Connection(broker_url) as conn:
        client.on_task_call(kombu.Producer(conn.channel()), tid)
    worker.mark_as_started(tid, request=request, pid=1, hostname='h')
    worker.mark_as_done(tid, 99, request=request)
    wait_until(lambda: queue_counts(raw, client.oid) == (2, 0), what='both states waiting')
    # a table that kept the oldest state would stay STARTED forever and time out here
    meta = wait_until(lambda: (m := client.get_task_meta(tid))['status'] == states.SUCCESS and m,
                      what='SUCCESS')
    assert meta['result'] == 99


def test_get_task_meta_raises_backlog_limit_exceeded(client, worker, raw, broker_url):
    wanted = new_id()
    others = [new_id() for _ in range(50)]
    with kombu.Connection(broker_url) as conn:
        client.on_task_call(kombu.Producer(conn.channel()), wanted)
    for index, tid in enumerate(others):
        worker.mark_as_done(tid, index, request=request_for(client, tid))
    wait_until(lambda: queue_counts(raw, client.oid) == (50, 0), what='50 replies waiting')

    deadline = time.monotonic() + WAIT
    raised: Optional[BacklogLimitExceeded] = None
    while raised is None:
        try:
            client.get_task_meta(wanted, backlog_limit=10)
        except BacklogLimitExceeded as exc:
            raised = exc
            break
        # only a read that found fewer than 10 replies in the socket may pass; all 50 must not
        assert client.stats()['received'] < 50, 'read all 50 replies without BacklogLimitExceeded'
        assert time.monotonic() < deadline, 'BacklogLimitExceeded never raised'
    assert wanted in str(raised) or wanted in raised.args

    # what was read on the way is kept: the others' results are there, the wanted one is pending
    meta = wait_until(lambda: (m := client.get_task_meta(others[0]))['status'] == states.SUCCESS and m,
                      what='the first other result')
    assert meta['result'] == 0
    pump_until(client, received_at_least(client, 50), what='all 50 replies')
    assert client.get_task_meta(wanted, backlog_limit=10)['status'] == states.PENDING
    assert client.get_task_meta(others[49])['result'] == 49


# -- the state table answers without anyone waiting --------------------------------------------------
@pytest.mark.smoke
def test_state_ready_completed_count_without_get(app, client, worker):
    tids = [new_id() for _ in range(20)]
    results = ResultSet([app.AsyncResult(tid) for tid in tids])
    assert not results.ready()
    assert results.completed_count() == 0
    assert results.waiting()

    for index, tid in enumerate(tids[:-1]):
        worker.mark_as_done(tid, index * 10, request=request_for(client, tid))
    worker.mark_as_failure(tids[-1], ValueError('broken', 7), request=request_for(client, tids[-1]))

    wait_until(results.ready, what='every member to be ready')
    assert results.completed_count() == 19
    assert results.failed()
    assert not results.successful()
    assert not results.waiting()
    for index, result in enumerate(results.results[:-1]):
        assert result.state == states.SUCCESS
        assert result.ready() and result.successful()
        assert result.result == index * 10
    assert results.results[-1].state == states.FAILURE
    assert isinstance(results.results[-1].result, ValueError)
    assert results.results[-1].result.args == ('broken', 7)


def test_unready_states_are_visible_without_get(app, client, worker):
    tid = new_id()
    result = app.AsyncResult(tid)
    assert result.state == states.PENDING and not result.exists()
    worker.mark_as_started(tid, request=request_for(client, tid), pid=77, hostname='w@h')
    wait_until(lambda: result.state == states.STARTED, what='STARTED')
    assert not result.ready()
    assert result.exists()
    assert result.info == {'pid': 77, 'hostname': 'w@h'}
    worker.mark_as_done(tid, 'ok', request=request_for(client, tid))
    wait_until(result.ready, what='the result to be ready')
    assert result.state == states.SUCCESS
    assert result.result == 'ok'


def test_early_arrivals_reach_a_later_get(app, client, worker):
    client.result_consumer.start()
    tids = [new_id() for _ in range(3)]
    for index, tid in enumerate(tids):
        worker.mark_as_done(tid, f'value-{index}', request=request_for(client, tid))
    pump_until(client, lambda: client.stats()['buffered'] >= 3, what='three early arrivals buffered')
    assert client.stats()['buffer_size'] == 3
    for index, tid in enumerate(tids):
        assert app.AsyncResult(tid).get(timeout=WAIT) == f'value-{index}'
    assert client.stats()['buffer_size'] == 0
    assert client.stats()['evicted'] == 0


def test_buffer_bound_evicts_counts_and_fails_fast(other_app):
    application = other_app(result_buffer_max=5)
    client = application.backend
    worker = application.create_backend()
    try:
        client.result_consumer.start()
        tids = [new_id() for _ in range(8)]
        for index, tid in enumerate(tids):
            worker.mark_as_done(tid, index, request=request_for(client, tid))
        pump_until(client, received_at_least(client, 8), what='8 replies')
        stats = client.stats()
        assert stats['evicted'] == 3
        assert stats['buffer_size'] == 5

        for tid in tids[:3]:  # the oldest were evicted
            try:
                application.AsyncResult(tid).get(timeout=WAIT)
            except ResultEvicted as exc:
                assert tid in exc.task_ids
                assert tid in str(exc) and 'evicted' in str(exc)
            except TimeoutError:
                pytest.fail(f'get() on evicted {tid} waited for the timeout instead of failing fast')
            else:
                pytest.fail(f'get() on evicted {tid} returned a value')
        for index, tid in enumerate(tids[3:], start=3):
            assert application.AsyncResult(tid).get(timeout=WAIT) == index
    finally:
        worker.close()


# -- timeouts ---------------------------------------------------------------------------------------
@pytest.mark.smoke
@pytest.mark.parametrize('timeout', [0, 0.05])
def test_get_timeout_on_pending_raises_timeout_error(app, client, timeout):
    result = app.AsyncResult(new_id())
    with pytest.raises(TimeoutError):
        result.get(timeout=timeout)
    with pytest.raises(builtins.TimeoutError):  # also the builtin, for asyncio-style handlers
        result.get(timeout=timeout)
    assert result.state == states.PENDING


def test_timed_out_waiter_is_removed_and_late_reply_counted(app, client, worker):
    tid = new_id()
    result = app.AsyncResult(tid)
    timed_out = False
    try:
        result.get(timeout=0.05)
    except TimeoutError:
        timed_out = True  # no reference to the exception (and its frames) is kept
    assert timed_out
    assert client.stats()['tracked'] == 1

    del result
    gc.collect()
    before = client.stats()
    worker.mark_as_done(tid, 'too late', request=request_for(client, tid))
    pump_until(client, received_at_least(client, before['received'] + 1), what='the late reply')
    after = client.stats()
    assert after['tracked'] == 0
    assert after['late'] == before['late'] + 1

    # and the backend still serves new waits
    fresh = new_id()
    worker.mark_as_done(fresh, 'fresh', request=request_for(client, fresh))
    assert app.AsyncResult(fresh).get(timeout=WAIT) == 'fresh'


# -- waiting from many threads ----------------------------------------------------------------------
def _collapse(items: List[str]) -> List[str]:
    out: List[str] = []
    for item in items:
        if not out or out[-1] != item:
            out.append(item)
    return out


@pytest.mark.smoke
def test_on_message_is_per_waiter(client, worker):
    client.result_consumer.start()
    tids = [new_id(), new_id()]
    seen: Dict[str, List[Dict[str, Any]]] = {tid: [] for tid in tids}
    started = {tid: threading.Event() for tid in tids}
    values: Dict[str, Any] = {}
    errors: List[BaseException] = []

    def wait_for(tid: str) -> None:
        def on_message(meta: Dict[str, Any]) -> None:
            seen[tid].append(meta)
            if meta.get('status') == states.STARTED:
                started[tid].set()
        try:
            values[tid] = AsyncResult(tid, backend=client).get(timeout=30, on_message=on_message)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=wait_for, args=(tid,)) for tid in tids]
    for thread in threads:
        thread.start()

    # STARTED is sent again until each waiter has seen one (a state read before the waiter
    # attached is not a message *to* it); the events make this a wait, not a sleep.
    deadline = time.monotonic() + WAIT
    while not all(event.is_set() for event in started.values()):
        assert time.monotonic() < deadline, 'the waiters never saw STARTED'
        for index, tid in enumerate(tids):
            if not started[tid].is_set():
                worker.mark_as_started(tid, request=request_for(client, tid), pid=1000 + index,
                                       hostname=f'host-{index}')
        for tid in tids:
            started[tid].wait(0.5)
    for index, tid in enumerate(tids):
        worker.store_result(tid, {'current': index + 1}, 'PROGRESS', request=request_for(client, tid))
    for index, tid in enumerate(tids):
        worker.mark_as_done(tid, f'done-{index}', request=request_for(client, tid))
    for thread in threads:
        thread.join(30)
    assert not errors
    for index, tid in enumerate(tids):
        assert values[tid] == f'done-{index}'
        metas = seen[tid]
        assert all(meta['task_id'] == tid for meta in metas), 'a waiter saw another task\'s state'
        assert _collapse([meta['status'] for meta in metas]) == [states.STARTED, 'PROGRESS', states.SUCCESS]
        for meta in metas:
            if meta['status'] == states.STARTED:
                assert meta['result'] == {'pid': 1000 + index, 'hostname': f'host-{index}'}
            elif meta['status'] == 'PROGRESS':
                assert meta['result'] == {'current': index + 1}
            else:
                assert meta['result'] == f'done-{index}'


def test_result_made_in_one_thread_is_waited_in_another(app, client, worker):
    """As in Celery, a result is bound to the backend of the thread that made it (whose oid the
    request carried as reply_to), not to the backend of whichever thread later calls get()."""
    tid = new_id()
    client.result_consumer.start()  # this thread's reply queue exists and is consumed
    result = app.AsyncResult(tid)  # made here: the request would carry this thread's oid
    worker.mark_as_done(tid, 'crossed threads', request=request_for(client, tid))
    outcome: Dict[str, Any] = {}

    def wait() -> None:
        try:
            outcome['value'] = result.get(timeout=WAIT)
        except BaseException as exc:  # reported below
            outcome['error'] = exc
        finally:
            app.close()  # this thread's own backend, if one was made

    thread = threading.Thread(target=wait)
    thread.start()
    thread.join(WAIT + 5)
    assert 'error' not in outcome, repr(outcome.get('error'))
    assert outcome['value'] == 'crossed threads'
    assert result.backend is client


@pytest.mark.smoke
def test_sixteen_threads_share_one_backend(client, worker):
    client.result_consumer.start()
    per_thread = 50
    plan = [[new_id() for _ in range(per_thread)] for _ in range(16)]
    expected = {tid: {'thread': t, 'n': n, 'tid': tid} for t, tids in enumerate(plan) for n, tid in enumerate(tids)}
    got: Dict[str, Any] = {}
    errors: List[BaseException] = []
    barrier = threading.Barrier(17)

    def run(tids: List[str]) -> None:
        try:
            barrier.wait(WAIT)
            for tid in tids:
                got[tid] = AsyncResult(tid, backend=client).get(timeout=30)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(tids,)) for tids in plan]
    for thread in threads:
        thread.start()
    barrier.wait(WAIT)
    order = list(expected)
    random.Random(1).shuffle(order)
    for tid in order:
        worker.mark_as_done(tid, expected[tid], request=request_for(client, tid))
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads)
    assert not errors, errors[:3]
    assert len(got) == 16 * per_thread
    wrong = [tid for tid, value in got.items() if value != expected[tid]]
    assert not wrong, f'{len(wrong)} results reached the wrong waiter'


@pytest.mark.smoke
def test_join_native_over_10000_results(app, client, worker):
    client.result_consumer.start()  # the reply queue exists before anything is published
    count = 10_000
    tids = [new_id() for _ in range(count)]
    results = ResultSet([app.AsyncResult(tid) for tid in tids])
    order = list(range(count))
    random.Random(2).shuffle(order)
    publish_errors: List[BaseException] = []

    def publish() -> None:
        try:
            for index in order:
                worker.mark_as_done(tids[index], index * 3, request=request_for(client, tids[index]))
        except BaseException as exc:  # reported below
            publish_errors.append(exc)

    publisher = threading.Thread(target=publish)
    publisher.start()
    try:
        values = results.join_native(timeout=90)
    finally:
        publisher.join(90)
    assert not publish_errors
    assert values == [index * 3 for index in range(count)]
    assert client.stats()['received'] == count


@pytest.mark.smoke
def test_iter_native_yields_each_id_once(app, client, worker):
    count = 2_000
    tids = [new_id() for _ in range(count)]
    client.result_consumer.start()
    for index, tid in enumerate(tids):
        request = request_for(client, tid)
        worker.mark_as_started(tid, request=request, pid=index, hostname='h')
        worker.mark_as_done(tid, index, request=request)
        if index % 20 == 0:
            worker.mark_as_done(tid, index, request=request)  # a duplicate final state
    results = ResultSet([app.AsyncResult(tid) for tid in tids])
    yielded = list(results.iter_native(timeout=60))
    counts = collections.Counter(tid for tid, _ in yielded)
    assert set(counts) == set(tids)
    assert max(counts.values()) == 1
    position = {tid: index for index, tid in enumerate(tids)}
    for tid, meta in yielded:
        assert meta['status'] == states.SUCCESS
        assert meta['result'] == position[tid]


def test_backend_iter_native_and_wait_for_pending(app, client, worker):
    client.result_consumer.start()  # the reply queue exists before anything is published
    tids = [new_id() for _ in range(5)]
    for index, tid in enumerate(tids):
        worker.mark_as_done(tid, index, request=request_for(client, tid))
    results = ResultSet([app.AsyncResult(tid) for tid in tids])
    collected = dict((tid, meta['result']) for tid, meta in client.iter_native(results, timeout=WAIT))
    assert collected == {tid: index for index, tid in enumerate(tids)}

    tid = new_id()
    single = app.AsyncResult(tid)
    client.add_pending_result(single)
    assert client.stats()['tracked'] >= 1
    worker.mark_as_done(tid, 'waited', request=request_for(client, tid))
    assert client.wait_for_pending(single, timeout=WAIT) == 'waited'
    assert client.remove_pending_result(single) is single


# -- the mark_as_* family, as the client sees it ----------------------------------------------------
def test_mark_as_started(app, client, worker):
    client.result_consumer.start()  # the reply queue exists before anything is published
    tid = new_id()
    worker.mark_as_started(tid, request=request_for(client, tid), pid=321, hostname='celery@node')
    result = app.AsyncResult(tid)
    wait_until(lambda: result.state == states.STARTED, what='STARTED')
    assert result.info == {'pid': 321, 'hostname': 'celery@node'}
    assert not result.ready()
    with pytest.raises(TimeoutError):
        result.get(timeout=0)


@pytest.mark.parametrize('exc', [BillingError('card declined', 402), KeyError('missing'),
                                 ValueError('bad', {'field': 'x'})])
@pytest.mark.smoke
def test_mark_as_failure_reraises_the_original_type(app, client, worker, exc):
    client.result_consumer.start()  # the reply queue exists before anything is published
    tid = new_id()
    traceback = 'Traceback (most recent call last):\n  File "tasks.py", line 1\nBoom\n'
    worker.mark_as_failure(tid, exc, traceback=traceback, request=request_for(client, tid))
    result = app.AsyncResult(tid)
    with pytest.raises(type(exc)) as excinfo:
        result.get(timeout=WAIT)
    assert type(excinfo.value) is type(exc)
    assert excinfo.value.args == exc.args
    assert result.state == states.FAILURE
    assert result.failed() and not result.successful() and result.ready()
    assert result.traceback == traceback
    returned = result.get(propagate=False)
    assert type(returned) is type(exc) and returned.args == exc.args


def test_mark_as_retry_carries_the_exception_as_result(app, client, worker):
    client.result_consumer.start()  # the reply queue exists before anything is published
    tid = new_id()
    worker.mark_as_retry(tid, ConnectionResetError('again', 3), request=request_for(client, tid))
    result = app.AsyncResult(tid)
    wait_until(lambda: result.state == states.RETRY, what='RETRY')
    assert isinstance(result.result, ConnectionResetError)
    assert result.result.args == ('again', 3)
    assert not result.ready()
    worker.mark_as_done(tid, 'second try', request=request_for(client, tid))
    assert result.get(timeout=WAIT) == 'second try'


def test_mark_as_revoked_raises_task_revoked_error(app, client, worker):
    client.result_consumer.start()  # the reply queue exists before anything is published
    tid = new_id()
    worker.mark_as_revoked(tid, reason='terminated', request=request_for(client, tid))
    result = app.AsyncResult(tid)
    with pytest.raises(TaskRevokedError) as excinfo:
        result.get(timeout=WAIT)
    assert 'terminated' in str(excinfo.value)
    assert result.state == states.REVOKED
    assert result.ready() and not result.successful()


# -- extended meta, persistence ---------------------------------------------------------------------
def _extended_request(client: RPCBackend, tid: str) -> Dict[str, Any]:
    return {'reply_to': client.oid, 'correlation_id': tid, 'task': 'proj.tasks.add', 'args': [2, 3],
            'kwargs': {'carry': True}, 'hostname': 'worker1@box', 'retries': 2,
            'delivery_info': {'routing_key': 'math', 'exchange': ''}}


def test_extended_meta_fields(other_app):
    application = other_app(result_extended=True)
    client = application.backend
    worker = application.create_backend()
    try:
        client.result_consumer.start()
        tid = new_id()
        worker.mark_as_done(tid, 5, request=_extended_request(client, tid))
        result = application.AsyncResult(tid)
        assert result.get(timeout=WAIT) == 5
        assert result.args == [2, 3]
        assert result.kwargs == {'carry': True}
        assert result.worker == 'worker1@box'
        assert result.retries == 2
        assert result.queue == 'math'
    finally:
        worker.close()


def test_extended_meta_name(other_app):
    """``name`` is one of the extended fields (Celery: ``AsyncResult.name`` reads the meta)."""
    application = other_app(result_extended=True)
    client = application.backend
    worker = application.create_backend()
    try:
        client.result_consumer.start()
        tid = new_id()
        worker.mark_as_done(tid, 5, request=_extended_request(client, tid))
        result = application.AsyncResult(tid)
        assert result.get(timeout=WAIT) == 5
        assert client.get_task_meta(tid).get('name') == 'proj.tasks.add'
        assert result.name == 'proj.tasks.add'
    finally:
        worker.close()


def test_no_extended_meta_by_default(app, client, worker):
    client.result_consumer.start()  # the reply queue exists before anything is published
    tid = new_id()
    worker.mark_as_done(tid, 5, request=_extended_request(client, tid))
    result = app.AsyncResult(tid)
    assert result.get(timeout=WAIT) == 5
    assert result.args is None and result.worker is None and result.queue is None


@pytest.mark.parametrize('how, expected_mode', [('default', 1), ('setting', 2), ('argument', 2)])
def test_delivery_mode(other_app, raw, private_queue, how, expected_mode):
    application = other_app(result_persistent=(how == 'setting'))
    backend = (RPCBackend(application, persistent=True) if how == 'argument'
               else application.create_backend())
    try:
        tid = new_id()
        backend.mark_as_done(tid, 1, request={'reply_to': private_queue, 'correlation_id': tid})
        message = basic_get_wait(raw, private_queue)
        assert message.properties['delivery_mode'] == expected_mode
        assert message.properties['correlation_id'] == tid
    finally:
        backend.close()


# -- stats, forget, close, groups -------------------------------------------------------------------
@pytest.mark.smoke
def test_stats_counters(app, client, worker):
    client.result_consumer.start()  # the reply queue exists before anything is published
    tid = new_id()
    worker.mark_as_done(tid, 1, request=request_for(client, tid))
    assert app.AsyncResult(tid).get(timeout=WAIT) == 1
    stats = client.stats()
    for key in ('received', 'dispatched', 'buffered', 'evicted', 'late', 'malformed_dropped', 'reconnects'):
        assert key in stats, key
        assert isinstance(stats[key], int), key
    assert stats['received'] == 1
    assert stats['dispatched'] + stats['buffered'] >= 1
    assert stats['evicted'] == 0 and stats['malformed_dropped'] == 0 and stats['reconnects'] == 0


def test_forget(app, client, worker):
    client.result_consumer.start()  # the reply queue exists before anything is published
    tid = new_id()
    worker.mark_as_done(tid, 'remember me', request=request_for(client, tid))
    result = app.AsyncResult(tid)
    assert result.get(timeout=WAIT) == 'remember me'
    result.forget()
    assert result.state == states.PENDING
    assert client.get_task_meta(tid)['status'] == states.PENDING

    buffered = new_id()
    worker.mark_as_done(buffered, 'unwanted', request=request_for(client, buffered))
    pump_until(client, lambda: client.stats()['buffer_size'] >= 1, what='the early arrival')
    client.forget(buffered)
    assert client.stats()['buffer_size'] == 0
    with pytest.raises(TimeoutError):
        app.AsyncResult(buffered).get(timeout=0.1)


def test_groups_are_not_supported(app, client):
    gid = new_id()
    group = GroupResult(gid, [app.AsyncResult(new_id())], app=app)
    for call in (lambda: client.save_group(gid, group), lambda: client.restore_group(gid),
                 lambda: client.delete_group(gid), lambda: client.get_group_meta(gid), group.save):
        with pytest.raises(NotImplementedError, match='rpc'):
            call()


# -- ResultConsumer ---------------------------------------------------------------------------------
def test_result_consumer_lifecycle(client, worker, raw):
    consumer = client.result_consumer
    assert isinstance(consumer, ResultConsumer)
    consumer.start()
    consumer.start()  # idempotent
    assert queue_counts(raw, client.oid) == (0, 1)
    tid = new_id()
    consumer.consume_from(tid)  # one queue for every id: nothing new to consume
    consumer.cancel_for(tid)  # and nothing to cancel per task
    assert queue_counts(raw, client.oid) == (0, 1)

    worker.mark_as_done(tid, 'drained', request=request_for(client, tid))
    pump_until(client, received_at_least(client, 1), what='one reply')  # ResultConsumer.drain_events
    consumer.stop()
    wait_until(lambda: (queue_counts(raw, client.oid) or (None, None))[1] == 0, what='the consumer to stop')
    assert queue_counts(raw, client.oid) == (0, 0)  # the reply was acked, not left for redelivery
    assert AsyncResult(tid, backend=client).get(timeout=WAIT) == 'drained'


@pytest.mark.skipif(not hasattr(os, 'fork'), reason='needs os.fork')
def test_fork_child_gets_a_new_oid_and_the_parent_keeps_its_connection(app, client, worker):
    client.result_consumer.start()
    parent_oid = client.oid
    def child(report: Dict[str, Any]) -> None:
        report['inherited_oid'] = client.oid
        report['thread_oid'] = app.thread_oid
        child_backend = app.backend
        report['backend_oid'] = child_backend.oid
        child_worker = app.create_backend()
        tid = new_id()
        child_backend.result_consumer.start()
        child_worker.mark_as_done(tid, 'from the child', request=request_for(child_backend, tid))
        report['value'] = app.AsyncResult(tid).get(timeout=WAIT)

    report, status = report_from_child(child, timeout=30)
    assert 'error' not in report, report
    assert status is not None and os.waitstatus_to_exitcode(status) == 0
    assert report['value'] == 'from the child'
    assert report['thread_oid'] != parent_oid
    assert report['backend_oid'] == report['thread_oid']
    assert report['inherited_oid'] != parent_oid

    # the child neither closed nor used the parent's connection
    tid = new_id()
    worker.mark_as_done(tid, 'parent still fine', request=request_for(client, tid))
    assert AsyncResult(tid, backend=client).get(timeout=WAIT) == 'parent still fine'
    assert client.stats()['reconnects'] == 0


def test_state_is_answered_from_the_table_past_a_large_backlog(app, client, worker) -> None:
    """``state`` reads everything already delivered into the table; it is not
    ``get_task_meta``'s bounded backlog walk (which raises past ``backlog_limit``)."""
    assert client.is_async is True
    client.result_consumer.start()
    for _ in range(1500):
        other = new_id()
        worker.mark_as_done(other, 0, request=request_for(client, other))
    target = new_id()
    worker.mark_as_done(target, 'found', request=request_for(client, target))
    result = app.AsyncResult(target)
    wait_until(lambda: result.state == 'SUCCESS', what='the target state behind 1,500 replies')
    assert result.result == 'found'
    assert client.stats()['buffered'] >= 1500


def test_add_pending_results_tracks_every_result(app, client, worker) -> None:
    """The async mixin's registration wins over the polled backends' no-op (MRO)."""
    results = [app.AsyncResult(new_id()) for _ in range(300)]
    before = client.stats()['tracked']
    client.add_pending_results(results)
    assert client.stats()['tracked'] == before + 300
    single = app.AsyncResult(new_id())
    assert client.add_pending_result(single) is single
    assert client.stats()['tracked'] == before + 301
    client.result_consumer.start()
    worker.mark_as_done(single.id, 'ok', request=request_for(client, single.id))
    assert single.get(timeout=10) == 'ok'
