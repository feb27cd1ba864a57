"""Single results: AsyncResult (a task that may not have finished yet) and EagerResult (one that has).

A result object asks its backend for everything it does not know yet, through
the backend's methods (``wait_for_pending``, ``await_pending``, ``current_meta``,
``known_meta``, ``watch_then``); the backend hands final states back through
:meth:`AsyncResult.settle`, the one place where a result decides what it keeps.
"""
from __future__ import annotations

import asyncio
import logging
from collections import deque
from datetime import datetime
from typing import TYPE_CHECKING, Any, Callable, Deque, Dict, Generator, Iterator, List, Optional, Tuple

from . import _control, states
from ._current import app_or_default
from ._meta import ErrorMeta, error_meta
from ._raising import assert_will_not_block, rebuild_exception, remote_traceback
from ._then import Callbacks
from .exceptions import ImproperlyConfigured, IncompleteStream, MalformedResult, TaskRevokedError, TimeoutError
from .graph import DependencyGraph

if TYPE_CHECKING:  # pragma: no cover
    from .app import App

__all__ = ('ResultBase', 'AsyncResult', 'EagerResult', 'result_from_tuple', 'DependencyGraph')

Meta = Dict[str, Any]
Callback = Callable[..., Any]

logger = logging.getLogger('rpcresults.result')


class ResultBase:
    """Base of every result object."""

    __slots__ = ()


class AsyncResult(ResultBase):
    """The result of a task that may not have finished yet."""

    TimeoutError = TimeoutError

    # Slots: tens of thousands of these may be pending at once (no per-object __dict__).
    __slots__ = ('app', 'id', '_backend', '_task_name', 'parent', '_cache', '_then', 'ignored',
                 '__weakref__')

    def __init__(self, id: str, backend: Any = None, task_name: Optional[str] = None,
                 app: Optional['App'] = None, parent: Optional[ResultBase] = None) -> None:
        if id is None:
            raise ValueError(f'AsyncResult requires a valid id, not {type(id)}')
        self.app = app_or_default(app or getattr(backend, 'app', None))
        self.id = id
        # Bound now, as Celery does: the reply goes to the queue of the thread that made the result.
        self._backend = backend if backend is not None else self._default_backend()
        self._task_name = task_name
        self.parent = parent
        self._cache: Optional[Meta] = None
        self._then: Optional[Callbacks] = None
        self.ignored = False

    # -- identity ----------------------------------------------------------------------------
    def _default_backend(self) -> Any:
        return self.app.backend

    @property
    def name(self) -> Optional[str]:
        """The task name: from the worker's extended meta when it sent one, else as given."""
        if self._task_name is None and self._cache is not None:
            return self._cache.get('name')
        if self._task_name is None:
            return self._get_task_meta().get('name')
        return self._task_name

    @name.setter
    def name(self, value: Optional[str]) -> None:
        self._task_name = value

    @property
    def backend(self) -> Any:
        """The backend this result reads from (the app's backend of the thread that made it)."""
        if self._backend is None:
            self._backend = self.app.backend
        return self._backend

    @backend.setter
    def backend(self, value: Any) -> None:
        self._backend = value

    @property
    def task_id(self) -> str:
        """Compatible alias of ``id``."""
        return self.id

    @task_id.setter
    def task_id(self, value: str) -> None:
        self.id = value

    @property
    def supports_native_join(self) -> bool:
        """True when this result's backend can wait for many results at once (``join_native``)."""
        return self.backend.supports_native_join

    def __eq__(self, other: object) -> bool:
        if isinstance(other, AsyncResult):
            return other.id == self.id
        if isinstance(other, str):
            return other == self.id
        return NotImplemented

    def __ne__(self, other: object) -> bool:
        result = self.__eq__(other)
        return result if result is NotImplemented else not result

    def __hash__(self) -> int:
        return hash(self.id)

    def __repr__(self) -> str:
        return f'<{type(self).__name__}: {self.id}>'

    def __str__(self) -> str:
        return str(self.id)

    def __reduce__(self) -> Tuple[Any, Tuple[Any, ...]]:
        return self.__class__, (self.id, None, self._task_name, None, self.parent)

    def __copy__(self) -> 'AsyncResult':
        return self.__class__(self.id, self._backend, self._task_name, self.app, self.parent)

    def as_tuple(self) -> Tuple[Any, None]:
        """``((id, parent_tuple), None)``: the inverse of :func:`result_from_tuple`."""
        parent = self.parent
        return (self.id, parent and parent.as_tuple()), None  # type: ignore[attr-defined]

    def as_list(self) -> List[str]:
        """This id followed by the ids of its parents."""
        ids = [self.id]
        parent = self.parent
        if parent is not None:
            ids.extend(parent.as_list())  # type: ignore[attr-defined]
        return ids

    # -- state -------------------------------------------------------------------------------
    @property
    def settled(self) -> Optional[Meta]:
        """The final state this result holds (exceptions and children rebuilt), else None."""
        return self._cache

    def settle(self, meta: Meta) -> Meta:
        """Keep ``meta`` as this result's state when it is final (and fire ``then()``); returns
        the meta the result now answers from.

        The one caching rule: a final meta of the task is kept, once; anything else
        (a PENDING or intermediate state, an error of ours such as a lost reply queue,
        which a real reply may still replace) is returned but not kept.
        """
        if self._cache is not None:
            return self._cache
        if meta is None or meta.get('status') not in states.READY_STATES or isinstance(meta, ErrorMeta):
            return meta
        meta = rebuild_exception(self.backend, meta)
        children = meta.get('children')
        if children:
            meta = dict(meta)
            try:
                meta['children'] = [result_from_tuple(child, self.app) for child in children]
            except Exception as exc:  # a sender's malformed children: this result's error, not a crash
                return error_meta(self.id, MalformedResult(self.id, f'invalid children: {exc}'))
        self._cache = meta
        if self._then is not None:
            self._fire_then()
        return meta

    def _get_task_meta(self) -> Meta:
        if self._cache is not None:
            return self._cache
        return self.settle(self.backend.current_meta(self))

    def known_meta(self) -> Meta:
        """The newest state known without waiting for new input (a reply backend reads nothing)."""
        if self._cache is not None:
            return self._cache
        return self.settle(self.backend.known_meta(self))

    def _meta_value(self, key: str, default: Any = None) -> Any:
        return rebuild_exception(self.backend, self._get_task_meta()).get(key, default)

    @property
    def state(self) -> str:
        """The newest known state (reads replies that already arrived; never blocks)."""
        return self._get_task_meta()['status']

    status = state

    @property
    def result(self) -> Any:
        """The return value, or the exception for failed / retried / revoked tasks."""
        return self._meta_value('result')

    info = result

    @property
    def traceback(self) -> Optional[str]:
        """The worker's formatted traceback when the task failed, else ``None``."""
        return self._get_task_meta().get('traceback')

    @property
    def children(self) -> Optional[List[ResultBase]]:
        """Results of the tasks this task started (as the worker reported them), else ``None``."""
        return self._get_task_meta().get('children')

    @property
    def date_done(self) -> Optional[datetime]:
        """When the task finished, as a datetime (``None`` before then or when the worker sent none)."""
        value = self._get_task_meta().get('date_done')
        if isinstance(value, str):
            try:
                return datetime.fromisoformat(value)
            except ValueError:
                return None
        return value

    @property
    def args(self) -> Any:
        """The task's positional arguments; only when the worker sends extended results."""
        return self._get_task_meta().get('args')

    @property
    def kwargs(self) -> Any:
        """The task's keyword arguments; only when the worker sends extended results."""
        return self._get_task_meta().get('kwargs')

    @property
    def worker(self) -> Optional[str]:
        """Hostname of the worker that ran the task; only when the worker sends extended results."""
        return self._get_task_meta().get('worker')

    @property
    def retries(self) -> Optional[int]:
        """How many times the task was retried; only when the worker sends extended results."""
        return self._get_task_meta().get('retries')

    @property
    def queue(self) -> Optional[str]:
        """The queue the task was delivered from; only when the worker sends extended results."""
        return self._get_task_meta().get('queue')

    def ready(self) -> bool:
        """True when the task finished (SUCCESS, FAILURE or REVOKED)."""
        return self.state in states.READY_STATES

    def successful(self) -> bool:
        """True when the task finished with SUCCESS."""
        return self.state == states.SUCCESS

    def failed(self) -> bool:
        """True when the task finished with FAILURE."""
        return self.state == states.FAILURE

    def exists(self) -> bool:
        """True when the backend has a result for this task (a state beyond PENDING, Celery 5.7's
        ``exists()``): tells a task still pending from an id nobody knows."""
        if self._cache is not None:
            return True
        return bool(self.backend.task_result_exists(self.id))

    # -- waiting -----------------------------------------------------------------------------
    def get(self, timeout: Optional[float] = None, propagate: bool = True, interval: float = 0.5,
            no_ack: bool = True, follow_parents: bool = True, callback: Optional[Callback] = None,
            on_message: Optional[Callable[[Meta], Any]] = None,
            on_interval: Optional[Callable[[], Any]] = None, disable_sync_subtasks: bool = True,
            EXCEPTION_STATES: frozenset = states.EXCEPTION_STATES,
            PROPAGATE_STATES: frozenset = states.PROPAGATE_STATES) -> Any:
        """Wait for the result and return it (or raise the task's exception when ``propagate``).

        ``timeout`` is honoured exactly (``0`` looks once); ``on_message`` receives every
        state of this task while this call waits.
        """
        if self.ignored:
            return None
        if disable_sync_subtasks:
            assert_will_not_block()
        if follow_parents and propagate and self.parent is not None:
            self._maybe_reraise_parent_error()
        if self._cache is not None:
            if on_message is not None:
                on_message(self._cache)
            return self.maybe_throw(callback=callback, propagate=propagate)
        backend = self.backend
        backend.add_pending_result(self)
        return backend.wait_for_pending(self, timeout=timeout, interval=interval, no_ack=no_ack,
                                        on_message=on_message, on_interval=on_interval,
                                        callback=callback, propagate=propagate)

    wait = get

    # -- asyncio (driven by rpcresults.aio) --------------------------------------------------
    async def aget(self, timeout: Optional[float] = None, propagate: bool = True,
                   follow_parents: bool = True) -> Any:
        """``get()`` for asyncio: waits without blocking the loop; cancelling stops the wait."""
        if self.ignored:
            return None
        if follow_parents and propagate and self.parent is not None:
            # what the parents' states are, read off the loop
            await asyncio.get_running_loop().run_in_executor(None, self._maybe_reraise_parent_error)
        if self._cache is not None:
            return self.maybe_throw(propagate=propagate)
        backend = self.backend
        backend.add_pending_result(self)
        return await backend.await_pending(self, timeout=timeout, propagate=propagate)

    def __await__(self) -> Generator[Any, None, Any]:
        """``await result`` is ``await result.aget()``."""
        return self.aget().__await__()

    def _maybe_reraise_parent_error(self) -> None:
        for node in reversed(list(self._parents())):
            node.maybe_throw()

    def _parents(self) -> Iterator['AsyncResult']:
        node = self.parent
        while node is not None:
            yield node  # type: ignore[misc]
            node = node.parent

    def maybe_throw(self, propagate: bool = True, callback: Optional[Callback] = None) -> Any:
        """Raise the task's exception when it failed (and ``propagate``); else return the value."""
        meta = self._cache if self._cache is not None else self._get_task_meta()
        meta = rebuild_exception(self.backend, meta)
        state, value = meta['status'], meta.get('result')
        if state in states.PROPAGATE_STATES and propagate:
            self.throw(value, meta.get('traceback'))
        if callback is not None:
            callback(self.id, value)
        return value

    maybe_reraise = maybe_throw

    def throw(self, exc: Any = None, traceback: Optional[str] = None) -> None:
        """Raise ``exc`` (a revoked task without one raises TaskRevokedError)."""
        if not isinstance(exc, BaseException):
            exc = TaskRevokedError(exc) if exc is not None or self._cache is None else TaskRevokedError(self.id)
        if traceback and not getattr(exc, 'remote_traceback', None):
            try:
                exc.remote_traceback = traceback  # type: ignore[attr-defined]
            except AttributeError:
                pass
        if traceback and self.app.conf.get('task_remote_tracebacks'):
            remote = remote_traceback(traceback)
            if remote is not None:
                raise exc.with_traceback(remote)
        raise exc

    def then(self, callback: Callback, on_error: Optional[Callback] = None, weak: bool = False) -> 'AsyncResult':
        """Call ``callback(result)`` once the result is final (``on_error(exc)`` when it failed).

        With the RPC backend the callback runs in whichever thread reads the reply.
        """
        if self._then is None:
            self._then = Callbacks()
        self._then.add(callback, on_error, weak)
        if self._cache is not None:
            self._fire_then()
        else:
            backend = self.backend
            watch = getattr(backend, 'watch_then', None)
            if watch is not None:
                watch(self)
        return self

    def _fire_then(self) -> None:
        callbacks = self._then
        if callbacks is None or self._cache is None:
            return
        meta = self._cache
        error = None
        if meta['status'] in states.PROPAGATE_STATES:
            value = meta.get('result')
            error = value if isinstance(value, BaseException) else TaskRevokedError(self.id)
        callbacks.fire(self, error)

    # -- dependencies ------------------------------------------------------------------------
    def iterdeps(self, intermediate: bool = False) -> Iterator[Tuple[Optional[ResultBase], ResultBase]]:
        """``(parent, node)`` for this result and its descendants, breadth first."""
        stack: Deque[Tuple[Optional[ResultBase], ResultBase]] = deque([(None, self)])
        while stack:
            parent, node = stack.popleft()
            yield parent, node
            if node.ready():  # type: ignore[attr-defined]
                stack.extend((node, child) for child in node.children or [])  # type: ignore[attr-defined]
            elif not intermediate:
                raise IncompleteStream()

    def collect(self, intermediate: bool = False, **kwargs: Any) -> Iterator[Tuple[ResultBase, Any]]:
        """``(result, value)`` for this result and every descendant, waiting for each."""
        for _, node in self.iterdeps(intermediate=intermediate):
            yield node, node.get(**kwargs)  # type: ignore[attr-defined]

    def get_leaf(self) -> Any:
        """The value of the last result in the dependency stream."""
        value = None
        for _, node in self.iterdeps():
            value = node.get()  # type: ignore[attr-defined]
        return value

    def build_graph(self, intermediate: bool = False, formatter: Any = None) -> DependencyGraph:
        """The dependency graph of this result and its descendants."""
        graph = DependencyGraph()
        for parent, node in self.iterdeps(intermediate=intermediate):
            graph.add_arc(node)
            if parent is not None:
                graph.add_edge(parent, node)
        return graph

    @property
    def graph(self) -> DependencyGraph:
        """The dependency graph of this result (``build_graph()`` with its defaults)."""
        return self.build_graph()

    # -- actions -----------------------------------------------------------------------------
    def forget(self) -> None:
        """Forget this result (and its parents') locally and in the backend."""
        self._cache = None
        if self.parent is not None:
            self.parent.forget()  # type: ignore[attr-defined]
        self.backend.forget(self.id)

    def revoke(self, connection: Any = None, terminate: bool = False, signal: Optional[str] = None,
               wait: bool = False, timeout: Optional[float] = None) -> None:
        """Ask workers (Celery's control broadcast) not to run this task, or to terminate it."""
        _control.revoke(self.app, [self.id], connection=connection, terminate=terminate, signal=signal)


class EagerResult(AsyncResult):
    """A result that is already known (a task run locally)."""

    __slots__ = ('_result', '_state', '_traceback')

    def __init__(self, id: str, ret_value: Any, state: str, traceback: Optional[str] = None,
                 name: Optional[str] = None, app: Optional['App'] = None) -> None:
        super().__init__(id, backend=None, task_name=name, app=app)
        self._result = ret_value
        self._state = state
        self._traceback = traceback
        self._cache = {'task_id': id, 'status': state, 'result': ret_value, 'traceback': traceback,
                       'children': None, 'date_done': None}

    def _default_backend(self) -> Any:
        return None

    @property
    def backend(self) -> Any:
        """Always None: an eager result has no backend."""
        return None

    @backend.setter
    def backend(self, value: Any) -> None:
        pass

    @property
    def supports_native_join(self) -> bool:
        """Always False: an eager result has no backend to join through."""
        return False

    def _get_task_meta(self) -> Meta:
        return self._cache  # type: ignore[return-value]

    def known_meta(self) -> Meta:
        """An eager result's own state."""
        return self._cache  # type: ignore[return-value]

    def _meta_value(self, key: str, default: Any = None) -> Any:
        return self._cache.get(key, default)  # type: ignore[union-attr]

    def __reduce__(self) -> Tuple[Any, Tuple[Any, ...]]:
        return self.__class__, (self.id, self._result, self._state, self._traceback, self._task_name)

    def __copy__(self) -> 'EagerResult':
        return self.__class__(self.id, self._result, self._state, self._traceback, self._task_name)

    def ready(self) -> bool:
        """Always True: an eager result is known."""
        return True

    def get(self, timeout: Optional[float] = None, propagate: bool = True,
            disable_sync_subtasks: bool = True, **kwargs: Any) -> Any:
        """The value, or raise the exception when the task failed and ``propagate``."""
        callback = kwargs.get('callback')
        return self.maybe_throw(propagate=propagate, callback=callback)

    wait = get

    def maybe_throw(self, propagate: bool = True, callback: Optional[Callback] = None) -> Any:
        """Raise the exception when the task failed (and ``propagate``); else the value."""
        if self._state in states.PROPAGATE_STATES and propagate:
            self.throw(self._result, self._traceback)
        if callback is not None:
            callback(self.id, self._result)
        return self._result

    maybe_reraise = maybe_throw

    def forget(self) -> None:
        """Nothing is stored anywhere for an eager result."""

    def revoke(self, *args: Any, **kwargs: Any) -> None:
        """Mark the eager result REVOKED (nothing runs anywhere to be stopped).

        As in Celery 5.7, its value becomes ``TaskRevokedError('revoked')`` (what a backend
        stores for a revoked task, so ``get()`` raises it) and the traceback ``None``.
        """
        self._state = states.REVOKED
        self._result = TaskRevokedError('revoked')
        self._traceback = None
        self._cache = dict(self._cache, status=states.REVOKED, result=self._result,  # type: ignore[arg-type]
                           traceback=None)

    def settle(self, meta: Meta) -> Meta:
        """An eager result is final from the start: it keeps its own state."""
        return self._cache  # type: ignore[return-value]

    def __repr__(self) -> str:
        return f'<EagerResult: {self.id}>'


def result_from_tuple(r: Any, app: Optional['App'] = None) -> ResultBase:
    """Rebuild a result (and its parents / members) from :meth:`as_tuple` output."""
    if isinstance(r, ResultBase):
        return r
    app = app_or_default(app)
    try:
        res, nodes = r
    except (TypeError, ValueError):
        raise ImproperlyConfigured(f'not a result tuple: {r!r:.200}') from None
    if isinstance(res, (list, tuple)):
        task_id, parent = res
    else:
        task_id, parent = res, None
    parent_result = result_from_tuple(parent, app) if parent else None
    if nodes is not None:
        return app.GroupResult(task_id, [result_from_tuple(child, app) for child in nodes],
                               parent=parent_result)
    return app.AsyncResult(task_id, parent=parent_result)


