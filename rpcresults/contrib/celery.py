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

import logging
import uuid
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

from celery.backends import rpc as celery_rpc
from celery.exceptions import TimeoutError as CeleryTimeoutError

from .. import _fork
from .._drain import StateTable
from ..backends.asynchronous import AsyncBackendMixin
from ..backends.rpc import ResultConsumer as _RPCResultConsumer
from ..backends.rpc import RPCBackend as _OurRPCBackend
from ..backends.rpc import make_state_table
from ..exceptions import TimeoutError as WaitTimeout

__all__ = ('RPCBackend', 'ResultConsumer')

logger = logging.getLogger(__name__)

Meta = Dict[str, Any]

#: Defaults of the rpcresults settings a Celery app does not have.
BUFFER_MAX = 10000
KEEP_LATE = True


class _NoCache(dict):
    """Celery's disabled cache (``result_cache_max = -1``) with the ``limit`` our reader reads."""

    limit = 0

    def __setitem__(self, key: Any, value: Any) -> None:
        pass


def _adopt(results: Iterable[Any]) -> None:
    """Give Celery result objects the one attribute our consumer keeps on results it tracks."""
    for result in results:
        if not hasattr(result, '_tracked_by'):
            result._tracked_by = None


class ResultConsumer(_RPCResultConsumer):
    """rpcresults' reply-queue consumer, constructed the way Celery's backend constructs its own."""

    def __init__(self, backend: 'RPCBackend', app: Any, accept: Any,
                 pending_results: Any = None, pending_messages: Any = None) -> None:
        super().__init__(backend, app, accept, backend._new_table())

    def track(self, result: Any) -> None:
        _adopt((result,))
        super().track(result)

    def iter_ready(self, results: Any, *args: Any, **kwargs: Any) -> Iterator[Tuple[str, Meta]]:
        """Ours, raising Celery's ``TimeoutError`` (what Celery users catch) at the deadline."""
        _adopt(results)
        try:
            yield from super().iter_ready(results, *args, **kwargs)
        except WaitTimeout as exc:
            raise CeleryTimeoutError(str(exc)) from None

    def _after_fork(self) -> None:
        """Celery's name for the fork hook."""
        self.on_after_fork()


class RPCBackend(celery_rpc.RPCBackend):
    """Celery's ``rpc://`` backend whose client side reads replies with rpcresults."""

    ResultConsumer = ResultConsumer  # type: ignore[assignment]

    def __init__(self, app: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(app, *args, **kwargs)
        if not hasattr(self._cache, 'limit'):
            self._cache = _NoCache()
        _fork.register(self)  # Celery's own hook covers multiprocessing only, not a bare os.fork()

    def _new_table(self) -> StateTable:
        conf = self.app.conf
        return make_state_table(self.accept, conf.get('result_buffer_max', BUFFER_MAX),
                                conf.get('result_keep_late_replies', KEEP_LATE))

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
        return AsyncBackendMixin.wait_for_pending(self, result, timeout=timeout, on_message=on_message,
                                                  on_interval=on_interval, callback=callback,
                                                  propagate=propagate)

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
            yield from self.result_consumer.iter_ready(leaves, timeout=timeout, on_message=on_message,
                                                       on_interval=on_interval)

    # -- polling -----------------------------------------------------------------------------
    #: What ``AsyncResult.state`` reads: the newest state after reading what already arrived.
    get_task_meta = _OurRPCBackend.get_task_meta

    poll = get_task_meta

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
        counters = dict(self.result_consumer.table.counters())
        counters.update(self.result_consumer.stats())
        counters['cached'] = len(self._cache)
        return counters

    def close(self) -> None:
        """Stop consuming and close the reply connection (Celery's backend has no close)."""
        self.result_consumer.stop()
