"""Selects the hot-path implementation: compiled (``_state_c``) when importable, else the pure twin.

``RPCRESULTS_NO_EXTENSIONS=1`` forces the pure-Python twin.
"""
from __future__ import annotations

import os

USING_EXTENSION = False

if not os.environ.get('RPCRESULTS_NO_EXTENSIONS'):
    try:
        from ._frames_c import FrameError, FrameParser  # type: ignore[import-not-found]
        from ._state_c import (READY_STATES, StateTable, Waiter,  # type: ignore[import-not-found]
                               fill_values, index_results)
    except ImportError:
        pass
    else:
        USING_EXTENSION = True

if not USING_EXTENSION:
    from ._frames_py import FrameError, FrameParser  # noqa: F811
    from ._state_py import READY_STATES, StateTable, Waiter, fill_values, index_results  # noqa: F811

__all__ = ('USING_EXTENSION', 'StateTable', 'Waiter', 'READY_STATES', 'FrameParser', 'FrameError',
           'fill_values', 'index_results')
