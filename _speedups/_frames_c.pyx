# cython: language_level=3, boundscheck=False, wraparound=False
"""Sans-I/O AMQP 0-9-1 frame parser (compiled twin of ``rpcresults/_frames_py.py``).

Same events, same errors, same limits as the pure twin, which is the
readable reference; a differential test feeds both the same streams.
"""
from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.string cimport memcmp

__all__ = ('FrameParser', 'FrameError', 'FRAME_END', 'DEFAULT_MAX_BODY')

DEF FRAME_METHOD = 1
DEF FRAME_HEADER = 2
DEF FRAME_BODY = 3
DEF FRAME_HEARTBEAT = 8
DEF END = 0xCE
DEF BASIC_DELIVER = (60 << 16) | 60
DEF BASIC_RETURN = (60 << 16) | 50
DEF BASIC_GET_OK = (60 << 16) | 71

FRAME_END = END
DEFAULT_MAX_BODY = 256 * 1024 * 1024

cdef str _JSON = 'application/json'
cdef str _UTF8 = 'utf-8'


class FrameError(Exception):
    """The byte stream is not valid AMQP for us: oversized, malformed or out-of-order frames."""


cdef inline unsigned int _be16(const unsigned char* p) noexcept nogil:
    return (p[0] << 8) | p[1]


cdef inline unsigned int _be32(const unsigned char* p) noexcept nogil:
    return (<unsigned int>p[0] << 24) | (<unsigned int>p[1] << 16) | (<unsigned int>p[2] << 8) | p[3]


cdef inline unsigned long long _be64(const unsigned char* p) noexcept nogil:
    return (<unsigned long long>_be32(p) << 32) | _be32(p + 4)


cdef object _shortstr(const unsigned char* p, Py_ssize_t offset, Py_ssize_t limit, Py_ssize_t* out):
    cdef Py_ssize_t length
    if offset >= limit:
        raise FrameError('short string runs past the end of its frame')
    length = p[offset]
    if offset + 1 + length > limit:
        raise FrameError('short string runs past the end of its frame')
    out[0] = offset + 1 + length
    if length == 16 and memcmp(p + offset + 1, b'application/json', 16) == 0:
        return _JSON
    if length == 5 and memcmp(p + offset + 1, b'utf-8', 5) == 0:
        return _UTF8
    try:
        return PyUnicode_DecodeUTF8(<const char*>(p + offset + 1), length, 'surrogatepass')
    except UnicodeDecodeError:
        return PyUnicode_DecodeUTF8(<const char*>(p + offset + 1), length, 'surrogateescape')


cdef class FrameParser:
    """Incremental parser for one connection's inbound frames (our channel and consumer tag)."""

    cdef public int channel
    cdef public bytes consumer_tag
    cdef public Py_ssize_t frame_max
    cdef public Py_ssize_t max_body
    cdef public Py_ssize_t frames_parsed
    cdef bytearray _buffer
    cdef int _content
    cdef int _expect
    cdef unsigned long long _tag
    cdef unsigned long long _body_size
    cdef unsigned long long _body_got
    cdef object _content_type
    cdef object _content_encoding
    cdef object _correlation_id
    cdef list _body_parts
    cdef Py_ssize_t _consumed

    def __init__(self, int channel, consumer_tag, frame_max=131072, max_body=DEFAULT_MAX_BODY):
        if max_body < 0:
            raise ValueError(f'max_body must be 0 or more, not {max_body}')
        self.channel = channel
        self.consumer_tag = consumer_tag.encode('utf-8')
        self.frame_max = frame_max
        self.max_body = max_body
        self.frames_parsed = 0
        self._buffer = bytearray()
        self._content = 0
        self._expect = FRAME_METHOD
        self._tag = 0
        self._body_size = 0
        self._body_got = 0
        self._content_type = self._content_encoding = self._correlation_id = None
        self._body_parts = []

    def set_consumer_tag(self, consumer_tag):
        """Follow a new consumer (after a re-consume on the same channel)."""
        self.consumer_tag = consumer_tag.encode('utf-8')

    @property
    def mid_message(self):
        """True between a method that announces content and the end of that content."""
        return self._expect != FRAME_METHOD

    @property
    def buffered(self):
        """Bytes held that do not yet form a whole frame."""
        return len(self._buffer)

    def take_remainder(self):
        """Hand back the bytes of an incomplete frame (for py-amqp to read on) and forget them."""
        data = bytes(self._buffer)
        del self._buffer[:]
        return data

    def feed(self, data):
        """Parse every whole frame in what was fed so far: ``(deliveries, other_frames)``."""
        cdef list deliveries = []
        cdef list others = []
        cdef bint direct = len(self._buffer) == 0
        self._consumed = 0
        if not direct:
            self._buffer += data
        try:
            self._parse(data if direct else self._buffer, deliveries, others)
        finally:
            if direct:
                if self._consumed < len(data):
                    self._buffer = bytearray(memoryview(data)[self._consumed:])
            elif self._consumed:
                del self._buffer[:self._consumed]
        return deliveries, others

    cdef _parse(self, object source, list deliveries, list others):
        cdef const unsigned char[::1] view = source
        cdef Py_ssize_t total = view.shape[0]
        cdef Py_ssize_t pos = 0
        cdef Py_ssize_t start, end
        cdef unsigned int frame_type, channel, size
        cdef const unsigned char* p
        if total == 0:
            return
        p = &view[0]
        while total - pos >= 8:
            frame_type = p[pos]
            channel = _be16(p + pos + 1)
            size = _be32(p + pos + 3)
            if self.frame_max and <Py_ssize_t>size + 8 > self.frame_max:
                raise FrameError(f'frame of {<Py_ssize_t>size + 8} bytes exceeds frame_max={self.frame_max}')
            end = pos + 7 + size
            if end >= total:
                break
            if p[end] != END:
                raise FrameError(f'frame end byte is {p[end]:#04x}, expected 0xce')
            start = pos + 7
            pos = end + 1
            self._consumed = pos
            self.frames_parsed += 1
            if <int>channel != self.channel:
                others.append((frame_type, channel, PyBytes_FromStringAndSize(<const char*>(p + start), size)))
                continue
            if self._expect == FRAME_METHOD:
                self._on_method(frame_type, channel, p, start, size, others)
            elif frame_type == FRAME_HEADER and self._expect == FRAME_HEADER:
                self._on_header(channel, p, start, size, deliveries, others)
            elif frame_type == FRAME_BODY and self._expect == FRAME_BODY:
                self._on_body(channel, p, start, size, deliveries, others)
            elif frame_type == FRAME_HEARTBEAT:
                others.append((frame_type, channel, PyBytes_FromStringAndSize(<const char*>(p + start), size)))
            else:
                raise FrameError(f'frame type {frame_type} on channel {channel} while expecting '
                                 f'type {self._expect}')

    cdef _on_method(self, unsigned int frame_type, unsigned int channel, const unsigned char* p,
                    Py_ssize_t start, Py_ssize_t size, list others):
        cdef unsigned int method
        cdef Py_ssize_t length, offset
        if frame_type != FRAME_METHOD or size < 4:
            if frame_type == FRAME_HEARTBEAT:
                others.append((frame_type, channel, PyBytes_FromStringAndSize(<const char*>(p + start), size)))
                return
            raise FrameError(f'frame type {frame_type} on channel {channel} while expecting a method')
        method = _be32(p + start)
        if method == BASIC_DELIVER:
            if size < 5:
                raise FrameError('basic.deliver is truncated')
            length = p[start + 4]
            offset = 5 + length
            if offset > size:
                raise FrameError('basic.deliver consumer tag runs past the frame')
            if length == len(self.consumer_tag) and memcmp(p + start + 5, <const char*>self.consumer_tag, length) == 0:
                if offset + 8 > size:
                    raise FrameError('basic.deliver is truncated')
                self._tag = _be64(p + start + offset)
                self._content = 1
                self._expect = FRAME_HEADER
                return
        if method == BASIC_DELIVER or method == BASIC_RETURN or method == BASIC_GET_OK:
            self._content = 2
            self._expect = FRAME_HEADER
        others.append((frame_type, channel, PyBytes_FromStringAndSize(<const char*>(p + start), size)))

    cdef _on_header(self, unsigned int channel, const unsigned char* p, Py_ssize_t start, Py_ssize_t size,
                    list deliveries, list others):
        cdef unsigned long long body_size
        cdef unsigned int flags, more
        cdef Py_ssize_t offset, limit
        if size < 14:
            raise FrameError('content header is truncated')
        body_size = _be64(p + start + 4)
        flags = _be16(p + start + 12)
        if self._content == 2:
            others.append((FRAME_HEADER, channel, PyBytes_FromStringAndSize(<const char*>(p + start), size)))
            self._expect = FRAME_BODY if body_size else FRAME_METHOD
            if not body_size:
                self._content = 0
            self._body_size = body_size
            self._body_got = 0
            return
        if body_size > <unsigned long long>self.max_body:
            raise FrameError(f'message body of {body_size} bytes exceeds the limit of {self.max_body}')
        offset = start + 14
        limit = start + size
        more = flags
        while more & 1:
            if offset + 2 > limit:
                raise FrameError('content header flags are truncated')
            more = _be16(p + offset)
            offset += 2
        self._content_type = self._content_encoding = self._correlation_id = None
        if flags & 0x8000:
            self._content_type = _shortstr(p, offset, limit, &offset)
        if flags & 0x4000:
            self._content_encoding = _shortstr(p, offset, limit, &offset)
        if flags & 0x2000:
            if offset + 4 > limit:
                raise FrameError('headers table is truncated')
            offset += 4 + <Py_ssize_t>_be32(p + offset)
        if flags & 0x1000:
            offset += 1
        if flags & 0x0800:
            offset += 1
        if flags & 0x0400:
            self._correlation_id = _shortstr(p, offset, limit, &offset)
        if offset > limit:
            raise FrameError('content header properties run past the frame')
        self._body_size = body_size
        self._body_got = 0
        self._body_parts = []
        if body_size == 0:
            self._complete(deliveries, b'')
        else:
            self._expect = FRAME_BODY

    cdef _on_body(self, unsigned int channel, const unsigned char* p, Py_ssize_t start, Py_ssize_t size,
                  list deliveries, list others):
        self._body_got += size
        if self._body_got > self._body_size:
            raise FrameError(f'body frames carry {self._body_got} bytes, more than the announced '
                             f'{self._body_size}')
        if self._content == 2:
            others.append((FRAME_BODY, channel, PyBytes_FromStringAndSize(<const char*>(p + start), size)))
            if self._body_got == self._body_size:
                self._content = 0
                self._expect = FRAME_METHOD
            return
        if self._body_got == self._body_size and not self._body_parts:
            self._complete(deliveries, PyBytes_FromStringAndSize(<const char*>(p + start), size))
            return
        self._body_parts.append(PyBytes_FromStringAndSize(<const char*>(p + start), size))
        if self._body_got == self._body_size:
            self._complete(deliveries, b''.join(self._body_parts))

    cdef _complete(self, list deliveries, bytes body):
        deliveries.append((self._tag, self._correlation_id, self._content_type, self._content_encoding, body))
        self._body_parts = []
        self._content = 0
        self._expect = FRAME_METHOD
