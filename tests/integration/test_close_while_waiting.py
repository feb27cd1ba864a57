"""``backend.close()`` while waits are in progress: every wait begun before the close ends
with ``ResultBackendClosed``, close() itself returns, nothing reconnects behind it, and a wait begun
after it opens the backend again.

Waits run in threads of their own (a blocking ``get()``, an ``aget()`` on a loop of its own) while
another thread closes; everything is bounded by thread-join timeouts. "No connection is left" is
checked on the wire: the broker reports no consumer on the reply queue. Run on both state-table
twins by CI's two passes.
"""
from __future__ import annotations

import asyncio
from typing import Any

import pytest

from rpcresults.backends.asynchronous import ResultBackendClosed

from ..conftest import new_id, request_for
from ..helpers import Call, bound, wait_until

ITERATIONS = 20
BOUND = 15.0  # bound on any one thread


def consumers_on(raw: Any, queue: str) -> int:
    channel = raw.channel()
    try:
        return channel.queue_declare(queue=queue, passive=True).consumer_count
    finally:
        channel.close()


def await_in_own_loop(result: Any, timeout: float) -> Any:
    return asyncio.run(result.aget(timeout=timeout))


def test_close_ends_a_pending_await_and_a_pending_get_with_the_error(client, raw):
    consumer = client.result_consumer
    for iteration in range(ITERATIONS):
        consumer.start()  # an explicit start after close() opens the backend again
        assert consumers_on(raw, client.oid) == 1
        waiting_async = bound(client, new_id())
        waiting_sync = bound(client, new_id())
        calls = [Call(lambda result=waiting_async: await_in_own_loop(result, 30), name='aget'),
                 Call(lambda result=waiting_sync: result.get(timeout=30), name='get')]
        if iteration % 2:  # either one may be the thread blocked reading the socket
            calls.reverse()
        for call in calls:
            call.start()
            wait_until(lambda: client.stats()['reading'] == 1, 10, 'a wait to lead the read')
        # one await served by the asyncio reader, one blocking get(): two waits in progress
        wait_until(lambda: (client.stats()['aio_waits'], client.stats()['waits']) == (1, 2), 10,
                   'both waits in progress')
        closing = Call(client.close, name='close')
        closing.start()
        closing.result(BOUND)
        for call in calls:
            _, error = call.outcome(BOUND)
            assert isinstance(error, ResultBackendClosed), f'{call.name}: {error!r}'
            assert isinstance(error, ConnectionError)
        wait_until(lambda: client.stats()['aio_reader'] == 0, 10, 'the asyncio reader thread to end')
        stats = client.stats()
        assert stats['aio_waits'] == 0 and stats['waits'] == 0
        assert stats['connected'] == 0
        wait_until(lambda: consumers_on(raw, client.oid) == 0, 10, 'the broker to see no consumer')


@pytest.mark.parametrize('kind', ['get', 'aget'])
def test_a_wait_begun_after_close_opens_the_backend_again(kind, client, worker, raw):
    consumer = client.result_consumer
    consumer.start()
    client.close()
    assert consumers_on(raw, client.oid) == 0
    task_id = new_id()
    worker.mark_as_done(task_id, 42, request=request_for(client, task_id))
    result = bound(client, task_id)
    if kind == 'get':
        assert result.get(timeout=BOUND) == 42
    else:
        call = Call(lambda: await_in_own_loop(result, BOUND), name='aget')
        call.start()
        assert call.result(BOUND + 5) == 42
    assert consumers_on(raw, client.oid) == 1


def test_a_reader_stopped_by_close_does_not_reconnect(client, raw):
    """A read in progress at close() ends; nothing reconnects until a new wait."""
    consumer = client.result_consumer
    consumer.start()
    pending = bound(client, new_id())
    call = Call(lambda: pending.get(timeout=30), name='get')
    call.start()
    wait_until(lambda: client.stats()['reading'] == 1, 10, 'the get() to lead the read')
    client.close()
    _, error = call.outcome(BOUND)
    assert isinstance(error, ResultBackendClosed)
    with pytest.raises(ResultBackendClosed):
        consumer.drain_events(0)  # what a reader does next: no reconnect
    assert client.stats()['connected'] == 0
    wait_until(lambda: consumers_on(raw, client.oid) == 0, 10, 'the broker to see no consumer')


def test_close_ends_a_wait_that_is_retrying_its_connection(broker_url, proxy):
    from ..conftest import make_app
    app = make_app(proxy.url_for(broker_url))
    client = app.backend
    proxy.pause()  # every connection attempt is accepted, then closed at once
    try:
        waiter = Call(lambda: bound(client, new_id()).get(timeout=None), name='retrying-get')
        waiter.start()
        wait_until(lambda: proxy.refused >= 2, 30, 'the waiter retrying its connection')
        closer = Call(client.close, name='close')
        closer.start()
        closer.result(timeout=30)  # bounded: without the check between attempts it waits out every retry
        _, error = waiter.outcome(timeout=30)
        assert isinstance(error, ResultBackendClosed), repr(error)
        assert client.stats()['connected'] == 0
    finally:
        proxy.resume()
        app.close()
