"""The metas rpcresults makes itself: PENDING for an unknown id, and FAILURE carrying an error of ours."""
from __future__ import annotations

from typing import Any, Dict

from . import states

__all__ = ('ErrorMeta', 'error_meta', 'pending_meta')

Meta = Dict[str, Any]


class ErrorMeta(dict):
    """A FAILURE meta carrying an error of ours (malformed reply, eviction, lost queue, ...).

    Result objects raise it but never keep it as their state: a real reply may still
    replace it.
    """


def error_meta(task_id: str, error: BaseException) -> Meta:
    """The :class:`ErrorMeta` for ``error`` about ``task_id``."""
    return ErrorMeta(task_id=task_id, status=states.FAILURE, result=error, traceback=None,
                     children=None, date_done=None)


def pending_meta(task_id: str) -> Meta:
    """What is known of a task nothing was heard of: PENDING."""
    return {'task_id': task_id, 'status': states.PENDING, 'result': None, 'traceback': None,
            'children': None, 'date_done': None}
