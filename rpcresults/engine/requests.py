"""A responder's requests, read like the replies: chunked socket reads and the frame parser.

:func:`request_channel_for` gives the channel adapter of :mod:`rpcresults.engine.channel`
that fits, reading requests instead of replies: each delivery comes out whole
(body, content type and encoding, the properties and headers) as an
:class:`IncomingRequest`, and every request that arrived in one read is handled as
one batch. Acks are the responder's: :meth:`RequestChannelMixin.settle_batch`
requeues the requests that could not be answered and acks the others at once.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Dict, List, Optional

import amqp
from amqp.serialization import decode_properties_basic

from .channel import AmqpReplyChannel, VirtualReplyChannel

__all__ = ('IncomingRequest', 'RequestBatch', 'request_channel_for')

logger = logging.getLogger(__name__)

#: Where the property flags start in a content header payload (class, weight, body size first).
PROPERTIES_OFFSET = 12


class IncomingRequest:
    """One request as read off the wire (what :class:`~rpcresults.responder.Request` is made from)."""

    __slots__ = ('delivery_tag', 'body', 'content_type', 'content_encoding', 'properties', 'headers',
                 'delivery_info')

    def __init__(self, delivery_tag: int, body: bytes, content_type: Optional[str],
                 content_encoding: Optional[str], properties: Dict[str, Any],
                 delivery_info: Optional[Dict[str, Any]] = None) -> None:
        self.delivery_tag = delivery_tag
        self.body = body
        self.content_type = content_type
        self.content_encoding = content_encoding
        self.properties = properties
        self.headers = properties.get('application_headers') or {}
        self.delivery_info = delivery_info or {'delivery_tag': delivery_tag}


class RequestBatch:
    """What the channel adapter hands requests to (it stands where the state table stands for replies)."""

    def __init__(self) -> None:
        self.requests: List[IncomingRequest] = []

    def deliver_many(self, deliveries: List[tuple]) -> int:
        """Parsed deliveries ``(tag, correlation_id, content_type, content_encoding, body, header)``."""
        for tag, _, content_type, content_encoding, body, header in deliveries:
            properties, _ = decode_properties_basic(header, PROPERTIES_OFFSET)
            self.requests.append(IncomingRequest(tag, body, content_type, content_encoding, properties))
        return len(deliveries)

    def add_message(self, message: Any) -> None:
        """A request read by the transport itself (py-amqp's reader, or a kombu virtual channel)."""
        properties = dict(message.properties or {})
        headers = getattr(message, 'headers', None)  # kombu's messages keep them apart
        if headers is not None and 'application_headers' not in properties:
            properties['application_headers'] = headers
        tag = message.delivery_tag if hasattr(message, 'delivery_tag') else message.delivery_info['delivery_tag']
        body = message.body
        content_type = getattr(message, 'content_type', None) or properties.get('content_type')
        encoding = getattr(message, 'content_encoding', None) or properties.get('content_encoding')
        if isinstance(body, str):
            body = body.encode(encoding or 'utf-8')
        self.requests.append(IncomingRequest(tag, body, content_type, encoding, properties,
                                             dict(getattr(message, 'delivery_info', None) or {})))

    def take(self) -> List[IncomingRequest]:
        """The requests read since the last take."""
        requests, self.requests = self.requests, []
        return requests


class RequestChannelMixin:
    """What the request adapters add to the reply adapters: whole messages out, the responder's acks."""

    channel: Any
    table: RequestBatch
    unacked: int
    acked: int

    def settle_batch(self, answered: List[int], requeue: List[int]) -> None:
        """Requeue the requests of tags ``requeue``, then ack those of tags ``answered``."""
        for tag in requeue:
            self.channel.basic_reject(tag, requeue=True)
        if answered:
            self._ack_answered(answered)
        self.unacked = 0

    def _ack_answered(self, tags: List[int]) -> None:
        raise NotImplementedError


class AmqpRequestChannel(RequestChannelMixin, AmqpReplyChannel):
    """Requests over py-amqp: our chunked reader and the parser keeping each content header."""

    keep_header = True

    def _on_message(self, message: amqp.Message) -> None:
        self.table.add_message(message)

    def _ack_answered(self, tags: List[int]) -> None:
        # every request of a batch is settled before the next read: one ack covers the answered
        # ones (the requeued ones are no longer outstanding)
        self.channel.basic_ack(max(tags), multiple=True)
        self.acked += len(tags)


class VirtualRequestChannel(RequestChannelMixin, VirtualReplyChannel):
    """Requests over a kombu virtual transport (``memory://``, Redis): one ack per request."""

    def _on_message(self, message: Any) -> None:
        self.table.add_message(message)

    def _ack_answered(self, tags: List[int]) -> None:
        for tag in tags:
            self.channel.basic_ack(tag)
        self.acked += len(tags)


def request_channel_for(channel: Any, batch: RequestBatch, on_cancel: Callable[[str], Any]) -> Any:
    """The request adapter that fits ``channel``."""
    if isinstance(channel, amqp.Channel):
        return AmqpRequestChannel(channel, batch, on_cancel)
    return VirtualRequestChannel(channel, batch, on_cancel)
