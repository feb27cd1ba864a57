"""Worker side on the real broker: unroutable results are returned and counted (``mandatory``),
publisher confirms make the broker's refusal an error."""
from __future__ import annotations

import logging
import time

import pytest

from rpcresults import AsyncResult
from rpcresults.exceptions import ResultNotDelivered

from ..conftest import make_app, new_id, request_for


def missing_queue_request(task_id: str) -> dict:
    return {'reply_to': f'rpcresults-test-missing-{task_id}', 'correlation_id': task_id}


def test_result_for_a_missing_reply_queue_is_returned_logged_and_counted(app, caplog):
    worker = app.create_backend()
    task_id = new_id()
    try:
        with caplog.at_level(logging.WARNING, logger='rpcresults.engine.publish'):
            worker.store_result(task_id, 42, 'SUCCESS', request=missing_queue_request(task_id))
            returned = worker.collect_returns(timeout=10)
    finally:
        worker.close()
    assert returned == 1
    stats = worker.stats()
    assert stats['published'] == 1 and stats['returned'] == 1 and stats['nacked'] == 0
    warnings = [r.getMessage() for r in caplog.records if 'returned by the broker' in r.getMessage()]
    assert len(warnings) == 1 and task_id in warnings[0]


def test_mandatory_can_be_switched_off(broker_url):
    app = make_app(broker_url, result_publish_mandatory=False)
    worker = app.create_backend()
    try:
        worker.store_result(new_id(), 1, 'SUCCESS', request=missing_queue_request(new_id()))
        # a marker published after it, mandatory, to a missing queue: the first return seen is the marker's
        worker.publisher.mandatory = True
        marker = new_id()
        worker.store_result(marker, 2, 'SUCCESS', request=missing_queue_request(marker))
        assert worker.collect_returns(timeout=10) == 1
    finally:
        worker.close()
        app.close()


def test_returns_are_counted_at_once_with_publisher_confirms(broker_url, client):
    client.result_consumer.start()  # a client declares its reply queue before sending requests
    app = make_app(broker_url, result_publish_confirm=True)
    worker = app.create_backend()
    try:
        first = new_id()
        worker.store_result(first, 'x', 'SUCCESS', request=missing_queue_request(first))
        assert worker.worker_stats()['returned'] == 1  # handled while the publish waited for its confirm
        delivered = new_id()
        worker.store_result(delivered, 'y', 'SUCCESS', request=request_for(client, delivered))
        assert worker.stats()['published'] == 2
    finally:
        worker.close()
        app.close()
    assert AsyncResult(delivered, backend=client).get(timeout=15) == 'y'


def test_a_nacked_result_raises_result_not_delivered(broker_url, raw):
    queue = f'rpcresults-test-full-{new_id()}'
    channel = raw.channel()
    channel.queue_declare(queue, auto_delete=False, arguments={
        'x-max-length': 1, 'x-overflow': 'reject-publish', 'x-expires': 60000})
    app = make_app(broker_url, result_publish_confirm=True)
    worker = app.create_backend()
    try:
        request = {'reply_to': queue, 'correlation_id': new_id()}
        worker.store_result(request['correlation_id'], 1, 'SUCCESS', request=request)
        second = new_id()
        with pytest.raises(ResultNotDelivered) as info:
            worker.store_result(second, 2, 'SUCCESS', request={'reply_to': queue, 'correlation_id': second})
        assert info.value.task_id == second and info.value.reply_to == queue
        assert worker.stats()['nacked'] == 1
        # the backend keeps publishing after a nack
        message = channel.basic_get(queue, no_ack=True)
        assert message is not None and message.properties['correlation_id'] == request['correlation_id']
        third = new_id()
        worker.store_result(third, 3, 'SUCCESS', request={'reply_to': queue, 'correlation_id': third})
        message = channel.basic_get(queue, no_ack=True)
        assert message is not None and message.properties['correlation_id'] == third
    finally:
        worker.close()
        app.close()
        channel.queue_delete(queue)


def test_an_idle_worker_keeps_its_publishing_connection(broker_url, client):
    # nothing reads the producer connection between publishes: with heartbeats on, the broker would
    # close it after two missed intervals and the next result could be written into a dead socket
    client.result_consumer.start()
    app = make_app(broker_url, broker_heartbeat=1)
    worker = app.create_backend()
    try:
        first = new_id()
        worker.store_result(first, 1, 'SUCCESS', request=request_for(client, first))
        assert worker.worker_stats()['publish_connections'] == 1
        time.sleep(4)  # four of the client's heartbeat intervals with no traffic
        second = new_id()
        worker.store_result(second, 2, 'SUCCESS', request=request_for(client, second))
        stats = worker.worker_stats()
        assert stats['published'] == 2
        assert stats['publish_connections'] == 1  # not re-established
    finally:
        worker.close()
        app.close()
    assert AsyncResult(first, backend=client).get(timeout=15) == 1
    assert AsyncResult(second, backend=client).get(timeout=15) == 2


def test_gathered_results_lost_with_their_connection_are_reported(broker_url, client, proxy):
    """Results gathered in the writer when the connection is cut are reported by gathering(), never
    counted as sent silently; published again, they go out on a new connection."""
    client.result_consumer.start()
    app = make_app(proxy.url_for(broker_url), broker_heartbeat=0)
    worker = app.create_backend()
    gathered = [new_id() for _ in range(6)]
    try:
        first = new_id()
        worker.store_result(first, 0, 'SUCCESS', request=request_for(client, first))  # connected
        with worker.publisher.gathering() as refused:
            for task_id in gathered[:5]:
                worker.store_result(task_id, 1, 'SUCCESS', request=request_for(client, task_id))
            proxy.cut()
            time.sleep(0.2)  # lets the cut reach the publishing socket (what happens, not a timing check)
            worker.store_result(gathered[5], 1, 'SUCCESS', request=request_for(client, gathered[5]))
        assert sorted(task_id for task_id, _ in refused) == sorted(gathered)
        for task_id, _ in refused:  # what a responder does: the requests run again
            worker.store_result(task_id, 2, 'SUCCESS', request=request_for(client, task_id))
        assert worker.worker_stats()['publish_connections'] == 2
    finally:
        worker.close()
        app.close()
    assert AsyncResult(first, backend=client).get(timeout=15) == 0
    assert [AsyncResult(task_id, backend=client).get(timeout=15) for task_id in gathered] == [2] * 6


def test_confirms_on_a_virtual_transport_publish_once_without_error(memory_app):
    """kombu's virtual transports have no publisher confirms: with them switched on, a result is
    published once and the publish returns."""
    memory_app.conf.result_publish_confirm = True
    worker = memory_app.create_backend()
    try:
        task_id = new_id()
        worker.store_result(task_id, 5, 'SUCCESS', request=request_for(memory_app.backend, task_id))
        assert worker.worker_stats()['published'] == 1
        assert AsyncResult(task_id, backend=memory_app.backend).get(timeout=10) == 5
    finally:
        worker.close()


def test_waiting_for_confirms_without_a_confirm_timeout(broker_url, client):
    client.result_consumer.start()
    app = make_app(broker_url, result_publish_confirm=True, result_publish_confirm_timeout=None)
    worker = app.create_backend()
    try:
        task_id = new_id()
        with worker.publisher.gathering() as refused:
            worker.store_result(task_id, 6, 'SUCCESS', request=request_for(client, task_id))
        assert refused == []
        assert worker.publisher.wait_confirms() == []
        assert worker.worker_stats()['unconfirmed'] == 0
    finally:
        worker.close()
        app.close()
    assert AsyncResult(task_id, backend=client).get(timeout=15) == 6
