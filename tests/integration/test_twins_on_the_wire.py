"""The hot path on the real broker: our chunked reader and frame parser, and py-amqp's reader.

On a py-amqp connection over plain TCP the reply consumer reads the socket itself in large
chunks and feeds the frame parser twin that ``rpcresults.protocol`` selected (compiled when
built, pure with ``RPCRESULTS_NO_EXTENSIONS=1``). These tests check that this fast path is
really the one used (many replies per ``recv``), that replies larger than the negotiated
``frame_max`` (several body frames, several reads) arrive intact through it, and that with
``RPCRESULTS_NO_FAST_READ=1`` the same round trip works through py-amqp's own reader.

How the socket was read is seen in ``stats()``: ``reads`` counts the socket reads of our chunked
reader and ``frames`` the frames its parser took apart; on py-amqp's path both stay 0 and
py-amqp's own ``bytes_recv`` (what its heartbeat check looks at) counts the frames it read, at
least three (method, header, body) per reply.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Dict, List

import pytest

import rpcresults
from rpcresults import ResultSet, protocol
from rpcresults.engine import channel as reader_module
from rpcresults.engine.channel import CHUNK_SIZE
from tests.conftest import new_id, request_for
from tests.helpers import raw_connection, wait_until
from tests.twins import NO_EXTENSIONS_VAR, load_twin

pytestmark = pytest.mark.twins

ROOT = Path(__file__).resolve().parents[2]
WAIT = 60.0


def expected_parser_module() -> str:
    """The parser twin the reader must use in this run (a compiled twin that is not built fails loudly)."""
    if os.environ.get(NO_EXTENSIONS_VAR):
        return load_twin('pure', 'frames').__name__
    return load_twin('compiled', 'frames').__name__


def wire_of(client: Any) -> Any:
    """py-amqp's connection under the client's consuming channel (its ``bytes_recv``: see above)."""
    return client.result_consumer.connection.channel.connection


def big_value(size: int, seed: str) -> str:
    """A str of ``size`` characters, non-ASCII included, that differs all along (no repeats to hide a lost chunk)."""
    alphabet = 'abcdefghijklmnopqrstuvwxyz0123456789-é✓'
    out: List[str] = []
    state = sum(map(ord, seed)) or 1
    for _ in range(size):
        state = (state * 1103515245 + 12345) & 0x7FFFFFFF
        out.append(alphabet[state % len(alphabet)])
    return ''.join(out)


def ready_in_queue(broker_url: str, queue: str) -> int:
    conn = raw_connection(broker_url)
    try:
        return conn.channel().queue_declare(queue, passive=True).message_count
    finally:
        conn.close()


def test_fast_reader_is_used_and_reads_many_replies_per_recv(app, client, worker, broker_url):
    consumer = client.result_consumer
    consumer.start()
    assert client.stats()['fast_read'] == 1  # our own chunked reader on py-amqp's socket
    # the reader builds its parser from the twin rpcresults.protocol selected for this run
    assert reader_module.FrameParser is protocol.FrameParser
    assert protocol.FrameParser.__module__ == expected_parser_module()
    assert protocol.USING_EXTENSION is rpcresults.USING_EXTENSION
    assert protocol.USING_EXTENSION is (not os.environ.get(NO_EXTENSIONS_VAR))
    wire = wire_of(client)
    acked_before = client.stats()['acked']

    count = 2_000
    tids = [new_id() for _ in range(count)]
    for index, tid in enumerate(tids):
        worker.mark_as_done(tid, {'index': index, 'text': f'réponse-{index}'}, request=request_for(client, tid))
    # every reply has left the queue for our consumer (no prefetch limit): they wait in the socket
    wait_until(lambda: ready_in_queue(broker_url, client.oid) == 0, timeout=WAIT, what='the burst to be pushed')
    before = client.stats()

    values = ResultSet([app.AsyncResult(tid) for tid in tids]).join_native(timeout=WAIT)

    assert values == [{'index': index, 'text': f'réponse-{index}'} for index in range(count)]
    after = client.stats()
    assert after['received'] - before['received'] == count
    assert after['frames'] - before['frames'] >= 3 * count  # method, header, body: all through our parser
    reads = after['reads'] - before['reads']
    assert reads >= 1, 'the replies were not read by our own reader'
    assert reads <= count // 10, f'{reads} reads for {count} replies: not many replies per recv'
    assert wire_of(client) is wire  # no reconnect happened on the way
    assert client.stats()['reconnects'] == 0
    assert client.stats()['fast_read'] == 1
    assert client.stats()['malformed_dropped'] == 0
    wait_until(lambda: client.stats()['acked'] - acked_before >= count, timeout=WAIT,
               what='the burst to be acked')


def test_results_larger_than_frame_max_arrive_intact(app, client, worker, broker_url):
    consumer = client.result_consumer
    consumer.start()
    stats = client.stats()
    assert stats['fast_read'] == 1
    frame_max = stats['frame_max']
    assert frame_max == 131072  # RabbitMQ's default, negotiated
    wire = wire_of(client)
    sizes = [300_000, frame_max - 200, frame_max, 3 * frame_max + 1, 1_000_000]
    assert max(sizes) > CHUNK_SIZE  # one message spans several of our reads too
    tids = [new_id() for _ in sizes]
    small = [new_id() for _ in range(50)]
    expected: Dict[str, Any] = {}
    for index, (tid, size) in enumerate(zip(tids, sizes)):
        expected[tid] = big_value(size, tid)
        worker.mark_as_done(tid, expected[tid], request=request_for(client, tid))
        for small_tid in small[index * 10:(index + 1) * 10]:  # small replies between the big ones
            expected[small_tid] = {'small': small_tid}
            worker.mark_as_done(small_tid, expected[small_tid], request=request_for(client, small_tid))
    before = client.stats()
    order = tids + small
    values = ResultSet([app.AsyncResult(tid) for tid in order]).join_native(timeout=WAIT)
    for tid, value in zip(order, values):
        assert value == expected[tid], f'result of {tid} ({len(str(expected[tid]))} chars) came back altered'
    after = client.stats()
    assert after['reads'] - before['reads'] >= len(sizes)  # our reader read: each big one spans reads
    # still our reader, on the same connection: every frame of every reply (method, header, each
    # body frame) went through our parser
    assert after['frames'] - before['frames'] >= 3 * len(order) + 2 * len(sizes)  # big ones: 3+ body frames
    assert wire_of(client) is wire
    assert client.stats()['fast_read'] == 1
    assert client.stats()['reconnects'] == 0
    assert client.stats()['malformed_dropped'] == 0

    # one more, waited for while it is published (arrives while a get() is blocked in a read)
    late = new_id()
    result = app.AsyncResult(late)
    value = big_value(300_000, late)
    publisher = threading.Timer(0.2, lambda: worker.mark_as_done(late, value, request=request_for(client, late)))
    publisher.start()
    try:
        assert result.get(timeout=WAIT) == value
    finally:
        publisher.join(WAIT)


ROUND_TRIP = r'''
import json, sys
from rpcresults import App, ResultSet, protocol
from rpcresults.engine import channel as reader_module
from tests.conftest import new_id, request_for

app = App(sys.argv[1], result_reply_queue_expires=60)
client = app.backend
worker = app.create_backend()
try:
    consumer = client.result_consumer
    consumer.start()
    assert client.stats()['connected'] == 1
    wire = consumer.connection.channel.connection  # py-amqp's: bytes_recv counts the frames it reads
    recv_before = wire.bytes_recv
    before = client.stats()
    tids = [new_id() for _ in range(500)]
    big = [new_id() for _ in range(2)]
    expected = {tid: {'index': index, 'text': f'réponse-{index}'} for index, tid in enumerate(tids)}
    for tid in big:
        expected[tid] = ('x✓' * 150_000) + tid  # 300 KB of UTF-8 and more: several body frames
    for tid in big + tids:
        worker.mark_as_done(tid, expected[tid], request=request_for(client, tid))
    order = tids + big
    values = ResultSet([app.AsyncResult(tid) for tid in order]).join_native(timeout=60)
    wrong = [tid for tid, value in zip(order, values) if value != expected[tid]]
    stats = client.stats()
    print(json.dumps({
        'fast': stats['fast_read'], 'reads': stats['reads'] - before['reads'],
        'frames': stats['frames'] - before['frames'], 'py_amqp_frames': wire.bytes_recv - recv_before,
        'same_connection': consumer.connection.channel.connection is wire,
        'parser': reader_module.FrameParser.__module__,
        'extension': protocol.USING_EXTENSION, 'wrong': wrong, 'count': len(values),
        'received': stats['received'], 'reconnects': stats['reconnects'],
        'frame_max': stats['frame_max'],
    }))
finally:
    worker.close()
    app.close()
'''


def test_round_trip_through_py_amqps_own_reader(broker_url):
    env = dict(os.environ, RPCRESULTS_NO_FAST_READ='1')
    proc = subprocess.run([sys.executable, '-c', ROUND_TRIP, broker_url], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report['fast'] == 0
    # our reader never ran: py-amqp read every frame (at least method, header and body per reply)
    assert report['reads'] == 0 and report['frames'] == 0
    assert report['py_amqp_frames'] >= 3 * 502
    assert report['same_connection'] is True
    assert report['wrong'] == []
    assert report['count'] == 502
    assert report['received'] == 502
    assert report['reconnects'] == 0
    assert report['frame_max'] == 131072
    assert report['parser'] == expected_parser_module()  # the reader's twin, though never fed here


def test_same_round_trip_with_the_fast_reader_in_a_subprocess(broker_url):
    """The control for the test above: the same script without the variable reads with our reader."""
    env = {key: value for key, value in os.environ.items() if key != 'RPCRESULTS_NO_FAST_READ'}
    proc = subprocess.run([sys.executable, '-c', ROUND_TRIP, broker_url], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report['fast'] == 1
    assert 1 <= report['reads'] < 502  # our reads, fewer than the replies
    assert report['frames'] >= 3 * 502  # every reply's frames through our parser
    assert report['same_connection'] is True
    assert report['wrong'] == []
    assert report['received'] == 502
    assert report['extension'] is (not os.environ.get(NO_EXTENSIONS_VAR))
    assert report['parser'] == expected_parser_module()
