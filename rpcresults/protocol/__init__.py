"""The protocol layer (no sockets, no threads), and the selector of its twins.

Hot-path modules, each one Python source that runs as it is (the pure twin)
and that Cython compiles, typed by the ``.pxd`` beside it, into the compiled twin:

* ``_frames_py.py`` -> ``_frames_c``: the AMQP frame parser (bytes in, deliveries out);
* ``_table_py.py`` -> ``_table_c``: the per-task state table and its waiters;
* ``_join_py.py`` -> ``_join_c``: the join fill (plain successes placed in member order);
* ``_memo_py.py`` -> ``_memo_c``: the compact set of evicted and abandoned ids;
* ``_decode_py.py`` -> ``_decode_c``: reply bodies to Python values, per content type and encoding;
* ``_writer_py.py`` -> ``_writer_c``: the frame writer (messages in, bytes out) of every publish.

This package selects the compiled twins when they were built and
``RPCRESULTS_NO_EXTENSIONS`` is not set, else the pure ones, and re-exports what
the engine uses. ``USING_EXTENSION`` says which were chosen.
"""
from __future__ import annotations

import os
from importlib import import_module
from types import ModuleType
from typing import Tuple

__all__ = ('USING_EXTENSION', 'NO_EXTENSIONS_VAR', 'FrameParser', 'FrameError', 'FrameWriter', 'StateTable', 'Waiter',
           'fill_values', 'index_results', 'is_final', 'twin', 'MARKER_TYPE')

#: Set to any non-empty value to force the pure-Python twins.
NO_EXTENSIONS_VAR = 'RPCRESULTS_NO_EXTENSIONS'


def twin(stem: str, compiled: bool) -> ModuleType:
    """The ``compiled`` (``_<stem>_c``) or pure (``_<stem>_py``) twin module; ImportError if not built."""
    return import_module(f'{__name__}._{stem}_{"c" if compiled else "py"}')


def _select(stem: str) -> Tuple[ModuleType, bool]:
    if not os.environ.get(NO_EXTENSIONS_VAR):
        try:
            return twin(stem, True), True
        except ImportError:
            pass
    return twin(stem, False), False


frames, _frames_compiled = _select('frames')
table, _table_compiled = _select('table')
writer, _writer_compiled = _select('writer')
join, _join_compiled = _select('join')

#: True when the compiled twins are in use.
USING_EXTENSION = _frames_compiled and _table_compiled and _writer_compiled and _join_compiled

FrameParser = frames.FrameParser
FrameError = frames.FrameError
FrameWriter = writer.FrameWriter
StateTable = table.StateTable
Waiter = table.Waiter
fill_values = join.fill_values
index_results = join.index_results
is_final = table.is_final
MARKER_TYPE = table.MARKER_TYPE
