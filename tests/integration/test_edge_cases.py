"""Edge cases on the real broker, through the public API and ``stats()``.

* Evicted ids fail fast long after their eviction: with ``result_buffer_max=10``, 3,000 replies
  nobody waits for evict 2,990; a ``get()`` for the very first one (evicted far beyond the old
  bound of ``max(10 * 10, 1024)`` ids) raises ResultEvicted at once, not a TimeoutError; past
  ``result_remember_max`` the oldest evicted id is forgotten and waits like an unknown one.
* A final state outlives its result object: after ``get()`` and dropping the result, a new
  result for the id reads SUCCESS and the value, every time; a redelivered reply for it is a
  counted duplicate that replaces nothing.
* Hostile exception payloads: a FAILURE naming SystemExit, KeyboardInterrupt, GeneratorExit,
  asyncio's CancelledError or any other BaseException outside Exception is raised by ``get()``
  (and ``join_native``, and ``await``) as a stand-in that ``except Exception`` catches, with
  the sent name and message; an ordinary ValueError is still a ValueError.
* Body encodings: a JSON body in latin-1 or UTF-16 is decoded per its ``content_encoding``;
  an unknown encoding, or bytes that are not in the declared one, are refused as
  MalformedResult and counted, and the connection survives; ``binary`` is read as kombu reads it.

Replies are published raw (py-amqp) in Celery's rpc:// format; nothing asserts on timings.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import json
from datetime import datetime, timezone
from typing import Any, Callable, Dict, List, Optional

import pytest
from kombu.serialization import loads as kombu_loads

from rpcresults import ResultSet, states
from rpcresults.exceptions import MalformedResult, ResultEvicted, TimeoutError
from tests.conftest import make_app, new_id, request_for
from tests.helpers import closing_apps
from tests.integration.test_rpc_backend import pump_until, received_at_least

pytestmark = pytest.mark.twins  # eviction and decoding are the selected state-table twin's

WAIT = 10.0
JSON = {'content_type': 'application/json', 'content_encoding': 'utf-8'}


# -- helpers ----------------------------------------------------------------------------------------
def success(task_id: str, value: Any) -> Dict[str, Any]:
    return {'status': 'SUCCESS', 'result': value, 'traceback': None, 'children': [],
            'date_done': datetime.now(timezone.utc).isoformat(), 'task_id': task_id}


def failure(task_id: str, exc_type: str, exc_module: Optional[str], message: List[Any]) -> bytes:
    return json.dumps({'status': 'FAILURE',
                       'result': {'exc_type': exc_type, 'exc_message': message, 'exc_module': exc_module},
                       'traceback': None, 'task_id': task_id, 'children': []}).encode()


def send_good(publish: Callable[..., None], client: Any, value: Any) -> str:
    task_id = new_id()
    publish(client.oid, json.dumps(success(task_id, value)).encode(), correlation_id=task_id, **JSON)
    return task_id


def assert_still_serving(app: Any, client: Any, publish: Callable[..., None]) -> None:
    """A good reply published now still arrives, over the same connection."""
    task_id = send_good(publish, client, {'still': 'serving'})
    assert app.AsyncResult(task_id).get(timeout=WAIT) == {'still': 'serving'}
    stats = client.stats()
    assert stats['reconnects'] == 0
    assert stats['connected'] == 1


def caught(call: Callable[[], Any]) -> Exception:
    """What ``call()`` raises, caught by ``except Exception``; anything escaping that fails the test."""
    try:
        value = call()
    except Exception as exc:
        return exc
    except BaseException as exc:  # the bug this guards against: never let it reach pytest
        pytest.fail(f'{type(exc).__module__}.{type(exc).__qualname__} {exc!r} escaped `except Exception`')
    pytest.fail(f'nothing was raised; returned {value!r}')


@pytest.fixture
def small_app(broker_url: str):
    """Factory of apps with their own settings (and reply queues), closed after the test."""
    yield from closing_apps(lambda **conf: make_app(broker_url, **conf))


# -- 5': evicted ids fail fast far beyond the old bound ---------------------------------------------
FLOOD = 3_000
BUFFER = 10
OLD_REMEMBER_BOUND = max(10 * BUFFER, 1024)


def flood(publish: Callable[..., None], client: Any, count: int) -> List[str]:
    """``count`` replies for ids nobody holds a result for, read in by the consumer."""
    client.result_consumer.start()  # the reply queue exists before anything is published
    ids = [new_id() for _ in range(count)]
    for n, task_id in enumerate(ids):
        publish(client.oid, json.dumps(success(task_id, n)).encode(), correlation_id=task_id, **JSON)
    pump_until(client, received_at_least(client, count), timeout=60, what=f'{count} replies')
    return ids


def test_the_first_of_3000_evicted_ids_raises_result_evicted_at_once(small_app, publish, caplog):
    application = small_app(result_buffer_max=BUFFER)
    client = application.backend
    with caplog.at_level('ERROR', logger='rpcresults.state'):
        ids = flood(publish, client, FLOOD)
    stats = client.stats()
    evicted = FLOOD - BUFFER
    assert stats['received'] == FLOOD
    assert stats['evicted'] == evicted and stats['buffer_size'] == BUFFER
    assert stats['evicted_remembered'] == evicted
    assert evicted > OLD_REMEMBER_BOUND
    oldest_beyond_old_bound = evicted - OLD_REMEMBER_BOUND - 1
    for task_id in (ids[0], ids[1], ids[oldest_beyond_old_bound]):
        with pytest.raises(ResultEvicted) as info:  # raised from what is known: not a TimeoutError
            application.AsyncResult(task_id).get(timeout=5)
        assert info.value.task_ids == (task_id,) and task_id in str(info.value)
    for n in range(evicted, FLOOD):
        assert application.AsyncResult(ids[n]).get(timeout=WAIT) == n
    assert client.stats()['reconnects'] == 0


def test_past_result_remember_max_the_oldest_evicted_id_waits_like_an_unknown_one(small_app, publish, caplog):
    remember = 1_000
    application = small_app(result_buffer_max=BUFFER, result_remember_max=remember)
    client = application.backend
    with caplog.at_level('ERROR', logger='rpcresults.state'):
        ids = flood(publish, client, FLOOD)
    stats = client.stats()
    evicted = FLOOD - BUFFER
    assert stats['evicted'] == evicted
    assert stats['evicted_remembered'] == remember
    forgotten = evicted - remember  # ids[:forgotten] were forgotten, the oldest first
    with pytest.raises(TimeoutError):
        application.AsyncResult(ids[0]).get(timeout=0.2)
    with pytest.raises(TimeoutError):
        application.AsyncResult(ids[forgotten - 1]).get(timeout=0.2)
    with pytest.raises(ResultEvicted):
        application.AsyncResult(ids[forgotten]).get(timeout=5)


# -- 6': a final state outlives its result object ---------------------------------------------------
def test_a_dropped_result_s_final_state_is_read_by_a_new_result_every_time(app, client, worker):
    client.result_consumer.start()
    ids = [new_id() for _ in range(200)]
    for n, task_id in enumerate(ids):
        worker.mark_as_done(task_id, {'n': n}, request=request_for(client, task_id))
        result = app.AsyncResult(task_id)
        assert result.get(timeout=WAIT) == {'n': n}
        del result
        gc.collect()
        again = app.AsyncResult(task_id)
        assert again.state == states.SUCCESS, n
        assert again.result == {'n': n}
        assert again.get(timeout=WAIT) == {'n': n}
        del again
    stats = client.stats()
    assert stats['received'] == 200
    assert stats['evicted'] == 0 and stats['late'] == 0 and stats['duplicates'] == 0
    assert stats['cached'] == 0  # read from the state table's kept finals, not a result cache
    assert stats['tracked'] == 0 and stats['finished'] == 200


def test_a_redelivered_reply_for_a_dropped_result_is_a_duplicate(app, client, worker):
    client.result_consumer.start()
    task_id = new_id()
    worker.mark_as_done(task_id, 'first', request=request_for(client, task_id))
    result = app.AsyncResult(task_id)
    assert result.get(timeout=WAIT) == 'first'
    del result
    gc.collect()
    before = client.stats()
    worker.mark_as_done(task_id, 'second', request=request_for(client, task_id))
    pump_until(client, received_at_least(client, before['received'] + 1), what='the second reply')
    after = client.stats()
    assert after['duplicates'] == before['duplicates'] + 1
    assert after['buffer_size'] == before['buffer_size']
    again = app.AsyncResult(task_id)
    assert again.state == states.SUCCESS
    assert again.result == 'first'


def test_kept_final_states_are_bounded_by_result_buffer_max(small_app):
    application = small_app(result_buffer_max=BUFFER)
    client = application.backend
    worker = application.create_backend()
    try:
        client.result_consumer.start()
        ids = [new_id() for _ in range(50)]
        for n, task_id in enumerate(ids):
            worker.mark_as_done(task_id, n, request=request_for(client, task_id))
            assert application.AsyncResult(task_id).get(timeout=WAIT) == n
        gc.collect()
        assert client.stats()['finished'] == BUFFER
        for n in range(len(ids) - BUFFER, len(ids)):
            assert application.AsyncResult(ids[n]).result == n
    finally:
        worker.close()


# -- 7: hostile exception payloads ------------------------------------------------------------------
class Bail(BaseException):
    """A BaseException outside Exception that exists in this process (found by module and name)."""


HOSTILE = [
    ('builtins', 'SystemExit', SystemExit),
    ('builtins', 'KeyboardInterrupt', KeyboardInterrupt),
    ('builtins', 'GeneratorExit', GeneratorExit),
    ('asyncio.exceptions', 'CancelledError', asyncio.CancelledError),
    (__name__, 'Bail', Bail),
]
BASE_ONLY = (SystemExit, KeyboardInterrupt, GeneratorExit, asyncio.CancelledError, Bail)


def assert_stand_in(exc: BaseException, name: str, message: List[Any]) -> None:
    assert isinstance(exc, Exception), repr(exc)
    assert not isinstance(exc, BASE_ONLY), f'{type(exc).__mro__} is a BaseException-only class'
    assert type(exc).__name__ == name
    assert exc.args == tuple(message)


@pytest.mark.parametrize('module,name,real', HOSTILE, ids=[f'{m}.{n}' for m, n, _ in HOSTILE])
def test_a_base_exception_payload_raises_a_stand_in_that_except_exception_catches(
        module, name, real, app, client, publish):
    assert not issubclass(real, Exception)  # the payload names a class `except Exception` would miss
    client.result_consumer.start()
    task_id = new_id()
    publish(client.oid, failure(task_id, name, module, ['bye']), correlation_id=task_id, **JSON)
    result = app.AsyncResult(task_id)
    exc = caught(lambda: result.get(timeout=WAIT))
    assert_stand_in(exc, name, ['bye'])
    assert result.state == states.FAILURE and result.failed()
    assert_stand_in(result.result, name, ['bye'])
    assert_stand_in(result.get(timeout=WAIT, propagate=False), name, ['bye'])

    other = new_id()  # the same sent class gives the same stand-in class
    publish(client.oid, failure(other, name, module, ['again', 2]), correlation_id=other, **JSON)
    second = caught(lambda: app.AsyncResult(other).get(timeout=WAIT))
    assert type(second) is type(exc)
    assert second.args == ('again', 2)
    assert_still_serving(app, client, publish)


def test_concurrent_futures_cancelled_error_is_rebuilt_as_itself(app, client, publish):
    """concurrent.futures' CancelledError is an Exception already: no stand-in needed."""
    client.result_consumer.start()
    task_id = new_id()
    publish(client.oid, failure(task_id, 'CancelledError', 'concurrent.futures._base', ['bye']),
            correlation_id=task_id, **JSON)
    exc = caught(lambda: app.AsyncResult(task_id).get(timeout=WAIT))
    assert type(exc) is concurrent.futures.CancelledError
    assert exc.args == ('bye',)


def test_an_ordinary_exception_payload_is_still_rebuilt_as_itself(app, client, publish):
    client.result_consumer.start()
    task_id = new_id()
    publish(client.oid, failure(task_id, 'ValueError', 'builtins', ['bad value']), correlation_id=task_id, **JSON)
    exc = caught(lambda: app.AsyncResult(task_id).get(timeout=WAIT))
    assert type(exc) is ValueError
    assert exc.args == ('bad value',)


def test_join_native_over_a_hostile_member_raises_the_stand_in_and_the_consumer_survives(app, client, publish):
    client.result_consumer.start()
    good, hostile, last = new_id(), new_id(), new_id()
    publish(client.oid, json.dumps(success(good, 'a')).encode(), correlation_id=good, **JSON)
    publish(client.oid, failure(hostile, 'SystemExit', 'builtins', ['bye']), correlation_id=hostile, **JSON)
    publish(client.oid, json.dumps(success(last, 'c')).encode(), correlation_id=last, **JSON)
    members = [app.AsyncResult(task_id) for task_id in (good, hostile, last)]
    exc = caught(lambda: ResultSet(members, app=app).join_native(timeout=WAIT))
    assert_stand_in(exc, 'SystemExit', ['bye'])
    values = ResultSet(members, app=app).join_native(timeout=WAIT, propagate=False)
    assert values[0] == 'a' and values[2] == 'c'
    assert_stand_in(values[1], 'SystemExit', ['bye'])
    assert client.stats()['reconnects'] == 0
    assert_still_serving(app, client, publish)


def test_awaiting_a_cancelled_error_payload_raises_the_stand_in_not_a_cancellation(app, client, publish):
    client.result_consumer.start()
    task_id = new_id()
    publish(client.oid, failure(task_id, 'CancelledError', 'asyncio.exceptions', ['bye']),
            correlation_id=task_id, **JSON)
    result = app.AsyncResult(task_id)

    async def wait() -> Exception:
        try:
            await result.aget(timeout=WAIT)
        except Exception as exc:
            return exc
        raise AssertionError('nothing was raised')

    try:
        exc = asyncio.run(wait())
    except BaseException as escaped:  # a real CancelledError would cancel the awaiting task
        pytest.fail(f'{escaped!r} escaped `except Exception` inside the coroutine')
    assert_stand_in(exc, 'CancelledError', ['bye'])
    assert_still_serving(app, client, publish)


# -- 8: body encodings ------------------------------------------------------------------------------
TEXT = 'café ∅'  # '∅' is in UTF-16 but not latin-1


@pytest.mark.parametrize('encoding,value', [('latin-1', 'café'), ('utf-16', TEXT), ('utf-16-le', TEXT),
                                            ('cp1252', 'café €')])
def test_a_json_body_is_decoded_per_its_content_encoding(encoding, value, app, client, publish):
    client.result_consumer.start()
    task_id = new_id()
    body = json.dumps(success(task_id, value), ensure_ascii=False).encode(encoding)
    with pytest.raises(UnicodeDecodeError):
        body.decode('utf-8')  # read as UTF-8 (kombu's JSON default) it would be malformed
    publish(client.oid, body, correlation_id=task_id, content_type='application/json', content_encoding=encoding)
    assert app.AsyncResult(task_id).get(timeout=WAIT) == value
    assert client.stats()['malformed_dropped'] == 0


@pytest.mark.parametrize('encoding,body', [
    ('x-unknown-42', json.dumps({'status': 'SUCCESS', 'result': 1}).encode()),
    ('utf-8', b'\xff\xfe\xfa'),
    ('ascii', json.dumps({'status': 'SUCCESS', 'result': 'café'}, ensure_ascii=False).encode('latin-1')),
    ('utf-16', b'{\x00}'),  # an odd number of bytes
], ids=['unknown encoding', 'not utf-8', 'not ascii', 'truncated utf-16'])
def test_a_body_not_in_its_declared_encoding_is_refused_and_counted(encoding, body, app, client, publish):
    client.result_consumer.start()
    before = client.stats()
    task_id = new_id()
    publish(client.oid, body, correlation_id=task_id, content_type='application/json', content_encoding=encoding)
    exc = caught(lambda: app.AsyncResult(task_id).get(timeout=WAIT))
    assert isinstance(exc, MalformedResult), repr(exc)
    assert exc.task_id == task_id and task_id in str(exc)
    assert app.AsyncResult(task_id).state == states.FAILURE
    after = client.stats()
    assert after['malformed_dropped'] == before['malformed_dropped'] + 1
    assert_still_serving(app, client, publish)


def test_a_refused_encoding_for_an_id_nobody_waits_for_yet_is_kept_as_its_error(app, client, publish):
    client.result_consumer.start()
    before = client.stats()
    task_id = new_id()
    publish(client.oid, b'{"status": "SUCCESS", "result": 1}', correlation_id=task_id,
            content_type='application/json', content_encoding='x-unknown-42')
    assert_still_serving(app, client, publish)  # the good reply came after it: it was handled
    assert client.stats()['malformed_dropped'] == before['malformed_dropped'] + 1
    with pytest.raises(MalformedResult):
        app.AsyncResult(task_id).get(timeout=WAIT)


def test_binary_content_encoding_of_a_json_body_is_read_as_kombu_reads_it(app, client, publish):
    """'binary' says the body is bytes as the codec made them; JSON's are UTF-8, as kombu reads them."""
    client.result_consumer.start()
    task_id = new_id()
    body = json.dumps(success(task_id, 'café'), ensure_ascii=False).encode('utf-8')
    assert kombu_loads(body, 'application/json', 'binary', accept={'application/json'})['result'] == 'café'
    publish(client.oid, body, correlation_id=task_id, content_type='application/json', content_encoding='binary')
    assert app.AsyncResult(task_id).get(timeout=WAIT) == 'café'
    assert client.stats()['malformed_dropped'] == 0
