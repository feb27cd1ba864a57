"""Sans-I/O AMQP 0-9-1 frame writer for publishing: messages in, bytes out.

:meth:`FrameWriter.publish` appends one ``basic.publish`` method frame, its content
header (the basic properties a result or a request carries) and its body frames
(split at ``frame_max``) to a buffer; :meth:`FrameWriter.take` hands everything
written so far to the caller, who sends it in one write. The bytes are the ones
py-amqp writes for the same message and properties, so what reaches the broker is
Celery's (the wire tests check it). The caller encodes a non-empty headers table
(``headers``) itself; ``None`` leaves the headers out, ``b''`` writes an empty table.

This file is both twins: run as it is, it is the pure-Python writer; compiled by
Cython as ``rpcresults.protocol._writer_c``, with the C types declared in
``_writer_c.pxd``, it is the compiled one.
"""
from __future__ import annotations

from typing import Optional

__all__ = ('FrameWriter', 'EMPTY_TABLE')

#: An empty field table, as ``headers``: what Celery's results carry (``application_headers={}``).
EMPTY_TABLE = b''

_FRAME_METHOD = 1
_FRAME_HEADER = 2
_FRAME_BODY = 3
_END = 0xCE
_FRAME_OVERHEAD = 8
#: ``basic.publish`` (class 60, method 40) and the basic class id of its content header.
_PUBLISH = b'\x00\x3c\x00\x28'
_BASIC = b'\x00\x3c\x00\x00'

_F_CONTENT_TYPE = 0x8000
_F_CONTENT_ENCODING = 0x4000
_F_HEADERS = 0x2000
_F_DELIVERY_MODE = 0x1000
_F_PRIORITY = 0x0800
_F_CORRELATION_ID = 0x0400
_F_REPLY_TO = 0x0200
_F_EXPIRATION = 0x0100
_F_MESSAGE_ID = 0x0080


def _u16(out: bytearray, value: int) -> None:
    out.append((value >> 8) & 0xFF)
    out.append(value & 0xFF)


def _u32(out: bytearray, value: int) -> None:
    out.append((value >> 24) & 0xFF)
    out.append((value >> 16) & 0xFF)
    out.append((value >> 8) & 0xFF)
    out.append(value & 0xFF)


def _shortstr(out: bytearray, text: str) -> None:
    if not isinstance(text, str):
        raise TypeError(f'AMQP short string must be a str, not {type(text).__name__}')
    data = text.encode('utf-8', 'surrogatepass')
    if len(data) > 255:
        raise ValueError(f'AMQP short string longer than 255 bytes: {text[:40]!r}...')
    out.append(len(data))
    out += data


class FrameWriter:
    """Frames for one channel, gathered in a buffer until :meth:`take`."""

    def __init__(self, channel: int, frame_max: int = 131072) -> None:
        if frame_max and frame_max < 4096:
            raise ValueError(f'frame_max must be 0 (no limit) or at least 4096, not {frame_max}')
        self.channel = channel
        self.frame_max = frame_max
        #: Messages written since the writer was made.
        self.written = 0
        self._out = bytearray()
        self._scratch = bytearray()

    @property
    def pending(self) -> int:
        """Bytes written and not yet taken."""
        return len(self._out)

    def take(self) -> bytes:
        """Everything written since the last take (then forgotten)."""
        data = bytes(self._out)
        del self._out[:]
        return data

    def _frame(self, frame_type: int, payload: bytes) -> None:
        out = self._out
        out.append(frame_type)
        _u16(out, self.channel)
        _u32(out, len(payload))
        out += payload
        out.append(_END)

    def publish(self, exchange: str, routing_key: str, body: bytes, mandatory: bool = False,
                content_type: Optional[str] = None, content_encoding: Optional[str] = None,
                headers: Optional[bytes] = None, delivery_mode: int = 0, priority: int = -1,
                correlation_id: Optional[str] = None, reply_to: Optional[str] = None,
                expiration: Optional[str] = None, message_id: Optional[str] = None) -> None:
        """Append one message: ``basic.publish``, its content header and its body frames.

        ``headers`` is an encoded field table without its length prefix (``b''``: empty);
        ``delivery_mode`` 0 and ``priority`` -1 leave those properties out. All or nothing: a
        field that cannot be encoded raises and leaves the buffer as it was.
        """
        mark = len(self._out)
        try:
            self._publish(exchange, routing_key, body, mandatory, content_type, content_encoding, headers,
                          delivery_mode, priority, correlation_id, reply_to, expiration, message_id)
        except BaseException:
            del self._out[mark:]
            raise
        self.written += 1

    def _publish(self, exchange: str, routing_key: str, body: bytes, mandatory: bool,
                 content_type: Optional[str], content_encoding: Optional[str], headers: Optional[bytes],
                 delivery_mode: int, priority: int, correlation_id: Optional[str], reply_to: Optional[str],
                 expiration: Optional[str], message_id: Optional[str]) -> None:
        method = self._scratch
        del method[:]
        method += _PUBLISH
        method += b'\x00\x00'  # reserved (ticket)
        _shortstr(method, exchange)
        _shortstr(method, routing_key)
        method.append(1 if mandatory else 0)
        self._frame(_FRAME_METHOD, bytes(method))

        flags = 0
        props = bytearray()
        if content_type is not None:
            flags |= _F_CONTENT_TYPE
            _shortstr(props, content_type)
        if content_encoding is not None:
            flags |= _F_CONTENT_ENCODING
            _shortstr(props, content_encoding)
        if headers is not None:
            flags |= _F_HEADERS
            _u32(props, len(headers))
            props += headers
        if delivery_mode:
            flags |= _F_DELIVERY_MODE
            props.append(delivery_mode & 0xFF)
        if priority >= 0:
            flags |= _F_PRIORITY
            props.append(priority & 0xFF)
        if correlation_id is not None:
            flags |= _F_CORRELATION_ID
            _shortstr(props, correlation_id)
        if reply_to is not None:
            flags |= _F_REPLY_TO
            _shortstr(props, reply_to)
        if expiration is not None:
            flags |= _F_EXPIRATION
            _shortstr(props, expiration)
        if message_id is not None:
            flags |= _F_MESSAGE_ID
            _shortstr(props, message_id)
        size = len(body)
        header = method
        del header[:]
        header += _BASIC
        _u32(header, (size >> 32) & 0xFFFFFFFF)
        _u32(header, size & 0xFFFFFFFF)
        _u16(header, flags)
        header += props
        self._frame(_FRAME_HEADER, bytes(header))

        limit = self.frame_max - _FRAME_OVERHEAD if self.frame_max else size
        if size <= limit:
            if size:
                self._frame(_FRAME_BODY, body)
        else:
            view = memoryview(body)
            for start in range(0, size, limit):
                self._frame(_FRAME_BODY, bytes(view[start:start + limit]))
