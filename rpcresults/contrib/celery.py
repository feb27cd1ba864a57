"""A drop-in result backend for Celery apps: Celery's ``rpc://`` with rpcresults' reader.

Switch an existing app with one setting::

    app.conf.result_backend = 'rpcresults.contrib.celery:RPCBackend'

:class:`RPCBackend` subclasses Celery's own ``celery.backends.rpc.RPCBackend``, so everything
a worker does (publishing states, the message format, the reply queue's name and arguments)
and every method Celery calls that this module does not override stay Celery's. Only the
client's reading side is replaced: the reply queue is consumed by rpcresults' consumer (our
socket reads, the compiled or pure state table, reconnects), and Celery's ``AsyncResult.get``,
``ResultSet.join_native``/``iter_native`` and ``AsyncResult.state`` are answered from it.
"""
from __future__ import annotations

import contextlib
import logging
import uuid
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

from celery.backends import rpc as celery_rpc
from celery.exceptions import TimeoutError as CeleryTimeoutError

from .. import _fork, serialization
from ..backends.rpc import ResultConsumer as _RPCResultConsumer
from ..backends.rpc import make_state_table
from ..engine import wait as core
from ..exceptions import TimeoutError as WaitTimeout
from ..protocol import StateTable

__all__ = ('RPCBackend', 'ResultConsumer')

logger = logging.getLogger(__name__)

Meta = Dict[str, Any]

#: Defaults of the rpcresults settings a Celery app does not have.
BUFFER_MAX = 10000
KEEP_LATE = True
REPLY_QUEUE_EXPIRES = 300.0


class ResultConsumer(_RPCResultConsumer):
    """rpcresults' reply-queue consumer, for Celery's result objects, built as Celery builds its own."""

    def __init__(self, backend: 'RPCBackend', app: Any, accept: Any,
                 pending_results: Any = None, pending_messages: Any = None) -> None:
        super().__init__(backend, app, accept, backend.new_table())

    def settled(self, result: Any) -> Optional[Meta]:
        """A Celery result keeps its final meta in ``_cache``."""
        return result._cache  # type: ignore[no-any-return]

    def settle(self, result: Any, meta: Meta) -> Meta:
        """Celery's own caching rule (``_maybe_set_cache``), then what the result holds.

        A result that already holds its final state (an ``EagerResult`` always does) keeps it.
        """
        cached = result._cache
        if cached is not None:
            return cached  # type: ignore[no-any-return]
        result._maybe_set_cache(meta)
        return result._cache or meta  # type: ignore[no-any-return]

    def cached(self, task_id: str) -> Optional[Meta]:
        """A final meta from Celery's result cache (``result_cache_max``)."""
        return self.backend._cache.get(task_id)  # type: ignore[no-any-return]

    @property
    def remember(self) -> Optional[Callable[[str, Meta], Any]]:
        """Final metas go to Celery's result cache too (it ignores them when disabled)."""
        return self.backend._cache.__setitem__  # type: ignore[no-any-return]

    def _after_fork(self) -> None:
        """Celery's name for the fork hook."""
        self.on_after_fork()


@contextlib.contextmanager
def _celery_timeout() -> Iterator[None]:
    """Celery's ``TimeoutError`` (what Celery users catch) instead of ours, at the deadline."""
    try:
        yield
    except WaitTimeout as exc:
        raise CeleryTimeoutError(str(exc)) from None


class RPCBackend(celery_rpc.RPCBackend):
    """Celery's ``rpc://`` backend whose client side reads replies with rpcresults."""

    ResultConsumer = ResultConsumer  # type: ignore[assignment]

    def __init__(self, app: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(app, *args, **kwargs)
        _fork.register(self._after_fork)  # Celery's own hook covers multiprocessing only, not os.fork()

    @property
    def binding(self) -> Any:
        """The reply queue, declared as rpcresults declares its own: durable, not auto-delete,
        ``x-expires`` of ``result_reply_queue_expires`` (default 300 s).

        Celery's is auto-delete, so the broker deletes it, and every reply in it, the moment
        the client's connection drops; this one outlives a cut, and the replies sent meanwhile
        wait in it for the reconnect. Workers never declare the reply queue, so this changes
        nothing for them.
        """
        expires = self.app.conf.get('result_reply_queue_expires', REPLY_QUEUE_EXPIRES)
        return self.Queue(self.oid, self.exchange, self.oid, durable=True, auto_delete=False,
                          expires=expires)

    def new_table(self) -> StateTable:
        """A state table with this app's buffer settings (rpcresults' defaults when unset)."""
        conf = self.app.conf
        return make_state_table(self.accept, conf.get('result_buffer_max', BUFFER_MAX),
                                conf.get('result_keep_late_replies', KEEP_LATE),
                                conf.get('result_remember_max'))

    # -- registering results -----------------------------------------------------------------
    def add_pending_result(self, result: Any, weak: bool = False, start_drainer: bool = True) -> Any:
        """Keep replies for ``result`` while the result object lives."""
        self.result_consumer.track(result)
        return result

    def add_pending_results(self, results: Iterable[Any], weak: bool = False) -> List[Any]:
        """Track every result in ``results``; returns them as a list, as Celery's method does."""
        return [self.add_pending_result(result, weak=weak) for result in results]

    def remove_pending_result(self, result: Any) -> Any:
        """Nothing to do: tracking ends when the result object is collected."""
        return result

    def on_result_fulfilled(self, result: Any) -> None:
        """Nothing to cancel: one reply queue serves every id."""

    # -- waiting -----------------------------------------------------------------------------
    def wait_for_pending(self, result: Any, callback: Optional[Callable[..., Any]] = None,
                         propagate: bool = True, timeout: Optional[float] = None,
                         on_message: Optional[Callable[[Meta], Any]] = None,
                         on_interval: Optional[Callable[[], Any]] = None, **kwargs: Any) -> Any:
        """What ``AsyncResult.get`` calls: wait on our consumer, then let Celery raise or return."""
        self._ensure_not_eager()
        with _celery_timeout():
            return core.wait_one(self.result_consumer, result, timeout, propagate, on_message, on_interval,
                                 callback)

    def iter_native(self, result: Any, timeout: Optional[float] = None, interval: float = 0.5,
                    no_ack: bool = True, on_message: Optional[Callable[[Meta], Any]] = None,
                    on_interval: Optional[Callable[[], Any]] = None,
                    **kwargs: Any) -> Iterator[Tuple[str, Any]]:
        """What ``ResultSet.join_native`` consumes: ``(task_id, meta)`` as members become final.

        As in Celery, a nested set yields ``(its id, its results)`` and the caller joins it.
        """
        self._ensure_not_eager()
        leaves = []
        for node in result.results:
            if hasattr(node, '_cache'):
                leaves.append(node)
            else:
                yield node.id, node.children
        if leaves:
            with _celery_timeout():
                yield from core.iter_ready(self.result_consumer, leaves, timeout, on_message, on_interval)

    # -- polling -----------------------------------------------------------------------------
    def get_task_meta(self, task_id: str, backlog_limit: int = 1000) -> Meta:
        """What ``AsyncResult.state`` reads: the newest state after reading what already arrived."""
        return self.result_consumer.poll(task_id, backlog_limit, self.BacklogLimitExceeded)

    poll = get_task_meta

    def exception_to_python(self, exc: Any) -> Any:
        """Celery's rebuild, except that a class outside ``Exception`` (``SystemExit``,
        ``KeyboardInterrupt``, ...) becomes a stand-in ``Exception`` subclass with its name,
        so ``except Exception`` catches what ``get()`` raises."""
        rebuilt = super().exception_to_python(exc)
        if isinstance(rebuilt, BaseException) and not isinstance(rebuilt, Exception):
            cls = type(rebuilt)
            stand_in = serialization.synthetic_exception_class(cls.__name__, cls.__module__)
            rebuilt = stand_in(*rebuilt.args)
        return rebuilt

    def task_result_exists(self, task_id: str) -> bool:
        """What Celery 5.7's ``AsyncResult.exists()`` calls: a state beyond PENDING is known."""
        return bool(self.get_task_meta(task_id)['status'] != 'PENDING')

    def forget(self, task_id: str) -> None:
        """What ``AsyncResult.forget`` calls: drop the cached meta and any reply held for ``task_id``."""
        self._cache.pop(task_id, None)
        self.result_consumer.table.forget(task_id)

    def _after_fork(self) -> None:
        for mapping in self._pending_results:
            mapping.clear()
        self._cache.clear()
        self.oid = str(uuid.uuid4())  # the child never shares the parent's reply queue
        # Celery stamps requests with app.thread_oid, a thread-local the fork kept: make it ours
        self.app._local.oid = self.oid
        self.result_consumer.on_after_fork()

    # -- ours --------------------------------------------------------------------------------
    def stats(self) -> Dict[str, int]:
        """rpcresults' counters for this client: received, dispatched, buffered, reconnects, ..."""
        consumer = self.result_consumer
        counters = dict(consumer.table.counters())
        counters.update(consumer.stats())
        counters['cached'] = len(self._cache)
        return counters

    def close(self) -> None:
        """Stop consuming and close the reply connection (Celery's backend has no close)."""
        self.result_consumer.stop()
