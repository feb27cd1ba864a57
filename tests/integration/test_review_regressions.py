"""Regression tests for the review fixes (commit "Review fixes: no reply lost to a failing
callback, errors kept for later waiters, queue loss told to every pending id, fork-safe reset").

Each test asserts something the code before those fixes got wrong. All against the real
broker; every wait is bounded (get/join timeouts, bounded polls, thread joins with a timeout,
a forked child that is SIGKILLed when it does not report); no assertion depends on elapsed
time. The reply queues created here are deleted at the end of each test.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import threading
import time
from typing import Any, Callable, Dict, Iterator, List, Set

import amqp
import kombu.exceptions
import pytest

from rpcresults import AsyncResult, ResultSet, states
from rpcresults.backends import asynchronous
from rpcresults.exceptions import ContentDisallowed, ReplyQueueLost

from ..conftest import make_app, new_id, request_for
from ..helpers import Call, bound, queue_counts, raw_connection, report_from_child, wait_until

WAIT = 10


# -- helpers ---------------------------------------------------------------------------------
def round_trip(client: Any, worker: Any, value: Any = 'ping') -> Any:
    client.result_consumer.start()
    task_id = new_id()
    worker.mark_as_done(task_id, value, request=request_for(client, task_id))
    return bound(client, task_id).get(timeout=WAIT)


def json_reply(task_id: str, value: Any) -> amqp.Message:
    body = json.dumps({'task_id': task_id, 'status': states.SUCCESS, 'result': value,
                       'traceback': None, 'children': [], 'date_done': None}).encode()
    return amqp.Message(body, content_type='application/json', content_encoding='utf-8',
                        correlation_id=task_id)


@pytest.fixture
def own_queues(broker_url: str) -> Iterator[Set[str]]:
    """Names of the reply queues this test created; deleted after the app fixtures closed.

    Request it first so it is torn down last.
    """
    names: Set[str] = set()
    yield names
    conn = raw_connection(broker_url)
    try:
        for name in names:
            channel = conn.channel()
            try:
                channel.queue_delete(name)
                channel.close()
            except amqp.exceptions.AMQPError:
                pass
    finally:
        conn.close()


@pytest.fixture
def confirming_worker(broker_url: str) -> Iterator[Any]:
    """A worker-side backend whose publishes return only once the broker confirmed them."""
    worker_app = make_app(broker_url, result_publish_confirm=True)
    worker = worker_app.create_backend()
    assert worker.publisher.confirm
    yield worker
    worker.close()
    worker_app.close()


# -- 1. a raising then() callback costs no other reply ----------------------------------------
def test_raising_then_callback_loses_no_reply_of_the_same_read(own_queues, app, client, confirming_worker,
                                                               raw, caplog):
    worker = confirming_worker
    own_queues.add(client.oid)
    caplog.set_level(logging.ERROR, logger='rpcresults.result')
    client.result_consumer.start()
    a, b, c = (app.AsyncResult(new_id()) for _ in range(3))
    client.add_pending_results([a, b, c])
    called: List[Any] = []

    def raising_callback(result: Any) -> None:
        called.append(result.id)
        raise RuntimeError('boom from a then() callback')

    a.then(raising_callback)
    for result, value in ((a, 'va'), (b, 'vb'), (c, 'vc')):
        worker.mark_as_done(result.id, value, request=request_for(client, result.id))
    # all three pushed to the client's socket before anyone reads it: one read holds them all
    # (each publish returned once the broker confirmed it, so the queue had all three before
    # the passive declares on the raw connection look at it)
    assert worker.worker_stats()['published'] == 3
    wait_until(lambda: queue_counts(raw, client.oid)[0] == 0, WAIT, 'the broker to push the three replies')

    assert b.get(timeout=WAIT) == 'vb'
    assert c.get(timeout=WAIT) == 'vc'
    assert a.get(timeout=WAIT) == 'va'
    assert called == [a.id]
    assert client.stats()['received'] >= 3
    logged = [r for r in caplog.records if r.name == 'rpcresults.result' and r.levelno >= logging.ERROR]
    assert logged, 'the failing then() callback was not logged'
    assert any(r.exc_info and isinstance(r.exc_info[1], RuntimeError) for r in logged)


# -- 2. a refused reply for an id nobody waits on yet ------------------------------------------
@pytest.mark.parametrize('count', [1, 2])
def test_refused_reply_before_anyone_waits_raises_content_disallowed(count, own_queues, app, client, raw):
    assert ContentDisallowed is kombu.exceptions.ContentDisallowed
    own_queues.add(client.oid)
    client.result_consumer.start()
    ids = [new_id() for _ in range(count)]
    sentinel = new_id()
    channel = raw.channel()
    try:
        for task_id in ids:
            body = pickle.dumps({'task_id': task_id, 'status': states.SUCCESS, 'result': 'never'})
            channel.basic_publish(amqp.Message(body, content_type='application/x-python-serialize',
                                               content_encoding='binary', correlation_id=task_id),
                                  exchange='', routing_key=client.oid)
        # same channel, same queue: once the sentinel is read, the refused replies were too
        channel.basic_publish(json_reply(sentinel, 'sentinel'), exchange='', routing_key=client.oid)
    finally:
        channel.close()
    sentinel_result = bound(client, sentinel)
    assert sentinel_result.get(timeout=WAIT) == 'sentinel'
    stats = client.stats()
    assert stats['malformed_dropped'] >= count
    assert stats['tracked'] == 1  # none of the refused ids: the sentinel's result is the only one alive

    for task_id in ids:
        with pytest.raises(kombu.exceptions.ContentDisallowed):
            app.AsyncResult(task_id).get(timeout=WAIT)


# -- 3. queue loss is told to every pending id, once ----------------------------------------------
def test_reply_queue_deleted_tells_pending_ids_without_waiter_once(own_queues, app, client, worker, raw):
    own_queues.add(client.oid)
    assert round_trip(client, worker) == 'ping'
    r1, r2 = app.AsyncResult(new_id()), app.AsyncResult(new_id())
    client.add_pending_results([r1, r2])

    seen = threading.Event()

    def on_message(meta: Dict[str, Any]) -> None:
        if meta.get('status') == states.STARTED:
            seen.set()

    call = Call(lambda: r1.get(timeout=30, on_message=on_message), name='r1-get')
    call.start()
    for _ in range(100):  # the waiter only hears states that arrive after it attached
        worker.mark_as_started(r1.id, request=request_for(client, r1.id))
        if seen.wait(0.1):
            break
    else:
        raise AssertionError('the get() of r1 never attached')

    channel = raw.channel()
    channel.queue_delete(client.oid)
    channel.close()

    _, error = call.outcome(timeout=35)
    assert isinstance(error, ReplyQueueLost), f'expected ReplyQueueLost for r1, got {error!r}'
    assert r1.id in error.task_ids

    # r2 was pending with nobody waiting: its next wait is told of the loss too
    with pytest.raises(ReplyQueueLost) as lost:
        r2.get(timeout=WAIT)
    assert lost.value.task_ids == (r2.id,)

    # ... once: a result published to the re-declared queue now arrives
    wait_until(lambda: queue_counts(raw, client.oid) is not None, WAIT,
               'the reply queue to be re-declared', interval=0.05)
    worker.mark_as_done(r2.id, 'after-the-loss', request=request_for(client, r2.id))
    assert r2.get(timeout=WAIT) == 'after-the-loss'


# -- 4. fork: every backend a fresh oid, parent results usable in the child ------------------------
def _fork_child(app: Any, backends: List[Any], parent_oids: List[str], result: Any) -> Callable[[Dict[str, Any]], None]:
    """What the forked child checks and fills into its report."""
    def child(report: Dict[str, Any]) -> None:
        inherited = [backend.oid for backend in backends]
        report['inherited'] = inherited
        report['distinct'] = len(set(inherited)) == len(inherited)
        report['none_from_parent'] = not set(inherited) & set(parent_oids)
        report['app_backend_oid'] = app.backend.oid
        report['app_backend_is_new'] = app.backend.oid not in inherited and app.backend.oid not in parent_oids
        report['result_oid'] = result.backend.oid
        child_worker = app.create_backend()
        result.backend.result_consumer.start()
        child_worker.mark_as_done(result.id, 'from-the-child',
                                  request={'reply_to': result.backend.oid, 'correlation_id': result.id})
        report['value'] = result.get(timeout=WAIT)
        child_worker.close()
        result.backend.close()
    return child


@pytest.mark.skipif(not hasattr(os, 'fork'), reason='needs os.fork')
def test_fork_gives_every_backend_a_fresh_oid_and_parent_results_work(own_queues, app, client, worker, raw):
    own_queues.add(client.oid)
    threaded: Dict[str, Any] = {}

    def make(name: str) -> None:
        threaded[name] = app.backend  # that thread's own backend (kept alive by the test)

    for name in ('t1', 't2'):
        thread = threading.Thread(target=make, args=(name,), daemon=True)
        thread.start()
        thread.join(10)
        assert not thread.is_alive()
    backends = [client, threaded['t1'], threaded['t2'], worker]
    parent_oids = sorted({backend.oid for backend in backends} | {app.thread_oid})
    assert len({client.oid, threaded['t1'].oid, threaded['t2'].oid}) == 3
    assert round_trip(client, worker, 'parent') == 'parent'
    result = app.AsyncResult(new_id())
    assert result.backend is client
    assert result.state == states.PENDING  # tracked in the parent's table before the fork

    report, status = report_from_child(_fork_child(app, backends, parent_oids, result), timeout=30)
    if report.get('result_oid'):
        own_queues.add(report['result_oid'])
    assert 'error' not in report, report['error']
    assert status is not None and os.waitstatus_to_exitcode(status) == 0
    assert report['distinct'], f'backends share an oid in the child: {report["inherited"]}'
    assert report['none_from_parent'], f'a child backend kept a parent oid: {report["inherited"]}'
    assert report['app_backend_is_new'], report
    assert report['result_oid'] not in parent_oids
    assert report['value'] == 'from-the-child'

    # the parent is untouched
    assert client.oid in parent_oids
    assert round_trip(client, worker, 'parent-after') == 'parent-after'
    for backend in threaded.values():
        backend.close()


# -- 5. no registered drainer for the environment: the default one -----------------------------------
def test_unregistered_environment_falls_back_to_default_drainer(own_queues, app, worker, monkeypatch):
    monkeypatch.setattr(asynchronous, 'detect_environment', lambda: 'unregistered-green')
    assert 'unregistered-green' not in asynchronous.drainers
    backend = app.create_backend()  # KeyError 'gevent' before the fix
    own_queues.add(backend.oid)
    try:
        assert type(backend.result_consumer.drainer) is asynchronous.drainers['default']
        assert round_trip(backend, worker, 'gevent-less') == 'gevent-less'
    finally:
        backend.close()


# -- 6. iter_native yields Celery's converted meta ----------------------------------------------
def test_iter_native_yields_real_exceptions_and_child_results(own_queues, app, client, worker):
    own_queues.add(client.oid)
    client.result_consumer.start()
    failed, succeeded = new_id(), new_id()
    child_id = new_id()
    worker.mark_as_failure(failed, KeyError('k'), request=request_for(client, failed))
    worker.mark_as_done(succeeded, 42, request={**request_for(client, succeeded),
                                                'children': [app.AsyncResult(child_id)]})
    resultset = ResultSet([app.AsyncResult(failed), app.AsyncResult(succeeded)], app=app)

    metas = dict(resultset.iter_native(timeout=WAIT))

    assert set(metas) == {failed, succeeded}
    failure = metas[failed]
    assert failure['status'] == states.FAILURE
    assert isinstance(failure['result'], KeyError), f'not an exception instance: {failure["result"]!r}'
    assert failure['result'].args == ('k',)
    success = metas[succeeded]
    assert success['status'] == states.SUCCESS and success['result'] == 42
    children = success['children']
    assert children and all(isinstance(child, AsyncResult) for child in children), children
    assert [child.id for child in children] == [child_id]


# -- 7. heartbeats while only polling state --------------------------------------------------------
def test_polling_state_only_keeps_heartbeats_going(own_queues, broker_url, worker):
    hb_app = make_app(broker_url, broker_heartbeat=2)
    try:
        hb_client = hb_app.backend
        own_queues.add(hb_client.oid)
        hb_client.result_consumer.start()
        assert hb_client.stats()['heartbeat']
        result = hb_app.AsyncResult(new_id())
        assert result.backend is hb_client
        # several heartbeat intervals of polling only: no blocking get drives the connection
        until = time.monotonic() + 7
        while time.monotonic() < until:
            assert result.state == states.PENDING
            time.sleep(0.05)
        worker.mark_as_done(result.id, 'polled', request=request_for(hb_client, result.id))
        for _ in range(400):
            if result.state == states.SUCCESS:
                break
            time.sleep(0.025)
        assert result.state == states.SUCCESS
        assert result.result == 'polled'
        assert hb_client.stats()['reconnects'] == 0, 'the broker dropped the polling client'
    finally:
        hb_app.close()
