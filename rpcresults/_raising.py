"""How a result raises: the worker's exception rebuilt, its traceback, and when waiting is refused."""
from __future__ import annotations

import logging
import sys
from typing import Any, Dict

from . import states

__all__ = ('rebuild_exception', 'remote_traceback', 'assert_will_not_block', 'E_WOULDBLOCK')

logger = logging.getLogger('rpcresults.result')

Meta = Dict[str, Any]

E_WOULDBLOCK = ('Never call result.get() within a task! See '
                'https://docs.celeryq.dev/en/latest/userguide/tasks.html#avoid-launching-synchronous-subtasks')


def assert_will_not_block() -> None:
    """Inside a Celery task a worker runs, waiting for another result raises RuntimeError, as in Celery.

    Celery says so through ``celery._state.task_join_will_block()``; without Celery loaded
    nothing can run a task, so nothing is checked.
    """
    celery_state = sys.modules.get('celery._state')
    if celery_state is not None and celery_state.task_join_will_block():
        raise RuntimeError(E_WOULDBLOCK)


def remote_traceback(text: str) -> Any:
    """The worker's traceback ``text`` as a traceback object (``task_remote_tracebacks``; needs tblib)."""
    try:
        import tblib
    except ImportError:
        logger.debug('task_remote_tracebacks is set but tblib is not installed')
        return None
    try:
        return tblib.Traceback.from_string(text).as_traceback()
    except Exception:  # a traceback text tblib cannot read: the exception is raised without it
        logger.debug('cannot rebuild the remote traceback', exc_info=True)
        return None


def rebuild_exception(backend: Any, meta: Meta) -> Meta:
    """A copy of ``meta`` whose exception result is a real exception (errors become the value)."""
    value = meta.get('result')
    if meta.get('status') in states.EXCEPTION_STATES and not isinstance(value, BaseException):
        meta = dict(meta)
        try:
            meta['result'] = backend.exception_to_python(value)
        except Exception as exc:  # SecurityError & co.: the refusal itself is the waiter's error
            meta['result'] = exc
    return meta
