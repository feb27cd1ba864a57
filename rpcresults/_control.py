"""Celery's remote-control broadcast, for the one command results need: ``revoke``."""
from __future__ import annotations

from typing import Any, List, Optional

from kombu.pidbox import Mailbox

__all__ = ('revoke', 'mailbox')

TERM_SIGNAME = 'SIGTERM'


def mailbox(app: Any) -> Mailbox:
    """Celery's control mailbox: fanout exchange ``<control_exchange>.pidbox``, JSON bodies."""
    return Mailbox(app.conf.get('control_exchange', 'celery'), type='fanout', accept=['json'],
                   serializer='json')


def revoke(app: Any, task_ids: List[str], connection: Any = None, terminate: bool = False,
           signal: Optional[str] = None) -> None:
    """Broadcast ``revoke`` for ``task_ids`` so Celery workers skip (or terminate) them."""
    arguments = {'task_id': task_ids[0] if len(task_ids) == 1 else task_ids,
                 'terminate': terminate, 'signal': signal or TERM_SIGNAME}
    owned = connection is None
    conn = app.connection() if owned else connection
    try:
        mailbox(app)(conn)._broadcast('revoke', arguments, None, False)
    finally:
        if owned:
            conn.release()
