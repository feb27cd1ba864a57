"""Every exception rpcresults raises."""
from __future__ import annotations

import asyncio as _asyncio
import builtins
from typing import Iterable, Tuple

__all__ = (
    'RPCResultsError', 'TimeoutError', 'BacklogLimitExceeded', 'SecurityError',
    'ReplyQueueLost', 'ResultEvicted', 'ImproperlyConfigured',
    'IncompleteStream', 'TaskRevokedError', 'MalformedResult', 'FrameError',
    'ContentDisallowed', 'ResultNotDelivered', 'ResultBackendClosed',
)

from kombu.exceptions import ContentDisallowed  # noqa: E402  (re-exported: refused content types)


class RPCResultsError(Exception):
    """Base class of the errors this library defines."""


# On 3.11+ asyncio.TimeoutError *is* the builtin; on 3.9/3.10 it is a distinct class.
_TIMEOUT_BASES: Tuple[type, ...] = (builtins.TimeoutError,)
if _asyncio.TimeoutError is not builtins.TimeoutError:  # pragma: no cover (3.9/3.10)
    _TIMEOUT_BASES += (_asyncio.TimeoutError,)


class TimeoutError(RPCResultsError, *_TIMEOUT_BASES):  # type: ignore[misc]
    """The operation timed out: also a builtin ``TimeoutError`` and an ``asyncio.TimeoutError``."""


class BacklogLimitExceeded(RPCResultsError):
    """Too many messages stood in the way of the wanted task's newest state."""


class SecurityError(RPCResultsError):
    """A payload asked for something we refuse to do (a non-exception class, an unlisted codec)."""


class ImproperlyConfigured(RPCResultsError):
    """The configuration is invalid or incomplete."""


class FrameError(RPCResultsError):
    """The byte stream is not valid AMQP for us: oversized, malformed or out-of-order frames."""


class IncompleteStream(RPCResultsError):
    """The stream ended in the middle of a frame."""


class TaskRevokedError(RPCResultsError):
    """The task was revoked before it produced a result."""


class MalformedResult(RPCResultsError):
    """A reply for this task could not be decoded into a result mapping."""

    def __init__(self, task_id: str, reason: str) -> None:
        super().__init__(task_id, reason)
        self.task_id = task_id
        self.reason = reason

    def __str__(self) -> str:
        return f'reply for task {self.task_id!r} is malformed: {self.reason}'


class _IdsError(RPCResultsError):
    """An error that names the task ids it concerns."""

    def __init__(self, task_ids: Iterable[str], detail: str = '') -> None:
        ids: Tuple[str, ...] = tuple(task_ids)
        super().__init__(ids, detail)
        self.task_ids = ids
        self.detail = detail

    def _names(self) -> str:
        shown = ', '.join(self.task_ids[:10])
        more = len(self.task_ids) - 10
        return shown + (f' and {more} more' if more > 0 else '')


class ReplyQueueLost(_IdsError):
    """The reply queue vanished (expired or deleted) while these results were pending.

    Results published into the old queue are gone; results published after the
    queue was re-declared still arrive, so waiting again is allowed.
    """

    def __str__(self) -> str:
        text = f'reply queue was lost while {len(self.task_ids)} result(s) were pending: {self._names()}'
        return f'{text} ({self.detail})' if self.detail else text


class ResultEvicted(_IdsError, LookupError):
    """These results arrived before anyone waited and were evicted from the bounded buffer."""

    def __str__(self) -> str:
        return (f'result(s) evicted from the early-arrival buffer before anyone asked for them: '
                f'{self._names()} (raise result_buffer_max to keep more)')


class ResultNotDelivered(RPCResultsError):
    """Worker side: the broker refused a result (a publisher-confirm nack)."""

    def __init__(self, task_id: str, reply_to: str, reason: str) -> None:
        super().__init__(f'result of {task_id} for reply queue {reply_to!r} was not delivered: {reason}')
        self.task_id = task_id
        self.reply_to = reply_to
        self.reason = reason


class ResultBackendClosed(RPCResultsError, ConnectionError):
    """The result backend was closed while this wait was in progress.

    Waits begun before ``close()`` get it instead of a silent reconnect; a wait begun
    after it opens the backend again.
    """

    def __init__(self, detail: str = 'the result backend was closed') -> None:
        super().__init__(detail)
