# C types for _join_py.py when Cython compiles it as rpcresults.protocol._join_c.
# The code is all in the .py file; this only says how to lay it out in C.
import cython

cdef str _SUCCESS

@cython.locals(by_id=dict, positions=dict, index=Py_ssize_t, same=list)
cpdef tuple index_results(object results)

@cython.locals(item=tuple, index=Py_ssize_t)
cpdef object fill_values(object bucket, dict by_id, dict positions, list values, object settle,
                         object remember)
