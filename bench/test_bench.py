"""pytest-benchmark cases for P1 (``pytest bench/ --benchmark-only``), in-process.

They time ``ResultSet(members).join_native()`` over results already waiting in the reply queue
(Celery's wire format, published beforehand by a raw py-amqp publisher) for whichever rpcresults
implementation this interpreter runs (``rpcresults.USING_EXTENSION``; set
``RPCRESULTS_NO_EXTENSIONS=1`` for the pure twin), Celery's own ``rpc://`` backend, and the raw
py-amqp consume loop. As in the plain runner (``python -m bench``), each round uses a new client
(new reply queue) and connects inside the timed section.

Not part of the default test run (``testpaths = ["tests"]``). Sizes: ``BENCH_COUNT`` results per
round (default 2,000), ``BENCH_ROUNDS`` rounds (default 5). Broker: ``$RPCRESULTS_BROKER_URL``.

The plain tests at the end (``pytest bench/``; ``--benchmark-only`` skips them) check the bench
itself: the fast queue fill writes py-amqp's exact bytes, the chart is valid SVG, and a quick
``python -m bench --only P6,P7`` prints a table per target with a row per peer.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
import xml.etree.ElementTree as ElementTree
from types import SimpleNamespace
from typing import Any, Callable, Iterator, List, Tuple

import pytest

from bench.chart import render_chart
from bench.common import (DEFAULT_BROKER, REPO_ROOT, Broker, new_queue_name, result_frames, result_message,
                          task_ids)
from bench.peers import _prepare_celery, _prepare_pyamqp, _prepare_rpcresults

COUNT = int(os.environ.get('BENCH_COUNT', '2000'))
ROUNDS = int(os.environ.get('BENCH_ROUNDS', '5'))
TIMEOUT = max(60.0, COUNT / 400)

Prepared = Tuple[str, Callable[[float], List[Any]], Callable[[], None], dict]


@pytest.fixture(scope='module')
def broker() -> Iterator[Broker]:
    try:
        connection = Broker(DEFAULT_BROKER)
    except OSError as exc:
        pytest.fail(f'RabbitMQ is not answering at {DEFAULT_BROKER} ({exc}); start it with: '
                    'rabbitmq-server -detached', pytrace=False)
    yield connection
    connection.close()


def _bench_join(benchmark: Any, broker: Broker, prepare: Callable[[List[str]], Prepared]) -> None:
    """Each round: a fresh client whose reply queue holds COUNT results; time the join."""
    leftovers: List[Tuple[str, Callable[[], None]]] = []

    def cleanup() -> None:
        while leftovers:
            queue, close = leftovers.pop()
            try:
                close()
            finally:
                broker.delete(queue)

    def setup() -> Tuple[Tuple[Any, ...], dict]:
        cleanup()
        ids = task_ids(uuid.uuid4().int & 0xFFFFFFFF, COUNT)
        queue, join, close, extra = prepare(ids)
        leftovers.append((queue, close))
        benchmark.extra_info.update({k: v for k, v in extra.items() if k != 'stats'})
        broker.fill(queue, ids)
        return (join, ids), {}

    def run(join: Callable[[float], List[Any]], ids: List[str]) -> None:
        values = join(TIMEOUT)
        assert values == list(range(len(ids)))

    benchmark.extra_info['results'] = COUNT
    try:
        benchmark.pedantic(run, setup=setup, rounds=ROUNDS, iterations=1)
    finally:
        cleanup()
    stats = getattr(benchmark, 'stats', None)
    if stats is not None and getattr(stats, 'stats', None) is not None:
        benchmark.extra_info['results_per_second_best'] = round(COUNT / stats.stats.min)


@pytest.mark.benchmark(group='P1 join_native over results waiting in the reply queue')
def test_p1_join_native_rpcresults(benchmark: Any, broker: Broker) -> None:
    """rpcresults, compiled or pure as this interpreter selects (see extra_info.using_extension)."""
    _bench_join(benchmark, broker, lambda ids: _prepare_rpcresults(broker.url, ids))


@pytest.mark.benchmark(group='P1 join_native over results waiting in the reply queue')
def test_p1_join_native_celery(benchmark: Any, broker: Broker) -> None:
    """Celery's rpc:// backend, same messages, same join."""
    pytest.importorskip('celery')
    _bench_join(benchmark, broker, lambda ids: _prepare_celery(broker.url, ids))


@pytest.mark.benchmark(group='P1 join_native over results waiting in the reply queue')
def test_p1_pyamqp_consume_loop(benchmark: Any, broker: Broker) -> None:
    """The raw py-amqp reference: basic_consume, ack multiple every 256, json.loads each body."""
    def prepare(ids: List[str]) -> Prepared:
        queue = new_queue_name('pytest-pyamqp')
        broker.channel.queue_declare(queue=queue, durable=True, auto_delete=False)
        return _prepare_pyamqp(broker.url, ids, queue)

    _bench_join(benchmark, broker, prepare)


# -- the bench itself ----------------------------------------------------------------------------
def test_result_frames_are_what_pyamqp_writes() -> None:
    """Broker.fill's fast path puts the same bytes on the wire as basic_publish(result_message(...))."""
    from amqp import spec
    from amqp.method_framing import frame_writer
    from amqp.serialization import dumps
    written: List[bytes] = []
    write = frame_writer(SimpleNamespace(frame_max=131072, bytes_sent=0),
                         SimpleNamespace(write=lambda data: written.append(bytes(data))))
    ids, date_done, queue = task_ids(7, 3), '2026-01-01T00:00:00+00:00', 'rpcresults-bench-frames'
    for index, task_id in enumerate(ids, start=5):
        write(1, 2, spec.Basic.Publish, dumps('Bssbb', (0, '', queue, False, False)),
              result_message(task_id, index, date_done))
    assert b''.join(result_frames(2, queue, ids, first_value=5, date_done=date_done)) == b''.join(written)


def test_chart_is_svg_with_a_bar_per_measured_peer() -> None:
    svg = render_chart('title', 'line one\nline two', [('P6\nresults/s', [('a', 10.0), ('b', 5.0), ('c', None)]),
                                                        ('P7', [('a', 3.0), ('c', 1.0)])],
                       {'a': 'peer <a>', 'b': 'peer b', 'c': 'peer c'})
    root = ElementTree.fromstring(svg)
    bars = [rect for rect in root.iter('{http://www.w3.org/2000/svg}rect') if rect.find(
        '{http://www.w3.org/2000/svg}title') is not None]
    assert len(bars) == 4  # c has no rate in P6: an n/a mark, no bar
    assert 'peer &lt;a&gt;' in svg and 'n/a' in svg


def _table(stdout: str, title: str) -> str:
    match = re.search(rf'^{re.escape(title)}.*?(?=^\s*$|\Z)', stdout, re.MULTILINE | re.DOTALL)
    assert match, f'no table {title!r} in:\n{stdout}'
    return match.group(0)


def test_quick_p6_p7_print_a_row_per_peer(tmp_path: Any) -> None:
    chart = tmp_path / 'chart.svg'
    env = dict(os.environ)
    env.pop('RPCRESULTS_NO_EXTENSIONS', None)
    proc = subprocess.run([sys.executable, '-m', 'bench', '--quick', '--only', 'P6,P7', '--p6-count', '300',
                           '--p7-count', '300', '--broker', DEFAULT_BROKER, '--chart', str(chart)],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f'stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}'
    p6, p7 = _table(proc.stdout, 'P6 '), _table(proc.stdout, 'P7 ')
    for table, peers in ((p6, ('rpcresults pure', 'py-amqp basic_publish', 'celery rpc://')),
                         (p7, ('rpcresults pure', 'py-amqp pipeline'))):
        assert re.search(r'^peer\s+value\s+ratio\s+target\s+met\?', table, re.MULTILINE), table
        assert re.search(r'^rpcresults compiled\s+(\S.*/s|not built)', table, re.MULTILINE), table
        for peer in peers:
            assert re.search(rf'^{re.escape(peer)}\s+[\d,]+ (results|calls)/s', table, re.MULTILINE), (peer, table)
        assert 'FAILED' not in table, table
    assert re.search(r'^C rabbitmq-c pair\s+\S', p7, re.MULTILINE), p7  # measured, or why not
    assert re.search(r'^aio-pika patterns.RPC\s+\S', p7, re.MULTILINE), p7
    assert '× py-amqp' in p6 and '× py-amqp' in p7, (p6, p7)
    assert "all as Celery's" in p6, p6  # every peer's first message had Celery's wire format
    assert re.search(r'^\[P6 1/1\] rpcresults pure: ', proc.stderr, re.MULTILINE), proc.stderr
    ElementTree.parse(chart)  # the chart was written, and is XML
