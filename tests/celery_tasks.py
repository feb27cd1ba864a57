"""The Celery app and tasks that the test worker (tests/celery_worker.py) runs.

One module serves every Celery test: the worker's result backend comes from the environment
(``RPCRESULTS_CELERY_BACKEND``: ``rpc://`` by default, or the drop-in
``rpcresults.contrib.celery:RPCBackend``), so plain ``rpc://``, the drop-in and interop tests
share it. Clients should not use this module's ``app`` (it is configured for the worker); they
build their own with :func:`make_client` and call the tasks by name (``TASK_*`` constants).
"""
from __future__ import annotations

import os
import time
import uuid
from typing import Any, Dict, Optional

from celery import Celery, bootsteps

BROKER_URL_VAR = 'RPCRESULTS_BROKER_URL'
BACKEND_VAR = 'RPCRESULTS_CELERY_BACKEND'
DEFAULT_BROKER_URL = 'amqp://guest:guest@127.0.0.1:5672//'
DEFAULT_BACKEND = 'rpc://'

TASK_ADD = 'tests.celery_tasks.add'
TASK_FAIL = 'tests.celery_tasks.fail'
TASK_PROGRESS = 'tests.celery_tasks.progress'
TASK_SLEEP = 'tests.celery_tasks.sleep'
TASK_ECHO = 'tests.celery_tasks.echo'
TASK_TOUCH = 'tests.celery_tasks.touch'
TASK_WAIT_FOR_FILE = 'tests.celery_tasks.wait_for_file'
TASK_JOIN_INSIDE = 'tests.celery_tasks.join_inside'
TASK_RPCRESULTS_JOIN_INSIDE = 'tests.celery_tasks.rpcresults_join_inside'

#: Set (to anything non-empty) in the worker's environment: the worker sends extended results
#: (``result_extended``: task name, args, kwargs, worker, queue in every result).
RESULT_EXTENDED_VAR = 'RPCRESULTS_CELERY_RESULT_EXTENDED'


def _configure(app: Celery, queue: Optional[str]) -> None:
    app.conf.update(
        task_serializer='json', result_serializer='json', accept_content=['json'],
        # One task in flight per worker: the queue order is the execution order (revoke tests).
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=True,
        broker_connection_retry_on_startup=True,
        result_persistent=False,
        # Not exclusive, so a test can check (passive declare) that a control message reached it.
        control_queue_exclusive=False,
    )
    if queue:
        app.conf.task_default_queue = queue


def make_client(backend: str = DEFAULT_BACKEND, queue: Optional[str] = None,
                broker_url: Optional[str] = None) -> Celery:
    """A client-side Celery app (its own, not this module's) with result backend ``backend``
    whose tasks go to ``queue`` by default. Close it with ``app.close()``."""
    client = Celery('rpcresults-celery-client', set_as_current=False,
                    broker=broker_url or os.environ.get(BROKER_URL_VAR, DEFAULT_BROKER_URL),
                    backend=backend)
    _configure(client, queue)
    # Celery's reply queue (declared at send_task, even when never read) expires a minute after
    # its last use instead of Celery's default day: tests leave nothing behind on the broker.
    client.conf.result_expires = 60
    return client


class TaskFailure(ValueError):
    """The custom exception ``fail`` raises; clients check they get this very type back."""


class _Tick(bootsteps.StartStopStep):
    """A 0.25 s no-op timer in the worker's event loop.

    A warm shutdown only sets a flag that the loop checks between polls, and with nothing
    scheduled a poll lasts up to 10 s; the tick makes SIGTERM take effect promptly.
    """

    requires = {'celery.worker.components:Hub'}

    def start(self, worker: Any) -> None:
        if getattr(worker, 'hub', None) is not None:
            worker.hub.call_repeatedly(0.25, _noop)


def _noop() -> None:
    pass


app = Celery('rpcresults-celery-tests',
             broker=os.environ.get(BROKER_URL_VAR, DEFAULT_BROKER_URL),
             backend=os.environ.get(BACKEND_VAR, DEFAULT_BACKEND))
_configure(app, None)
app.conf.result_extended = bool(os.environ.get(RESULT_EXTENDED_VAR))
app.steps['worker'].add(_Tick)


@app.task(name=TASK_ADD)
def add(x: Any, y: Any) -> Any:
    return x + y


@app.task(name=TASK_FAIL)
def fail(msg: str) -> None:
    raise TaskFailure(msg)


@app.task(name=TASK_PROGRESS, bind=True)
def progress(self: Any, n: int) -> int:
    """Reports states PROGRESS with meta {'i': 0..n-1, 'n': n}, then returns n."""
    for i in range(n):
        self.update_state(state='PROGRESS', meta={'i': i, 'n': n})
    return n


@app.task(name=TASK_SLEEP)
def sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


@app.task(name=TASK_ECHO)
def echo(x: Any) -> Any:
    return x


@app.task(name=TASK_TOUCH)
def touch(path: str) -> str:
    """Creates ``path``: the side effect that proves the task ran."""
    with open(path, 'w') as fh:
        fh.write('ran\n')
    return path


@app.task(name=TASK_WAIT_FOR_FILE, acks_late=True)
def wait_for_file(started: str, gate: str, timeout: float = 60.0) -> bool:
    """Creates ``started``, then blocks the (solo) worker until ``gate`` exists or ``timeout``.

    Acked late, so with prefetch 1 the broker delivers nothing else from the task queue while
    it runs: what is queued behind it stays in the broker until it returns.
    """
    with open(started, 'w') as fh:
        fh.write('started\n')
    deadline = time.monotonic() + timeout
    while not os.path.exists(gate):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


@app.task(name=TASK_JOIN_INSIDE, bind=True)
def join_inside(self: Any, allow: bool) -> Dict[str, str]:
    """Waits, inside the task, for another result through the worker's own backend.

    A final state for a new id is first published to the worker's own reply queue, so the
    result is there to read; then ``AsyncResult(id).get(disable_sync_subtasks=not allow)``.
    Returns ``{'marker': 'refused: <the RuntimeError>' or 'value: <the value>', 'reply_queue':
    <the worker's reply queue>}`` (the test deletes that queue once the worker is gone).
    """
    from celery.app.task import Context

    backend = self.app.backend
    task_id = str(uuid.uuid4())
    with self.app.producer_or_acquire() as producer:
        backend.binding(producer.channel).declare()  # the reply queue exists before the publish
    backend.store_result(task_id, 'inner', 'SUCCESS',
                         request=Context(reply_to=backend.oid, correlation_id=task_id))
    try:
        value = self.app.AsyncResult(task_id).get(timeout=20, disable_sync_subtasks=not allow)
    except RuntimeError as exc:
        return {'marker': f'refused: {exc}', 'reply_queue': backend.oid}
    return {'marker': f'value: {value}', 'reply_queue': backend.oid}


@app.task(name=TASK_RPCRESULTS_JOIN_INSIDE)
def rpcresults_join_inside() -> str:
    """Builds an rpcresults ``App`` (not Celery's) inside the task and waits on one of its results:
    'refused: <the RuntimeError>' when rpcresults honours Celery's task_join_will_block,
    else 'waited: <what get() did>'."""
    import rpcresults

    client = rpcresults.App(app.conf.broker_url, result_reply_queue_expires=10)
    try:
        try:
            value = client.AsyncResult(str(uuid.uuid4())).get(timeout=0.1)
        except RuntimeError as exc:
            return f'refused: {exc}'
        except Exception as exc:  # e.g. its TimeoutError: it did wait
            return f'waited: {type(exc).__name__}: {exc}'
        return f'waited: returned {value!r}'
    finally:
        client.close()
