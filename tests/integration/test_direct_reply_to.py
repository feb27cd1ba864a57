"""Direct reply-to (``rpc+direct://``) on the real broker: round trips, a bulk join, and what a
lost connection honestly means there (in-flight replies are gone: waiters get ReplyQueueLost,
not a hang; calls made after the reconnect work)."""
from __future__ import annotations

import asyncio
import queue
import threading
import time
import uuid
from typing import Any, Iterator, List, Optional

import pytest

from rpcresults import Client, ReplyQueueLost, ResultSet
from rpcresults.backends.direct import DIRECT_REPLY_QUEUE, DirectReplyBackend
from tests.conftest import make_app
from tests.helpers import Call, wait_until
from tests.proxy import TcpProxy
from tests.responders import ServedResponder


def double(payload: Any) -> Any:
    return payload * 2


class Running(ServedResponder):
    """A responder on an app of its own (plain rpc://, straight to the broker), answering in a thread."""

    def __init__(self, broker_url: str, fn: Any = double) -> None:
        self.app = make_app(broker_url)
        self.queue = f'rpcresults-test-direct-{uuid.uuid4().hex[:12]}'
        super().__init__(self.app, self.queue, fn)

    def close(self) -> Optional[BaseException]:
        error = super().close()
        self.app.close()
        return error


@pytest.fixture
def running(broker_url: str) -> Iterator[Running]:
    served = Running(broker_url)
    yield served
    served.close()


@pytest.fixture
def direct_app(broker_url: str):
    app = make_app(broker_url, result_backend='rpc+direct://')
    yield app
    app.close()


def test_round_trip_through_the_pseudo_queue(direct_app, running: Running) -> None:
    seen = []
    running.responder.handler = lambda payload: seen.append(payload) or payload * 2
    client = Client(direct_app)
    try:
        assert isinstance(client.backend, DirectReplyBackend)
        assert client.oid == DIRECT_REPLY_QUEUE
        assert client.call(running.queue, 21).get(timeout=10) == 42
        assert seen == [21]
        assert client.backend.stats()['received'] == 1
    finally:
        client.close()


def test_five_hundred_results_joined(direct_app, running: Running) -> None:
    client = Client(direct_app)
    try:
        results = ResultSet([client.call(running.queue, index) for index in range(500)])
        assert results.join_native(timeout=60) == [index * 2 for index in range(500)]
        assert running.responder.stats()['succeeded'] == 500
    finally:
        client.close()


def test_replies_in_flight_at_a_disconnect_are_lost_and_waiters_are_told(broker_url: str) -> None:
    gate = threading.Event()
    entered = threading.Event()

    def slow(payload: Any) -> Any:
        entered.set()
        gate.wait(30)
        return payload

    served = Running(broker_url, slow)
    try:
        with TcpProxy.for_broker(broker_url) as proxy:
            app = make_app(proxy.url_for(broker_url), result_backend='rpc+direct://')
            client = Client(app)
            try:
                pending = [client.call(served.queue, index) for index in range(3)]
                assert entered.wait(15), 'the responder never got the first request'
                assert proxy.cut() >= 1
                gate.set()
                # every reply is published, to an address whose channel is gone
                wait_until(lambda: served.responder.stats()['succeeded'] == 3, timeout=15,
                           what='the responder to answer all three')
                with pytest.raises(ReplyQueueLost) as info:
                    ResultSet(pending).join_native(timeout=20)
                assert 'direct reply-to' in str(info.value)
                for result in pending:  # a later wait is told too (nothing can deliver them now)
                    with pytest.raises(ReplyQueueLost):
                        result.get(timeout=20)
                stats = client.backend.stats()
                assert stats['reconnects'] >= 1 and stats['queues_lost'] == 1
                # the new channel has a new address: calls made now are answered
                assert client.call(served.queue, 5).get(timeout=15) == 5
            finally:
                client.close()
                app.close()
    finally:
        gate.set()
        served.close()


def test_memory_transport_is_refused_clearly() -> None:
    app = make_app(f'memory://{uuid.uuid4().hex}', result_backend='rpc+direct://')
    try:
        with pytest.raises(Exception) as info:
            Client(app).call('nowhere', 1)
        assert 'RabbitMQ' in str(info.value)
    finally:
        app.close()


def test_a_request_to_a_missing_exchange_fails_alone(direct_app, running: Running) -> None:
    from rpcresults.exceptions import ImproperlyConfigured
    client = Client(direct_app)
    try:
        pending = client.call(running.queue, 5)
        with pytest.raises(ImproperlyConfigured, match='no-such-exchange'):
            client.call(running.queue, 6, exchange=f'no-such-exchange-{uuid.uuid4().hex}')
        assert pending.get(timeout=15) == 10  # the consuming channel, and this reply, survived
        assert client.backend.stats()['reconnects'] == 0
    finally:
        client.close()


def test_calls_and_waits_from_several_threads_and_a_loop_at_once(direct_app, running: Running) -> None:
    """Requests go out on the connection a leader thread (or the asyncio reader) is reading:
    publishing must only write, or the two readers split the frame stream between them."""
    client = Client(direct_app)
    per_caller, awaited = 700, 150
    sent: 'queue.Queue[Any]' = queue.Queue()
    values: List[Any] = []
    errors: List[BaseException] = []

    def caller(base: int) -> None:
        for index in range(base, base + per_caller):
            sent.put((index, client.call(running.queue, index)))
        sent.put(None)

    def getter() -> None:
        while True:
            item = sent.get(timeout=60)
            if item is None:
                return
            index, result = item
            try:
                values.append(result.get(timeout=20) == index * 2)
            except Exception as exc:  # counted: every value must arrive
                errors.append(exc)

    async def call_and_await() -> int:
        good = 0
        for index in range(awaited):
            good += await client.call(running.queue, -index).aget(timeout=20) == -index * 2
        return good

    threads = [Call(lambda: caller(0), 'caller-1'), Call(lambda: caller(per_caller), 'caller-2'),
               Call(getter, 'getter-1'), Call(getter, 'getter-2'),
               Call(lambda: asyncio.run(call_and_await()), 'awaiter')]
    try:
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 120
        outcomes = [thread.outcome(max(deadline - time.monotonic(), 1)) for thread in threads]
        assert [error for _, error in outcomes] == [None] * len(threads)
        assert errors == []
        assert values.count(True) == 2 * per_caller
        assert outcomes[-1][0] == awaited
        stats = client.backend.stats()
        assert (stats['reconnects'], stats['queues_lost'], stats['malformed_dropped']) == (0, 0, 0)
    finally:
        client.close()


def test_calls_after_idling_past_the_heartbeat_are_answered(broker_url: str, running: Running) -> None:
    """Nothing sends heartbeats while nobody waits, so the broker drops the idle connection:
    the next request must reconnect first, not go into (or fail on) the dead socket."""
    app = make_app(broker_url, result_backend='rpc+direct://', broker_heartbeat=1)
    client = Client(app)
    try:
        assert client.call(running.queue, 1).get(timeout=10) == 2
        time.sleep(5)  # > 2 heartbeat intervals of silence: the broker closes the connection
        results = [client.call(running.queue, index) for index in range(2, 7)]
        assert [result.get(timeout=15) for result in results] == [4, 6, 8, 10, 12]
        assert client.backend.stats()['reconnects'] >= 1  # the idle connection really was replaced
    finally:
        client.close()
        app.close()


def test_a_call_after_the_backend_was_closed_is_answered(direct_app, running: Running) -> None:
    """close() then a new call: reopening the consumer must not fail the request about to be sent."""
    client = Client(direct_app)
    try:
        assert client.call(running.queue, 1).get(timeout=10) == 2
        client.backend.close()
        assert client.call(running.queue, 2).get(timeout=10) == 4
        client.backend.close()
        assert client.call(running.queue, 3).get(timeout=10) == 6
    finally:
        client.close()


def test_stop_never_holds_the_write_lock_while_waiting_for_the_connection_lock(direct_app,
                                                                              running: Running) -> None:
    """Lock order (``rpcresults.engine.connection``): the connection lock, then the write lock. A
    reader consuming again after a cancel, or a request being tracked and sent, holds the
    connection lock and then wants the write lock, so stop() (waiting for the connection lock
    here) must not hold the write lock meanwhile."""
    client = Client(direct_app)
    connection = client.backend.result_consumer.connection
    try:
        assert client.call(running.queue, 1).get(timeout=10) == 2
        with connection.lock:  # as a reader holds it around a recovery
            stopping = Call(client.backend.close, 'stop')
            stopping.start()
            wait_until(lambda: connection.closed, timeout=10, what='stop() to begin')
            time.sleep(0.5)  # let it reach the connection lock (past the leader's grace period)
            got = connection.write_lock.acquire(timeout=5)
            if got:
                connection.write_lock.release()
        _, error = stopping.outcome(15)
        assert got, ('stop() held the write lock while waiting for the connection lock: '
                     'a recovery would deadlock')
        assert error is None
        assert client.call(running.queue, 2).get(timeout=10) == 4
    finally:
        client.close()
