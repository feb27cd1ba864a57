"""Client and Responder when things go wrong, on the real broker: a reply the broker refuses
(the request is requeued, not lost), heartbeats through a long idle, a cut connection (the
responder reconnects), a client whose broker is unreachable (bounded retry, then an error),
close() racing run() in another thread, and ``rpcresults bench`` whose join times out."""
from __future__ import annotations

import json
import time
import uuid
from contextlib import closing
from typing import Any, List

import amqp
import kombu.exceptions
import pytest

from rpcresults import App, Client, Responder
from rpcresults.cli_bench import bench
from tests.conftest import make_app
from tests.helpers import Call, wait_until
from tests.proxy import TcpProxy
from tests.responders import ServedResponder, serving


def new_queue() -> str:
    return f'rpcresults-test-faults-{uuid.uuid4().hex[:12]}'


def echo(payload: Any) -> Any:
    return payload


def test_reply_the_broker_refuses_leaves_the_request_queued_and_the_responder_running(
        broker_url: str, raw: amqp.Connection) -> None:
    """A nacked reply (publisher confirms; the reply queue rejects publishes when full) must not
    ack the request: it is requeued, run again, and answered once the reply queue takes it."""
    channel = raw.channel()
    reply_queue, queue = new_queue(), new_queue()
    full = {'x-max-length': 0, 'x-overflow': 'reject-publish', 'x-expires': 60000}
    channel.queue_declare(reply_queue, durable=True, auto_delete=False, arguments=full)
    try:
        with closing(make_app(broker_url, result_publish_confirm=True)) as app, \
                serving(app, queue, echo) as served:
            channel.basic_publish(amqp.Message('"ping"', content_type='application/json', reply_to=reply_queue,
                                               correlation_id='req-1'),
                                  exchange='', routing_key=queue)
            wait_until(lambda: served.responder.stats()['requeued'] >= 2, timeout=20,
                       what='the refused reply to be retried')
            assert served.thread.is_alive()
            assert served.responder.stats()['handled'] == 0
            # let the reply queue accept: the requeued request is answered
            channel.queue_delete(reply_queue)
            channel.queue_declare(reply_queue, durable=True, auto_delete=False, arguments={'x-expires': 60000})
            reply = wait_until(lambda: channel.basic_get(reply_queue, no_ack=True), timeout=20,
                               what='the reply to the requeued request')
            assert reply.properties['correlation_id'] == 'req-1'
            assert json.loads(reply.body)['result'] == 'ping'
            wait_until(lambda: served.responder.stats()['handled'] == 1, timeout=10, what='the request handled')
            wait_until(lambda: channel.queue_declare(queue, passive=True).message_count == 0, timeout=10,
                       what='the request to be acked')
    finally:
        channel.queue_delete(reply_queue)
        channel.close()


def test_responder_heartbeats_through_a_long_idle(broker_url: str, rpc: Client) -> None:
    with closing(make_app(broker_url, broker_heartbeat=1)) as app, serving(app, new_queue(), echo) as served:
        assert rpc.call(served.responder.queue_name, 1).get(timeout=10) == 1
        time.sleep(4.5)  # the broker drops a silent connection after 2 heartbeat intervals
        assert served.thread.is_alive()
        assert rpc.call(served.responder.queue_name, 2).get(timeout=10) == 2
        assert served.responder.stats()['reconnects'] == 0  # kept alive, not re-established


def test_responder_reconnects_after_its_connection_is_cut(broker_url: str, proxy: TcpProxy,
                                                          rpc: Client) -> None:
    with closing(make_app(proxy.url_for(broker_url), broker_heartbeat=0)) as app, \
            serving(app, new_queue(), echo) as served:
        assert rpc.call(served.responder.queue_name, 'before').get(timeout=10) == 'before'
        assert proxy.cut() >= 1
        assert rpc.call(served.responder.queue_name, 'after').get(timeout=30) == 'after'
        assert served.responder.stats()['reconnects'] >= 1
        assert served.thread.is_alive()


def test_client_publish_gives_up_when_the_broker_is_unreachable(broker_url: str, proxy: TcpProxy,
                                                                app: App) -> None:
    served = ServedResponder(app, new_queue(), echo)
    proxied = make_app(proxy.url_for(broker_url), broker_connection_timeout=1, broker_heartbeat=0)
    client = Client(proxied, backend=app.backend)
    call = None
    try:
        assert client.call(served.responder.queue_name, 1).get(timeout=10) == 1
        proxy.pause()
        proxy.cut()
        call = Call(lambda: client.call(served.responder.queue_name, 2), name='call')
        call.start()
        _, error = call.outcome(60)  # the old code retried forever, holding the client's lock
        assert error is not None
        assert isinstance(error, (OSError, *proxied.connection().connection_errors,
                                  kombu.exceptions.OperationalError))
        proxy.resume()
        assert client.call(served.responder.queue_name, 3).get(timeout=20) == 3
    finally:
        if call is None or not call.is_alive():  # a stuck call holds the client's lock
            client.close()
            proxied.close()
        assert served.close() is None


def test_close_while_run_drains_in_another_thread(app: App) -> None:
    errors: List[BaseException] = []
    for _ in range(20):
        responder = Responder(app, new_queue(), echo, expires=10).start()
        thread = Call(responder.run_forever, name='responder')
        thread.start()
        time.sleep(0.05)
        closer = Call(lambda r=responder: (r.stop(), r.close()), name='closer')
        closer.start()
        closer.result(30)  # the old close() could block forever reading against run()
        _, error = thread.outcome(15)
        if error is not None:
            errors.append(error)
    assert errors == []


def test_bench_reports_a_join_timeout_as_a_row(broker_url: str, capsys: pytest.CaptureFixture) -> None:
    code = bench(broker_url, count=20000, workers=1, timeout=0.01, celery=False, progress=False)
    out, err = capsys.readouterr()
    assert code != 0
    assert 'TIMED OUT' in out
    assert 'did not finish within' in err


def test_a_forked_child_serves_on_connections_of_its_own(broker_url: str) -> None:
    from tests.helpers import report_from_child
    app = make_app(broker_url)
    client_app = make_app(broker_url)
    queue = f'rpcresults-test-fork-{uuid.uuid4().hex[:12]}'
    responder = Responder(app, queue, lambda payload: ['parent', payload], expires=60).start()
    client = Client(client_app)
    try:
        first = client.call(queue, 1)
        assert responder.run(limit=1, timeout=30) == 1
        assert first.get(timeout=15) == ['parent', 1]

        parent_backend = responder.backend
        assert responder.wait_ready(0)  # consuming in the parent

        def child(report: dict) -> None:
            # not consuming on the parent's connection; a reply backend of its own, nothing published yet
            report['inherited'] = [responder.wait_ready(0), responder.backend is parent_backend,
                                   responder.backend.worker_stats()['publish_connections'] > 0]
            # its own queue, so the parent's consumer (still registered) cannot take the request
            child_queue = f'{queue}-child'
            responder.queue_name, responder.queue = child_queue, Responder.queue_for(child_queue, expires=60)
            responder.handler = lambda payload: ['child', payload]
            child_client = Client(make_app(broker_url))
            pending = child_client.call(child_queue, 2)
            report['handled'] = responder.run(limit=1, timeout=30)
            report['value'] = pending.get(timeout=15)

        report, status = report_from_child(child, timeout=60)
        assert 'error' not in report, report['error']
        assert status == 0
        assert report == {'inherited': [False, False, False], 'handled': 1, 'value': ['child', 2]}
        # the parent's connections were never touched by the child
        third = client.call(queue, 3)
        assert responder.run(limit=1, timeout=30) == 1
        assert third.get(timeout=15) == ['parent', 3]
    finally:
        responder.close()
        client.close()
        client_app.close()
        app.close()
