"""More bad replies on the real broker, beside tests/integration/test_bad_input.py.

Cases test_bad_input.py does not publish: empty and non-UTF-8 JSON bodies, a body with no
content type or an unaccepted one (msgpack), JSON bodies that are a string, number, null or
boolean instead of a mapping, an empty correlation id or a non-string body task id with no
correlation id, and FAILURE payloads whose exception part is not an exception mapping at all.
Each must give the waiter of that id a clear error (never a timeout) or be a counted drop,
and the consumer keeps its connection: a good result published right after still arrives.
"""
from __future__ import annotations

import json
from typing import Any, Dict

import pytest

from rpcresults import states
from rpcresults.exceptions import ContentDisallowed, MalformedResult, SecurityError, TimeoutError
from tests.conftest import new_id
from tests.integration.test_bad_input import JSON, WAIT, assert_a_counted_drop, assert_still_serving, failure_body

pytestmark = pytest.mark.twins  # decoding is the selected state table twin's


def _cases(tid: str) -> Dict[str, Dict[str, Any]]:
    """kind -> body, properties, the error the waiter must get and words its message must hold."""
    return {
        'empty json body': dict(body=b'', props=JSON, error=MalformedResult, words=[]),
        'json body not utf-8': dict(body=b'{"status": "SUCCESS", "result": "\xff\xfe"}', props=JSON,
                                    error=MalformedResult, words=[]),
        'no content type': dict(body=json.dumps({'status': 'SUCCESS', 'result': 1}).encode(), props={},
                                error=(MalformedResult, ContentDisallowed), words=[]),
        'msgpack not accepted': dict(body=b'\x81\xa6status\xa7SUCCESS',
                                     props={'content_type': 'application/x-msgpack', 'content_encoding': 'binary'},
                                     error=ContentDisallowed, words=['msgpack']),
        'json string': dict(body=b'"SUCCESS"', props=JSON, error=MalformedResult, words=['str']),
        'json number': dict(body=b'42', props=JSON, error=MalformedResult, words=['int']),
        'json null': dict(body=b'null', props=JSON, error=MalformedResult, words=['none']),
        'json true': dict(body=b'true', props=JSON, error=MalformedResult, words=['bool']),
        'exception is a string': dict(body=failure_body(tid, 'boom'), props=JSON,
                                      error=SecurityError, words=['exception']),
        'exception is a list': dict(body=failure_body(tid, ['ValueError', 'x']), props=JSON,
                                    error=SecurityError, words=['exception']),
        'exception without exc_type': dict(body=failure_body(tid, {'exc_message': ['x'], 'exc_module': 'builtins'}),
                                           props=JSON, error=SecurityError, words=['exc_type']),
        'exc_type not a string': dict(body=failure_body(tid, {'exc_type': 42, 'exc_message': [], 'exc_module': 'x'}),
                                      props=JSON, error=SecurityError, words=['exc_type']),
        'exc_module not a string': dict(body=failure_body(tid, {'exc_type': 'E', 'exc_message': [], 'exc_module': []}),
                                        props=JSON, error=SecurityError, words=['exc_module']),
    }


KINDS = list(_cases('x'))


@pytest.mark.parametrize('kind', KINDS)
def test_bad_reply_for_a_tracked_id_gives_a_clear_error(kind, app, client, publish, raw):
    client.result_consumer.start()
    tid = new_id()
    case = _cases(tid)[kind]
    result = app.AsyncResult(tid, backend=client)
    client.add_pending_result(result)
    publish(client.oid, case['body'], correlation_id=tid, **case['props'])
    with pytest.raises(Exception) as excinfo:
        result.get(timeout=WAIT)
    error = excinfo.value
    assert not isinstance(error, TimeoutError), 'the waiter timed out instead of getting the error'
    assert isinstance(error, case['error']), repr(error)
    text = str(error).lower()
    for word in case['words']:
        assert word in text, f'{word!r} not named in {str(error)!r}'
    if isinstance(error, MalformedResult):
        assert tid in str(error)
    assert result.state == states.FAILURE
    assert_still_serving(app, client, publish, raw)


@pytest.mark.parametrize('properties,body', [
    ({'correlation_id': ''}, {'status': 'SUCCESS', 'result': 1}),
    ({}, {'status': 'SUCCESS', 'result': 1, 'task_id': 42}),
    ({}, {'status': 'SUCCESS', 'result': 1, 'task_id': ''}),
], ids=['empty correlation id, no task id', 'no correlation id, task id not a string',
        'no correlation id, empty task id'])
def test_reply_without_a_usable_id_is_a_counted_drop(properties, body, app, client, publish, raw):
    assert_a_counted_drop(app, client, publish, raw, json.dumps(body).encode(), **properties, **JSON)


def test_many_bad_replies_in_a_row_then_good_ones(app, client, publish, raw):
    """Every kind above back to back for ids nobody waits for: all counted, none kills the consumer."""
    client.result_consumer.start()
    before = client.stats()
    for kind in KINDS:
        tid = new_id()
        case = _cases(tid)[kind]
        publish(client.oid, case['body'], correlation_id=tid, **case['props'])
    assert_still_serving(app, client, publish, raw)
    after = client.stats()
    # the decoding failures are counted as malformed; bad exception payloads decode fine (they fail at get())
    decoding = [kind for kind in KINDS if _cases('x')[kind]['error'] is not SecurityError]
    assert after['malformed_dropped'] - before['malformed_dropped'] == len(decoding)
    assert after['received'] - before['received'] == len(KINDS) + 1
