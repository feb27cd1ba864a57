# C types for _writer_py.py when Cython compiles it as rpcresults.protocol._writer_c.
# The code is all in the .py file; this only says how to lay it out in C.
import cython

cdef int _FRAME_METHOD, _FRAME_HEADER, _FRAME_BODY, _END, _FRAME_OVERHEAD
cdef bytes _PUBLISH, _BASIC
cdef int _F_CONTENT_TYPE, _F_CONTENT_ENCODING, _F_HEADERS, _F_DELIVERY_MODE, _F_PRIORITY
cdef int _F_CORRELATION_ID, _F_REPLY_TO, _F_EXPIRATION, _F_MESSAGE_ID

cdef void _u16(bytearray out, unsigned int value)
cdef void _u32(bytearray out, unsigned long value)
@cython.locals(data=bytes)
cdef _shortstr(bytearray out, object text)


cdef class FrameWriter:
    cdef public int channel
    cdef public Py_ssize_t frame_max
    cdef public Py_ssize_t written
    cdef bytearray _out
    cdef bytearray _scratch

    cdef _frame(self, int frame_type, payload)

    @cython.locals(mark=Py_ssize_t)
    cpdef publish(self, str exchange, str routing_key, bytes body, bint mandatory=*,
                  content_type=*, content_encoding=*, headers=*, int delivery_mode=*, int priority=*,
                  correlation_id=*, reply_to=*, expiration=*, message_id=*)

    @cython.locals(method=bytearray, props=bytearray, header=bytearray, flags=cython.uint,
                   size=Py_ssize_t, limit=Py_ssize_t, start=Py_ssize_t)
    cdef _publish(self, str exchange, str routing_key, bytes body, bint mandatory, content_type,
                  content_encoding, headers, int delivery_mode, int priority, correlation_id, reply_to,
                  expiration, message_id)
