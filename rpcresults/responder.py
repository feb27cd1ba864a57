"""The answering side of RPC: consume requests from a queue, run a handler, reply to the caller.

Each request is decoded (its content type must be accepted), handed to the
handler, and its outcome published to the request's ``reply_to`` as SUCCESS
(the return value) or FAILURE (the exception and its traceback) through
:class:`~rpcresults.backends.rpc.RPCBackend`'s worker side, in Celery's reply
format. The request is acked only after its reply is published, so a responder
that dies mid-request leaves it to be redelivered.

Requests come in two shapes: a plain :meth:`Client.call` payload, and a Celery
task message (protocol v2: a ``task`` header, body ``[args, kwargs, embed]``) as
sent by ``Client.send_task`` or Celery's ``send_task``/``apply_async``. The
handler gets the decoded payload; with ``pass_request=True`` it gets
``(payload, request)`` where :class:`Request` carries the task name, args and
kwargs of Celery messages plus headers and properties.

A request without ``reply_to`` is logged, counted (``stats()['no_reply_to']``)
and acked without running the handler. A request whose per-message TTL
(``expiration``) passed while queued is dropped by the broker and never seen.
"""
from __future__ import annotations

import collections
import logging
import socket
import threading
import time
import traceback as tb
from typing import Any, Callable, Deque, Dict, List, Mapping, Optional, Sequence

import kombu

from . import serialization
from .app import App, app_or_default
from .backends.rpc import RPCBackend

__all__ = ('Responder', 'Request', 'BadRequest')

logger = logging.getLogger(__name__)

#: How many handled request ids ``Responder.seen`` keeps.
SEEN_MAX = 100_000

Handler = Callable[..., Any]


class BadRequest(Exception):
    """The request could not be decoded (content type not accepted, or a malformed body)."""


class Request:
    """One request as the handler sees it with ``pass_request=True``."""

    __slots__ = ('id', 'reply_to', 'correlation_id', 'headers', 'properties', 'delivery_info',
                 'task', 'args', 'kwargs', 'group', 'parent_id', 'root_id', 'retries')

    def __init__(self, message: Any) -> None:
        properties = dict(message.properties or {})
        headers = dict(message.headers or {})
        self.properties = properties
        self.headers = headers
        self.delivery_info = dict(message.delivery_info or {})
        self.reply_to: Optional[str] = properties.get('reply_to') or None
        self.correlation_id: Optional[str] = properties.get('correlation_id')
        self.task: Optional[str] = headers.get('task')  # set for Celery task messages
        self.id: str = (headers.get('id') if self.task else None) or self.correlation_id or ''
        self.args: Sequence[Any] = ()
        self.kwargs: Mapping[str, Any] = {}
        self.group = headers.get('group')
        self.parent_id = headers.get('parent_id')
        self.root_id = headers.get('root_id')
        self.retries = headers.get('retries', 0)

    @property
    def is_task(self) -> bool:
        """True for a Celery task message (protocol v2)."""
        return self.task is not None

    def reply_fields(self) -> Dict[str, Any]:
        """What the worker side needs to route and stamp the reply."""
        return {'reply_to': self.reply_to, 'correlation_id': self.correlation_id or self.id,
                'group': self.group, 'parent_id': self.parent_id, 'children': []}

    def __repr__(self) -> str:
        return f'<Request {self.id} task={self.task!r} reply_to={self.reply_to!r}>'


class Responder:
    """Answer requests from ``queue`` with ``handler`` (one at a time, in the thread that runs it).

    ``prefetch`` bounds the requests the broker hands out before they are acked.
    ``accept`` lists the request content types decoded (default: json only).
    ``expires`` (seconds) lets the broker delete the queue once unused that long.
    """

    def __init__(self, app: Optional[App], queue: str, handler: Handler, *, prefetch: int = 64,
                 pass_request: bool = False, accept: Optional[Sequence[str]] = None,
                 durable: bool = True, expires: Optional[float] = None) -> None:
        self.app = app_or_default(app)
        self.queue_name = queue
        self.handler = handler
        self.prefetch = prefetch
        self.pass_request = pass_request
        self.accept = serialization.accept_set(accept)
        self.queue = kombu.Queue(queue, kombu.Exchange(''), routing_key=queue, durable=durable,
                                 expires=expires)
        self.backend = RPCBackend(app=self.app)  # worker side only: publishes the replies
        self.counters: Dict[str, int] = {'handled': 0, 'succeeded': 0, 'failed': 0,
                                         'no_reply_to': 0, 'bad_requests': 0}
        self.seen: Deque[str] = collections.deque(maxlen=SEEN_MAX)  # ids of handled requests, newest last
        self._stop = threading.Event()
        self._connection: Any = None
        self._consumer: Any = None
        self._ready = threading.Event()

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> 'Responder':
        """Connect, declare the queue and start consuming (idempotent)."""
        if self._consumer is None:
            connection = self.app.connection()
            connection.ensure_connection(max_retries=3)
            channel = connection.channel()
            consumer = kombu.Consumer(channel, queues=[self.queue], on_message=self._on_message,
                                      prefetch_count=self.prefetch, accept=None)
            consumer.consume()
            self._connection, self._consumer = connection, consumer
            self._ready.set()
        return self

    def wait_ready(self, timeout: float) -> bool:
        """True once the responder consumes its queue (for a responder run in another thread)."""
        return self._ready.wait(timeout)

    def run(self, timeout: Optional[float] = None, limit: Optional[int] = None) -> int:
        """Answer requests until ``limit`` were handled, ``timeout`` seconds passed or :meth:`stop`;
        returns how many were handled by this call."""
        self.start()
        deadline = None if timeout is None else time.monotonic() + timeout
        start = self.counters['handled']
        while not self._stop.is_set():
            done = self.counters['handled'] - start
            if limit is not None and done >= limit:
                break
            remaining = 0.2 if deadline is None else min(0.2, deadline - time.monotonic())
            if remaining <= 0:
                break
            try:
                self._connection.drain_events(timeout=remaining)
            except socket.timeout:
                continue
        return self.counters['handled'] - start

    def run_forever(self) -> None:
        """Answer requests until :meth:`stop` is called (from another thread or a handler)."""
        self.run()

    def stop(self) -> None:
        """Make a running :meth:`run` return after the request in hand."""
        self._stop.set()

    def close(self) -> None:
        """Stop consuming and close both connections."""
        self.stop()
        consumer, self._consumer = self._consumer, None
        connection, self._connection = self._connection, None
        if consumer is not None:
            try:
                consumer.cancel()
            except Exception:
                logger.debug('could not cancel the responder consumer', exc_info=True)
        if connection is not None:
            connection.release()
        self.backend.close()

    def __enter__(self) -> 'Responder':
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def stats(self) -> Dict[str, int]:
        """Counters: handled, succeeded, failed, no_reply_to, bad_requests."""
        return dict(self.counters)

    # -- one request -------------------------------------------------------------------------
    def _on_message(self, message: Any) -> None:
        request = Request(message)
        try:
            if not request.reply_to:
                self.counters['no_reply_to'] += 1
                logger.warning('request %s on %s has no reply_to: dropped unanswered',
                               request.id, self.queue_name)
                return
            self._answer(request, message)
        finally:
            message.ack()

    def _answer(self, request: Request, message: Any) -> None:
        backend = self.backend
        self.counters['handled'] += 1
        self.seen.append(request.id)
        try:
            payload = self._decode(request, message)
        except BadRequest as exc:
            self.counters['bad_requests'] += 1
            logger.error('bad request %s on %s: %s', request.id, self.queue_name, exc)
            backend.mark_as_failure(request.id, exc, traceback=None, request=request.reply_fields())
            return
        try:
            value = self.handler(payload, request) if self.pass_request else self.handler(payload)
        except Exception as exc:  # the caller gets it; the responder goes on
            self.counters['failed'] += 1
            backend.mark_as_failure(request.id, exc, traceback=tb.format_exc(),
                                         request=request.reply_fields())
            return
        self.counters['succeeded'] += 1
        backend.mark_as_done(request.id, value, request=request.reply_fields())

    def _decode(self, request: Request, message: Any) -> Any:
        content_type = message.content_type
        try:
            payload = serialization.decode(message.body, content_type, message.content_encoding, self.accept)
        except Exception as exc:
            raise BadRequest(f'cannot decode request {request.id} '
                             f'(content type {content_type!r}): {type(exc).__name__}: {exc}') from None
        if request.is_task:
            if not (isinstance(payload, (list, tuple)) and len(payload) == 3
                    and isinstance(payload[0], (list, tuple)) and isinstance(payload[1], dict)):
                raise BadRequest(f'task message {request.id} ({request.task}) is not Celery protocol v2: '
                                 'expected a body [args, kwargs, embed]')
            request.args, request.kwargs = tuple(payload[0]), payload[1]
        return payload

