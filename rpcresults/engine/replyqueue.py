"""The queue a client's replies wait in, and what to declare for it (see :class:`ReplyQueue`)."""
from __future__ import annotations

from typing import Any, Callable, Optional, Tuple

import kombu

from .channel import ReplyChannel

__all__ = ('ReplyQueue',)


class ReplyQueue:
    """The queue a client's replies wait in: its own reply queue, declared by ``binding``.

    ``binding`` returns the kombu Queue to declare (the name follows the client's oid,
    which changes in a forked child). After a reconnect the queue is first looked for
    passively: when it is gone (it expired, the broker lost it) the replies it held are
    gone too, which :meth:`report_lost` tells every pending waiter.
    """

    #: Consume without acks.
    no_ack = False
    #: Whether a poll can send a marker through it (a real queue; not the direct reply-to one).
    countable = True

    def __init__(self, binding: Callable[[], kombu.Queue]) -> None:
        self.binding = binding

    @property
    def name(self) -> str:
        """The queue to consume."""
        return self.binding().name

    def check(self, connection: kombu.Connection) -> None:
        """Refuse a broker this queue cannot live on (before any connection attempt)."""

    def setup(self, connection: kombu.Connection, channel: Any, reconnect: bool) -> Tuple[Any, Optional[str]]:
        """Declare the queue on ``channel``: ``(the channel to consume on, why replies were lost or None)``."""
        lost = None
        if reconnect:
            try:
                channel.queue_declare(queue=self.name, passive=True)
            except connection.channel_errors:
                lost = 'the reply queue was gone when the connection came back'
                channel = connection.channel()  # the refused passive declare closed the old one
        self.binding()(channel).declare()
        return channel, lost

    def consume_again(self, replies: ReplyChannel, tag: str) -> str:
        """The broker cancelled our consumer (the queue was deleted): declare, consume; why replies were lost."""
        self.binding()(replies.channel).declare()
        replies.consume(self.name, tag)
        return 'the reply queue was deleted by the broker'

    def report_lost(self, table: Any, error: Callable[[list], BaseException]) -> list:
        """Tell the waiters of every pending id that their replies are gone; returns those ids."""
        return table.fail_pending(error)
