"""What the one wait core and the one reply connection get right under faults, on the real broker.

Each fault goes through a TCP proxy of the test's own (cut, refusing, or black-holed: it
accepts and never answers, as a hung broker would), never the shared broker:

* a wait whose deadline passes while the client reconnects raises rpcresults' ``TimeoutError``
  by its deadline (``get``, ``join_native``, ``iter_native`` and an await), whatever the
  connection attempts are doing;
* ``ready()``, ``state`` and ``completed_count()`` answer from the state table during an outage;
* a frame py-amqp cannot dispatch makes the client reconnect (counted), never reaches a waiter;
* a reply whose dispatch fails reaches its waiter as an error at once;
* ``stats()['tracked']`` drops as soon as result objects are collected.

The time bounds asserted are loose on purpose (seconds, against broker connection timeouts
of 30 s that the old code waited out): they tell "ended by its deadline" from "waited for the
connection attempt", and do not measure speed.
"""
from __future__ import annotations

import asyncio
import gc
import json
import pickle
import time
from collections.abc import Mapping
from typing import Any, Callable, Iterator

import amqp
import pytest

from rpcresults import ResultSet, TimeoutError
from rpcresults.exceptions import MalformedResult, ResultBackendClosed
from tests.amqp_frames import raw_frame
from tests.conftest import make_app, new_id, request_for
from tests.helpers import Call, bound, closing_apps, wait_until
from tests.proxy import TcpProxy

#: What the old code waited out before it noticed a deadline: one connection attempt.
SLOW_CONNECT = 30.0
#: A wait's own timeout in these tests.
TIMEOUT = 1.0
#: Far more than TIMEOUT, far less than SLOW_CONNECT: a wait that ends by then honoured its deadline.
ENDS_BY = TIMEOUT + 5.0


@pytest.fixture
def apps() -> Iterator[Callable[..., Any]]:
    yield from closing_apps(make_app)


@pytest.fixture
def faulty_proxy(broker_url: str) -> Iterator[TcpProxy]:
    with TcpProxy.for_broker(broker_url, track_frames=True) as running:
        yield running


def proxied_client(apps: Callable[..., Any], proxy: TcpProxy, broker_url: str, **conf: Any) -> Any:
    conf.setdefault('broker_connection_timeout', SLOW_CONNECT)
    conf.setdefault('broker_heartbeat', 0)
    client = apps(proxy.url_for(broker_url), **conf).backend
    client.result_consumer.start()
    return client


def wait_kinds() -> Any:
    return pytest.mark.parametrize('kind', ['get', 'join_native', 'iter_native', 'await'])


def start_wait(kind: str, client: Any) -> Call:
    """A wait of ``kind`` for results nobody will send, with timeout TIMEOUT, in a thread."""
    results = [bound(client, new_id()) for _ in range(3)]

    def run() -> Any:
        if kind == 'get':
            return results[0].get(timeout=TIMEOUT)
        if kind == 'join_native':
            return ResultSet(results).join_native(timeout=TIMEOUT)
        if kind == 'iter_native':
            return list(ResultSet(results).iter_native(timeout=TIMEOUT))
        return asyncio.run(results[0].aget(timeout=TIMEOUT))

    call = Call(run, name=f'{kind} during an outage')
    call.start()
    return call


@wait_kinds()
@pytest.mark.parametrize('outage', ['refused', 'black-holed'])
def test_a_wait_ends_by_its_deadline_while_the_client_reconnects(kind: str, outage: str, apps: Any,
                                                                 faulty_proxy: TcpProxy, broker_url: str) -> None:
    client = proxied_client(apps, faulty_proxy, broker_url)
    if outage == 'refused':
        faulty_proxy.pause()
    else:
        faulty_proxy.black_hole()
    call = start_wait(kind, client)
    wait_until(lambda: client.stats()['waits'] >= 1, 10, 'the wait to begin')
    faulty_proxy.cut()  # the wait's connection drops: it reconnects into the outage
    started = time.monotonic()
    _, error = call.outcome(timeout=ENDS_BY + SLOW_CONNECT)
    ended = time.monotonic() - started
    assert isinstance(error, TimeoutError), f'{kind} raised {error!r}, not rpcresults.TimeoutError'
    assert ended < ENDS_BY, f'{kind} ended {ended:.1f} s after the cut: it waited for a connection attempt'
    assert client.stats()['reconnects'] >= 1
    assert (faulty_proxy.refused if outage == 'refused' else faulty_proxy.swallowed) >= 1


def test_polls_answer_from_the_table_while_another_wait_reconnects(apps: Any, faulty_proxy: TcpProxy,
                                                                   broker_url: str) -> None:
    # connection attempts of 8 s: long against the polls' bound, short enough for this test to end
    client = proxied_client(apps, faulty_proxy, broker_url, broker_connection_timeout=8.0)
    worker = apps(broker_url).create_backend()
    done_id, waiting_id = new_id(), new_id()
    done = bound(client, done_id)
    worker.mark_as_done(done_id, 'known', request=request_for(client, done_id))
    assert done.get(timeout=10) == 'known'
    pending = bound(client, waiting_id)
    assert pending.state == 'PENDING'
    faulty_proxy.black_hole()
    blocked = Call(lambda: bound(client, new_id()).get(timeout=None), name='a get() without a deadline')
    blocked.start()
    wait_until(lambda: client.stats()['reading'] == 1, 10, 'the get() to lead the read')
    faulty_proxy.cut()
    wait_until(lambda: faulty_proxy.swallowed >= 1, 10, 'the get() to be reconnecting into the hang')

    def polls() -> Any:
        return (pending.ready(), pending.state, done.state,
                ResultSet([pending, bound(client, done_id)]).completed_count(),
                client.get_task_meta(waiting_id)['status'])

    answers = Call(polls, name='polls during the outage')
    answers.start()
    assert answers.result(timeout=5) == (False, 'PENDING', 'SUCCESS', 1, 'PENDING')
    closing = Call(client.close, name='close() during a connection attempt')
    closing.start()
    closing.result(timeout=5)  # close() never waits for the attempt in progress
    _, error = blocked.outcome(timeout=8.0 + 10)  # the get() ends once its attempt does
    assert isinstance(error, ResultBackendClosed)


def test_polls_never_reconnect_a_broken_connection(apps: Any, faulty_proxy: TcpProxy, broker_url: str) -> None:
    client = proxied_client(apps, faulty_proxy, broker_url)
    result = bound(client, new_id())
    assert result.state == 'PENDING'
    assert client.stats()['connected'] == 1
    faulty_proxy.black_hole()
    faulty_proxy.cut()
    answers = Call(lambda: [result.ready() for _ in range(3)] + [result.state], name='polls after the cut')
    answers.start()
    assert answers.result(timeout=5) == [False, False, False, 'PENDING']
    stats = client.stats()
    assert stats['connected'] == 0  # the broken connection was dropped, not rebuilt
    assert faulty_proxy.swallowed == 0  # and no poll tried to connect again


@pytest.mark.parametrize('frame', [
    pytest.param(raw_frame(1, 7, b'\x00\x14\x00\x14\x01'), id='method for a channel never opened'),
    pytest.param(raw_frame(1, 0, b'\x00\x0a'), id='truncated method payload'),
])
def test_a_frame_py_amqp_cannot_dispatch_reconnects_and_loses_nothing(frame: bytes, apps: Any,
                                                                       faulty_proxy: TcpProxy,
                                                                       broker_url: str, raw: Any) -> None:
    client = proxied_client(apps, faulty_proxy, broker_url)
    count = 400
    ids = [new_id() for _ in range(count)]
    results = ResultSet([bound(client, task_id) for task_id in ids])
    channel = raw.channel()
    for n, task_id in enumerate(ids[:count // 2]):
        channel.basic_publish(_reply(task_id, n), exchange='', routing_key=client.oid)
    wait_until(lambda: faulty_proxy.live >= 1, 10, 'the consumer connection')
    faulty_proxy.inject(frame)
    for n, task_id in enumerate(ids[count // 2:], start=count // 2):
        channel.basic_publish(_reply(task_id, n), exchange='', routing_key=client.oid)
    assert results.join_native(timeout=30) == list(range(count))  # no KeyError/struct.error escapes
    stats = client.stats()
    assert faulty_proxy.injected >= 1
    assert stats['frame_errors'] >= 1 and stats['reconnects'] >= 1
    assert stats['dispatched'] == count  # each reply reached its result once (redeliveries are ignored)


class HostileMapping(Mapping):  # type: ignore[type-arg]
    """A reply body that claims to be a mapping and breaks when read (pickle only)."""

    def __getitem__(self, key: Any) -> Any:
        raise RuntimeError('this mapping cannot be read')

    def __iter__(self) -> Iterator[Any]:
        return iter(['status', 'result'])

    def __len__(self) -> int:
        return 2


def test_a_reply_whose_dispatch_fails_reaches_its_waiter_at_once(apps: Any, broker_url: str, raw: Any) -> None:
    client = apps(broker_url, result_accept_content=['json', 'pickle']).backend
    client.result_consumer.start()
    hostile, good = new_id(), new_id()
    call = Call(lambda: bound(client, hostile).get(timeout=60), name='the hostile reply\'s get()')
    call.start()
    wait_until(lambda: client.stats()['waits'] >= 1, 10, 'the get() to wait')
    channel = raw.channel()
    channel.basic_publish(amqp.Message(pickle.dumps(HostileMapping()), content_type='application/x-python-serialize',
                                       content_encoding='binary', correlation_id=hostile),
                          exchange='', routing_key=client.oid)
    channel.basic_publish(_reply(good, 'still here'), exchange='', routing_key=client.oid)
    _, error = call.outcome(timeout=20)  # well before its 60 s timeout
    assert isinstance(error, MalformedResult) and 'could not be dispatched' in str(error)
    assert bound(client, good).get(timeout=10) == 'still here'  # the connection and the next reply survive
    assert client.stats()['malformed_dropped'] == 1


def test_tracked_drops_as_soon_as_results_are_collected(client: Any, worker: Any) -> None:
    client.result_consumer.start()
    ids = [new_id() for _ in range(50)]
    results = [bound(client, task_id) for task_id in ids]
    for n, task_id in enumerate(ids):
        worker.mark_as_done(task_id, n, request=request_for(client, task_id))
    assert ResultSet(results).join_native(timeout=10) == list(range(50))
    pending = bound(client, new_id())
    assert pending.state == 'PENDING'
    assert client.stats()['tracked'] == 51
    del results
    gc.collect()
    assert client.stats()['tracked'] == 1  # nothing else touched the table in between
    del pending
    gc.collect()
    assert client.stats()['tracked'] == 0


def _reply(task_id: str, value: Any) -> amqp.Message:
    body = json.dumps({'task_id': task_id, 'status': 'SUCCESS', 'result': value, 'traceback': None,
                       'children': [], 'date_done': None})
    return amqp.Message(body.encode(), content_type='application/json', content_encoding='utf-8',
                        correlation_id=task_id)

