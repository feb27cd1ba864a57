"""The waiting methods every backend has, over the wait core: one set, whatever the backend waits on.

A backend gives :meth:`Waiting.wait_source` (its reply consumer, or a polling
source for key-value stores); these methods do the rest through
:mod:`rpcresults.engine.wait`. Celery's names where Celery has them
(``wait_for_pending``, ``iter_native``); the asyncio ones are ours.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Set, Tuple

from ..engine import wait as core
from ..engine.polling import PollSource
from ..result import AsyncResult

__all__ = ('Waiting', 'SyncBackendMixin')

Meta = Dict[str, Any]


class Waiting:
    """Blocking and asyncio waits for result objects of this backend."""

    def wait_source(self, interval: float = 0.5) -> Any:
        """What this backend's waits wait on (see :mod:`rpcresults.engine.wait`)."""
        raise NotImplementedError

    def current_meta(self, result: Any) -> Meta:
        """The newest state of ``result`` this backend can tell now (``AsyncResult.state``)."""
        return self.get_task_meta(result.id)  # type: ignore[attr-defined,no-any-return]

    def known_meta(self, result: Any) -> Meta:
        """The newest state of ``result`` without new input where the backend has any (a store: a read)."""
        return self.current_meta(result)

    def refresh(self, results: Sequence[Any]) -> None:
        """Take in what already arrived for ``results`` before their states are read (a hook)."""

    def wait_for_pending(self, result: Any, timeout: Optional[float] = None, interval: float = 0.5,
                         no_ack: bool = True, on_message: Optional[Callable[[Meta], Any]] = None,
                         on_interval: Optional[Callable[[], Any]] = None,
                         callback: Optional[Callable[..., Any]] = None, propagate: bool = True) -> Any:
        """Block until ``result`` is final, then return its value (or raise its exception)."""
        value = core.wait_one(self.wait_source(interval), result, timeout, propagate, on_message,
                              on_interval, callback)
        self.on_result_fulfilled(result)
        return value

    def iter_native(self, result: Any, timeout: Optional[float] = None, interval: float = 0.5,
                    no_ack: bool = True, on_message: Optional[Callable[[Meta], Any]] = None,
                    on_interval: Optional[Callable[[], Any]] = None) -> Iterator[Tuple[Any, Any]]:
        """``(task_id, meta)`` for each member of the set ``result`` as it becomes final.

        As in Celery, a nested set yields ``(its id, its results)`` and the caller joins it.
        """
        leaves = []
        for node in result.results:
            if hasattr(node, 'results'):
                yield getattr(node, 'id', None), node.results
            else:
                leaves.append(node)
        if leaves:
            yield from core.iter_ready(self.wait_source(interval), leaves, timeout, on_message, on_interval)

    def join_values(self, results: Sequence[Any], timeout: Optional[float] = None, propagate: bool = True,
                    interval: float = 0.5, on_message: Optional[Callable[[Meta], Any]] = None,
                    on_interval: Optional[Callable[[], Any]] = None) -> List[Any]:
        """Every result's value in member order (``ResultSet.join_native`` of plain members)."""
        return core.join_values(self.wait_source(interval), results, timeout, propagate, on_message,
                                on_interval)

    async def await_pending(self, result: Any, timeout: Optional[float] = None,
                            propagate: bool = True) -> Any:
        """``wait_for_pending`` without blocking the loop (``AsyncResult.aget``)."""
        value = await core.await_one(self.wait_source(), result, timeout, propagate)
        self.on_result_fulfilled(result)
        return value

    async def ajoin_values(self, results: Sequence[Any], timeout: Optional[float] = None,
                           propagate: bool = True) -> List[Any]:
        """``join_values`` without blocking the loop (``ResultSet.ajoin_native``)."""
        return await core.ajoin_values(self.wait_source(), results, timeout, propagate)

    def aiter_ready(self, results: Sequence[Any], timeout: Optional[float] = None) -> core.aiter_ready:
        """``async for task_id, meta in ...``: each distinct id as it becomes final."""
        return core.aiter_ready(self.wait_source(), results, timeout)


class SyncBackendMixin(Waiting):
    """Waits for backends that are polled (no consumer): every ``interval`` seconds, one store round."""

    #: Waiting is driven by polling, not by a consumer.
    is_async = False

    def wait_source(self, interval: float = 0.5, max_iterations: Optional[int] = None) -> PollSource:
        """A polling source: each round is one :meth:`poll_round` of the ids still waited for."""
        return PollSource(self, interval, max_iterations)

    def add_pending_result(self, result: 'AsyncResult', weak: bool = False) -> 'AsyncResult':
        """Nothing to register for polled backends."""
        return result

    def remove_pending_result(self, result: 'AsyncResult') -> 'AsyncResult':
        """Nothing to unregister for polled backends."""
        return result

    def add_pending_results(self, results: Sequence['AsyncResult'], weak: bool = False) -> None:
        """Nothing to register for polled backends."""

    def remove_pending_results(self, results: Sequence['AsyncResult']) -> None:
        """Nothing to unregister for polled backends."""

    def get_many(self, task_ids: Iterable[str], timeout: Optional[float] = None, interval: float = 0.5,
                 no_ack: bool = True, on_message: Optional[Callable[[Meta], Any]] = None,
                 on_interval: Optional[Callable[[], Any]] = None,
                 max_iterations: Optional[int] = None) -> Iterator[Tuple[str, Meta]]:
        """Poll until every id is ready; yields ``(id, meta)`` as each one is (cached ones first).

        ``max_iterations`` store rounds at most, then it stops without a timeout (as Celery).
        """
        results = [AsyncResult(task_id, backend=self, app=self.app)  # type: ignore[attr-defined]
                   for task_id in dict.fromkeys(task_ids)]
        yield from core.iter_ready(self.wait_source(interval, max_iterations), results, timeout,
                                   on_message, on_interval)

    def wait_for(self, task_id: str, timeout: Optional[float] = None, interval: float = 0.5,
                 no_ack: bool = True, on_interval: Optional[Callable[[], Any]] = None) -> Meta:
        """Poll until ``task_id`` is ready or ``timeout`` passes (``TimeoutError``); its meta."""
        for _, meta in self.get_many([task_id], timeout=timeout, interval=interval, on_interval=on_interval):
            return meta
        raise TimeoutError(f'the operation timed out waiting for {task_id}')  # pragma: no cover

    def poll_round(self, task_ids: Set[str]) -> Dict[str, Meta]:
        """One polling round: the current meta of each id (stores with a bulk read override this)."""
        return {task_id: self._get_task_meta_for(task_id)  # type: ignore[attr-defined]
                for task_id in list(task_ids)}
