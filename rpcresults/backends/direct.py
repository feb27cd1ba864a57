"""Direct reply-to: replies through RabbitMQ's ``amq.rabbitmq.reply-to`` pseudo-queue (opt in).

Selected with ``result_backend='rpc+direct://'``. No reply queue is declared: the
client consumes the pseudo-queue on one channel (``no_ack=True``, as RabbitMQ
requires) and must publish its requests **on that same channel** with
``reply_to='amq.rabbitmq.reply-to'``; the broker rewrites it into an address
bound to that channel and routes replies straight to it. :class:`~rpcresults.Client`
does this when the app's backend is this one.

Constraints, by RabbitMQ's design:

* No queue holds the replies: a reply whose channel is gone (client disconnected,
  connection lost) is dropped by the broker. After a reconnect every result still
  pending fails with :class:`~rpcresults.ReplyQueueLost` (raised by ``get``/``join``, then
  and on every later wait, never a hang); requests sent after the reconnect use the new
  address and work.
* No acks and no redelivery: a reply is the client's once the broker sent it.
* Only replies to requests sent by this client (this channel) arrive: a worker
  cannot be handed ``backend.oid`` out of band. ``RabbitMQ`` only: other transports
  (``memory://``, Redis) have no such pseudo-queue.
* Worker side is unchanged: the worker publishes to the request's ``reply_to``
  through the default exchange, as with ``rpc://`` (Celery workers too).
"""
from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any, Dict, Optional, Set, Tuple

import kombu
import kombu.exceptions

from .._consume import AmqpReplyChannel, ReplyChannel, wait_readable
from ..exceptions import ImproperlyConfigured, ReplyQueueLost
from .asynchronous import error_meta
from .rpc import DIRECT_REPLY_TO, ResultConsumer, RPCBackend

if TYPE_CHECKING:  # pragma: no cover
    from ..result import AsyncResult

__all__ = ('DirectReplyBackend', 'DirectResultConsumer', 'DIRECT_REPLY_QUEUE')

logger = logging.getLogger(__name__)

#: RabbitMQ's pseudo-queue for direct reply-to.
DIRECT_REPLY_QUEUE = DIRECT_REPLY_TO

E_LOST = ('direct reply-to keeps no queue: replies in flight when the connection dropped '
          'were discarded by the broker')


def publish_without_reads(raw: Any) -> None:
    """Make py-amqp's ``basic_publish`` on ``raw`` (an ``amqp.Connection``) write only, never read.

    With the ``connection.blocked`` capability negotiated, py-amqp calls
    ``drain_events(timeout=0)`` before every publish. Requests go out on the connection
    the reply reader (a leader thread, the asyncio reader) is reading, so that read would
    run concurrently with it and corrupt the frame stream. Only this local flag is turned
    off: it is read by nothing else once the connection is open (the broker still sends
    ``connection.blocked``, and the reader hands such frames to py-amqp). Overriding
    ``basic_publish`` itself would mean rebuilding kombu's message encoding. The dict is
    replaced, never changed in place, as a caller's ``client_properties`` may be shared.
    """
    properties = getattr(raw, 'client_properties', None) or {}
    capabilities = properties.get('capabilities') or {}
    if capabilities.get('connection.blocked'):
        capabilities = dict(capabilities, **{'connection.blocked': False})
        raw.client_properties = dict(properties, capabilities=capabilities)


class _DirectReplyChannel(AmqpReplyChannel):
    """The py-amqp adapter consuming the pseudo-queue without acks (RabbitMQ refuses acks there)."""

    no_ack = True

    def flush_acks(self) -> None:
        self.acked += self.unacked  # no_ack: the broker forgot them when it sent them
        self.unacked = 0


class DirectResultConsumer(ResultConsumer):
    """Consumes ``amq.rabbitmq.reply-to`` on one channel that also carries the requests.

    Locks, always taken in this order: the drainer's leader lock (reading), ``_start_lock``
    (connecting, recovering, and tracking + publishing a request, so that a reconnect fails
    exactly the ids whose requests went out on the old channel), ``write_lock`` (any write
    on the connection: requests and heartbeats).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.write_lock = threading.RLock()

    @property
    def channel(self) -> Any:
        """The channel consuming the pseudo-queue (requests must go out on it); None when not connected."""
        replies = self._replies
        return replies.channel if replies is not None else None

    def _open_connection(self) -> Any:
        if getattr(self.app.connection().transport, 'driver_type', None) != 'amqp':
            raise ImproperlyConfigured('direct reply-to (rpc+direct://) needs a RabbitMQ broker (amqp://)')
        return super()._open_connection()

    def _connect(self, reconnect: bool) -> None:
        connection = self._open_connection()
        channel = connection.channel()
        publish_without_reads(channel.connection)
        replies: ReplyChannel = _DirectReplyChannel(channel, self.table, self._on_cancel)
        self._consumer_tag = f'rpcresults-direct-{uuid.uuid4()}'
        replies.consume(DIRECT_REPLY_QUEUE, self._consumer_tag)
        self._attach(connection, replies)
        if reconnect:
            self._report_lost(E_LOST)

    def _report_lost(self, detail: str) -> None:
        """Fail every pending id, for good: unlike a reply queue, nothing can still deliver it."""
        self.queues_lost += 1
        lost = self.table.fail_pending(lambda ids: ReplyQueueLost(ids, detail))
        for task_id in lost:  # later waits fail at once too, instead of waiting for nothing
            self.table.deliver(task_id, error_meta(task_id, ReplyQueueLost([task_id], detail)))
        if lost:
            logger.error('direct reply-to consumer lost its channel with %d result(s) pending: %s',
                         len(lost), detail)

    def _consume_again(self, replies: ReplyChannel) -> None:
        with self._start_lock, self.write_lock:
            replies.consume(DIRECT_REPLY_QUEUE, f'rpcresults-direct-{uuid.uuid4()}')
            self._report_lost('the broker cancelled the direct reply-to consumer')

    def _heartbeat_check(self, connection: Any) -> None:
        # only the write under write_lock: _recover takes _start_lock, never taken while holding it
        with self.write_lock:
            connection.heartbeat_check()

    def on_after_fork(self) -> None:
        super().on_after_fork()
        self.write_lock = threading.RLock()

    # -- publishing --------------------------------------------------------------------------
    def service_idle_connection(self) -> None:
        """Connect if needed; when nobody is reading, handle what arrived and send a heartbeat if due.

        Nothing sends heartbeats while nobody waits, so the broker may have dropped the
        connection; this notices it (EOF, a close, missed heartbeats) and reconnects
        before a new request is tracked and sent, instead of sending into a dead socket.
        """
        self.start()
        if time.monotonic() < self._heartbeat_due and not wait_readable(self.reply_socket(), 0):
            return
        self.drainer.drain_now()  # does nothing when another thread is reading: it does this itself

    def publish(self, backend: 'DirectReplyBackend', body: Any, routing_key: str, exchange: str,
                result: Optional['AsyncResult'], options: Dict[str, Any]) -> None:
        """Track ``result`` and publish the request on the consuming channel, as one step."""
        with self._start_lock:  # no reconnect (which fails pending ids) between tracking and publishing
            self.start()
            replies = self._replies
            if replies is None:  # pragma: no cover  (start() connects or raises)
                raise ConnectionError('the direct reply-to consumer is not connected')
            if result is not None:
                backend.add_pending_result(result)
            try:
                with self.write_lock:
                    backend.producer_for(replies.channel).publish(
                        body, routing_key=routing_key, exchange=exchange, retry=False, **options)
                return
            except self._connection_errors + (OSError, kombu.exceptions.OperationalError) as exc:
                error: BaseException = exc
        self._recover_after_failed_publish(replies, error)
        raise error

    def _recover_after_failed_publish(self, replies: ReplyChannel, exc: BaseException) -> None:
        """Reconnect now when nobody is reading (a reader notices the dead connection itself)."""
        leader = self.drainer._leader
        if not leader.acquire(blocking=False):
            return
        try:
            with self._start_lock:
                if self._replies is replies and not self.closed:
                    self._recover(exc)
        except Exception:  # the caller gets the publish error; the next request tries again
            logger.debug('could not reconnect after a failed request', exc_info=True)
        finally:
            leader.release()
            self.drainer._wake_sleepers()

    def stats(self) -> Dict[str, int]:
        """``ResultConsumer.stats`` with ``acked`` always 0: direct reply-to consumes with ``no_ack``."""
        counters = super().stats()
        counters['acked'] = 0
        return counters


class DirectReplyBackend(RPCBackend):
    """``rpc://`` with replies over direct reply-to: no reply queue, no acks, lost on disconnect."""

    ResultConsumer = DirectResultConsumer  # type: ignore[assignment]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._known_exchanges: Set[str] = set()
        self._request_producer: Optional[Tuple[Any, kombu.Producer]] = None  # (channel, producer)

    def reply_properties(self, task_id: str) -> Dict[str, str]:
        return {'reply_to': DIRECT_REPLY_QUEUE, 'correlation_id': task_id}

    def on_task_call(self, producer: Any, task_id: str) -> None:
        """Nothing to declare; requests must go through :meth:`publish_request`."""
        self.result_consumer.start()

    def publish_request(self, body: Any, routing_key: str, exchange: str = '', *,
                        result: Optional['AsyncResult'] = None, **options: Any) -> None:
        """Publish a request on the consuming channel (the only one whose replies reach us).

        ``result`` (the request's result object) is tracked just before the request goes
        out, on a connection checked first: a reconnect can then only fail ids whose
        requests were sent on the lost channel. A connection error while publishing is
        raised (after reconnecting when nobody is reading): the next request works.
        """
        consumer: DirectResultConsumer = self.result_consumer  # type: ignore[assignment]
        if exchange and exchange not in self._known_exchanges:
            self._check_exchange(exchange)
        consumer.service_idle_connection()
        consumer.publish(self, body, routing_key, exchange, result, options)

    def producer_for(self, channel: Any) -> kombu.Producer:
        """A producer on ``channel`` (kept while the channel lives; called under the write lock)."""
        cached = self._request_producer
        if cached is None or cached[0] is not channel:
            cached = self._request_producer = (channel, kombu.Producer(channel, auto_declare=False))
        return cached[1]

    def _after_fork(self) -> None:
        super()._after_fork()
        self._request_producer = None

    def _check_exchange(self, exchange: str) -> None:
        """Raise if ``exchange`` does not exist, checked on a connection of its own.

        Publishing to a missing exchange makes the broker close the channel, and with it
        the direct reply-to consumer: every pending reply would be lost.
        """
        with self.app.connection() as connection:
            try:
                connection.default_channel.exchange_declare(exchange, 'direct', passive=True)
            except connection.channel_errors as exc:
                raise ImproperlyConfigured(f'cannot send requests to exchange {exchange!r}: {exc}') from None
        self._known_exchanges.add(exchange)

    def as_uri(self, include_password: bool = True) -> str:
        return 'rpc+direct://'
