"""The demo: worker processes publish results to this client's reply queue; the client joins them."""
from __future__ import annotations

import multiprocessing
import sys
import time
import uuid
from typing import List, Optional, Sequence

from .app import App
from .exceptions import TimeoutError
from .result import ResultSet

__all__ = ('demo',)


def _worker(broker: str, reply_to: str, task_ids: Sequence[str], offset: int) -> None:
    """One worker process: publish a SUCCESS for each id to the client's reply queue."""
    app = App(broker)
    backend = app.create_backend()
    try:
        for index, task_id in enumerate(task_ids, start=offset):
            backend.mark_as_done(task_id, index * index,
                                 request={'reply_to': reply_to, 'correlation_id': task_id})
    finally:
        backend.close()


def _broker_answers(app: App) -> Optional[str]:
    connection = app.connection()
    try:
        connection.ensure_connection(max_retries=1)
        return None
    except Exception as exc:  # the reason is printed to the user
        return str(exc) or type(exc).__name__
    finally:
        connection.release()


def demo(broker: str, count: int, workers: int, timeout: float) -> int:
    """Publish ``count`` results from ``workers`` processes; join them here; print what it took."""
    app = App(broker)
    problem = _broker_answers(app)
    if problem is not None:
        print(f'no broker answers at {broker} ({problem}).\n'
              f'Start RabbitMQ with: rabbitmq-server -detached   (or pass --broker URL)', file=sys.stderr)
        return 2
    client = app.backend
    client.result_consumer.start()  # the reply queue exists before any worker publishes
    task_ids: List[str] = [str(uuid.uuid4()) for _ in range(count)]
    results = ResultSet([app.AsyncResult(task_id) for task_id in task_ids], app=app)
    chunk = -(-count // workers)
    context = multiprocessing.get_context('spawn')
    processes = [
        context.Process(target=_worker, args=(broker, client.oid, task_ids[start:start + chunk], start),
                        daemon=True)
        for start in range(0, count, chunk)
    ]
    print(f'rpcresults demo: {len(processes)} worker process(es) publish {count} results '
          f'to reply queue {client.oid} on {broker}')
    started = time.perf_counter()
    cpu_started = time.process_time()
    for process in processes:
        process.start()
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                values = results.join_native(timeout=1.0)
                break
            except TimeoutError:
                failed = [p for p in processes if p.exitcode not in (None, 0)]
                if failed:
                    print(f'{len(failed)} worker process(es) failed (exit codes '
                          f'{[p.exitcode for p in failed]}); giving up', file=sys.stderr)
                    return 1
                if time.monotonic() >= deadline:
                    print(f'the join did not finish within {timeout} s', file=sys.stderr)
                    return 1
    finally:
        for process in processes:
            process.join(timeout=10)
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu_started
    expected = [index * index for index in range(count)]
    ok = values == expected
    stats = client.stats()
    app.close()
    rows = [
        ('results joined', f'{len(values)}'),
        ('all values correct, in order', 'yes' if ok else 'NO'),
        ('wall time', f'{elapsed:.3f} s (includes starting {len(processes)} processes)'),
        ('rate', f'{count / elapsed:,.0f} results/s'),
        ('client CPU per result', f'{cpu / count * 1e6:.1f} µs'),
        ('received / dispatched / buffered', f"{stats['received']} / {stats['dispatched']} / {stats['buffered']}"),
        ('compiled drainer', 'yes' if _using_extension() else 'no (pure Python)'),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f'  {name:<{width}}  {value}')
    return 0 if ok else 1


def _using_extension() -> bool:
    from . import USING_EXTENSION
    return USING_EXTENSION
