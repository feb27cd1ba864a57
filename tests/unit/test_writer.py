"""The frame writer, both twins, against py-amqp's own frame writer: the same message and properties
give the same bytes, body frames split at ``frame_max`` included; and our parser reads them back."""
from __future__ import annotations

from typing import Any, Dict, Optional

import amqp
import pytest
from amqp.method_framing import frame_writer
from amqp.serialization import dumps
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.twins import TWINS, Twin

pytestmark = pytest.mark.twins

PUBLISH = (60, 40)


class _Capture:
    """What py-amqp's frame writer needs of a connection and a transport: it records the bytes."""

    def __init__(self, frame_max: int) -> None:
        self.frame_max = frame_max
        self.bytes_sent = 0
        self.data = bytearray()

    def write(self, data: Any) -> None:
        self.data += bytes(data)


def py_amqp_bytes(channel: int, frame_max: int, exchange: str, routing_key: str, body: bytes,
                  mandatory: bool, properties: Dict[str, Any]) -> bytes:
    capture = _Capture(frame_max)
    write = frame_writer(capture, capture)
    args = dumps('Bssbb', (0, exchange, routing_key, mandatory, False))
    write(1, channel, PUBLISH, args, amqp.Message(body, **properties))
    return bytes(capture.data)


def our_bytes(twin: Twin, channel: int, frame_max: int, exchange: str, routing_key: str, body: bytes,
              mandatory: bool, properties: Dict[str, Any]) -> bytes:
    writer = twin.writer.FrameWriter(channel, frame_max)
    headers = properties.get('application_headers')
    writer.publish(exchange, routing_key, body, mandatory=mandatory,
                   content_type=properties.get('content_type'),
                   content_encoding=properties.get('content_encoding'),
                   headers=None if headers is None else dumps('F', [headers])[4:],
                   delivery_mode=properties.get('delivery_mode', 0),
                   priority=properties.get('priority', -1),
                   correlation_id=properties.get('correlation_id'), reply_to=properties.get('reply_to'),
                   expiration=properties.get('expiration'), message_id=properties.get('message_id'))
    return writer.take()


CELERY_RESULT = {'content_type': 'application/json', 'content_encoding': 'utf-8', 'application_headers': {},
                 'delivery_mode': 1, 'priority': 0, 'correlation_id': 'c0ffee'}


def test_a_celery_result_is_written_as_py_amqp_writes_it(twin: Twin) -> None:
    body = b'{"status": "SUCCESS", "result": 4, "traceback": null, "children": [], "task_id": "c0ffee"}'
    ours = our_bytes(twin, 1, 131072, '', 'reply-queue', body, True, CELERY_RESULT)
    assert ours == py_amqp_bytes(1, 131072, '', 'reply-queue', body, True, CELERY_RESULT)


def test_several_messages_gather_until_taken(twin: Twin) -> None:
    writer = twin.writer.FrameWriter(3, 131072)
    expected = b''
    for index in range(5):
        body = b'x' * index
        props = dict(CELERY_RESULT, correlation_id=str(index))
        writer.publish('', 'q', body, mandatory=False, content_type='application/json',
                       content_encoding='utf-8', headers=b'', delivery_mode=1, priority=0,
                       correlation_id=str(index))
        expected += py_amqp_bytes(3, 131072, '', 'q', body, False, props)
    assert writer.written == 5
    assert writer.pending == len(expected)
    assert writer.take() == expected
    assert writer.pending == 0
    assert writer.take() == b''


def test_large_bodies_are_split_at_frame_max(twin: Twin) -> None:
    body = bytes(range(256)) * 100  # 25,600 bytes over frames of at most 4,096
    ours = our_bytes(twin, 1, 4096, '', 'q', body, False, CELERY_RESULT)
    assert ours == py_amqp_bytes(1, 4096, '', 'q', body, False, CELERY_RESULT)
    parser = twin.frames.FrameParser(2, 'not-ours', 4096)  # frames of another channel come out whole
    _, frames = parser.feed(ours)
    assert [frame[0] for frame in frames] == [1, 2] + [3] * 7
    assert b''.join(frame[2] for frame in frames[2:]) == body


def test_what_we_write_our_parser_reads_as_a_delivery(twin: Twin) -> None:
    """A publish and a delivery share the content header: swap the method, parse it back."""
    writer = twin.writer.FrameWriter(1, 131072)
    writer.publish('', 'q', b'{"status": "SUCCESS"}', content_type='application/json',
                   content_encoding='latin-1', headers=b'', delivery_mode=1, priority=0, correlation_id='id-1')
    data = writer.take()
    method_len = int.from_bytes(data[3:7], 'big')
    deliver = dumps('sLbss', ('tag', 7, False, '', 'q'))
    method = b'\x00\x3c\x00\x3c' + deliver
    frame = b'\x01\x00\x01' + len(method).to_bytes(4, 'big') + method + b'\xce'
    parser = twin.frames.FrameParser(1, 'tag', 131072)
    deliveries, others = parser.feed(frame + data[8 + method_len:])
    assert others == []
    assert deliveries == [(7, 'id-1', 'application/json', 'latin-1', b'{"status": "SUCCESS"}')]


def test_bad_arguments_are_refused(twin: Twin) -> None:
    with pytest.raises(ValueError, match='frame_max'):
        twin.writer.FrameWriter(1, 100)
    writer = twin.writer.FrameWriter(1, 131072)
    with pytest.raises(ValueError, match='short string'):
        writer.publish('', 'q' * 256, b'')
    assert writer.written == 0


@pytest.mark.parametrize('bad', [{'correlation_id': 'x' * 300}, {'correlation_id': 7}, {'reply_to': b'raw'}])
def test_a_field_that_cannot_be_encoded_leaves_the_buffer_as_it_was(twin: Twin, bad: Dict[str, Any]) -> None:
    """A refused message writes nothing: no half message goes out ahead of the next one."""
    writer = twin.writer.FrameWriter(1, 131072)
    writer.publish('', 'q', b'first', correlation_id='1')
    before = writer.pending
    with pytest.raises((ValueError, TypeError)):
        writer.publish('', 'q', b'refused', **bad)
    assert writer.pending == before and writer.written == 1
    writer.publish('', 'q', b'next', correlation_id='2')
    expected = (py_amqp_bytes(1, 131072, '', 'q', b'first', False, {'correlation_id': '1'})
                + py_amqp_bytes(1, 131072, '', 'q', b'next', False, {'correlation_id': '2'}))
    assert writer.take() == expected


short = st.text(max_size=40)
optional_short = st.none() | short
header_values = st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.text(max_size=20)
properties = st.fixed_dictionaries({}, optional={
    'content_type': short, 'content_encoding': short,
    'application_headers': st.dictionaries(st.text(min_size=1, max_size=10), header_values, max_size=4),
    'delivery_mode': st.sampled_from([1, 2]), 'priority': st.integers(0, 9),
    'correlation_id': short, 'reply_to': short, 'expiration': st.integers(1, 10**6).map(str),
    'message_id': short,
})


@pytest.mark.parametrize('kind', TWINS)
@settings(max_examples=100, deadline=None)
@given(channel=st.integers(1, 2047), frame_max=st.sampled_from([0, 4096, 8192, 131072]),
       exchange=short, routing_key=short, body=st.binary(max_size=10000), mandatory=st.booleans(),
       props=properties)
def test_differential_against_py_amqp(kind: str, channel: int, frame_max: int, exchange: str, routing_key: str,
                                      body: bytes, mandatory: bool, props: Dict[str, Optional[Any]]) -> None:
    twin = Twin(kind)
    assert (our_bytes(twin, channel, frame_max, exchange, routing_key, body, mandatory, props)
            == py_amqp_bytes(channel, frame_max or 10**9, exchange, routing_key, body, mandatory, props))
