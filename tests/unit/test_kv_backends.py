"""The key-value result stores (memory and a real Redis), and the disabled backend.

Redis is used for real at 127.0.0.1:6379 db 15. Every test names its tasks with
a random token and deletes only keys holding that token: other tests share
this Redis, so nothing here flushes a database.
"""
from __future__ import annotations

import subprocess
import sys
import threading
import time
import uuid
from typing import Any, Callable, Iterator, List, Optional

import pytest

from rpcresults import states
from rpcresults.app import App
from rpcresults.backends.base import DisabledBackend
from rpcresults.backends.kv import MemoryBackend, RedisBackend
from rpcresults.exceptions import ImproperlyConfigured, TimeoutError

REDIS_URL = 'redis://127.0.0.1:6379/15'
MEMORY_URL = 'cache+memory://'
START_REDIS = ('redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" '
               '--appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log')


class SpecificError(Exception):
    """An exception class of this module: rebuilt by module and name, not as a builtin."""


# -- fixtures --------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def redis_server() -> Iterator[Any]:
    """A raw redis-py client on db 15; fails (never skips) when Redis is not running."""
    import redis
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2, socket_timeout=5)
    try:
        client.ping()
    except redis.exceptions.ConnectionError as exc:
        pytest.fail(f'Redis is not running at 127.0.0.1:6379 ({exc}). Start it with:\n    {START_REDIS}',
                    pytrace=False)
    yield client
    client.close()


@pytest.fixture
def token() -> str:
    """A random marker put in every id a test uses, so cleanup touches only its own keys."""
    return f'rpcresults-kvtest-{uuid.uuid4().hex}'


@pytest.fixture
def new_id(token: str) -> Callable[[], str]:
    return lambda: f'{token}-{uuid.uuid4().hex[:8]}'


@pytest.fixture
def app() -> App:
    return App(result_backend=REDIS_URL, broker_url='memory://')


class Store:
    """One backend kind under test, plus a way to read its raw keys from outside the backend."""

    def __init__(self, kind: str, make: Callable[..., Any], raw_get: Callable[[str], Optional[bytes]],
                 ttl: Optional[Callable[[str], float]] = None) -> None:
        self.kind = kind
        self.make = make
        self.raw_get = raw_get
        self.ttl = ttl


@pytest.fixture(params=['memory', 'redis'])
def store(request: Any, app: App, token: str) -> Iterator[Store]:
    made: List[Any] = []

    if request.param == 'memory':
        def make(**kwargs: Any) -> MemoryBackend:
            backend = MemoryBackend(app=kwargs.pop('app', app), url=MEMORY_URL, **kwargs)
            made.append(backend)
            return backend

        # a second backend object on the same URL sees the same process-wide store
        outsider = MemoryBackend(app=app, url=MEMORY_URL)
        yield Store('memory', make, outsider.get)
        outsider.clear()
    else:
        raw = request.getfixturevalue('redis_server')

        def make(**kwargs: Any) -> RedisBackend:
            backend = RedisBackend(app=kwargs.pop('app', app), url=REDIS_URL, **kwargs)
            made.append(backend)
            return backend

        def ttl(key: str) -> float:
            return raw.pttl(key) / 1000.0

        yield Store('redis', make, raw.get, ttl)
        keys = list(raw.scan_iter(match=f'*{token}*', count=1000))
        if keys:
            raw.delete(*keys)
    for backend in made:
        backend.close()


@pytest.fixture
def backend(store: Store) -> Any:
    return store.make()


# -- results ---------------------------------------------------------------------------------

def test_mark_as_done_stores_and_reads_back(store: Store, new_id: Callable[[], str]) -> None:
    backend = store.make()
    task_id = new_id()
    assert backend.get_state(task_id) == states.PENDING
    backend.mark_as_done(task_id, {'answer': 42, 'items': [1, 'two']})
    meta = backend.get_task_meta(task_id)
    assert meta['status'] == states.SUCCESS
    assert meta['result'] == {'answer': 42, 'items': [1, 'two']}
    assert meta['task_id'] == task_id
    assert meta['date_done']
    # a separate backend object (no shared cache) reads it from the store
    assert store.make().get_result(task_id) == {'answer': 42, 'items': [1, 'two']}


def test_mark_as_failure_rebuilds_exception(store: Store, new_id: Callable[[], str]) -> None:
    writer, reader = store.make(), store.make()
    builtin_id, custom_id = new_id(), new_id()
    writer.mark_as_failure(builtin_id, ValueError('bad value', 42), traceback='Traceback: here')
    writer.mark_as_failure(custom_id, SpecificError('custom', [1, 2]))
    exc = reader.get_result(builtin_id)
    assert type(exc) is ValueError
    assert exc.args == ('bad value', 42)
    assert reader.get_state(builtin_id) == states.FAILURE
    assert reader.get_traceback(builtin_id) == 'Traceback: here'
    custom = reader.get_result(custom_id)
    assert type(custom) is SpecificError
    assert custom.args == ('custom', [1, 2])


def test_mark_as_started_meta(store: Store, new_id: Callable[[], str]) -> None:
    backend = store.make(max_cached_results=100)
    task_id = new_id()
    backend.mark_as_started(task_id, pid=1234, hostname='worker1@host')
    meta = backend.get_task_meta(task_id)
    assert meta['status'] == states.STARTED
    assert meta['result'] == {'pid': 1234, 'hostname': 'worker1@host'}
    assert meta['date_done'] is None
    # not ready, so not cached: a later state is seen by the same backend
    backend.mark_as_done(task_id, 'finished')
    assert backend.get_state(task_id) == states.SUCCESS
    assert backend.get_result(task_id) == 'finished'


def test_success_is_not_overwritten(store: Store, new_id: Callable[[], str]) -> None:
    backend = store.make()
    task_id = new_id()
    backend.mark_as_done(task_id, 'first')
    backend.mark_as_failure(task_id, RuntimeError('late failure'))
    backend.mark_as_started(task_id, pid=1)
    backend.mark_as_retry(task_id, KeyError('x'))
    fresh = store.make()
    assert fresh.get_state(task_id) == states.SUCCESS
    assert fresh.get_result(task_id) == 'first'


def test_failure_can_be_overwritten_by_retry_then_success(store: Store, new_id: Callable[[], str]) -> None:
    backend = store.make()
    task_id = new_id()
    backend.mark_as_retry(task_id, OSError('flaky'))
    assert store.make().get_state(task_id) == states.RETRY
    backend.mark_as_done(task_id, 7)
    assert store.make().get_result(task_id) == 7


def test_getters_and_request_fields(backend: Any, new_id: Callable[[], str]) -> None:
    task_id, group_id, parent_id, child_id = new_id(), new_id(), new_id(), new_id()
    request = {'children': [[[child_id, None], None]], 'group': group_id, 'parent_id': parent_id}
    backend.mark_as_failure(task_id, ZeroDivisionError('division by zero'), traceback='tb text',
                            request=request)
    assert backend.get_state(task_id) == states.FAILURE
    assert backend.get_status(task_id) == states.FAILURE
    assert isinstance(backend.get_result(task_id), ZeroDivisionError)
    assert backend.get_traceback(task_id) == 'tb text'
    assert backend.get_children(task_id) == [[[child_id, None], None]]
    meta = backend.get_task_meta(task_id)
    assert meta['group_id'] == group_id
    assert meta['parent_id'] == parent_id
    unknown = new_id()
    assert backend.get_state(unknown) == states.PENDING
    assert backend.get_result(unknown) is None
    assert backend.get_traceback(unknown) is None
    assert backend.get_children(unknown) is None


def test_forget_removes_stored_and_cached(store: Store, new_id: Callable[[], str]) -> None:
    backend = store.make(max_cached_results=100)
    task_id = new_id()
    backend.mark_as_done(task_id, 'gone soon')
    assert backend.get_state(task_id) == states.SUCCESS
    assert backend.is_cached(task_id)
    assert store.raw_get(f'celery-task-meta-{task_id}') is not None
    backend.forget(task_id)
    assert store.raw_get(f'celery-task-meta-{task_id}') is None
    assert backend.get_state(task_id) == states.PENDING
    assert not backend.is_cached(task_id)


def test_get_many_yields_ready_results(store: Store, new_id: Callable[[], str]) -> None:
    writer = store.make()
    ids = [new_id() for _ in range(3)]
    for index, task_id in enumerate(ids):
        writer.mark_as_done(task_id, index)
    reader = store.make()
    got = dict(reader.get_many(ids, timeout=5, interval=0.01))
    assert set(got) == set(ids)
    assert [got[task_id]['result'] for task_id in ids] == [0, 1, 2]
    assert all(meta['status'] == states.SUCCESS for meta in got.values())


def test_get_many_sees_results_that_arrive_while_polling(store: Store, new_id: Callable[[], str]) -> None:
    writer, reader = store.make(), store.make()
    early, late = new_id(), new_id()
    writer.mark_as_done(early, 'early')
    seen = []

    def on_interval() -> None:
        seen.append(1)
        if len(seen) == 2:
            writer.mark_as_done(late, 'late')

    got = dict(reader.get_many([early, late], timeout=10, interval=0.01, on_interval=on_interval))
    assert got[early]['result'] == 'early'
    assert got[late]['result'] == 'late'
    assert len(seen) >= 2


def test_get_many_times_out_when_some_never_arrive(store: Store, new_id: Callable[[], str]) -> None:
    backend = store.make()
    ready, pending, started = new_id(), new_id(), new_id()
    backend.mark_as_done(ready, 'here')
    backend.mark_as_started(started)
    yielded = []
    with pytest.raises(TimeoutError):
        for task_id, meta in backend.get_many([ready, pending, started], timeout=0.2, interval=0.02):
            yielded.append((task_id, meta['status']))
    assert yielded == [(ready, states.SUCCESS)]


def test_get_many_uses_cached_results(store: Store, new_id: Callable[[], str]) -> None:
    backend = store.make(max_cached_results=100)
    task_id = new_id()
    backend.mark_as_done(task_id, 'cached')
    assert backend.get_state(task_id) == states.SUCCESS
    backend.delete(f'celery-task-meta-{task_id}')  # only the cache knows it now
    assert list(backend.get_many([task_id], timeout=0.5, interval=0.01)) == [
        (task_id, backend.get_task_meta(task_id))]


# -- groups (need rpcresults.result) ---------------------------------------------------------

def test_save_restore_delete_group(store: Store, app: App, new_id: Callable[[], str]) -> None:
    backend = store.make()
    group_id = new_id()
    member_ids = [new_id(), new_id()]
    group = app.GroupResult(group_id, [app.AsyncResult(task_id) for task_id in member_ids])
    assert backend.save_group(group_id, group) is group
    assert store.raw_get(f'celery-taskset-meta-{group_id}') is not None

    restored = store.make().restore_group(group_id)  # a fresh backend reads the store
    assert restored is not None
    assert restored.id == group_id
    assert [member.id for member in restored.results] == member_ids

    backend.delete_group(group_id)
    assert store.raw_get(f'celery-taskset-meta-{group_id}') is None
    assert backend.restore_group(group_id) is None
    assert store.make().restore_group(group_id) is None
    assert store.make().restore_group(new_id()) is None


# -- the raw store API -----------------------------------------------------------------------

def test_store_primitives(backend: Any, new_id: Callable[[], str]) -> None:
    a, b, missing, counter = (f'celery-task-meta-{new_id()}' for _ in range(4))
    backend.set(a, b'alpha')
    backend.set(b, 'beta')
    assert backend.get(a) == b'alpha'
    assert backend.get(b) == b'beta'
    assert backend.mget([a, missing, b]) == [b'alpha', None, b'beta']
    assert backend.mget([]) == []
    backend.delete(a)
    assert backend.get(a) is None
    backend.delete(missing)  # deleting what is absent is fine
    assert [backend.incr(counter) for _ in range(3)] == [1, 2, 3]
    assert int(backend.get(counter)) == 3
    assert backend.implements_incr is True
    assert backend.supports_autoexpire is True
    assert backend.supports_native_join is True


def test_key_prefixes(store: Store, new_id: Callable[[], str]) -> None:
    backend = store.make()
    task_id, group_id = new_id(), new_id()
    assert backend.get_key_for_task(task_id) == f'celery-task-meta-{task_id}'
    assert backend.get_key_for_group(group_id) == f'celery-taskset-meta-{group_id}'
    assert backend.get_key_for_chord(group_id) == f'chord-unlock-{group_id}'
    backend.mark_as_done(task_id, 'prefixed')
    raw = store.raw_get(f'celery-task-meta-{task_id}')
    assert raw is not None and b'"prefixed"' in raw
    assert store.raw_get(task_id) is None


def test_global_keyprefix_transport_option(store: Store, new_id: Callable[[], str]) -> None:
    app = App(result_backend=REDIS_URL, broker_url='memory://',
              result_backend_transport_options={'global_keyprefix': 'tenant'})
    backend = store.make(app=app)
    task_id = new_id()
    assert backend.get_key_for_task(task_id) == f'tenant_celery-task-meta-{task_id}'
    backend.mark_as_done(task_id, 1)
    assert store.raw_get(f'tenant_celery-task-meta-{task_id}') is not None
    assert store.raw_get(f'celery-task-meta-{task_id}') is None
    assert dict(backend.get_many([task_id], timeout=1, interval=0.01))[task_id]['result'] == 1


def test_expire_and_expires(store: Store, app: App, new_id: Callable[[], str]) -> None:
    if store.kind == 'memory':
        backend = store.make()
        key = f'celery-task-meta-{new_id()}'
        backend.set(key, b'short lived')
        backend.expire(key, 0.05)
        time.sleep(0.2)
        assert backend.get(key) is None
        assert backend.mget([key]) == [None]

        short = store.make(expires=0.05)
        task_id, kept = new_id(), new_id()
        short.mark_as_done(task_id, 'expires')
        time.sleep(0.2)
        assert store.make().get_state(task_id) == states.PENDING
        forever = store.make(app=App(result_backend=MEMORY_URL, result_expires=None))
        forever.mark_as_done(kept, 'kept')
        assert forever.expires is None
        time.sleep(0.1)
        assert store.make().get_result(kept) == 'kept'
    else:
        default = store.make()  # result_expires defaults to one day
        task_id = new_id()
        default.mark_as_done(task_id, 'a day')
        assert 86000 < store.ttl(f'celery-task-meta-{task_id}') <= 86400

        backend = store.make(expires=100)
        task_id = new_id()
        backend.mark_as_done(task_id, 'soon')
        key = f'celery-task-meta-{task_id}'
        assert 0 < store.ttl(key) <= 100
        backend.expire(key, 30)
        assert 0 < store.ttl(key) <= 30
        backend.expire(key, 2.5)
        assert 0 < store.ttl(key) <= 2.5

        fractional = store.make(expires=7.5)
        other = new_id()
        fractional.mark_as_done(other, 'ms')
        assert 0 < store.ttl(f'celery-task-meta-{other}') <= 7.5

        forever = store.make(app=App(result_backend=REDIS_URL, result_expires=None))
        kept = new_id()
        forever.mark_as_done(kept, 'no ttl')
        assert store.ttl(f'celery-task-meta-{kept}') < 0  # -1 ms: no expiry set

        backend.expire(key, 0)
        assert store.raw_get(key) is None


def test_incr_keeps_expiry(store: Store, new_id: Callable[[], str]) -> None:
    backend = store.make(expires=0)
    key = f'chord-unlock-{new_id()}'
    backend.incr(key)
    backend.expire(key, 100 if store.kind == 'redis' else 0.1)
    assert backend.incr(key) == 2
    if store.kind == 'redis':
        assert 0 < store.ttl(key) <= 100
    else:
        time.sleep(0.3)
        assert backend.get(key) is None
        assert backend.incr(key) == 1


# -- memory specifics ------------------------------------------------------------------------

def test_memory_store_is_shared_per_url(app: App, new_id: Callable[[], str]) -> None:
    one = MemoryBackend(app=app, url=MEMORY_URL)
    two = MemoryBackend(app=App(), url=MEMORY_URL)
    other = MemoryBackend(app=app, url='cache+memory://elsewhere')
    try:
        task_id = new_id()
        one.mark_as_done(task_id, 'shared')
        assert two.get_result(task_id) == 'shared'
        assert other.get_state(task_id) == states.PENDING
        assert one.as_uri() == 'cache+memory://'
        assert MemoryBackend(app=app).as_uri() == 'cache+memory://'
        assert repr(one) == '<MemoryBackend: cache+memory://>'
        other.clear()
        assert two.get_result(task_id) == 'shared'
        one.clear()
        assert MemoryBackend(app=app, url=MEMORY_URL).get_state(task_id) == states.PENDING
    finally:
        one.clear()
        other.clear()


def test_memory_incr_is_thread_safe(app: App, new_id: Callable[[], str]) -> None:
    backend = MemoryBackend(app=app, url=MEMORY_URL)
    key = f'chord-unlock-{new_id()}'
    threads = [threading.Thread(target=lambda: [backend.incr(key) for _ in range(500)]) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert int(backend.get(key)) == 4000
    backend.delete(key)


def test_memory_incr_refuses_non_integers(app: App, new_id: Callable[[], str]) -> None:
    backend = MemoryBackend(app=app, url=MEMORY_URL)
    key = f'celery-task-meta-{new_id()}'
    backend.set(key, b'not a number')
    with pytest.raises(ValueError):
        backend.incr(key)
    backend.delete(key)


# -- redis specifics -------------------------------------------------------------------------

def test_redis_as_uri_masks_password(app: App) -> None:
    backend = RedisBackend(app=app, url='redis://:s3cret@127.0.0.1:6379/15')
    assert 's3cret' not in backend.as_uri()
    assert backend.as_uri() == 'redis://:**@127.0.0.1:6379/15'
    assert backend.as_uri(include_password=True) == 'redis://:s3cret@127.0.0.1:6379/15'
    assert 's3cret' not in repr(backend)
    named = RedisBackend(app=app, url='rediss://user:pw@example.com:6380/2?ssl_cert_reqs=required')
    assert named.as_uri() == 'rediss://user:**@example.com:6380/2?ssl_cert_reqs=required'
    assert RedisBackend(app=app, url=REDIS_URL).as_uri() == REDIS_URL


def test_redis_url_defaults_to_configured_backend() -> None:
    app = App(result_backend='redis://127.0.0.1:6379/14', broker_url='memory://')
    assert RedisBackend(app=app).as_uri() == 'redis://127.0.0.1:6379/14'
    assert RedisBackend(app=App(result_backend='rpc://')).as_uri() == 'redis://localhost:6379/0'


def test_redis_transport_options_reach_redis_py(redis_server: Any, token: str) -> None:
    app = App(result_backend=REDIS_URL, broker_url='memory://',
              result_backend_transport_options={'socket_timeout': 2.5, 'client_name': token,
                                                'retry_policy': {'max_retries': 1}})
    backend = RedisBackend(app=app, url=REDIS_URL)
    kwargs = backend.client.connection_pool.connection_kwargs
    assert kwargs['socket_timeout'] == 2.5
    assert kwargs['client_name'] == token
    assert 'retry_policy' not in kwargs  # Celery's own option, not redis-py's
    assert backend.get(f'celery-task-meta-{token}') is None  # connects, named
    assert any(client.get('name') == token for client in redis_server.client_list())

    backend.close()  # closes the connection: the server forgets the named client
    for _ in range(200):
        if not any(client.get('name') == token for client in redis_server.client_list()):
            break
        time.sleep(0.01)
    else:
        pytest.fail('close() left the Redis connection open')


def test_redis_unknown_transport_option_is_refused(app: App) -> None:
    app.conf.result_backend_transport_options = {'socket_timeot': 1}
    with pytest.raises(ImproperlyConfigured, match='socket_timeot'):
        RedisBackend(app=app, url=REDIS_URL)


def test_redis_missing_library_says_how_to_install(app: App, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, 'redis', None)  # makes `import redis` fail
    with pytest.raises(ImproperlyConfigured, match=r'pip install rpcresults\[redis\]'):
        RedisBackend(app=app, url=REDIS_URL)


def test_kv_module_imports_without_redis() -> None:
    code = ('import sys; sys.modules["redis"] = None\n'
            'import rpcresults.backends.kv as kv\n'
            'print(kv.MemoryBackend.__name__, kv.RedisBackend.__name__)')
    done = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ['MemoryBackend', 'RedisBackend']


def test_redis_set_publishes_for_celery_consumers(redis_server: Any, app: App, new_id: Callable[[], str]) -> None:
    backend = RedisBackend(app=app, url=REDIS_URL)
    task_id = new_id()
    key = f'celery-task-meta-{task_id}'
    pubsub = redis_server.pubsub(ignore_subscribe_messages=True)
    try:
        pubsub.subscribe(key)
        pubsub.get_message(timeout=1)  # the subscribe confirmation
        backend.mark_as_done(task_id, 'published')
        message = None
        for _ in range(50):
            message = pubsub.get_message(timeout=0.1)
            if message is not None:
                break
        assert message is not None, 'no pub/sub message for the stored result'
        assert message['channel'] == key.encode()
        assert message['data'] == redis_server.get(key)
    finally:
        pubsub.close()
        redis_server.delete(key)
        backend.close()


# -- interop with Celery's own Redis backend -------------------------------------------------

@pytest.fixture
def celery_app(redis_server: Any) -> Iterator[Any]:
    from celery import Celery
    capp = Celery('rpcresults-kv-interop', backend=REDIS_URL, broker='memory://')
    yield capp
    capp.backend.client.close()
    capp.close()


@pytest.fixture
def our_redis(redis_server: Any, app: App, token: str) -> Iterator[RedisBackend]:
    backend = RedisBackend(app=app, url=REDIS_URL)
    yield backend
    keys = list(redis_server.scan_iter(match=f'*{token}*', count=1000))
    if keys:
        redis_server.delete(*keys)
    backend.close()


def test_celery_reads_what_we_store(celery_app: Any, our_redis: RedisBackend,
                                    new_id: Callable[[], str]) -> None:
    done_id, failed_id, started_id = new_id(), new_id(), new_id()
    our_redis.mark_as_done(done_id, {'values': [1, 2, 3]})
    our_redis.mark_as_failure(failed_id, KeyError('missing'), traceback='Traceback (ours)')
    our_redis.mark_as_started(started_id, pid=99, hostname='w@h')

    cb = celery_app.backend
    meta = cb.get_task_meta(done_id)
    assert meta['status'] == 'SUCCESS'
    assert meta['result'] == {'values': [1, 2, 3]}
    celery_result = celery_app.AsyncResult(done_id)
    assert celery_result.get(timeout=5) == {'values': [1, 2, 3]}
    del celery_result  # unsubscribes now, while Celery's pub/sub connection is still open

    failure = cb.get_task_meta(failed_id)
    assert failure['status'] == 'FAILURE'
    assert isinstance(failure['result'], KeyError)
    assert failure['result'].args == ('missing',)
    assert failure['traceback'] == 'Traceback (ours)'

    started = cb.get_task_meta(started_id)
    assert started['status'] == 'STARTED'
    assert started['result'] == {'pid': 99, 'hostname': 'w@h'}


def test_we_read_what_celery_stores(celery_app: Any, our_redis: RedisBackend,
                                    new_id: Callable[[], str]) -> None:
    done_id, failed_id = new_id(), new_id()
    cb = celery_app.backend
    cb.store_result(done_id, {'from': 'celery', 'n': 5}, 'SUCCESS')
    cb.store_result(failed_id, ValueError('from celery', 3), 'FAILURE', traceback='Traceback (celery)')

    meta = our_redis.get_task_meta(done_id)
    assert meta['status'] == states.SUCCESS
    assert meta['result'] == {'from': 'celery', 'n': 5}
    exc = our_redis.get_result(failed_id)
    assert type(exc) is ValueError
    assert exc.args == ('from celery', 3)
    assert our_redis.get_traceback(failed_id) == 'Traceback (celery)'
    got = dict(our_redis.get_many([done_id, failed_id], timeout=5, interval=0.01))
    assert got[done_id]['result'] == {'from': 'celery', 'n': 5}
    assert isinstance(got[failed_id]['result'], ValueError)


def test_celery_restores_group_we_saved(celery_app: Any, our_redis: RedisBackend, app: App,
                                        new_id: Callable[[], str]) -> None:
    group_id, member_ids = new_id(), [new_id(), new_id()]
    our_redis.save_group(group_id, app.GroupResult(group_id, [app.AsyncResult(i) for i in member_ids]))
    restored = celery_app.backend.restore_group(group_id, cache=False)
    assert restored is not None
    assert restored.id == group_id
    assert [member.id for member in restored.results] == member_ids
    for member in restored.results:  # Celery holds restored members as pending until told otherwise;
        celery_app.backend.remove_pending_result(member)  # else they unsubscribe at interpreter exit


# -- no backend at all -----------------------------------------------------------------------

def test_disabled_backend_refuses_reads(app: App) -> None:
    backend = DisabledBackend(app=app)
    assert backend.store_result('some-id', 42, states.SUCCESS) is None
    assert backend.mark_as_done('some-id', 42) == 42  # workers may still call it
    assert backend.as_uri() == 'disabled://'
    getters = [
        lambda: backend.get_task_meta('some-id'),
        lambda: backend.get_state('some-id'),
        lambda: backend.get_status('some-id'),
        lambda: backend.get_result('some-id'),
        lambda: backend.get_traceback('some-id'),
        lambda: backend.get_children('some-id'),
        lambda: backend.wait_for('some-id', timeout=0.01),
        lambda: backend.get_many(['some-id'], timeout=0.01),
        lambda: backend.reload_task_result('some-id'),
        lambda: backend.forget('some-id'),
        lambda: backend.restore_group('some-group'),
        lambda: backend.get_group_meta('some-group'),
        lambda: backend.delete_group('some-group'),
        lambda: backend.save_group('some-group', None),
        lambda: backend.ensure_chords_allowed(),
    ]
    for getter in getters:
        with pytest.raises(NotImplementedError, match='result_backend'):
            getter()
