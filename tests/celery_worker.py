"""Start a real ``celery worker -P solo`` for a test, on the shared broker, and always stop it.

API (stable; other test modules import it)::

    from tests.celery_worker import celery_worker, worker_fixture, CeleryWorker

    with celery_worker(backend='rpc://') as w:       # context manager
        client = make_client(queue=w.queue)           # tests/celery_tasks.py
        ...                                           # w.queue, w.hostname, w.log(), w.pid

    solo_worker = worker_fixture(backend='rpc://')    # pytest fixture (module scope by default)
    delete_queue(broker_url, name)                    # remove a task queue (and its exchange)

``celery_worker(app_module='tests.celery_tasks', queue=None, backend=None, extra_args=(),
broker_url=None, ready_timeout=60.0, env=None)``:

* ``queue``: the only queue the worker consumes; a new unique name when None, so tests never
  take each other's tasks. Send tasks with ``queue=w.queue`` (or ``task_default_queue``).
* ``backend``: the worker's ``result_backend``, passed as ``$RPCRESULTS_CELERY_BACKEND``
  (read by tests/celery_tasks.py); None keeps the module's default (``rpc://``).
* ``extra_args``: more ``celery worker`` command-line arguments.
* The worker's stdout+stderr go to a log file; ``w.log()`` reads it (include it in assertion
  messages). Startup waits, bounded by ``ready_timeout``, for the worker's "ready." line and
  fails with the log if it does not come or the process exits.
* At exit: SIGTERM, then SIGKILL after ``stop_timeout`` seconds; the process is always reaped.
  A queue this function named is then deleted from the broker (with its exchange of the same
  name, as Celery declares one per queue), so runs leave nothing behind on the shared broker.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional, Sequence

import pytest

from tests.celery_tasks import BACKEND_VAR, BROKER_URL_VAR, DEFAULT_BROKER_URL

__all__ = ('CeleryWorker', 'celery_worker', 'worker_fixture', 'delete_queue', 'ROOT')

logger = logging.getLogger(__name__)

#: The project root: the worker's working directory, so ``tests.*`` and ``rpcresults`` import.
ROOT = Path(__file__).resolve().parent.parent

READY_MARK = ' ready.'


@dataclass
class CeleryWorker:
    """A running worker: where to send tasks, its node name, its log, its process."""

    queue: str
    hostname: str
    log_path: Path
    process: subprocess.Popen
    backend: Optional[str]
    tmpdir: Path = field(default_factory=Path)
    final_log: Optional[str] = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        """Everything the worker has written so far (stdout and stderr); kept after it stops."""
        if self.final_log is not None:
            return self.final_log
        try:
            return self.log_path.read_text(errors='replace')
        except OSError:
            return ''

    def alive(self) -> bool:
        return self.process.poll() is None

    def wait_for_log(self, text: str, timeout: float = 30.0) -> None:
        """Block until ``text`` appears in the log; fail (with the log) at the deadline or if the
        worker exits first."""
        deadline = time.monotonic() + timeout
        while text not in self.log():
            if not self.alive():
                raise AssertionError(f'celery worker exited ({self.process.returncode}) before '
                                     f'{text!r} appeared; log:\n{self.log()}')
            if time.monotonic() >= deadline:
                raise AssertionError(f'gave up after {timeout} s waiting for {text!r} in the '
                                     f'celery worker log:\n{self.log()}')
            time.sleep(0.05)


def _stop(process: subprocess.Popen, stop_timeout: float) -> None:
    if process.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, stop_timeout), (signal.SIGKILL, 10.0)):
        try:
            process.send_signal(sig)
        except ProcessLookupError:
            return
        try:
            process.wait(wait)
            return
        except subprocess.TimeoutExpired:
            logger.warning('celery worker %s ignored %s', process.pid, sig.name)


@contextlib.contextmanager
def celery_worker(app_module: str = 'tests.celery_tasks', queue: Optional[str] = None,
                  backend: Optional[str] = None, extra_args: Sequence[str] = (),
                  broker_url: Optional[str] = None, ready_timeout: float = 60.0,
                  env: Optional[Dict[str, str]] = None,
                  stop_timeout: float = 10.0) -> Iterator[CeleryWorker]:
    """Run ``celery -A app_module worker -P solo`` on a unique queue; see the module docstring."""
    tag = uuid.uuid4().hex[:12]
    own_queue = queue is None
    queue = queue or f'rpcresults-test-{tag}'
    node = f'rpcr-{tag}'
    tmpdir = Path(tempfile.mkdtemp(prefix=f'celery-worker-{tag}-'))
    log_path = tmpdir / 'worker.log'
    child_env = dict(os.environ)
    child_env[BROKER_URL_VAR] = broker_url or os.environ.get(BROKER_URL_VAR, DEFAULT_BROKER_URL)
    if backend is not None:
        child_env[BACKEND_VAR] = backend
    child_env['PYTHONPATH'] = os.pathsep.join(
        [str(ROOT)] + ([child_env['PYTHONPATH']] if child_env.get('PYTHONPATH') else []))
    child_env.setdefault('PYTHONUNBUFFERED', '1')
    child_env.update(env or {})
    argv = [sys.executable, '-m', 'celery', '-A', app_module, 'worker', '-P', 'solo', '-c', '1',
            '--without-gossip', '--without-mingle', '--without-heartbeat',
            '-Q', queue, '-n', f'{node}@%h', '--loglevel=INFO', *extra_args]
    with open(log_path, 'wb') as log_file:
        process = subprocess.Popen(argv, cwd=str(ROOT), env=child_env, stdin=subprocess.DEVNULL,
                                   stdout=log_file, stderr=subprocess.STDOUT)
    worker = CeleryWorker(queue=queue, hostname=f'{node}@{os.uname().nodename}', log_path=log_path,
                          process=process, backend=backend, tmpdir=tmpdir)
    try:
        worker.wait_for_log(READY_MARK, timeout=ready_timeout)
        logger.info('celery worker %s (pid %s) ready on queue %s', worker.hostname, worker.pid, queue)
        yield worker
    finally:
        _stop(process, stop_timeout)
        worker.final_log = worker.log()
        shutil.rmtree(tmpdir, ignore_errors=True)
        if own_queue:
            delete_queue(child_env[BROKER_URL_VAR], queue)


def delete_queue(broker_url: str, queue: str) -> None:
    """Remove a test's task queue and its same-named exchange (best effort)."""
    from kombu import Connection
    try:
        with Connection(broker_url, connect_timeout=5) as conn:
            channel = conn.channel()
            channel.queue_delete(queue)
            channel.exchange_delete(queue)
    except Exception:  # cleanup only: a failure here must not hide the test's outcome
        logger.warning('could not delete test queue %s', queue, exc_info=True)


def worker_fixture(scope: str = 'module', **kwargs: Any) -> Callable[..., Any]:
    """A pytest fixture (default scope 'module') yielding a :class:`CeleryWorker` started with
    ``celery_worker(**kwargs)``; it depends on conftest's ``broker_url`` so a missing broker
    fails loudly. Assign it to a name in a test module: ``solo = worker_fixture(backend=...)``."""

    @pytest.fixture(scope=scope)
    def _worker(broker_url: str) -> Iterator[CeleryWorker]:
        options = dict(kwargs)
        options.setdefault('broker_url', broker_url)
        with celery_worker(**options) as worker:
            yield worker

    return _worker
