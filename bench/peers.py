"""The bench's subprocesses: ``python -m bench.peers ROLE CONFIG_JSON``.

Each peer talks to the runner with JSON lines on stdout (``ready``, ``started``, ``done`` or
``error``) and waits for ``go`` on stdin where the runner has to prepare something first (fill
the reply queue, start publishers). Whatever is not measured (imports, building result
objects, declaring queues) happens before ``go``.

Roles:
  join     P1/P2/P3 client: ``kind`` rpcresults | celery | celery-rpcresults | pyamqp joins
           ``count`` results (celery-rpcresults: Celery's app and ResultSet with
           ``result_backend = 'rpcresults.contrib.celery:RPCBackend'``)
  publish  P3 worker: publishes a slice of Celery-format results as fast as py-amqp goes
  echo     P5 responder: answers each request with a Celery-format SUCCESS to reply_to
  rtt      P5 client: ``count`` requests one at a time, each waited for with ``get()``

Roles defined next to their target (imported when used):
  pending        P4 (``bench/memory.py``): memory of ``count`` pending results (tracemalloc or RSS)
  worker         P6 (``bench/publish.py``): one worker process publishes ``count`` results
  rpc-client     P7 (``bench/rpc_peers.py``): ``count`` calls in flight, then every answer
  rpc-responder  P7 (``bench/rpc_peers.py``): echoes each request until stdin closes

The compiled / pure choice of rpcresults is the runner's: it sets ``RPCRESULTS_NO_EXTENSIONS``
in the environment of the subprocess.
"""
from __future__ import annotations

import gc
import importlib
import json
import os
import select
import socket
import sys
import time
import traceback
import uuid
from typing import Any, Callable, Dict, List, Tuple

if __package__ in (None, ''):  # ``python bench/peers.py``
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import amqp  # noqa: E402

from bench.common import (amqp_connect, cpu_seconds, emit, now_iso, peak_rss_bytes,  # noqa: E402
                          percentile, result_body, result_message, result_properties, rss_bytes,
                          task_ids)


#: What preparing a join gives: (reply queue, join(timeout) -> values, close(), extra facts).
Prepared = Tuple[str, Callable[[float], List[Any]], Callable[[], None], Dict[str, Any]]


def wait_go() -> None:
    line = sys.stdin.readline()
    if line.strip() != 'go':
        raise SystemExit(f'expected "go" from the runner, got {line!r}')


def implementation() -> Dict[str, Any]:
    """Which rpcresults hot path this process runs."""
    import rpcresults
    return {'using_extension': bool(rpcresults.USING_EXTENSION),
            'no_extensions_env': os.environ.get('RPCRESULTS_NO_EXTENSIONS', '')}


# -- join (P1, P2, P3) -------------------------------------------------------------------------
def _prepare_rpcresults(url: str, ids: List[str]) -> Prepared:
    import kombu

    import rpcresults
    app = rpcresults.App(url)
    backend = app.backend
    with kombu.Connection(url) as conn:  # declares the reply queue without consuming it
        backend.on_task_call(kombu.Producer(conn.channel()), ids[0])
    members = [app.AsyncResult(task_id) for task_id in ids]

    def join(timeout: float) -> List[Any]:
        return rpcresults.ResultSet(members, app=app).join_native(timeout=timeout)

    def close() -> None:
        extra['stats'] = backend.stats()
        app.close()

    extra: Dict[str, Any] = implementation()
    return backend.oid, join, close, extra


#: The drop-in setting measured as "Celery + rpcresults backend".
CELERY_DROPIN = 'rpcresults.contrib.celery:RPCBackend'


def _celery_app(url: str, backend: str = 'rpc://') -> Any:
    from celery import Celery
    app = Celery('rpcresults-bench', broker=url, backend=backend, set_as_current=True)
    app.conf.update(accept_content=['json'], result_accept_content=['json'], result_serializer='json')
    return app


def _prepare_celery(url: str, ids: List[str], backend_name: str = 'rpc://') -> Prepared:
    """Celery's app and ResultSet; ``backend_name`` is Celery's rpc:// or the rpcresults drop-in."""
    import celery
    from celery.result import ResultSet
    app = _celery_app(url, backend_name)
    backend = app.backend
    with app.producer_or_acquire() as producer:
        backend.on_task_call(producer, ids[0])
    members = [app.AsyncResult(task_id) for task_id in ids]

    def join(timeout: float) -> List[Any]:
        # Celery's ResultSet registers its members (and starts consuming) when it is built, so
        # for every peer the ResultSet is built inside the timed section.
        return ResultSet(members, app=app).join_native(timeout=timeout)

    def close() -> None:
        if hasattr(backend, 'stats'):
            extra['stats'] = backend.stats()
        try:
            backend.result_consumer.stop()
        except Exception:
            pass
        app.close()

    extra: Dict[str, Any] = {'celery': celery.__version__}
    if backend_name != 'rpc://':
        extra.update(implementation())
    return backend.oid, join, close, extra


def _prepare_pyamqp(url: str, ids: List[str], queue: str) -> Prepared:
    """The reference loop: basic_consume with manual acks (multiple, every 256), json.loads each body."""
    state: Dict[str, Any] = {}
    loads = json.loads

    def join(timeout: float) -> List[Any]:
        deadline = time.monotonic() + timeout
        t0 = time.perf_counter()
        connection = amqp_connect(url)
        channel = connection.channel()
        state['connect_seconds'] = time.perf_counter() - t0
        got: Dict[str, Any] = {}
        wanted = len(ids)
        last = [0, 0]  # delivery tag of the newest message, count since the last ack

        def on_message(message: amqp.Message) -> None:
            payload = loads(message.body)
            got[message.properties['correlation_id']] = payload['result']
            tag = message.delivery_info['delivery_tag']
            last[0] = tag
            last[1] += 1
            if last[1] >= 256:
                channel.basic_ack(tag, multiple=True)
                last[1] = 0

        channel.basic_consume(queue, no_ack=False, callback=on_message)
        drain = connection.drain_events
        while len(got) < wanted:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f'py-amqp loop got {len(got)} of {wanted}')
            drain(timeout=remaining)
        if last[1]:
            channel.basic_ack(last[0], multiple=True)
        state['connection'] = connection
        return [got[task_id] for task_id in ids]

    def close() -> None:
        connection = state.get('connection')
        if connection is not None:
            connection.close()
        extra['connect_seconds'] = state.get('connect_seconds')

    extra: Dict[str, Any] = {}
    return queue, join, close, extra


def role_join(config: Dict[str, Any]) -> None:
    url, kind = config['url'], config['kind']
    ids = task_ids(config['seed'], config['count'])
    if kind == 'rpcresults':
        queue, join, close, extra = _prepare_rpcresults(url, ids)
    elif kind == 'celery':
        queue, join, close, extra = _prepare_celery(url, ids)
    elif kind == 'celery-rpcresults':
        queue, join, close, extra = _prepare_celery(url, ids, CELERY_DROPIN)
    elif kind == 'pyamqp':
        queue, join, close, extra = _prepare_pyamqp(url, ids, config['queue'])
    else:
        raise SystemExit(f'unknown join kind {kind!r}')
    gc.collect()
    emit({'event': 'ready', 'queue': queue, **extra})
    wait_go()
    emit({'event': 'started'})
    rss_before = rss_bytes()
    cpu0 = cpu_seconds()
    start_abs = time.monotonic()
    t0 = time.perf_counter()
    values = join(float(config.get('timeout', 120)))
    wall = time.perf_counter() - t0
    cpu = cpu_seconds() - cpu0
    end_abs = time.monotonic()
    rss_after = rss_bytes()
    ok = values == list(range(len(ids)))
    close()
    emit({'event': 'done', 'kind': kind, 'count': len(values), 'ok': ok, 'wall': wall, 'cpu': cpu,
          'start_abs': start_abs, 'end_abs': end_abs, 'rss_before': rss_before, 'rss_after': rss_after,
          'peak_rss': peak_rss_bytes(), **extra})


# -- publish (P3) ------------------------------------------------------------------------------
def role_publish(config: Dict[str, Any]) -> None:
    """Publish results ``start .. start+count`` of the id sequence (value = global index)."""
    ids = task_ids(config['seed'], config['count'], start=config['start'])
    date_done = now_iso()
    messages = [amqp.Message(result_body(task_id, index, date_done), **result_properties(task_id))
                for index, task_id in enumerate(ids, start=config['start'])]
    connection = amqp_connect(config['url'])
    channel = connection.channel()
    queue = config['queue']
    emit({'event': 'ready'})
    wait_go()
    publish = channel.basic_publish
    first = time.monotonic()
    for message in messages:
        publish(message, exchange='', routing_key=queue)
    sent = time.monotonic()
    # A synchronous call on the same channel: its reply comes after the broker processed every
    # publish before it, so ``confirmed`` is when the broker holds all of this worker's results.
    channel.queue_declare(queue=queue, passive=True)
    confirmed = time.monotonic()
    connection.close()
    emit({'event': 'done', 'first': first, 'sent': sent, 'confirmed': confirmed, 'count': len(messages)})


# -- echo responder (P5) -----------------------------------------------------------------------
def role_echo(config: Dict[str, Any]) -> None:
    """Answer every request on ``queue`` with a Celery-format SUCCESS (value = first arg)."""
    connection = amqp_connect(config['url'])
    channel = connection.channel()
    queue = config['queue']
    channel.queue_declare(queue=queue, durable=False, auto_delete=False)
    publish = channel.basic_publish
    loads = json.loads
    served = [0]

    def on_request(message: amqp.Message) -> None:
        props = message.properties
        task_id = props.get('correlation_id')
        reply_to = props.get('reply_to')
        if not reply_to or not task_id:
            return
        args = loads(message.body)[0]
        publish(result_message(task_id, args[0] if args else None), exchange='', routing_key=reply_to)
        served[0] += 1

    channel.basic_consume(queue, no_ack=True, callback=on_request)
    emit({'event': 'ready', 'queue': queue})
    stdin = sys.stdin.fileno()
    while True:
        try:
            connection.drain_events(timeout=0.2)
        except socket.timeout:
            readable, _, _ = select.select([stdin], [], [], 0)
            if readable and not os.read(stdin, 4096):
                break  # the runner closed our stdin: done
    emit({'event': 'done', 'served': served[0]})
    connection.close()


# -- round trip client (P5) --------------------------------------------------------------------
REQUEST_HEADERS = {'lang': 'py', 'task': 'bench.echo'}


def _request(task_id: str, reply_to: str, value: int) -> amqp.Message:
    """A Celery-protocol-v2-shaped request: body [args, kwargs, embed], reply_to, correlation_id."""
    body = json.dumps([[value], {}, {'callbacks': None, 'errbacks': None, 'chain': None, 'chord': None}])
    return amqp.Message(body.encode('utf-8'), content_type='application/json', content_encoding='utf-8',
                        application_headers=dict(REQUEST_HEADERS, id=task_id, root_id=task_id),
                        reply_to=reply_to, correlation_id=task_id, delivery_mode=1, priority=0)


def role_rtt(config: Dict[str, Any]) -> None:
    kind, url, request_queue = config['kind'], config['url'], config['request_queue']
    warmup = config['warmup']
    timeout = float(config.get('timeout', 10))
    ids = [str(uuid.uuid4()) for _ in range(warmup + config.get('count', 0))]
    extra: Dict[str, Any] = {}
    if kind == 'rpcresults':
        import kombu

        import rpcresults
        app = rpcresults.App(url)
        backend = app.backend
        conn = kombu.Connection(url)
        channel = conn.channel()  # requests go out raw on this channel, as for every peer
        backend.on_task_call(kombu.Producer(channel), ids[0])
        reply_to = backend.oid
        make = app.AsyncResult

        def call(task_id: str, value: int) -> Any:
            channel.basic_publish(_request(task_id, reply_to, value), exchange='', routing_key=request_queue)
            return make(task_id).get(timeout=timeout)

        def close() -> None:
            extra['stats'] = backend.stats()
            app.close()
            conn.release()
        extra.update(implementation())
    elif kind == 'celery':
        app = _celery_app(url)
        backend = app.backend
        conn = app.connection_for_write()
        channel = conn.default_channel
        import kombu
        backend.on_task_call(kombu.Producer(channel), ids[0])
        reply_to = backend.oid
        make = app.AsyncResult

        def call(task_id: str, value: int) -> Any:
            channel.basic_publish(_request(task_id, reply_to, value), exchange='', routing_key=request_queue)
            return make(task_id).get(timeout=timeout)

        def close() -> None:
            try:
                backend.result_consumer.stop()
            except Exception:
                pass
            conn.release()
            app.close()
    elif kind == 'pyamqp':
        connection = amqp_connect(url)
        channel = connection.channel()
        reply_to = f'rpcresults-bench-rtt-{uuid.uuid4().hex[:12]}'
        channel.queue_declare(queue=reply_to, durable=False, exclusive=True, auto_delete=True)
        got: Dict[str, Any] = {}
        loads = json.loads

        def on_reply(message: amqp.Message) -> None:
            got[message.properties['correlation_id']] = loads(message.body)
            channel.basic_ack(message.delivery_info['delivery_tag'])

        channel.basic_consume(reply_to, no_ack=False, callback=on_reply)
        drain = connection.drain_events

        def call(task_id: str, value: int) -> Any:
            channel.basic_publish(_request(task_id, reply_to, value), exchange='', routing_key=request_queue)
            while task_id not in got:
                drain(timeout=timeout)
            return got.pop(task_id)['result']

        def close() -> None:
            connection.close()
    else:
        raise SystemExit(f'unknown rtt kind {kind!r}')
    perf = time.perf_counter
    for index in range(warmup):
        if call(ids[index], index) != index:
            raise RuntimeError('the echo responder answered with the wrong value')
    emit({'event': 'ready', 'queue': reply_to, **extra})
    # The runner interleaves peers: each "go N" line asks for a batch of N round trips.
    latencies: List[float] = []
    wrong = 0
    cpu = 0.0
    next_index = warmup
    for line in sys.stdin:
        words = line.split()
        if not words or words[0] != 'go':
            break
        batch = int(words[1])
        first, next_index = next_index, next_index + batch
        if next_index > len(ids):
            ids.extend(str(uuid.uuid4()) for _ in range(next_index - len(ids)))
        gc.collect()
        cpu0 = cpu_seconds()
        for index in range(first, next_index):
            t0 = perf()
            value = call(ids[index], index)
            latencies.append(perf() - t0)
            if value != index:
                wrong += 1
        cpu += cpu_seconds() - cpu0
        emit({'event': 'batch', 'count': batch})
    close()
    count = len(latencies)
    emit({'event': 'done', 'kind': kind, 'queue': reply_to, 'count': count, 'wrong': wrong,
          'p50': percentile(latencies, 0.50), 'p90': percentile(latencies, 0.90),
          'p99': percentile(latencies, 0.99), 'max': max(latencies), 'mean': sum(latencies) / count,
          'cpu_per_call': cpu / count, 'latencies': latencies, **extra})


ROLES = {'join': role_join, 'publish': role_publish, 'echo': role_echo, 'rtt': role_rtt}
#: Roles that live with their target's module: ``module:function``.
EXTERNAL_ROLES = {'pending': 'bench.memory:role_pending', 'worker': 'bench.publish:role_worker',
                  'rpc-client': 'bench.rpc_peers:role_client', 'rpc-responder': 'bench.rpc_peers:role_responder'}


def find_role(name: str) -> Callable[[Dict[str, Any]], None]:
    if name in ROLES:
        return ROLES[name]
    module, _, function = EXTERNAL_ROLES[name].partition(':')
    return getattr(importlib.import_module(module), function)


def main(argv: List[str]) -> int:
    if len(argv) != 3 or (argv[1] not in ROLES and argv[1] not in EXTERNAL_ROLES):
        print(f'usage: python -m bench.peers {{{",".join([*ROLES, *EXTERNAL_ROLES])}}} CONFIG_JSON',
              file=sys.stderr)
        return 2
    try:
        find_role(argv[1])(json.loads(argv[2]))
    except BaseException as exc:  # reported to the runner, which shows it in the table
        if isinstance(exc, SystemExit) and not exc.code:
            raise
        detail = traceback.format_exc()
        print(detail, file=sys.stderr)
        emit({'event': 'error', 'error': f'{type(exc).__name__}: {exc}', 'traceback': detail})
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv))
