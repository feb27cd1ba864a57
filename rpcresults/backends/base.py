"""Backend base classes: what every result backend does, whatever it stores results in.

``Backend`` builds result metas (Celery's exact layout), encodes values and
exceptions, answers state queries and offers the worker-side ``mark_as_*``
calls. ``BaseBackend`` adds polling joins; ``KeyValueStoreBackend`` maps it all
onto get/mget/set/delete/incr/expire; ``DisabledBackend`` refuses every read.
"""
from __future__ import annotations

import logging
from datetime import timedelta
from typing import (TYPE_CHECKING, Any, Callable, Dict, Iterable, List, Mapping, Optional,
                    Sequence, Set)

from .. import serialization, states
from .._current import app_or_default
from ..exceptions import ImproperlyConfigured, TaskRevokedError, TimeoutError
from ..result import ResultBase, result_from_tuple
from .cache import LRUCache
from .waiting import SyncBackendMixin

if TYPE_CHECKING:  # pragma: no cover
    from ..app import App
    from ..result import AsyncResult, GroupResult

__all__ = ('Backend', 'BaseBackend', 'SyncBackendMixin', 'KeyValueStoreBackend', 'DisabledBackend',
           'request_field', 'E_NO_BACKEND')

logger = logging.getLogger(__name__)

Meta = Dict[str, Any]

E_NO_BACKEND = (
    'No result backend is configured: results cannot be read. '
    'Set result_backend (for example "rpc://" or "redis://localhost:6379/0") on the App.'
)

_PENDING_META: Meta = {'status': states.PENDING, 'result': None}

_MISSING = object()


def request_field(request: Any, name: str, default: Any = None) -> Any:
    """A field of a worker-side request: an object's attribute, a mapping's key,
    or a message's AMQP property (kombu ``Message`` or py-amqp ``Message``)."""
    if request is None:
        return default
    if type(request) is dict or isinstance(request, Mapping):
        return request.get(name, default)
    value = getattr(request, name, _MISSING)
    if value is not _MISSING and not callable(value):
        return value
    properties = getattr(request, 'properties', None)
    if isinstance(properties, Mapping) and name in properties:
        return properties[name]
    headers = getattr(request, 'headers', None)
    if isinstance(headers, Mapping) and name in headers:
        return headers[name]
    return default


class Backend:
    """Base class of every result backend (Celery's ``celery.backends.base.Backend``)."""

    READY_STATES = states.READY_STATES
    UNREADY_STATES = states.UNREADY_STATES
    EXCEPTION_STATES = states.EXCEPTION_STATES
    PROPAGATE_STATES = states.PROPAGATE_STATES

    TimeoutError = TimeoutError

    #: Can join many results without polling each.
    supports_native_join = False
    #: Results expire by themselves in the store.
    supports_autoexpire = False
    #: Results survive a restart of the store.
    persistent = True

    retry_policy = {'max_retries': 20, 'interval_start': 0, 'interval_step': 1, 'interval_max': 1}

    def __init__(self, app: Optional['App'] = None, serializer: Optional[str] = None,
                 max_cached_results: Optional[int] = None, accept: Optional[Iterable[str]] = None,
                 expires: Any = None, expires_type: Optional[Callable[[float], Any]] = None,
                 url: Optional[str] = None, **kwargs: Any) -> None:
        self.app = app_or_default(app)
        conf = self.app.conf
        self.serializer = serializer or conf.result_serializer
        if not serialization.known_codec(self.serializer):
            raise ImproperlyConfigured(f'unknown result_serializer {self.serializer!r}')
        self.accept = serialization.accept_set(
            conf.result_accept_content if accept is None else list(accept))
        cmax = conf.result_cache_max if max_cached_results is None else max_cached_results
        # Celery's meaning: -1 disables the cache, 0 or None mean no limit.
        self._cache = LRUCache(0 if cmax == -1 else (-1 if not cmax else cmax))
        self.expires = self.prepare_expires(expires, expires_type)
        self.url = url

    def __repr__(self) -> str:
        return f'<{type(self).__name__}: {self.as_uri()}>'

    # -- encoding ----------------------------------------------------------------------------
    def encode(self, data: Any) -> bytes:
        """Serialize with this backend's codec; returns the body bytes."""
        return serialization.encode(data, self.serializer)[2]

    def decode(self, payload: Any) -> Any:
        """Deserialize a stored payload written with this backend's codec (and accepted)."""
        if payload is None:
            return None
        content_type, content_encoding, _ = serialization.encode(None, self.serializer)
        if isinstance(payload, str):
            payload = payload.encode(content_encoding or 'utf-8')
        return serialization.decode(payload, content_type, content_encoding, self.accept)

    def prepare_exception(self, exc: BaseException, serializer: Optional[str] = None) -> Any:
        """An exception in its wire form for ``serializer`` (default: this backend's)."""
        return serialization.prepare_exception(exc, serializer or self.serializer)

    def exception_to_python(self, exc: Any) -> Optional[BaseException]:
        """An exception rebuilt from its wire form (never imports; refuses non-exceptions)."""
        return serialization.exception_to_python(exc)

    def prepare_value(self, result: Any) -> Any:
        """A result value as it travels: result objects become their tuples."""
        if isinstance(result, ResultBase):
            return result.as_tuple()
        return result

    def encode_result(self, result: Any, state: str) -> Any:
        """The ``result`` field for ``state``: exceptions in their wire form, else the value."""
        if state in self.EXCEPTION_STATES and isinstance(result, BaseException):
            return self.prepare_exception(result)
        return self.prepare_value(result)

    def prepare_expires(self, value: Any, type: Optional[Callable[[float], Any]] = None) -> Any:
        """Result lifetime in seconds (``None`` takes ``result_expires``), converted by ``type``."""
        if value is None:
            value = self.app.conf.result_expires
        if isinstance(value, timedelta):
            value = value.total_seconds()
        if value is not None and type is not None:
            return type(value)
        return value

    def prepare_persistent(self, enabled: Optional[bool] = None) -> bool:
        """Whether results are persistent (``None`` takes ``result_persistent``)."""
        if enabled is not None:
            return bool(enabled)
        persistent = self.app.conf.result_persistent
        return self.persistent if persistent is None else bool(persistent)

    def meta_from_decoded(self, meta: Meta) -> Meta:
        """A decoded meta with its exception rebuilt (for stores that keep final metas)."""
        if meta.get('status') in self.EXCEPTION_STATES and not isinstance(meta.get('result'), BaseException):
            meta = dict(meta)
            meta['result'] = self.exception_to_python(meta.get('result'))
        return meta

    def decode_result(self, payload: Any) -> Meta:
        """A stored payload as a meta with its exception rebuilt (how key-value reads load results)."""
        return self.meta_from_decoded(self.decode(payload))

    # -- worker side -------------------------------------------------------------------------
    def current_task_children(self, request: Any = None) -> Optional[List[Any]]:
        """Children of the request as result tuples (``[]`` when it has none, ``None`` without a request)."""
        if request is None:
            return None
        return [self.prepare_value(child) for child in request_field(request, 'children') or ()]

    def _get_result_meta(self, result: Any, state: str, traceback: Optional[str], request: Any,
                         format_date: bool = True, encode: bool = False) -> Meta:
        """The meta a worker stores or sends, key for key as Celery builds it."""
        if state in self.READY_STATES:
            date_done: Any = self.app.now()
            if format_date:
                date_done = date_done.isoformat()
        else:
            date_done = None
        meta: Meta = {
            'status': state,
            'result': result,
            'traceback': traceback,
            'children': self.current_task_children(request),
            'date_done': date_done,
        }
        group_id = request_field(request, 'group')
        if group_id:
            meta['group_id'] = group_id
        parent_id = request_field(request, 'parent_id')
        if parent_id:
            meta['parent_id'] = parent_id
        if self.app.conf.result_extended and request is not None:
            delivery_info = request_field(request, 'delivery_info')
            extended = {
                'name': request_field(request, 'task'),
                'args': request_field(request, 'args'),
                'kwargs': request_field(request, 'kwargs'),
                'worker': request_field(request, 'hostname'),
                'retries': request_field(request, 'retries'),
                'queue': delivery_info.get('routing_key') if isinstance(delivery_info, Mapping) else None,
            }
            stamps = request_field(request, 'stamps')
            if stamps:  # Celery's stamping: the stamped headers and their values, as Celery stores them
                stamped = request_field(request, 'stamped_headers')
                extended['stamped_headers'] = stamped
                extended.update({key: value for key, value in stamps.items() if key in (stamped or ())})
            if encode:
                for field in ('args', 'kwargs'):
                    extended[field] = self.encode(extended[field])
            meta.update(extended)
        return meta

    def mark_as_started(self, task_id: str, request: Any = None, **meta: Any) -> Any:
        """Publish/store STARTED with ``meta`` (Celery sends ``{"pid", "hostname"}``)."""
        return self.store_result(task_id, meta, states.STARTED, request=request)

    def mark_as_done(self, task_id: str, result: Any, request: Any = None, store_result: bool = True,
                     state: str = states.SUCCESS) -> Any:
        """Publish/store a successful result."""
        if store_result:
            self.store_result(task_id, result, state, request=request)
        return result

    def mark_as_failure(self, task_id: str, exc: BaseException, traceback: Optional[str] = None,
                        request: Any = None, store_result: bool = True,
                        state: str = states.FAILURE) -> BaseException:
        """Publish/store a failure carrying ``exc`` and its traceback text."""
        if store_result:
            self.store_result(task_id, exc, state, traceback=traceback, request=request)
        return exc

    def mark_as_retry(self, task_id: str, exc: BaseException, traceback: Optional[str] = None,
                      request: Any = None, store_result: bool = True,
                      state: str = states.RETRY) -> BaseException:
        """Publish/store RETRY carrying the exception that caused the retry."""
        if store_result:
            self.store_result(task_id, exc, state, traceback=traceback, request=request)
        return exc

    def mark_as_revoked(self, task_id: str, reason: str = '', request: Any = None,
                        store_result: bool = True, state: str = states.REVOKED) -> BaseException:
        """Publish/store REVOKED with a ``TaskRevokedError(reason)``."""
        exc = TaskRevokedError(reason)
        if store_result:
            self.store_result(task_id, exc, state, request=request)
        return exc

    def store_result(self, task_id: str, result: Any, state: str, traceback: Optional[str] = None,
                     request: Any = None, **kwargs: Any) -> Any:
        """Store (or send) ``result`` in ``state`` for ``task_id``; returns ``result``."""
        encoded = self.encode_result(result, state)
        self._store_result(task_id, encoded, state, traceback, request=request, **kwargs)
        return result

    def _store_result(self, task_id: str, result: Any, state: str, traceback: Optional[str] = None,
                      request: Any = None, **kwargs: Any) -> Any:
        raise NotImplementedError(f'{type(self).__name__} does not store results')

    # -- client side -------------------------------------------------------------------------
    @property
    def caches_finals(self) -> bool:
        """Whether final metas are kept in this client's result cache (``result_cache_max``)."""
        return self._cache.limit != 0

    def cache_final(self, task_id: str, meta: Meta) -> None:
        """Keep ``task_id``'s final meta in the result cache (when it is enabled)."""
        self._cache[task_id] = meta

    def cached_final(self, task_id: str) -> Optional[Meta]:
        """``task_id``'s final meta from the result cache, else None."""
        return self._cache.get(task_id)

    def task_result_exists(self, task_id: str) -> bool:
        """Whether a state beyond PENDING is known for ``task_id`` (``AsyncResult.exists()``)."""
        return bool(self.get_task_meta(task_id)['status'] != states.PENDING)

    def is_cached(self, task_id: str) -> bool:
        """Whether ``task_id``'s final meta is in this client's cache (reads then skip the store)."""
        return task_id in self._cache

    def get_task_meta(self, task_id: str, cache: bool = True) -> Meta:
        """The newest meta for ``task_id`` (``{"status": "PENDING", ...}`` when nothing is known)."""
        if cache:
            cached = self._cache.get(task_id)
            if cached is not None:
                return cached
        meta = self._get_task_meta_for(task_id)
        if cache and meta.get('status') in self.READY_STATES:
            self._cache[task_id] = meta
        return meta

    def _get_task_meta_for(self, task_id: str) -> Meta:
        raise NotImplementedError(f'{type(self).__name__} cannot look results up')

    def reload_task_result(self, task_id: str) -> Meta:
        """Fetch ``task_id`` again, bypassing the cache."""
        meta = self._get_task_meta_for(task_id)
        if meta.get('status') in self.READY_STATES:
            self._cache[task_id] = meta
        return meta

    def get_state(self, task_id: str) -> str:
        """The state name of ``task_id`` (``PENDING`` when unknown); ``get_status`` is the same method."""
        return self.get_task_meta(task_id)['status']

    get_status = get_state

    def get_result(self, task_id: str) -> Any:
        """The ``result`` field of ``task_id``'s meta: the return value, or the failure's exception."""
        return self.get_task_meta(task_id).get('result')

    def get_traceback(self, task_id: str) -> Optional[str]:
        """The traceback text stored with ``task_id``'s failure (``None`` when there is none)."""
        return self.get_task_meta(task_id).get('traceback')

    def get_children(self, task_id: str) -> Optional[List[Any]]:
        """The ``children`` field of ``task_id``'s meta, as result tuples (``None`` when it has none)."""
        try:
            return self.get_task_meta(task_id).get('children')
        except KeyError:
            return None

    def forget(self, task_id: str) -> None:
        """Drop what the client and the store know of ``task_id``."""
        self._cache.pop(task_id, None)
        self._forget(task_id)

    def _forget(self, task_id: str) -> None:
        raise NotImplementedError(f'{type(self).__name__} does not support forget()')

    def on_task_call(self, producer: Any, task_id: str) -> None:
        """Called before a request is published (the RPC backend declares its reply queue)."""

    def on_result_fulfilled(self, result: 'AsyncResult') -> None:
        """Called once a result is final."""

    def cleanup(self) -> None:
        """Backend-wide periodic cleanup (expired results)."""

    def process_cleanup(self) -> None:
        """Cleanup after each task a worker runs."""

    def close(self) -> None:
        """Release connections."""

    # -- groups ------------------------------------------------------------------------------
    def save_group(self, group_id: str, result: 'GroupResult') -> 'GroupResult':
        """Store a group's members under its id."""
        self._save_group(group_id, result)
        return result

    def restore_group(self, group_id: str, cache: bool = True) -> Optional['GroupResult']:
        """The group stored under ``group_id`` (``None`` when absent)."""
        meta = self.get_group_meta(group_id, cache=cache)
        return meta.get('result') if meta else None

    def get_group_meta(self, group_id: str, cache: bool = True) -> Optional[Meta]:
        """The saved meta of ``group_id`` (``{"result": GroupResult}``; ``None`` when absent)."""
        if cache:
            cached = self._cache.get(group_id)
            if cached is not None:
                return cached
        meta = self._restore_group(group_id)
        if cache and meta is not None:
            self._cache[group_id] = meta
        return meta

    def delete_group(self, group_id: str) -> None:
        """Remove the group stored under ``group_id`` from the store and from this client's cache."""
        self._cache.pop(group_id, None)
        self._delete_group(group_id)

    def _save_group(self, group_id: str, result: 'GroupResult') -> None:
        raise NotImplementedError(f'{type(self).__name__} cannot save groups; use a key-value backend')

    def _restore_group(self, group_id: str) -> Optional[Meta]:
        raise NotImplementedError(f'{type(self).__name__} cannot restore groups; use a key-value backend')

    def _delete_group(self, group_id: str) -> None:
        raise NotImplementedError(f'{type(self).__name__} cannot delete groups; use a key-value backend')

    # -- misc --------------------------------------------------------------------------------
    def as_uri(self, include_password: bool = False) -> str:
        """The backend's URL (password masked unless asked for)."""
        return self.url or f'{type(self).__name__.lower()}://'

    def ensure_chords_allowed(self) -> None:
        """Chords need a store that can count; the default allows them."""

    def stats(self) -> Dict[str, int]:
        """Counters a user can read; polling backends have only the cache size."""
        return {'cached': len(self._cache)}


class BaseBackend(Backend, SyncBackendMixin):
    """A polled backend (Celery's ``BaseBackend``)."""


class KeyValueStoreBackend(BaseBackend):
    """A backend over a key-value store: subclasses give get/mget/set/delete/incr/expire."""

    task_keyprefix = 'celery-task-meta-'
    group_keyprefix = 'celery-taskset-meta-'
    chord_keyprefix = 'chord-unlock-'
    implements_incr = False
    supports_native_join = True

    # -- the store ---------------------------------------------------------------------------
    def get(self, key: str) -> Any:
        """The value stored at ``key`` (``None`` when missing); the store subclass implements it."""
        raise NotImplementedError('must implement get()')

    def mget(self, keys: Sequence[str]) -> List[Any]:
        """The values at ``keys``, in order (``None`` where missing): one round trip when polling many ids."""
        raise NotImplementedError('must implement mget()')

    def set(self, key: str, value: Any) -> None:
        """Store ``value`` at ``key``, expiring after ``self.expires`` seconds when the store can."""
        raise NotImplementedError('must implement set()')

    def delete(self, key: str) -> None:
        """Remove ``key`` (a missing key is no error); the store subclass implements it."""
        raise NotImplementedError('must implement delete()')

    def incr(self, key: str) -> int:
        """Add one to the integer at ``key`` and return it (only stores with ``implements_incr``)."""
        raise NotImplementedError('does not implement incr()')

    def expire(self, key: str, value: float) -> None:
        """Set a key's lifetime in seconds (stores without expiry ignore it)."""

    # -- keys --------------------------------------------------------------------------------
    def get_key_for_task(self, task_id: str, key: str = '') -> str:
        """Celery's key for ``task_id``'s meta (``celery-task-meta-<id>``, global prefix first) + ``key``."""
        return f'{self.task_keyprefix}{task_id}{key}'

    def get_key_for_group(self, group_id: str, key: str = '') -> str:
        """Celery's key for a saved group (``celery-taskset-meta-<id>``, global prefix first) + ``key``."""
        return f'{self.group_keyprefix}{group_id}{key}'

    def get_key_for_chord(self, group_id: str, key: str = '') -> str:
        """Celery's key for a chord's counter (``chord-unlock-<id>``, global prefix first) + ``key``."""
        return f'{self.chord_keyprefix}{group_id}{key}'

    def _strip_prefix(self, key: Any) -> str:
        if isinstance(key, bytes):
            key = key.decode()
        for prefix in (self.task_keyprefix, self.group_keyprefix):
            if key.startswith(prefix):
                return key[len(prefix):]
        return key

    # -- results -----------------------------------------------------------------------------
    def _store_result(self, task_id: str, result: Any, state: str, traceback: Optional[str] = None,
                      request: Any = None, **kwargs: Any) -> Any:
        meta = self._get_result_meta(result=result, state=state, traceback=traceback, request=request)
        meta['task_id'] = task_id
        key = self.get_key_for_task(task_id)
        current = self.get(key)
        if current is not None:
            try:
                if self.decode(current).get('status') == states.SUCCESS:
                    return result  # a success is final: later states do not overwrite it
            except Exception:  # an unreadable stored value is simply overwritten
                logger.debug('overwriting an unreadable stored result for %s', task_id, exc_info=True)
        self._set_with_state(key, self.encode(meta), state)
        return result

    def _set_with_state(self, key: str, value: bytes, state: str) -> None:
        self.set(key, value)

    def _get_task_meta_for(self, task_id: str) -> Meta:
        payload = self.get(self.get_key_for_task(task_id))
        if not payload:
            return dict(_PENDING_META)
        return self.decode_result(payload)

    def _forget(self, task_id: str) -> None:
        self.delete(self.get_key_for_task(task_id))

    def task_result_exists(self, task_id: str) -> bool:
        """Whether the store has a key for ``task_id`` (a stored PENDING counts, as in Celery)."""
        return bool(self.get(self.get_key_for_task(task_id)))

    def _mget_to_results(self, values: Sequence[Any], keys: Sequence[str]) -> Dict[str, Meta]:
        return {self._strip_prefix(key): self.decode_result(value)
                for key, value in zip(keys, values) if value}

    def poll_round(self, task_ids: Set[str]) -> Dict[str, Meta]:
        """One ``mget`` for every id still waited for."""
        keys = [self.get_key_for_task(task_id) for task_id in task_ids]
        return self._mget_to_results(self.mget(keys), keys)

    # -- groups ------------------------------------------------------------------------------
    def _save_group(self, group_id: str, result: 'GroupResult') -> None:
        self.set(self.get_key_for_group(group_id), self.encode({'result': result.as_tuple()}))

    def _restore_group(self, group_id: str) -> Optional[Meta]:
        payload = self.get(self.get_key_for_group(group_id))
        if not payload:
            return None
        meta = dict(self.decode(payload))
        meta['result'] = result_from_tuple(meta['result'], self.app)
        return meta

    def _delete_group(self, group_id: str) -> None:
        self.delete(self.get_key_for_group(group_id))


class DisabledBackend(BaseBackend):
    """No result backend: workers store nothing, and every read says so clearly."""

    _cache = LRUCache(0)

    def __init__(self, app: Optional['App'] = None, **kwargs: Any) -> None:
        self.app = app_or_default(app)
        self.url = 'disabled://'
        self.serializer = 'json'
        self.accept = serialization.accept_set(None)
        self.expires = None

    def store_result(self, *args: Any, **kwargs: Any) -> Any:
        """Nothing is stored without a backend (workers may still call it)."""
        return None

    def ensure_chords_allowed(self) -> None:
        """Refuse chords: without a backend nothing can count their parts."""
        raise NotImplementedError(E_NO_BACKEND)

    def _is_disabled(self, *args: Any, **kwargs: Any) -> Any:
        """Refuse with ``NotImplementedError(E_NO_BACKEND)``: without a backend nothing is kept or read."""
        raise NotImplementedError(E_NO_BACKEND)

    get_task_meta = get_state = get_status = get_result = get_traceback = _is_disabled  # type: ignore
    get_children = wait_for = get_many = wait_for_pending = iter_native = _is_disabled  # type: ignore
    join_values = await_pending = ajoin_values = aiter_ready = _is_disabled  # type: ignore
    reload_task_result = forget = task_result_exists = _is_disabled  # type: ignore
    save_group = restore_group = delete_group = get_group_meta = _is_disabled  # type: ignore

    def as_uri(self, include_password: bool = False) -> str:
        """Always ``disabled://``."""
        return 'disabled://'


