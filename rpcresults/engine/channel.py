"""Reading one consumer's deliveries off a kombu channel into the state table, and acking them.

Two adapters with one interface. On a py-amqp channel over plain TCP we read
the socket ourselves in large chunks (``recv_into`` a reusable buffer), feed
the sans-I/O frame parser, hand our deliveries to the state table in batches
and every other frame to py-amqp's own frame handler, so py-amqp keeps the
connection, heartbeats and channel state; acks are batched with
``multiple=True``. Elsewhere (TLS, kombu's virtual transports such as
``memory://``) the transport reads and we receive one message at a time.

Whatever py-amqp cannot make sense of (a method for a channel we never opened,
a truncated method payload) comes out of :meth:`ReplyChannel.read` as
:class:`FrameError`, so the connection is dropped and recovered instead of the
error reaching a waiter.
"""
from __future__ import annotations

import logging
import os
import select
import socket
import struct
from typing import Any, Callable, List, Optional

import amqp
from amqp import spec
from amqp.transport import TCPTransport

from ..exceptions import FrameError
from ..protocol import MARKER_TYPE, FrameParser

logger = logging.getLogger(__name__)

__all__ = ('ReplyChannel', 'AmqpReplyChannel', 'VirtualReplyChannel', 'ChannelClosedByBroker',
           'reply_channel_for', 'detach_after_fork', 'wait_readable', 'CHUNK_SIZE')

OnCancel = Callable[[str], Any]

#: Size of the reusable receive buffer of the fast path.
CHUNK_SIZE = 256 * 1024
#: How long a poll on py-amqp's own reader waits for the rest of a frame that has started.
PARTIAL_FRAME_WAIT = 0.05
#: A poll marker left in the queue (its client gone) expires after this (milliseconds).
MARKER_TTL = '60000'
#: Method-frame payload prefix of ``channel.close`` (class 20, method 40).
CHANNEL_CLOSE = struct.pack('>HH', 20, 40)


class ChannelClosedByBroker(ConnectionError):
    """The broker closed the reply channel; the consumer recovers with a new connection.

    py-amqp would answer by re-opening the channel with a synchronous read of its own,
    which cannot see bytes our parser already holds, so we never hand it that frame.
    """

    def __init__(self, reply_code: int, reply_text: str) -> None:
        super().__init__(f'the broker closed the reply channel: {reply_code} {reply_text}')
        self.reply_code = reply_code
        self.reply_text = reply_text

    @classmethod
    def from_payload(cls, payload: bytes) -> 'ChannelClosedByBroker':
        """The error for a ``channel.close`` method payload (an unreadable one still closes)."""
        try:
            (code,) = struct.unpack_from('>H', payload, 4)
            length = payload[6]
            text = bytes(payload[7:7 + length]).decode('utf-8', 'replace')
        except (struct.error, IndexError):
            code, text = 0, '(unreadable reason)'
        return cls(code, text)


class ReplyChannel:
    """Consume one queue on one channel into ``table``; ack what it has handed over."""

    #: Consume without acks (direct reply-to, where RabbitMQ refuses them).
    no_ack = False

    def __init__(self, channel: Any, table: Any, on_cancel: OnCancel, no_ack: bool = False) -> None:
        self.channel = channel
        self.table = table
        self.on_cancel = on_cancel
        self.no_ack = no_ack
        self.consumer_tag: Optional[str] = None
        self.unacked = 0
        self.acked = 0

    #: Socket reads by our own chunked reader (the fast path only).
    reads = 0

    @property
    def socket(self) -> Any:
        """The socket replies arrive on, when there is one to poll (None otherwise)."""
        return None

    @property
    def frames_parsed(self) -> int:
        """Frames our parser took apart (the fast path only)."""
        return 0

    def read(self, connection: Any, timeout: Optional[float]) -> bool:
        """Wait up to ``timeout`` for input and dispatch it; False when nothing came."""
        try:
            connection.drain_events(timeout=timeout)
        except socket.timeout:
            return False
        except (OSError, EOFError, FrameError):
            raise
        except Exception as exc:
            if isinstance(exc, tuple(connection.connection_errors) + tuple(connection.channel_errors)):
                raise
            # py-amqp could not dispatch what it read: the stream is not ours to trust any more
            raise FrameError(f'py-amqp could not handle a frame ({type(exc).__name__}: {exc})') from exc
        return True

    def settle(self) -> None:
        """Leave the connection at a frame boundary so py-amqp can read on it (sync calls)."""

    #: Whether :meth:`send_marker` may be called while another thread reads this channel.
    marks_beside_reader = False

    def send_marker(self, queue: str, body: bytes) -> None:
        """Publish a poll marker (see :data:`~rpcresults.protocol.MARKER_TYPE`) to ``queue``,
        behind every reply already in it."""
        raise NotImplementedError

    def consume(self, queue: str, consumer_tag: str) -> None:
        """Start consuming ``queue`` under ``consumer_tag``."""
        raise NotImplementedError

    def flush_acks(self) -> None:
        """Ack every reply handed to the table so far."""
        if self.no_ack:
            self.acked += self.unacked  # the broker forgot them when it sent them
            self.unacked = 0
            return
        self._ack()

    def _ack(self) -> None:
        raise NotImplementedError

    def cancel(self) -> None:
        """Stop consuming (best effort: the connection may already be gone)."""
        tag, self.consumer_tag = self.consumer_tag, None
        if tag is not None:
            self.channel.basic_cancel(tag)

    def _handle(self, correlation_id: Optional[str], content_type: Optional[str],
                content_encoding: Optional[str], body: Any) -> None:
        if isinstance(body, str):
            body = body.encode(content_encoding or 'utf-8')
        try:
            self.table.deliver_body(correlation_id, content_type, content_encoding, body)
        except Exception as exc:  # never acked without its waiter hearing of it
            self.table.dispatch_failed(correlation_id, exc)


class AmqpReplyChannel(ReplyChannel):
    """py-amqp channel: our own chunked reads and frame parser (plain TCP), batched acks."""

    #: Whether deliveries carry their content header too (requests need their properties).
    keep_header = False

    def __init__(self, channel: Any, table: Any, on_cancel: OnCancel, no_ack: bool = False) -> None:
        super().__init__(channel, table, on_cancel, no_ack)
        self._last_tag = 0
        self._connection = channel.connection
        self._transport = self._connection.transport
        self.fast = (isinstance(self._transport, TCPTransport)
                     and not os.environ.get('RPCRESULTS_NO_FAST_READ'))
        self._buffer = bytearray(CHUNK_SIZE)
        self._view = memoryview(self._buffer)
        self._parser: Any = None
        self.reads = 0

    @property
    def socket(self) -> Any:
        """The py-amqp transport's socket (None once closed)."""
        return self._transport.sock

    @property
    def frames_parsed(self) -> int:
        """Frames our parser took apart on this channel."""
        return self._parser.frames_parsed if self._parser is not None else 0

    def consume(self, queue: str, consumer_tag: str) -> None:
        """Consume ``queue`` (settled at a frame boundary first) and follow it with the parser."""
        self.settle()
        self._last_tag = 0
        self.unacked = 0
        self.consumer_tag = self.channel.basic_consume(
            queue=queue, consumer_tag=consumer_tag, no_ack=self.no_ack,
            callback=self._on_message, on_cancel=self.on_cancel)
        if self._parser is None:
            self._parser = FrameParser(self.channel.channel_id, self.consumer_tag,
                                       self._connection.frame_max or 0, keep_header=self.keep_header)
        else:
            self._parser.set_consumer_tag(self.consumer_tag)

    def _on_message(self, message: amqp.Message) -> None:
        """A delivery py-amqp read itself (during one of its synchronous calls)."""
        properties = message.properties
        self._handle(properties.get('correlation_id'), properties.get('content_type'),
                     properties.get('content_encoding'), message.body)
        self._last_tag = message.delivery_info['delivery_tag']
        self.unacked += 1

    def read(self, connection: Any, timeout: Optional[float]) -> bool:
        """One read: our chunked reader on plain TCP, else py-amqp reads; False when nothing came."""
        if not self.fast or self._parser is None:
            if timeout == 0:
                # py-amqp retries EAGAIN forever inside a started frame on a non-blocking socket:
                # look for input first, then read with a short real timeout
                if not self._transport._read_buffer and not wait_readable(self._transport.sock, 0):
                    return False
                timeout = PARTIAL_FRAME_WAIT
            return super().read(connection, timeout)
        transport = self._transport
        pending = transport._read_buffer  # what py-amqp read ahead during a synchronous call
        if pending:
            transport._read_buffer = b''
            data: Any = pending
        else:
            sock = transport.sock
            if sock is None:
                raise ConnectionResetError('the reply connection is closed')
            previous = sock.gettimeout()
            if previous != timeout:
                sock.settimeout(timeout)
            try:
                count = sock.recv_into(self._buffer)
            except (socket.timeout, BlockingIOError, InterruptedError):
                return False
            finally:
                if previous != timeout:
                    sock.settimeout(previous)
            if not count:
                raise ConnectionResetError('the broker closed the reply connection')
            data = self._view[:count]
        self.reads += 1
        self._connection.bytes_recv += 1  # what py-amqp's heartbeat check looks at
        deliveries, others = self._parser.feed(data)
        if deliveries:
            self.table.deliver_many(deliveries)
            self._last_tag = deliveries[-1][0]
            self.unacked += len(deliveries)
        if others:
            self._hand_to_py_amqp(others)
        return True

    def _hand_to_py_amqp(self, frames: List[Any]) -> None:
        on_frame = self._connection.on_inbound_frame
        for frame in frames:
            if frame[0] == 1 and frame[2][:4] == CHANNEL_CLOSE:  # see ChannelClosedByBroker
                raise ChannelClosedByBroker.from_payload(frame[2])
            try:
                on_frame(frame)
            except (OSError, EOFError):
                raise
            except Exception as exc:
                if isinstance(exc, tuple(self._connection.connection_errors)
                              + tuple(self._connection.channel_errors)):
                    raise
                raise FrameError(f'py-amqp could not handle a frame on channel {frame[1]} '
                                 f'({type(exc).__name__}: {exc})') from exc

    def settle(self) -> None:
        """Read on to the end of a message that has started, then hand py-amqp the rest."""
        parser = self._parser
        if parser is None or not self.fast:
            return
        while parser.mid_message:
            if not self.read(self._connection, 10.0):
                raise ConnectionResetError('a message stopped half way through')
        remainder = parser.take_remainder()
        if remainder:
            self._transport._read_buffer = remainder + self._transport._read_buffer

    def cancel(self) -> None:
        """Stop consuming, from a frame boundary."""
        self.settle()
        super().cancel()

    #: py-amqp writes from any thread (under the connection's write lock) beside a reader.
    marks_beside_reader = True

    def send_marker(self, queue: str, body: bytes) -> None:
        """Publish the marker through the default exchange on this channel.

        Through ``send_method``, a pure write: py-amqp's ``basic_publish`` first reads the
        socket (to see a ``connection.blocked``), which must never happen beside the reader.
        """
        message = amqp.Message(body, content_type=MARKER_TYPE, expiration=MARKER_TTL)
        self.channel.send_method(spec.Basic.Publish, 'Bssbb', (0, '', queue, False, False), message)

    def _ack(self) -> None:
        if self.unacked:
            self.channel.basic_ack(self._last_tag, multiple=True)
            self.acked += self.unacked
            self.unacked = 0


class VirtualReplyChannel(ReplyChannel):
    """kombu virtual channel (``memory://``, Redis transport, ...): acks one tag at a time."""

    def __init__(self, channel: Any, table: Any, on_cancel: OnCancel, no_ack: bool = False) -> None:
        super().__init__(channel, table, on_cancel, no_ack)
        self._tags: List[Any] = []

    def consume(self, queue: str, consumer_tag: str) -> None:
        """Consume ``queue`` through kombu's virtual channel."""
        self._tags = []
        self.unacked = 0
        self.channel.basic_consume(queue, no_ack=self.no_ack, callback=self._on_message,
                                   consumer_tag=consumer_tag)
        self.consumer_tag = consumer_tag

    def send_marker(self, queue: str, body: bytes) -> None:
        """Publish the marker through kombu's virtual channel (read by the same thread only)."""
        message = self.channel.prepare_message(body, content_type=MARKER_TYPE,
                                               properties={'expiration': MARKER_TTL})
        self.channel.basic_publish(message, exchange='', routing_key=queue)

    def _on_message(self, message: Any) -> None:
        self._handle(message.properties.get('correlation_id'), message.content_type,
                     message.content_encoding, message.body)
        self._tags.append(message.delivery_tag)
        self.unacked += 1

    def _ack(self) -> None:
        tags, self._tags = self._tags, []
        for tag in tags:
            self.channel.basic_ack(tag)
        self.acked += len(tags)
        self.unacked = 0


def wait_readable(sock: Any, timeout: float) -> bool:
    """Whether ``sock`` has input within ``timeout`` seconds (a closed socket counts as readable).

    poll() where there is one (descriptors above 1024 are common in workers); eventlet's
    green ``select`` module has no poll(), so there it is select().
    """
    if sock is None:
        return True  # let the read raise on the closed connection
    poll = getattr(select, 'poll', None)
    if poll is None:
        return bool(select.select([sock], [], [], timeout)[0])
    poller = poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(timeout * 1000))


def reply_channel_for(channel: Any, table: Any, on_cancel: OnCancel, no_ack: bool = False) -> ReplyChannel:
    """The adapter that fits ``channel``."""
    if isinstance(channel, amqp.Channel):
        return AmqpReplyChannel(channel, table, on_cancel, no_ack)
    return VirtualReplyChannel(channel, table, on_cancel, no_ack)


def detach_after_fork(connection: Any) -> None:
    """Let go of a connection inherited from the parent without touching the parent's socket.

    Closing normally would send ``connection.close`` or ``shutdown()`` the socket the
    parent still uses; closing only our copy of the file descriptor leaves it alone.
    """
    if connection is None:
        return
    transport = getattr(getattr(connection, '_connection', None), 'transport', None)
    sock = getattr(transport, 'sock', None)
    if sock is not None:
        try:
            os.close(sock.detach())
        except OSError:
            pass
    try:
        connection._connection = None
        connection._default_channel = None
    except AttributeError:
        pass
