# C types for _table_py.py when Cython compiles it as rpcresults.protocol._table_c.
# The code is all in the .py file; this only says how to lay it out in C.
import cython

cdef str _SUCCESS, _FAILURE, _REVOKED, _MARKER

cdef bint _final_status(object status)
cpdef bint is_final(object meta)
cdef object _add(object slot, object item)
cdef object _remove(object slot, object item)
cdef list _items(object slot)


cdef class Waiter:
    cdef public Py_ssize_t remaining
    cdef public object bucket
    cdef public object on_message
    cdef public object wake
    cdef public object error
    cdef object __weakref__

    cpdef notify(self)
    cpdef arrived(self, object task_id, object meta)


cdef _tell(Waiter waiter, object task_id, object meta, bint final)


cdef class _Entry:
    cdef public object meta
    cdef public object owners
    cdef public object waiters

    cdef bint owned_by(self, object owner)


cdef class StateTable:
    cdef object _decode
    cdef bint _fast_json
    cdef public Py_ssize_t buffer_max
    cdef public bint keep_late
    cdef object _lock
    cdef dict _tracked
    cdef dict _early
    cdef public Py_ssize_t remember_max
    cdef dict _finished
    cdef object _evicted
    cdef object _abandoned
    cdef object _collected
    cdef object _on_collected
    cdef public Py_ssize_t received
    cdef public bytes marker
    cdef public Py_ssize_t dispatched
    cdef public Py_ssize_t buffered
    cdef public Py_ssize_t evicted
    cdef public Py_ssize_t late
    cdef public Py_ssize_t late_dropped
    cdef public Py_ssize_t malformed
    cdef public Py_ssize_t duplicates

    @cython.locals(entry=_Entry, tracked=dict)
    cdef _reap(self)
    @cython.locals(finished=dict)
    cdef _release(self, object task_id, _Entry entry)
    @cython.locals(early=dict)
    cdef _buffer(self, object task_id, object meta)

    @cython.locals(entry=_Entry, tracked=dict)
    cpdef track_many(self, object pairs)

    @cython.locals(entry=_Entry, tracked=dict)
    cpdef watch(self, Waiter waiter, object task_ids)

    @cython.locals(entry=_Entry, tracked=dict)
    cpdef unwatch(self, Waiter waiter, object task_ids)

    @cython.locals(entry=_Entry)
    cpdef deliver_error(self, object task_id, object error, object reason)

    @cython.locals(entry=_Entry, final=bint)
    cpdef deliver(self, object task_id, object meta)

    @cython.locals(count=Py_ssize_t, item=tuple)
    cpdef Py_ssize_t deliver_many(self, object deliveries)
