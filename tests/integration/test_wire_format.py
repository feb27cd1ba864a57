"""Byte compatibility with Celery's ``rpc://`` backend on the real broker.

The oracle is Celery 5.7 itself: for the same inputs, what our worker publishes must equal what
Celery's ``celery.backends.rpc.RPCBackend`` publishes (properties exactly, body key for key and in
order, only ``date_done``'s value differing), and each side's client must collect what the other
side's worker publishes.
"""
from __future__ import annotations

import json
import threading
import uuid
from datetime import date, datetime, timezone
from decimal import Decimal
from typing import Any, Callable, Dict, List, Optional, Tuple

import amqp
import kombu
import pytest

# Celery is a test dependency (pip install .[test]): without it these tests fail loudly, never skip.
from celery import Celery
from celery.app.task import Context  # the request object Celery's worker hands to its backend
from celery.result import ResultSet as CeleryResultSet

from rpcresults import ResultSet, states
from rpcresults.result import AsyncResult as OurAsyncResult
from tests.helpers import wait_until
from tests.conftest import new_id

pytestmark = pytest.mark.celery

WAIT = 10.0

EXPECTED_PROPERTIES = {
    'content_type': 'application/json',
    'content_encoding': 'utf-8',
    'application_headers': {},
    'delivery_mode': 1,
    'priority': 0,
}

CELERY_KEY_ORDER = ['status', 'result', 'traceback', 'children', 'date_done', 'task_id']


class BillingError(Exception):
    """A user exception both sides can find (this module is imported in the client process)."""


# -- helpers ----------------------------------------------------------------------------------------




@pytest.fixture
def make_queue(raw: amqp.Connection) -> Callable[[], str]:
    """New queues of the test's own, exclusive to the raw connection."""
    def make() -> str:
        name = f'rpcresults-wire-{new_id()}'
        raw.channel().queue_declare(name, exclusive=True, auto_delete=True)
        return name
    return make


def take(raw: amqp.Connection, queue: str) -> amqp.Message:
    channel = raw.channel()
    message = wait_until(lambda: channel.basic_get(queue, no_ack=True), what=f'a message in {queue}')
    channel.close()
    return message


@pytest.fixture
def celery_app(broker_url: str):
    application = Celery('wire-tests', broker=broker_url, backend='rpc://')
    application.conf.result_expires = 60  # Celery's reply queue: x-expires 60 s, in case a test dies
    yield application
    backend = application.backend
    consumer = getattr(backend, 'result_consumer', None)
    if consumer is not None and getattr(consumer, '_consumer', None) is not None:
        try:
            consumer.stop()
        except Exception:  # closing anyway
            pass
    application.close()


def celery_request(reply_to: str, correlation_id: str, **fields: Any) -> Context:
    """The request object a Celery worker hands to its backend."""
    return Context(reply_to=reply_to, correlation_id=correlation_id, **fields)


def compare_bodies(ours: amqp.Message, theirs: amqp.Message) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """Assert both published messages are the same on the wire, but for date_done's value."""
    assert ours.properties == theirs.properties
    assert ours.headers == {} and theirs.headers == {}
    ours_body = json.loads(ours.body)
    theirs_body = json.loads(theirs.body)
    assert list(ours_body) == list(theirs_body), 'key order differs from Celery'
    assert list(ours_body)[-1] == 'task_id'
    for key in theirs_body:
        if key == 'date_done':
            continue
        assert ours_body[key] == theirs_body[key], f'{key!r} differs from Celery'
    ours_done, theirs_done = ours_body['date_done'], theirs_body['date_done']
    assert (ours_done is None) == (theirs_done is None)
    if theirs_done is not None:
        ours_dt = datetime.fromisoformat(ours_done)
        theirs_dt = datetime.fromisoformat(theirs_done)
        assert (ours_dt.utcoffset() is None) == (theirs_dt.utcoffset() is None)
        # byte for byte, once the two timestamps are swapped
        ours_raw = ours.body if isinstance(ours.body, bytes) else ours.body.encode()
        theirs_raw = theirs.body if isinstance(theirs.body, bytes) else theirs.body.encode()
        assert ours_raw.replace(ours_done.encode(), theirs_done.encode()) == theirs_raw
    else:
        assert ours.body == theirs.body
    return ours_body, theirs_body


# -- (a) what our worker publishes, read raw ---------------------------------------------------------
def test_result_message_properties_exactly(worker, raw, make_queue):
    queue = make_queue()
    tid, cid = new_id(), new_id()
    worker.mark_as_done(tid, {'sum': 3}, request={'reply_to': queue, 'correlation_id': cid})
    message = take(raw, queue)
    assert message.properties == dict(EXPECTED_PROPERTIES, correlation_id=cid)
    assert message.headers == {}
    assert message.delivery_info['exchange'] == ''
    assert message.delivery_info['routing_key'] == queue
    body = json.loads(message.body)
    assert list(body) == CELERY_KEY_ORDER
    assert body['task_id'] == tid
    assert body['status'] == 'SUCCESS' and body['result'] == {'sum': 3}


def test_correlation_id_defaults_to_the_task_id(worker, raw, make_queue):
    queue = make_queue()
    tid = new_id()
    worker.mark_as_done(tid, 1, request={'reply_to': queue})
    assert take(raw, queue).properties['correlation_id'] == tid


MARKER_VALUE = {
    'when': datetime(2024, 5, 17, 12, 30, 1, 123456, tzinfo=timezone.utc),
    'naive': datetime(2001, 2, 3, 4, 5, 6),
    'day': date(2024, 1, 2),
    'uid': uuid.UUID('12345678-1234-5678-1234-567812345678'),
    'amount': Decimal('12.50'),
    'blob': b'\x00\x01binary\xff',
    'text': b'plain ascii bytes',
    'nested': [Decimal('0.1'), {'at': datetime(1999, 12, 31, 23, 59, 59, tzinfo=timezone.utc)}],
}


def _publish_both(kind: str, worker: Any, celery_app: Celery, q_ours: str, q_celery: str,
                  tid: str) -> None:
    fields = {'group': 'group-1', 'parent_id': 'parent-1'}
    ours_req = celery_request(q_ours, tid, **fields)
    theirs_req = celery_request(q_celery, tid, **fields)
    backend = celery_app.backend
    traceback = 'Traceback (most recent call last):\n  File "t.py", line 1, in <module>\nKeyError: x\n'
    if kind == 'done':
        worker.mark_as_done(tid, {'answer': 42, 'list': [1, 'two', None]}, request=ours_req)
        backend.mark_as_done(tid, {'answer': 42, 'list': [1, 'two', None]}, request=theirs_req)
    elif kind == 'failure-builtin':
        worker.mark_as_failure(tid, KeyError('missing', 3), traceback=traceback, request=ours_req)
        backend.mark_as_failure(tid, KeyError('missing', 3), traceback=traceback, request=theirs_req)
    elif kind == 'failure-user':
        worker.mark_as_failure(tid, BillingError('declined', {'code': 402}), traceback=traceback,
                               request=ours_req)
        backend.mark_as_failure(tid, BillingError('declined', {'code': 402}), traceback=traceback,
                                request=theirs_req)
    elif kind == 'started':
        # a Celery worker stores STARTED with {"pid", "hostname"} and the request
        worker.mark_as_started(tid, request=ours_req, pid=4242, hostname='celery@node1')
        backend.store_result(tid, {'pid': 4242, 'hostname': 'celery@node1'}, states.STARTED,
                             request=theirs_req)
    elif kind == 'markers':
        worker.mark_as_done(tid, MARKER_VALUE, request=ours_req)
        backend.mark_as_done(tid, MARKER_VALUE, request=theirs_req)
    elif kind == 'no-group':
        worker.mark_as_done(tid, 'x', request=celery_request(q_ours, tid))
        backend.mark_as_done(tid, 'x', request=celery_request(q_celery, tid))
    else:  # pragma: no cover
        raise AssertionError(kind)


@pytest.mark.parametrize('kind', ['done', 'failure-builtin', 'failure-user', 'started', 'markers',
                                  'no-group'])
def test_body_matches_celery(kind, worker, celery_app, raw, make_queue):
    q_ours, q_celery = make_queue(), make_queue()
    tid = new_id()
    _publish_both(kind, worker, celery_app, q_ours, q_celery, tid)
    ours, theirs = take(raw, q_ours), take(raw, q_celery)
    assert theirs.properties == dict(EXPECTED_PROPERTIES, correlation_id=tid)  # the oracle itself
    ours_body, _ = compare_bodies(ours, theirs)
    if kind.startswith('failure'):
        assert set(ours_body['result']) == {'exc_type', 'exc_message', 'exc_module'}
    if kind == 'markers':
        assert '"__type__"' in ours.body if isinstance(ours.body, str) else b'"__type__"' in ours.body


def test_children_match_celery(worker, celery_app, raw, make_queue, app):
    q_ours, q_celery = make_queue(), make_queue()
    tid, child_a, child_b = new_id(), new_id(), new_id()
    ours_req = celery_request(q_ours, tid, _children=[OurAsyncResult(child_a, app=app),
                                                       OurAsyncResult(child_b, app=app)])
    theirs_req = celery_request(q_celery, tid, _children=[celery_app.AsyncResult(child_a),
                                                           celery_app.AsyncResult(child_b)])
    worker.mark_as_done(tid, 'parent', request=ours_req)
    celery_app.backend.mark_as_done(tid, 'parent', request=theirs_req)
    ours_body, theirs_body = compare_bodies(take(raw, q_ours), take(raw, q_celery))
    assert [child[0][0] for child in theirs_body['children']] == [child_a, child_b]


# -- (b) Celery-format messages published with plain kombu reach our client --------------------------
def celery_body(tid: str, status: str, result: Any, traceback: Optional[str] = None) -> Dict[str, Any]:
    return {'status': status, 'result': result, 'traceback': traceback, 'children': [],
            'date_done': datetime.now(timezone.utc).isoformat() if status in states.READY_STATES else None,
            'task_id': tid}


@pytest.fixture
def kombu_producer(broker_url: str):
    with kombu.Connection(broker_url) as conn:
        yield kombu.Producer(conn.channel())


def test_kombu_published_results_reach_get_and_join_native(app, client, kombu_producer):
    client.result_consumer.start()
    single = new_id()
    kombu_producer.publish(celery_body(single, 'SUCCESS', {'v': 1}), routing_key=client.oid,
                           correlation_id=single, serializer='json')
    assert app.AsyncResult(single).get(timeout=WAIT) == {'v': 1}

    tids = [new_id() for _ in range(200)]
    for index, tid in reversed(list(enumerate(tids))):
        kombu_producer.publish(celery_body(tid, 'SUCCESS', index), routing_key=client.oid,
                               correlation_id=tid, serializer='json')
    assert ResultSet([app.AsyncResult(tid) for tid in tids]).join_native(timeout=WAIT) == list(range(200))


def test_kombu_published_markers_and_failure(app, client, kombu_producer):
    client.result_consumer.start()
    tid = new_id()
    kombu_producer.publish(celery_body(tid, 'SUCCESS', MARKER_VALUE), routing_key=client.oid,
                           correlation_id=tid, serializer='json')
    assert app.AsyncResult(tid).get(timeout=WAIT) == MARKER_VALUE

    failed = new_id()
    exc = {'exc_type': 'KeyError', 'exc_message': ['nope', 2], 'exc_module': 'builtins'}
    kombu_producer.publish(celery_body(failed, 'FAILURE', exc, 'Traceback...'), routing_key=client.oid,
                           correlation_id=failed, serializer='json')
    with pytest.raises(KeyError) as excinfo:
        app.AsyncResult(failed).get(timeout=WAIT)
    assert excinfo.value.args == ('nope', 2)


def test_kombu_published_without_correlation_id_routes_by_body_task_id(app, client, kombu_producer):
    """Old Celery versions sent no correlation_id: the body's task_id identifies the task."""
    client.result_consumer.start()
    tid = new_id()
    kombu_producer.publish(celery_body(tid, 'SUCCESS', 'by body'), routing_key=client.oid,
                           serializer='json')
    assert app.AsyncResult(tid).get(timeout=WAIT) == 'by body'


# -- (c) Celery's own rpc backend publishing to our client -------------------------------------------
def test_celery_worker_side_to_our_client(app, client, celery_app):
    client.result_consumer.start()
    backend = celery_app.backend

    done = new_id()
    backend.mark_as_done(done, {'from': 'celery', 'n': [1, 2]}, request=celery_request(client.oid, done))
    assert app.AsyncResult(done).get(timeout=WAIT) == {'from': 'celery', 'n': [1, 2]}

    markers = new_id()
    backend.mark_as_done(markers, MARKER_VALUE, request=celery_request(client.oid, markers))
    assert app.AsyncResult(markers).get(timeout=WAIT) == MARKER_VALUE

    started = new_id()
    result = app.AsyncResult(started)
    backend.store_result(started, {'pid': 9, 'hostname': 'c@h'}, states.STARTED,
                         request=celery_request(client.oid, started))
    wait_until(lambda: result.state == states.STARTED, what='STARTED from Celery')
    assert result.info == {'pid': 9, 'hostname': 'c@h'}

    for exc in (KeyError('gone', 1), BillingError('declined', 402)):
        failed = new_id()
        backend.mark_as_failure(failed, exc, traceback='tb text', request=celery_request(client.oid, failed))
        with pytest.raises(type(exc)) as excinfo:
            app.AsyncResult(failed).get(timeout=WAIT)
        assert type(excinfo.value) is type(exc)
        assert excinfo.value.args == exc.args

    revoked = new_id()
    backend.mark_as_revoked(revoked, reason='terminated', request=celery_request(client.oid, revoked))
    result = app.AsyncResult(revoked)
    with pytest.raises(Exception) as excinfo:
        result.get(timeout=WAIT)
    assert type(excinfo.value).__name__ == 'TaskRevokedError'
    assert result.state == states.REVOKED


def test_celery_published_results_join_native(app, client, celery_app):
    client.result_consumer.start()
    tids = [new_id() for _ in range(100)]
    for index, tid in enumerate(tids):
        celery_app.backend.mark_as_done(tid, index * 2, request=celery_request(client.oid, tid))
    assert ResultSet([app.AsyncResult(tid) for tid in tids]).join_native(timeout=WAIT) == [
        index * 2 for index in range(100)]


# -- (d) our worker publishing to a Celery client ---------------------------------------------------
@pytest.fixture
def celery_reply_queue(celery_app: Celery, broker_url: str) -> str:
    """Celery's client reply queue, declared as Celery declares it, before anything is published."""
    backend = celery_app.backend
    with kombu.Connection(broker_url) as conn:
        backend.binding(conn.default_channel).declare()
    return backend.oid


def test_our_worker_to_a_celery_client(worker, celery_app, celery_reply_queue):
    tid = new_id()
    worker.mark_as_done(tid, {'from': 'rpcresults', 'when': MARKER_VALUE['when']},
                        request={'reply_to': celery_reply_queue, 'correlation_id': tid})
    assert celery_app.AsyncResult(tid).get(timeout=WAIT) == {'from': 'rpcresults',
                                                             'when': MARKER_VALUE['when']}

    for exc in (KeyError('missing', 5), BillingError('declined', 402)):
        failed = new_id()
        worker.mark_as_failure(failed, exc, traceback='tb',
                               request={'reply_to': celery_reply_queue, 'correlation_id': failed})
        with pytest.raises(type(exc)) as excinfo:
            celery_app.AsyncResult(failed).get(timeout=WAIT)
        assert type(excinfo.value) is type(exc)
        assert excinfo.value.args == exc.args


def test_our_worker_to_a_celery_client_in_a_thread(worker, celery_app):
    """Celery's client starts consuming first (get() in a thread), then our worker answers."""
    tid = new_id()
    got: Dict[str, Any] = {}

    def celery_client() -> None:
        try:
            got['value'] = celery_app.AsyncResult(tid).get(timeout=WAIT)
            got['oid'] = celery_app.backend.oid
        except BaseException as exc:  # reported below
            got['error'] = exc

    # Celery's backend (and its oid) is per thread: learn the thread's oid from the thread itself
    oid_ready = threading.Event()
    oid_box: List[str] = []

    def run() -> None:
        oid_box.append(celery_app.backend.oid)
        with kombu.Connection(celery_app.conf.broker_url) as conn:
            celery_app.backend.binding(conn.default_channel).declare()
        oid_ready.set()
        try:
            celery_client()
        finally:
            try:
                celery_app.backend.result_consumer.stop()  # this thread's consumer connection
            except Exception:  # closing anyway
                pass

    thread = threading.Thread(target=run)
    thread.start()
    assert oid_ready.wait(WAIT)
    worker.mark_as_done(tid, 'answered', request={'reply_to': oid_box[0], 'correlation_id': tid})
    thread.join(WAIT + 5)
    assert 'error' not in got, got.get('error')
    assert got['value'] == 'answered'
    assert got['oid'] == oid_box[0]


def test_our_worker_states_to_a_celery_join_native(worker, celery_app, celery_reply_queue):
    tids = [new_id() for _ in range(50)]
    for index, tid in enumerate(tids):
        request = {'reply_to': celery_reply_queue, 'correlation_id': tid}
        worker.mark_as_started(tid, request=request, pid=index, hostname='ours@node')
        worker.mark_as_done(tid, index, request=request)
    results = CeleryResultSet([celery_app.AsyncResult(tid) for tid in tids])
    assert results.join_native(timeout=WAIT) == list(range(50))
