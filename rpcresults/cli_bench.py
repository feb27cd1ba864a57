"""``rpcresults bench``: worker processes publish N results; this client joins them; a table of rates.

The same publishers (rpcresults' worker side, wire-compatible with Celery's)
feed, in turn, an rpcresults client and — when Celery is installed and
``--celery`` is given — a Celery client with ``result_backend='rpc://'``, so the
two join paths are measured on identical input. CPU per result is the joining
process's own CPU time (the publishers run in other processes). A last row is a
whole RPC round trip: this process sends N calls with :class:`~rpcresults.Client`
to ``Responder`` processes and joins the answers (its CPU then includes sending).
"""
from __future__ import annotations

import multiprocessing
import sys
import time
import uuid
from typing import Any, Callable, List, Optional, Sequence, Tuple, Type

from ._cli_util import Progress, broker_problem, print_table
from .app import App
from .client import Client
from .responder import Responder
from .result import ResultSet

__all__ = ('bench', 'HEADERS')

#: ``x-expires`` of the round trip's request queue: it goes away by itself after the run.
RESPONDER_QUEUE_EXPIRES = 60

HEADERS = ['client', 'count', 'correct', 'seconds', 'results/s', 'client CPU us/result']


def _publish(broker: str, reply_to: str, task_ids: Sequence[str], offset: int) -> None:
    """One publisher process: a SUCCESS for each id, to ``reply_to``."""
    app = App(broker)
    backend = app.create_backend('rpc://')
    try:
        for index, task_id in enumerate(task_ids, start=offset):
            backend.mark_as_done(task_id, index, request={'reply_to': reply_to, 'correlation_id': task_id})
    finally:
        backend.close()


def _run_publishers(broker: str, reply_to: str, task_ids: List[str], workers: int) -> List[Any]:
    context = multiprocessing.get_context('spawn')
    chunk = -(-len(task_ids) // workers)
    processes = [context.Process(target=_publish, args=(broker, reply_to, task_ids[start:start + chunk], start),
                                 daemon=True)
                 for start in range(0, len(task_ids), chunk)]
    for process in processes:
        process.start()
    return processes


def _measure(name: str, join: Callable[[Callable[[], None]], List[Any]], counter: Callable[[], int],
             broker: str, reply_to: str, task_ids: List[str], workers: int, timeout: float,
             progress: bool, timeout_errors: Tuple[Type[BaseException], ...] = (TimeoutError,),
             ) -> Tuple[str, int, str, str, str, str]:
    """One row; a join that times out gives a row saying so, with the count of what arrived."""
    processes = _run_publishers(broker, reply_to, task_ids, workers)
    bar = Progress(len(task_ids), counter, name, enabled=progress)
    started = time.perf_counter()
    cpu_started = time.process_time()
    try:
        values = join(bar.tick)
    except timeout_errors:
        arrived = counter()
        print(f'{name}: the join did not finish within {timeout} s ({arrived} of {len(task_ids)} '
              'results arrived)', file=sys.stderr)
        return (name, arrived, 'TIMED OUT', f'>{timeout}', '-', '-')
    finally:
        bar.close()
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu_started
    count = len(task_ids)
    ok = values == list(range(count))
    return (name, len(values), 'yes' if ok else 'NO', f'{elapsed:.3f}', f'{count / elapsed:.0f}',
            f'{cpu / count * 1e6:.1f}')


def _rpcresults_row(broker: str, count: int, workers: int, timeout: float, progress: bool) -> Tuple:
    app = App(broker, result_reply_queue_expires=60)
    backend = app.backend
    try:
        backend.result_consumer.start()  # the reply queue exists before anyone publishes
        task_ids = [str(uuid.uuid4()) for _ in range(count)]
        results = ResultSet([app.AsyncResult(task_id) for task_id in task_ids], app=app)
        table = backend.result_consumer.table
        return _measure('rpcresults', lambda tick: results.join_native(timeout=timeout, on_interval=tick),
                        lambda: table.received, broker, backend.oid, task_ids, workers, timeout, progress)
    finally:
        app.close()


def _celery_row(broker: str, count: int, workers: int, timeout: float, progress: bool) -> Optional[Tuple]:
    try:
        from celery import Celery
        from celery.exceptions import TimeoutError as CeleryTimeoutError
        from celery.result import ResultSet as CeleryResultSet
    except ImportError:
        return None
    app = Celery('rpcresults-bench', broker=broker, backend='rpc://', set_as_current=False)
    app.conf.result_expires = 60
    backend = app.backend
    try:
        with app.producer_or_acquire() as producer:
            backend.on_task_call(producer, 'bench')  # declares Celery's reply queue
        task_ids = [str(uuid.uuid4()) for _ in range(count)]
        results = CeleryResultSet([app.AsyncResult(task_id) for task_id in task_ids], app=app)
        seen = [0]

        def on_message(meta: Any) -> None:
            seen[0] += 1

        def join(tick: Callable[[], None]) -> List[Any]:
            return results.join_native(timeout=timeout, on_message=on_message, on_interval=tick)

        return _measure("celery rpc://", join, lambda: seen[0], broker, backend.oid, task_ids, workers,
                        timeout, progress, (TimeoutError, CeleryTimeoutError))
    finally:
        app.close()


def _respond(broker: str, queue: str) -> None:
    """One responder process: answer each call with its payload until terminated."""
    responder = Responder(App(broker), queue, _echo, prefetch=256, expires=RESPONDER_QUEUE_EXPIRES)
    responder.run_forever()


def _echo(payload: Any) -> Any:
    return payload


def _round_trip_row(broker: str, count: int, workers: int, timeout: float, progress: bool) -> Tuple:
    name = 'rpcresults call→Responder'
    queue = f'rpcresults-bench-{uuid.uuid4().hex[:12]}'
    app = App(broker, result_reply_queue_expires=60)
    with app.connection() as connection:  # as the responders declare it, so calls never race them
        Responder.queue_for(queue, expires=RESPONDER_QUEUE_EXPIRES)(connection.default_channel).declare()
    context = multiprocessing.get_context('spawn')
    responders = [context.Process(target=_respond, args=(broker, queue), daemon=True) for _ in range(workers)]
    for process in responders:
        process.start()
    client = Client(app)
    table = app.backend.result_consumer.table
    bar = Progress(count, lambda: table.received, name, enabled=progress)
    try:
        started = time.perf_counter()
        cpu_started = time.process_time()
        results = ResultSet([client.call(queue, index) for index in range(count)], app=app)
        try:
            values = results.join_native(timeout=timeout, on_interval=bar.tick)
        except TimeoutError:
            print(f'{name}: the join did not finish within {timeout} s ({table.received} of {count} '
                  'answers arrived)', file=sys.stderr)
            return (name, table.received, 'TIMED OUT', f'>{timeout}', '-', '-')
        elapsed = time.perf_counter() - started
        cpu = time.process_time() - cpu_started
    finally:
        bar.close()
        for process in responders:
            process.terminate()
            process.join(timeout=30)
        app.close()
    ok = values == list(range(count))
    return (name, len(values), 'yes' if ok else 'NO', f'{elapsed:.3f}', f'{count / elapsed:.0f}',
            f'{cpu / count * 1e6:.1f}')


def bench(broker: str, count: int, workers: int, timeout: float, celery: bool, progress: bool = True) -> int:
    """Measure the join of ``count`` results published by ``workers`` processes; print a table."""
    problem = broker_problem(broker)
    if problem is not None:
        print(f'no broker answers at {broker} ({problem}); bench needs a real broker '
              '(start RabbitMQ with: rabbitmq-server -detached, or pass --broker URL)', file=sys.stderr)
        return 2
    print(f'rpcresults bench: {workers} publisher process(es), {count} results on {broker}', flush=True)
    rows = [_rpcresults_row(broker, count, workers, timeout, progress)]
    if celery:
        row = _celery_row(broker, count, workers, timeout, progress)
        if row is None:
            print('celery is not installed: its row is left out', file=sys.stderr)
        else:
            rows.append(row)
    rows.append(_round_trip_row(broker, count, workers, timeout, progress))
    print_table(HEADERS, rows)
    return 0 if all(row[2] == 'yes' for row in rows) else 1
