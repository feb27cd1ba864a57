"""Reply-queue consumption on a kombu channel, reduced to ``on_reply(...)`` calls plus acks.

Two adapters with one interface: py-amqp channels (the real broker) hand us the
raw ``amqp.Message`` and we batch acks with ``multiple=True``; kombu's virtual
channels (``memory://`` and friends) build their own message objects and ack
one tag at a time. Neither builds a kombu ``Message`` on the AMQP path.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Callable, List, Optional

import amqp

logger = logging.getLogger(__name__)

__all__ = ('ReplyChannel', 'reply_channel_for', 'detach_after_fork')

OnReply = Callable[[Optional[str], Optional[str], Optional[str], bytes], Any]
OnCancel = Callable[[str], Any]


class ReplyChannel:
    """Consume one queue on one channel, feeding ``on_reply``; ack what it has handled."""

    def __init__(self, channel: Any, on_reply: OnReply, on_cancel: OnCancel) -> None:
        self.channel = channel
        self.on_reply = on_reply
        self.on_cancel = on_cancel
        self.consumer_tag: Optional[str] = None
        self.unacked = 0
        self.acked = 0

    def consume(self, queue: str, consumer_tag: str) -> None:
        raise NotImplementedError

    def flush_acks(self) -> None:
        """Ack every reply handed to ``on_reply`` so far."""
        raise NotImplementedError

    def cancel(self) -> None:
        """Stop consuming (best effort: the connection may already be gone)."""
        tag, self.consumer_tag = self.consumer_tag, None
        if tag is not None:
            self.channel.basic_cancel(tag)

    def _handle(self, correlation_id: Optional[str], content_type: Optional[str],
                content_encoding: Optional[str], body: Any) -> None:
        if isinstance(body, str):
            body = body.encode(content_encoding or 'utf-8')
        try:
            self.on_reply(correlation_id, content_type, content_encoding, body)
        except Exception:  # a bug must not wedge the queue: log it, ack, go on
            logger.exception('error while dispatching a reply for %s', correlation_id)


class AmqpReplyChannel(ReplyChannel):
    """py-amqp channel: raw messages, acks batched with ``multiple=True``."""

    def __init__(self, channel: Any, on_reply: OnReply, on_cancel: OnCancel) -> None:
        super().__init__(channel, on_reply, on_cancel)
        self._last_tag = 0

    def consume(self, queue: str, consumer_tag: str) -> None:
        self._last_tag = 0
        self.unacked = 0
        self.consumer_tag = self.channel.basic_consume(
            queue=queue, consumer_tag=consumer_tag, no_ack=False,
            callback=self._on_message, on_cancel=self.on_cancel)

    def _on_message(self, message: amqp.Message) -> None:
        properties = message.properties
        self._handle(properties.get('correlation_id'), properties.get('content_type'),
                     properties.get('content_encoding'), message.body)
        self._last_tag = message.delivery_info['delivery_tag']
        self.unacked += 1

    def flush_acks(self) -> None:
        if self.unacked:
            self.channel.basic_ack(self._last_tag, multiple=True)
            self.acked += self.unacked
            self.unacked = 0


class VirtualReplyChannel(ReplyChannel):
    """kombu virtual channel (``memory://``, Redis transport, ...): acks one tag at a time."""

    def __init__(self, channel: Any, on_reply: OnReply, on_cancel: OnCancel) -> None:
        super().__init__(channel, on_reply, on_cancel)
        self._tags: List[Any] = []

    def consume(self, queue: str, consumer_tag: str) -> None:
        self._tags = []
        self.unacked = 0
        self.channel.basic_consume(queue, no_ack=False, callback=self._on_message,
                                   consumer_tag=consumer_tag)
        self.consumer_tag = consumer_tag

    def _on_message(self, message: Any) -> None:
        self._handle(message.properties.get('correlation_id'), message.content_type,
                     message.content_encoding, message.body)
        self._tags.append(message.delivery_tag)
        self.unacked += 1

    def flush_acks(self) -> None:
        tags, self._tags = self._tags, []
        for tag in tags:
            self.channel.basic_ack(tag)
        self.acked += len(tags)
        self.unacked = 0


def reply_channel_for(channel: Any, on_reply: OnReply, on_cancel: OnCancel) -> ReplyChannel:
    """The adapter that fits ``channel``."""
    if isinstance(channel, amqp.Channel):
        return AmqpReplyChannel(channel, on_reply, on_cancel)
    return VirtualReplyChannel(channel, on_reply, on_cancel)


def detach_after_fork(connection: Any) -> None:
    """Let go of a connection inherited from the parent without touching the parent's socket.

    Closing normally would send ``connection.close`` or ``shutdown()`` the socket the
    parent still uses; closing only our copy of the file descriptor leaves it alone.
    """
    if connection is None:
        return
    transport = getattr(getattr(connection, '_connection', None), 'transport', None)
    sock = getattr(transport, 'sock', None)
    if sock is not None:
        try:
            os.close(sock.detach())
        except OSError:
            pass
    try:
        connection._connection = None
        connection._default_channel = None
    except AttributeError:
        pass
