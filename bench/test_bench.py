"""pytest-benchmark cases for P1 (``pytest bench/ --benchmark-only``), in-process.

They time ``ResultSet(members).join_native()`` over results already waiting in the reply queue
(Celery's wire format, published beforehand by a raw py-amqp publisher) for whichever rpcresults
implementation this interpreter runs (``rpcresults.USING_EXTENSION``; set
``RPCRESULTS_NO_EXTENSIONS=1`` for the pure twin), Celery's own ``rpc://`` backend, and the raw
py-amqp consume loop. As in the plain runner (``python -m bench``), each round uses a new client
(new reply queue) and connects inside the timed section.

Not part of the default test run (``testpaths = ["tests"]``). Sizes: ``BENCH_COUNT`` results per
round (default 2,000), ``BENCH_ROUNDS`` rounds (default 5). Broker: ``$RPCRESULTS_BROKER_URL``.
"""
from __future__ import annotations

import os
import uuid
from typing import Any, Callable, Iterator, List, Tuple

import pytest

from bench.common import DEFAULT_BROKER, Broker, new_queue_name, task_ids
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
