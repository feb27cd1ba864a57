"""The Celery drop-in (``result_backend = 'rpcresults.contrib.celery:RPCBackend'``) against a real
``celery worker -P solo``: Celery's own AsyncResult/ResultSet/GroupResult read through our consumer.

Each client-side test runs against a worker whose backend is Celery's plain ``rpc://`` and one
whose backend is the drop-in, so both directions of interop are covered. The state table twin is
the one this run selected (compiled, or pure under ``RPCRESULTS_NO_EXTENSIONS=1``).
"""
from __future__ import annotations

import contextlib
import json
import os
import uuid
from typing import Any, Dict, Iterator, List, Tuple

import pytest
from celery import Celery, group
from celery.backends.rpc import RPCBackend as CeleryRPCBackend
from celery.exceptions import TimeoutError as CeleryTimeoutError
from celery.result import AsyncResult, ResultSet

from rpcresults.contrib.celery import RPCBackend as DropIn
from tests.celery_tasks import (TASK_ADD, TASK_ECHO, TASK_FAIL, TASK_PROGRESS, TaskFailure,
                                make_client)
from tests.celery_worker import CeleryWorker, delete_queue, worker_fixture
from tests.helpers import raw_connection, report_from_child, wait_until
from tests.twins import NO_EXTENSIONS_VAR, load_twin

pytestmark = pytest.mark.celery

DROPIN = 'rpcresults.contrib.celery:RPCBackend'
TIMEOUT = 30.0

plain_worker = worker_fixture(backend='rpc://')
dropin_worker = worker_fixture(backend=DROPIN)


@pytest.fixture(params=['plain_worker', 'dropin_worker'])
def worker(request: pytest.FixtureRequest) -> CeleryWorker:
    """A worker whose own result backend is Celery's ``rpc://``, then one using the drop-in."""
    return request.getfixturevalue(request.param)


@contextlib.contextmanager
def _client(backend: str, worker: CeleryWorker) -> Iterator[Celery]:
    app = make_client(backend=backend, queue=worker.queue)
    try:
        yield app
    finally:
        closer = getattr(app.backend, 'close', None)
        if closer is not None:
            closer()
        app.close()


@pytest.fixture
def celery_client(worker: CeleryWorker) -> Iterator[Celery]:
    """A Celery app switched to the drop-in with the one setting."""
    with _client(DROPIN, worker) as app:
        yield app


def expected_table_module() -> str:
    if os.environ.get(NO_EXTENSIONS_VAR):
        return load_twin('pure', 'table').__name__
    return load_twin('compiled', 'table').__name__


def test_the_one_setting_selects_our_backend(celery_client: Celery) -> None:
    backend = celery_client.backend
    assert type(backend) is DropIn
    assert isinstance(backend, CeleryRPCBackend)  # Celery's worker side and wire format
    assert type(backend.result_consumer).__module__ == 'rpcresults.contrib.celery'
    assert type(backend.result_consumer.table).__module__ == expected_table_module()


def test_the_rpcresults_url_alias_selects_our_backend(broker_url: str) -> None:
    # registered through the ``celery.result_backends`` entry point in pyproject.toml
    app = Celery('alias', broker=broker_url, backend='rpcresults://')
    try:
        assert type(app.backend) is DropIn
    finally:
        app.close()


def test_get_returns_the_value_and_our_counters_move(celery_client: Celery, worker: CeleryWorker) -> None:
    before = celery_client.backend.stats()
    result = celery_client.send_task(TASK_ADD, (40, 2))
    assert isinstance(result, AsyncResult)
    assert result.get(timeout=TIMEOUT) == 42, worker.log()
    assert result.state == 'SUCCESS'
    after = celery_client.backend.stats()
    assert after['received'] >= before['received'] + 1
    assert after['dispatched'] >= before['dispatched'] + 1
    assert after['acked'] >= 1


def test_group_join_native_in_order(celery_client: Celery, worker: CeleryWorker) -> None:
    n = 200
    result = group(celery_client.signature(TASK_ADD, (i, 1000 * i)) for i in range(n)).apply_async()
    values = result.join_native(timeout=TIMEOUT)
    assert values == [1001 * i for i in range(n)], worker.log()[-3000:]
    assert celery_client.backend.stats()['received'] >= n


def test_result_set_join_native_in_member_order(celery_client: Celery) -> None:
    sent = [celery_client.send_task(TASK_ECHO, (f'v{i}',)) for i in range(50)]
    members = list(reversed(sent))  # member order differs from completion order
    joined = ResultSet(members, app=celery_client).join_native(timeout=TIMEOUT)
    assert joined == [f'v{i}' for i in reversed(range(50))]
    seen = dict(ResultSet(sent[:10], app=celery_client).iter_native(timeout=TIMEOUT))
    assert {tid: meta['result'] for tid, meta in seen.items()} == {r.id: f'v{i}' for i, r in enumerate(sent[:10])}


def test_failure_raises_the_task_exception(celery_client: Celery) -> None:
    result = celery_client.send_task(TASK_FAIL, ('it broke: 7',))
    with pytest.raises(TaskFailure, match='it broke: 7'):
        result.get(timeout=TIMEOUT)
    assert result.state == 'FAILURE'
    assert isinstance(result.result, TaskFailure)
    assert result.traceback and 'TaskFailure' in result.traceback
    value = celery_client.send_task(TASK_FAIL, ('quiet',)).get(timeout=TIMEOUT, propagate=False)
    assert type(value) is TaskFailure and value.args == ('quiet',)


def test_failure_in_a_group_propagates_from_join_native(celery_client: Celery) -> None:
    sigs = [celery_client.signature(TASK_ADD, (1, 2)), celery_client.signature(TASK_FAIL, ('member',))]
    with pytest.raises(TaskFailure, match='member'):
        group(sigs).apply_async().join_native(timeout=TIMEOUT)


def test_progress_states_reach_on_message_in_order(celery_client: Celery) -> None:
    seen: List[Dict[str, Any]] = []
    result = celery_client.send_task(TASK_PROGRESS, (6,))
    assert result.get(timeout=TIMEOUT, on_message=seen.append) == 6
    progress = [meta['result'] for meta in seen if meta['status'] == 'PROGRESS']
    assert progress == [{'i': i, 'n': 6} for i in range(6)]
    assert seen[-1]['status'] == 'SUCCESS' and seen[-1]['task_id'] == result.id


def test_state_is_read_from_our_table(celery_client: Celery) -> None:
    sent = celery_client.send_task(TASK_ECHO, ('polled',))
    fresh = AsyncResult(sent.id, app=celery_client)  # nothing cached: every .state reads the queue
    wait_until(lambda: fresh.state == 'SUCCESS', timeout=TIMEOUT, what='state SUCCESS', interval=0.02)
    assert fresh.result == 'polled'


def test_timeout_raises_celerys_timeout_error(broker_url: str) -> None:
    unserved = f'rpcresults-nobody-{uuid.uuid4().hex[:8]}'  # no worker consumes it
    app = make_client(backend=DROPIN, queue=unserved, broker_url=broker_url)
    try:
        result = app.send_task(TASK_ADD, (1, 1))
        with pytest.raises(CeleryTimeoutError):
            result.get(timeout=0.3)
        with pytest.raises(CeleryTimeoutError):
            ResultSet([result], app=app).join_native(timeout=0.3)
    finally:
        app.backend.close()
        app.close()
        delete_queue(broker_url, unserved)


def test_plain_celery_client_reads_a_dropin_worker(dropin_worker: CeleryWorker) -> None:
    """The drop-in on the worker publishes what Celery's own rpc:// client reads."""
    with _client('rpc://', dropin_worker) as app:
        assert type(app.backend) is CeleryRPCBackend
        assert app.send_task(TASK_ADD, (2, 3)).get(timeout=TIMEOUT) == 5
        with pytest.raises(TaskFailure, match='x'):
            app.send_task(TASK_FAIL, ('x',)).get(timeout=TIMEOUT)


def _reply_for(worker: CeleryWorker, broker_url: str, task: str, args: Tuple[Any, ...]) -> Tuple[Dict[str, Any], Any]:
    """Send ``task`` to ``worker`` with reply_to a queue we read raw; its final reply (props, body)."""
    conn = raw_connection(broker_url)
    try:
        channel = conn.channel()
        reply_to, _, _ = channel.queue_declare('', exclusive=True)
        app = make_client(backend='rpc://', queue=worker.queue, broker_url=broker_url)
        try:
            task_id = app.send_task(task, args, reply_to=reply_to).id
        finally:
            app.close()

        def final() -> Any:
            message = channel.basic_get(reply_to, no_ack=True)
            return message if message is not None and json.loads(message.body)['status'] in (
                'SUCCESS', 'FAILURE') else None
        message = wait_until(final, timeout=TIMEOUT, what=f'the reply of {task}', interval=0.02)
        props = dict(message.properties)
        assert props.pop('correlation_id') == task_id
        body = json.loads(message.body)
        assert body.pop('task_id') == task_id
        return props, body
    finally:
        conn.close()


@pytest.mark.parametrize('task,args', [(TASK_ECHO, ({'k': [1, 'two']},)), (TASK_FAIL, ('wire',))])
def test_dropin_worker_publishes_exactly_like_celery(plain_worker: CeleryWorker, dropin_worker: CeleryWorker,
                                                      broker_url: str, task: str, args: Tuple[Any, ...]) -> None:
    theirs_props, theirs = _reply_for(plain_worker, broker_url, task, args)
    ours_props, ours = _reply_for(dropin_worker, broker_url, task, args)
    assert ours_props == theirs_props
    for body in (ours, theirs):
        body.pop('date_done')
        if body['traceback']:
            body['traceback'] = body['traceback'].splitlines()[-1]
    assert ours == theirs


def test_a_forked_child_gets_its_own_reply_queue(celery_client: Celery) -> None:
    backend = celery_client.backend
    backend.result_consumer.start()
    parent_oid = backend.oid

    def child(report: Dict[str, Any]) -> None:
        child_backend = celery_client.backend
        report['oid'] = child_backend.oid
        report['connection_cleared'] = child_backend.stats()['connected'] == 0  # the parent's was let go
        report['thread_oid'] = celery_client.thread_oid  # what Celery stamps as reply_to
        report['round_trip'] = celery_client.send_task(TASK_ADD, (2, 3)).get(timeout=TIMEOUT)

    report, status = report_from_child(child, timeout=30, reap_timeout=30)
    assert 'error' not in report, report['error']
    assert status == 0, f'child failed: {report!r}'
    assert report['oid'] != parent_oid
    assert report['connection_cleared']
    assert report['thread_oid'] == report['oid']
    assert report['round_trip'] == 5
    assert backend.oid == parent_oid  # the parent keeps its own
    assert celery_client.send_task(TASK_ADD, (20, 22)).get(timeout=TIMEOUT) == 42
