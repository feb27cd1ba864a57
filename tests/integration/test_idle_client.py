"""A client that sends nothing and waits for nothing for a long time (a web process between
requests): its consumer connection is dropped for missed heartbeats and its unused reply queue
expires; its next request must still get its reply."""
from __future__ import annotations

import time

import kombu

from rpcresults import AsyncResult

from ..conftest import make_app, new_id, request_for
from tests.helpers import queue_counts


def test_an_idle_clients_next_request_gets_its_reply_after_its_queue_expired(broker_url, raw):
    app = make_app(broker_url, broker_heartbeat=1, result_reply_queue_expires=2)
    worker_app = make_app(broker_url)
    client = app.backend
    worker = worker_app.create_backend()
    try:
        with app.connection(heartbeat=0) as connection:  # one request connection, as a Client keeps
            producer = kombu.Producer(connection)
            first = new_id()
            client.on_task_call(producer, first)
            worker.store_result(first, 1, 'SUCCESS', request=request_for(client, first))
            assert AsyncResult(first, backend=client).get(timeout=15) == 1

            # nobody waits: no heartbeats, the broker drops the consumer, the unused queue expires
            time.sleep(10)
            assert queue_counts(raw, client.oid) is None, 'the scenario needs the reply queue to have expired'

            second = new_id()
            client.on_task_call(producer, second)
            worker.store_result(second, 2, 'SUCCESS', request=request_for(client, second))
            assert worker.collect_returns(timeout=1) == 0  # the reply found its queue
            assert AsyncResult(second, backend=client).get(timeout=30) == 2
    finally:
        worker.close()
        worker_app.close()
        app.close()
