# C types for _memo_py.py when Cython compiles it as rpcresults.protocol._memo_c.
# The code is all in the .py file; this only says how to lay it out in C.
import cython

cdef long long _EMPTY, _GONE
cdef Py_ssize_t _FIRST_SLOTS

cdef long long _fingerprint(object task_id) except? -1


cdef class IdMemo:
    cdef public Py_ssize_t capacity
    cdef Py_ssize_t _live
    cdef Py_ssize_t _used
    cdef object _ring
    cdef Py_ssize_t _head
    cdef object _slots
    cdef long long _mask

    @cython.locals(fp=cython.longlong)
    cpdef add(self, object task_id)

    @cython.locals(index=Py_ssize_t)
    cpdef discard(self, object task_id)

    @cython.locals(slots='long long[::1]', mask=cython.longlong, index=cython.longlong, value=cython.longlong)
    cdef Py_ssize_t _find(self, long long fp) except -2

    @cython.locals(slots='long long[::1]', mask=cython.longlong, index=cython.longlong)
    cdef _place(self, long long fp)

    @cython.locals(fp=cython.longlong, index=Py_ssize_t)
    cdef _forget_oldest(self)

    @cython.locals(size=Py_ssize_t, value=cython.longlong)
    cdef _rebuild(self)
