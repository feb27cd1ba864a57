"""Concrete key-value result stores: an in-process memory store and Redis.

Both store the exact bytes Celery's key-value backends store, under the same
keys (``celery-task-meta-<id>``, ``celery-taskset-meta-<id>``), so a result
written by one library can be read by the other.
"""
from __future__ import annotations

import inspect
import logging
import math
import threading
import time
from typing import TYPE_CHECKING, Any, Dict, FrozenSet, List, Optional, Sequence, Tuple
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

from .. import _fork
from ..exceptions import ImproperlyConfigured
from .base import KeyValueStoreBackend

if TYPE_CHECKING:  # pragma: no cover
    from ..app import App

__all__ = ('MemoryBackend', 'RedisBackend', 'E_REDIS_MISSING')

logger = logging.getLogger(__name__)

E_REDIS_MISSING = ('The Redis result backend needs the redis library, which is not installed: '
                   'pip install rpcresults[redis]')

#: Transport options Celery reads itself; they are not redis-py connection options.
_CELERY_ONLY_OPTIONS = frozenset({'global_keyprefix', 'retry_policy', 'result_chord_ordered'})


def _positive_seconds(value: Any) -> Optional[float]:
    """``value`` as a positive number of seconds, else ``None`` (meaning: never expires)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        seconds = float(value.total_seconds() if hasattr(value, 'total_seconds') else value)
    except (TypeError, ValueError):
        return None
    return seconds if seconds > 0 and math.isfinite(seconds) else None


def _as_bytes(value: Any) -> bytes:
    """A value as the bytes a store keeps (what redis-py would send for it)."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode('utf-8')
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return repr(value).encode('ascii')
    raise TypeError(f'cannot store a {type(value).__name__}: expected bytes, str or a number')


def _as_key(key: Any) -> str:
    return key.decode('utf-8') if isinstance(key, (bytes, bytearray)) else str(key)


def _apply_global_keyprefix(backend: KeyValueStoreBackend, options: Dict[str, Any]) -> None:
    """Prefix every key with ``global_keyprefix`` the way Celery does (so both find the same keys)."""
    prefix = options.get('global_keyprefix')
    if not prefix:
        return
    prefix = str(prefix)
    if prefix[-1] not in ':_-.':
        prefix += '_'
    backend.task_keyprefix = prefix + type(backend).task_keyprefix
    backend.group_keyprefix = prefix + type(backend).group_keyprefix
    backend.chord_keyprefix = prefix + type(backend).chord_keyprefix


def _transport_options(app: 'App') -> Dict[str, Any]:
    return dict(app.conf.get('result_backend_transport_options') or {})


# -- memory ----------------------------------------------------------------------------------

#: One store per URL for the whole process: ``{url: {key: (value, deadline or None)}}``.
_memory_stores: Dict[str, Dict[str, Tuple[bytes, Optional[float]]]] = {}
_memory_writes: Dict[str, int] = {}
_memory_lock = threading.Lock()

#: Expired entries are swept after this many writes to a store (reads drop them lazily too).
_SWEEP_EVERY = 1024


def _reset_memory_lock() -> None:
    global _memory_lock
    _memory_lock = threading.Lock()  # another thread may have held it when we forked


_fork.register(_reset_memory_lock)


class MemoryBackend(KeyValueStoreBackend):
    """Results kept in this process only (``cache+memory://``), for tests and single-process use.

    Every backend object with the same URL shares one store, as Celery's memory
    cache does, so a result stored through one is visible through all of them.
    """

    implements_incr = True
    supports_autoexpire = True
    persistent = False

    default_url = 'cache+memory://'

    def __init__(self, app: Optional['App'] = None, url: Optional[str] = None, **kwargs: Any) -> None:
        super().__init__(app=app, url=url or self.default_url, **kwargs)
        _apply_global_keyprefix(self, _transport_options(self.app))
        with _memory_lock:
            self._data = _memory_stores.setdefault(self.url, {})
            _memory_writes.setdefault(self.url, 0)

    # -- helpers (call with the lock held) ----------------------------------------------------
    def _live(self, key: str, now: float) -> Optional[Tuple[bytes, Optional[float]]]:
        entry = self._data.get(key)
        if entry is not None and entry[1] is not None and entry[1] <= now:
            del self._data[key]
            return None
        return entry

    def _wrote(self, now: float) -> None:
        count = _memory_writes.get(self.url, 0) + 1
        if count >= _SWEEP_EVERY:
            count = 0
            for key in [k for k, (_, deadline) in self._data.items() if deadline is not None and deadline <= now]:
                del self._data[key]
        _memory_writes[self.url] = count

    # -- the store ---------------------------------------------------------------------------
    def get(self, key: str) -> Optional[bytes]:
        """The bytes stored at ``key``; ``None`` when missing or expired (an expired entry is dropped)."""
        with _memory_lock:
            entry = self._live(_as_key(key), time.monotonic())
            return None if entry is None else entry[0]

    def mget(self, keys: Sequence[str]) -> List[Optional[bytes]]:
        """The bytes at each of ``keys`` in order, ``None`` where missing or expired, read under one lock."""
        now = time.monotonic()
        with _memory_lock:
            entries = [self._live(_as_key(key), now) for key in keys]
        return [None if entry is None else entry[0] for entry in entries]

    def set(self, key: str, value: Any) -> None:
        """Store ``value``, expiring after ``self.expires`` seconds when that is positive."""
        data = _as_bytes(value)
        seconds = _positive_seconds(self.expires)
        now = time.monotonic()
        with _memory_lock:
            self._data[_as_key(key)] = (data, None if seconds is None else now + seconds)
            self._wrote(now)

    def delete(self, key: str) -> None:
        """Remove ``key`` from this URL's store (a missing key is no error)."""
        with _memory_lock:
            self._data.pop(_as_key(key), None)

    def incr(self, key: str) -> int:
        """Add one to an integer value (a missing key counts as 0); keeps its expiry, like Redis."""
        key = _as_key(key)
        now = time.monotonic()
        with _memory_lock:
            entry = self._live(key, now)
            try:
                current = 0 if entry is None else int(entry[0])
            except ValueError:
                raise ValueError(f'value at {key!r} is not an integer') from None
            value = current + 1
            self._data[key] = (str(value).encode('ascii'), None if entry is None else entry[1])
            self._wrote(now)
            return value

    def expire(self, key: str, value: float) -> None:
        """Let ``key`` live ``value`` more seconds (a non-positive lifetime deletes it, as in Redis)."""
        key = _as_key(key)
        now = time.monotonic()
        seconds = float(value.total_seconds() if hasattr(value, 'total_seconds') else value)
        with _memory_lock:
            entry = self._live(key, now)
            if entry is None:
                return
            if seconds <= 0:
                del self._data[key]
            else:
                self._data[key] = (entry[0], now + seconds)

    # -- misc --------------------------------------------------------------------------------
    def clear(self) -> None:
        """Empty this URL's store (shared by every backend with the same URL) and our cache."""
        with _memory_lock:
            self._data.clear()
        self._cache.clear()

    def as_uri(self, include_password: bool = False) -> str:
        """This store's URL (``cache+memory://`` by default)."""
        return self.url or self.default_url


# -- redis -----------------------------------------------------------------------------------

def _import_redis() -> Any:
    """The redis-py module, or ImproperlyConfigured telling how to install it."""
    try:
        import redis
    except ImportError as exc:
        raise ImproperlyConfigured(E_REDIS_MISSING) from exc
    return redis


def _redis_option_names(redis: Any) -> Optional[FrozenSet[str]]:
    """Keyword options redis-py's connections and pool accept (``None`` if we cannot tell)."""
    names = set()
    try:
        conn = redis.connection
        classes = [getattr(conn, name) for name in ('AbstractConnection', 'Connection', 'SSLConnection',
                                                       'UnixDomainSocketConnection', 'ConnectionPool')
                   if hasattr(conn, name)]
        for cls in classes:
            for param in inspect.signature(cls.__init__).parameters.values():
                if param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY):
                    names.add(param.name)
    except Exception:  # an unexpected redis-py layout: let redis-py judge the options itself
        logger.debug('cannot list redis-py connection options', exc_info=True)
        return None
    names.discard('self')
    return frozenset(names) if names else None


def _mask_password(url: str) -> str:
    """``url`` with its password (in the userinfo or a ``password=`` query item) shown as ``**``."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        userinfo, _, hostinfo = netloc.rpartition('@')
        user = userinfo.split(':', 1)[0]
        netloc = f'{user}:**@{hostinfo}'
    query = parts.query
    if query:
        items = parse_qsl(query, keep_blank_values=True)
        if any(name == 'password' for name, _ in items):
            query = urlencode([(name, '**' if name == 'password' else value) for name, value in items],
                              quote_via=quote, safe='*')
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


class RedisBackend(KeyValueStoreBackend):
    """Results in Redis (``redis://host:port/db``, ``rediss://`` for TLS, ``unix://`` sockets).

    Keys, values and the pub/sub notification on every write are Celery's, so
    Celery clients and workers share results with us through the same Redis.
    """

    implements_incr = True
    supports_autoexpire = True

    default_url = 'redis://localhost:6379/0'

    def __init__(self, app: Optional['App'] = None, url: Optional[str] = None, **kwargs: Any) -> None:
        super().__init__(app=app, url=url, **kwargs)
        self.redis = _import_redis()
        self.url = self._resolve_url(url)
        options = _transport_options(self.app)
        _apply_global_keyprefix(self, options)
        self.connection_options = self._connection_options(options)
        self.client = self.redis.Redis.from_url(self.url, **self.connection_options)

    def _resolve_url(self, url: Optional[str]) -> str:
        if not url:
            configured = self.app.conf.get('result_backend')
            if isinstance(configured, str) and configured.split('://', 1)[0] in ('redis', 'rediss', 'unix'):
                url = configured
            else:
                url = self.default_url
        if url.startswith('redis+socket://'):  # Celery's name for a unix socket URL
            url = 'unix://' + url[len('redis+socket://'):]
        return url

    def _connection_options(self, options: Dict[str, Any]) -> Dict[str, Any]:
        """redis-py options from ``result_backend_transport_options``; unknown names fail now, not at connect."""
        options = {name: value for name, value in options.items() if name not in _CELERY_ONLY_OPTIONS}
        known = _redis_option_names(self.redis)
        if known is not None:
            unknown = sorted(set(options) - known)
            if unknown:
                raise ImproperlyConfigured(
                    f'result_backend_transport_options has options redis-py does not know: {", ".join(unknown)}')
        return options

    # -- the store ---------------------------------------------------------------------------
    def get(self, key: str) -> Optional[bytes]:
        """GET ``key``: the stored bytes, ``None`` when missing or expired."""
        return self.client.get(key)

    def mget(self, keys: Sequence[str]) -> List[Optional[bytes]]:
        """One MGET for all ``keys``: their bytes in order, ``None`` where missing (none sent if empty)."""
        if not keys:
            return []
        return self.client.mget(list(keys))

    def set(self, key: str, value: Any) -> None:
        """Store ``value`` (with SETEX's expiry when ``self.expires`` is positive); publish it on ``key``.

        The publish is what Celery's Redis result consumer listens to, so Celery
        clients waiting on this task wake up as they would for a Celery worker.
        """
        seconds = _positive_seconds(self.expires)
        with self.client.pipeline() as pipe:
            if seconds is None:
                pipe.set(key, value)
            elif seconds.is_integer():
                pipe.set(key, value, ex=int(seconds))  # SET EX: SETEX, which redis-py 8 deprecates
            else:
                pipe.set(key, value, px=max(1, int(seconds * 1000)))
            pipe.publish(key, value)
            pipe.execute()

    def delete(self, key: str) -> None:
        """DEL ``key`` (a missing key is no error)."""
        self.client.delete(key)

    def incr(self, key: str) -> int:
        """INCR ``key`` and return the new value (a missing key counts as 0; Redis keeps the key's TTL)."""
        return int(self.client.incr(key))

    def expire(self, key: str, value: float) -> None:
        """Let ``key`` live ``value`` more seconds (milliseconds precision when fractional)."""
        seconds = float(value.total_seconds() if hasattr(value, 'total_seconds') else value)
        if seconds.is_integer():
            self.client.expire(key, int(seconds))
        else:
            self.client.pexpire(key, int(seconds * 1000))

    # -- misc --------------------------------------------------------------------------------
    def as_uri(self, include_password: bool = False) -> str:
        """The URL, with any password shown as ``**`` unless ``include_password``."""
        return self.url if include_password else _mask_password(self.url)

    def close(self) -> None:
        """Close the client's connections (a later call reconnects)."""
        client = getattr(self, 'client', None)
        if client is not None:
            client.close()
