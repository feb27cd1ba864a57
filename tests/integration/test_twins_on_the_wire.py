"""The hot path on the real broker (SPEC §4): our chunked reader and frame parser, and py-amqp's reader.

On a py-amqp connection over plain TCP the reply consumer reads the socket itself in large
chunks and feeds the frame parser twin that ``rpcresults._drain`` selected (compiled when
built, pure with ``RPCRESULTS_NO_EXTENSIONS=1``). These tests check that this fast path is
really the one used (many replies per ``recv``), that replies larger than the negotiated
``frame_max`` (several body frames, several reads) arrive intact through it, and that with
``RPCRESULTS_NO_FAST_READ=1`` the same round trip works through py-amqp's own reader.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Dict, List

from rpcresults import ResultSet, _drain
from rpcresults._consume import CHUNK_SIZE, AmqpReplyChannel
from tests.conftest import new_id, request_for
from tests.helpers import raw_connection, wait_until
from tests.twins import NO_EXTENSIONS_VAR, load_twin

ROOT = Path(__file__).resolve().parents[2]
WAIT = 60.0


def expected_parser_module() -> str:
    """The parser twin the reader must use in this run (a compiled twin that is not built fails loudly)."""
    if os.environ.get(NO_EXTENSIONS_VAR):
        return 'rpcresults._frames_py'
    return load_twin('compiled', 'frames').__name__


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
    replies = consumer._replies
    assert isinstance(replies, AmqpReplyChannel)
    assert replies.fast is True
    assert type(replies._parser).__module__ == expected_parser_module()
    assert _drain.USING_EXTENSION is (not os.environ.get(NO_EXTENSIONS_VAR))
    assert type(replies._parser) is _drain.FrameParser

    count = 2_000
    tids = [new_id() for _ in range(count)]
    for index, tid in enumerate(tids):
        worker.mark_as_done(tid, {'index': index, 'text': f'réponse-{index}'}, request=request_for(client, tid))
    # every reply has left the queue for our consumer (no prefetch limit): they wait in the socket
    wait_until(lambda: ready_in_queue(broker_url, client.oid) == 0, timeout=WAIT, what='the burst to be pushed')
    chunks_before = replies.chunks
    received_before = client.stats()['received']

    values = ResultSet([app.AsyncResult(tid) for tid in tids]).join_native(timeout=WAIT)

    assert values == [{'index': index, 'text': f'réponse-{index}'} for index in range(count)]
    assert client.stats()['received'] - received_before == count
    reads = replies.chunks - chunks_before
    assert reads >= 1, 'the replies were not read by our own reader'
    assert reads <= count // 10, f'{reads} reads for {count} replies: not many replies per recv'
    assert consumer._replies is replies  # no reconnect happened on the way
    assert client.stats()['reconnects'] == 0
    assert client.stats()['malformed_dropped'] == 0
    wait_until(lambda: replies.acked >= count, timeout=WAIT, what='the burst to be acked')


def test_results_larger_than_frame_max_arrive_intact(app, client, worker, broker_url):
    consumer = client.result_consumer
    consumer.start()
    replies = consumer._replies
    assert replies.fast is True
    frame_max = replies._connection.frame_max
    assert frame_max == 131072  # RabbitMQ's default, negotiated
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
    chunks_before = replies.chunks
    frames_before = replies._parser.frames_parsed
    order = tids + small
    values = ResultSet([app.AsyncResult(tid) for tid in order]).join_native(timeout=WAIT)
    for tid, value in zip(order, values):
        assert value == expected[tid], f'result of {tid} ({len(str(expected[tid]))} chars) came back altered'
    assert replies.chunks > chunks_before
    # every frame of every reply went through our parser (method, header, each body frame)
    body_frames = sum(-(-size // (frame_max - 8)) for size in sizes)  # UTF-8 bodies are at least this long
    assert replies._parser.frames_parsed - frames_before >= 2 * len(sizes) + body_frames + 3 * len(small)
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
from rpcresults import App, ResultSet, _drain
from rpcresults._consume import AmqpReplyChannel
from tests.conftest import new_id, request_for

app = App(sys.argv[1], result_reply_queue_expires=60)
client = app.backend
worker = app.create_backend()
try:
    consumer = client.result_consumer
    consumer.start()
    replies = consumer._replies
    assert isinstance(replies, AmqpReplyChannel), type(replies)
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
    print(json.dumps({
        'fast': replies.fast, 'chunks': replies.chunks, 'parser': type(replies._parser).__module__,
        'extension': _drain.USING_EXTENSION, 'wrong': wrong, 'count': len(values),
        'received': client.stats()['received'], 'reconnects': client.stats()['reconnects'],
        'frame_max': replies._connection.frame_max,
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
    assert report['fast'] is False
    assert report['chunks'] == 0  # our reader never ran: py-amqp read every frame
    assert report['wrong'] == []
    assert report['count'] == 502
    assert report['received'] == 502
    assert report['reconnects'] == 0
    assert report['frame_max'] == 131072
    assert report['parser'] == expected_parser_module()  # made, but never fed


def test_same_round_trip_with_the_fast_reader_in_a_subprocess(broker_url):
    """The control for the test above: the same script without the variable reads with our reader."""
    env = {key: value for key, value in os.environ.items() if key != 'RPCRESULTS_NO_FAST_READ'}
    proc = subprocess.run([sys.executable, '-c', ROUND_TRIP, broker_url], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report['fast'] is True
    assert 1 <= report['chunks'] < 502
    assert report['wrong'] == []
    assert report['received'] == 502
    assert report['extension'] is (not os.environ.get(NO_EXTENSIONS_VAR))
    assert report['parser'] == expected_parser_module()
