"""Shared fixtures: the real broker (loud failure when it is down), apps, client and worker backends."""
from __future__ import annotations

import os
import socket
import uuid
from typing import Iterator
from urllib.parse import urlparse

import pytest

from rpcresults import App, Client
from rpcresults.app import set_default_app
from tests.proxy import TcpProxy
from tests.twins import TWINS, Twin

BROKER_URL = os.environ.get('RPCRESULTS_BROKER_URL', 'amqp://guest:guest@localhost:5672//')
REDIS_URL = os.environ.get('RPCRESULTS_REDIS_URL', 'redis://127.0.0.1:6379/15')

START_RABBIT = 'rabbitmq-server -detached'
START_REDIS = ('redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" '
               '--appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log')


def port_open(url: str, default_port: int) -> bool:
    parsed = urlparse(url)
    host = parsed.hostname or 'localhost'
    port = parsed.port or default_port
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


@pytest.fixture(scope='session')
def broker_url() -> str:
    """The real RabbitMQ; a missing broker fails loudly with the command that starts one."""
    if not port_open(BROKER_URL, 5672):
        pytest.fail(f'RabbitMQ is not answering at {BROKER_URL}; start it with: {START_RABBIT}',
                    pytrace=False)
    return BROKER_URL


@pytest.fixture(scope='session')
def redis_url() -> str:
    """The real Redis; a missing server fails loudly with the command that starts one."""
    if not port_open(REDIS_URL, 6379):
        pytest.fail(f'Redis is not answering at {REDIS_URL}; start it with: {START_REDIS}', pytrace=False)
    return REDIS_URL


def make_app(url: str, **conf: object) -> App:
    conf.setdefault('result_reply_queue_expires', 60)
    return App(url, **conf)


@pytest.fixture
def app(broker_url: str) -> Iterator[App]:
    """An app on the real broker; its reply queue is new for every test."""
    application = make_app(broker_url)
    set_default_app(application)
    yield application
    application.close()
    set_default_app(None)


@pytest.fixture
def memory_app() -> Iterator[App]:
    """An app on kombu's in-process ``memory://`` transport (unit layer only)."""
    application = make_app(f'memory://{uuid.uuid4().hex}')
    yield application
    application.close()


@pytest.fixture
def client(app: App):
    """The client-side RPC backend (this thread's)."""
    return app.backend


@pytest.fixture
def worker(app: App):
    """A second RPC backend used to publish results, as a worker would."""
    backend = app.create_backend()
    yield backend
    backend.close()


@pytest.fixture
def rpc(app: App) -> Iterator[Client]:
    """A ``Client`` (request side) on ``app``, closed after the test."""
    client = Client(app)
    yield client
    client.close()


@pytest.fixture
def proxy(broker_url: str) -> Iterator[TcpProxy]:
    """A TcpProxy of the test's own in front of the shared broker (cut it, never the broker)."""
    with TcpProxy.for_broker(broker_url) as running:
        yield running


def request_for(client, task_id: str) -> dict:
    """The request fields a worker needs to answer ``client``."""
    return {'reply_to': client.oid, 'correlation_id': task_id}


def new_id() -> str:
    return str(uuid.uuid4())


@pytest.fixture
def raw(broker_url: str):
    """A plain py-amqp connection (no kombu) for publishing and inspecting like an outsider."""
    from tests.helpers import raw_connection
    conn = raw_connection(broker_url)
    yield conn
    conn.close()


@pytest.fixture
def publish(raw):
    """Publish a raw reply to a queue through the default exchange (as any worker could)."""
    import amqp
    channel = raw.channel()

    def send(queue: str, body, **properties) -> None:
        if isinstance(body, str):
            body = body.encode('utf-8')
        channel.basic_publish(amqp.Message(body, **properties), exchange='', routing_key=queue)

    return send


@pytest.fixture(params=TWINS)
def twin(request: pytest.FixtureRequest) -> Twin:
    """One implementation of the protocol layer (pure, then compiled): its frames and table modules."""
    return Twin(request.param)


def pytest_collection_modifyitems(config: pytest.Config, items: list) -> None:
    """Tests on the ``twin`` fixture carry the ``twins`` marker. With ``RPCRESULTS_NO_EXTENSIONS``
    set, the compiled-twin cases are deselected, not skipped: CI runs them in its other pass, and
    this pass reports only what it really tests."""
    for item in items:
        if 'twin' in getattr(item, 'fixturenames', ()):
            item.add_marker(pytest.mark.twins)
    if not os.environ.get('RPCRESULTS_NO_EXTENSIONS'):
        return
    compiled = [item for item in items
                if 'compiled' in getattr(getattr(item, 'callspec', None), 'params', {}).values()]
    if compiled:
        config.hook.pytest_deselected(items=compiled)
        chosen = set(map(id, compiled))
        items[:] = [item for item in items if id(item) not in chosen]
