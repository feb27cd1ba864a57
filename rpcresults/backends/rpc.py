"""The RPC result backend: results travel as messages to the client's own reply queue.

Client side, :class:`ResultConsumer` consumes the reply queue (durable, not
auto-delete, ``x-expires``) through the engine's reply connection: manual acks
(only once a reply is in the state table), reconnects, and
:class:`~rpcresults.exceptions.ReplyQueueLost` when the queue vanished with
results pending. Worker side, :class:`RPCBackend` publishes each state to the
request's ``reply_to`` in Celery's exact format through a
:class:`~rpcresults.engine.publish.ResultPublisher`.
"""
from __future__ import annotations

import logging
import time
import uuid
from typing import Any, Dict, List, Optional, Tuple

import kombu

from .. import _fork, serialization
from ..engine.replyqueue import ReplyQueue
from ..engine.publish import DIRECT_REPLY_TO, ResultPublisher
from ..exceptions import BacklogLimitExceeded
from ..protocol import StateTable
from . import base
from .asynchronous import AsyncBackendMixin, BaseResultConsumer

__all__ = ('RPCBackend', 'ResultConsumer', 'BacklogLimitExceeded', 'make_state_table', 'DIRECT_REPLY_TO')

logger = logging.getLogger(__name__)

E_NO_GROUPS = ('The rpc:// result backend keeps no stored state, so it cannot {op} a group; '
               'use a key-value backend such as redis:// for saved groups.')


def make_state_table(accept: Any, buffer_max: int, keep_late: bool,
                     remember_max: Optional[int] = None) -> StateTable:
    """A state table decoding replies of the content types in ``accept``.

    ``remember_max``: how many evicted ids it remembers (None: 100 × ``buffer_max``, at least 100,000).
    """
    accept = frozenset(accept or ())

    def decode(body: bytes, content_type: Optional[str], content_encoding: Optional[str]) -> Any:
        return serialization.decode(body, content_type, content_encoding, accept)

    return StateTable(decode, buffer_max=buffer_max, keep_late=keep_late,
                      fast_json='application/json' in accept, remember_max=remember_max)


class ResultConsumer(BaseResultConsumer):
    """Consumes this client's reply queue (declared as ``backend.binding``) into the state table."""

    def __init__(self, backend: Any, app: Any, accept: Any, table: StateTable,
                 queue: Optional[ReplyQueue] = None) -> None:
        super().__init__(backend, app, accept, table, queue or ReplyQueue(lambda: backend.binding))


class RPCBackend(base.Backend, AsyncBackendMixin):
    """Result backend over AMQP reply queues (Celery's ``rpc://``, wire-compatible)."""

    Exchange = kombu.Exchange
    Producer = kombu.Producer
    ResultConsumer = ResultConsumer
    BacklogLimitExceeded = BacklogLimitExceeded

    persistent = False
    supports_autoexpire = True
    supports_native_join = True

    class Queue(kombu.Queue):
        """The reply queue; its declaration may be cached per connection."""

    def __init__(self, app: Any = None, connection: Any = None, exchange: Optional[str] = None,
                 exchange_type: Optional[str] = None, persistent: Optional[bool] = None,
                 serializer: Optional[str] = None, auto_delete: bool = False, url: Optional[str] = None,
                 **kwargs: Any) -> None:
        super().__init__(app, serializer=serializer, url=url or 'rpc://', **kwargs)
        conf = self.app.conf
        self.persistent = self.prepare_persistent(persistent)
        self.delivery_mode = 2 if self.persistent else 1
        self.exchange = self.Exchange('')  # the default exchange: routing key = queue name
        self.auto_delete = auto_delete
        self.reply_queue_expires = self.app.expires_seconds(conf.result_reply_queue_expires)
        self.oid = self.app.thread_oid
        self.publisher = ResultPublisher(
            self.app, connection=connection, serializer=self.serializer, delivery_mode=self.delivery_mode,
            mandatory=bool(conf.result_publish_mandatory), confirm=bool(conf.result_publish_confirm),
            confirm_timeout=conf.result_publish_confirm_timeout, retry_policy=self.retry_policy)
        self._consumer: Optional[ResultConsumer] = None  # made on first use: a worker never needs one
        self._declare_due = 0.0  # when on_task_call must declare the reply queue again
        _fork.register(self._after_fork)

    @property
    def result_consumer(self) -> ResultConsumer:
        """The consumer of this client's reply queue (made on first use)."""
        consumer = self._consumer
        if consumer is None:
            consumer = self._consumer = self.ResultConsumer(self, self.app, self.accept, self.new_table())
        return consumer

    def new_table(self) -> StateTable:
        """A new state table with this app's buffer settings."""
        conf = self.app.conf
        return make_state_table(self.accept, conf.result_buffer_max, conf.result_keep_late_replies,
                                conf.result_remember_max)

    # -- the reply queue ---------------------------------------------------------------------
    @property
    def binding(self) -> kombu.Queue:
        """The reply queue (as in Celery, a property): named after this client's oid, reached
        through the default exchange; ``backend.binding(channel)`` binds it to a channel."""
        return self.Queue(self.oid, self.exchange, self.oid, durable=True,
                          auto_delete=self.auto_delete, expires=self.reply_queue_expires)

    def on_task_call(self, producer: Any, task_id: str) -> None:
        """Declare the reply queue on the request's channel before the request is sent.

        Not once per connection, as a cached declaration would be: a client idle for
        longer than the queue's expiry (nobody consuming: its consumer connection was
        dropped) would send requests whose replies find no queue. The declaration is
        repeated whenever half the expiry has passed since the last one.
        """
        now = time.monotonic()
        if now < self._declare_due:
            return
        self.binding(producer.channel).declare()
        expires = self.reply_queue_expires
        self._declare_due = now + expires / 2 if expires else float('inf')

    def reply_properties(self, task_id: str) -> Dict[str, str]:
        """AMQP properties a request for ``task_id`` carries so its replies come here."""
        return {'reply_to': self.oid, 'correlation_id': task_id}

    def _after_fork(self) -> None:
        # New objects rather than clear(): a parent thread may have held their locks at fork time.
        self._cache = type(self._cache)(self._cache.limit)
        self.oid = str(uuid.uuid4())  # never shared with another backend of the child
        self._declare_due = 0.0
        if self._consumer is not None:
            self._consumer.on_after_fork()
        self.publisher.forget_after_fork()

    # -- worker side -------------------------------------------------------------------------
    def destination_for(self, task_id: str, request: Any) -> Tuple[Optional[str], str]:
        """``(reply_to, correlation_id)`` for a result of ``task_id`` answering ``request``."""
        if request is None:
            raise RuntimeError(
                f'RPC backend needs the task request (with reply_to) to send the result of {task_id!r}')
        reply_to = base.request_field(request, 'reply_to')
        correlation_id = base.request_field(request, 'correlation_id')
        return reply_to, correlation_id or task_id

    def on_reply_declare(self, task_id: str) -> Optional[List[Any]]:
        """Entities to declare when sending a result: none, the client owns its queue."""
        return None

    def store_result(self, task_id: str, result: Any, state: str, traceback: Optional[str] = None,
                     request: Any = None, **kwargs: Any) -> Any:
        """Publish ``state`` for ``task_id`` to the request's reply queue (nothing without reply_to)."""
        routing_key, correlation_id = self.destination_for(task_id, request)
        if not routing_key:
            return result
        body = self._get_result_meta(result=self.encode_result(result, state), state=state,
                                     traceback=traceback, request=request)
        body['task_id'] = task_id
        self.publisher.publish(body, routing_key, correlation_id, task_id, declare=self.on_reply_declare(task_id))
        return result

    def collect_returns(self, timeout: float = 0.0) -> int:
        """Handle returns the broker sent for our results; wait up to ``timeout`` for one (the count)."""
        return self.publisher.collect_returns(timeout)

    def worker_stats(self) -> Dict[str, int]:
        """Worker-side counters: results published, returned as unroutable, nacked by the broker."""
        return self.publisher.stats()

    # -- client side -------------------------------------------------------------------------
    def get_task_meta(self, task_id: str, backlog_limit: int = 1000) -> Dict[str, Any]:  # type: ignore[override]
        """Newest state of ``task_id`` after reading up to ``backlog_limit`` waiting replies.

        Every reply read lands in the state table (the newest per id wins, older ones
        are acked); more than ``backlog_limit`` replies in the way raises
        :class:`BacklogLimitExceeded`.
        """
        return self.result_consumer.poll(task_id, backlog_limit, self.BacklogLimitExceeded)

    poll = get_task_meta

    def _get_task_meta_for(self, task_id: str) -> Dict[str, Any]:
        return self.get_task_meta(task_id)

    def reload_task_result(self, task_id: str) -> Dict[str, Any]:
        """The newest state of ``task_id`` (as :meth:`get_task_meta`: nothing is stored to reload)."""
        return self.get_task_meta(task_id)

    def on_out_of_band_result(self, task_id: str, meta: Dict[str, Any]) -> None:
        """Keep a reply nobody waits for yet (it lands in the bounded early-arrival buffer)."""
        self.result_consumer.table.deliver(task_id, meta)

    def forget(self, task_id: str) -> None:
        """Drop what this client holds for ``task_id`` (nothing is stored server-side)."""
        self._cache.pop(task_id, None)
        self.result_consumer.table.forget(task_id)

    def save_group(self, group_id: str, result: Any) -> Any:
        """Not supported: rpc:// stores no groups, so this raises ``NotImplementedError``."""
        raise NotImplementedError(E_NO_GROUPS.format(op='save'))

    def restore_group(self, group_id: str, cache: bool = True) -> Any:
        """Not supported: rpc:// stores no groups, so this raises ``NotImplementedError``."""
        raise NotImplementedError(E_NO_GROUPS.format(op='restore'))

    def delete_group(self, group_id: str) -> None:
        """Not supported: rpc:// stores no groups, so this raises ``NotImplementedError``."""
        raise NotImplementedError(E_NO_GROUPS.format(op='delete'))

    def get_group_meta(self, group_id: str, cache: bool = True) -> Any:
        """Not supported: rpc:// stores no groups, so this raises ``NotImplementedError``."""
        raise NotImplementedError(E_NO_GROUPS.format(op='look up'))

    def ensure_chords_allowed(self) -> None:
        """rpc:// cannot count a chord's parts, so this raises ``NotImplementedError``."""
        raise NotImplementedError('The rpc:// result backend does not support chords.')

    def as_uri(self, include_password: bool = True) -> str:
        """Always ``rpc://``: the broker's URL is the app's, not the backend's."""
        return 'rpc://'

    def stats(self) -> Dict[str, int]:
        """Counters: received, dispatched, buffered, evicted, late, malformed, reconnects, ..."""
        consumer = self.result_consumer
        counters = consumer.table.counters()
        counters.update(consumer.stats())
        counters.update(self.worker_stats())
        counters['cached'] = len(self._cache)
        return counters

    def close(self) -> None:
        """Stop consuming and close both connections."""
        if self._consumer is not None:
            self._consumer.stop()
        self.publisher.close()
