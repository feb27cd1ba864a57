"""The requesting side of RPC: publish a request whose replies come to this client's reply queue.

:meth:`Client.call` sends any payload to a queue (a :class:`~rpcresults.Responder`
answers it); :meth:`Client.send_task` speaks Celery's task message protocol v2 so
a real Celery worker runs the task and sends its states here. Either way the
request carries ``reply_to`` (the backend's reply queue) and ``correlation_id``
(the new task id), and the call returns an :class:`~rpcresults.AsyncResult`
bound to that backend.

Requests go through the default exchange (unless ``exchange`` is given), which
drops what it cannot route, so by default (``declare=True``) the target queue is
made to exist first: checked passively, and only when missing declared durable,
not auto-delete, without arguments (a queue a Responder or an operator declared
with other arguments, x-expires or a quorum queue, is left as it is). Pass
``declare=False`` for queues that are known to exist, or that this client may not
declare. Publishing retries a lost connection per ``retry_policy`` (bounded), then
raises the connection error.
"""
from __future__ import annotations

import logging
import os
import reprlib
import socket
import threading
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any, Dict, Mapping, Optional, Sequence, Union

import kombu
import kombu.exceptions

from . import _fork
from .engine.channel import detach_after_fork
from .engine.publish import PublishLink, with_retries
from .app import App, app_or_default
from .result import AsyncResult

__all__ = ('Client',)

logger = logging.getLogger(__name__)

#: Content type of Celery task messages (protocol v2 bodies are always JSON here).
TASK_CONTENT_TYPE = 'application/json'

When = Union[None, float, datetime]

#: Like Celery's ``task_publish_retry_policy``: a bounded retry of a lost broker connection.
DEFAULT_RETRY_POLICY: Dict[str, Any] = {'max_retries': 3, 'interval_start': 0, 'interval_step': 0.2,
                                        'interval_max': 0.2}
#: Longest ``argsrepr``/``kwargsrepr`` header (as Celery's ``saferepr(maxsize=1024)``): headers
#: must fit in one frame, or the broker closes the connection.
REPR_MAX = 1024
#: AMQP reply codes of a passive declare of a missing queue and of a declare with other arguments.
NOT_FOUND = 404
PRECONDITION_FAILED = 406

_repr = reprlib.Repr()
_repr.maxlevel = 6
_repr.maxstring = _repr.maxother = REPR_MAX
_repr.maxlist = _repr.maxtuple = _repr.maxdict = _repr.maxset = 256


def _origin() -> str:
    """``pid@hostname``, as Celery stamps the sender of a task message."""
    return f'{os.getpid()}@{socket.gethostname()}'


def saferepr(value: Any, maxsize: int = REPR_MAX) -> str:
    """A repr of ``value`` of at most ``maxsize`` characters (huge values are abbreviated first)."""
    text = _repr.repr(value)
    return text if len(text) <= maxsize else text[:maxsize - 3] + '...'


def _reply_code(exc: BaseException) -> Optional[int]:
    """The AMQP reply code of a channel error (kombu's virtual transports give it as a string)."""
    code = getattr(exc, 'reply_code', None) or getattr(exc, 'code', None)
    try:
        return int(code)
    except (TypeError, ValueError):
        return None


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

    def __init__(self, app: Optional[App] = None, backend: Any = None, *,
                 retry_policy: Optional[Mapping[str, Any]] = None) -> None:
        self.app = app_or_default(app)
        self.backend = backend if backend is not None else self.app.backend
        self.retry_policy: Dict[str, Any] = dict(DEFAULT_RETRY_POLICY if retry_policy is None
                                                 else retry_policy)
        self._lock = threading.Lock()
        self._connection: Any = None
        self._producer: Any = None
        self._declared: set = set()  # queues known to exist (on this connection)
        _fork.register(self._after_fork)

    def _after_fork(self) -> None:
        """In a forked child: let go of the parent's publishing connection without touching its socket."""
        detach_after_fork(self._connection)
        self._connection = None
        self._producer = None
        self._declared = set()
        self._lock = threading.Lock()  # a parent thread may have held it at fork time

    @property
    def oid(self) -> str:
        """The reply address requests carry (the backend's reply queue)."""
        return self.backend.reply_properties('')['reply_to']

    # -- publishing --------------------------------------------------------------------------
    def _get_producer(self) -> Any:
        """What publishes: a :class:`PublishLink` over py-amqp (the frame writer, one write per
        request), else kombu's Producer (virtual transports such as ``memory://``)."""
        if self._producer is None:
            self._connection = self.app.connection()
            if PublishLink.usable(self._connection):
                self._producer = PublishLink(self._connection)
            else:
                self._producer = kombu.Producer(self._connection, auto_declare=False)
        return self._producer

    def _drop_connection(self) -> None:
        """Forget a publishing connection that failed (its socket is dropped, not closed politely)."""
        connection, self._connection = self._connection, None
        self._producer = None
        self._declared.clear()
        if connection is None:
            return
        try:
            connection.collect()
        except Exception:
            logger.debug('error while dropping the publishing connection', exc_info=True)

    def _declare(self, queue: str) -> None:
        self._get_producer()
        self._ensure_queue(queue)

    def _send(self, task_id: str, body: Any, routing_key: str, exchange: str, declare: bool,
              options: Dict[str, Any]) -> None:
        """One attempt: make the queues exist, then publish (lock held)."""
        producer = self._get_producer()
        if declare and not exchange:
            self._ensure_queue(routing_key)
        self.backend.on_task_call(producer, task_id)
        if isinstance(producer, PublishLink):
            producer.check()
            producer.add(exchange, routing_key, body, **options)
            producer.send()
        else:  # kombu retries (and reconnects) within the policy itself
            producer.publish(body, routing_key=routing_key, exchange=exchange, retry=True,
                             retry_policy=self.retry_policy, **options)

    def _ensure_queue(self, queue: str) -> None:
        """Make ``queue`` exist (passively checked; declared without arguments only when missing)."""
        if queue in self._declared:
            return
        connection = self._connection
        connection.ensure_connection(**self.retry_policy)
        channel = connection.channel()
        try:
            try:
                channel.queue_declare(queue=queue, passive=True)
            except connection.channel_errors as exc:
                if _reply_code(exc) != NOT_FOUND:
                    raise
                channel = connection.channel()  # the refusal closed the first one
                try:
                    channel.queue_declare(queue=queue, durable=True, auto_delete=False)
                    logger.info('declared the missing request queue %s', queue)
                except connection.channel_errors as exc:
                    if _reply_code(exc) != PRECONDITION_FAILED:  # declared meanwhile, other arguments
                        raise
        finally:
            try:
                channel.close()
            except Exception:
                logger.debug('could not close the declaring channel', exc_info=True)
        self._declared.add(queue)

    def _publish(self, task_id: str, body: Any, routing_key: str, exchange: str, declare: bool,
                 **options: Any) -> AsyncResult:
        result = AsyncResult(task_id, backend=self.backend, app=self.app)
        properties = self.backend.reply_properties(task_id)
        options.update(properties)
        # direct reply-to: must go out on the consumer's own channel, which tracks the result itself
        direct = getattr(self.backend, 'publish_request', None)
        try:
            if direct is None:
                self.backend.add_pending_result(result)  # tracked before any reply can arrive
            with self._lock:
                if direct is None:
                    with_retries(lambda: self._send(task_id, body, routing_key, exchange, declare, options),
                                 self._drop_connection, self.retry_policy, f'sending request {task_id}')
                elif declare and not exchange:
                    with_retries(lambda: self._declare(routing_key), self._drop_connection, self.retry_policy,
                                 f'declaring queue {routing_key}')
            if direct is not None:
                direct(body, routing_key=routing_key, exchange=exchange, result=result, **options)
        except BaseException:
            self.backend.remove_pending_result(result)
            raise
        return result

    def call(self, queue_or_routing_key: str, payload: Any, *, exchange: str = '',
             expiration: Optional[float] = None, headers: Optional[Mapping[str, Any]] = None,
             serializer: Optional[str] = None, task_id: Optional[str] = None,
             priority: Optional[int] = None, declare: bool = True) -> AsyncResult:
        """Send ``payload`` to a responder; the result arrives on this client's reply queue.

        ``expiration`` is the per-message TTL in seconds: a request still queued when it
        passes is dropped by the broker and never answered (the wait then times out).
        ``declare``: make the queue exist first (see the module docstring).
        """
        task_id = task_id or str(uuid.uuid4())
        options: Dict[str, Any] = {'serializer': serializer or self.app.conf.result_serializer,
                                   'headers': dict(headers or {})}
        if expiration is not None:
            options['expiration'] = expiration  # kombu sends it as a string of milliseconds
        if priority is not None:
            options['priority'] = priority
        return self._publish(task_id, payload, queue_or_routing_key, exchange, declare, **options)

    def send_task(self, name: str, args: Sequence[Any] = (), kwargs: Optional[Mapping[str, Any]] = None,
                  *, queue: str = 'celery', exchange: str = '', task_id: Optional[str] = None,
                  countdown: Optional[float] = None, eta: Optional[datetime] = None,
                  expires: When = None, priority: Optional[int] = None, retries: int = 0,
                  time_limit: Optional[float] = None, soft_time_limit: Optional[float] = None,
                  root_id: Optional[str] = None, parent_id: Optional[str] = None,
                  group_id: Optional[str] = None, ignore_result: bool = False,
                  shadow: Optional[str] = None, persistent: bool = True,
                  declare: bool = True) -> AsyncResult:
        """Send a Celery task message (protocol v2) that a Celery worker executes; its states
        (PROGRESS, SUCCESS, FAILURE, ...) come back to this client's reply queue.

        ``declare``: make the queue exist first, as Celery's ``send_task`` does (see the module
        docstring). A :class:`~rpcresults.Responder` honours ``expires`` and ``ignore_result``
        but runs ``eta``/``countdown`` requests at once; a Celery worker honours all three."""
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
            'argsrepr': saferepr(tuple(args)),
            'kwargsrepr': saferepr(kwargs),
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
        return self._publish(task_id, body, queue, exchange, declare, **options)

    def close(self) -> None:
        """Close the publishing connection (the backend stays open: results may still be read)."""
        with self._lock:
            connection, self._connection = self._connection, None
            self._producer = None
            self._declared.clear()
        if connection is not None:
            connection.release()

    def __enter__(self) -> 'Client':
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
