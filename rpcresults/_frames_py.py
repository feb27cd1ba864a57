"""Sans-I/O AMQP 0-9-1 frame parser for the reply consumer (pure-Python twin).

Bytes in, events out. ``feed(chunk)`` accepts arbitrary chunks (frames split
anywhere), recognises ``basic.deliver`` + content header + body frame(s) for
our consumer tag on our channel and turns each into a delivery
``(delivery_tag, correlation_id, content_type, content_encoding, body)``;
every other frame is returned unchanged as ``(frame_type, channel, payload)``
for py-amqp's own frame handler. Within one ``feed`` the deliveries are
returned in order, and the other frames in order; a caller handles the
deliveries first. Limits: a frame larger than the negotiated ``frame_max``
and a body larger than ``max_body`` raise :class:`FrameError`.
"""
from __future__ import annotations

from struct import Struct
from typing import List, Optional, Tuple

__all__ = ('FrameParser', 'FrameError', 'FRAME_END', 'DEFAULT_MAX_BODY')

FRAME_METHOD = 1
FRAME_HEADER = 2
FRAME_BODY = 3
FRAME_END = 0xCE
BASIC_DELIVER = (60 << 16) | 60
#: ``basic.deliver``, ``basic.return``, ``basic.get-ok``: methods followed by content frames.
CONTENT_METHODS = frozenset({(60 << 16) | 60, (60 << 16) | 50, (60 << 16) | 71})
DEFAULT_MAX_BODY = 256 * 1024 * 1024

_FRAME_HEADER = Struct('>BHI')
_METHOD_ID = Struct('>I')
_LONGLONG = Struct('>Q')
_SHORT = Struct('>H')
_LONG = Struct('>I')
_HEADER_START = Struct('>HHQH')

Delivery = Tuple[int, Optional[str], Optional[str], Optional[str], bytes]
Frame = Tuple[int, int, bytes]


class FrameError(Exception):
    """The byte stream is not valid AMQP for us: oversized, malformed or out-of-order frames."""


def _shortstr(buf: bytearray, offset: int, limit: int) -> Tuple[str, int]:
    """The short string at ``offset`` of a frame ending at ``limit``, and the offset after it."""
    if offset >= limit:
        raise FrameError('short string runs past the end of its frame')
    length = buf[offset]
    end = offset + 1 + length
    if end > limit:
        raise FrameError('short string runs past the end of its frame')
    raw = bytes(buf[offset + 1:end])
    try:
        return raw.decode('utf-8', 'surrogatepass'), end  # as py-amqp reads it
    except UnicodeDecodeError:  # not UTF-8 at all: keep the bytes recoverable instead of failing
        return raw.decode('utf-8', 'surrogateescape'), end


class FrameParser:
    """Incremental parser for one connection's inbound frames (our channel and consumer tag)."""

    def __init__(self, channel: int, consumer_tag: str, frame_max: int = 131072,
                 max_body: int = DEFAULT_MAX_BODY) -> None:
        if max_body < 0:
            raise ValueError(f'max_body must be 0 or more, not {max_body}')
        self.channel = channel
        self.consumer_tag = consumer_tag.encode('utf-8')
        self.frame_max = frame_max
        self.max_body = max_body
        self._buffer = bytearray()
        # content in progress on our channel: 0 none, 1 ours, 2 someone else's (passed through)
        self._content = 0
        self._expect = FRAME_METHOD
        self._tag = 0
        self._props: Tuple[Optional[str], Optional[str], Optional[str]] = (None, None, None)
        self._body_size = 0
        self._body_parts: List[bytes] = []
        self._body_got = 0
        self.frames_parsed = 0

    def set_consumer_tag(self, consumer_tag: str) -> None:
        """Follow a new consumer (after a re-consume on the same channel)."""
        self.consumer_tag = consumer_tag.encode('utf-8')

    @property
    def mid_message(self) -> bool:
        """True between a method that announces content and the end of that content."""
        return self._expect != FRAME_METHOD

    @property
    def buffered(self) -> int:
        """Bytes held that do not yet form a whole frame."""
        return len(self._buffer)

    def take_remainder(self) -> bytes:
        """Hand back the bytes of an incomplete frame (for py-amqp to read on) and forget them."""
        data = bytes(self._buffer)
        self._buffer.clear()
        return data

    def feed(self, data: bytes) -> Tuple[List[Delivery], List[Frame]]:
        """Parse every whole frame in what was fed so far: ``(deliveries, other_frames)``."""
        buf = self._buffer
        buf += data
        deliveries: List[Delivery] = []
        others: List[Frame] = []
        size_limit = self.frame_max
        total = len(buf)
        pos = 0
        try:
            while total - pos >= 8:
                frame_type, channel, size = _FRAME_HEADER.unpack_from(buf, pos)
                if size_limit and size + 8 > size_limit:
                    raise FrameError(f'frame of {size + 8} bytes exceeds frame_max={size_limit}')
                end = pos + 7 + size
                if end >= total:
                    break
                if buf[end] != FRAME_END:
                    raise FrameError(f'frame end byte is {buf[end]:#04x}, expected 0xce')
                start = pos + 7
                pos = end + 1
                self.frames_parsed += 1
                if channel != self.channel:
                    others.append((frame_type, channel, bytes(buf[start:end])))
                    continue
                expect = self._expect
                if (expect == FRAME_BODY and frame_type == FRAME_BODY and self._content == 1
                        and not self._body_parts and end - start == self._body_size - self._body_got):
                    # the common case: a whole body in one frame (what _on_body would do, inline)
                    self._body_got = self._body_size
                    props = self._props
                    deliveries.append((self._tag, props[2], props[0], props[1], bytes(buf[start:end])))
                    self._content = 0
                    self._expect = FRAME_METHOD
                elif expect == FRAME_METHOD:
                    self._on_method(frame_type, channel, buf, start, end, others)
                elif frame_type == FRAME_HEADER and expect == FRAME_HEADER:
                    self._on_header(buf, start, end, channel, deliveries, others)
                elif frame_type == FRAME_BODY and expect == FRAME_BODY:
                    self._on_body(buf, start, end, channel, deliveries, others)
                elif frame_type == 8:
                    others.append((frame_type, channel, bytes(buf[start:end])))
                else:
                    raise FrameError(f'frame type {frame_type} on channel {channel} while expecting '
                                     f'type {expect}')
        finally:
            del buf[:pos]
        return deliveries, others

    def _on_method(self, frame_type: int, channel: int, buf: bytearray, start: int, end: int,
                   others: List[Frame]) -> None:
        size = end - start
        if frame_type != FRAME_METHOD or size < 4:
            if frame_type == 8:
                others.append((frame_type, channel, bytes(buf[start:end])))
                return
            raise FrameError(f'frame type {frame_type} on channel {channel} while expecting a method')
        method = _METHOD_ID.unpack_from(buf, start)[0]
        if method == BASIC_DELIVER:
            if size < 5:
                raise FrameError('basic.deliver is truncated')
            length = buf[start + 4]
            offset = start + 5 + length
            if offset > end:
                raise FrameError('basic.deliver consumer tag runs past the frame')
            if buf[start + 5:offset] == self.consumer_tag:
                if offset + 8 > end:
                    raise FrameError('basic.deliver is truncated')
                self._tag = _LONGLONG.unpack_from(buf, offset)[0]
                self._content = 1
                self._expect = FRAME_HEADER
                return
        if method in CONTENT_METHODS:
            self._content = 2
            self._expect = FRAME_HEADER
        others.append((frame_type, channel, bytes(buf[start:end])))

    def _on_header(self, buf: bytearray, start: int, end: int, channel: int, deliveries: List[Delivery],
                   others: List[Frame]) -> None:
        if end - start < 14:
            raise FrameError('content header is truncated')
        _, _, body_size, flags = _HEADER_START.unpack_from(buf, start)
        if self._content == 2:
            others.append((FRAME_HEADER, channel, bytes(buf[start:end])))
            self._expect = FRAME_BODY if body_size else FRAME_METHOD
            if not body_size:
                self._content = 0
            self._body_size, self._body_got = body_size, 0
            return
        if body_size > self.max_body:
            raise FrameError(f'message body of {body_size} bytes exceeds the limit of {self.max_body}')
        self._props = self._properties(buf, start + 14, end, flags)
        self._body_size = body_size
        self._body_got = 0
        self._body_parts = []
        if body_size == 0:
            self._complete(deliveries, b'')
        else:
            self._expect = FRAME_BODY

    @staticmethod
    def _properties(buf: bytearray, offset: int, limit: int,
                    flags: int) -> Tuple[Optional[str], Optional[str], Optional[str]]:
        more = flags
        while more & 1:  # continuation: another flags word follows
            if offset + 2 > limit:
                raise FrameError('content header flags are truncated')
            more = _SHORT.unpack_from(buf, offset)[0]
            offset += 2
        content_type = content_encoding = correlation_id = None
        if flags & 0x8000:
            content_type, offset = _shortstr(buf, offset, limit)
        if flags & 0x4000:
            content_encoding, offset = _shortstr(buf, offset, limit)
        if flags & 0x2000:  # headers table: skip it whole
            if offset + 4 > limit:
                raise FrameError('headers table is truncated')
            offset += 4 + _LONG.unpack_from(buf, offset)[0]
        if flags & 0x1000:
            offset += 1
        if flags & 0x0800:
            offset += 1
        if flags & 0x0400:
            correlation_id, offset = _shortstr(buf, offset, limit)
        if offset > limit:
            raise FrameError('content header properties run past the frame')
        return content_type, content_encoding, correlation_id

    def _on_body(self, buf: bytearray, start: int, end: int, channel: int, deliveries: List[Delivery],
                 others: List[Frame]) -> None:
        payload = bytes(buf[start:end])
        self._body_got += len(payload)
        if self._body_got > self._body_size:
            raise FrameError(f'body frames carry {self._body_got} bytes, more than the announced '
                             f'{self._body_size}')
        if self._content == 2:
            others.append((FRAME_BODY, channel, payload))
            if self._body_got == self._body_size:
                self._content = 0
                self._expect = FRAME_METHOD
            return
        if self._body_got == self._body_size and not self._body_parts:
            self._complete(deliveries, payload)
            return
        self._body_parts.append(payload)
        if self._body_got == self._body_size:
            self._complete(deliveries, b''.join(self._body_parts))

    def _complete(self, deliveries: List[Delivery], body: bytes) -> None:
        content_type, content_encoding, correlation_id = self._props
        deliveries.append((self._tag, correlation_id, content_type, content_encoding, body))
        self._body_parts = []
        self._content = 0
        self._expect = FRAME_METHOD
