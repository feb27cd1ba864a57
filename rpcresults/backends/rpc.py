"""The RPC result backend: results travel as messages to the client's own reply queue.

Client side, :class:`ResultConsumer` declares the reply queue (durable, not
auto-delete, ``x-expires``), consumes it with manual acks (acked only once a
reply is in the state table), reconnects and re-consumes after connection
loss, and reports :class:`ReplyQueueLost` when the queue vanished with results
pending. Worker side, :class:`RPCBackend` publishes each state to the request's
``reply_to`` in Celery's exact format.
"""
from __future__ import annotations

import logging
import socket
import threading
import time
import uuid
from typing import Any, Dict, List, Optional, Tuple

import kombu
import kombu.exceptions
from amqp.exceptions import MessageNacked

from .. import _fork, serialization
from .._consume import ReplyChannel, detach_after_fork, reply_channel_for, wait_readable
from .._drain import FrameError, StateTable
from ..exceptions import BacklogLimitExceeded, ReplyQueueLost, ResultNotDelivered
from . import base
from .asynchronous import AsyncBackendMixin, BaseResultConsumer, ResultBackendClosed

__all__ = ('RPCBackend', 'ResultConsumer', 'BacklogLimitExceeded', 'make_state_table')

logger = logging.getLogger(__name__)

E_NO_GROUPS = ('The rpc:// result backend keeps no stored state, so it cannot {op} a group; '
               'use a key-value backend such as redis:// for saved groups.')

#: RabbitMQ's direct reply-to pseudo-queue (and the prefix of the names it hands out).
DIRECT_REPLY_TO = 'amq.rabbitmq.reply-to'

#: Replies dispatched between two ack flushes while a burst is being read.
ACK_BATCH = 1024


def make_state_table(accept: Any, buffer_max: int, keep_late: bool) -> StateTable:
    """A state table decoding replies of the content types in ``accept``."""
    accept = frozenset(accept or ())
    decode = lambda body, ctype, cenc: serialization.decode(body, ctype, cenc, accept)  # noqa: E731
    return StateTable(decode, buffer_max=buffer_max, keep_late=keep_late,
                      fast_json='application/json' in accept)


class ResultConsumer(BaseResultConsumer):
    """Consumes this client's reply queue into the state table; survives connection loss."""

    def __init__(self, backend: 'RPCBackend', app: Any, accept: Any, table: StateTable) -> None:
        super().__init__(backend, app, accept, table)
        self._connection: Any = None
        self._replies: Optional[ReplyChannel] = None
        self._queue_cancelled = False
        self._start_lock = threading.RLock()
        self._connection_errors: Tuple[type, ...] = ()
        self._consumer_tag = ''
        self._heartbeat_due = 0.0
        self.reconnects = 0
        self.queues_lost = 0
        self._connected_once = False

    # -- lifecycle ---------------------------------------------------------------------------
    #: How long ``stop()`` waits for a reading thread to finish its read before it drops the
    #: connection under it (no handshake) instead of closing it politely.
    STOP_GRACE = 0.25

    def start(self, initial_task_id: Optional[str] = None, no_ack: bool = True, *,
              reopen: bool = True, **kwargs: Any) -> None:
        """Connect, declare the reply queue and consume it (does nothing when already consuming).

        After ``stop()`` an explicit start (or a new wait) opens the backend again;
        readers pass ``reopen=False`` and get :class:`ResultBackendClosed` instead.
        """
        if reopen:
            self.allow_reopen()
        if self._replies is not None:
            return
        with self._start_lock:
            if self.closed:
                raise ResultBackendClosed()
            if self._replies is None:
                self._connect(reconnect=self._connected_once)

    def stop(self) -> None:
        """Close the reply connection; every wait in progress raises :class:`ResultBackendClosed`.

        With nobody reading, handled replies are acked, the consumer cancelled and the
        connection closed politely. When a thread is blocked reading (a ``get()`` or an
        await elsewhere), the synchronous broker calls could not get their answers, so
        the connection is dropped without a handshake instead: that ends the read, and
        the broker requeues the unacked replies. Nothing reconnects until a new wait
        or an explicit ``start()``.
        """
        def drop(connection: Any) -> None:  # no handshake: a thread blocked reading it wakes up
            try:
                connection.collect()
            except Exception:
                logger.debug('error while dropping the reply connection', exc_info=True)
            connection._closed = True  # kombu would otherwise reconnect on the next use of it

        self.closed = True
        self.fail_waiters(ResultBackendClosed())
        leader = self.drainer._leader
        polite = leader.acquire(timeout=self.STOP_GRACE)
        try:
            with self._start_lock:
                replies, self._replies = self._replies, None
                connection, self._connection = self._connection, None
                if connection is None:
                    return
                if not polite:
                    drop(connection)
                    return
                try:
                    if replies is not None:
                        replies.flush_acks()
                        replies.cancel()
                    connection.release()
                except Exception:  # closing anyway: a dead connection cannot ack
                    logger.debug('could not close the reply connection politely', exc_info=True)
                    drop(connection)
        finally:
            if polite:
                leader.release()
                self.drainer._wake_sleepers()

    def on_after_fork(self) -> None:
        super().on_after_fork()
        self._start_lock = threading.RLock()
        detach_after_fork(self._connection)
        self._connection = None
        self._replies = None
        self._connected_once = False  # the child has a queue of its own: nothing to have lost
        self.drainer = type(self.drainer)(self)

    def consume_from(self, task_id: str) -> None:
        self.start()

    def _open_connection(self) -> Any:
        """A connected broker connection; a waiter's deadline bounds the retrying (the next wait tries again)."""
        conf = self.app.conf
        connection = self.app.connection()
        timeout = None if self.deadline is None else max(self.deadline - time.monotonic(), 0.5)
        try:
            connection.ensure_connection(errback=self._give_up_if_closed,
                                         max_retries=conf.broker_connection_max_retries,
                                         interval_start=0, interval_step=0.5, interval_max=2, timeout=timeout)
        except Exception as exc:  # kombu wraps what the errback raises
            if self.closed:
                raise ResultBackendClosed() from exc
            raise
        self._connection_errors = tuple(connection.connection_errors) + tuple(connection.channel_errors)
        return connection

    def _give_up_if_closed(self, exc: BaseException, interval: float) -> None:
        """Between connection attempts: stop retrying once ``stop()`` was called."""
        if self.closed:
            raise ResultBackendClosed() from exc

    def _attach(self, connection: Any, replies: ReplyChannel) -> None:
        """Make ``replies`` on ``connection`` the live consumer."""
        self._connection = connection
        self._replies = replies
        self._connected_once = True
        self._queue_cancelled = False
        heartbeat = connection.heartbeat or 0
        self._heartbeat_due = time.monotonic() + heartbeat / 4 if heartbeat else float('inf')

    def _connect(self, reconnect: bool) -> None:
        connection = self._open_connection()
        channel = connection.channel()
        queue_name = self.backend.oid
        lost = False
        if reconnect:
            try:
                channel.queue_declare(queue=queue_name, passive=True)
            except connection.channel_errors:
                lost = True
                channel = connection.channel()  # the failed passive declare closed the old one
        self.backend.binding(channel).declare()
        replies = reply_channel_for(channel, self.table, self._on_cancel)
        self._consumer_tag = f'rpcresults-{uuid.uuid4()}'
        replies.consume(queue_name, self._consumer_tag)
        self._attach(connection, replies)
        if lost:
            self._report_queue_lost('the reply queue was gone when the connection came back')

    def _on_cancel(self, consumer_tag: str) -> None:
        self._queue_cancelled = True

    def _report_queue_lost(self, detail: str) -> None:
        self.queues_lost += 1
        lost = self.table.fail_pending(lambda ids: ReplyQueueLost(ids, detail))
        if lost:
            logger.error('reply queue %s lost with %d result(s) pending: %s',
                         self.backend.oid, len(lost), detail)

    def _recover(self, exc: Optional[BaseException]) -> None:
        """Drop the broken connection and build a new one (re-declare, re-consume).

        Under ``_start_lock``, so ``stop()`` cannot slip in between the check and the reconnect.
        """
        with self._start_lock:
            if self.closed:  # stop() ran: never reconnect behind it
                raise ResultBackendClosed() from exc
            self.reconnects += 1
            logger.warning('reply consumer for %s lost its connection (%r); reconnecting',
                           self.backend.oid, exc)
            old, self._connection = self._connection, None
            self._replies = None
            if old is not None:
                try:
                    old.collect()
                except Exception:
                    logger.debug('error while discarding the broken connection', exc_info=True)
            self._connect(reconnect=True)

    def _requeue_after_cancel(self) -> None:
        """The broker cancelled our consumer (queue deleted): re-declare, re-consume, report."""
        replies = self._replies
        self._queue_cancelled = False
        if replies is None:
            return
        replies.settle()
        self._consume_again(replies)

    def _consume_again(self, replies: ReplyChannel) -> None:
        """Consume on the same channel after the broker cancelled us, and report the loss."""
        self.backend.binding(replies.channel).declare()
        replies.consume(self.backend.oid, f'rpcresults-{uuid.uuid4()}')
        self._report_queue_lost('the reply queue was deleted by the broker')

    # -- reading -----------------------------------------------------------------------------
    def _drain_once(self, timeout: Optional[float]) -> bool:
        """One read; True when something was dispatched, False on timeout.

        Raises :class:`ResultBackendClosed` once ``stop()`` ran, instead of reconnecting.
        """
        replies, connection = self._replies, self._connection
        if replies is None or connection is None:
            self.start(reopen=False)
            replies, connection = self._replies, self._connection
            if replies is None:  # stopped meanwhile
                raise ResultBackendClosed()
        try:
            return replies.read(connection, timeout)
        except Exception as exc:
            if self.closed:
                raise ResultBackendClosed() from exc
            if isinstance(exc, FrameError):
                logger.error('unreadable input on the reply connection: %s', exc)
            elif not isinstance(exc, self._connection_errors + (OSError,)):
                raise
            self._recover(exc)
            return True
        finally:
            if self._queue_cancelled and not self.closed:
                self._requeue_after_cancel()

    def drain_available(self, limit: Optional[int] = None) -> Tuple[int, bool]:
        """Dispatch what already arrived (non-blocking), then ack it: ``(count, exhausted)``."""
        count = 0
        exhausted = True
        start = self.table.received
        try:
            while True:
                if limit is not None and self._dispatched_since(start) > limit:
                    exhausted = False
                    break
                if not self._drain_once(0):
                    break
                count += 1
                if self._replies is not None and self._replies.unacked >= ACK_BATCH:
                    self._flush_acks()
        finally:
            self._flush_acks()
            self._maybe_heartbeat()
        return self._dispatched_since(start), exhausted

    def _dispatched_since(self, start: int) -> int:
        return self.table.received - start

    def drain_events(self, timeout: Optional[float] = None) -> None:
        """Block up to ``timeout`` (sliced for heartbeats) for a reply and dispatch it."""
        connection = self._connection
        if self._replies is None or connection is None:
            self.start(reopen=False)
            connection = self._connection
        heartbeat = connection.heartbeat or 0
        if heartbeat:
            slice_ = heartbeat / 4
            timeout = slice_ if timeout is None else min(timeout, slice_)
        self._drain_once(timeout)
        self._flush_acks()
        self._maybe_heartbeat()

    def _maybe_heartbeat(self) -> None:
        """Send/check heartbeats when due (cheap otherwise): also while only polling state."""
        connection = self._connection
        if connection is None or not connection.heartbeat or time.monotonic() < self._heartbeat_due:
            return
        self._heartbeat_due = time.monotonic() + connection.heartbeat / 4
        try:
            self._heartbeat_check(connection)
        except self._connection_errors as exc:
            self._recover(exc)

    def _heartbeat_check(self, connection: Any) -> None:
        """Send and verify heartbeats (a hook: direct reply-to puts the write under its write lock)."""
        connection.heartbeat_check()

    def _flush_acks(self) -> None:
        replies = self._replies
        if replies is None or not replies.unacked:
            return
        try:
            replies.flush_acks()
        except self._connection_errors as exc:
            # unacked replies are redelivered after reconnect; the table ignores repeats
            self._recover(exc)

    def stats(self) -> Dict[str, int]:
        """Counters: ``reconnects``, ``queues_lost`` and ``acked`` (replies acked on the current channel)."""
        replies = self._replies
        return {'reconnects': self.reconnects, 'queues_lost': self.queues_lost,
                'acked': replies.acked if replies is not None else 0}


class RPCBackend(base.Backend, AsyncBackendMixin):
    """Result backend over AMQP reply queues (Celery's ``rpc://``, wire-compatible)."""

    Exchange = kombu.Exchange
    Producer = kombu.Producer
    ResultConsumer = ResultConsumer
    BacklogLimitExceeded = BacklogLimitExceeded

    persistent = False
    supports_autoexpire = True
    supports_native_join = True

    class Queue(kombu.Queue):
        """The reply queue; its declaration may be cached per connection."""

    def __init__(self, app: Any = None, connection: Any = None, exchange: Optional[str] = None,
                 exchange_type: Optional[str] = None, persistent: Optional[bool] = None,
                 serializer: Optional[str] = None, auto_delete: bool = False, url: Optional[str] = None,
                 **kwargs: Any) -> None:
        super().__init__(app, serializer=serializer, url=url or 'rpc://', **kwargs)
        conf = self.app.conf
        self._connection = connection
        self.persistent = self.prepare_persistent(persistent)
        self.delivery_mode = 2 if self.persistent else 1
        self.exchange = self.Exchange('')  # the default exchange: routing key = queue name
        self.auto_delete = auto_delete
        self.reply_queue_expires = self.app.expires_seconds(conf.result_reply_queue_expires)
        self.oid = self.app.thread_oid
        self.result_consumer = self.ResultConsumer(self, self.app, self.accept, self._new_table())
        self.mandatory = bool(conf.result_publish_mandatory)
        self.confirm = bool(conf.result_publish_confirm)
        self.confirm_timeout = conf.result_publish_confirm_timeout
        self.published = 0
        self.returned = 0
        self.nacked = 0
        self._producer_connection: Any = None
        self._producer: Any = None
        self._publish_lock = threading.Lock()
        self._declare_due = 0.0  # when on_task_call must declare the reply queue again
        _fork.register(self)

    def _new_table(self) -> StateTable:
        conf = self.app.conf
        return make_state_table(self.accept, conf.result_buffer_max, conf.result_keep_late_replies)

    # -- the reply queue ---------------------------------------------------------------------
    @property
    def binding(self) -> kombu.Queue:
        """The reply queue (as in Celery, a property): named after this client's oid, reached
        through the default exchange; ``backend.binding(channel)`` binds it to a channel."""
        return self.Queue(self.oid, self.exchange, self.oid, durable=True,
                          auto_delete=self.auto_delete, expires=self.reply_queue_expires)

    def _create_binding(self, task_id: str) -> kombu.Queue:
        return self.binding

    def on_task_call(self, producer: Any, task_id: str) -> None:
        """Declare the reply queue on the request's channel before the request is sent.

        Not once per connection, as a cached declaration would be: a client idle for
        longer than the queue's expiry (nobody consuming: its consumer connection was
        dropped) would send requests whose replies find no queue. The declaration is
        repeated whenever half the expiry has passed since the last one.
        """
        now = time.monotonic()
        if now < self._declare_due:
            return
        self.binding(producer.channel).declare()
        expires = self.reply_queue_expires
        self._declare_due = now + expires / 2 if expires else float('inf')

    def reply_properties(self, task_id: str) -> Dict[str, str]:
        """AMQP properties a request for ``task_id`` carries so its replies come here."""
        return {'reply_to': self.oid, 'correlation_id': task_id}

    def _after_fork(self) -> None:
        # New objects rather than clear(): a parent thread may have held their locks at fork time.
        self._cache = type(self._cache)(self._cache.limit)
        self.oid = str(uuid.uuid4())  # never shared with another backend of the child
        self._declare_due = 0.0
        self.result_consumer.on_after_fork()
        detach_after_fork(self._producer_connection)
        detach_after_fork(self._connection)  # a publishing connection given to us is the parent's too
        self._connection = None
        self._producer_connection = None
        self._producer = None
        self._publish_lock = threading.Lock()

    # -- worker side -------------------------------------------------------------------------
    def destination_for(self, task_id: str, request: Any) -> Tuple[Optional[str], str]:
        """``(reply_to, correlation_id)`` for a result of ``task_id`` answering ``request``."""
        if request is None:
            raise RuntimeError(
                f'RPC backend needs the task request (with reply_to) to send the result of {task_id!r}')
        reply_to = base.request_field(request, 'reply_to')
        correlation_id = base.request_field(request, 'correlation_id')
        return reply_to, correlation_id or task_id

    def on_reply_declare(self, task_id: str) -> Optional[List[Any]]:
        """Entities to declare when sending a result: none, the client owns its queue."""
        return None

    def _to_result(self, task_id: str, state: str, result: Any, traceback: Optional[str],
                   request: Any) -> Dict[str, Any]:
        meta = self._get_result_meta(result=result, state=state, traceback=traceback, request=request)
        meta['task_id'] = task_id
        return meta

    def store_result(self, task_id: str, result: Any, state: str, traceback: Optional[str] = None,
                     request: Any = None, **kwargs: Any) -> Any:
        """Publish ``state`` for ``task_id`` to the request's reply queue (nothing without reply_to)."""
        routing_key, correlation_id = self.destination_for(task_id, request)
        if not routing_key:
            return result
        body = self._to_result(task_id, state, self.encode_result(result, state), traceback, request)
        self._publish(body, routing_key, correlation_id, task_id)
        return result

    def _publish(self, body: Dict[str, Any], routing_key: str, correlation_id: str, task_id: str) -> None:
        with self._publish_lock:
            producer = self._producer or self._new_producer()
            # RabbitMQ returns direct reply-to publishes as unroutable even when it delivers them
            mandatory = self.mandatory and not routing_key.startswith(DIRECT_REPLY_TO)
            options: Dict[str, Any] = {}
            if self.confirm:
                options['confirm_timeout'] = self.confirm_timeout
            try:
                producer.publish(
                    body, exchange=self.exchange, routing_key=routing_key, correlation_id=correlation_id,
                    serializer=self.serializer, retry=True, retry_policy=self.retry_policy,
                    declare=self.on_reply_declare(task_id), delivery_mode=self.delivery_mode,
                    mandatory=mandatory, **options)
            except (MessageNacked, kombu.exceptions.OperationalError) as exc:
                if not isinstance(exc, MessageNacked) and not isinstance(exc.__cause__, MessageNacked):
                    raise
                self.nacked += 1
                logger.error('the broker refused (nacked) the result of %s for reply queue %s',
                             task_id, routing_key)
                raise ResultNotDelivered(task_id, routing_key, 'the broker nacked it') from None
            self.published += 1
            if mandatory and not self.confirm:
                self.collect_returns()

    def _new_producer(self) -> Any:
        if self._connection is not None:
            connection = self._connection
        else:
            options = dict(self.app.conf.broker_transport_options or {})
            if self.confirm:
                options['confirm_publish'] = True
            # no heartbeats: nothing reads this connection between publishes, so the broker
            # would close an idle one, and the next reply written to it could be lost
            connection = self.app.connection(transport_options=options, heartbeat=0)
        self._producer_connection = connection
        self._producer = self.Producer(connection, exchange=self.exchange, serializer=self.serializer,
                                       auto_declare=False, on_return=self._on_return)
        return self._producer

    def collect_returns(self, timeout: float = 0.0) -> int:
        """Handle returns the broker sent on the producer connection; wait up to ``timeout`` for one.

        Without confirms nothing else reads that connection, so a return is noticed at
        the next publish (or here); with confirms it arrives before the ack and is
        handled while the publish waits. Returns the ``returned`` counter.
        """
        raw = getattr(self._producer_connection, '_connection', None)
        sock = getattr(getattr(raw, 'transport', None), 'sock', None)
        if sock is None:
            return self.returned
        connection = self._producer_connection
        wait = timeout
        try:
            while wait_readable(sock, wait):
                raw.drain_events(timeout=0.5)
                wait = 0
        except (socket.timeout, OSError, *connection.connection_errors, *connection.channel_errors):
            logger.debug('reading returns on the producer connection failed', exc_info=True)
        return self.returned

    def _on_return(self, exc: Exception, exchange: str, routing_key: str, message: Any) -> None:
        """The broker could not route a result (``mandatory``): the client's reply queue is gone."""
        self.returned += 1
        task_id = getattr(message, 'properties', {}).get('correlation_id')
        logger.warning('result of %s was returned by the broker: no reply queue %r (%s); '
                       'the client is gone or its queue expired', task_id, routing_key, exc)

    def worker_stats(self) -> Dict[str, int]:
        """Worker-side counters: results published, returned as unroutable, nacked by the broker."""
        return {'published': self.published, 'returned': self.returned, 'nacked': self.nacked}

    # -- client side -------------------------------------------------------------------------
    def get_task_meta(self, task_id: str, backlog_limit: int = 1000) -> Dict[str, Any]:  # type: ignore[override]
        """Newest state of ``task_id`` after reading up to ``backlog_limit`` waiting replies.

        Every reply read lands in the state table (the newest per id wins, older ones
        are acked); more than ``backlog_limit`` replies in the way raises
        :class:`BacklogLimitExceeded`.
        """
        consumer = self.result_consumer
        consumer.start()
        _, exhausted = consumer.drainer.drain_now(backlog_limit)
        if not exhausted:
            raise self.BacklogLimitExceeded(task_id)
        return consumer.lookup(task_id)

    poll = get_task_meta

    def _get_task_meta_for(self, task_id: str) -> Dict[str, Any]:
        return self.get_task_meta(task_id)

    def reload_task_result(self, task_id: str) -> Dict[str, Any]:
        return self.get_task_meta(task_id)

    def on_out_of_band_result(self, task_id: str, meta: Dict[str, Any]) -> None:
        """Keep a reply nobody waits for yet (it lands in the bounded early-arrival buffer)."""
        self.result_consumer.table.deliver(task_id, meta)

    def forget(self, task_id: str) -> None:
        """Drop what this client holds for ``task_id`` (nothing is stored server-side)."""
        self._cache.pop(task_id, None)
        self.result_consumer.table.forget(task_id)

    def _forget(self, task_id: str) -> None:
        self.result_consumer.table.forget(task_id)

    def save_group(self, group_id: str, result: Any) -> Any:
        raise NotImplementedError(E_NO_GROUPS.format(op='save'))

    def restore_group(self, group_id: str, cache: bool = True) -> Any:
        raise NotImplementedError(E_NO_GROUPS.format(op='restore'))

    def delete_group(self, group_id: str) -> None:
        """Not supported: rpc:// stores no groups, so this raises ``NotImplementedError``."""
        raise NotImplementedError(E_NO_GROUPS.format(op='delete'))

    def get_group_meta(self, group_id: str, cache: bool = True) -> Any:
        """Not supported: rpc:// stores no groups, so this raises ``NotImplementedError``."""
        raise NotImplementedError(E_NO_GROUPS.format(op='look up'))

    def ensure_chords_allowed(self) -> None:
        raise NotImplementedError('The rpc:// result backend does not support chords.')

    def as_uri(self, include_password: bool = True) -> str:
        return 'rpc://'

    def stats(self) -> Dict[str, int]:
        """Counters: received, dispatched, buffered, evicted, late, malformed, reconnects, ..."""
        counters = self.result_consumer.table.counters()
        counters.update(self.result_consumer.stats())
        counters.update(self.worker_stats())
        counters['cached'] = len(self._cache)
        return counters

    def close(self) -> None:
        """Stop consuming and close both connections."""
        self.result_consumer.stop()
        with self._publish_lock:
            connection, self._producer_connection = self._producer_connection, None
            self._producer = None
            if connection is not None and connection is not self._connection:
                connection.release()
