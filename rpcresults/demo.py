"""The demo: a :class:`Client` sends N calls, a :class:`Responder` answers them, the client joins them.

When no broker answers, the demo says so and runs on ``memory://`` (kombu's
in-process transport): the responder and the client then share this process.
"""
from __future__ import annotations

import sys
import threading
import time
import uuid
from typing import Any

from ._cli_util import Progress, broker_problem, print_table
from .app import App
from .client import Client
from .exceptions import TimeoutError
from .responder import Responder
from .result import ResultSet

__all__ = ('demo', 'square', 'MEMORY_FALLBACK')

MEMORY_FALLBACK = 'memory://rpcresults-demo'


def square(payload: Any) -> Any:
    """The demo's handler."""
    return payload * payload


def demo(broker: str, count: int, timeout: float, direct: bool = False, progress: bool = True) -> int:
    """Run ``count`` calls through a responder thread and join them; print a table; 0 when all correct."""
    problem = broker_problem(broker)
    if problem is not None:
        print(f'no broker answers at {broker} ({problem}); running on {MEMORY_FALLBACK} instead '
              f'(in-process: the responder and the client share this process). '
              f'Start RabbitMQ with: rabbitmq-server -detached (or pass --broker URL)', file=sys.stderr)
        broker, direct = MEMORY_FALLBACK, False
    backend_url = 'rpc+direct://' if direct else 'rpc://'
    app = App(broker, result_backend=backend_url, result_reply_queue_expires=60)
    queue = f'rpcresults-demo-{uuid.uuid4().hex[:12]}'
    responder = Responder(App(broker), queue, square, prefetch=256, expires=60).start()
    thread = threading.Thread(target=responder.run, kwargs={'timeout': timeout + 10},
                              name='responder', daemon=True)
    thread.start()
    client = Client(app)
    print(f'rpcresults demo: {count} calls to queue {queue} on {broker} ({backend_url}); '
          f'a responder thread answers them', flush=True)
    started = time.perf_counter()
    cpu_started = time.process_time()
    table = client.backend.result_consumer.table
    bar = Progress(count, lambda: table.received, 'joining', enabled=progress)
    try:
        results = ResultSet([client.call(queue, index) for index in range(count)], app=app)
        values = results.join_native(timeout=timeout, on_interval=bar.tick)
    except TimeoutError:
        print(f'the join did not finish within {timeout} s', file=sys.stderr)
        return 1
    finally:
        bar.close()
        responder.stop()
        thread.join(10)
        responder.close()
        client.close()
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu_started
    ok = values == [square(index) for index in range(count)]
    app.close()
    print_table(['client', 'count', 'correct', 'seconds', 'results/s', 'CPU us/result (both sides)'],
                [[f'rpcresults {backend_url}', len(values), 'yes' if ok else 'NO', f'{elapsed:.3f}',
                  f'{count / elapsed:.0f}', f'{cpu / count * 1e6:.1f}']])
    return 0 if ok else 1
