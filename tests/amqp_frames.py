"""Real AMQP 0-9-1 frames for the frame-parser tests, made and read by py-amqp itself.

Writing: py-amqp's own ``method_framing.frame_writer`` writes into a fake transport
that collects the bytes, with method arguments encoded by ``amqp.serialization.dumps``
and content by ``amqp.basic_message.Message`` (so bodies are split at ``frame_max``
exactly as py-amqp splits them when it publishes). Reading back: py-amqp's own
``method_framing.frame_handler`` with a recording callback, to check that what the
parser extracts (or passes through) is what py-amqp itself would have seen.

Hand-made malformed frames use :func:`raw_frame` and :func:`header_payload` (the
content-header layout ``>HHQ`` class/weight/body size followed by the properties
py-amqp serializes).
"""
from __future__ import annotations

from struct import pack, unpack_from
from typing import Any, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

from amqp import spec
from amqp.basic_message import Message
from amqp.method_framing import frame_handler, frame_writer
from amqp.serialization import dumps, loads

__all__ = (
    'FRAME_END', 'Frame', 'Delivery', 'Writer', 'raw_frame', 'header_payload', 'split_frames',
    'join_frames', 'method_args', 'AmqpEvent', 'read_with_py_amqp', 'chunked',
    'DELIVER', 'RETURN', 'GET_OK', 'CONSUME_OK', 'CANCEL', 'CANCEL_OK', 'CHANNEL_CLOSE',
    'CHANNEL_FLOW', 'QOS_OK', 'ACK',
)

FRAME_END = 0xCE

Frame = Tuple[int, int, bytes]
Delivery = Tuple[int, Optional[str], Optional[str], Optional[str], bytes]

#: (method signature, py-amqp argument format) of the methods the tests send.
DELIVER = (spec.Basic.Deliver, 'sLbss')      # consumer_tag, delivery_tag, redelivered, exchange, rk
RETURN = (spec.Basic.Return, 'Bsss')         # reply_code, reply_text, exchange, routing_key
GET_OK = (spec.Basic.GetOk, 'Lbssl')         # delivery_tag, redelivered, exchange, rk, message_count
CONSUME_OK = (spec.Basic.ConsumeOk, 's')     # consumer_tag
CANCEL = (spec.Basic.Cancel, 'sb')           # consumer_tag, nowait
CANCEL_OK = (spec.Basic.CancelOk, 's')       # consumer_tag
CHANNEL_CLOSE = (spec.Channel.Close, 'BsBB')  # reply_code, reply_text, class_id, method_id
CHANNEL_FLOW = (spec.Channel.Flow, 'b')      # active
QOS_OK = (spec.Basic.QosOk, '')
ACK = (spec.Basic.Ack, 'Lb')                 # delivery_tag, multiple (publisher confirms)


class _CollectingTransport:
    """Stands in for py-amqp's transport: ``write`` keeps a copy of every write."""

    def __init__(self) -> None:
        self.writes: List[bytes] = []

    def write(self, data: Any) -> None:
        self.writes.append(bytes(data))  # frame_writer reuses its buffer: copy now


class _FakeConnection:
    """What ``frame_writer`` / ``frame_handler`` touch on a connection."""

    def __init__(self, frame_max: int) -> None:
        self.frame_max = frame_max
        self.bytes_sent = 0
        self.bytes_recv = 0


class Writer:
    """Frames written by py-amqp's ``frame_writer`` for one connection's ``frame_max``."""

    def __init__(self, frame_max: int = 131072) -> None:
        self.frame_max = frame_max
        self._connection = _FakeConnection(frame_max)
        self._transport = _CollectingTransport()
        self._write = frame_writer(self._connection, self._transport)

    def _frames(self, frame_type: int, channel: int, method_sig: Any, args: Any,
                content: Optional[Message]) -> bytes:
        start = len(self._transport.writes)
        self._write(frame_type, channel, method_sig, args, content)
        return b''.join(self._transport.writes[start:])

    def method(self, channel: int, method: Tuple[Tuple[int, int], str], *args: Any,
               body: Optional[bytes] = None, **properties: Any) -> bytes:
        """A method frame (plus content header and body frames when ``body`` is given)."""
        sig, fmt = method
        content = None if body is None else Message(body, **properties)
        return self._frames(1, channel, sig, dumps(fmt, args), content)

    def deliver(self, channel: int, consumer_tag: str, delivery_tag: int, body: bytes,
                redelivered: bool = False, exchange: str = '', routing_key: str = 'reply-queue',
                **properties: Any) -> bytes:
        """``basic.deliver`` + content header + body frame(s), as the broker sends them."""
        return self.method(channel, DELIVER, consumer_tag, delivery_tag, redelivered, exchange,
                           routing_key, body=body, **properties)

    def basic_return(self, channel: int, body: bytes, reply_code: int = 312,
                     reply_text: str = 'NO_ROUTE', exchange: str = '', routing_key: str = 'nowhere',
                     **properties: Any) -> bytes:
        return self.method(channel, RETURN, reply_code, reply_text, exchange, routing_key,
                           body=body, **properties)

    def get_ok(self, channel: int, delivery_tag: int, body: bytes, redelivered: bool = False,
               exchange: str = '', routing_key: str = 'q', message_count: int = 0,
               **properties: Any) -> bytes:
        return self.method(channel, GET_OK, delivery_tag, redelivered, exchange, routing_key,
                           message_count, body=body, **properties)

    def heartbeat(self, channel: int = 0) -> bytes:
        """A heartbeat frame, written as py-amqp's ``send_heartbeat`` writes it."""
        return self._frames(8, channel, None, None, None)


def raw_frame(frame_type: int, channel: int, payload: bytes, end: int = FRAME_END,
              size: Optional[int] = None) -> bytes:
    """One frame by hand (for malformed input): ``size`` overrides the announced payload size."""
    return pack('>BHI', frame_type, channel, len(payload) if size is None else size) + payload + bytes([end])


def header_payload(body_size: int, class_id: int = 60, weight: int = 0, **properties: Any) -> bytes:
    """A content-header payload: ``>HHQ`` class/weight/body size, then py-amqp's serialized properties."""
    return pack('>HHQ', class_id, weight, body_size) + Message(**properties)._serialize_properties()


def method_args(method: Tuple[Tuple[int, int], str], *args: Any) -> bytes:
    """A method frame payload: class and method id, then the arguments as py-amqp encodes them."""
    (class_id, method_id), fmt = method
    return pack('>HH', class_id, method_id) + dumps(fmt, args)


def split_frames(data: bytes) -> List[Frame]:
    """Whole, well-formed frames of ``data`` as ``(type, channel, payload)`` (reference splitter)."""
    frames: List[Frame] = []
    pos = 0
    while pos < len(data):
        frame_type, channel, size = unpack_from('>BHI', data, pos)
        payload = data[pos + 7:pos + 7 + size]
        assert len(payload) == size and data[pos + 7 + size] == FRAME_END, 'not a well-formed stream'
        frames.append((frame_type, channel, bytes(payload)))
        pos += 8 + size
    return frames


def join_frames(frames: Iterable[Frame]) -> bytes:
    return b''.join(raw_frame(frame_type, channel, payload) for frame_type, channel, payload in frames)


def chunked(data: bytes, cuts: Sequence[int]) -> List[bytes]:
    """``data`` split at the (sorted, deduplicated, in-range) offsets ``cuts``."""
    points = sorted({cut for cut in cuts if 0 < cut < len(data)})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


class AmqpEvent(NamedTuple):
    """What py-amqp's frame handler hands to ``Connection.on_inbound_method``."""

    channel: int
    method_sig: Tuple[int, int]
    args: Tuple[Any, ...]
    properties: Optional[Dict[str, Any]]
    body: Optional[bytes]


_ARG_FORMATS = {sig: fmt for sig, fmt in (DELIVER, RETURN, GET_OK, CONSUME_OK, CANCEL, CANCEL_OK,
                                          CHANNEL_CLOSE, CHANNEL_FLOW, QOS_OK, ACK)}


def read_with_py_amqp(frames: Iterable[Frame], frame_max: int = 131072) -> Tuple[List[AmqpEvent], int]:
    """Run ``frames`` through py-amqp's own ``frame_handler``: ``(methods seen, frames handled)``.

    Method arguments are decoded with py-amqp's ``loads`` using the argument format py-amqp
    declares for that method; a bodyless message's body (py-amqp leaves ``''``) becomes ``b''``.
    """
    events: List[AmqpEvent] = []

    def callback(channel: int, method_sig: Tuple[int, int], buf: Any, content: Any) -> None:
        fmt = _ARG_FORMATS.get(tuple(method_sig))
        args = tuple(loads(fmt, buf, 4)[0]) if fmt else (bytes(buf[4:]),)
        properties = body = None
        if content is not None:
            properties = dict(content.properties)
            body = content.body
            if isinstance(body, str):
                body = body.encode()
            body = bytes(body)
        events.append(AmqpEvent(channel, tuple(method_sig), args, properties, body))

    connection = _FakeConnection(frame_max)
    on_frame = frame_handler(connection, callback)
    for frame in frames:
        on_frame(frame)
    return events, connection.bytes_recv
