"""Requests written by the frame writer reach the broker exactly as kombu's Producer would send them:
the same body bytes and the same properties (headers table, delivery mode, priority, expiration,
reply_to, correlation_id), for ``Client.call`` and ``Client.send_task``."""
from __future__ import annotations

import time
from typing import Any, Dict, Iterator, Tuple

import amqp
import kombu
import pytest

from rpcresults import Client
from tests.conftest import new_id
from tests.helpers import raw_connection

WAIT = 10.0


@pytest.fixture
def queues(broker_url: str) -> Iterator[Tuple[amqp.Channel, str, str]]:
    conn = raw_connection(broker_url)
    channel = conn.channel()
    ours, theirs = f'rpcresults-req-ours-{new_id()}', f'rpcresults-req-kombu-{new_id()}'
    for name in (ours, theirs):
        channel.queue_declare(name, durable=True, auto_delete=False, arguments={'x-expires': 60000})
    yield channel, ours, theirs
    for name in (ours, theirs):
        channel.queue_delete(name)
    conn.close()


def fetch(channel: amqp.Channel, queue: str) -> amqp.Message:
    deadline = time.monotonic() + WAIT
    while True:
        message = channel.basic_get(queue, no_ack=True)
        if message is not None:
            return message
        assert time.monotonic() < deadline, f'nothing arrived in {queue}'
        time.sleep(0.02)


def kombu_publish(broker_url: str, queue: str, body: Any, **options: Any) -> None:
    with kombu.Connection(broker_url) as conn:
        kombu.Producer(conn, auto_declare=False).publish(body, routing_key=queue, **options)


def same(ours: amqp.Message, theirs: amqp.Message) -> None:
    assert ours.body == theirs.body  # (py-amqp decodes it per its content_encoding)
    assert ours.properties == theirs.properties


@pytest.mark.parametrize('options', [
    {},
    {'headers': {'a': 1, 'big': 2**40, 'flag': True, 'none': None, 'text': 'caf\u00e9', 'nested': {'x': [1, 'y']}},
     'expiration': 5, 'priority': 3},
], ids=['plain', 'headers-expiration-priority'])
def test_a_call_is_published_as_kombu_publishes_it(app, broker_url, queues, options: Dict[str, Any]) -> None:
    channel, ours, theirs = queues
    client = Client(app)
    try:
        task_id = new_id()
        client.call(ours, {'x': [1, 2.5, 'three']}, task_id=task_id, declare=False, **options)
        message = fetch(channel, ours)
    finally:
        client.close()
    kombu_options: Dict[str, Any] = {'serializer': 'json', 'headers': dict(options.get('headers') or {}),
                                     'reply_to': app.backend.oid, 'correlation_id': task_id}
    for key in ('expiration', 'priority'):
        if key in options:
            kombu_options[key] = options[key]
    kombu_publish(broker_url, theirs, {'x': [1, 2.5, 'three']}, **kombu_options)
    same(message, fetch(channel, theirs))


def test_a_celery_task_message_is_published_as_kombu_publishes_it(app, broker_url, queues) -> None:
    channel, ours, theirs = queues
    client = Client(app)
    try:
        client.send_task('tasks.add', (2, 3), {'z': 1}, queue=ours, declare=False, priority=5)
        message = fetch(channel, ours)
    finally:
        client.close()
    headers = dict(message.properties['application_headers'])
    assert headers['task'] == 'tasks.add' and headers['id'] == message.properties['correlation_id']
    kombu_publish(broker_url, theirs, [[2, 3], {'z': 1}, {'callbacks': None, 'errbacks': None, 'chain': None,
                                                          'chord': None}],
                  serializer='json', headers=headers, delivery_mode=2, priority=5,
                  reply_to=app.backend.oid, correlation_id=headers['id'])
    same(message, fetch(channel, theirs))
