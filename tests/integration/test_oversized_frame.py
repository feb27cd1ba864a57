"""Garbage on the reply connection: an oversized or broken frame from "the broker".

The client reaches the shared broker through a TcpProxy of the test's own, which puts bytes
into the broker->client stream at a frame boundary (``proxy.inject``). Results are published
raw (py-amqp, straight to the broker) in three batches: A, read and acked before the garbage;
B, pushed into the client's socket but not yet read (so unacked) when the garbage goes in
behind them; C, published after it. The consumer must log an error, drop the connection and
open a new one, and then: A's values are intact, B is redelivered and C arrives, each value
reaching its waiter exactly once.

The whole file runs on whichever parser twin this pass loads (CI: compiled, then
RPCRESULTS_NO_EXTENSIONS=1 for the pure one). The fast path (our socket reads + FrameParser)
is the default; RPCRESULTS_NO_FAST_READ=1 leaves the reading to py-amqp, which does not check
frame_max on what it receives: the slow-path cases pin down what it does instead.
"""
from __future__ import annotations

import json
import logging
import os
from collections import Counter
from datetime import datetime, timezone
from struct import pack
from typing import Any, Dict, Iterator, List, Tuple

import amqp
import pytest

import rpcresults
from rpcresults import ResultSet
from rpcresults.exceptions import TimeoutError
from tests.amqp_frames import raw_frame
from tests.conftest import make_app, new_id
from tests.helpers import Call, wait_until
from tests.proxy import TcpProxy

pytestmark = pytest.mark.twins

WAIT = 15.0
BATCH = 20
#: What RabbitMQ 3.10 negotiates by default (checked against the live connection below).
FRAME_MAX = 131072


def oversized_header(channel: int) -> bytes:
    """A body-frame header announcing 10 x frame_max bytes, then a little of the "payload"."""
    return pack('>BHI', 3, channel, 10 * FRAME_MAX) + b'\x00' * 16


def oversized_heartbeat(channel: int) -> bytes:
    """A whole, well-formed heartbeat frame, except that it is 200 000 bytes long."""
    return raw_frame(8, 0, b'\x00' * 200_000)


def bad_frame_end(channel: int) -> bytes:
    """A heartbeat whose frame-end octet is 0x00 instead of 0xCE."""
    return raw_frame(8, 0, b'', end=0x00)


GARBAGE = {'oversized header': (oversized_header, 'frame of 1310728 bytes exceeds frame_max=131072'),
           'oversized whole frame': (oversized_heartbeat, 'frame of 200008 bytes exceeds frame_max=131072'),
           'bad frame end': (bad_frame_end, 'frame end byte is 0x00, expected 0xce')}


def body(tid: str, value: Any) -> bytes:
    return json.dumps({'status': 'SUCCESS', 'result': value, 'traceback': None, 'children': [],
                       'date_done': datetime.now(timezone.utc).isoformat(), 'task_id': tid}).encode()


@pytest.fixture
def proxy(broker_url: str) -> Iterator[TcpProxy]:
    """Overrides conftest's: this one follows frame boundaries, for ``inject``."""
    with TcpProxy.for_broker(broker_url, track_frames=True) as running:
        yield running


@pytest.fixture
def proxied(proxy: TcpProxy, broker_url: str):
    """An app whose connections all go through ``proxy`` (only its reply consumer connects)."""
    app = make_app(proxy.url_for(broker_url))
    yield app
    app.close()


class Scenario:
    """Batches A (acked), B (unacked, before the garbage) and C (after it) for one client."""

    def __init__(self, app: Any, proxy: TcpProxy, raw: amqp.Connection) -> None:
        self.app = app
        self.client = app.backend
        self.proxy = proxy
        self.channel = raw.channel()
        self.values: Dict[str, Any] = {}
        self.results: Dict[str, Any] = {}

    def track(self, batch: str) -> List[str]:
        """New ids for ``batch``, each with a result the client tracks before its reply is sent."""
        ids = [new_id() for _ in range(BATCH)]
        for index, tid in enumerate(ids):
            self.values[tid] = [batch, index]
            self.results[tid] = self.app.AsyncResult(tid)
            self.client.add_pending_result(self.results[tid])
        return ids

    def publish(self, ids: List[str]) -> None:
        for tid in ids:
            self.channel.basic_publish(
                amqp.Message(body(tid, self.values[tid]), correlation_id=tid,
                             content_type='application/json', content_encoding='utf-8'),
                exchange='', routing_key=self.client.oid)

    def ready_in_queue(self) -> int:
        return self.channel.queue_declare(self.client.oid, passive=True).message_count

    def run_until_garbage(self, garbage: bytes) -> Dict[str, List[str]]:
        """A read and acked, B sent but unread, the garbage injected behind B, C published."""
        client = self.client
        client.result_consumer.start()
        assert self.proxy.live == 1, 'only the reply consumer should go through the proxy'
        batches = {'A': self.track('A')}
        self.publish(batches['A'])
        assert self.get(batches['A']) == [self.values[tid] for tid in batches['A']]
        wait_until(lambda: client.stats()['acked'] >= BATCH, WAIT, 'batch A acked')

        batches['B'] = self.track('B')
        self.publish(batches['B'])
        # the broker has handed every B message to our consumer (none ready): in flight, unacked
        wait_until(lambda: self.ready_in_queue() == 0, WAIT, 'batch B pushed to the consumer')
        assert client.stats()['acked'] == BATCH

        assert self.proxy.inject(garbage) == 1
        wait_until(lambda: self.proxy.injected == 1, WAIT, 'the garbage placed in the stream')
        batches['C'] = self.track('C')
        self.publish(batches['C'])
        return batches

    def get(self, ids: List[str], timeout: float = WAIT) -> List[Any]:
        return [self.results[tid].get(timeout=timeout) for tid in ids]

    def collect(self, ids: List[str], timeout: float = WAIT) -> Counter:
        """Join ``ids`` natively; check each value, and return how often each id reached the waiter."""
        seen: Counter = Counter()
        results = ResultSet([self.results[tid] for tid in ids])
        values = results.join_native(timeout=timeout, on_message=lambda meta: seen.update([meta['task_id']]))
        assert values == [self.values[tid] for tid in ids]
        return seen

    def collect_each_once(self, ids: List[str]) -> None:
        """Join ``ids`` natively: every value right, each reaching its waiter exactly once."""
        assert self.collect(ids) == Counter({tid: 1 for tid in ids})


def test_the_pass_runs_the_twin_it_should() -> None:
    """The file runs once per pass; make sure each pass really exercises the twin it claims to."""
    assert rpcresults.USING_EXTENSION is not bool(os.environ.get('RPCRESULTS_NO_EXTENSIONS'))


@pytest.mark.parametrize('kind', list(GARBAGE))
def test_garbage_frame_makes_the_consumer_reconnect_and_lose_nothing(kind, proxied, proxy, raw, caplog):
    make_garbage, message = GARBAGE[kind]
    caplog.set_level(logging.ERROR, logger='rpcresults.engine.connection')
    scenario = Scenario(proxied, proxy, raw)
    client = scenario.client
    client.result_consumer.start()
    before = dict(client.stats())
    assert before['fast_read'] == 1, 'the fast path (our own socket reads) should be in use here'
    assert before['frame_max'] == FRAME_MAX
    channel_id = client.result_consumer.connection.channel.channel_id  # the consuming channel's number

    batches = scenario.run_until_garbage(make_garbage(channel_id))
    scenario.collect_each_once(batches['B'] + batches['C'])

    stats = client.stats()
    assert stats['reconnects'] >= 1
    assert stats.get('queues_lost', 0) == 0
    # every reply read is a first arrival of A, B or C, or a counted repeat of an unacked B one
    repeats = stats['duplicates'] - before['duplicates']
    assert stats['received'] - before['received'] - repeats == 3 * BATCH
    assert repeats <= BATCH
    assert stats['malformed_dropped'] == before['malformed_dropped']
    errors = [record for record in caplog.records
              if record.levelno == logging.ERROR and 'unreadable input on the reply connection' in record.getMessage()]
    assert errors and message in errors[0].getMessage()
    # A, acked before the garbage, keeps its values; the queue is drained and consumed again
    assert scenario.get(batches['A']) == [scenario.values[tid] for tid in batches['A']]
    assert proxy.live == 1  # the broken connection is gone, the new one is up
    wait_until(lambda: scenario.ready_in_queue() == 0, WAIT, 'queue drained')
    assert scenario.channel.queue_declare(client.oid, passive=True).consumer_count == 1


# -- the slow path: py-amqp reads ------------------------------------------------------------------

@pytest.fixture
def slow_path(monkeypatch):
    monkeypatch.setenv('RPCRESULTS_NO_FAST_READ', '1')


def slow_path_run(proxied: Any, proxy: TcpProxy, raw: amqp.Connection,
                  garbage: bytes) -> Tuple[Scenario, Dict[str, List[str]]]:
    """A Scenario on the slow path (py-amqp reads), run until ``garbage`` is in its stream."""
    scenario = Scenario(proxied, proxy, raw)
    scenario.client.result_consumer.start()
    stats = scenario.client.stats()
    assert stats['connected'] == 1 and stats['fast_read'] == 0  # consuming, read by py-amqp
    return scenario, scenario.run_until_garbage(garbage)


def test_slow_path_takes_a_whole_oversized_frame_in_its_stride(slow_path, proxied, proxy, raw):
    """py-amqp reads a well-formed frame whatever its size (it does not check frame_max on
    input): the 200 KB heartbeat is read and ignored, the connection stays, nothing is lost."""
    scenario, batches = slow_path_run(proxied, proxy, raw, oversized_heartbeat(1))
    scenario.collect_each_once(batches['B'] + batches['C'])
    assert scenario.client.stats()['reconnects'] == 0


def test_slow_path_bad_frame_end_reconnects_and_loses_nothing(slow_path, proxied, proxy, raw):
    """py-amqp raises UnexpectedFrame (a connection error) on a bad frame-end octet: the consumer
    reconnects and B (unacked) is redelivered."""
    scenario, batches = slow_path_run(proxied, proxy, raw, bad_frame_end(1))
    scenario.collect_each_once(batches['B'] + batches['C'])
    assert scenario.client.stats()['reconnects'] >= 1


def test_slow_path_truncated_oversized_header_is_bounded(slow_path, proxied, proxy, raw):
    """py-amqp does not check frame_max on input: a header announcing 1.3 MB makes it wait for
    1.3 MB of payload, swallowing the replies behind it. What must still hold: a get() with a
    timeout returns (TimeoutError) within its timeout, and once the connection drops (cut here)
    the unacked replies come back, each once. (py-amqp, polled on a non-blocking socket, used to
    spin inside the partial frame until the connection dropped; the cut below would release it.)"""
    scenario, batches = slow_path_run(proxied, proxy, raw, oversized_header(1))
    waiter = Call(lambda: scenario.get(batches['C'][:1], timeout=2.0), name='waiter')
    waiter.start()
    waiter.join(30.0)  # a bound for a hang, far beyond the get's own timeout
    stuck = waiter.is_alive()
    proxy.cut()  # releases a stuck waiter (py-amqp reads EOF) and makes the broker redeliver
    _, error = waiter.outcome(WAIT)
    scenario.collect(batches['B'] + batches['C'])  # every value, right (the waiter may have read them)
    assert scenario.client.stats()['reconnects'] >= 1
    assert not stuck, 'get(timeout=2.0) was still waiting after 30 s'
    assert isinstance(error, TimeoutError), repr(error)
