"""Parity with Celery's own ``rpc://``: each behaviour runs on the drop-in and, beside it, on Celery's
backend (where Celery's differs, its actual behaviour is asserted and marked as recorded): a cut
client connection with results pending, eager members in joins, and Celery 5.7 result semantics.
"""
from __future__ import annotations

import contextlib
import tempfile
import traceback
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Set

import amqp
import pytest
from celery import Celery, group
from celery.exceptions import TaskRevokedError as CeleryTaskRevokedError
from celery.exceptions import TimeoutError as CeleryTimeoutError
from celery.result import AsyncResult, EagerResult, ResultSet

import rpcresults
from rpcresults import Client
from rpcresults.exceptions import TaskRevokedError as OurTaskRevokedError
from tests.celery_tasks import (RESULT_EXTENDED_VAR, TASK_ADD, TASK_FAIL, TASK_JOIN_INSIDE,
                                TASK_RPCRESULTS_JOIN_INSIDE, TASK_SLEEP, TASK_WAIT_FOR_FILE,
                                TaskFailure, make_client)
from tests.celery_worker import CeleryWorker, celery_worker
from tests.helpers import queue_counts, raw_connection, wait_until
from tests.proxy import TcpProxy

pytestmark = pytest.mark.celery

DROPIN = 'rpcresults.contrib.celery:RPCBackend'
BACKENDS = ['rpc://', DROPIN]
TIMEOUT = 30.0
#: How long a get() is given when Celery's behaviour being recorded is a timeout (a loss).
LOST = 2.0
REPLY_EXPIRES = 60  # seconds: reply queues this file creates outlive no test run by long


# -- workers and clients ------------------------------------------------------------------
def _delete_queues(broker_url: str, names: Set[str]) -> None:
    """Delete reply queues left on the shared broker (best effort: cleanup only)."""
    if not names:
        return
    conn = raw_connection(broker_url)
    try:
        for name in names:
            channel = conn.channel()
            channel.queue_delete(name)
            channel.close()
    finally:
        conn.close()


#: Per worker (by its task queue): the reply queues its own backend declared (task join_inside),
#: deleted once it has stopped.
_worker_reply_queues: Dict[str, Set[str]] = {}


@contextlib.contextmanager
def _worker(broker_url: str, backend: str) -> Iterator[CeleryWorker]:
    queue = None
    try:
        # result_extended on both workers: every result carries name, args, kwargs, worker, queue
        with celery_worker(backend=backend, broker_url=broker_url, env={RESULT_EXTENDED_VAR: '1'}) as worker:
            queue = worker.queue
            yield worker
    finally:  # the worker has stopped
        if queue is not None:
            _delete_queues(broker_url, _worker_reply_queues.pop(queue, set()))


@pytest.fixture(scope='module')
def plain_worker(broker_url: str) -> Iterator[CeleryWorker]:
    """A ``celery worker -P solo`` whose result backend is Celery's ``rpc://``."""
    with _worker(broker_url, 'rpc://') as worker:
        yield worker


@pytest.fixture(scope='module')
def dropin_worker(broker_url: str) -> Iterator[CeleryWorker]:
    """The same worker with the drop-in as its result backend."""
    with _worker(broker_url, DROPIN) as worker:
        yield worker


@pytest.fixture(params=BACKENDS, ids=['celery-rpc', 'dropin'])
def backend(request: pytest.FixtureRequest) -> str:
    """The client's result backend: Celery's ``rpc://``, then the drop-in."""
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def worker(backend: str, request: pytest.FixtureRequest) -> CeleryWorker:
    """The worker whose own backend is the client's (rpc:// with rpc://, drop-in with drop-in)."""
    return request.getfixturevalue('plain_worker' if backend == 'rpc://' else 'dropin_worker')  # type: ignore[no-any-return]


@contextlib.contextmanager
def _celery_client(backend: str, worker: CeleryWorker, broker_url: str, cleanup_url: Optional[str] = None,
                   **conf: Any) -> Iterator[Celery]:
    """A client app with ``backend``, sending to ``worker``; its reply queue is deleted afterwards
    (through ``cleanup_url``, default ``broker_url``).

    Its ``tasks`` hold the worker module's tasks as well (``@app.task`` there is shared with every
    app Celery finalizes), so ``client.tasks[TASK_ADD].apply()`` runs ``add`` here: an eager result."""
    app = make_client(backend=backend, queue=worker.queue, broker_url=broker_url)
    app.conf.result_reply_queue_expires = REPLY_EXPIRES  # the drop-in's x-expires (Celery ignores it)
    app.conf.update(conf)
    assert TASK_ADD in app.tasks  # registered locally: eager runs need no worker
    try:
        yield app
    finally:
        reply_queue = app.backend.oid
        closer = getattr(app.backend, 'close', None)  # Celery's backend has none
        if closer is not None:
            closer()
        app.close()
        _delete_queues(cleanup_url or broker_url, {reply_queue})


@pytest.fixture
def client(backend: str, worker: CeleryWorker, broker_url: str) -> Iterator[Celery]:
    with _celery_client(backend, worker, broker_url) as app:
        yield app


@contextlib.contextmanager
def _our_app(broker_url: str, **conf: Any) -> Iterator[rpcresults.App]:
    """rpcresults' own App (not Celery's); its reply queue is deleted afterwards."""
    app = rpcresults.App(broker_url, result_reply_queue_expires=REPLY_EXPIRES, **conf)
    reply_queue = app.thread_oid
    try:
        yield app
    finally:
        app.close()
        if app.conf.result_backend.startswith('rpc'):
            _delete_queues(broker_url, {reply_queue})


def _succeeded(worker: CeleryWorker, name: str, task_id: str) -> None:
    """Block until the worker logged that it ran ``task_id`` (its result is published by then)."""
    worker.wait_for_log(f'Task {name}[{task_id}] succeeded', timeout=TIMEOUT)


def _reply_queue_exists(conn: amqp.Connection, name: str) -> bool:
    return queue_counts(conn, name) is not None


# -- 1. the client's connection is cut while results are pending ----------------------------
@pytest.fixture
def proxy(broker_url: str) -> Iterator[TcpProxy]:
    with TcpProxy.for_broker(broker_url) as running:
        yield running


@pytest.fixture
def raw(broker_url: str) -> Iterator[amqp.Connection]:
    """A separate py-amqp connection (not through the proxy) to look at queues."""
    conn = raw_connection(broker_url)
    yield conn
    conn.close()


@pytest.fixture
def proxied_client(backend: str, worker: CeleryWorker, broker_url: str, proxy: TcpProxy) -> Iterator[Celery]:
    """A client reaching the broker through ``proxy``; the worker connects directly."""
    with _celery_client(backend, worker, proxy.url_for(broker_url), cleanup_url=broker_url) as app:
        yield app


def test_cut_while_a_task_runs_get_returns_the_value(backend: str, proxied_client: Celery, worker: CeleryWorker,
                                                    proxy: TcpProxy, raw: amqp.Connection) -> None:
    app = proxied_client
    assert app.send_task(TASK_ADD, (1, 1)).get(timeout=TIMEOUT) == 2  # the reply consumer runs
    result = app.send_task(TASK_SLEEP, (2.0,))
    worker.wait_for_log(f'Task {TASK_SLEEP}[{result.id}] received', timeout=TIMEOUT)
    assert proxy.cut() >= 1
    if backend == DROPIN:
        # durable, not auto-delete: the reply queue outlives the client's connection
        assert _reply_queue_exists(raw, app.backend.oid)
    else:
        # Celery's behaviour, recorded: its auto-delete reply queue goes with the connection
        wait_until(lambda: not _reply_queue_exists(raw, app.backend.oid), timeout=TIMEOUT,
                   what="Celery's reply queue deleted by the broker")
    assert result.get(timeout=TIMEOUT) == 2.0, worker.log()[-3000:]
    assert result.state == 'SUCCESS'
    if backend == DROPIN:
        assert app.backend.stats()['reconnects'] >= 1


#: How each backend declares its reply queue: (durable, auto_delete, x-expires in ms), with
#: ``result_reply_queue_expires`` (the drop-in) and ``result_expires`` (Celery) both 60 s.
DECLARED = {'rpc://': (True, True, REPLY_EXPIRES * 1000), DROPIN: (True, False, REPLY_EXPIRES * 1000)}


def test_reply_queue_declaration(backend: str, client: Celery, raw: amqp.Connection) -> None:
    assert client.send_task(TASK_ADD, (2, 2)).get(timeout=TIMEOUT) == 4
    durable, auto_delete, expires = DECLARED[backend]
    name = client.backend.oid
    # the broker accepts a declare only when it is equivalent to the existing queue's
    raw.channel().queue_declare(name, durable=durable, auto_delete=auto_delete,
                                arguments={'x-expires': expires})
    with pytest.raises(amqp.exceptions.PreconditionFailed):
        raw.channel().queue_declare(name, durable=durable, auto_delete=not auto_delete,
                                    arguments={'x-expires': expires})


def test_reply_queue_expiry_default(backend: str, worker: CeleryWorker, broker_url: str,
                                    raw: amqp.Connection) -> None:
    app = make_client(backend=backend, queue=worker.queue, broker_url=broker_url)
    app.conf.result_expires = timedelta(days=1)  # Celery's default (make_client sets 60 s)
    try:
        assert app.send_task(TASK_ADD, (3, 3)).get(timeout=TIMEOUT) == 6
        # the drop-in: result_reply_queue_expires, default 300 s; Celery: result_expires, 1 day
        expires = 300_000 if backend == DROPIN else 86_400_000
        raw.channel().queue_declare(app.backend.oid, durable=True, auto_delete=backend == 'rpc://',
                                    arguments={'x-expires': expires})
    finally:
        reply_queue = app.backend.oid
        closer = getattr(app.backend, 'close', None)
        if closer is not None:
            closer()
        app.close()
        _delete_queues(broker_url, {reply_queue})


def test_results_published_while_the_client_is_cut_off_all_return(
        backend: str, proxied_client: Celery, worker: CeleryWorker, proxy: TcpProxy,
        raw: amqp.Connection) -> None:
    app = proxied_client
    assert app.send_task(TASK_ADD, (1, 1)).get(timeout=TIMEOUT) == 2  # the reply consumer runs
    with tempfile.TemporaryDirectory() as tmp:
        started, gate = Path(tmp, 'started'), Path(tmp, 'gate')
        # the gate holds the (solo, prefetch 1, acks late) worker: the rest waits in the task queue
        held = app.send_task(TASK_WAIT_FOR_FILE, (str(started), str(gate)))
        sleeps = group(app.signature(TASK_SLEEP, (0.2,)) for _ in range(3)).apply_async()
        adds = [app.send_task(TASK_ADD, (i, i)) for i in range(5)]
        wait_until(started.exists, timeout=TIMEOUT, what='the gate task running')
        wait_until(lambda: (queue_counts(raw, worker.queue) or (0, 0))[0] == 8, timeout=TIMEOUT,
                   what='every request in the task queue', interval=0.02)
        proxy.pause()  # the client cannot reconnect ...
        proxy.cut()    # ... and loses its connection
        gate.touch()   # the worker now answers everything while the client is cut off
        _succeeded(worker, TASK_ADD, adds[-1].id)
        if backend == DROPIN:
            # every reply waits in the reply queue (which has no consumer) for the reconnect
            wait_until(lambda: queue_counts(raw, app.backend.oid) == (9, 0), timeout=TIMEOUT,
                       what='9 replies waiting in the reply queue', interval=0.02)
        proxy.resume()
        if backend == 'rpc://':
            # Celery's behaviour, recorded: its reply queue was deleted with the connection, so
            # the replies published meanwhile were dropped by the broker and never arrive
            wait_until(lambda: not _reply_queue_exists(raw, app.backend.oid), timeout=TIMEOUT,
                       what="Celery's reply queue deleted by the broker")
            with pytest.raises(CeleryTimeoutError):
                held.get(timeout=LOST)
            with pytest.raises(CeleryTimeoutError):
                ResultSet(adds, app=app).join_native(timeout=LOST)
            return
        assert held.get(timeout=TIMEOUT) is True
        assert sleeps.join_native(timeout=TIMEOUT) == [0.2, 0.2, 0.2]
        assert ResultSet(adds, app=app).join_native(timeout=TIMEOUT) == [0, 2, 4, 6, 8]
        assert [r.state for r in adds] == ['SUCCESS'] * 5
        stats = app.backend.stats()
        assert stats['reconnects'] >= 1
        assert stats['received'] >= 10  # the warm-up reply and the nine sent while cut off


# -- 2. eager members in joins ------------------------------------------------------------
def test_group_apply_join_native(backend: str, client: Celery) -> None:
    applied = group(client.signature(TASK_ADD, (1, 1)), client.signature(TASK_ADD, (2, 2))).apply()
    assert all(isinstance(member, EagerResult) for member in applied.results)
    assert applied.join(timeout=TIMEOUT) == [2, 4]
    assert applied.get(timeout=TIMEOUT) == [2, 4]  # an eager first member: get() uses join()
    if backend == 'rpc://':
        # Celery's behaviour, recorded: with only eager members it waits for a reply that never
        # comes (nothing was sent) and times out
        with pytest.raises(CeleryTimeoutError):
            applied.join_native(timeout=LOST)
        return
    assert applied.join_native(timeout=TIMEOUT) == [2, 4]


@pytest.mark.parametrize('eager_first', [False, True], ids=['sent-then-eager', 'eager-then-sent'])
@pytest.mark.parametrize('join', ['join_native', 'join'])
def test_result_set_of_a_sent_and_an_eager_result(client: Celery, worker: CeleryWorker, join: str,
                                                  eager_first: bool) -> None:
    sent = client.send_task(TASK_ADD, (5, 5))
    eager = client.tasks[TASK_ADD].apply((3, 4))
    assert isinstance(sent, AsyncResult) and isinstance(eager, EagerResult)
    members: List[Any] = [eager, sent] if eager_first else [sent, eager]
    values = getattr(ResultSet(members, app=client), join)(timeout=TIMEOUT)
    assert values == ([7, 10] if eager_first else [10, 7]), worker.log()[-3000:]


@pytest.mark.parametrize('eager_first', [False, True], ids=['sent-then-eager', 'eager-then-sent'])
@pytest.mark.parametrize('join', ['join_native', 'join', 'get'])
def test_our_result_sets_with_eager_members(broker_url: str, plain_worker: CeleryWorker, join: str,
                                            eager_first: bool) -> None:
    """rpcresults' own ResultSet: eager members only, then beside a result sent to the worker."""
    with _our_app(broker_url) as app:
        eager = [rpcresults.EagerResult(str(uuid.uuid4()), value, 'SUCCESS', app=app) for value in (2, 4)]
        assert getattr(rpcresults.ResultSet(eager, app=app), join)(timeout=TIMEOUT) == [2, 4]
        rpc = Client(app)
        try:
            sent = rpc.send_task(TASK_ADD, (5, 5), queue=plain_worker.queue)
            members = [eager[0], sent] if eager_first else [sent, eager[0]]
            values = getattr(rpcresults.ResultSet(members, app=app), join)(timeout=TIMEOUT)
        finally:
            rpc.close()
        assert values == ([2, 10] if eager_first else [10, 2]), plain_worker.log()[-3000:]


# -- 3. Celery 5.7 semantics ----------------------------------------------------------------
def test_eager_result_revoke(client: Celery) -> None:
    result = client.tasks[TASK_ADD].apply((1, 2))
    assert result.get() == 3
    result.revoke()
    assert result.state == 'REVOKED'
    assert result.traceback is None
    assert isinstance(result.result, CeleryTaskRevokedError)
    with pytest.raises(CeleryTaskRevokedError):
        result.get()
    assert isinstance(result.get(propagate=False), CeleryTaskRevokedError)


@pytest.mark.parametrize('state,value', [('SUCCESS', 3), ('FAILURE', TaskFailure('was failed'))])
def test_our_eager_result_revoke(broker_url: str, state: str, value: Any) -> None:
    with _our_app(broker_url) as app:
        result = rpcresults.EagerResult(str(uuid.uuid4()), value, state, traceback='tb' if state == 'FAILURE' else None,
                                        app=app)
        result.revoke()
        assert result.state == 'REVOKED'
        assert result.traceback is None
        assert isinstance(result.result, OurTaskRevokedError)
        with pytest.raises(OurTaskRevokedError):
            result.get()
        assert isinstance(result.get(propagate=False), OurTaskRevokedError)
        assert result.ready()


def test_exists(backend: str, client: Celery, worker: CeleryWorker) -> None:
    sent = client.send_task(TASK_ADD, (20, 22))
    assert sent.get(timeout=TIMEOUT) == 42, worker.log()[-3000:]
    unknown = client.AsyncResult(str(uuid.uuid4()))
    if backend == 'rpc://':
        # Celery's behaviour, recorded: its rpc:// backend has no _get_task_meta_for, which the
        # base task_result_exists() (what AsyncResult.exists() calls) needs
        with pytest.raises(AttributeError):
            sent.exists()
        with pytest.raises(AttributeError):
            unknown.exists()
        return
    assert sent.exists() is True
    assert client.AsyncResult(sent.id).exists() is True  # a new result object for the same id
    assert unknown.exists() is False


def test_exists_on_our_app(broker_url: str, plain_worker: CeleryWorker) -> None:
    with _our_app(broker_url) as app:
        rpc = Client(app)
        try:
            sent = rpc.send_task(TASK_ADD, (1, 2), queue=plain_worker.queue)
            assert sent.get(timeout=TIMEOUT) == 3, plain_worker.log()[-3000:]
            assert sent.exists() is True
            assert app.AsyncResult(sent.id).exists() is True
            assert app.AsyncResult(str(uuid.uuid4())).exists() is False
        finally:
            rpc.close()


def test_exists_with_redis_on_our_app_and_celerys(broker_url: str, redis_url: str) -> None:
    """A result a Celery Redis backend stored (as its worker would): both libraries' exists()."""
    theirs = Celery('rpcresults-parity-redis', set_as_current=False, broker=broker_url, backend=redis_url)
    task_id = str(uuid.uuid4())
    try:
        with _our_app(broker_url, result_backend=redis_url) as app:
            assert type(app.backend).__name__ == 'RedisBackend'
            theirs.backend.mark_as_done(task_id, {'stored': 'by celery'})
            ours = app.AsyncResult(task_id)
            assert ours.get(timeout=TIMEOUT) == {'stored': 'by celery'}
            assert ours.exists() is True
            assert app.AsyncResult(task_id).exists() is True
            assert app.AsyncResult(str(uuid.uuid4())).exists() is False
            # beside it, Celery's own Redis backend answers the same
            assert theirs.AsyncResult(task_id).exists() is True
            assert theirs.AsyncResult(str(uuid.uuid4())).exists() is False
            ours.forget()
            assert app.AsyncResult(task_id).exists() is False
            assert theirs.AsyncResult(task_id).exists() is False
    finally:
        theirs.backend.forget(task_id)
        theirs.close()


@pytest.mark.parametrize('allow', [False, True], ids=['disable_sync_subtasks', 'allowed'])
def test_get_inside_a_task_through_the_workers_backend(client: Celery, worker: CeleryWorker, allow: bool) -> None:
    reply = client.send_task(TASK_JOIN_INSIDE, (allow,)).get(timeout=TIMEOUT)
    _worker_reply_queues.setdefault(worker.queue, set()).add(reply['reply_queue'])
    if allow:
        assert reply['marker'] == 'value: inner', worker.log()[-3000:]
    else:
        assert reply['marker'].startswith('refused: Never call result.get() within a task!'), reply


def test_our_app_refuses_to_wait_inside_a_celery_task(client: Celery, worker: CeleryWorker) -> None:
    marker = client.send_task(TASK_RPCRESULTS_JOIN_INSIDE).get(timeout=TIMEOUT)
    assert marker.startswith('refused: Never call result.get() within a task!'), (marker, worker.log()[-3000:])


def _worker_frames(exc: BaseException) -> str:
    return ''.join(traceback.format_tb(exc.__traceback__))


@pytest.mark.parametrize('remote', [True, False], ids=['remote_tracebacks', 'default'])
def test_task_remote_tracebacks(backend: str, worker: CeleryWorker, broker_url: str, remote: bool) -> None:
    with _celery_client(backend, worker, broker_url, task_remote_tracebacks=remote) as app:
        with pytest.raises(TaskFailure, match='remote boom') as info:
            app.send_task(TASK_FAIL, ('remote boom',)).get(timeout=TIMEOUT)
    frames = _worker_frames(info.value)
    if remote:
        assert 'celery_tasks.py' in frames and 'in fail' in frames, frames
    else:
        assert 'celery_tasks.py' not in frames, frames


@pytest.mark.parametrize('remote', [True, False], ids=['remote_tracebacks', 'default'])
def test_task_remote_tracebacks_on_our_app(broker_url: str, plain_worker: CeleryWorker, remote: bool) -> None:
    with _our_app(broker_url, task_remote_tracebacks=remote) as app:
        rpc = Client(app)
        try:
            with pytest.raises(TaskFailure, match='our boom') as info:
                rpc.send_task(TASK_FAIL, ('our boom',), queue=plain_worker.queue).get(timeout=TIMEOUT)
        finally:
            rpc.close()
    frames = _worker_frames(info.value)
    if remote:
        assert 'celery_tasks.py' in frames and 'in fail' in frames, frames
    else:
        assert 'celery_tasks.py' not in frames, frames


def test_result_extended(client: Celery, worker: CeleryWorker) -> None:
    result = client.send_task(TASK_ADD, (4, 5), kwargs={})
    assert result.get(timeout=TIMEOUT) == 9
    assert result.name == TASK_ADD
    assert result.args == [4, 5]
    assert result.kwargs == {}
    assert result.queue == worker.queue
    assert result.worker == worker.hostname
    assert result.date_done is not None


def test_result_extended_on_our_app(broker_url: str, plain_worker: CeleryWorker) -> None:
    with _our_app(broker_url) as app:
        rpc = Client(app)
        try:
            result = rpc.send_task(TASK_ADD, (6, 7), queue=plain_worker.queue)
            assert result.get(timeout=TIMEOUT) == 13
        finally:
            rpc.close()
        assert result.name == TASK_ADD
        assert result.args == [6, 7]
        assert result.kwargs == {}
        assert result.queue == plain_worker.queue
        assert result.worker == plain_worker.hostname
        assert result.date_done is not None


def test_empty_result_set_supports_native_join_is_none(client: Celery, broker_url: str) -> None:
    assert ResultSet([], app=client).supports_native_join is None
    assert ResultSet([client.send_task(TASK_ADD, (0, 0))], app=client).supports_native_join is True
    with _our_app(broker_url) as app:
        assert rpcresults.ResultSet([]).supports_native_join is None
        assert rpcresults.ResultSet([], app=app).supports_native_join is None


@pytest.mark.parametrize('name', ['SystemExit', 'KeyboardInterrupt', 'GeneratorExit'])
def test_hostile_exception_payloads(backend: str, name: str) -> None:
    """A failure naming a ``BaseException`` outside ``Exception``: Celery's rpc:// rebuilds it as
    itself (recorded: ``except Exception`` would not catch it); the drop-in raises a stand-in."""
    app = Celery('rpcresults-hostile', set_as_current=False, broker='memory://', backend=backend)
    try:
        rebuilt = app.backend.exception_to_python(
            {'exc_type': name, 'exc_module': 'builtins', 'exc_message': ['bye']})
        assert type(rebuilt).__name__ == name
        assert rebuilt.args == ('bye',)
        if backend == 'rpc://':
            assert not isinstance(rebuilt, Exception)  # Celery's own behaviour, recorded
        else:
            assert isinstance(rebuilt, Exception)
            assert not isinstance(rebuilt, (SystemExit, KeyboardInterrupt, GeneratorExit))
        ordinary = app.backend.exception_to_python(
            {'exc_type': 'ValueError', 'exc_module': 'builtins', 'exc_message': ['fine']})
        assert type(ordinary) is ValueError
    finally:
        app.close()
