"""The join fill: a join's results indexed by id, and plain successes placed in member order (no I/O).

This file is both twins: run as it is, it is the pure-Python fill; compiled by Cython as
``rpcresults.protocol._join_c`` with the C types of ``_join_c.pxd``, it is the compiled one.
"""
from __future__ import annotations

from typing import Any, Callable, Deque, Dict, List, Optional, Sequence, Tuple

__all__ = ('index_results', 'fill_values')

_SUCCESS = 'SUCCESS'

Meta = Dict[str, Any]


def index_results(results: Sequence[Any]) -> Tuple[Dict[str, List[Any]], Dict[str, List[int]]]:
    """``(results by id, member positions by id)`` for a join (duplicate ids share one entry)."""
    by_id: Dict[str, List[Any]] = {}
    positions: Dict[str, List[int]] = {}
    index = 0
    for result in results:
        task_id = result.id
        same = by_id.get(task_id)
        if same is None:
            by_id[task_id] = [result]
            positions[task_id] = [index]
        else:
            same.append(result)
            positions[task_id].append(index)
        index += 1
    return by_id, positions


def fill_values(bucket: Deque[Tuple[str, Any]], by_id: Dict[str, List[Any]], positions: Dict[str, List[int]],
                values: List[Any], settle: Callable[[Any, Meta], Any],
                remember: Optional[Callable[[str, Meta], Any]]) -> Optional[Tuple[str, Any]]:
    """Place plain successes from ``bucket`` into ``values``; stop at the first other item and return it.

    A plain success (a SUCCESS meta without children) becomes the final state of each
    of its results through ``settle(result, meta)``, and is handed to ``remember``.
    """
    while bucket:
        item = bucket.popleft()
        task_id = item[0]
        meta = item[1]
        if type(meta) is not dict or meta.get('status') != _SUCCESS or meta.get('children'):
            return item
        for result in by_id[task_id]:
            settle(result, meta)
        if remember is not None:
            remember(task_id, meta)
        value = meta.get('result')
        for index in positions[task_id]:
            values[index] = value
    return None
