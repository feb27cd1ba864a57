"""Helpers shared by the integration tests: a plain py-amqp connection and a bounded wait."""
from __future__ import annotations

import time
from typing import Any, Callable
from urllib.parse import unquote, urlparse

import amqp


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
