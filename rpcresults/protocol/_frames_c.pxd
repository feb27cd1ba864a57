# C types for _frames_py.py when Cython compiles it as rpcresults.protocol._frames_c.
# The code is all in the .py file; this only says how to lay it out in C.
import cython

cdef int _FRAME_METHOD, _FRAME_HEADER, _FRAME_BODY, _FRAME_HEARTBEAT, _END
cdef unsigned int _BASIC_DELIVER, _BASIC_RETURN, _BASIC_GET_OK
cdef int _NO_CONTENT, _OUR_CONTENT, _OTHER_CONTENT
cdef str _JSON, _UTF8

cdef unsigned int _u16(bytes buf, Py_ssize_t i)
@cython.locals(high=cython.ulonglong)
cdef unsigned long long _u32(bytes buf, Py_ssize_t i)
cdef unsigned long long _u64(bytes buf, Py_ssize_t i)



cdef class FrameParser:
    cdef public int channel
    cdef public bytes consumer_tag
    cdef public Py_ssize_t frame_max
    cdef public Py_ssize_t max_body
    cdef public Py_ssize_t frames_parsed
    cdef bytes _rest
    cdef int _content
    cdef int _expect
    cdef unsigned long long _tag
    cdef object _content_type
    cdef object _content_encoding
    cdef object _correlation_id
    cdef unsigned long long _body_size
    cdef unsigned long long _body_got
    cdef list _body_parts
    cdef Py_ssize_t _cursor
    cdef public bint keep_header
    cdef bytes _header

    @cython.locals(buf=bytes, deliveries=list, others=list, total=Py_ssize_t, pos=Py_ssize_t,
                   start=Py_ssize_t, end=Py_ssize_t, frame_type=int, channel=int, size=Py_ssize_t)
    cpdef tuple feed(self, data)

    @cython.locals(offset=Py_ssize_t, length=Py_ssize_t, start=Py_ssize_t, end=Py_ssize_t)
    cdef str _shortstr(self, bytes buf, Py_ssize_t limit)

    @cython.locals(size=Py_ssize_t, method=cython.uint, length=Py_ssize_t, offset=Py_ssize_t)
    cdef _on_method(self, bytes buf, int frame_type, int channel, Py_ssize_t start, Py_ssize_t end,
                    list others)

    @cython.locals(body_size=cython.ulonglong, flags=cython.uint, more=cython.uint, offset=Py_ssize_t)
    cdef _on_header(self, bytes buf, int channel, Py_ssize_t start, Py_ssize_t end, list deliveries,
                    list others)

    @cython.locals(parts=list)
    cdef _on_body(self, bytes buf, int channel, Py_ssize_t start, Py_ssize_t end, list deliveries,
                  list others)

    cdef _complete(self, list deliveries, bytes body)
