"""What every bench process shares: broker parameters, task ids, Celery's result format, a fast publisher.

The result messages are built exactly as Celery 5.x's ``rpc://`` backend publishes them (checked
byte for byte against ``celery.backends.rpc.RPCBackend.mark_as_done``): exchange ``''``, routing key
= the reply queue, properties ``content_type='application/json'``, ``content_encoding='utf-8'``,
``application_headers={}``, ``delivery_mode=1``, ``priority=0``, ``correlation_id=<task id>``, and the
body ``{"status", "result", "traceback", "children", "date_done", "task_id"}`` in that key order with
the stdlib's default JSON separators (what kombu's ``json`` serializer writes).
"""
from __future__ import annotations

import json
import os
import random
import resource
import struct
import sys
import time
import uuid
from datetime import datetime, timezone
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence
from urllib.parse import unquote, urlparse

import amqp

DEFAULT_BROKER = os.environ.get('RPCRESULTS_BROKER_URL', 'amqp://guest:guest@127.0.0.1:5672//')
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH_DIR = os.path.join(REPO_ROOT, 'bench')

#: Prefix of every queue the bench creates, so a leftover one is recognisable.
QUEUE_PREFIX = 'rpcresults-bench-'


# -- broker ------------------------------------------------------------------------------------
def broker_params(url: str) -> Dict[str, Any]:
    """``amqp://user:pass@host:port/vhost`` -> py-amqp ``Connection`` keyword arguments."""
    parsed = urlparse(url)
    if parsed.scheme not in ('amqp', 'pyamqp'):
        raise SystemExit(f'the bench needs an amqp:// broker URL, not {url!r}')
    path = parsed.path or ''
    vhost = '/' if path in ('', '/') else unquote(path[1:])
    return {
        'host': f'{parsed.hostname or "localhost"}:{parsed.port or 5672}',
        'userid': unquote(parsed.username or 'guest'),
        'password': unquote(parsed.password or 'guest'),
        'virtual_host': vhost,
    }


def amqp_connect(url: str, **kwargs: Any) -> amqp.Connection:
    """A connected py-amqp connection (no heartbeats: nothing here idles for long)."""
    params = broker_params(url)
    params.update(kwargs)
    connection = amqp.Connection(**params)
    connection.connect()
    return connection


# -- ids and bodies ----------------------------------------------------------------------------
def task_ids(seed: int, count: int, start: int = 0) -> List[str]:
    """``count`` UUID4-shaped task ids, the same in every process for the same ``seed``."""
    rng = random.Random(seed)
    ids = [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(start + count)]
    return ids[start:]


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat()


def result_body(task_id: str, value: Any, date_done: Optional[str] = None, status: str = 'SUCCESS') -> bytes:
    """The body Celery's rpc:// backend publishes for a final state of ``task_id``."""
    meta = {'status': status, 'result': value, 'traceback': None, 'children': [],
            'date_done': date_done if date_done is not None else now_iso(), 'task_id': task_id}
    return json.dumps(meta).encode('utf-8')


def result_properties(correlation_id: str, delivery_mode: int = 1) -> Dict[str, Any]:
    """The AMQP properties Celery's rpc:// backend stamps on a result message."""
    return {'content_type': 'application/json', 'content_encoding': 'utf-8', 'application_headers': {},
            'delivery_mode': delivery_mode, 'priority': 0, 'correlation_id': correlation_id}


def result_message(task_id: str, value: Any, date_done: Optional[str] = None) -> amqp.Message:
    return amqp.Message(result_body(task_id, value, date_done), **result_properties(task_id))


def publish_results(channel: Any, queue: str, ids: Sequence[str], first_value: int = 0) -> None:
    """Publish a SUCCESS for each id (value = its index + ``first_value``) to ``queue``."""
    date_done = now_iso()
    publish = channel.basic_publish
    Message = amqp.Message
    for index, task_id in enumerate(ids, start=first_value):
        publish(Message(result_body(task_id, index, date_done), **result_properties(task_id)),
                exchange='', routing_key=queue)


def _shortstr(text: str) -> bytes:
    raw = text.encode('utf-8')
    return bytes((len(raw),)) + raw


#: content_type, content_encoding, headers, delivery_mode, priority, correlation_id (AMQP 0-9-1 order).
_RESULT_PROPERTY_FLAGS = 0x8000 | 0x4000 | 0x2000 | 0x1000 | 0x0800 | 0x0400
_FRAME_END = b'\xce'


def result_frames(channel_id: int, queue: str, ids: Sequence[str], first_value: int = 0,
                  date_done: Optional[str] = None) -> Iterator[bytes]:
    """The bytes py-amqp's ``basic_publish(result_message(...), exchange='', routing_key=queue)`` writes,
    one message at a time (method, content header and body frame), without py-amqp's per-publish
    cost. ``bench/test_bench.py`` checks them byte for byte against py-amqp's frame writer."""
    date_done = date_done if date_done is not None else now_iso()
    method = struct.pack('>HHH', 60, 40, 0) + _shortstr('') + _shortstr(queue) + b'\x00'
    method_frame = struct.pack('>BHI', 1, channel_id, len(method)) + method + _FRAME_END
    fixed = _shortstr('application/json') + _shortstr('utf-8') + struct.pack('>I', 0) + b'\x01\x00'
    pack = struct.pack
    for index, task_id in enumerate(ids, start=first_value):
        body = result_body(task_id, index, date_done)
        header = pack('>HHQH', 60, 0, len(body), _RESULT_PROPERTY_FLAGS) + fixed + _shortstr(task_id)
        yield b''.join((method_frame, pack('>BHI', 2, channel_id, len(header)), header, _FRAME_END,
                        pack('>BHI', 3, channel_id, len(body)), body, _FRAME_END))


def queue_depth(channel: Any, queue: str) -> int:
    """Messages ready in ``queue`` (passive declare: never creates nor changes it)."""
    return channel.queue_declare(queue=queue, passive=True).message_count


def wait_depth(channel: Any, queue: str, count: int, timeout: float = 60.0, stall: float = 10.0) -> int:
    """Until ``queue`` holds ``count`` ready messages; gives up at ``timeout`` or after ``stall`` s without
    progress (someone consumes the queue already, or the messages go elsewhere)."""
    deadline = time.monotonic() + timeout
    last, last_change = -1, time.monotonic()
    while True:
        depth = queue_depth(channel, queue)
        now = time.monotonic()
        if depth != last:
            last, last_change = depth, now
        if depth >= count or now >= deadline or now - last_change >= stall:
            return depth
        time.sleep(0.005)


class Broker:
    """The runner's own connection: fills queues, measures depth, deletes what the bench created."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.connection = amqp_connect(url)
        self.channel = self.connection.channel()

    def _fresh_channel(self) -> None:
        try:
            self.channel.close()
        except Exception:
            pass
        self.channel = self.connection.channel()

    def fill(self, queue: str, ids: Sequence[str], timeout: Optional[float] = None) -> float:
        """Publish a result for each id to ``queue`` and wait until the broker holds them; seconds.

        The messages are those of :func:`publish_results` (same bytes on the wire), written in
        64 KiB batches straight to the socket: a million of them take seconds, not minutes."""
        started = time.perf_counter()
        write = self.connection.transport.write
        batch: List[bytes] = []
        size = 0
        for frames in result_frames(self.channel.channel_id, queue, ids):
            batch.append(frames)
            size += len(frames)
            if size >= 65536:
                write(b''.join(batch))
                batch, size = [], 0
        if batch:
            write(b''.join(batch))
        timeout = timeout if timeout is not None else max(120.0, len(ids) / 5000)
        depth = wait_depth(self.channel, queue, len(ids), timeout)
        if depth < len(ids):
            raise RuntimeError(f'queue {queue} holds {depth} of {len(ids)} published results')
        return time.perf_counter() - started

    def delete(self, queue: Optional[str]) -> None:
        """Delete ``queue`` if it still exists (it may have gone by itself: auto-delete)."""
        if not queue:
            return
        try:
            self.channel.queue_delete(queue=queue)
        except amqp.exceptions.NotFound:
            self._fresh_channel()
        except amqp.exceptions.ChannelError:
            self._fresh_channel()

    def depth(self, queue: Optional[str]) -> Optional[int]:
        """Messages ready in ``queue``, or None when it does not exist (any more)."""
        if not queue:
            return None
        try:
            return queue_depth(self.channel, queue)
        except amqp.exceptions.ChannelError:
            self._fresh_channel()
            return None

    def server_version(self) -> str:
        props = self.connection.server_properties or {}
        return f"{props.get('product', '?')} {props.get('version', '?')}"

    def close(self) -> None:
        try:
            self.connection.close()
        except Exception:
            pass


# -- measurements ------------------------------------------------------------------------------
def rss_bytes() -> int:
    """Current resident set size of this process."""
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def cpu_seconds() -> float:
    """User + system CPU of this process (all threads)."""
    return time.process_time()


def percentile(values: Iterable[float], fraction: float) -> float:
    """Nearest-rank percentile (``fraction`` in 0..1)."""
    ordered = sorted(values)
    if not ordered:
        return float('nan')
    rank = max(1, min(len(ordered), int(-(-fraction * len(ordered) // 1))))
    return ordered[rank - 1]


def emit(obj: Dict[str, Any]) -> None:
    """One JSON line to the runner (stdout is the peer's channel to it)."""
    sys.stdout.write(json.dumps(obj) + '\n')
    sys.stdout.flush()


def new_queue_name(tag: str) -> str:
    return f'{QUEUE_PREFIX}{tag}-{uuid.uuid4().hex[:12]}'
