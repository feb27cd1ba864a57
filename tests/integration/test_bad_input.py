"""Bad replies on the real broker.

Each kind of bad reply is published raw (py-amqp, no rpcresults code on the sending side) into the
client's reply queue. For an id somebody holds a result for, the waiter gets a clear error; for an
unknown id the reply is dropped and counted. In every case the consumer keeps its connection and a
good result published right after still arrives.
"""
from __future__ import annotations

import json
import pickle
import sys
import threading
import time
from datetime import datetime, timezone
from typing import Any, Callable, Dict, List, Optional

import amqp
import pytest

from rpcresults import states
from rpcresults.exceptions import ContentDisallowed, MalformedResult, SecurityError, TimeoutError
from tests.conftest import make_app, new_id

pytestmark = pytest.mark.twins  # decoding and bounds are the selected state table twin's

WAIT = 10.0

#: Set by :func:`_pwn` if anything ever unpickles the hostile payload.
PWNED: List[str] = []


def _pwn(marker: str) -> None:
    PWNED.append(marker)


class Evil:
    """Unpickling this calls :func:`_pwn`: proof that a pickle body was (wrongly) decoded."""

    def __reduce__(self):
        return (_pwn, ('unpickled',))


# -- helpers ----------------------------------------------------------------------------------------



def consumers(raw: amqp.Connection, queue: str) -> int:
    channel = raw.channel()
    ok = channel.queue_declare(queue, passive=True)
    channel.close()
    return ok.consumer_count


def good_body(tid: str, value: Any) -> bytes:
    return json.dumps({'status': 'SUCCESS', 'result': value, 'traceback': None, 'children': [],
                       'date_done': datetime.now(timezone.utc).isoformat(), 'task_id': tid}).encode()


JSON = {'content_type': 'application/json', 'content_encoding': 'utf-8'}


def send_good(publish: Callable[..., None], client: Any, value: Any) -> str:
    tid = new_id()
    publish(client.oid, good_body(tid, value), correlation_id=tid, **JSON)
    return tid


def assert_still_serving(app: Any, client: Any, publish: Callable[..., None], raw: amqp.Connection) -> None:
    """A good result published now still arrives, over the same connection."""
    tid = send_good(publish, client, {'still': 'fine'})
    assert app.AsyncResult(tid).get(timeout=WAIT) == {'still': 'fine'}
    stats = client.stats()
    assert stats['reconnects'] == 0
    assert stats.get('queues_lost', 0) == 0
    assert consumers(raw, client.oid) == 1


def assert_a_counted_drop(app: Any, client: Any, publish: Callable[..., None], raw: amqp.Connection,
                          body: bytes, **properties: Any) -> None:
    """Publish a reply nobody can be found for: dropped and counted, nothing buffered, consumer still serving."""
    client.result_consumer.start()
    before = client.stats()
    publish(client.oid, body, **properties)
    assert_still_serving(app, client, publish, raw)
    after = client.stats()
    assert after['malformed_dropped'] == before['malformed_dropped'] + 1
    assert after['buffer_size'] == before['buffer_size']


# -- the kinds of bad reply -------------------------------------------------------------------------
def _bad(tid: str) -> Dict[str, Dict[str, Any]]:
    """kind -> how it is published and what the waiter must get."""
    return {
        'malformed-json': dict(
            body=b'{"status": "SUCCESS", "result": [1, 2', props=JSON,
            error=MalformedResult, words=['malformed', 'json']),
        'pickle': dict(
            body=pickle.dumps({'status': 'SUCCESS', 'result': Evil(), 'task_id': tid}),
            props={'content_type': 'application/x-python-serialize', 'content_encoding': 'binary'},
            error=ContentDisallowed, words=['pickle']),
        'yaml': dict(
            body=b'status: SUCCESS\nresult: 1\n',
            props={'content_type': 'application/x-yaml', 'content_encoding': 'utf-8'},
            error=ContentDisallowed, words=['yaml']),
        'text-plain': dict(
            body=b'SUCCESS 1', props={'content_type': 'text/plain', 'content_encoding': 'utf-8'},
            error=ContentDisallowed, words=['text/plain']),
        'json-list': dict(
            body=json.dumps(['SUCCESS', 1, tid]).encode(), props=JSON,
            error=MalformedResult, words=['list']),
        'no-status': dict(
            body=json.dumps({'result': 5, 'traceback': None, 'task_id': tid}).encode(), props=JSON,
            error=MalformedResult, words=['status']),
        'status-not-a-string': dict(
            body=json.dumps({'status': 7, 'result': 5, 'task_id': tid}).encode(), props=JSON,
            error=MalformedResult, words=['status']),
    }


KINDS = list(_bad('x'))


@pytest.fixture(autouse=True)
def _no_unpickling():
    PWNED.clear()
    yield
    assert not PWNED, 'a pickle body was unpickled'


@pytest.mark.parametrize('mode', ['tracked', 'waiting'])
@pytest.mark.parametrize('kind', KINDS)
def test_bad_reply_for_a_waited_id_gives_a_clear_error(kind, mode, app, client, publish, raw):
    client.result_consumer.start()
    tid = new_id()
    bad = _bad(tid)[kind]
    result = app.AsyncResult(tid, backend=client)  # the same backend whichever thread waits
    client.add_pending_result(result)  # tracked before the bad reply can arrive

    outcome: Dict[str, Any] = {}
    waiter: Optional[threading.Thread] = None
    if mode == 'waiting':
        def wait() -> None:
            try:
                outcome['value'] = result.get(timeout=WAIT)
            except BaseException as exc:  # the expected path
                outcome['error'] = exc
        waiter = threading.Thread(target=wait)
        waiter.start()
    publish(client.oid, bad['body'], correlation_id=tid, **bad['props'])
    if waiter is not None:
        waiter.join(WAIT + 5)
        assert not waiter.is_alive()
        assert 'value' not in outcome, f'a bad reply produced a value: {outcome.get("value")!r}'
        error = outcome['error']
    else:
        with pytest.raises(Exception) as excinfo:
            result.get(timeout=WAIT)
        error = excinfo.value
    assert not isinstance(error, TimeoutError), 'the waiter timed out instead of getting the error'
    assert isinstance(error, bad['error']), repr(error)
    text = str(error).lower()
    for word in bad['words']:
        assert word in text, f'{word!r} not named in {str(error)!r}'
    if bad['error'] is MalformedResult:
        assert error.task_id == tid and tid in str(error)
    assert result.state == states.FAILURE
    assert_still_serving(app, client, publish, raw)


@pytest.mark.parametrize('kind', KINDS)
def test_bad_reply_for_an_id_nobody_waits_for_yet_is_counted_and_kept_as_its_error(
        kind, app, client, publish, raw):
    """Counted as malformed, and its error kept (bounded, like any early reply): a get() that
    comes later fails fast with that error instead of waiting for a reply that will never come."""
    client.result_consumer.start()
    tid = new_id()
    bad = _bad(tid)[kind]
    before = client.stats()
    publish(client.oid, bad['body'], correlation_id=tid, **bad['props'])
    # the good result is behind the bad one in the queue: once it is here, the bad one was handled
    assert_still_serving(app, client, publish, raw)
    after = client.stats()
    assert after['malformed_dropped'] == before['malformed_dropped'] + 1
    assert after['buffer_size'] == before['buffer_size'] + 1
    with pytest.raises(bad['error']) as excinfo:
        app.AsyncResult(tid).get(timeout=WAIT)
    assert not isinstance(excinfo.value, TimeoutError)


def test_pickle_probe_is_live():
    """The hostile pickle really does set the flag when unpickled (so the checks above mean something)."""
    payload = _bad(new_id())['pickle']['body']
    pickle.loads(payload)
    assert PWNED == ['unpickled']
    PWNED.clear()


def test_missing_correlation_id_and_task_id_is_a_counted_drop(app, client, publish, raw):
    assert_a_counted_drop(app, client, publish, raw,
                          json.dumps({'status': 'SUCCESS', 'result': 1, 'traceback': None}).encode(), **JSON)


def test_missing_correlation_id_with_body_task_id_is_delivered(app, client, publish, raw):
    client.result_consumer.start()
    tid = new_id()
    publish(client.oid, good_body(tid, 'by body id'), **JSON)
    assert app.AsyncResult(tid).get(timeout=WAIT) == 'by body id'
    assert client.stats()['malformed_dropped'] == 0


# -- exception payloads naming things that are not exception classes --------------------------------
def _hostile_payloads(flag_path: str) -> Dict[str, Dict[str, Any]]:
    return {
        'os.system': {'exc_module': 'os', 'exc_type': 'system', 'exc_message': ['echo pwned']},
        'os.system-touch': {'exc_module': 'os', 'exc_type': 'system', 'exc_message': [f'touch {flag_path}']},
        'builtins.eval': {'exc_module': 'builtins', 'exc_type': 'eval',
                          'exc_message': [f"open({flag_path!r}, 'w').close()"]},
        'builtins.dict': {'exc_module': 'builtins', 'exc_type': 'dict', 'exc_message': []},
        'json.loads': {'exc_module': 'json', 'exc_type': 'loads', 'exc_message': ['{}']},
    }


HOSTILE = list(_hostile_payloads('/x'))


def failure_body(tid: str, exc: Dict[str, Any]) -> bytes:
    return json.dumps({'status': 'FAILURE', 'result': exc, 'traceback': 'tb', 'children': [],
                       'date_done': datetime.now(timezone.utc).isoformat(), 'task_id': tid}).encode()


@pytest.mark.parametrize('name', HOSTILE)
@pytest.mark.parametrize('known', [True, False], ids=['tracked', 'unknown-then-get'])
def test_exception_payload_naming_a_non_exception_is_refused(name, known, app, client, publish, raw,
                                                             tmp_path, capfd):
    client.result_consumer.start()
    flag = tmp_path / 'pwned'
    payload = _hostile_payloads(str(flag))[name]
    tid = new_id()
    result = app.AsyncResult(tid)
    if known:
        client.add_pending_result(result)
    publish(client.oid, failure_body(tid, payload), correlation_id=tid, **JSON)
    if not known:  # let it arrive while nobody holds a result for it, then ask
        deadline = time.monotonic() + WAIT
        while client.stats()['received'] < 1:
            assert time.monotonic() < deadline, 'the reply never arrived'
            client.result_consumer.drain_events(timeout=0.2)
    with pytest.raises(Exception) as excinfo:
        result.get(timeout=WAIT)
    error = excinfo.value
    assert not isinstance(error, TimeoutError), 'the waiter timed out instead of getting the error'
    assert isinstance(error, SecurityError), repr(error)
    assert f"{payload['exc_module']}.{payload['exc_type']}" in str(error)
    assert 'exception' in str(error).lower()
    assert not flag.exists(), 'the payload ran code'
    assert 'pwned' not in capfd.readouterr().out
    assert result.state == states.FAILURE
    assert isinstance(result.result, SecurityError)
    assert_still_serving(app, client, publish, raw)


def test_exception_payload_never_imports_a_module(app, client, publish, raw):
    client.result_consumer.start()
    module = 'antigravity'  # imports a web browser: must never be imported by decoding
    assert module not in sys.modules
    tid = new_id()
    result = app.AsyncResult(tid)
    client.add_pending_result(result)
    publish(client.oid, failure_body(tid, {'exc_module': module, 'exc_type': 'Fly', 'exc_message': ['up']}),
            correlation_id=tid, **JSON)
    with pytest.raises(Exception) as excinfo:
        result.get(timeout=WAIT)
    assert module not in sys.modules
    error = excinfo.value
    assert type(error).__name__ == 'Fly'  # a stand-in class carrying the sender's name
    assert isinstance(error, Exception) and error.args == ('up',)
    assert_still_serving(app, client, publish, raw)


# -- floods -----------------------------------------------------------------------------------------
def test_flood_of_unknown_ids_stays_bounded(broker_url, raw, publish):
    app = make_app(broker_url, result_buffer_max=100)
    client = app.backend
    try:
        client.result_consumer.start()
        waited = new_id()
        result = app.AsyncResult(waited)
        client.add_pending_result(result)
        flood = [new_id() for _ in range(2000)]
        for index, tid in enumerate(flood):
            publish(client.oid, good_body(tid, index), correlation_id=tid, **JSON)
        publish(client.oid, good_body(waited, 'after the flood'), correlation_id=waited, **JSON)
        assert result.get(timeout=30) == 'after the flood'
        stats = client.stats()
        assert stats['received'] == 2001
        assert stats['buffer_size'] <= 100
        assert stats['evicted'] == 1900
        assert stats['reconnects'] == 0
        assert consumers(raw, client.oid) == 1
        # the newest 100 are the ones kept
        assert app.AsyncResult(flood[-1]).get(timeout=WAIT) == 1999
    finally:
        app.close()
