"""App: configuration with Celery's key names, the connection factory, per-thread oid and backend."""
from __future__ import annotations

import os
import threading
import uuid
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, Dict, Iterable, Optional

from kombu import Connection

from . import _current, _fork, backends, result
from ._current import app_or_default, default_app, set_default_app
from .exceptions import ImproperlyConfigured

if TYPE_CHECKING:  # pragma: no cover
    from .backends.base import Backend

__all__ = ('App', 'Settings', 'DEFAULTS', 'default_app', 'set_default_app', 'app_or_default')

DEFAULT_BROKER_URL = 'amqp://guest:guest@localhost:5672//'

#: Every setting and its default; unknown keys are accepted and kept.
DEFAULTS: Dict[str, Any] = {
    'broker_url': None,
    'broker_heartbeat': 60.0,
    'broker_connection_timeout': 4.0,
    'broker_connection_max_retries': 100,
    'broker_transport_options': {},
    'result_backend': 'rpc://',
    'result_serializer': 'json',
    'result_accept_content': ['json'],
    'result_expires': timedelta(days=1),
    'result_persistent': False,
    'result_reply_queue_expires': 300.0,
    'result_cache_max': -1,
    'result_buffer_max': 10000,
    'result_remember_max': None,
    'result_extended': False,
    'result_keep_late_replies': True,
    'result_publish_mandatory': True,
    'result_publish_confirm': False,
    'result_publish_confirm_timeout': 10.0,
    'result_backend_transport_options': {},
    'task_remote_tracebacks': False,
}


class Settings(dict):
    """The configuration: a dict whose keys are also attributes (``app.conf.result_serializer``)."""

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(f'no setting named {key!r}') from None

    def __setattr__(self, key: str, value: Any) -> None:
        self[key] = value

    def find_value_for_key(self, name: str, namespace: str = 'result') -> Any:
        """Celery's lookup: ``find_value_for_key('extended', 'result')`` -> ``result_extended``."""
        return self.get(f'{namespace}_{name}')


class _ThreadState(threading.local):
    pid: int = -1
    oid: Optional[str] = None
    backend: Optional['Backend'] = None


class App:
    """Configuration plus the factories everything else asks for (connections, backends, results)."""

    def __init__(self, broker_url: Optional[str] = None, **conf: Any) -> None:
        self.conf = Settings(DEFAULTS)
        self.conf['broker_transport_options'] = {}
        self.conf['result_backend_transport_options'] = {}
        self.conf.update(conf)
        url = broker_url or conf.get('broker_url') or os.environ.get('RPCRESULTS_BROKER_URL') or DEFAULT_BROKER_URL
        self.conf['broker_url'] = url
        self._local = _ThreadState()
        _fork.register(self._after_fork)

    def __repr__(self) -> str:
        return f'<App {self.conf.broker_url!r} backend={self.conf.result_backend!r}>'

    # -- connections -------------------------------------------------------------------------
    def connection(self, url: Optional[str] = None, **kwargs: Any) -> Connection:
        """A new (not yet connected) kombu connection to the broker."""
        url = url or self.conf.broker_url
        options = dict(self.conf.broker_transport_options or {})
        if url.startswith('memory://'):
            options.setdefault('polling_interval', 0.005)
        kwargs.setdefault('heartbeat', self.conf.broker_heartbeat or 0)
        kwargs.setdefault('connect_timeout', self.conf.broker_connection_timeout)
        kwargs.setdefault('transport_options', options)
        return Connection(url, **kwargs)

    connection_for_read = connection_for_write = connection

    # -- identity ----------------------------------------------------------------------------
    @property
    def thread_oid(self) -> str:
        """This thread's reply-queue name: a new UUID per thread and after ``os.fork()``."""
        local = self._local
        pid = os.getpid()
        if local.oid is None or local.pid != pid:
            local.oid = str(uuid.uuid4())
            local.pid = pid
            local.backend = None
        return local.oid

    def _after_fork(self) -> None:
        self._local = _ThreadState()

    # -- backends ----------------------------------------------------------------------------
    @property
    def backend(self) -> 'Backend':
        """This thread's result backend (one per thread, built from ``conf.result_backend``)."""
        self.thread_oid  # noqa: B018  (refreshes the thread state after a fork)
        local = self._local
        if local.backend is None:
            local.backend = self.create_backend()
        return local.backend

    def create_backend(self, url: Optional[str] = None) -> 'Backend':
        """A new backend for ``url`` (default ``conf.result_backend``)."""
        cls, target = backends.by_url(url or self.conf.result_backend or 'rpc://')
        return cls(app=self, url=target)

    # -- results -----------------------------------------------------------------------------
    def AsyncResult(self, id: str, **kwargs: Any) -> 'result.AsyncResult':
        """A result for task ``id`` bound to this app."""
        return result.AsyncResult(id, app=self, **kwargs)

    def GroupResult(self, id: Optional[str] = None, results: Optional[Iterable[Any]] = None,
                    **kwargs: Any) -> 'result.GroupResult':
        """A group of results with an id, bound to this app."""
        return result.GroupResult(id, results, app=self, **kwargs)

    def now(self) -> datetime:
        """Timezone-aware UTC now, as results are stamped (``date_done``)."""
        return datetime.now(timezone.utc)

    def expires_seconds(self, value: Any) -> Optional[float]:
        """A duration setting as seconds (accepts ``timedelta``, numbers and ``None``)."""
        if value is None:
            return None
        if isinstance(value, timedelta):
            return value.total_seconds()
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ImproperlyConfigured(f'expected seconds or a timedelta, got {value!r}') from None

    def close(self) -> None:
        """Stop this thread's backend (its consumer connection)."""
        backend = self._local.backend
        if backend is not None:
            backend.close()
            self._local.backend = None

    def __enter__(self) -> 'App':
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


_current.set_app_type(App)
