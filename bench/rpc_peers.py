"""P7's peer processes: a client with N calls in flight, and an echo responder, for each Python peer.

``python -m bench.peers rpc-client CONFIG`` / ``rpc-responder CONFIG`` with ``kind``:

- ``rpcresults``: ``Client(app).call(queue, i)`` for every call (AsyncResults), then
  ``ResultSet(results, app=app).join_native()``; the responder is ``Responder(app, queue, echo)``.
- ``pyamqp``: the client publishes N requests (the message ``Client.call`` sends: JSON body,
  content_type application/json, content_encoding utf-8, empty headers, delivery_mode 2, priority 0,
  reply_to, correlation_id = a new uuid4), then consumes N replies (manual acks, multiple every 256,
  ``json.loads`` each); the echo ``json.loads`` each request, publishes a Celery-format SUCCESS to
  its reply_to and acks it.
- ``aiopika``: aio-pika's ``patterns.RPC`` as documented (pickle, publisher confirms): the client
  ``asyncio.gather``s N ``rpc.call(method, kwargs={'value': i})``; the responder ``rpc.register``s
  an echo on the method (= the queue name) with the channel's prefetch set.

Clients connect and run ``warmup`` calls before ``ready``; the timed section is the N calls, from
the first publish until every answer is back (values checked after the clock). Responders consume
with ``prefetch`` unacked requests and stop when their stdin closes.
"""
from __future__ import annotations

import collections
import gc
import json
import os
import select
import socket
import sys
import threading
import time
import uuid
from datetime import datetime, timezone
from typing import Any, Callable, Deque, Dict, List, Tuple

import amqp

from bench.common import amqp_connect, cpu_seconds, emit
from bench.peers import implementation, wait_go

Calls = Callable[[int, int], List[Any]]


# -- clients -----------------------------------------------------------------------------------
def _rpcresults_client(url: str, queue: str, timeout: float, extra: Dict[str, Any]) -> Tuple[Calls, Any, Any]:
    import rpcresults
    app = rpcresults.App(url)
    client = rpcresults.Client(app)
    call = client.call

    def calls(first: int, last: int) -> List[Any]:
        results = [call(queue, index) for index in range(first, last)]
        return rpcresults.ResultSet(results, app=app).join_native(timeout=timeout)

    def close() -> None:
        extra['stats'] = app.backend.stats()
        client.close()
        app.close()

    extra.update(implementation())
    return calls, client.oid, close


def _pyamqp_client(url: str, queue: str, timeout: float, extra: Dict[str, Any]) -> Tuple[Calls, Any, Any]:
    connection = amqp_connect(url)
    channel = connection.channel()
    reply_to = f'rpcresults-bench-p7-reply-{uuid.uuid4().hex[:12]}'
    channel.queue_declare(queue=reply_to, durable=False, exclusive=True, auto_delete=True)
    got: Dict[str, Any] = {}
    loads, dumps, Message, uuid4 = json.loads, json.dumps, amqp.Message, uuid.uuid4
    last = [0, 0]  # delivery tag of the newest reply, replies since the last ack

    def on_reply(message: amqp.Message) -> None:
        got[message.properties['correlation_id']] = loads(message.body)['result']
        last[0] = message.delivery_info['delivery_tag']
        last[1] += 1
        if last[1] >= 256:
            channel.basic_ack(last[0], multiple=True)
            last[1] = 0

    channel.basic_consume(reply_to, no_ack=False, callback=on_reply)
    publish, drain = channel.basic_publish, connection.drain_events

    def calls(first: int, last_index: int) -> List[Any]:
        ids = []
        for index in range(first, last_index):
            task_id = str(uuid4())
            ids.append(task_id)
            publish(Message(dumps(index).encode('utf-8'), content_type='application/json',
                            content_encoding='utf-8', application_headers={}, delivery_mode=2, priority=0,
                            correlation_id=task_id, reply_to=reply_to),
                    exchange='', routing_key=queue)
        deadline = time.monotonic() + timeout
        while len(got) < len(ids):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f'py-amqp client got {len(got)} of {len(ids)} replies')
            drain(timeout=remaining)
        if last[1]:
            channel.basic_ack(last[0], multiple=True)
            last[1] = 0
        return [got.pop(task_id) for task_id in ids]

    return calls, reply_to, connection.close


def role_client(config: Dict[str, Any]) -> None:
    kind, url, queue = config['kind'], config['url'], config['queue']
    count, warmup, timeout = config['count'], config['warmup'], float(config.get('timeout', 120))
    if kind == 'aiopika':
        return _aiopika_main(_aiopika_client(url, queue, count, warmup, timeout))
    extra: Dict[str, Any] = {}
    if kind == 'rpcresults':
        calls, reply_queue, close = _rpcresults_client(url, queue, timeout, extra)
    elif kind == 'pyamqp':
        calls, reply_queue, close = _pyamqp_client(url, queue, timeout, extra)
    else:
        raise SystemExit(f'unknown rpc-client kind {kind!r}')
    if calls(0, warmup) != list(range(warmup)):
        raise RuntimeError('the responder answered a warm-up call with the wrong value')
    gc.collect()
    emit({'event': 'ready', 'queue': reply_queue, **extra})
    wait_go()
    cpu0 = cpu_seconds()
    t0 = time.perf_counter()
    values = calls(warmup, warmup + count)
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    ok = values == list(range(warmup, warmup + count))
    close()
    emit({'event': 'done', 'kind': kind, 'count': len(values), 'ok': ok, 'wall': wall, 'cpu': cpu,
          'queue': reply_queue, **extra})


# -- responders --------------------------------------------------------------------------------
def _echo(payload: Any) -> Any:
    return payload


def _stdin_closed(timeout: float = 0.0) -> bool:
    stdin = sys.stdin.fileno()
    readable, _, _ = select.select([stdin], [], [], timeout)
    return bool(readable) and not os.read(stdin, 4096)


def _rpcresults_responder(url: str, queue: str, prefetch: int) -> None:
    import rpcresults
    responder = rpcresults.Responder(rpcresults.App(url), queue, _echo, prefetch=prefetch)
    responder.start()
    emit({'event': 'ready', 'queue': queue, 'cpu': cpu_seconds(), **implementation()})

    def stop_at_eof() -> None:
        while not _stdin_closed(1.0):
            pass
        responder.stop()

    threading.Thread(target=stop_at_eof, daemon=True).start()
    responder.run()
    stats = responder.stats()
    responder.close()
    emit({'event': 'done', 'served': stats['handled'], 'cpu': cpu_seconds(), 'stats': stats})


def _pyamqp_responder(url: str, queue: str, prefetch: int) -> None:
    connection = amqp_connect(url)
    channel = connection.channel()
    channel.basic_qos(0, prefetch, False)
    publish, ack = channel.basic_publish, channel.basic_ack
    loads, dumps, Message, now, utc = json.loads, json.dumps, amqp.Message, datetime.now, timezone.utc
    served = 0
    # Deliveries are answered outside the callback: py-amqp's basic_publish reads the socket, which
    # would run the callback again from inside itself (unbounded recursion under load).
    pending: Deque[amqp.Message] = collections.deque()
    channel.basic_consume(queue, no_ack=False, callback=pending.append)
    emit({'event': 'ready', 'queue': queue, 'cpu': cpu_seconds()})
    while True:
        try:
            connection.drain_events(timeout=0.2)
        except socket.timeout:
            if _stdin_closed():
                break
        while pending:
            message = pending.popleft()
            props = message.properties
            task_id, reply_to = props.get('correlation_id'), props.get('reply_to')
            if reply_to:
                meta = {'status': 'SUCCESS', 'result': loads(message.body), 'traceback': None, 'children': [],
                        'date_done': now(utc).isoformat(), 'task_id': task_id}
                publish(Message(dumps(meta).encode('utf-8'), content_type='application/json',
                                content_encoding='utf-8', application_headers={}, delivery_mode=1, priority=0,
                                correlation_id=task_id),
                        exchange='', routing_key=reply_to)
                served += 1
            ack(message.delivery_info['delivery_tag'])
    emit({'event': 'done', 'served': served, 'cpu': cpu_seconds()})
    connection.close()


def role_responder(config: Dict[str, Any]) -> None:
    kind, url, queue, prefetch = config['kind'], config['url'], config['queue'], int(config['prefetch'])
    if kind == 'rpcresults':
        _rpcresults_responder(url, queue, prefetch)
    elif kind == 'pyamqp':
        _pyamqp_responder(url, queue, prefetch)
    elif kind == 'aiopika':
        _aiopika_main(_aiopika_responder(url, queue, prefetch))
    else:
        raise SystemExit(f'unknown rpc-responder kind {kind!r}')


# -- aio-pika ----------------------------------------------------------------------------------
def _aiopika_main(coroutine: Any) -> None:
    import asyncio
    asyncio.run(coroutine)


async def _aiopika_client(url: str, method: str, count: int, warmup: int, timeout: float) -> None:
    import asyncio

    import aio_pika
    from aio_pika.patterns import RPC
    loop = asyncio.get_running_loop()
    connection = await aio_pika.connect(url)
    channel = await connection.channel()
    rpc = await RPC.create(channel)

    async def calls(first: int, last: int) -> List[Any]:
        return list(await asyncio.wait_for(
            asyncio.gather(*(rpc.call(method, kwargs={'value': index}) for index in range(first, last))), timeout))

    if await calls(0, warmup) != list(range(warmup)):
        raise RuntimeError('the responder answered a warm-up call with the wrong value')
    reply_queue = rpc.result_queue.name
    gc.collect()
    emit({'event': 'ready', 'queue': reply_queue, 'aio_pika': aio_pika.__version__})
    await loop.run_in_executor(None, wait_go)
    cpu0 = cpu_seconds()
    t0 = time.perf_counter()
    values = await calls(warmup, warmup + count)
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    ok = values == list(range(warmup, warmup + count))
    await rpc.close()
    await connection.close()
    emit({'event': 'done', 'kind': 'aiopika', 'count': len(values), 'ok': ok, 'wall': wall, 'cpu': cpu,
          'queue': reply_queue})


async def _aiopika_responder(url: str, method: str, prefetch: int) -> None:
    import asyncio

    import aio_pika
    from aio_pika.patterns import RPC
    loop = asyncio.get_running_loop()
    connection = await aio_pika.connect(url)
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=prefetch)
    rpc = await RPC.create(channel)
    served = [0]

    async def echo(*, value: Any) -> Any:
        served[0] += 1
        return value

    await rpc.register(method, echo, auto_delete=True)
    emit({'event': 'ready', 'queue': method, 'cpu': cpu_seconds()})
    await loop.run_in_executor(None, sys.stdin.read)  # until the runner closes our stdin
    cpu = cpu_seconds()
    await rpc.close()
    await connection.close()
    emit({'event': 'done', 'served': served[0], 'cpu': cpu})
