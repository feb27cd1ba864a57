"""The answering side of RPC: consume requests from a queue, run a handler, reply to the caller.

Each request is decoded (its content type must be accepted), handed to the
handler, and its outcome published to the request's ``reply_to`` as SUCCESS
(the return value) or FAILURE (the exception and its traceback) through
:class:`~rpcresults.backends.rpc.RPCBackend`'s worker side, in Celery's reply
format. A return value the result serializer cannot encode is answered with a
FAILURE (``kombu.exceptions.EncodeError`` naming the type). The request is acked
only after its reply is published: when publishing fails the request is requeued
(and runs again), and a responder that dies mid-request leaves it to be
redelivered. Delivery is therefore at least once.

Requests come in two shapes: a plain :meth:`Client.call` payload, and a Celery
task message (protocol v2: a ``task`` header, body ``[args, kwargs, embed]``) as
sent by ``Client.send_task`` or Celery's ``send_task``/``apply_async``. The
handler gets the decoded payload; with ``pass_request=True`` it gets
``(payload, request)`` where :class:`Request` carries the task name, args and
kwargs of Celery messages plus headers and properties.

Celery headers honoured: ``expires`` (a request received after it is answered
REVOKED with ``TaskRevokedError('expired')`` and not run, as a Celery worker
does) and ``ignore_result`` (the handler runs, no reply is sent). ``eta`` and
``countdown`` are NOT honoured: the responder runs such requests at once.

A request without ``reply_to`` is logged, counted (``stats()['no_reply_to']``)
and acked without running the handler. A request whose per-message TTL
(``expiration``) passed while queued is dropped by the broker and never seen.

:meth:`Responder.run` sends heartbeats on its connection (between requests: a
handler should not run longer than twice ``broker_heartbeat``) and reconnects
when the connection is lost, with bounded retries; requests that were not acked
are redelivered by the broker. Replies go out on a second connection without
heartbeats (as Celery's producer connections), renewed on every reconnect.
"""
from __future__ import annotations

import collections
import logging
import socket
import threading
import time
import traceback as tb
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence, Tuple

import kombu
import kombu.exceptions

from . import _fork, serialization
from .engine.channel import detach_after_fork
from .engine.requests import IncomingRequest, RequestBatch, request_channel_for
from .exceptions import FrameError, ResultNotDelivered
from .app import App, app_or_default
from .backends.rpc import RPCBackend

__all__ = ('Responder', 'Request', 'BadRequest')

logger = logging.getLogger(__name__)

#: How many handled request ids ``Responder.seen`` keeps.
SEEN_MAX = 100_000
#: Connection attempts after a loss before :meth:`Responder.run` gives up (and raises).
RECONNECT_RETRIES = 100
#: Pause between reconnection attempts grows by this (seconds) up to ``RECONNECT_INTERVAL_MAX``.
RECONNECT_INTERVAL_STEP = 0.5
RECONNECT_INTERVAL_MAX = 5.0
#: How long :meth:`Responder.close` waits for a :meth:`Responder.run` in another thread to return.
CLOSE_WAIT = 10.0
#: Longest read between checks of stop(), limits and heartbeats.
POLL = 0.2
#: AMQP reply code of a queue declared again with other arguments.
PRECONDITION_FAILED = 406

Handler = Callable[..., Any]


class BadRequest(Exception):
    """The request could not be decoded (content type not accepted, or a malformed body)."""


def _moment(value: Any) -> Optional[datetime]:
    """A Celery ``expires``/``eta`` header (ISO 8601; naive means UTC) as an aware datetime, or None."""
    if not isinstance(value, str) or not value:
        return None
    text = value[:-1] + '+00:00' if value.endswith('Z') else value
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        logger.warning('ignoring an unreadable time header %r', value)
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


class Request:
    """One request as the handler sees it with ``pass_request=True``."""

    __slots__ = ('id', 'reply_to', 'correlation_id', 'headers', 'properties', 'delivery_info',
                 'task', 'args', 'kwargs', 'group', 'parent_id', 'root_id', 'retries',
                 'expires', 'eta', 'ignore_result')

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
        self.kwargs: Dict[str, Any] = {}
        self.group = headers.get('group')
        self.parent_id = headers.get('parent_id')
        self.root_id = headers.get('root_id')
        self.retries = headers.get('retries', 0)
        self.expires: Optional[datetime] = _moment(headers.get('expires'))
        self.eta: Optional[datetime] = _moment(headers.get('eta'))  # informative only: not honoured
        self.ignore_result: bool = bool(headers.get('ignore_result'))

    @property
    def is_task(self) -> bool:
        """True for a Celery task message (protocol v2)."""
        return self.task is not None

    def expired(self, now: Optional[datetime] = None) -> bool:
        """True when the request carries an ``expires`` that has passed."""
        return self.expires is not None and self.expires <= (now or datetime.now(timezone.utc))

    def reply_fields(self) -> Dict[str, Any]:
        """What the worker side needs to route and stamp the reply."""
        return {'reply_to': self.reply_to, 'correlation_id': self.correlation_id or self.id,
                'group': self.group, 'parent_id': self.parent_id, 'children': []}

    def __repr__(self) -> str:
        return f'<Request {self.id} task={self.task!r} reply_to={self.reply_to!r}>'


class Responder:
    """Answer requests from ``queue`` with ``handler``.

    Requests are read like replies (chunked reads, the frame parser): every request that
    arrived in one wake-up is one batch, whose replies go out in one write and whose
    acks (only once the replies are written) in one ack. Handlers run in the thread that
    runs the responder, or, with ``concurrency=N``, in a pool of N threads (for handlers
    that block).
    ``prefetch`` bounds the requests the broker hands out before they are acked.
    ``accept`` lists the request content types decoded (default: json only).
    ``expires`` (seconds) lets the broker delete the queue once unused that long.
    ``reconnect_retries`` bounds the connection attempts after a loss (then ``run`` raises).

    The queue is declared durable, not auto-delete, with ``x-expires`` only when
    ``expires`` is given. If it already exists with other arguments (e.g. declared
    by a :class:`~rpcresults.Client` first, or a quorum queue), it is consumed as it is.
    """

    @staticmethod
    def queue_for(name: str, durable: bool = True, expires: Optional[float] = None) -> kombu.Queue:
        """The request queue a responder declares (declare it first to send before any responder runs)."""
        return kombu.Queue(name, kombu.Exchange(''), routing_key=name, durable=durable,
                           auto_delete=False, expires=expires)

    def __init__(self, app: Optional[App], queue: str, handler: Handler, *, prefetch: int = 64,
                 pass_request: bool = False, accept: Optional[Sequence[str]] = None,
                 durable: bool = True, expires: Optional[float] = None,
                 reconnect_retries: int = RECONNECT_RETRIES, concurrency: Optional[int] = None) -> None:
        if concurrency is not None and concurrency < 1:
            raise ValueError(f'concurrency must be 1 or more (None: handlers run in the reading thread), '
                             f'not {concurrency!r}')
        self.app = app_or_default(app)
        self.concurrency = concurrency
        self._pool: Optional[ThreadPoolExecutor] = None
        self.queue_name = queue
        self.handler = handler
        self.prefetch = prefetch
        self.pass_request = pass_request
        self.accept = serialization.accept_set(accept)
        self.reconnect_retries = reconnect_retries
        self.queue = self.queue_for(queue, durable=durable, expires=expires)
        self._reply_connection: Any = None
        self.backend = self._new_backend()  # worker side only: publishes the replies
        self.counters: Dict[str, int] = {'handled': 0, 'succeeded': 0, 'failed': 0, 'expired': 0,
                                         'no_reply_to': 0, 'bad_requests': 0, 'requeued': 0,
                                         'reconnects': 0, 'batches': 0}
        self.seen: Deque[str] = collections.deque(maxlen=SEEN_MAX)  # ids of handled requests, newest last
        self._stop = threading.Event()
        self._idle = threading.Event()  # clear while run() is running
        self._idle.set()
        self._runner: Optional[int] = None
        self._connection: Any = None
        self._consumer: Any = None  # the request channel adapter (engine.requests)
        self._batch = RequestBatch()
        self._ready = threading.Event()
        self._heartbeat_due = float('inf')
        self._publish_failures = 0  # in a row: paces the requeueing
        self._cancelled = False
        probe = self.app.connection()
        self._recoverable: Tuple[type, ...] = (tuple(probe.connection_errors) + tuple(probe.channel_errors)
                                               + (OSError, FrameError, kombu.exceptions.OperationalError))
        _fork.register(self._after_fork)

    def _after_fork(self) -> None:
        """In a forked child: let go of the parent's connections (never touching its sockets)."""
        detach_after_fork(self._connection)
        detach_after_fork(self._reply_connection)  # the backend detaches its own reference too
        self._connection = None
        self._consumer = None
        self.backend = self._new_backend()
        self._stop = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._ready = threading.Event()
        self._runner = None

    # -- connections -------------------------------------------------------------------------
    def _new_backend(self) -> RPCBackend:
        """A reply publisher on a connection of its own without heartbeats: nothing would send
        them between replies, and the broker would close it while the responder idles."""
        connection = self.app.connection(heartbeat=0)
        if self.app.conf.result_publish_confirm:
            connection.transport_options['confirm_publish'] = True
        self._reply_connection = connection
        return RPCBackend(app=self.app, connection=connection)

    def _close_backend(self, graceful: bool) -> None:
        backend, connection = self.backend, self._reply_connection
        try:
            backend.close()
        except Exception:
            logger.debug('error while closing the reply publisher', exc_info=True)
        _drop(connection, graceful)

    def _declare(self, connection: Any) -> Any:
        """Declare the queue on a new channel; one that exists with other arguments is used as is."""
        channel = connection.channel()
        try:
            self.queue(channel).declare()
        except connection.channel_errors as exc:
            if str(getattr(exc, 'reply_code', None) or getattr(exc, 'code', None)) != str(PRECONDITION_FAILED):
                raise
            logger.warning('queue %s exists with other arguments (%s): consuming it as it is',
                           self.queue_name, exc)
            channel = connection.channel()  # the refusal closed the first one
            channel.queue_declare(self.queue_name, passive=True)
        return channel

    def _connect(self) -> None:
        connection = self.app.connection()
        try:
            connection.connect()
            channel = self._declare(connection)
            channel.basic_qos(0, self.prefetch, False)
            self._batch = RequestBatch()
            consumer = request_channel_for(channel, self._batch, self._on_cancel)
            consumer.consume(self.queue_name, f'rpcresults-responder-{uuid.uuid4()}')
        except BaseException:
            _drop(connection, graceful=False)
            raise
        self._connection, self._consumer = connection, consumer
        heartbeat = connection.heartbeat or 0
        self._heartbeat_due = time.monotonic() + heartbeat / 4 if heartbeat else float('inf')

    def _recover(self, exc: BaseException) -> None:
        """Drop both broken connections, then reconnect (bounded, with backoff) and consume again."""
        self.counters['reconnects'] += 1
        logger.warning('responder on %s lost its broker connection (%r): reconnecting', self.queue_name, exc)
        self._consumer = None
        connection, self._connection = self._connection, None
        _drop(connection, graceful=False)
        self._close_backend(graceful=False)
        self.backend = self._new_backend()
        delay = 0.0
        for attempt in range(1, self.reconnect_retries + 1):
            if self._stop.is_set():
                return
            try:
                self._connect()
            except self._recoverable as error:
                logger.warning('responder on %s: reconnection attempt %d/%d failed: %r',
                               self.queue_name, attempt, self.reconnect_retries, error)
                if attempt == self.reconnect_retries:
                    raise
                self._stop.wait(delay)
                delay = min(delay + RECONNECT_INTERVAL_STEP, RECONNECT_INTERVAL_MAX)
            else:
                logger.info('responder on %s reconnected (attempt %d)', self.queue_name, attempt)
                return

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> 'Responder':
        """Connect, declare the queue and start consuming (idempotent)."""
        if self._consumer is None:
            self._connect()
            self._ready.set()
        return self

    def wait_ready(self, timeout: float) -> bool:
        """True once the responder consumes its queue (for a responder run in another thread)."""
        return self._ready.wait(timeout)

    def run(self, timeout: Optional[float] = None, limit: Optional[int] = None) -> int:
        """Answer requests until ``limit`` were handled, ``timeout`` seconds passed or :meth:`stop`;
        returns how many were handled by this call. A lost connection is re-established."""
        self._idle.clear()
        self._runner = threading.get_ident()
        try:
            self.start()
            return self._loop(timeout, limit)
        finally:
            self._runner = None
            self._idle.set()

    def _loop(self, timeout: Optional[float], limit: Optional[int]) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        start = self.counters['handled']
        while not self._stop.is_set():
            if limit is not None and self.counters['handled'] - start >= limit:
                break
            remaining = POLL if deadline is None else min(POLL, deadline - time.monotonic())
            if remaining <= 0:
                break
            try:
                self._drain(remaining)
            except socket.timeout:
                continue
            except self._recoverable as exc:
                if self._stop.is_set():
                    break
                self._recover(exc)
        return self.counters['handled'] - start

    def _on_cancel(self, consumer_tag: str) -> None:
        """The broker cancelled the consumer (the queue was deleted): the loop reconnects."""
        self._cancelled = True

    def _drain(self, timeout: float) -> None:
        """One read (sliced to a quarter of the heartbeat) and whatever else already arrived, then
        every request of that wake-up as one batch; then heartbeats when due."""
        connection, consumer = self._connection, self._consumer
        if connection is None or consumer is None:
            raise ConnectionError('the responder has no broker connection')
        heartbeat = connection.heartbeat or 0
        if heartbeat:
            timeout = min(timeout, heartbeat / 4)
        try:
            if consumer.read(connection, timeout):
                while len(self._batch.requests) < self.prefetch and consumer.read(connection, 0):
                    pass
            requests = self._batch.take()
            if requests:
                self._answer_batch(consumer, requests)
            if self._cancelled:
                self._cancelled = False
                raise ConnectionError(f'the broker cancelled the consumer of {self.queue_name}')
        finally:
            if heartbeat and time.monotonic() >= self._heartbeat_due and self._connection is connection:
                self._heartbeat_due = time.monotonic() + heartbeat / 4
                connection.heartbeat_check()

    def run_forever(self) -> None:
        """Answer requests until :meth:`stop` is called (from another thread or a handler)."""
        self.run()

    def stop(self) -> None:
        """Make a running :meth:`run` return after the request in hand."""
        self._stop.set()

    def close(self) -> None:
        """Stop, wait (bounded) for a :meth:`run` in another thread to return, then stop consuming
        and close both connections."""
        self.stop()
        if self._runner not in (None, threading.get_ident()) and not self._idle.wait(CLOSE_WAIT):
            logger.warning('responder on %s: run() did not return within %s s; closing under it',
                           self.queue_name, CLOSE_WAIT)
        consumer, self._consumer = self._consumer, None
        connection, self._connection = self._connection, None
        if consumer is not None:
            try:
                consumer.cancel()
            except Exception:
                logger.debug('could not cancel the responder consumer', exc_info=True)
        _drop(connection, graceful=True)
        self._close_backend(graceful=True)
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False)

    def __enter__(self) -> 'Responder':
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def stats(self) -> Dict[str, int]:
        """Counters: handled, succeeded, failed, expired, no_reply_to, bad_requests, requeued
        (replies that could not be published), reconnects, batches (wake-ups that brought
        requests: each batch's replies go out in one write and its acks in one ack)."""
        return dict(self.counters)

    # -- requests ----------------------------------------------------------------------------
    def _answer_batch(self, consumer: Any, messages: List[IncomingRequest]) -> None:
        """Run every request of one wake-up (in the pool, with ``concurrency``), publish the replies
        in one write, then requeue those whose reply could not be published and ack the rest."""
        self.counters['batches'] += 1
        plans = [self._plan(message) for message in messages]
        if self.concurrency:
            pool = self._pool or self._new_pool()
            futures = [pool.submit(self._run, plan) if plan[1] == 'run' else None for plan in plans]
            outcomes = [future.result() if future is not None else plan[1:]
                        for plan, future in zip(plans, futures)]
        else:
            outcomes = [self._run(plan) if plan[1] == 'run' else plan[1:] for plan in plans]
        done: List[Tuple[Request, int, str]] = []  # answered: (request, delivery tag, counter)
        unanswered: List[int] = []  # acked without a reply (no reply_to)
        requeue: List[int] = []
        try:
            with self.backend.publisher.gathering() as refused:
                for (request, _, _), message, outcome in zip(plans, messages, outcomes):
                    if request is None:
                        unanswered.append(message.delivery_tag)
                        continue
                    try:
                        done.append((request, message.delivery_tag, self._reply(request, *outcome)))
                    except Exception as exc:  # this reply could not be published: the broker keeps it
                        self._requeued(request, exc)
                        requeue.append(message.delivery_tag)
        except Exception as exc:  # the batch's replies could not be written: all of them run again
            for request, tag, _ in done:
                self._requeued(request, exc)
                requeue.append(tag)
            done = []
        else:
            undelivered = {task_id for task_id, _ in refused}  # nacked, or not confirmed in time
            for request, tag, _ in done:
                if request.id in undelivered:
                    self._requeued(request, ResultNotDelivered(request.id, request.reply_to or '',
                                                               'not confirmed by the broker'))
                    requeue.append(tag)
            done = [item for item in done if item[0].id not in undelivered]
        if requeue:
            self._stop.wait(min(0.1 * self._publish_failures, 2.0))  # no hot loop on a lasting failure
        else:
            self._publish_failures = 0
        consumer.settle_batch(unanswered + [tag for _, tag, _ in done], sorted(requeue))
        for request, _, counter in done:
            self.counters['handled'] += 1
            self.counters[counter] += 1
            self.seen.append(request.id)

    def _new_pool(self) -> ThreadPoolExecutor:
        self._pool = ThreadPoolExecutor(max_workers=self.concurrency,
                                        thread_name_prefix=f'rpcresults-responder-{self.queue_name}')
        return self._pool

    def _requeued(self, request: Request, exc: BaseException) -> None:
        self._publish_failures += 1
        self.counters['requeued'] += 1
        logger.error('could not publish the reply to request %s on %s (%r): requeued',
                     request.id, self.queue_name, exc, exc_info=isinstance(exc, Exception))

    def _plan(self, message: IncomingRequest) -> Tuple[Optional[Request], str, Any]:
        """``(request, what to do, what it needs)``: run it (with its payload), or answer at once
        (a bad request, an expired one); the request is None when nothing can be answered."""
        request = Request(message)
        if not request.reply_to and not request.ignore_result:
            self.counters['no_reply_to'] += 1
            logger.warning('request %s on %s has no reply_to: dropped unanswered',
                           request.id, self.queue_name)
            return None, 'dropped', None
        try:
            payload = self._decode(request, message)
        except BadRequest as exc:
            logger.error('bad request %s on %s: %s', request.id, self.queue_name, exc)
            return request, 'bad_requests', exc
        if request.expired():
            logger.info('request %s on %s expired at %s: revoked, not run',
                        request.id, self.queue_name, request.expires)
            return request, 'expired', None
        return request, 'run', payload

    def _run(self, plan: Tuple[Optional[Request], str, Any]) -> Tuple[str, Any]:
        """Run the handler: ``('succeeded', value)`` or ``('failed', (exception, traceback text))``."""
        request, _, payload = plan
        try:
            value = self.handler(payload, request) if self.pass_request else self.handler(payload)
        except Exception as exc:  # the caller gets it; the responder goes on
            return 'failed', (exc, tb.format_exc())
        return 'succeeded', value

    def _reply(self, request: Request, outcome: str, value: Any) -> str:
        """Publish the reply for ``outcome``; returns the counter it adds to."""
        backend = self.backend
        fields = request.reply_fields()
        if request.ignore_result:
            return outcome
        if outcome == 'bad_requests':
            backend.mark_as_failure(request.id, value, traceback=None, request=fields)
        elif outcome == 'expired':
            backend.mark_as_revoked(request.id, 'expired', request=fields)
        elif outcome == 'failed':
            backend.mark_as_failure(request.id, value[0], traceback=value[1], request=fields)
        else:
            try:
                backend.mark_as_done(request.id, value, request=fields)
            except kombu.exceptions.EncodeError as exc:
                error = kombu.exceptions.EncodeError(
                    f'the reply to request {request.id} cannot be encoded as {backend.serializer}: '
                    f'the handler returned a value of type {type(value).__qualname__!r} ({exc})')
                logger.error('%s', error)
                backend.mark_as_failure(request.id, error, traceback=None, request=fields)
                return 'failed'
        return outcome

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


def _drop(connection: Any, graceful: bool) -> None:
    """Close ``connection`` (``graceful``: with the AMQP handshake) or just drop its socket."""
    if connection is None:
        return
    try:
        if graceful:
            connection.release()
        else:
            connection.collect()
    except Exception:
        logger.debug('error while closing a responder connection', exc_info=True)
