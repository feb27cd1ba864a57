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
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional, Set, Tuple

import kombu

from .._meta import error_meta
from ..engine.channel import ReplyChannel
from ..engine.replyqueue import ReplyQueue
from ..engine.publish import DIRECT_REPLY_TO
from ..exceptions import ImproperlyConfigured
from .rpc import ResultConsumer, RPCBackend

if TYPE_CHECKING:  # pragma: no cover
    from ..result import AsyncResult

__all__ = ('DirectReplyBackend', 'DirectResultConsumer', 'DIRECT_REPLY_QUEUE', 'DirectReplyQueue')

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


class DirectReplyQueue(ReplyQueue):
    """The pseudo-queue: nothing to declare, no acks; after a reconnect every pending reply is lost."""

    no_ack = True
    countable = False

    def __init__(self) -> None:
        super().__init__(lambda: kombu.Queue(DIRECT_REPLY_QUEUE))

    @property
    def name(self) -> str:
        """Always ``amq.rabbitmq.reply-to``."""
        return DIRECT_REPLY_QUEUE

    def check(self, connection: kombu.Connection) -> None:
        """Refuse a broker that is not RabbitMQ (only it has the pseudo-queue)."""
        if getattr(connection.transport, 'driver_type', None) != 'amqp':
            raise ImproperlyConfigured('direct reply-to (rpc+direct://) needs a RabbitMQ broker (amqp://)')

    def setup(self, connection: kombu.Connection, channel: Any, reconnect: bool) -> Tuple[Any, Optional[str]]:
        """Nothing to declare; after a reconnect every reply in flight was lost."""
        publish_without_reads(channel.connection)
        return channel, E_LOST if reconnect else None

    def consume_again(self, replies: ReplyChannel, tag: str) -> str:
        """Consume the pseudo-queue again; every reply in flight was lost."""
        replies.consume(DIRECT_REPLY_QUEUE, tag)
        return 'the broker cancelled the direct reply-to consumer'

    def report_lost(self, table: Any, error: Callable[[list], BaseException]) -> list:
        """Fail every pending id for good: unlike a reply queue, nothing can still deliver it."""
        lost = table.fail_pending(error)
        for task_id in lost:  # later waits fail at once too, instead of waiting for nothing
            table.deliver(task_id, error_meta(task_id, error([task_id])))
        return lost  # type: ignore[no-any-return]


class DirectResultConsumer(ResultConsumer):
    """Consumes ``amq.rabbitmq.reply-to`` on one channel that also carries the requests.

    A request is tracked and published under the connection's ``lock`` (so that a
    reconnect fails exactly the ids whose requests went out on the old channel), and
    written under its ``write_lock`` (see the lock order in
    :mod:`rpcresults.engine.connection`).
    """

    def __init__(self, backend: 'DirectReplyBackend', app: Any, accept: Any, table: Any) -> None:
        super().__init__(backend, app, accept, table, DirectReplyQueue())

    def service_idle_connection(self) -> None:
        """Connect if needed; when nobody is reading, handle what arrived and send a heartbeat if due.

        Nothing sends heartbeats while nobody waits, so the broker may have dropped the
        connection; this notices it (EOF, a close, missed heartbeats) and reconnects
        before a new request is tracked and sent, instead of sending into a dead socket.
        """
        self.start()
        if self.connection.needs_service():
            self.read_now()  # does nothing when another thread is reading: it does this itself

    def publish(self, backend: 'DirectReplyBackend', body: Any, routing_key: str, exchange: str,
                result: Optional['AsyncResult'], options: Dict[str, Any]) -> None:
        """Track ``result`` and publish the request on the consuming channel, as one step."""
        connection = self.connection
        with connection.lock:  # no reconnect (which fails pending ids) between tracking and publishing
            self.start()
            channel = connection.channel
            if channel is None:  # pragma: no cover  (start() connects or raises)
                raise ConnectionError('the direct reply-to consumer is not connected')
            if result is not None:
                backend.add_pending_result(result)
            try:
                with connection.write_lock:
                    backend.producer_for(channel).publish(
                        body, routing_key=routing_key, exchange=exchange, retry=False, **options)
                return
            except connection.recoverable() as exc:
                error: BaseException = exc
        self._recover_after_failed_publish(channel, error)
        raise error

    def _recover_after_failed_publish(self, channel: Any, exc: BaseException) -> None:
        """Reconnect now when nobody is reading (a reader notices the dead connection itself)."""
        if not self.election.try_lead():
            return
        connection = self.connection
        try:
            with connection.lock:
                if connection.channel is channel and not connection.closed:
                    connection.recover(exc, None)
        except Exception:  # the caller gets the publish error; the next request tries again
            logger.debug('could not reconnect after a failed request', exc_info=True)
        finally:
            self.election.resign()

    def stats(self) -> Dict[str, int]:
        """The consumer's counters with ``acked`` always 0: direct reply-to consumes with ``no_ack``."""
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
        """Requests carry the pseudo-queue as ``reply_to``; the broker rewrites it per channel."""
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
        """Always ``rpc+direct://``."""
        return 'rpc+direct://'
