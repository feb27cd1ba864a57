"""A broker restart, on a private RabbitMQ node of the tests' own (tests/rabbit_node.py).

The shared broker is never touched. What these tests pin down:

* a waiter blocked in ``get()`` while the node stops and starts again reconnects to
  its (durable) reply queue and receives a result published after the restart;
* what the restart loses: replies waiting in the reply queue -- ready, or delivered
  and not yet acked -- survive only when published persistent
  (``result_persistent=True``, delivery_mode 2); transient ones (the default,
  delivery_mode 1) are dropped by RabbitMQ, and the waiter then times out.

Every wait is bounded; no assertion depends on elapsed time.
"""
from __future__ import annotations

import threading
from typing import Any, Callable, Iterator

import pytest

from rpcresults import App
from rpcresults.exceptions import TimeoutError

from ..conftest import make_app, new_id
from ..helpers import (Call, attach_waiter, bound, closing_apps, queue_counts, raw_connection, started_listener,
                       wait_until)
from ..rabbit_node import RabbitNode, private_node  # noqa: F401  (module-scoped fixture)

#: Generous: a restart here takes ~6 s; the consumer's reconnecting is bounded by this deadline.
GET_TIMEOUT = 120.0
#: Retries (0, 0.5, 1, 1.5, then every 2 s) cover a minute-long outage; the deadline bounds them first.
MAX_RETRIES = 40


# -- helpers ---------------------------------------------------------------------------------
def publish(worker: Any, oid: str, task_id: str, value: Any) -> None:
    """Publish SUCCESS ``value`` for ``task_id`` to reply queue ``oid``, as a worker does."""
    worker.mark_as_done(task_id, value, request={'reply_to': oid, 'correlation_id': task_id})


@pytest.fixture
def node_app(private_node: RabbitNode) -> Iterator[Callable[..., App]]:  # noqa: F811
    """Factory of apps on the private node; every backend they made is closed after the test."""
    def make(**conf: Any) -> App:
        conf.setdefault('broker_connection_max_retries', MAX_RETRIES)
        return make_app(private_node.url, **conf)

    yield from closing_apps(make)


# -- a waiter across a restart -----------------------------------------------------------------
def test_get_blocked_across_a_restart_receives_a_result_published_after_it(private_node, node_app):  # noqa: F811
    app = node_app()
    client = app.create_backend()
    worker = app.create_backend()
    task_id = new_id()
    seen = threading.Event()
    result = bound(client, task_id)
    call = Call(lambda: result.get(timeout=GET_TIMEOUT, on_message=started_listener(seen)), name='get-across-restart')
    call.start()
    attach_waiter(client, worker, task_id, seen)
    link_before = client.result_consumer.connection.channel.connection  # py-amqp's, under the consuming channel

    private_node.restart()
    assert call.is_alive(), f'get() ended during the restart: {call.error!r}'

    after_restart = app.create_backend()  # a worker that connects to the node as it is now
    publish(after_restart, client.oid, task_id, 'after-the-restart')

    assert call.result(timeout=GET_TIMEOUT + 30) == 'after-the-restart'
    stats = client.stats()
    assert stats['reconnects'] >= 1
    assert stats['queues_lost'] == 0  # the durable reply queue came back with the node
    assert client.result_consumer.connection.channel.connection is not link_before  # a new connection

    # the client keeps working on its new connection
    second = new_id()
    publish(after_restart, client.oid, second, 'still-here')
    assert bound(client, second).get(timeout=30) == 'still-here'


# -- what a restart loses --------------------------------------------------------------------------
@pytest.mark.parametrize('persistent', [False, True], ids=['transient', 'persistent'])
def test_replies_in_the_queue_survive_a_restart_only_when_persistent(persistent, private_node, node_app):  # noqa: F811
    app = node_app(result_persistent=persistent)
    client = app.create_backend()
    client.result_consumer.start()  # declares the durable reply queue and consumes it
    oid = client.oid
    client.close()  # nobody consumes the queue now; it stays (durable, x-expires 60 s)

    worker = app.create_backend()
    unacked_id, ready_id = new_id(), new_id()
    publish(worker, oid, unacked_id, 'was-unacked')
    publish(worker, oid, ready_id, 'was-ready')

    holder = raw_connection(private_node.url)
    try:
        wait_until(lambda: queue_counts(holder, oid) == (2, 0), 20, 'two replies waiting in the queue')
        # the first one is delivered to a consumer that has not acked it when the node goes down
        held = holder.channel().basic_get(oid, no_ack=False)
        assert held is not None
        assert held.properties['correlation_id'] == unacked_id
        assert held.properties['delivery_mode'] == (2 if persistent else 1)
        assert queue_counts(holder, oid) == (1, 0)

        private_node.restart()
    finally:
        holder.collect()  # its socket died with the node

    raw = raw_connection(private_node.url)
    try:
        counts = queue_counts(raw, oid)
    finally:
        raw.close()
    assert counts is not None, 'the durable reply queue did not survive the restart'
    assert counts == ((2, 0) if persistent else (0, 0))

    reader = app.create_backend()
    reader.oid = oid  # the same client identity (reply queue), as a restarted client would reuse
    results = [bound(reader, unacked_id), bound(reader, ready_id)]
    if persistent:
        assert [r.get(timeout=30) for r in results] == ['was-unacked', 'was-ready']
        assert reader.stats()['queues_lost'] == 0
    else:
        for r in results:
            with pytest.raises(TimeoutError):
                r.get(timeout=3)
        raw = raw_connection(private_node.url)
        try:
            assert queue_counts(raw, oid) == (0, 1)  # nothing came back; the reader consumes the queue
        finally:
            raw.close()
