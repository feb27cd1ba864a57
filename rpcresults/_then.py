"""``then()`` callbacks of a result or a set: kept until the result is final, then fired once."""
from __future__ import annotations

import logging
import weakref
from typing import Any, Callable, List, Optional, Tuple

__all__ = ('Callbacks',)

logger = logging.getLogger('rpcresults.result')

Callback = Callable[..., Any]


class Callbacks:
    """``then()`` callbacks of one result: fired once, with the result, when it is final."""

    __slots__ = ('items', 'fired')

    def __init__(self) -> None:
        self.items: List[Tuple[Any, Optional[Any], bool]] = []
        self.fired = False

    def add(self, callback: Callback, on_error: Optional[Callback], weak: bool) -> None:
        if weak:
            callback = weakref.WeakMethod(callback) if hasattr(callback, '__self__') else weakref.ref(callback)
            if on_error is not None:
                on_error = (weakref.WeakMethod(on_error) if hasattr(on_error, '__self__')
                            else weakref.ref(on_error))
        self.items.append((callback, on_error, weak))

    def fire(self, result: Any, error: Optional[BaseException]) -> None:
        if self.fired:
            return
        self.fired = True
        items, self.items = self.items, []
        for callback, on_error, weak in items:
            if weak:
                callback = callback()
                on_error = on_error() if on_error is not None else None
            try:
                if error is not None and on_error is not None:
                    on_error(error)
                elif callback is not None:
                    callback(result)
            except Exception:  # runs in whichever thread read the reply: never let it stop the reading
                logger.exception('a then() callback of %r failed', result)
