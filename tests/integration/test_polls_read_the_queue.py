"""Polls read what the reply queue holds: ``state``, ``ready()`` and ``get_task_meta()`` see every
reply that reached the queue before the call, as Celery's ``basic_get`` poll does, and
``backlog_limit`` counts the replies waiting in the queue, not only those on the socket.

Every reply here is published with publisher confirms, so it is in the queue when the poll starts.
"""
from __future__ import annotations

import json
import threading
from typing import Iterator, List

import amqp
import pytest

from rpcresults import App, ResultSet, states
from rpcresults.exceptions import BacklogLimitExceeded
from tests.conftest import make_app, new_id
from tests.helpers import queue_counts, raw_connection, wait_until

WAIT = 30.0


@pytest.fixture(params=['fast', 'py-amqp'])
def reader(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both socket readers: our chunked reader, and py-amqp's own (``RPCRESULTS_NO_FAST_READ``)."""
    if request.param == 'py-amqp':
        monkeypatch.setenv('RPCRESULTS_NO_FAST_READ', '1')
    return str(request.param)


@pytest.fixture
def confirmed(broker_url: str) -> Iterator[amqp.Channel]:
    """A raw channel in confirm mode (see :func:`reply`)."""
    conn = raw_connection(broker_url)
    channel = conn.channel()
    channel.confirm_select()
    yield channel
    conn.close()


def reply(channel: amqp.Channel, queue: str, task_id: str, value: object, status: str = states.SUCCESS) -> None:
    body = json.dumps({'task_id': task_id, 'status': status, 'result': value, 'traceback': None,
                       'children': [], 'date_done': None})
    # returns once the broker confirmed it: the reply is in the queue
    channel.basic_publish_confirm(amqp.Message(body.encode(), content_type='application/json',
                                               content_encoding='utf-8', correlation_id=task_id),
                                  exchange='', routing_key=queue, confirm_timeout=WAIT)


def declared_app(broker_url: str) -> App:
    """An app whose reply queue exists (as ``send`` leaves it) but that never consumed it yet."""
    app = make_app(broker_url)
    conn = raw_connection(broker_url)
    try:
        backend = app.backend
        conn.channel().queue_declare(backend.oid, durable=True, auto_delete=False,
                                     arguments={'x-expires': 60000})
    finally:
        conn.close()
    return app


def test_the_first_state_sees_a_reply_waiting_in_the_queue(broker_url, confirmed, reader) -> None:
    for _ in range(5):  # each a new client whose first poll starts its consumer
        app = declared_app(broker_url)
        try:
            task_id = new_id()
            reply(confirmed, app.backend.oid, task_id, 'there')
            result = app.AsyncResult(task_id)
            assert result.state == states.SUCCESS
            assert result.result == 'there'
        finally:
            app.close()


def test_ready_and_get_task_meta_see_it_on_the_first_call(broker_url, confirmed, reader) -> None:
    app = declared_app(broker_url)
    try:
        first, second = new_id(), new_id()
        reply(confirmed, app.backend.oid, first, 1)
        assert app.backend.get_task_meta(first)['status'] == states.SUCCESS
        reply(confirmed, app.backend.oid, second, 2)
        assert app.AsyncResult(second).ready() is True
        third = new_id()
        reply(confirmed, app.backend.oid, third, 3)
        assert ResultSet([app.AsyncResult(third)]).ready() is True
    finally:
        app.close()


def test_backlog_limit_counts_the_replies_in_the_queue(broker_url, confirmed, reader) -> None:
    for _ in range(3):
        app = declared_app(broker_url)
        try:
            backend = app.backend
            wanted = new_id()
            others = [new_id() for _ in range(30)]
            for index, task_id in enumerate(others):
                reply(confirmed, backend.oid, task_id, index)
            with pytest.raises(BacklogLimitExceeded) as raised:
                backend.get_task_meta(wanted, backlog_limit=10)
            assert wanted in str(raised.value)
            # what was read on the way is kept; the rest is read by the next, larger poll
            assert backend.get_task_meta(wanted, backlog_limit=100)['status'] == states.PENDING
            assert backend.get_task_meta(others[29])['result'] == 29
            assert backend.stats()['received'] == 30
        finally:
            app.close()


def test_a_known_final_state_asks_the_broker_nothing(broker_url, confirmed) -> None:
    app = declared_app(broker_url)
    try:
        task_id = new_id()
        reply(confirmed, app.backend.oid, task_id, 'done')
        result = app.AsyncResult(task_id)
        assert result.get(timeout=WAIT) == 'done'
        before = app.backend.stats()['queue_polls']
        for _ in range(50):
            assert result.state == states.SUCCESS
            assert app.AsyncResult(task_id).state == states.SUCCESS
            assert app.backend.get_task_meta(task_id)['status'] == states.SUCCESS
        assert app.backend.stats()['queue_polls'] == before
        pending = app.AsyncResult(new_id())
        assert pending.state == states.PENDING
        assert app.backend.stats()['queue_polls'] == before + 1
    finally:
        app.close()


@pytest.mark.parametrize('connected', [True, False], ids=['connected', 'connecting'])
def test_a_poll_beside_a_reading_thread_sees_what_the_queue_held(broker_url, confirmed, connected) -> None:
    """Another thread leads the read (a blocked ``get()``, connected or still connecting): the
    poll asks the queue and waits for that reader to dispatch what it holds. (With py-amqp's own
    reader, TLS for one, that reader cannot pick the answer up: such a poll answers from the table.)"""
    app = declared_app(broker_url)
    backend = app.backend
    blocker = app.AsyncResult(new_id())
    errors: List[BaseException] = []

    def block() -> None:
        try:
            blocker.get(timeout=WAIT)
        except BaseException as exc:  # noqa: B036  (reported below)
            errors.append(exc)

    thread = threading.Thread(target=block)
    thread.start()
    try:
        wait_until(lambda: backend.stats()['reading'] == 1, what='the blocked get() reading')
        if connected:
            wait_until(lambda: backend.stats()['connected'] == 1, what='the blocked get() connected')
        for _ in range(20):
            task_id = new_id()
            reply(confirmed, backend.oid, task_id, 'beside')
            assert app.AsyncResult(task_id).state == states.SUCCESS
        assert backend.stats()['reading'] == 1
    finally:
        reply(confirmed, backend.oid, blocker.id, 'unblocked')
        thread.join(WAIT)
        app.close()
    assert not errors
    assert blocker.result == 'unblocked'


def test_the_queue_is_left_empty_by_a_poll(broker_url, confirmed) -> None:
    app = declared_app(broker_url)
    conn = raw_connection(broker_url)
    try:
        ids = [new_id() for _ in range(200)]
        for task_id in ids:
            reply(confirmed, app.backend.oid, task_id, task_id)
        assert app.AsyncResult(ids[-1]).state == states.SUCCESS
        assert app.backend.stats()['received'] == 200
        assert queue_counts(conn, app.backend.oid) == (0, 1)
    finally:
        conn.close()
        app.close()


def test_a_virtual_transport_poll_reads_the_queue_too(memory_app) -> None:
    """kombu's virtual transports (``memory://`` here) are polled the same way."""
    import kombu
    backend = memory_app.backend
    task_id = new_id()
    with memory_app.connection() as conn:
        producer = kombu.Producer(conn.channel())
        backend.on_task_call(producer, task_id)
        producer.publish({'task_id': task_id, 'status': states.SUCCESS, 'result': 'virtual',
                          'traceback': None, 'children': []},
                         routing_key=backend.oid, correlation_id=task_id, serializer='json')
    result = memory_app.AsyncResult(task_id)
    assert result.state == states.SUCCESS
    assert result.result == 'virtual'
    assert backend.stats()['queue_polls'] == 1
    assert backend.stats()['received'] == 1
