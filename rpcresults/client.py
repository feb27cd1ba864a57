"""The requesting side of RPC: publish a request whose replies come to this client's reply queue.

:meth:`Client.call` sends any payload to a queue (a :class:`~rpcresults.Responder`
answers it); :meth:`Client.send_task` speaks Celery's task message protocol v2 so
a real Celery worker runs the task and sends its states here. Either way the
request carries ``reply_to`` (the backend's reply queue) and ``correlation_id``
(the new task id), and the call returns an :class:`~rpcresults.AsyncResult`
bound to that backend.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any, Dict, Mapping, Optional, Sequence, Union

import kombu

from .app import App, app_or_default
from .result import AsyncResult

__all__ = ('Client',)

logger = logging.getLogger(__name__)

#: Content type of Celery task messages (protocol v2 bodies are always JSON here).
TASK_CONTENT_TYPE = 'application/json'

When = Union[None, float, datetime]


def _origin() -> str:
    """``pid@hostname``, as Celery stamps the sender of a task message."""
    return f'{os.getpid()}@{socket.gethostname()}'


def _absolute(now: datetime, value: When) -> Optional[str]:
    """Seconds from now or a datetime as an ISO 8601 string (``None`` stays ``None``)."""
    if value is None:
        return None
    if isinstance(value, datetime):
        moment = value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    else:
        moment = now + timedelta(seconds=float(value))
    return moment.isoformat()


class Client:
    """Sends requests whose results come back to ``backend`` (default: the app's, this thread's).

    The reply queue is declared before the first request goes out, so no reply can
    arrive at a queue that does not exist yet. A client may be shared by threads:
    publishing is serialized by a lock; every result reads from the same backend.
    """

    def __init__(self, app: Optional[App] = None, backend: Any = None) -> None:
        self.app = app_or_default(app)
        self.backend = backend if backend is not None else self.app.backend
        self._lock = threading.Lock()
        self._connection: Any = None
        self._producer: Any = None

    @property
    def oid(self) -> str:
        """The reply address requests carry (the backend's reply queue)."""
        return self.backend.reply_properties('')['reply_to']

    # -- publishing --------------------------------------------------------------------------
    def _get_producer(self) -> kombu.Producer:
        if self._producer is None:
            self._connection = self.app.connection()
            self._producer = kombu.Producer(self._connection, auto_declare=False)
        return self._producer

    def _publish(self, task_id: str, body: Any, routing_key: str, exchange: str,
                 **options: Any) -> AsyncResult:
        result = AsyncResult(task_id, backend=self.backend, app=self.app)
        self.backend.add_pending_result(result)  # tracked before any reply can arrive
        properties = self.backend.reply_properties(task_id)
        options.update(properties)
        direct = getattr(self.backend, 'publish_request', None)
        if direct is not None:  # direct reply-to: must go out on the consumer's own channel
            direct(body, routing_key=routing_key, exchange=exchange, **options)
            return result
        with self._lock:
            producer = self._get_producer()
            self.backend.on_task_call(producer, task_id)
            producer.publish(body, routing_key=routing_key, exchange=exchange, retry=True, **options)
        return result

    def call(self, queue_or_routing_key: str, payload: Any, *, exchange: str = '',
             expiration: Optional[float] = None, headers: Optional[Mapping[str, Any]] = None,
             serializer: Optional[str] = None, task_id: Optional[str] = None,
             priority: Optional[int] = None) -> AsyncResult:
        """Send ``payload`` to a responder; the result arrives on this client's reply queue.

        ``expiration`` is the per-message TTL in seconds: a request still queued when it
        passes is dropped by the broker and never answered (the wait then times out).
        """
        task_id = task_id or str(uuid.uuid4())
        options: Dict[str, Any] = {'serializer': serializer or self.app.conf.result_serializer,
                                   'headers': dict(headers or {})}
        if expiration is not None:
            options['expiration'] = expiration  # kombu sends it as a string of milliseconds
        if priority is not None:
            options['priority'] = priority
        return self._publish(task_id, payload, queue_or_routing_key, exchange, **options)

    def send_task(self, name: str, args: Sequence[Any] = (), kwargs: Optional[Mapping[str, Any]] = None,
                  *, queue: str = 'celery', exchange: str = '', task_id: Optional[str] = None,
                  countdown: Optional[float] = None, eta: Optional[datetime] = None,
                  expires: When = None, priority: Optional[int] = None, retries: int = 0,
                  time_limit: Optional[float] = None, soft_time_limit: Optional[float] = None,
                  root_id: Optional[str] = None, parent_id: Optional[str] = None,
                  group_id: Optional[str] = None, ignore_result: bool = False,
                  shadow: Optional[str] = None, persistent: bool = True) -> AsyncResult:
        """Send a Celery task message (protocol v2) that a Celery worker executes; its states
        (PROGRESS, SUCCESS, FAILURE, ...) come back to this client's reply queue."""
        if not isinstance(args, (list, tuple)):
            raise TypeError('task args must be a list or tuple')
        kwargs = dict(kwargs or {})
        task_id = task_id or str(uuid.uuid4())
        now = datetime.now(timezone.utc)
        if countdown is not None:
            eta = now + timedelta(seconds=countdown)
        headers = {
            'lang': 'py',
            'task': name,
            'id': task_id,
            'shadow': shadow,
            'eta': _absolute(now, eta),
            'expires': _absolute(now, expires),
            'group': group_id,
            'group_index': None,
            'retries': retries,
            'timelimit': [time_limit, soft_time_limit],
            'root_id': root_id or task_id,
            'parent_id': parent_id,
            'argsrepr': repr(tuple(args)),
            'kwargsrepr': repr(kwargs),
            'origin': _origin(),
            'ignore_result': ignore_result,
            'replaced_task_nesting': 0,
            'stamped_headers': None,
            'stamps': {},
        }
        body = [list(args), kwargs, {'callbacks': None, 'errbacks': None, 'chain': None, 'chord': None}]
        options: Dict[str, Any] = {'serializer': 'json', 'headers': headers,
                                   'delivery_mode': 2 if persistent else 1}
        if priority is not None:
            options['priority'] = priority
        return self._publish(task_id, body, queue, exchange, **options)

    def close(self) -> None:
        """Close the publishing connection (the backend stays open: results may still be read)."""
        with self._lock:
            connection, self._connection = self._connection, None
            self._producer = None
        if connection is not None:
            connection.release()

    def __enter__(self) -> 'Client':
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
