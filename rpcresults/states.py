"""Task states and their precedence (Celery's names and order)."""
from __future__ import annotations

from typing import Optional

__all__ = (
    'PENDING', 'RECEIVED', 'STARTED', 'SUCCESS', 'FAILURE', 'REVOKED',
    'REJECTED', 'RETRY', 'IGNORED', 'READY_STATES', 'UNREADY_STATES',
    'EXCEPTION_STATES', 'PROPAGATE_STATES', 'ALL_STATES', 'precedence', 'state',
)

PENDING = 'PENDING'
RECEIVED = 'RECEIVED'
STARTED = 'STARTED'
SUCCESS = 'SUCCESS'
FAILURE = 'FAILURE'
REVOKED = 'REVOKED'
REJECTED = 'REJECTED'
RETRY = 'RETRY'
IGNORED = 'IGNORED'

#: Highest precedence first; ``None`` stands for every custom state.
PRECEDENCE = [SUCCESS, FAILURE, None, REVOKED, STARTED, RECEIVED, REJECTED, RETRY, PENDING]
_PRECEDENCE_LOOKUP = {name: index for index, name in enumerate(PRECEDENCE)}
_CUSTOM = _PRECEDENCE_LOOKUP[None]

READY_STATES = frozenset({SUCCESS, FAILURE, REVOKED})
UNREADY_STATES = frozenset({PENDING, RECEIVED, STARTED, REJECTED, RETRY})
EXCEPTION_STATES = frozenset({RETRY, FAILURE, REVOKED})
PROPAGATE_STATES = frozenset({FAILURE, REVOKED})
ALL_STATES = frozenset({PENDING, RECEIVED, STARTED, SUCCESS, FAILURE, RETRY, REVOKED})


def precedence(state: Optional[str]) -> int:
    """Rank of ``state``: lower is stronger; custom states rank between FAILURE and REVOKED."""
    return _PRECEDENCE_LOOKUP.get(state, _CUSTOM)


class state(str):
    """A state name that compares by precedence: ``state(SUCCESS) > state(PENDING)``."""

    def __gt__(self, other: str) -> bool:
        return precedence(self) < precedence(other)

    def __ge__(self, other: str) -> bool:
        return precedence(self) <= precedence(other)

    def __lt__(self, other: str) -> bool:
        return precedence(self) > precedence(other)

    def __le__(self, other: str) -> bool:
        return precedence(self) >= precedence(other)

    __hash__ = str.__hash__
