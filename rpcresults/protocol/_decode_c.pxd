# C types for _decode_py.py when Cython compiles it as rpcresults.protocol._decode_c.
# The code is all in the .py file; this only says how to lay it out in C.
cdef str _JSON, _UTF8
cdef object _json_decode, _json_scan, _AS_IS, _KNOWN
cdef dict _codec_names

cpdef object fast_json(str text)
cpdef object decode_body(object body, object content_type, object content_encoding, object decode, bint fast)
