"""Client -> Responder -> client over the real broker: values, re-raised exceptions, bulk joins,
per-request expiration, requests without reply_to and undecodable requests, unencodable replies,
huge task args, requests to a queue that does not exist yet, Celery's expires and ignore_result,
a client used on both sides of a fork."""
from __future__ import annotations

import os
import threading
import uuid
from typing import Any, Dict, Iterator, List, Tuple

import amqp
import kombu.exceptions
import pytest

from rpcresults import BadRequest, Client, Request, Responder, ResultSet
from rpcresults.exceptions import TaskRevokedError, TimeoutError
from tests.conftest import make_app
from tests.helpers import Call, report_from_child, wait_until
from tests.responders import ServedResponder


class HandlerError(KeyError):
    """Raised by the handler; the caller must get this very type back."""


def handler(payload: Any) -> Any:
    if isinstance(payload, dict) and 'raise' in payload:
        raise HandlerError(payload['raise'])
    return {'echo': payload}


def counted(responder: Responder, **expected: int) -> None:
    """Wait (bounded) for the responder's counters: they move just after the reply is published."""
    wait_until(lambda: all(responder.stats()[key] == value for key, value in expected.items()),
               timeout=10, what=f'counters {expected} (have {responder.stats()})')


def new_queue() -> str:
    return f'rpcresults-test-responder-{uuid.uuid4().hex[:12]}'


@pytest.fixture
def running(app) -> Iterator[ServedResponder]:
    served = ServedResponder(app, new_queue(), handler)
    yield served
    served.close()


def test_call_returns_the_handlers_value(rpc: Client, running: ServedResponder) -> None:
    result = rpc.call(running.responder.queue_name, [1, 'two', {'3': 4.5}])
    assert result.get(timeout=10) == {'echo': [1, 'two', {'3': 4.5}]}
    assert result.backend is rpc.backend
    counted(running.responder, succeeded=1)


def test_handler_exception_is_raised_by_get_with_its_type(rpc: Client, running: ServedResponder) -> None:
    result = rpc.call(running.responder.queue_name, {'raise': 'no such key'})
    with pytest.raises(HandlerError) as info:
        result.get(timeout=10)
    assert info.value.args == ('no such key',)
    assert result.state == 'FAILURE'
    assert 'HandlerError' in (result.traceback or '')
    # the responder goes on after a failure
    assert rpc.call(running.responder.queue_name, 7).get(timeout=10) == {'echo': 7}


def test_thousand_calls_joined_natively(rpc: Client, running: ServedResponder) -> None:
    results = ResultSet([rpc.call(running.responder.queue_name, index) for index in range(1000)])
    assert results.join_native(timeout=60) == [{'echo': index} for index in range(1000)]
    counted(running.responder, handled=1000)


def test_request_carries_reply_to_and_correlation_id(app, rpc: Client) -> None:
    seen = []

    def with_request(payload: Any, request: Request) -> Any:
        seen.append(request)
        return request.correlation_id

    served = ServedResponder(app, new_queue(), with_request, pass_request=True)
    try:
        task_id = str(uuid.uuid4())
        result = rpc.call(served.responder.queue_name, 'x', task_id=task_id, headers={'h': 'v'})
        assert result.get(timeout=10) == task_id
        (request,) = seen
        assert request.reply_to == rpc.backend.oid
        assert request.headers['h'] == 'v'
        assert request.task is None
    finally:
        served.close()


def test_expired_request_is_never_handled(app, rpc: Client, raw: amqp.Connection) -> None:
    queue = new_queue()
    channel = raw.channel()
    channel.queue_declare(queue, durable=True, auto_delete=False, arguments={'x-expires': 60000})
    doomed = rpc.call(queue, 'too late', expiration=1.0)
    # it is queued (the publish is asynchronous) ...
    wait_until(lambda: channel.queue_declare(queue, passive=True).message_count == 1, timeout=15,
               what='the request to be queued')
    # ... and the broker drops it at the head of the queue once its TTL passes
    wait_until(lambda: channel.queue_declare(queue, passive=True).message_count == 0, timeout=15,
               what='the expired request to be dropped')
    served = ServedResponder(app, queue, handler)
    try:
        assert rpc.call(queue, 'in time').get(timeout=10) == {'echo': 'in time'}
        with pytest.raises(TimeoutError):
            doomed.get(timeout=1.0)
        assert doomed.id not in served.responder.seen
        counted(served.responder, handled=1)
    finally:
        served.close()
        channel.close()


def test_request_without_reply_to_is_counted_and_acked(rpc: Client, running: ServedResponder,
                                                       raw: amqp.Connection) -> None:
    channel = raw.channel()
    channel.basic_publish(amqp.Message('{"a": 1}', content_type='application/json'),
                          exchange='', routing_key=running.responder.queue_name)
    wait_until(lambda: running.responder.stats()['no_reply_to'] == 1, timeout=10,
               what='the responder to drop the request')
    assert running.responder.stats()['handled'] == 0
    assert rpc.call(running.responder.queue_name, 1).get(timeout=10) == {'echo': 1}
    ok = channel.queue_declare(running.responder.queue_name, passive=True)
    assert ok.message_count == 0
    channel.close()


@pytest.mark.parametrize('content_type,body', [
    ('application/x-python-serialize', b'\x80\x04K\x01.'),  # pickle: not accepted
    ('application/json', b'{not json'),
])
def test_undecodable_request_fails_the_caller_clearly(rpc: Client, running: ServedResponder,
                                                      raw: amqp.Connection, content_type: str,
                                                      body: bytes) -> None:
    task_id = str(uuid.uuid4())
    result = rpc.backend.app.AsyncResult(task_id)
    rpc.backend.result_consumer.start()  # the reply queue exists before the request goes out
    channel = raw.channel()
    channel.basic_publish(amqp.Message(body, content_type=content_type, reply_to=rpc.backend.oid,
                                       correlation_id=task_id),
                          exchange='', routing_key=running.responder.queue_name)
    with pytest.raises(BadRequest) as info:
        result.get(timeout=10)
    assert 'cannot decode request' in str(info.value)
    assert content_type in str(info.value)
    counted(running.responder, bad_requests=1)
    channel.close()


def test_unencodable_return_value_fails_the_caller_and_the_responder_goes_on(
        app, rpc: Client, raw: amqp.Connection) -> None:
    def unencodable(payload: Any) -> Any:
        return object() if payload == 'bad' else payload

    served = ServedResponder(app, new_queue(), unencodable)
    try:
        bad = rpc.call(served.responder.queue_name, 'bad')
        good = rpc.call(served.responder.queue_name, 'good')
        with pytest.raises(kombu.exceptions.EncodeError) as info:
            bad.get(timeout=10)
        assert "'object'" in str(info.value)
        assert bad.state == 'FAILURE'
        assert good.get(timeout=10) == 'good'
        assert served.thread.is_alive()  # run() did not end
        counted(served.responder, succeeded=1, failed=1, requeued=0)
        channel = raw.channel()
        assert channel.queue_declare(served.responder.queue_name, passive=True).message_count == 0
        channel.close()
    finally:
        served.close()


def test_huge_task_argument_arrives_with_a_bounded_argsrepr(app, rpc: Client) -> None:
    def with_request(payload: Any, request: Request) -> Any:
        return [len(request.args[0]), len(request.headers['argsrepr']), len(request.headers['kwargsrepr'])]

    served = ServedResponder(app, new_queue(), with_request, pass_request=True)
    try:
        huge = 'x' * 300_000  # repr far beyond frame_max (128 kB)
        result = rpc.send_task('tasks.huge', [huge], {'k': huge}, queue=served.responder.queue_name)
        arg_len, argsrepr_len, kwargsrepr_len = result.get(timeout=20)
        assert arg_len == len(huge)
        assert 0 < argsrepr_len <= 1024 and 0 < kwargsrepr_len <= 1024
        # the publishing connection survived: the next request goes through
        small = rpc.send_task('tasks.small', ['y'], queue=served.responder.queue_name)
        assert small.get(timeout=10) == [1, len("('y',)"), len('{}')]
    finally:
        served.close()


def test_call_before_the_responder_exists_is_answered_once_it_starts(app, rpc: Client,
                                                                   raw: amqp.Connection) -> None:
    queue = new_queue()
    channel = raw.channel()
    try:
        early = rpc.call(queue, 'early')  # declares the missing queue (no arguments)
        # the responder declares with x-expires: it consumes the existing queue as it is
        served = ServedResponder(app, queue, handler)
        try:
            assert early.get(timeout=15) == {'echo': 'early'}
            assert rpc.call(queue, 'later').get(timeout=10) == {'echo': 'later'}
        finally:
            served.close()
    finally:
        channel.queue_delete(queue)
        channel.close()


def test_expired_task_is_revoked_not_run(app, rpc: Client) -> None:
    served = ServedResponder(app, new_queue(), handler)
    try:
        doomed = rpc.send_task('tasks.late', [1], queue=served.responder.queue_name, expires=-5)
        fresh = rpc.send_task('tasks.fresh', [2], queue=served.responder.queue_name, expires=300)
        with pytest.raises(TaskRevokedError) as info:
            doomed.get(timeout=10)
        assert 'expired' in str(info.value)
        assert doomed.state == 'REVOKED'
        assert fresh.get(timeout=10) == {'echo': [[2], {}, fresh_embed()]}
        counted(served.responder, expired=1, succeeded=1)
    finally:
        served.close()


def fresh_embed() -> Any:
    return {'callbacks': None, 'errbacks': None, 'chain': None, 'chord': None}


def test_ignore_result_runs_the_handler_and_sends_no_reply(app, rpc: Client) -> None:
    ran = []

    def record(payload: Any, request: Request) -> Any:
        ran.append(request.id)
        return 'done'

    served = ServedResponder(app, new_queue(), record, pass_request=True)
    try:
        silent = rpc.send_task('tasks.silent', [], queue=served.responder.queue_name, ignore_result=True)
        loud = rpc.send_task('tasks.loud', [], queue=served.responder.queue_name)
        assert loud.get(timeout=10) == 'done'
        # replies arrive in order: had the first one been answered, it would be here by now
        assert ran == [silent.id, loud.id]
        assert silent.state == 'PENDING'
    finally:
        served.close()


@pytest.mark.skipif(not hasattr(os, 'fork'), reason='needs os.fork')
@pytest.mark.parametrize('result_backend', ['rpc://', 'rpc+direct://'])
def test_a_client_forked_while_calling_works_in_both_processes(broker_url: str, running: ServedResponder,
                                                               result_backend: str) -> None:
    """The child must not publish on the parent's socket (both would write frames into one
    stream): it lets go of the inherited connections and opens its own, while the parent goes on."""
    app = make_app(broker_url, result_backend=result_backend)
    client = Client(app)
    queue = running.responder.queue_name
    sent: List[Tuple[int, Any]] = []
    stop = threading.Event()

    def keep_calling() -> None:
        for index in range(3000):
            if stop.is_set():
                return
            sent.append((index, client.call(queue, index)))

    def child(report: Dict[str, Any]) -> None:
        results = [client.call(queue, ['child', index]) for index in range(300)]
        report['values'] = [result.get(timeout=20) for result in results]

    try:
        assert client.call(queue, 'before').get(timeout=10) == {'echo': 'before'}
        calling = Call(keep_calling, 'parent-caller')
        calling.start()
        try:
            wait_until(lambda: len(sent) >= 50, timeout=15, what='the parent to be calling')
            report, status = report_from_child(child, timeout=30)
        finally:
            stop.set()
            calling.result(30)
        assert 'error' not in report, report['error']
        assert status is not None and os.waitstatus_to_exitcode(status) == 0
        assert report['values'] == [{'echo': ['child', index]} for index in range(300)]
        # the parent's connections were neither closed nor written to by the child
        assert ResultSet([result for _, result in sent]).join_native(timeout=60) == \
            [{'echo': index} for index, _ in sent]
        assert client.call(queue, 'after').get(timeout=10) == {'echo': 'after'}
        assert client.backend.stats()['reconnects'] == 0
    finally:
        client.close()
        app.close()


def test_requests_waiting_together_are_answered_in_batches(app, rpc: Client) -> None:
    """Requests queued before the responder starts arrive together: fewer wake-ups than requests,
    each batch's replies in one write and its acks in one ack; every caller gets its own value."""
    queue = new_queue()
    results = [rpc.call(queue, n) for n in range(300)]
    served = ServedResponder(app, queue, lambda n: n * 2, prefetch=100)
    try:
        assert ResultSet(results).join_native(timeout=60) == [n * 2 for n in range(300)]
        # the counters move just after each batch's replies are written
        wait_until(lambda: served.responder.stats()['handled'] == 300, what='300 handled')
        stats = served.responder.stats()
        assert stats['succeeded'] == 300
        assert 3 <= stats['batches'] < 300  # prefetch 100 bounds a batch
    finally:
        assert served.close() is None


def test_concurrency_runs_handlers_in_a_pool_of_its_own(app, rpc: Client) -> None:
    """With ``concurrency=4`` handlers run in the responder's pool threads, never in the thread
    that reads; every caller still gets its own value."""
    where: List[str] = []

    def note(n: int) -> int:
        where.append(threading.current_thread().name)
        return n

    queue = new_queue()
    results = [rpc.call(queue, n) for n in range(20)]
    served = ServedResponder(app, queue, note, concurrency=4)
    try:
        assert ResultSet(results).join_native(timeout=60) == list(range(20))
        assert len(where) == 20
        assert all(name.startswith(f'rpcresults-responder-{queue}') for name in where), where
        wait_until(lambda: served.responder.stats()['succeeded'] == 20, what='20 succeeded')
    finally:
        assert served.close() is None


@pytest.mark.parametrize('bad', [0, -1])
def test_concurrency_below_one_is_refused(app, bad: int) -> None:
    with pytest.raises(ValueError, match='concurrency'):
        Responder(app, new_queue(), handler, concurrency=bad)
