"""rpcresults.serialization and rpcresults.exceptions.

The wire form of exceptions is compared with what Celery's own backend produces
for the same exception (an independent oracle); decoding is checked for what it
must refuse: non-exception classes, module imports, refused content types.
"""
from __future__ import annotations

import builtins
import json
import pickle
import sys
from datetime import datetime, timezone

import pytest
from kombu.exceptions import ContentDisallowed

from rpcresults import exceptions, serialization
from rpcresults.exceptions import (MalformedResult, ReplyQueueLost, ResultEvicted, RPCResultsError,
                                   SecurityError, TimeoutError)

JSON = 'application/json'
PICKLE = 'application/x-python-serialize'

#: (module, exception class path in it): stdlib modules with an exception class, for the no-import test.
NOT_YET_IMPORTED_CANDIDATES = [
    ('xdrlib', 'Error'), ('nntplib', 'NNTPError'), ('poplib', 'error_proto'), ('tabnanny', 'NannyNag'),
    ('imaplib', 'IMAP4.error'), ('mailbox', 'Error'), ('aifc', 'Error'), ('sunau', 'Error'),
]


class Outer:
    """Holds an exception class defined inside a class: its wire name is a dotted __qualname__."""

    class InnerError(Exception):
        pass

    class Middle:
        class DeepError(KeyError):
            pass


class ModuleLevelError(Exception):
    pass


class NeedsTwoArgs(Exception):
    def __init__(self, a, b):
        super().__init__(a, b)


CALLED = {'function': False, 'unpickled': False}


def module_function(*args):
    """Not an exception class: a payload naming it must be refused, and it must never run."""
    CALLED['function'] = True
    return args


def _set_unpickled_flag():
    CALLED['unpickled'] = True
    return 'gotcha'


class PickleBomb:
    """Unpickling this calls :func:`_set_unpickled_flag`."""

    def __reduce__(self):
        return _set_unpickled_flag, ()


@pytest.fixture(scope='module')
def celery_backend():
    from celery import Celery
    app = Celery(backend='rpc://', broker='memory://')
    return app.backend


def _celery_wire(prepared):
    """Celery's prepared exception as it would look after a JSON trip (tuples become lists)."""
    return json.loads(json.dumps(prepared))


# -- prepare_exception against Celery --------------------------------------------------------

@pytest.mark.parametrize('exc', [
    ValueError('bad value'),
    KeyError('missing'),
    ValueError(),
    RuntimeError('two', 2, None, [1, 2], {'k': 'v'}),
    ModuleLevelError('mine'),
    Outer.InnerError('nested', 1),
    Outer.Middle.DeepError('deep'),
    ZeroDivisionError('division by zero'),
], ids=lambda e: type(e).__qualname__)
def test_prepare_exception_matches_celery(celery_backend, exc) -> None:
    ours = serialization.prepare_exception(exc, 'json')
    theirs = celery_backend.prepare_exception(exc)
    assert set(ours) == {'exc_type', 'exc_message', 'exc_module'}
    assert ours['exc_type'] == theirs['exc_type']
    assert ours['exc_module'] == theirs['exc_module']
    assert list(ours['exc_message']) == list(theirs['exc_message'])
    assert json.loads(json.dumps(ours)) == _celery_wire(theirs)


class Unencodable:
    """Not JSON-encodable; its repr and str differ so the test sees which one is used."""

    def __repr__(self) -> str:
        return '<Unencodable repr>'

    def __str__(self) -> str:
        return 'unencodable str'


def test_prepare_exception_unencodable_args_match_celery(celery_backend) -> None:
    thing = object()
    exc = ValueError('text', thing, 3, Unencodable())
    ours = serialization.prepare_exception(exc, 'json')
    theirs = celery_backend.prepare_exception(exc)
    assert ours['exc_message'] == ['text', repr(thing), 3, '<Unencodable repr>']
    assert list(ours['exc_message']) == list(theirs['exc_message'])


def test_prepare_exception_names_nested_class_by_qualname() -> None:
    prepared = serialization.prepare_exception(Outer.Middle.DeepError('x'), 'json')
    assert prepared == {'exc_type': 'Outer.Middle.DeepError', 'exc_message': ['x'], 'exc_module': __name__}


def test_prepare_exception_for_pickle_keeps_the_exception() -> None:
    exc = ValueError('x')
    assert serialization.prepare_exception(exc, 'pickle') is exc


def test_ensure_serializable_turns_unencodable_items_into_reprs() -> None:
    thing = object()
    assert serialization.ensure_serializable(('a', 1, thing, None, Unencodable()), 'json') == (
        'a', 1, repr(thing), None, '<Unencodable repr>')


def test_prepared_exception_is_json_encodable() -> None:
    exc = RuntimeError(object(), {1, 2})
    prepared = serialization.prepare_exception(exc, 'json')
    content_type, _, body = serialization.encode(prepared, 'json')
    assert content_type == JSON
    decoded = serialization.decode(body, content_type, 'utf-8', serialization.accept_set(None))
    assert decoded['exc_type'] == 'RuntimeError'
    assert all(isinstance(item, str) for item in decoded['exc_message'])


# -- exception_to_python: rebuilding ---------------------------------------------------------

@pytest.mark.parametrize('exc', [ValueError('v', 1), KeyError('k'), ZeroDivisionError(), OSError(2, 'nope')],
                         ids=lambda e: type(e).__name__)
def test_builtin_exceptions_are_rebuilt(exc) -> None:
    rebuilt = serialization.exception_to_python(serialization.prepare_exception(exc, 'json'))
    assert type(rebuilt) is type(exc)
    assert rebuilt.args == exc.args


def test_exception_prepared_by_celery_is_rebuilt(celery_backend) -> None:
    wire = _celery_wire(celery_backend.prepare_exception(ZeroDivisionError('by zero')))
    rebuilt = serialization.exception_to_python(wire)
    assert type(rebuilt) is ZeroDivisionError
    assert rebuilt.args == ('by zero',)


def test_our_exception_is_rebuilt_by_celery(celery_backend) -> None:
    wire = json.loads(json.dumps(serialization.prepare_exception(KeyError('k'), 'json')))
    rebuilt = celery_backend.exception_to_python(wire)
    assert isinstance(rebuilt, KeyError)
    assert rebuilt.args == ('k',)


@pytest.mark.parametrize('cls', [Outer.InnerError, Outer.Middle.DeepError, ModuleLevelError],
                         ids=lambda c: c.__qualname__)
def test_module_and_nested_classes_are_rebuilt(cls) -> None:
    payload = {'exc_type': cls.__qualname__, 'exc_message': ['a', 2], 'exc_module': __name__}
    rebuilt = serialization.exception_to_python(payload)
    assert type(rebuilt) is cls
    assert rebuilt.args == ('a', 2)


def test_exc_message_scalar_becomes_single_arg() -> None:
    rebuilt = serialization.exception_to_python(
        {'exc_type': 'ValueError', 'exc_message': 'just one', 'exc_module': 'builtins'})
    assert type(rebuilt) is ValueError
    assert rebuilt.args == ('just one',)


def test_exc_message_list_becomes_args() -> None:
    rebuilt = serialization.exception_to_python(
        {'exc_type': 'ValueError', 'exc_message': ['one', 2, [3]], 'exc_module': 'builtins'})
    assert type(rebuilt) is ValueError
    assert rebuilt.args == ('one', 2, [3])


def test_exc_message_tuple_becomes_args() -> None:
    rebuilt = serialization.exception_to_python(
        {'exc_type': 'KeyError', 'exc_message': ('k',), 'exc_module': 'builtins'})
    assert type(rebuilt) is KeyError
    assert rebuilt.args == ('k',)


def test_an_exception_instance_passes_through() -> None:
    exc = ValueError('already')
    assert serialization.exception_to_python(exc) is exc


@pytest.mark.parametrize('empty', [None, {}, ''])
def test_empty_payload_is_none(empty) -> None:
    assert serialization.exception_to_python(empty) is None


def test_class_refusing_the_args_becomes_synthetic_with_its_name() -> None:
    rebuilt = serialization.exception_to_python(
        {'exc_type': 'NeedsTwoArgs', 'exc_message': ['only one'], 'exc_module': __name__})
    assert not isinstance(rebuilt, NeedsTwoArgs)
    assert isinstance(rebuilt, Exception)
    assert type(rebuilt).__name__ == 'NeedsTwoArgs'
    assert rebuilt.args == ('only one',)


# -- unknown classes: synthetic --------------------------------------------------------------

def test_unknown_module_gives_synthetic_exception_class() -> None:
    module = 'rpcresults_no_such_module_for_tests'
    payload = {'exc_type': 'VanishedError', 'exc_message': ['gone', 7], 'exc_module': module}
    first = serialization.exception_to_python(payload)
    second = serialization.exception_to_python(dict(payload))
    assert isinstance(first, Exception)
    assert type(first).__name__ == 'VanishedError'
    assert first.args == ('gone', 7)
    assert type(first) is type(second)
    assert module not in sys.modules


def test_unknown_class_in_known_module_gives_synthetic_exception_class() -> None:
    payload = {'exc_type': 'NoSuchThingError', 'exc_message': ['x'], 'exc_module': 'builtins'}
    first = serialization.exception_to_python(payload)
    second = serialization.exception_to_python(payload)
    assert type(first).__name__ == 'NoSuchThingError'
    assert issubclass(type(first), Exception)
    assert type(first) is type(second)
    assert not hasattr(builtins, 'NoSuchThingError')
    with pytest.raises(type(first)):
        raise first


def test_unknown_nested_class_keeps_the_short_name() -> None:
    rebuilt = serialization.exception_to_python(
        {'exc_type': 'Outer.NotDefinedError', 'exc_message': [], 'exc_module': __name__})
    assert type(rebuilt).__name__ == 'NotDefinedError'
    assert isinstance(rebuilt, Exception)
    assert not hasattr(Outer, 'NotDefinedError')


def test_synthetic_classes_differ_by_module() -> None:
    a = serialization.exception_to_python({'exc_type': 'SameNameError', 'exc_module': 'rpcresults_fake_a'})
    b = serialization.exception_to_python({'exc_type': 'SameNameError', 'exc_module': 'rpcresults_fake_b'})
    assert type(a).__name__ == type(b).__name__ == 'SameNameError'
    assert type(a) is not type(b)


def test_a_module_not_yet_imported_is_never_imported() -> None:
    candidates = [(m, c) for m, c in NOT_YET_IMPORTED_CANDIDATES if m not in sys.modules]
    assert candidates, 'every candidate stdlib module is already imported; extend the list'
    module, exc_type = candidates[0]
    rebuilt = serialization.exception_to_python(
        {'exc_type': exc_type, 'exc_message': ['payload'], 'exc_module': module})
    assert module not in sys.modules
    assert isinstance(rebuilt, Exception)
    assert type(rebuilt).__name__ == exc_type.rsplit('.', 1)[-1]
    assert type(rebuilt).__module__ == module
    assert rebuilt.args == ('payload',)


# -- refusals: SecurityError ----------------------------------------------------------------

@pytest.mark.parametrize('module,exc_type', [
    ('os', 'system'),
    ('builtins', 'dict'),
    ('builtins', 'object'),
    ('builtins', 'eval'),
    ('os', 'path.join'),
    ('subprocess', 'Popen'),
])
def test_non_exception_names_are_refused(module: str, exc_type: str) -> None:
    __import__(module)
    with pytest.raises(SecurityError):
        serialization.exception_to_python({'exc_type': exc_type, 'exc_message': ['true'], 'exc_module': module})


def test_a_function_of_this_module_is_refused_and_never_called() -> None:
    CALLED['function'] = False
    with pytest.raises(SecurityError):
        serialization.exception_to_python(
            {'exc_type': 'module_function', 'exc_message': ['x'], 'exc_module': __name__})
    assert CALLED['function'] is False


def test_a_non_exception_class_of_this_module_is_refused() -> None:
    with pytest.raises(SecurityError):
        serialization.exception_to_python({'exc_type': 'Outer', 'exc_message': [], 'exc_module': __name__})


@pytest.mark.parametrize('payload', ['ValueError', ['ValueError', 'x'], 42, ('a', 'b'), b'bytes'],
                         ids=['str', 'list', 'int', 'tuple', 'bytes'])
def test_non_mapping_payloads_are_refused(payload) -> None:
    with pytest.raises(SecurityError):
        serialization.exception_to_python(payload)


def test_missing_exc_type_is_refused() -> None:
    with pytest.raises(SecurityError):
        serialization.exception_to_python({'exc_message': ['x'], 'exc_module': 'builtins'})


@pytest.mark.parametrize('bad', [None, 42, '', ['ValueError']])
def test_invalid_exc_type_is_refused(bad) -> None:
    with pytest.raises(SecurityError):
        serialization.exception_to_python({'exc_type': bad, 'exc_message': [], 'exc_module': 'builtins'})


def test_security_error_is_an_rpcresults_error() -> None:
    assert issubclass(SecurityError, RPCResultsError)
    assert issubclass(SecurityError, Exception)


# -- accept set, encode, decode --------------------------------------------------------------

def test_accept_set_none_is_json_only() -> None:
    assert serialization.accept_set(None) == frozenset({JSON})


def test_accept_set_translates_codec_names() -> None:
    assert serialization.accept_set(['json', 'pickle']) == frozenset({JSON, PICKLE})
    assert serialization.accept_set([JSON]) == frozenset({JSON})


def test_encode_decode_round_trip_with_kombu_json_markers() -> None:
    when = datetime(2024, 5, 6, 7, 8, 9, tzinfo=timezone.utc)
    data = {'task_id': 'abc', 'status': 'SUCCESS', 'result': [1, 'two', None], 'date_done': when}
    content_type, content_encoding, body = serialization.encode(data, 'json')
    assert content_type == JSON
    assert content_encoding == 'utf-8'
    assert isinstance(body, bytes)
    assert json.loads(body)['task_id'] == 'abc'
    decoded = serialization.decode(body, content_type, content_encoding, serialization.accept_set(None))
    assert decoded == data


def test_decode_of_pickle_with_default_accept_is_refused_and_never_unpickled() -> None:
    CALLED['unpickled'] = False
    body = pickle.dumps({'status': 'SUCCESS', 'result': PickleBomb()})
    with pytest.raises(ContentDisallowed):
        serialization.decode(body, PICKLE, 'binary', serialization.accept_set(None))
    assert CALLED['unpickled'] is False
    # the payload is live: unpickling it for real does set the flag
    pickle.loads(body)
    assert CALLED['unpickled'] is True
    CALLED['unpickled'] = False


def test_decode_of_pickle_is_refused_with_an_explicit_json_accept() -> None:
    CALLED['unpickled'] = False
    body = pickle.dumps(PickleBomb())
    with pytest.raises(ContentDisallowed):
        serialization.decode(body, PICKLE, 'binary', serialization.accept_set(['json']))
    assert CALLED['unpickled'] is False


def test_decode_of_yaml_is_refused_by_default() -> None:
    with pytest.raises(ContentDisallowed):
        serialization.decode(b'status: SUCCESS', 'application/x-yaml', 'utf-8', serialization.accept_set(None))


def test_pickle_decodes_when_listed() -> None:
    body = pickle.dumps({'status': 'SUCCESS', 'result': 3})
    decoded = serialization.decode(body, PICKLE, 'binary', serialization.accept_set(['json', 'pickle']))
    assert decoded == {'status': 'SUCCESS', 'result': 3}


def test_content_disallowed_is_kombus() -> None:
    assert exceptions.ContentDisallowed is ContentDisallowed


# -- exception classes -----------------------------------------------------------------------

def test_timeout_error_is_also_the_builtin() -> None:
    assert issubclass(TimeoutError, builtins.TimeoutError)
    assert issubclass(TimeoutError, RPCResultsError)
    with pytest.raises(builtins.TimeoutError):
        raise TimeoutError('timed out')
    try:
        raise TimeoutError('x')
    except OSError as exc:  # builtins.TimeoutError is an OSError
        assert isinstance(exc, TimeoutError)


def test_reply_queue_lost_names_its_ids() -> None:
    error = ReplyQueueLost(['id-one', 'id-two'], 'queue expired')
    assert error.task_ids == ('id-one', 'id-two')
    assert error.detail == 'queue expired'
    text = str(error)
    assert 'id-one' in text
    assert 'id-two' in text
    assert '2' in text
    assert 'queue expired' in text


def test_reply_queue_lost_without_detail() -> None:
    text = str(ReplyQueueLost(['only-id']))
    assert 'only-id' in text
    assert '()' not in text


def test_reply_queue_lost_shortens_long_id_lists() -> None:
    ids = [f'task-{n:02d}' for n in range(25)]
    text = str(ReplyQueueLost(ids))
    for shown in ids[:10]:
        assert shown in text
    assert 'task-10' not in text
    assert 'task-24' not in text
    assert '15 more' in text
    assert '25' in text


def test_result_evicted_names_ids_and_is_a_lookup_error() -> None:
    error = ResultEvicted(['evicted-id'])
    assert isinstance(error, LookupError)
    assert isinstance(error, RPCResultsError)
    assert error.task_ids == ('evicted-id',)
    assert 'evicted-id' in str(error)
    assert 'evicted' in str(error)


def test_malformed_result_str() -> None:
    error = MalformedResult('tid-1', 'body is a list')
    assert error.task_id == 'tid-1'
    assert error.reason == 'body is a list'
    assert 'tid-1' in str(error)
    assert 'body is a list' in str(error)


def test_exceptions_survive_pickling() -> None:
    lost = pickle.loads(pickle.dumps(ReplyQueueLost(['a', 'b'], 'why')))
    assert type(lost) is ReplyQueueLost
    assert lost.task_ids == ('a', 'b')
    assert str(lost) == str(ReplyQueueLost(['a', 'b'], 'why'))


def test_all_listed_exceptions_exist() -> None:
    for name in exceptions.__all__:
        cls = getattr(exceptions, name)
        assert isinstance(cls, type) and issubclass(cls, BaseException), name
