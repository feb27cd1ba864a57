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
import uuid
from typing import Any, Dict, Optional, Set

import kombu

from .._consume import AmqpReplyChannel, ReplyChannel
from ..exceptions import ImproperlyConfigured, ReplyQueueLost
from .asynchronous import error_meta
from .rpc import DIRECT_REPLY_TO, ResultConsumer, RPCBackend

__all__ = ('DirectReplyBackend', 'DirectResultConsumer', 'DIRECT_REPLY_QUEUE')

logger = logging.getLogger(__name__)

#: RabbitMQ's pseudo-queue for direct reply-to.
DIRECT_REPLY_QUEUE = DIRECT_REPLY_TO

E_LOST = ('direct reply-to keeps no queue: replies in flight when the connection dropped '
          'were discarded by the broker')


class _DirectReplyChannel(AmqpReplyChannel):
    """The py-amqp adapter consuming the pseudo-queue without acks (RabbitMQ refuses acks there)."""

    no_ack = True

    def flush_acks(self) -> None:
        self.acked += self.unacked  # no_ack: the broker forgot them when it sent them
        self.unacked = 0


class DirectResultConsumer(ResultConsumer):
    """Consumes ``amq.rabbitmq.reply-to`` on one channel that also carries the requests."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.write_lock = threading.RLock()  # requests, heartbeats: one writer at a time
        self.channel: Any = None

    def _open_connection(self) -> Any:
        if getattr(self.app.connection().transport, 'driver_type', None) != 'amqp':
            raise ImproperlyConfigured('direct reply-to (rpc+direct://) needs a RabbitMQ broker (amqp://)')
        return super()._open_connection()

    def _connect(self, reconnect: bool) -> None:
        connection = self._open_connection()
        channel = connection.channel()
        replies: ReplyChannel = _DirectReplyChannel(channel, self.table, self._on_cancel)
        self._consumer_tag = f'rpcresults-direct-{uuid.uuid4()}'
        replies.consume(DIRECT_REPLY_QUEUE, self._consumer_tag)
        self.channel = channel
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

    def _recover(self, exc: Optional[BaseException]) -> None:
        with self.write_lock:
            self.channel = None
            super()._recover(exc)

    def _consume_again(self, replies: ReplyChannel) -> None:
        replies.consume(DIRECT_REPLY_QUEUE, f'rpcresults-direct-{uuid.uuid4()}')
        self._report_lost('the broker cancelled the direct reply-to consumer')

    def _maybe_heartbeat(self) -> None:
        with self.write_lock:
            super()._maybe_heartbeat()

    def stop(self) -> None:
        with self.write_lock:
            self.channel = None
            super().stop()

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

    def reply_properties(self, task_id: str) -> Dict[str, str]:
        return {'reply_to': DIRECT_REPLY_QUEUE, 'correlation_id': task_id}

    def on_task_call(self, producer: Any, task_id: str) -> None:
        """Nothing to declare; requests must go through :meth:`publish_request`."""
        self.result_consumer.start()

    def publish_request(self, body: Any, routing_key: str, exchange: str = '', **options: Any) -> None:
        """Publish a request on the consuming channel (the only one whose replies reach us)."""
        consumer: DirectResultConsumer = self.result_consumer  # type: ignore[assignment]
        if exchange and exchange not in self._known_exchanges:
            self._check_exchange(exchange)
        consumer.start()
        with consumer.write_lock:
            channel = consumer.channel
            if channel is None:
                consumer.start()
                channel = consumer.channel
            producer = kombu.Producer(channel, auto_declare=False)
            producer.publish(body, routing_key=routing_key, exchange=exchange, retry=False, **options)

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
