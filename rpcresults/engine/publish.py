"""Worker-side publishing: results to the requests' reply queues, with returns and confirms counted.

One :class:`ResultPublisher` per worker-side backend (``mark_as_*``, ``store_result``,
and the :class:`~rpcresults.Responder`'s replies through it). Results go to the
default exchange with the reply queue as routing key, ``mandatory`` by default:
a result the broker cannot route (the client's queue is gone) is returned,
logged and counted (``returned``). With publisher confirms, a result the broker
refuses (a nack) raises :class:`~rpcresults.exceptions.ResultNotDelivered` and is
counted (``nacked``). The publishing connection runs without heartbeats: nothing
reads it between publishes, so the broker would close an idle one.
"""
from __future__ import annotations

import logging
import socket
import threading
from typing import Any, Dict, Mapping, Optional

import kombu
import kombu.exceptions
from amqp.exceptions import MessageNacked

from ..exceptions import ResultNotDelivered
from .channel import detach_after_fork, wait_readable

__all__ = ('ResultPublisher', 'DIRECT_REPLY_TO')

logger = logging.getLogger(__name__)

#: RabbitMQ's direct reply-to pseudo-queue (and the prefix of the names it hands out).
DIRECT_REPLY_TO = 'amq.rabbitmq.reply-to'


class ResultPublisher:
    """Publishes result bodies (already Celery-shaped dicts) to reply queues; thread-safe."""

    def __init__(self, app: Any, *, connection: Any = None, serializer: str = 'json',
                 delivery_mode: int = 1, mandatory: bool = True, confirm: bool = False,
                 confirm_timeout: Optional[float] = None,
                 retry_policy: Optional[Mapping[str, Any]] = None) -> None:
        self.app = app
        self.serializer = serializer
        self.delivery_mode = delivery_mode
        self.mandatory = mandatory
        self.confirm = confirm
        self.confirm_timeout = confirm_timeout
        self.retry_policy = dict(retry_policy or {})
        self.exchange = kombu.Exchange('')  # the default exchange: routing key = queue name
        self._given = connection  # a connection the caller owns (never closed here)
        self._connection: Any = None
        self._producer: Any = None
        self._lock = threading.Lock()
        self.published = 0
        self.returned = 0
        self.nacked = 0
        self.connections = 0
        self._raw: Any = None  # py-amqp's connection under the last publish (kombu may renew it)

    def stats(self) -> Dict[str, int]:
        """Results published, returned as unroutable, nacked by the broker; publishing
        connections opened (``publish_connections``)."""
        return {'published': self.published, 'returned': self.returned, 'nacked': self.nacked,
                'publish_connections': self.connections}

    def publish(self, body: Mapping[str, Any], routing_key: str, correlation_id: str, task_id: str,
                declare: Any = None) -> None:
        """Publish one result; raises :class:`ResultNotDelivered` when the broker nacks it."""
        with self._lock:
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
                    declare=declare, delivery_mode=self.delivery_mode, mandatory=mandatory, **options)
            except (MessageNacked, kombu.exceptions.OperationalError) as exc:
                if not isinstance(exc, MessageNacked) and not isinstance(exc.__cause__, MessageNacked):
                    raise
                self.nacked += 1
                logger.error('the broker refused (nacked) the result of %s for reply queue %s',
                             task_id, routing_key)
                raise ResultNotDelivered(task_id, routing_key, 'the broker nacked it') from None
            self.published += 1
            raw = getattr(self._connection, '_connection', None)
            if raw is not self._raw:
                self._raw = raw
                self.connections += 1
            if mandatory and not self.confirm:
                self._collect_returns(0.0)

    def _new_producer(self) -> Any:
        if self._given is not None:
            connection = self._given
        else:
            options = dict(self.app.conf.broker_transport_options or {})
            if self.confirm:
                options['confirm_publish'] = True
            connection = self.app.connection(transport_options=options, heartbeat=0)
        self._connection = connection
        self._producer = kombu.Producer(connection, exchange=self.exchange, serializer=self.serializer,
                                        auto_declare=False, on_return=self._on_return)
        return self._producer

    def collect_returns(self, timeout: float = 0.0) -> int:
        """Handle returns the broker sent on the publishing connection; wait up to ``timeout`` for one.

        Without confirms nothing else reads that connection, so a return is noticed at
        the next publish (or here); with confirms it arrives before the ack and is
        handled while the publish waits. Returns the ``returned`` counter.
        """
        with self._lock:
            return self._collect_returns(timeout)

    def _collect_returns(self, timeout: float) -> int:
        connection = self._connection
        raw = getattr(connection, '_connection', None)
        sock = getattr(getattr(raw, 'transport', None), 'sock', None)
        if sock is None:
            return self.returned
        wait = timeout
        try:
            while wait_readable(sock, wait):
                raw.drain_events(timeout=0.5)
                wait = 0
        except (socket.timeout, OSError, *connection.connection_errors, *connection.channel_errors):
            logger.debug('reading returns on the publishing connection failed', exc_info=True)
        return self.returned

    def _on_return(self, exc: Exception, exchange: str, routing_key: str, message: Any) -> None:
        """The broker could not route a result (``mandatory``): the client's reply queue is gone."""
        self.returned += 1
        task_id = getattr(message, 'properties', {}).get('correlation_id')
        logger.warning('result of %s was returned by the broker: no reply queue %r (%s); '
                       'the client is gone or its queue expired', task_id, routing_key, exc)

    def close(self) -> None:
        """Close the publishing connection (one given to us is left open)."""
        with self._lock:
            connection, self._connection = self._connection, None
            self._producer = None
        if connection is not None and connection is not self._given:
            connection.release()

    def forget_after_fork(self) -> None:
        """In a forked child: let go of the parent's connections without touching their sockets."""
        detach_after_fork(self._connection)
        detach_after_fork(self._given)  # a connection given to us is the parent's too
        self._connection = None
        self._given = None
        self._producer = None
        self._raw = None
        self._lock = threading.Lock()
