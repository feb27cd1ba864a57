"""Result objects: AsyncResult, EagerResult, ResultSet, GroupResult (Celery's API, name for name)."""
from __future__ import annotations

import logging
import time
import weakref
from collections import deque
from datetime import datetime
from typing import (TYPE_CHECKING, Any, Callable, Deque, Dict, Generator, Iterable, Iterator, List,
                    Optional, Tuple, Union)

if TYPE_CHECKING:  # pragma: no cover
    from .aio import NativeIterator

from . import states
from .app import App, app_or_default
from .exceptions import (ImproperlyConfigured, IncompleteStream, MalformedResult, TaskRevokedError,
                         TimeoutError)

__all__ = ('ResultBase', 'AsyncResult', 'EagerResult', 'ResultSet', 'GroupResult', 'result_from_tuple',
           'DependencyGraph')

Meta = Dict[str, Any]
Callback = Callable[..., Any]

logger = logging.getLogger(__name__)


def _exception_value(backend: Any, meta: Meta) -> Meta:
    """A copy of ``meta`` whose exception result is a real exception (errors become the value)."""
    value = meta.get('result')
    if meta.get('status') in states.EXCEPTION_STATES and not isinstance(value, BaseException):
        meta = dict(meta)
        try:
            meta['result'] = backend.exception_to_python(value)
        except Exception as exc:  # SecurityError & co.: the refusal itself is the waiter's error
            meta['result'] = exc
    return meta


class _Callbacks:
    """``then()`` callbacks of one result: fired once, with the result, when it is final."""

    __slots__ = ('items', 'fired')

    def __init__(self) -> None:
        self.items: List[Tuple[Any, Optional[Any], bool]] = []
        self.fired = False

    def add(self, callback: Callback, on_error: Optional[Callback], weak: bool) -> None:
        if weak:
            callback = weakref.WeakMethod(callback) if hasattr(callback, '__self__') else weakref.ref(callback)
            if on_error is not None:
                on_error = (weakref.WeakMethod(on_error) if hasattr(on_error, '__self__')
                            else weakref.ref(on_error))
        self.items.append((callback, on_error, weak))

    def fire(self, result: 'ResultBase', error: Optional[BaseException]) -> None:
        if self.fired:
            return
        self.fired = True
        items, self.items = self.items, []
        for callback, on_error, weak in items:
            if weak:
                callback = callback()
                on_error = on_error() if on_error is not None else None
            try:
                if error is not None and on_error is not None:
                    on_error(error)
                elif callback is not None:
                    callback(result)
            except Exception:  # runs in whichever thread read the reply: never let it stop the reading
                logger.exception('a then() callback of %r failed', result)


class ResultBase:
    """Base of every result object."""

    __slots__ = ()


class DependencyGraph:
    """Nodes and their children, as ``build_graph()`` returns them."""

    def __init__(self) -> None:
        self.adjacent: Dict[Any, List[Any]] = {}

    def add_arc(self, node: Any) -> None:
        """Add ``node`` (with no children yet); a node already present is kept as is."""
        self.adjacent.setdefault(node, [])

    def add_edge(self, parent: Any, child: Any) -> None:
        """Record ``child`` as a child of ``parent`` (adding ``parent`` when new)."""
        self.add_arc(parent)
        self.adjacent[parent].append(child)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.adjacent)

    def __len__(self) -> int:
        return len(self.adjacent)

    def __contains__(self, node: object) -> bool:
        return node in self.adjacent

    def items(self) -> Iterable[Tuple[Any, List[Any]]]:
        """``(node, children)`` for every node, in insertion order."""
        return self.adjacent.items()

    def edges(self) -> List[Tuple[Any, Any]]:
        """Every ``(parent, child)`` pair of the graph."""
        return [(parent, child) for parent, children in self.adjacent.items() for child in children]

    def to_dot(self) -> str:
        """Graphviz source of the graph."""
        lines = ['digraph dependencies {']
        for node in self.adjacent:
            lines.append(f'  "{node}";')
        for parent, child in self.edges():
            lines.append(f'  "{parent}" -> "{child}";')
        lines.append('}')
        return '\n'.join(lines)


class AsyncResult(ResultBase):
    """The result of a task that may not have finished yet."""

    TimeoutError = TimeoutError

    # Slots: tens of thousands of these may be pending at once (no per-object __dict__).
    __slots__ = ('app', 'id', '_backend', '_task_name', 'parent', '_cache', '_then', 'ignored',
                 '_tracked_by', '__weakref__')

    def __init__(self, id: str, backend: Any = None, task_name: Optional[str] = None,
                 app: Optional[App] = None, parent: Optional[ResultBase] = None) -> None:
        if id is None:
            raise ValueError(f'AsyncResult requires a valid id, not {type(id)}')
        self.app = app_or_default(app or getattr(backend, 'app', None))
        self.id = id
        # Bound now, as Celery does: the reply goes to the queue of the thread that made the result.
        self._backend = backend if backend is not None else self._default_backend()
        self._task_name = task_name
        self.parent = parent
        self._cache: Optional[Meta] = None
        self._then: Optional[_Callbacks] = None
        self.ignored = False
        self._tracked_by: Any = None

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
    def _set_cache(self, meta: Meta) -> Meta:
        meta = _exception_value(self.backend, meta)
        children = meta.get('children')
        if children:
            meta = dict(meta)
            try:
                meta['children'] = [result_from_tuple(child, self.app) for child in children]
            except Exception as exc:  # a sender's malformed children: this result's error, not a crash
                from .backends.asynchronous import error_meta
                return error_meta(self.id, MalformedResult(self.id, f'invalid children: {exc}'))
        self._cache = meta
        return meta

    def _maybe_set_cache(self, meta: Meta) -> Meta:
        """Remember ``meta`` when it is final (and fire ``then()`` callbacks); returns it."""
        if meta is not None and meta.get('status') in states.READY_STATES:
            if type(meta).__name__ == 'ErrorMeta':
                return meta  # our own error (malformed, evicted, lost): raised, never cached
            if self._cache is None:
                meta = self._set_cache(meta)
                if self._cache is None:
                    return meta  # the meta itself was malformed
                self._fire_then()
            return self._cache  # type: ignore[return-value]
        return meta

    def _get_task_meta(self, drain: bool = True) -> Meta:
        if self._cache is not None:
            return self._cache
        backend = self.backend
        if getattr(backend, 'is_async', False):
            consumer = backend.result_consumer
            meta = consumer.current_meta(self) if drain else consumer.lookup(self.id)
        else:
            meta = backend.get_task_meta(self.id)
        return self._maybe_set_cache(meta)

    def _meta_value(self, key: str, default: Any = None) -> Any:
        return _exception_value(self.backend, self._get_task_meta()).get(key, default)

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
        """True when any state beyond PENDING is known for this task."""
        return self.state != states.PENDING

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
        from . import aio
        return await aio.wait_result(self, timeout=timeout, propagate=propagate,
                                     follow_parents=follow_parents)

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
        meta = _exception_value(self.backend, meta)
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
        raise exc

    def then(self, callback: Callback, on_error: Optional[Callback] = None, weak: bool = False) -> 'AsyncResult':
        """Call ``callback(result)`` once the result is final (``on_error(exc)`` when it failed).

        With the RPC backend the callback runs in whichever thread reads the reply.
        """
        if self._then is None:
            self._then = _Callbacks()
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
        from ._control import revoke
        revoke(self.app, [self.id], connection=connection, terminate=terminate, signal=signal)


class EagerResult(AsyncResult):
    """A result that is already known (a task run locally)."""

    __slots__ = ('_result', '_state', '_traceback')

    def __init__(self, id: str, ret_value: Any, state: str, traceback: Optional[str] = None,
                 name: Optional[str] = None, app: Optional[App] = None) -> None:
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
        return None

    @backend.setter
    def backend(self, value: Any) -> None:
        pass

    @property
    def supports_native_join(self) -> bool:
        """Always False: an eager result has no backend to join through."""
        return False

    def _get_task_meta(self, drain: bool = True) -> Meta:
        return self._cache  # type: ignore[return-value]

    def _meta_value(self, key: str, default: Any = None) -> Any:
        return self._cache.get(key, default)  # type: ignore[union-attr]

    def __reduce__(self) -> Tuple[Any, Tuple[Any, ...]]:
        return self.__class__, (self.id, self._result, self._state, self._traceback, self._task_name)

    def __copy__(self) -> 'EagerResult':
        return self.__class__(self.id, self._result, self._state, self._traceback, self._task_name)

    def ready(self) -> bool:
        return True

    def get(self, timeout: Optional[float] = None, propagate: bool = True,
            disable_sync_subtasks: bool = True, **kwargs: Any) -> Any:
        """The value, or raise the exception when the task failed and ``propagate``."""
        callback = kwargs.get('callback')
        return self.maybe_throw(propagate=propagate, callback=callback)

    wait = get

    def maybe_throw(self, propagate: bool = True, callback: Optional[Callback] = None) -> Any:
        if self._state in states.PROPAGATE_STATES and propagate:
            self.throw(self._result, self._traceback)
        if callback is not None:
            callback(self.id, self._result)
        return self._result

    maybe_reraise = maybe_throw

    def forget(self) -> None:
        """Nothing is stored anywhere for an eager result."""

    def revoke(self, *args: Any, **kwargs: Any) -> None:
        self._state = states.REVOKED
        self._cache = dict(self._cache, status=states.REVOKED)  # type: ignore[arg-type]

    def _maybe_set_cache(self, meta: Meta) -> Meta:
        return self._cache  # type: ignore[return-value]

    def __repr__(self) -> str:
        return f'<EagerResult: {self.id}>'


class ResultSet(ResultBase):
    """A list of results, joined together."""

    parent: Optional[ResultBase] = None

    def __init__(self, results: Optional[Iterable[ResultBase]] = None, app: Optional[App] = None,
                 ready_barrier: Any = None, **kwargs: Any) -> None:
        self._app = app
        self.results: List[Any] = list(results or [])
        self._then: Optional[_Callbacks] = None
        self._ready_barrier = ready_barrier

    @property
    def app(self) -> App:
        """The app given, else the first member's app, else the default app."""
        if self._app is None:
            self._app = self.results[0].app if self.results else app_or_default(None)
        return self._app

    @app.setter
    def app(self, app: App) -> None:
        self._app = app

    @property
    def backend(self) -> Any:
        """The first member's backend (the app's backend when the set is empty)."""
        return self.results[0].backend if self.results else self.app.backend

    @property
    def supports_native_join(self) -> bool:
        """True when every member's backend supports ``join_native`` (``get()`` then uses it)."""
        return all(result.supports_native_join for result in self.results)

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
        """Read replies that already arrived once for every member's backend (never blocks)."""
        seen = set()
        for result in self.results:
            backend = getattr(result, 'backend', None)
            if backend is None or id(backend) in seen:
                continue
            seen.add(id(backend))
            if getattr(backend, 'is_async', False):
                for member in self.results:
                    if member.backend is backend and isinstance(member, AsyncResult) and member._cache is None:
                        backend.result_consumer.track(member)
                backend.result_consumer.start()
                backend.result_consumer.drainer.drain_now(None)

    def _member_states(self) -> List[str]:
        self._refresh()
        result_states = []
        for result in self.results:
            if isinstance(result, ResultSet):
                result_states.append(states.SUCCESS if result.successful() else
                                     states.FAILURE if result.failed() else states.PENDING)
            else:
                result_states.append(result._get_task_meta(drain=False)['status'])
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
        from ._control import revoke
        revoke(self.app, [r.id for r in self.results], connection=connection, terminate=terminate,
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
        if not self.results:
            return []
        backend = self.backend
        if (callback is None and getattr(backend, 'is_async', False)
                and all(type(r) is AsyncResult and r._backend is backend for r in self.results)):
            return backend.result_consumer.join_values(self.results, timeout=timeout, propagate=propagate,
                                                       on_message=on_message, on_interval=on_interval)
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
                    meta = _exception_value(self.backend, meta)
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

    async def ajoin_native(self, timeout: Optional[float] = None, propagate: bool = True) -> List[Any]:
        """``join_native()`` for asyncio: every value in member order, without blocking the loop."""
        from . import aio
        return await aio.join_native(self, timeout=timeout, propagate=propagate)

    def aiter_native(self, timeout: Optional[float] = None) -> 'NativeIterator':
        """``iter_native()`` for asyncio: ``async for task_id, meta in ...``, each as it becomes final;
        ``await it.aclose()`` stops waiting early."""
        from . import aio
        return aio.iter_native(self, timeout=timeout)

    def then(self, callback: Callback, on_error: Optional[Callback] = None, weak: bool = False) -> 'ResultSet':
        """Call ``callback(self)`` once every member is final."""
        if self._then is None:
            self._then = _Callbacks()
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
    def restore(cls, id: str, backend: Any = None, app: Optional[App] = None) -> Optional['GroupResult']:
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


def result_from_tuple(r: Any, app: Optional[App] = None) -> ResultBase:
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


