"""Sans-I/O AMQP 0-9-1 frame parser for a reply consumer: bytes in, deliveries and other frames out.

``feed(chunk)`` accepts arbitrary chunks (frames split anywhere), recognises
``basic.deliver`` + content header + body frame(s) for our consumer tag on our
channel and turns each into a delivery ``(delivery_tag, correlation_id,
content_type, content_encoding, body)``; every other frame is returned unchanged
as ``(frame_type, channel, payload)`` for py-amqp's own frame handler. Within one
``feed`` the deliveries come in order, and the other frames in order; a caller
handles the deliveries first. With ``keep_header`` each delivery also carries its
content header's payload as a sixth item (a request's reply_to and headers are in
it; py-amqp's ``decode_properties_basic`` reads it from offset 12). A frame larger
than the negotiated ``frame_max`` or a body larger than ``max_body`` raises
:class:`FrameError`.

This file is both twins: run as it is, it is the pure-Python parser; compiled by
Cython as ``rpcresults.protocol._frames_c``, with the C types declared in
``_frames_c.pxd``, it is the compiled one. So the code reads bytes one at a time
(``buf[i]``, which Cython turns into a C array access) instead of through
``struct``, which Cython could not make faster.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

from ..exceptions import FrameError

__all__ = ('FrameParser', 'FrameError', 'FRAME_END', 'DEFAULT_MAX_BODY')

FRAME_END = 0xCE
DEFAULT_MAX_BODY = 256 * 1024 * 1024

# Private copies of the constants: the compiled twin makes these C constants.
_FRAME_METHOD = 1
_FRAME_HEADER = 2
_FRAME_BODY = 3
_FRAME_HEARTBEAT = 8
_END = FRAME_END
#: Method ids (class << 16 | method) of ``basic.deliver``, ``basic.return`` and ``basic.get-ok``:
#: the methods followed by content frames.
_BASIC_DELIVER = 0x3C003C
_BASIC_RETURN = 0x3C0032
_BASIC_GET_OK = 0x3C0047

#: ``_content``: what the content frames now expected belong to.
_NO_CONTENT = 0
_OUR_CONTENT = 1
_OTHER_CONTENT = 2  # someone else's delivery, a return or a get-ok: passed through to py-amqp

_JSON = 'application/json'
_UTF8 = 'utf-8'

Delivery = Tuple[int, Optional[str], Optional[str], Optional[str], bytes]
Frame = Tuple[int, int, bytes]


def _u16(buf: bytes, i: int) -> int:
    return (buf[i] << 8) | buf[i + 1]


def _u32(buf: bytes, i: int) -> int:
    high = buf[i]  # a 64-bit C integer in the compiled twin: shifted by 24, a byte overflows an int
    return (high << 24) | (buf[i + 1] << 16) | (buf[i + 2] << 8) | buf[i + 3]


def _u64(buf: bytes, i: int) -> int:
    return (_u32(buf, i) << 32) | _u32(buf, i + 4)


class FrameParser:
    """Incremental parser for one connection's inbound frames (our channel and consumer tag)."""

    def __init__(self, channel: int, consumer_tag: str, frame_max: int = 131072,
                 max_body: int = DEFAULT_MAX_BODY, keep_header: bool = False) -> None:
        if max_body < 0:
            raise ValueError(f'max_body must be 0 or more, not {max_body}')
        self.channel = channel
        self.consumer_tag = consumer_tag.encode('utf-8')
        self.frame_max = frame_max
        self.max_body = max_body
        self.frames_parsed = 0
        self._rest = b''  # the start of a frame that has not fully arrived
        self._content = _NO_CONTENT
        self._expect = _FRAME_METHOD
        self._tag = 0
        self._content_type: Optional[str] = None
        self._content_encoding: Optional[str] = None
        self._correlation_id: Optional[str] = None
        self._body_size = 0
        self._body_got = 0
        self._body_parts: List[bytes] = []  # the frames so far of a body that spans several
        self._cursor = 0  # where the content header is being read
        self.keep_header = keep_header
        self._header = b''  # the content header of the delivery being read (with keep_header)

    def set_consumer_tag(self, consumer_tag: str) -> None:
        """Follow a new consumer (after a re-consume on the same channel)."""
        self.consumer_tag = consumer_tag.encode('utf-8')

    @property
    def mid_message(self) -> bool:
        """True between a method that announces content and the end of that content."""
        return self._expect != _FRAME_METHOD

    @property
    def buffered(self) -> int:
        """Bytes held that do not yet form a whole frame."""
        return len(self._rest)

    def take_remainder(self) -> bytes:
        """Hand back the bytes of an incomplete frame (for py-amqp to read on) and forget them."""
        rest = self._rest
        self._rest = b''
        return rest

    def feed(self, data: bytes) -> Tuple[List[Delivery], List[Frame]]:
        """Parse every whole frame in what was fed so far: ``(deliveries, other_frames)``."""
        buf = self._rest + data if self._rest else bytes(data)
        deliveries: List[Delivery] = []
        others: List[Frame] = []
        total = len(buf)
        pos = 0
        try:
            while total - pos >= 8:
                frame_type = buf[pos]
                channel = _u16(buf, pos + 1)
                size = _u32(buf, pos + 3)
                if self.frame_max and size + 8 > self.frame_max:
                    raise FrameError(f'frame of {size + 8} bytes exceeds frame_max={self.frame_max}')
                end = pos + 7 + size
                if end >= total:
                    break
                if buf[end] != _END:
                    raise FrameError(f'frame end byte is {buf[end]:#04x}, expected 0xce')
                start = pos + 7
                pos = end + 1
                self.frames_parsed += 1
                if channel != self.channel:
                    others.append((frame_type, channel, buf[start:end]))
                elif self._expect == _FRAME_METHOD:
                    self._on_method(buf, frame_type, channel, start, end, others)
                elif frame_type == _FRAME_HEADER and self._expect == _FRAME_HEADER:
                    self._on_header(buf, channel, start, end, deliveries, others)
                elif frame_type == _FRAME_BODY and self._expect == _FRAME_BODY:
                    self._on_body(buf, channel, start, end, deliveries, others)
                elif frame_type == _FRAME_HEARTBEAT:
                    others.append((frame_type, channel, buf[start:end]))
                else:
                    raise FrameError(f'frame type {frame_type} on channel {channel} while expecting '
                                     f'type {self._expect}')
        finally:
            self._rest = buf[pos:] if pos < total else b''
        return deliveries, others

    def _shortstr(self, buf: bytes, limit: int) -> str:
        """The short string at ``self._cursor`` of a frame ending at ``limit``; moves the cursor past it."""
        offset = self._cursor
        if offset >= limit:
            raise FrameError('short string runs past the end of its frame')
        length = buf[offset]
        start = offset + 1
        end = start + length
        if end > limit:
            raise FrameError('short string runs past the end of its frame')
        self._cursor = end
        # the usual values, without decoding (and without a new string per message)
        if length == 16 and buf.startswith(b'application/json', start):
            return _JSON
        if length == 5 and buf.startswith(b'utf-8', start):
            return _UTF8
        try:
            return buf[start:end].decode('utf-8', 'surrogatepass')  # as py-amqp reads it
        except UnicodeDecodeError:  # not UTF-8 at all: keep the bytes recoverable instead of failing
            return buf[start:end].decode('utf-8', 'surrogateescape')

    def _on_method(self, buf: bytes, frame_type: int, channel: int, start: int, end: int,
                   others: List[Frame]) -> None:
        size = end - start
        if frame_type != _FRAME_METHOD or size < 4:
            if frame_type == _FRAME_HEARTBEAT:
                others.append((frame_type, channel, buf[start:end]))
                return
            raise FrameError(f'frame type {frame_type} on channel {channel} while expecting a method')
        method = _u32(buf, start)
        if method == _BASIC_DELIVER:
            if size < 5:
                raise FrameError('basic.deliver is truncated')
            length = buf[start + 4]
            offset = start + 5 + length
            if offset > end:
                raise FrameError('basic.deliver consumer tag runs past the frame')
            if length == len(self.consumer_tag) and buf.startswith(self.consumer_tag, start + 5):
                if offset + 8 > end:
                    raise FrameError('basic.deliver is truncated')
                self._tag = _u64(buf, offset)
                self._content = _OUR_CONTENT
                self._expect = _FRAME_HEADER
                return
        if method == _BASIC_DELIVER or method == _BASIC_RETURN or method == _BASIC_GET_OK:
            self._content = _OTHER_CONTENT
            self._expect = _FRAME_HEADER
        others.append((frame_type, channel, buf[start:end]))

    def _on_header(self, buf: bytes, channel: int, start: int, end: int, deliveries: List[Delivery],
                   others: List[Frame]) -> None:
        if end - start < 14:
            raise FrameError('content header is truncated')
        body_size = _u64(buf, start + 4)
        flags = _u16(buf, start + 12)
        if self._content == _OTHER_CONTENT:
            others.append((_FRAME_HEADER, channel, buf[start:end]))
            self._body_size = body_size
            self._body_got = 0
            if body_size:
                self._expect = _FRAME_BODY
            else:
                self._content = _NO_CONTENT
                self._expect = _FRAME_METHOD
            return
        if body_size > self.max_body:
            raise FrameError(f'message body of {body_size} bytes exceeds the limit of {self.max_body}')
        offset = start + 14
        more = flags
        while more & 1:  # continuation: another flags word follows
            if offset + 2 > end:
                raise FrameError('content header flags are truncated')
            more = _u16(buf, offset)
            offset += 2
        self._cursor = offset
        self._content_type = self._content_encoding = self._correlation_id = None
        if flags & 0x8000:
            self._content_type = self._shortstr(buf, end)
        if flags & 0x4000:
            self._content_encoding = self._shortstr(buf, end)
        if flags & 0x2000:  # headers table: skipped whole
            if self._cursor + 4 > end:
                raise FrameError('headers table is truncated')
            self._cursor += 4 + _u32(buf, self._cursor)
        if flags & 0x1000:  # delivery mode
            self._cursor += 1
        if flags & 0x0800:  # priority
            self._cursor += 1
        if flags & 0x0400:
            self._correlation_id = self._shortstr(buf, end)
        if self._cursor > end:
            raise FrameError('content header properties run past the frame')
        self._body_size = body_size
        self._body_got = 0
        if self.keep_header:
            self._header = buf[start:end]
        if body_size == 0:
            self._complete(deliveries, b'')
        else:
            self._expect = _FRAME_BODY

    def _on_body(self, buf: bytes, channel: int, start: int, end: int, deliveries: List[Delivery],
                 others: List[Frame]) -> None:
        self._body_got += end - start
        if self._body_got > self._body_size:
            raise FrameError(f'body frames carry {self._body_got} bytes, more than the announced '
                             f'{self._body_size}')
        if self._content == _OTHER_CONTENT:
            others.append((_FRAME_BODY, channel, buf[start:end]))
            if self._body_got == self._body_size:
                self._content = _NO_CONTENT
                self._expect = _FRAME_METHOD
            return
        parts = self._body_parts
        if self._body_got == self._body_size and not parts:
            self._complete(deliveries, buf[start:end])  # the usual case: the whole body in one frame
            return
        parts.append(buf[start:end])
        if self._body_got == self._body_size:
            body = b''.join(parts)
            parts.clear()
            self._complete(deliveries, body)

    def _complete(self, deliveries: List[Delivery], body: bytes) -> None:
        if self.keep_header:
            deliveries.append((self._tag, self._correlation_id, self._content_type, self._content_encoding,
                               body, self._header))
        else:
            deliveries.append((self._tag, self._correlation_id, self._content_type, self._content_encoding,
                               body))
        self._content = _NO_CONTENT
        self._expect = _FRAME_METHOD
