"""Helpers shared by the integration tests: a plain py-amqp connection and a look at a queue through
it, a bounded wait, a thread whose outcome a test collects, a result bound to a given backend, a
waiter known to be attached, apps whose backends are closed after the test, and a forked child
that reports back through a pipe."""
from __future__ import annotations

import json
import os
import select
import signal
import threading
import time
import traceback
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple
from urllib.parse import unquote, urlparse

import amqp

from rpcresults import App, AsyncResult, states


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


def queue_counts(conn: amqp.Connection, name: str) -> Optional[Tuple[int, int]]:
    """``(messages ready, consumers)`` of queue ``name`` by a passive declare; None when it does not exist.

    A passive declare restarts the queue's x-expires timer: do not poll an expiring queue faster than that.
    """
    channel = conn.channel()
    try:
        ok = channel.queue_declare(queue=name, passive=True)
    except amqp.exceptions.NotFound:
        return None  # the broker closed the channel
    channel.close()
    return ok.message_count, ok.consumer_count


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


def started_listener(seen: threading.Event) -> Callable[[Dict[str, Any]], None]:
    """An ``on_message`` callback that sets ``seen`` when a STARTED state reaches the waiter."""
    def on_message(meta: Dict[str, Any]) -> None:
        if meta.get('status') == states.STARTED:
            seen.set()
    return on_message


def attach_waiter(client: Any, worker: Any, task_id: str, seen: threading.Event, attempts: int = 100) -> None:
    """Make sure a ``get()`` on ``task_id`` (with ``started_listener(seen)``) is attached and reading:
    publish STARTED until it heard one (a waiter only hears states that arrive after it attached)."""
    for _ in range(attempts):
        worker.mark_as_started(task_id, request={'reply_to': client.oid, 'correlation_id': task_id})
        if seen.wait(0.1):
            return
    raise AssertionError(f'the waiter for {task_id} never attached')


def closing_apps(make: Callable[..., App]) -> Iterator[Callable[..., App]]:
    """Generator body of a fixture: a factory of apps built by ``make``; every backend they create
    and then every app is closed after the test."""
    apps: List[App] = []
    backends: List[Any] = []

    def factory(*args: Any, **conf: Any) -> App:
        application = make(*args, **conf)
        original = application.create_backend

        def create_backend(url: Optional[str] = None) -> Any:
            backend = original(url)
            backends.append(backend)
            return backend

        application.create_backend = create_backend  # type: ignore[method-assign]
        apps.append(application)
        return application

    yield factory
    for backend in backends:
        backend.close()
    for application in apps:
        application.close()


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


def report_from_child(child: Callable[[Dict[str, Any]], None], timeout: float = 30.0,
                      reap_timeout: float = 10.0) -> Tuple[Dict[str, Any], Optional[int]]:
    """Fork; the child fills a report dict with ``child(report)`` (a traceback under 'error' if it
    raises), sends it back as JSON through a pipe and ends with ``os._exit``, never returning into
    pytest. The parent gets ``(report, wait status)``; a hung child is killed and its status is None."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover  (the child)
        code = 1
        try:
            os.close(read_fd)
            report: Dict[str, Any] = {}
            try:
                child(report)
                code = 0
            except BaseException:
                report['error'] = traceback.format_exc()
            data = json.dumps(report).encode()
            while data:
                data = data[os.write(write_fd, data):]
        finally:
            os._exit(code)
    os.close(write_fd)
    try:
        data = read_until_eof(read_fd, timeout)
    finally:
        status = reap(pid, reap_timeout)  # never a blocking wait: a hung child is killed
        os.close(read_fd)
    assert data, f'the forked child did not report within {timeout} s (wait status {status})'
    return json.loads(data), status
