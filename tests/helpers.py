"""Helpers shared by the integration tests: a plain py-amqp connection, a bounded wait,
a thread whose outcome a test collects, and a result bound to a given backend."""
from __future__ import annotations

import os
import select
import signal
import threading
import time
from typing import Any, Callable, Optional, Tuple
from urllib.parse import unquote, urlparse

import amqp

from rpcresults import AsyncResult


def raw_connection(broker_url: str) -> amqp.Connection:
    """A plain py-amqp connection to the broker behind ``broker_url`` (no kombu in between)."""
    url = urlparse(broker_url)
    vhost = unquote(url.path[1:]) if len(url.path) > 1 else '/'
    conn = amqp.Connection(host=f'{url.hostname or "localhost"}:{url.port or 5672}',
                           userid=unquote(url.username or 'guest'),
                           password=unquote(url.password or 'guest'),
                           virtual_host=vhost or '/')
    conn.connect()
    return conn


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, what: str = 'condition',
               interval: float = 0.005) -> Any:
    """Poll ``predicate`` (broker-side state has no event to wait on) until truthy; fail at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f'gave up after {timeout} s waiting for {what}')
        time.sleep(interval)


class Call(threading.Thread):
    """Run ``fn`` in a thread and keep its return value or exception."""

    def __init__(self, fn: Callable[[], Any], name: str = 'call') -> None:
        super().__init__(name=name, daemon=True)
        self.fn = fn
        self.value: Any = None
        self.error: Optional[BaseException] = None

    def run(self) -> None:
        try:
            self.value = self.fn()
        except BaseException as exc:  # handed to the test thread
            self.error = exc

    def outcome(self, timeout: float) -> Tuple[Any, Optional[BaseException]]:
        self.join(timeout)
        assert not self.is_alive(), f'{self.name} still running after {timeout} s'
        return self.value, self.error

    def result(self, timeout: float) -> Any:
        value, error = self.outcome(timeout)
        if error is not None:
            raise error
        return value


def bound(backend: Any, task_id: str) -> AsyncResult:
    """A result read through ``backend``, whatever thread uses it."""
    return AsyncResult(task_id, backend=backend, app=backend.app)


def read_until_eof(fd: int, timeout: float) -> bytes:
    """Everything written to pipe ``fd`` until its writer closes it, or what came within ``timeout``."""
    chunks = []
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        readable, _, _ = select.select([fd], [], [], remaining)
        if readable:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    return b''.join(chunks)


def reap(pid: int, timeout: float) -> Optional[int]:
    """The wait status of child ``pid`` once it exits; after ``timeout`` it is SIGKILLed and None returned."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.01)
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except OSError:
        pass
    return None
