"""Worker-side publishing: results to the requests' reply queues, with returns and confirms counted.

One :class:`ResultPublisher` per worker-side backend (``mark_as_*``, ``store_result``,
and the :class:`~rpcresults.Responder`'s replies through it). Results go to the
default exchange with the reply queue as routing key, ``mandatory`` by default:
a result the broker cannot route (the client's queue is gone) is returned,
logged and counted (``returned``). With publisher confirms, a result the broker
refuses (a nack) is counted (``nacked``) and logged, and a publish that waits for
its confirm raises :class:`~rpcresults.exceptions.ResultNotDelivered`.

Over py-amqp the frames are built by the sans-I/O frame writer (the compiled
twin when built) and written straight to the connection's transport; publishes
made with ``flush=False`` gather in the writer and go out in one write at
:meth:`ResultPublisher.flush`. Confirms are pipelined: nothing waits for the
broker unless the publish asks to (``wait``) or :meth:`ResultPublisher.wait_confirms`
is called; py-amqp reads the acks, nacks and returns when there is input. On
kombu's virtual transports, kombu's Producer publishes. The publishing connection
runs without heartbeats: nothing reads it between publishes, so the broker would
close an idle one.
"""
from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional

import amqp
import kombu
import kombu.exceptions
from amqp.exceptions import MessageNacked
from amqp.serialization import dumps
from kombu import serialization

from ..exceptions import ResultNotDelivered
from ..protocol import FrameWriter
from .channel import detach_after_fork, wait_readable

__all__ = ('ResultPublisher', 'PublishLink', 'encode_headers', 'with_retries', 'CONNECTION_LOST', 'DIRECT_REPLY_TO')

logger = logging.getLogger(__name__)

#: RabbitMQ's direct reply-to pseudo-queue (and the prefix of the names it hands out).
DIRECT_REPLY_TO = 'amq.rabbitmq.reply-to'
#: An empty headers table, as the frame writer takes it.
EMPTY_TABLE = b''
#: Written at once past this many bytes even when the caller gathers (``flush=False``).
FLUSH_AT = 256 * 1024
#: How long a publish waits for its confirm when ``confirm_timeout`` is not set (seconds).
CONFIRM_TIMEOUT = 10.0
#: How often (seconds) publishing looks for returns without confirms (``collect_returns`` looks at once).
RETURNS_EVERY = 0.01


class PublishLink:
    """One py-amqp channel we write publishes to ourselves; py-amqp reads what comes back.

    ``connection`` is a kombu connection over py-amqp (it connects here). Messages are
    built by the frame writer and go out at :meth:`send`; the properties are the ones
    kombu's Producer sends for the same publish.
    """

    def __init__(self, connection: Any, confirm: bool = False, on_return: Any = None,
                 on_ack: Any = None, on_nack: Any = None) -> None:
        self.connection = connection
        raw = connection.connection
        self.raw = raw
        self.channel = raw.channel()  # kombu's py-amqp channel: kombu entities bind to it
        if on_return is not None:
            self.channel.events['basic_return'].add(on_return)
        if confirm:
            self.channel.events['basic_ack'].add(on_ack)
            self.channel.events['basic_nack'].add(on_nack)
            self.channel.confirm_select()
        self.writer = FrameWriter(self.channel.channel_id, raw.frame_max or 0)
        self.sequence = 0  # the delivery tag the broker gives the last publish (confirm mode)

    @staticmethod
    def usable(connection: Any) -> bool:
        """Whether ``connection`` runs over py-amqp (else kombu's Producer publishes); connects."""
        return isinstance(connection.connection, amqp.Connection)

    def add(self, exchange: str, routing_key: str, body: Any, *, serializer: str,
            headers: Optional[Mapping[str, Any]] = None, delivery_mode: Optional[int] = None,
            priority: Optional[int] = None, mandatory: bool = False, **properties: Any) -> None:
        """Encode ``body`` with ``serializer`` and add the message to the writer, with the properties
        kombu's ``Producer.publish`` would give it (``delivery_mode`` 2 and ``priority`` 0 by default)."""
        content_type, content_encoding, data = serialization.dumps(body, serializer)
        if isinstance(data, str):
            data = data.encode(content_encoding or 'utf-8')
        expiration = properties.get('expiration')
        self.writer.publish(exchange, routing_key, data, mandatory, content_type, content_encoding,
                            encode_headers(headers), delivery_mode or 2, priority or 0,
                            properties.get('correlation_id'), properties.get('reply_to'),
                            None if expiration is None else str(int(expiration * 1000)))

    def check(self) -> None:
        """Before a write: let py-amqp read what the broker sent, if anything. A connection the
        broker closed raises here, so the publish goes to a new one instead of into a dead socket
        (a write to it would succeed, silently)."""
        if wait_readable(self.raw.transport.sock, 0):
            self.read_ready(0)

    def send(self) -> None:
        """Write what the writer holds, in one write (after :meth:`check`). What the write raises,
        the writer still holds nothing of: the caller reports those messages as lost."""
        if not self.writer.pending:
            return
        try:
            self.check()
        except BaseException:
            self.writer.take()
            raise
        self.raw.transport.write(self.writer.take())

    def read_ready(self, timeout: float) -> None:
        """Let py-amqp handle what the broker sent (acks, nacks, returns), waiting up to ``timeout``."""
        sock = self.raw.transport.sock
        wait = timeout
        while wait_readable(sock, wait):
            self.raw.drain_events(timeout=max(wait, 0.5))
            wait = 0

    def drop(self) -> None:
        """Drop the connection without a handshake (it failed)."""
        try:
            self.connection.collect()
        except Exception:
            logger.debug('error while dropping a publishing connection', exc_info=True)


def encode_headers(headers: Optional[Mapping[str, Any]]) -> bytes:
    """A headers table as the frame writer takes it (py-amqp's encoding, without the length)."""
    if not headers:
        return EMPTY_TABLE
    return bytes(dumps('F', [headers]))[4:]


#: What a lost publishing connection raises (the publish is then retried on a new one).
CONNECTION_LOST = (OSError, EOFError, amqp.exceptions.ConnectionError, amqp.exceptions.ChannelError,
                   kombu.exceptions.OperationalError)


def with_retries(action: Callable[[], Any], drop: Callable[[], Any], retry_policy: Mapping[str, Any],
                 what: str) -> Any:
    """``action()``; after a lost connection ``drop()`` and again, within ``retry_policy``
    (kombu's keys: ``max_retries``, ``interval_start``, ``interval_step``, ``interval_max``)."""
    retries = int(retry_policy.get('max_retries', 3) or 0)
    attempt = 0
    while True:
        try:
            return action()
        except CONNECTION_LOST as exc:
            drop()
            attempt += 1
            if attempt > retries:
                raise
            pause = min(float(retry_policy.get('interval_start', 0) or 0)
                        + float(retry_policy.get('interval_step', 1) or 0) * (attempt - 1),
                        float(retry_policy.get('interval_max', 1) or 1))
            logger.warning('%s: connection lost (%r); retry %d of %d in %.1f s', what, exc, attempt, retries, pause)
            time.sleep(pause)


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
        self._producer: Any = None  # kombu's, on virtual transports
        self._link: Optional[PublishLink] = None
        self._lock = threading.RLock()
        self._unconfirmed: Dict[int, tuple] = {}  # delivery tag -> (task id, reply queue)
        self._refused: List[tuple] = []  # nacked since the last publish that waited
        self._returns_due = 0.0
        self._gather = 0  # > 0 inside gathering()
        self._unsent: List[tuple] = []  # gathered in the writer, not yet written (without confirms)
        self.published = 0
        self.returned = 0
        self.nacked = 0
        self.connections = 0
        self._raw: Any = None  # py-amqp's connection under the last publish (it may be renewed)

    def stats(self) -> Dict[str, int]:
        """Results published, returned as unroutable, nacked by the broker; publishing
        connections opened (``publish_connections``); ``unconfirmed``: awaiting the broker's confirm."""
        return {'published': self.published, 'returned': self.returned, 'nacked': self.nacked,
                'publish_connections': self.connections, 'unconfirmed': len(self._unconfirmed)}

    # -- publishing --------------------------------------------------------------------------
    def publish(self, body: Mapping[str, Any], routing_key: str, correlation_id: str, task_id: str,
                declare: Any = None, flush: bool = True, wait: Optional[bool] = None) -> None:
        """Publish one result.

        ``flush=False`` keeps it in the writer until :meth:`flush` (or a later publish that
        flushes): many results then go out in one write. ``wait`` (default: with confirms
        on) waits for the broker's confirm and raises :class:`ResultNotDelivered` on a nack.
        """
        content_type, content_encoding, data = serialization.dumps(body, self.serializer)
        if isinstance(data, str):
            data = data.encode(content_encoding or 'utf-8')
        # RabbitMQ returns direct reply-to publishes as unroutable even when it delivers them
        mandatory = self.mandatory and not routing_key.startswith(DIRECT_REPLY_TO)
        wait = self.confirm if wait is None else (wait and self.confirm)
        if self._gather:
            flush = wait = False
        with self._lock:
            if declare:
                self.flush()
                self._publish_with_kombu(body, routing_key, correlation_id, task_id, declare, mandatory)
                return
            with_retries(lambda: self._write(self._current_link(), data, content_type, content_encoding,
                                             routing_key, correlation_id, task_id, mandatory, flush or wait),
                         self._drop_link, self.retry_policy, 'publishing a result')
            if wait:
                self._wait_for(task_id, routing_key)
            elif mandatory and flush and not self.confirm:
                self._returns_soon()

    def _write(self, link: Optional[PublishLink], data: bytes, content_type: str, content_encoding: str,
               routing_key: str, correlation_id: str, task_id: str, mandatory: bool, flush: bool) -> None:
        if link is None:  # a virtual transport
            self._publish_with_kombu_data(data, content_type, content_encoding, routing_key,
                                          correlation_id, task_id, mandatory)
            return
        if self._refused:  # a retry of a publish a lost connection had not confirmed: it is this one now
            self._refused = [refused for refused in self._refused if refused[0] != task_id]
        link.writer.publish('', routing_key, data, mandatory, content_type, content_encoding, EMPTY_TABLE,
                            self.delivery_mode, 0, correlation_id)
        if self.confirm:
            link.sequence += 1
            self._unconfirmed[link.sequence] = (task_id, routing_key)
        if flush or link.writer.pending >= FLUSH_AT:
            link.send()
            self._unsent.clear()
        elif not self.confirm:  # (with confirms, _unconfirmed says the same)
            self._unsent.append((task_id, routing_key))
        self.published += 1

    @contextlib.contextmanager
    def gathering(self) -> Iterator[List[tuple]]:
        """Results published in the block go out together, in one write, when it ends; with
        confirms, the block then waits for them all at once (pipelined) and the list it gave
        is filled with the ``(task_id, reply_queue)`` pairs the broker refused or did not
        confirm in time, and (with or without confirms) those lost with their connection before they
        were written. For one thread at a time (a responder's own publisher)."""
        refused: List[tuple] = []
        self._gather += 1
        try:
            yield refused
        finally:
            self._gather -= 1
        if not self._gather:
            with self._lock:
                try:
                    if self.confirm:
                        refused.extend(self.wait_confirms())
                        refused.extend(self._unconfirmed.values())  # not confirmed in time
                    else:
                        self.flush()
                except CONNECTION_LOST as exc:  # what it held is reported below, not raised
                    logger.warning('the publishing connection was lost while writing gathered results: %r', exc)
                refused.extend(self._refused)  # gathered, then lost with their connection
                self._refused = []

    def flush(self) -> None:
        """Write every result gathered with ``flush=False`` (nothing waits for the broker)."""
        with self._lock:
            link = self._link
            if link is not None and link.writer.pending:
                try:
                    link.send()
                except Exception:
                    self._drop_link()
                    raise
                self._unsent.clear()
                if self.mandatory and not self.confirm:
                    self._returns_soon()

    def _returns_soon(self) -> None:
        """Look for returns now and then: not a system call per publish, but often enough that the
        count stays current and the broker never waits on a full socket buffer."""
        now = time.monotonic()
        if now >= self._returns_due:
            self._returns_due = now + RETURNS_EVERY
            self._collect_returns(0.0)

    def wait_confirms(self, timeout: Optional[float] = None) -> List[tuple]:
        """Flush, then wait up to ``timeout`` (default ``confirm_timeout``) for the broker to confirm
        every result published so far: the ``(task_id, reply_queue)`` pairs it refused meanwhile."""
        with self._lock:
            self.flush()
            deadline = time.monotonic() + ((self.confirm_timeout or CONFIRM_TIMEOUT) if timeout is None
                                           else timeout or 0)
            link = self._link
            while link is not None and self._unconfirmed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                link.read_ready(remaining)
            refused, self._refused = self._refused, []
            return refused

    def _wait_for(self, task_id: str, routing_key: str) -> None:
        """Wait for the confirm of the publish just made (its tag is the link's last)."""
        link = self._link
        if link is None:  # kombu's virtual transports have no publisher confirms
            return
        tag = link.sequence
        deadline = time.monotonic() + (self.confirm_timeout or CONFIRM_TIMEOUT)
        while tag in self._unconfirmed:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ResultNotDelivered(task_id, routing_key, 'no confirm from the broker in time')
            link.read_ready(remaining)
        if any(refused[0] == task_id for refused in self._refused):
            self._refused = [refused for refused in self._refused if refused[0] != task_id]
            raise ResultNotDelivered(task_id, routing_key, 'the broker nacked it')

    def _on_ack(self, tag: int, multiple: bool) -> None:
        self._settle(tag, multiple, None)

    def _on_nack(self, tag: int, multiple: bool) -> None:
        self._settle(tag, multiple, 'nacked')

    def _settle(self, tag: int, multiple: bool, refusal: Optional[str]) -> None:
        tags = [t for t in self._unconfirmed if t <= tag] if multiple else [tag]
        for each in tags:
            entry = self._unconfirmed.pop(each, None)
            if entry is not None and refusal is not None:
                self.nacked += 1
                self._refused.append(entry)
                logger.error('the broker refused (nacked) the result of %s for reply queue %s', *entry)

    # -- the connection ----------------------------------------------------------------------
    def _current_link(self) -> Optional[PublishLink]:
        if self._link is not None or self._producer is not None:
            return self._link
        connection = self._open()
        if not PublishLink.usable(connection):
            self._producer = kombu.Producer(connection, exchange=self.exchange, serializer=self.serializer,
                                            auto_declare=False, on_return=self._on_return)
            return None
        self._link = PublishLink(connection, self.confirm, self._on_return, self._on_ack, self._on_nack)
        if self._link.raw is not self._raw:
            self._raw = self._link.raw
            self.connections += 1
        return self._link

    def _open(self) -> Any:
        if self._connection is None:
            if self._given is not None:
                self._connection = self._given
            else:
                options = dict(self.app.conf.broker_transport_options or {})
                self._connection = self.app.connection(transport_options=options, heartbeat=0)
        return self._connection

    def _drop_link(self) -> None:
        """Forget a link that failed: what it had not confirmed is reported as undelivered."""
        link, self._link = self._link, None
        self._producer = None
        for task_id, routing_key in self._unconfirmed.values():
            logger.error('the result of %s for reply queue %s was not confirmed before its '
                         'connection was lost', task_id, routing_key)
            self._refused.append((task_id, routing_key))
        self._unconfirmed.clear()
        for task_id, routing_key in self._unsent:
            logger.error('the result of %s for reply queue %s was gathered but not written before its '
                         'connection was lost', task_id, routing_key)
            self._refused.append((task_id, routing_key))
        self._unsent = []
        if link is not None:
            link.drop()
            if link.connection is not self._given:
                self._connection = None

    # -- kombu (virtual transports, and publishes that declare) -------------------------------
    def _publish_with_kombu(self, body: Mapping[str, Any], routing_key: str, correlation_id: str,
                            task_id: str, declare: Any, mandatory: bool) -> None:
        producer = kombu.Producer(self._open(), exchange=self.exchange, serializer=self.serializer,
                                  auto_declare=False, on_return=self._on_return)
        options: Dict[str, Any] = {}
        if self.confirm:
            options['confirm_timeout'] = self.confirm_timeout
        try:
            producer.publish(body, exchange=self.exchange, routing_key=routing_key, correlation_id=correlation_id,
                             serializer=self.serializer, retry=True, retry_policy=self.retry_policy,
                             declare=declare, delivery_mode=self.delivery_mode, mandatory=mandatory, **options)
        except (MessageNacked, kombu.exceptions.OperationalError) as exc:
            if not isinstance(exc, MessageNacked) and not isinstance(exc.__cause__, MessageNacked):
                raise
            self.nacked += 1
            logger.error('the broker refused (nacked) the result of %s for reply queue %s', task_id, routing_key)
            raise ResultNotDelivered(task_id, routing_key, 'the broker nacked it') from None
        self.published += 1

    def _publish_with_kombu_data(self, data: bytes, content_type: str, content_encoding: str,
                                 routing_key: str, correlation_id: str, task_id: str, mandatory: bool) -> None:
        self._producer.publish(data, exchange=self.exchange, routing_key=routing_key,
                               correlation_id=correlation_id, content_type=content_type,
                               content_encoding=content_encoding, delivery_mode=self.delivery_mode,
                               mandatory=mandatory)
        self.published += 1

    # -- returns -----------------------------------------------------------------------------
    def collect_returns(self, timeout: float = 0.0) -> int:
        """Handle returns the broker sent on the publishing connection; wait up to ``timeout`` for one.

        Without confirms nothing else reads that connection, so a return is noticed at
        the next publish (or here); with confirms it arrives before the ack and is
        handled while a publish waits. Returns the ``returned`` counter.
        """
        with self._lock:
            self.flush()
            return self._collect_returns(timeout)

    def _collect_returns(self, timeout: float) -> int:
        link = self._link
        if link is None:
            return self.returned
        try:
            link.read_ready(timeout)
        except (socket.timeout, OSError, amqp.exceptions.AMQPError):
            logger.debug('reading returns on the publishing connection failed', exc_info=True)
        return self.returned

    def _on_return(self, exc: Exception, exchange: str, routing_key: str, message: Any) -> None:
        """The broker could not route a result (``mandatory``): the client's reply queue is gone."""
        self.returned += 1
        task_id = getattr(message, 'properties', {}).get('correlation_id')
        logger.warning('result of %s was returned by the broker: no reply queue %r (%s); '
                       'the client is gone or its queue expired', task_id, routing_key, exc)

    # -- closing -----------------------------------------------------------------------------
    def close(self) -> None:
        """Write what was gathered, then close the publishing connection (one given to us stays open)."""
        with self._lock:
            try:
                self.flush()
            except Exception:
                logger.debug('could not write the last results before closing', exc_info=True)
            link, self._link = self._link, None
            connection, self._connection = self._connection, None
            self._producer = None
        if link is not None and link.connection is self._given:
            try:
                link.channel.close()
            except Exception:
                logger.debug('error while closing the publishing channel', exc_info=True)
        if connection is not None and connection is not self._given:
            connection.release()

    def forget_after_fork(self) -> None:
        """In a forked child: let go of the parent's connections without touching their sockets."""
        detach_after_fork(self._connection)
        detach_after_fork(self._given)  # a connection given to us is the parent's too
        self._connection = None
        self._given = None
        self._producer = None
        self._link = None
        self._raw = None
        self._unconfirmed = {}
        self._refused = []
        self._unsent = []
        self._lock = threading.RLock()
