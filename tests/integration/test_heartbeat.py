"""AMQP heartbeats on the reply connection: negotiated as configured, and really kept (and
checked) while a waiter is blocked in ``get()``.

RabbitMQ negotiates the smaller non-zero value of both sides; ``broker_heartbeat=0``
turns heartbeats off. The broker's own view of a connection's heartbeat comes from
``rabbitmqctl list_connections`` on a private node (tests/rabbit_node.py); the shared
broker is only connected to, and its link is black-holed only through a TcpProxy of
the test's own. Every wait is bounded; no assertion depends on elapsed time.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Dict, Iterator

import pytest

from rpcresults import App
from rpcresults.app import DEFAULTS
from rpcresults.exceptions import TimeoutError

from ..conftest import make_app, new_id, request_for
from ..helpers import Call, bound, closing_apps, wait_until
from ..proxy import TcpProxy
from ..rabbit_node import RabbitNode, private_node  # noqa: F401  (module-scoped fixture)

#: Short enough to idle for several intervals, long enough for a loaded 2-core box.
HEARTBEAT = 2
#: How many intervals a waiter stays idle (RabbitMQ drops a peer silent for two).
IDLE_INTERVALS = 3.5


# -- helpers ---------------------------------------------------------------------------------
@pytest.fixture
def apps() -> Iterator[Callable[..., App]]:
    """Factory of apps (``url``, settings); their backends are closed after the test."""
    yield from closing_apps(make_app)


def reply_connection(client: Any) -> Any:
    """The py-amqp connection the client's reply consumer reads (consuming started): the
    connection of its consuming channel, looked at on the wire (peer port, bytes sent)."""
    client.result_consumer.start()
    return client.result_consumer.connection.channel.connection


def publish(worker: Any, client: Any, task_id: str, value: Any) -> None:
    worker.mark_as_done(task_id, value, request=request_for(client, task_id))


def broker_heartbeats(node: RabbitNode) -> Dict[int, int]:
    """``{client port: heartbeat timeout}`` of every AMQP connection, as the broker sees them."""
    output = node.ctl_call('-q', 'list_connections', '--no-table-headers', 'peer_port', 'timeout')
    seen = {}
    for line in output.splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[0].isdigit():
            seen[int(fields[0])] = int(float(fields[1]))
    return seen


def start_blocked_get(client: Any, task_id: str, timeout: float) -> Call:
    """A thread blocked in ``get()`` on ``task_id``; returns once it leads the reading."""
    result = bound(client, task_id)
    call = Call(lambda: result.get(timeout=timeout), name='blocked-get')
    call.start()
    wait_until(lambda: client.stats()['reading'] == 1 or not call.is_alive(), 20,
               'the waiter to start reading')
    assert call.is_alive(), f'get() ended at once: {call.error!r}'
    return call


# -- negotiation -------------------------------------------------------------------------------
def test_default_heartbeat_is_negotiated_with_the_shared_broker(broker_url, apps):
    client = apps(broker_url).create_backend()
    conn = reply_connection(client)
    configured = DEFAULTS['broker_heartbeat']
    assert configured > 0
    assert conn.client_heartbeat == configured
    expected = min(configured, conn.server_heartbeat) if conn.server_heartbeat else configured
    assert conn.heartbeat == expected
    assert conn.heartbeat > 0


@pytest.mark.parametrize('setting', ['default', HEARTBEAT, 0])
def test_heartbeat_as_configured_is_what_the_broker_uses(setting, private_node, apps):  # noqa: F811
    conf = {} if setting == 'default' else {'broker_heartbeat': setting}
    client = apps(private_node.url, **conf).create_backend()
    conn = reply_connection(client)
    configured = DEFAULTS['broker_heartbeat'] if setting == 'default' else setting
    if configured:
        expected = min(configured, conn.server_heartbeat) if conn.server_heartbeat else configured
    else:
        expected = 0  # the client turned heartbeats off: none either way
    assert conn.heartbeat == expected
    assert client.stats()['heartbeat'] == expected
    port = conn.sock.getsockname()[1]
    assert broker_heartbeats(private_node).get(port) == expected


# -- a blocked waiter keeps (and checks) its connection --------------------------------------------
def test_blocked_waiter_idle_for_several_intervals_keeps_its_connection(broker_url, apps):
    app = apps(broker_url, broker_heartbeat=HEARTBEAT)
    client = app.create_backend()
    worker = app.create_backend()
    conn = reply_connection(client)
    assert conn.heartbeat == HEARTBEAT
    local_port = conn.sock.getsockname()[1]

    task_id = new_id()
    call = start_blocked_get(client, task_id, timeout=60)
    sent_before = conn.bytes_sent
    time.sleep(IDLE_INTERVALS * HEARTBEAT)  # nothing published: only heartbeats cross the link
    assert call.is_alive(), f'get() ended while idle: {call.error!r}'
    assert conn.bytes_sent > sent_before, 'the blocked waiter sent no heartbeat while idle'

    publish(worker, client, task_id, 'after-idling')
    assert call.result(timeout=60) == 'after-idling'
    assert client.stats()['reconnects'] == 0
    assert client.result_consumer.connection.channel.connection is conn  # the same one, never rebuilt
    assert conn.sock is not None and conn.sock.getsockname()[1] == local_port


@pytest.fixture
def silent_link(proxy: TcpProxy) -> Iterator[TcpProxy]:
    """A proxy in front of ``proxy``, whose ``stall()`` leaves the client a socket that stays open
    and silent even after the broker gives up on it.

    The broker, missing the client's heartbeats, resets its side; ``proxy`` passes that on as
    a plain close, and a stalled proxy never closes a client whose bytes it still holds. So
    no error and no EOF reach the client: only its own heartbeat check can find the link dead.
    """
    with TcpProxy('127.0.0.1', proxy.port) as p:
        yield p


def test_blocked_waiter_detects_a_black_holed_link_by_missed_heartbeats(broker_url, apps, proxy, silent_link):
    app = apps(silent_link.url_for(broker_url), broker_heartbeat=HEARTBEAT)
    client = app.create_backend()
    worker = apps(broker_url).create_backend()  # publishes directly, not through the proxies
    assert reply_connection(client).heartbeat == HEARTBEAT

    task_id = new_id()
    call = start_blocked_get(client, task_id, timeout=90)
    assert silent_link.stall() == 1  # nothing gets through either way; the socket stays open
    # (reconnects counts from the start of a recovery; the new connection comes after)
    wait_until(lambda: client.stats()['reconnects'] >= 1 and silent_link.accepted >= 2, 60,
               'the waiter to notice missed heartbeats and connect again', interval=0.05)
    assert call.is_alive(), f'get() ended instead of reconnecting: {call.error!r}'

    publish(worker, client, task_id, 'after-the-black-hole')
    assert call.result(timeout=90) == 'after-the-black-hole'
    assert client.stats()['reconnects'] >= 1


def test_without_heartbeats_a_black_holed_link_goes_unnoticed(broker_url, apps, proxy):
    """The control for the test above: there, heartbeats (not something else) found the dead link."""
    app = apps(proxy.url_for(broker_url), broker_heartbeat=0)
    client = app.create_backend()
    assert reply_connection(client).heartbeat == 0

    call = start_blocked_get(client, new_id(), timeout=IDLE_INTERVALS * HEARTBEAT)
    assert proxy.stall() == 1
    _, error = call.outcome(timeout=60)
    assert isinstance(error, TimeoutError)
    assert client.stats()['reconnects'] == 0
    assert proxy.accepted == 1
    proxy.cut()  # so closing the client does not wait on a link that carries nothing
