"""The client's cache of final metas (``result_cache_max``): a small thread-safe LRU."""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Dict, Optional

__all__ = ('LRUCache',)

Meta = Dict[str, Any]


class LRUCache:
    """A small thread-safe LRU of final metas; ``limit`` < 0 means unbounded, 0 disables it."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._data: 'OrderedDict[str, Meta]' = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> Optional[Meta]:
        """The meta cached for ``key`` (now the most recently used), else None."""
        with self._lock:
            value = self._data.get(key)
            if value is not None:
                self._data.move_to_end(key)
            return value

    def __setitem__(self, key: str, value: Meta) -> None:
        if self.limit == 0:
            return
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            if self.limit > 0:
                while len(self._data) > self.limit:
                    self._data.popitem(last=False)

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def pop(self, key: str, default: Any = None) -> Any:
        """Remove ``key`` and return its meta (``default`` when absent)."""
        with self._lock:
            return self._data.pop(key, default)

    def clear(self) -> None:
        """Forget every cached meta."""
        with self._lock:
            self._data.clear()

    def __len__(self) -> int:
        return len(self._data)
