"""Sets of results: ResultSet (joined together) and GroupResult (a ResultSet with an id)."""
from __future__ import annotations

import time
from collections import deque
from typing import TYPE_CHECKING, Any, Callable, Deque, Dict, Iterable, Iterator, List, Optional, Tuple, Union

from . import _control, states
from ._current import app_or_default
from ._then import Callbacks
from ._raising import assert_will_not_block, rebuild_exception
from .asyncresult import AsyncResult, ResultBase
from .exceptions import TaskRevokedError, TimeoutError

if TYPE_CHECKING:  # pragma: no cover
    from .app import App

__all__ = ('ResultSet', 'GroupResult')

Meta = Dict[str, Any]
Callback = Callable[..., Any]


class ResultSet(ResultBase):
    """A list of results, joined together."""

    parent: Optional[ResultBase] = None

    def __init__(self, results: Optional[Iterable[ResultBase]] = None, app: Optional['App'] = None,
                 ready_barrier: Any = None, **kwargs: Any) -> None:
        self._app = app
        self.results: List[Any] = list(results or [])
        self._then: Optional[Callbacks] = None
        self._ready_barrier = ready_barrier

    @property
    def app(self) -> 'App':
        """The app given, else the first member's app, else the default app."""
        if self._app is None:
            self._app = self.results[0].app if self.results else app_or_default(None)
        return self._app

    @app.setter
    def app(self, app: 'App') -> None:
        self._app = app

    @property
    def backend(self) -> Any:
        """The first member's backend that has one (eager results have none), else the app's."""
        for result in self.results:
            backend = getattr(result, 'backend', None)
            if backend is not None:
                return backend
        return self.app.backend

    @property
    def supports_native_join(self) -> Optional[bool]:
        """Whether the first member's backend joins natively (``get()`` then uses ``join_native``);
        None for an empty set, as in Celery."""
        return self.results[0].supports_native_join if self.results else None

    # -- membership --------------------------------------------------------------------------
    def add(self, result: ResultBase) -> None:
        """Add ``result`` unless it is already a member."""
        if result not in self.results:
            self.results.append(result)

    def update(self, results: Iterable[ResultBase]) -> None:
        """Add every result that is not yet a member."""
        known = set(self.results)
        for result in results:
            if result not in known:
                self.results.append(result)
                known.add(result)

    def remove(self, result: Union[ResultBase, str]) -> None:
        """Remove ``result`` (a result or its id); KeyError when absent."""
        if isinstance(result, str):
            result = self.app.AsyncResult(result)
        try:
            self.results.remove(result)
        except ValueError:
            raise KeyError(result) from None

    def discard(self, result: Union[ResultBase, str]) -> None:
        """Remove ``result`` if it is a member."""
        try:
            self.remove(result)
        except KeyError:
            pass

    def clear(self) -> None:
        """Remove every member."""
        self.results[:] = []

    def __len__(self) -> int:
        return len(self.results)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.results)

    def __getitem__(self, index: Any) -> Any:
        return self.results[index]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ResultSet):
            return other.results == self.results
        return NotImplemented

    def __ne__(self, other: object) -> bool:
        result = self.__eq__(other)
        return result if result is NotImplemented else not result

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f'<{type(self).__name__}: [{", ".join(str(r.id) for r in self.results)}]>'

    # -- state -------------------------------------------------------------------------------
    def _refresh(self) -> None:
        """Read replies that already arrived, once for every member's backend (never blocks)."""
        by_backend: Dict[int, Tuple[Any, List[Any]]] = {}
        for result in self.results:
            backend = getattr(result, 'backend', None)
            if backend is not None and isinstance(result, AsyncResult):
                by_backend.setdefault(id(backend), (backend, []))[1].append(result)
        for backend, members in by_backend.values():
            backend.refresh(members)

    def _member_states(self) -> List[str]:
        self._refresh()
        result_states = []
        for result in self.results:
            if isinstance(result, ResultSet):
                result_states.append(states.SUCCESS if result.successful() else
                                     states.FAILURE if result.failed() else states.PENDING)
            else:
                result_states.append(result.known_meta()['status'])
        return result_states

    def successful(self) -> bool:
        """True when every member finished with SUCCESS (answered from what already arrived)."""
        return all(state == states.SUCCESS for state in self._member_states())

    def failed(self) -> bool:
        """True when any member finished with FAILURE (answered from what already arrived)."""
        return any(state == states.FAILURE for state in self._member_states())

    def waiting(self) -> bool:
        """True when any member is not ready yet (answered from what already arrived)."""
        return any(state not in states.READY_STATES for state in self._member_states())

    def ready(self) -> bool:
        """True when every member is ready (answered from what already arrived)."""
        return all(state in states.READY_STATES for state in self._member_states())

    def completed_count(self) -> int:
        """How many members succeeded (answered from what already arrived)."""
        return sum(1 for state in self._member_states() if state == states.SUCCESS)

    def maybe_throw(self, callback: Optional[Callback] = None, propagate: bool = True) -> None:
        """Raise the first failed member's exception, in member order, when ``propagate``.

        ``callback(id, value)`` is called for each member that does not raise.
        """
        for result in self.results:
            result.maybe_throw(callback=callback, propagate=propagate)

    maybe_reraise = maybe_throw

    def forget(self) -> None:
        """Forget every member, locally and in its backend."""
        for result in self.results:
            result.forget()

    def revoke(self, connection: Any = None, terminate: bool = False, signal: Optional[str] = None,
               wait: bool = False, timeout: Optional[float] = None) -> None:
        """Revoke every member with one control broadcast."""
        _control.revoke(self.app, [r.id for r in self.results], connection=connection, terminate=terminate,
                        signal=signal)

    # -- waiting -----------------------------------------------------------------------------
    def get(self, timeout: Optional[float] = None, propagate: bool = True, interval: float = 0.5,
            callback: Optional[Callback] = None, no_ack: bool = True,
            on_message: Optional[Callable[[Meta], Any]] = None, disable_sync_subtasks: bool = True,
            on_interval: Optional[Callable[[], Any]] = None) -> List[Any]:
        """``join_native`` when every backend supports it, else ``join``."""
        join = self.join_native if self.supports_native_join else self.join
        return join(timeout=timeout, propagate=propagate, interval=interval, callback=callback,
                    no_ack=no_ack, on_message=on_message, disable_sync_subtasks=disable_sync_subtasks,
                    on_interval=on_interval)

    def join(self, timeout: Optional[float] = None, propagate: bool = True, interval: float = 0.5,
             callback: Optional[Callback] = None, no_ack: bool = True,
             on_message: Optional[Callable[[Meta], Any]] = None, disable_sync_subtasks: bool = True,
             on_interval: Optional[Callable[[], Any]] = None) -> List[Any]:
        """Wait for each member in turn; ``timeout`` bounds the whole join."""
        if disable_sync_subtasks:
            assert_will_not_block()
        deadline = None if timeout is None else time.monotonic() + timeout
        values = []
        for result in self.results:
            remaining = None
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0 and not result.ready():
                    raise TimeoutError('join operation timed out')
                remaining = max(remaining, 0.0)
            value = result.get(timeout=remaining, propagate=propagate, interval=interval,
                               no_ack=no_ack, on_message=on_message, on_interval=on_interval)
            if callback is not None:
                callback(result.id, value)
            else:
                values.append(value)
        return values

    def join_native(self, timeout: Optional[float] = None, propagate: bool = True, interval: float = 0.5,
                    callback: Optional[Callback] = None, no_ack: bool = True,
                    on_message: Optional[Callable[[Meta], Any]] = None,
                    on_interval: Optional[Callable[[], Any]] = None,
                    disable_sync_subtasks: bool = True) -> List[Any]:
        """Wait for all members at once; values come back in member order (``[]`` when empty)."""
        if disable_sync_subtasks:
            assert_will_not_block()
        if not self.results:
            return []
        backend = self._common_backend()
        if callback is None and backend is not None:
            return backend.join_values(self.results, timeout=timeout, propagate=propagate,  # type: ignore[no-any-return]
                                       interval=interval, on_message=on_message, on_interval=on_interval)
        positions: Dict[Any, List[int]] = {}
        if callback is None:
            for index, result in enumerate(self.results):
                positions.setdefault(result.id, []).append(index)
        values: List[Any] = [None] * len(self.results)
        for task_id, meta in self.iter_native(timeout=timeout, interval=interval, no_ack=no_ack,
                                              on_message=on_message, on_interval=on_interval):
            if isinstance(meta, list):
                value = [member.get(propagate=propagate) for member in meta]
            else:
                value = meta.get('result')
                if meta.get('status') in states.PROPAGATE_STATES:
                    meta = rebuild_exception(self.backend, meta)
                    value = meta.get('result')
                    if propagate:
                        if not isinstance(value, BaseException):
                            value = TaskRevokedError(task_id)
                        raise value
            if callback is not None:
                callback(task_id, value)
            else:
                for index in positions.get(task_id, ()):
                    values[index] = value
        return values if callback is None else []

    def iter_native(self, timeout: Optional[float] = None, interval: float = 0.5, no_ack: bool = True,
                    on_message: Optional[Callable[[Meta], Any]] = None,
                    on_interval: Optional[Callable[[], Any]] = None) -> Iterator[Tuple[str, Any]]:
        """``(task_id, meta)`` for each member as it becomes final, in arrival order."""
        if not self.results:
            return iter(())
        return self.backend.iter_native(self, timeout=timeout, interval=interval, no_ack=no_ack,
                                        on_message=on_message, on_interval=on_interval)

    def _common_backend(self) -> Any:
        """The backend of every member when all are plain results of one backend of ours, else None."""
        backend = self.results[0].backend if self.results else None
        if backend is None or not hasattr(backend, 'join_values'):
            return None
        for result in self.results:
            if type(result) is not AsyncResult or result.backend is not backend:
                return None
        return backend

    async def ajoin_native(self, timeout: Optional[float] = None, propagate: bool = True) -> List[Any]:
        """``join_native()`` for asyncio: every value in member order, without blocking the loop."""
        if not self.results:
            return []
        backend = self._common_backend()
        if backend is not None:
            return await backend.ajoin_values(self.results, timeout=timeout, propagate=propagate)  # type: ignore[no-any-return]
        deadline = None if timeout is None else time.monotonic() + timeout
        values = []
        for result in self.results:  # mixed members (nested sets, eager results, other backends)
            remaining = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            if isinstance(result, ResultSet):
                values.append(await result.ajoin_native(remaining, propagate))
            else:
                values.append(await result.aget(remaining, propagate))
        return values

    def aiter_native(self, timeout: Optional[float] = None) -> 'NativeIterator':
        """``iter_native()`` for asyncio: ``async for task_id, meta in ...``, each as it becomes final;
        ``await it.aclose()`` stops waiting early."""
        return NativeIterator(self, timeout)

    def then(self, callback: Callback, on_error: Optional[Callback] = None, weak: bool = False) -> 'ResultSet':
        """Call ``callback(self)`` once every member is final."""
        if self._then is None:
            self._then = Callbacks()
        self._then.add(callback, on_error, weak)
        members = [r for r in self.results]
        if not members:
            self._then.fire(self, None)
            return self
        remaining = [len(members)]

        def member_done(_: Any) -> None:
            remaining[0] -= 1
            if remaining[0] == 0 and self._then is not None:
                self._then.fire(self, None)

        for member in members:
            member.then(member_done, on_error=member_done)
        return self


class GroupResult(ResultSet):
    """A ResultSet with an id: the result of a group of tasks."""

    def __init__(self, id: Optional[str] = None, results: Optional[Iterable[ResultBase]] = None,
                 parent: Optional[ResultBase] = None, **kwargs: Any) -> None:
        self.id = id
        self.parent = parent
        super().__init__(results, **kwargs)

    def _backend_for(self, backend: Any) -> Any:
        return backend if backend is not None else self.app.backend

    def save(self, backend: Any = None) -> 'GroupResult':
        """Store this group in a key-value backend (the RPC backend raises NotImplementedError)."""
        return self._backend_for(backend).save_group(self.id, self)

    def delete(self, backend: Any = None) -> None:
        """Delete the stored group."""
        self._backend_for(backend).delete_group(self.id)

    @classmethod
    def restore(cls, id: str, backend: Any = None, app: Optional['App'] = None) -> Optional['GroupResult']:
        """The group stored under ``id`` (``None`` when nothing is stored)."""
        app = app_or_default(app)
        backend = backend if backend is not None else app.backend
        return backend.restore_group(id)

    def as_tuple(self) -> Tuple[Any, List[Any]]:
        """``((id, parent_tuple), [member tuples])``: the inverse of :func:`result_from_tuple`."""
        parent = self.parent
        return ((self.id, parent and parent.as_tuple()),  # type: ignore[attr-defined]
                [result.as_tuple() for result in self.results])

    @property
    def children(self) -> List[Any]:
        """The members (Celery's name for ``results`` on a group)."""
        return self.results

    def __eq__(self, other: object) -> bool:
        if isinstance(other, GroupResult):
            return other.id == self.id and other.results == self.results and other.parent == self.parent
        if isinstance(other, str):
            return other == self.id
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __reduce__(self) -> Tuple[Any, Tuple[Any, ...]]:
        return self.__class__, (self.id, self.results, self.parent)

    def __repr__(self) -> str:
        return f'<GroupResult: {self.id} [{", ".join(str(r.id) for r in self.results)}]>'

    def __bool__(self) -> bool:
        return bool(self.id or self.results)



class NativeIterator:
    """``async for task_id, meta in resultset.aiter_native()``: each member as it becomes final.

    A nested set comes first as ``(its id, its results)``, as in ``iter_native``. Leaving
    the loop early unwatches once the iterator is dropped; ``await it.aclose()`` does it
    at once.
    """

    def __init__(self, resultset: ResultSet, timeout: Optional[float]) -> None:
        self._nested: Deque[Tuple[Any, Any]] = deque()
        leaves = []
        for node in resultset.results:
            if isinstance(node, ResultSet):
                self._nested.append((getattr(node, 'id', None), node.results))
            else:
                leaves.append(node)
        self._leaves: Any = resultset.backend.aiter_ready(leaves, timeout) if leaves else None

    def __aiter__(self) -> 'NativeIterator':
        return self

    async def __anext__(self) -> Tuple[Any, Any]:
        if self._nested:
            return self._nested.popleft()
        if self._leaves is None:
            raise StopAsyncIteration
        return await self._leaves.__anext__()  # type: ignore[no-any-return]

    async def aclose(self) -> None:
        """Stop waiting now."""
        if self._leaves is not None:
            await self._leaves.aclose()
