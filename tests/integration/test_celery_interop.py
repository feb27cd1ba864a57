"""Interop without the drop-in, both directions, with a real Celery worker and Celery clients.

(a) A real ``celery worker -P solo`` answers an rpcresults client: requests sent by
    ``Client.send_task`` (our protocol v2 encoder) and by Celery's own ``send_task`` with
    ``reply_to=<our reply queue>``; successes, failures (their exception type) and PROGRESS
    states arrive in rpcresults' AsyncResult/ResultSet.
(b) A Celery client (``result_backend='rpc://'``, Celery's AsyncResult) collects what
    rpcresults' worker side publishes: a Responder answering Celery's protocol v2 messages,
    and ``RPCBackend.mark_as_done`` given Celery's reply_to and task id.
"""
from __future__ import annotations

import uuid
from typing import Any, Iterator

import pytest

pytest.importorskip('celery')

from rpcresults import Client, Request, Responder, ResultSet  # noqa: E402
from tests.celery_tasks import (TASK_ADD, TASK_ECHO, TASK_FAIL, TASK_PROGRESS, TaskFailure,  # noqa: E402
                                make_client)
from tests.celery_worker import worker_fixture  # noqa: E402
from tests.helpers import wait_until  # noqa: E402
from tests.responders import ServedResponder  # noqa: E402

pytestmark = pytest.mark.celery

solo = worker_fixture(backend='rpc://')


@pytest.fixture
def celery_client(broker_url: str):
    client = make_client(backend='rpc://', broker_url=broker_url)
    yield client
    client.close()


# -- (a) a Celery worker answers rpcresults -------------------------------------------------
def test_send_task_success_comes_back_to_our_queue(rpc: Client, solo) -> None:
    result = rpc.send_task(TASK_ADD, (2, 3), queue=solo.queue)
    assert result.get(timeout=30) == 5, solo.log()
    assert result.state == 'SUCCESS'


def test_send_task_failure_raises_the_tasks_exception_type(rpc: Client, solo) -> None:
    result = rpc.send_task(TASK_FAIL, ('it broke',), queue=solo.queue)
    with pytest.raises(TaskFailure) as info:
        result.get(timeout=30)
    assert 'it broke' in str(info.value)
    assert 'TaskFailure' in (result.traceback or ''), solo.log()


def test_progress_states_reach_our_client(rpc: Client, solo) -> None:
    states = []
    result = rpc.send_task(TASK_PROGRESS, (3,), queue=solo.queue)
    assert result.get(timeout=30, on_message=lambda meta: states.append(
        (meta['status'], meta['result']))) == 3
    progress = [value for status, value in states if status == 'PROGRESS']
    assert progress == [{'i': i, 'n': 3} for i in range(3)]
    assert states[-1] == ('SUCCESS', 3)


def test_many_send_tasks_joined_natively(rpc: Client, solo) -> None:
    results = ResultSet([rpc.send_task(TASK_ECHO, ([index, 'x'],), queue=solo.queue) for index in range(50)])
    assert results.join_native(timeout=60) == [[index, 'x'] for index in range(50)]


def test_celery_send_task_with_our_reply_to(app, rpc: Client, celery_client, solo) -> None:
    rpc.backend.result_consumer.start()  # our reply queue exists before Celery sends
    sent = [celery_client.send_task(TASK_ADD, (index, 1), queue=solo.queue, reply_to=rpc.oid)
            for index in range(5)]
    failed = celery_client.send_task(TASK_FAIL, ('from celery',), queue=solo.queue, reply_to=rpc.oid)
    ours = ResultSet([app.AsyncResult(result.id) for result in sent])
    assert ours.join_native(timeout=30) == [index + 1 for index in range(5)]
    with pytest.raises(TaskFailure):
        app.AsyncResult(failed.id).get(timeout=30)


# -- (b) rpcresults' worker side answers a Celery client ------------------------------------
def celery_style(payload: Any, request: Request) -> Any:
    """Run Celery's tasks by name, as a Celery worker would."""
    if request.task == TASK_ADD:
        return request.args[0] + request.args[1]
    if request.task == TASK_FAIL:
        raise TaskFailure(*request.args)
    raise KeyError(f'unknown task {request.task}')


@pytest.fixture
def responder(app) -> Iterator[Responder]:
    queue = f'rpcresults-test-interop-{uuid.uuid4().hex[:12]}'
    # no x-expires: Celery declares the queue too, with plain arguments
    served = ServedResponder(app, queue, celery_style, expires=None, pass_request=True)
    yield served.responder
    served.close()
    with app.connection() as connection:
        served.responder.queue(connection.default_channel).delete()


def test_celery_client_gets_values_and_failures_from_our_responder(celery_client, responder) -> None:
    from celery.result import ResultSet as CeleryResultSet
    sent = [celery_client.send_task(TASK_ADD, (index, 10), queue=responder.queue_name) for index in range(5)]
    assert CeleryResultSet(sent, app=celery_client).join_native(timeout=30) == [i + 10 for i in range(5)]
    applied = celery_client.signature(TASK_ADD, args=(4, 4)).apply_async(queue=responder.queue_name)
    assert applied.get(timeout=30) == 8
    failed = celery_client.send_task(TASK_FAIL, ('answered by rpcresults',), queue=responder.queue_name)
    with pytest.raises(TaskFailure) as info:
        failed.get(timeout=30)
    assert 'answered by rpcresults' in str(info.value)
    assert failed.state == 'FAILURE'
    expected = {'handled': 7, 'succeeded': 6, 'failed': 1, 'no_reply_to': 0, 'bad_requests': 0,
                'expired': 0, 'requeued': 0, 'reconnects': 0}
    # counters move just after each reply is published
    wait_until(lambda: {key: responder.stats()[key] for key in expected} == expected, timeout=10,
               what=f'stats {expected}')


def test_celery_client_reads_store_result_of_our_worker_side(app, celery_client) -> None:
    task_id = str(uuid.uuid4())
    result = celery_client.AsyncResult(task_id)
    with celery_client.producer_or_acquire() as producer:
        celery_client.backend.on_task_call(producer, task_id)  # Celery declares its reply queue
    worker = app.create_backend()
    try:
        request = {'reply_to': celery_client.backend.oid, 'correlation_id': task_id}
        worker.mark_as_started(task_id, request=request, pid=1, hostname='rpcresults')
        worker.mark_as_done(task_id, {'nested': [1, 2]}, request=request)
        assert result.get(timeout=30) == {'nested': [1, 2]}
        failed_id = str(uuid.uuid4())
        failed = celery_client.AsyncResult(failed_id)
        worker.mark_as_failure(failed_id, TaskFailure('stored'), traceback='tb text',
                               request={'reply_to': celery_client.backend.oid, 'correlation_id': failed_id})
        with pytest.raises(TaskFailure):
            failed.get(timeout=30)
        assert failed.traceback == 'tb text'
    finally:
        worker.close()
