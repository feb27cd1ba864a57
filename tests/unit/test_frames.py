"""The sans-I/O AMQP 0-9-1 frame parser (``FrameParser``, ``FrameError``) on both twins.

Every stream here is made of real frames written by py-amqp's own ``frame_writer``
(tests/amqp_frames.py), except the malformed ones, which are built by hand on top of
py-amqp's own argument and property encoders. Each test runs on the pure-Python twin
and on the compiled one (tests/twins.py); error cases check each twin raises its own
``FrameError`` with the very same message.
"""
from __future__ import annotations

import random
import re
from types import ModuleType
from typing import Any, List, Tuple

import pytest

from tests.amqp_frames import (
    CANCEL, CHANNEL_CLOSE, CHANNEL_FLOW, CONSUME_OK, DELIVER, FRAME_END, QOS_OK, Writer, chunked,
    header_payload, join_frames, method_args, raw_frame, read_with_py_amqp, split_frames)
from tests.frame_streams import feed_all
from rpcresults.exceptions import FrameError
from tests.twins import load_twin

CH = 1                      # our channel
TAG = 'rpcresults-3b6c1a2e-7d1f-4c8e-9a55-0d6f2e1b9c40'  # our consumer tag, shaped like the real one
JSON = 'application/json'
BODY = b'{"status": "SUCCESS", "result": 42, "traceback": null, "children": []}'


@pytest.fixture
def parser_impl(twin) -> ModuleType:
    """The module holding ``FrameParser`` for one twin."""
    return twin.frames


@pytest.fixture
def writer() -> Writer:
    return Writer()


def parse(parser_impl: ModuleType, data: bytes, frame_max: int = 131072, **kwargs: Any):
    parser = parser_impl.FrameParser(CH, TAG, frame_max, **kwargs)
    deliveries, others = parser.feed(data)
    return parser, deliveries, others


# -- the module -------------------------------------------------------------------------------------

def test_module_surface(parser_impl) -> None:
    assert parser_impl.FRAME_END == FRAME_END == 0xCE
    assert parser_impl.DEFAULT_MAX_BODY == 256 * 1024 * 1024
    assert issubclass(parser_impl.FrameError, Exception)
    parser = parser_impl.FrameParser(CH, TAG)
    assert parser.frame_max == 131072
    assert parser.max_body == parser_impl.DEFAULT_MAX_BODY
    assert parser.consumer_tag == TAG.encode()
    assert parser.channel == CH
    assert parser.frames_parsed == 0
    assert parser.buffered == 0
    assert parser.mid_message is False
    assert parser.take_remainder() == b''


def test_both_twins_raise_the_one_frame_error_of_rpcresults_exceptions() -> None:
    pure = load_twin('pure', 'frames')
    compiled = load_twin('compiled', 'frames')
    assert pure.FrameError is compiled.FrameError is FrameError
    with pytest.raises(compiled.FrameError) as info:
        compiled.FrameParser(CH, TAG).feed(raw_frame(1, CH, b'', end=0))
    assert type(info.value) is compiled.FrameError


# -- deliveries for us ------------------------------------------------------------------------------

def test_single_delivery_for_our_tag_on_our_channel(parser_impl, writer) -> None:
    data = writer.deliver(CH, TAG, 7, BODY, content_type=JSON, content_encoding='utf-8',
                          correlation_id='task-1', delivery_mode=2)
    assert [frame[0] for frame in split_frames(data)] == [1, 2, 3]
    parser, deliveries, others = parse(parser_impl, data)
    assert deliveries == [(7, 'task-1', JSON, 'utf-8', BODY)]
    assert others == []
    assert type(deliveries[0]) is tuple
    assert type(deliveries[0][4]) is bytes
    assert parser.frames_parsed == 3
    assert parser.buffered == 0
    assert parser.mid_message is False


def test_many_deliveries_in_one_chunk_keep_their_order(parser_impl, writer) -> None:
    data = b''.join(writer.deliver(CH, TAG, tag, b'body-%d' % tag, content_type=JSON,
                                   correlation_id=f'id-{tag}') for tag in range(1, 101))
    parser, deliveries, others = parse(parser_impl, data)
    assert deliveries == [(tag, f'id-{tag}', JSON, None, b'body-%d' % tag) for tag in range(1, 101)]
    assert others == []
    assert parser.frames_parsed == 300


@pytest.mark.parametrize('frame_max,size', [
    (4096, 20_000),          # several full body frames and a short last one
    (4096, 4088 * 3),        # the last body frame is exactly full
    (4096, 4088 + 1),        # one full frame and one byte
    (131072, 300_000),       # the broker's default frame_max, a 300 KB reply
])
def test_body_split_over_several_body_frames(parser_impl, frame_max, size) -> None:
    body = bytes(random.Random(size).getrandbits(8) for _ in range(size))
    data = Writer(frame_max).deliver(CH, TAG, 9, body, content_type=JSON, correlation_id='big')
    frames = split_frames(data)
    body_frames = [payload for frame_type, _, payload in frames if frame_type == 3]
    assert len(body_frames) >= 2
    assert all(len(frame) + 8 <= frame_max for frame in body_frames)
    parser, deliveries, others = parse(parser_impl, data, frame_max)
    assert deliveries == [(9, 'big', JSON, None, body)]
    assert others == []
    assert parser.frames_parsed == len(frames)


def test_multi_frame_body_fed_frame_by_frame_is_mid_message_until_the_last(parser_impl) -> None:
    body = b'x' * 10_000
    frames = split_frames(Writer(4096).deliver(CH, TAG, 3, body, correlation_id='c'))
    parser = parser_impl.FrameParser(CH, TAG, 4096)
    for frame in frames[:-1]:
        assert parser.feed(join_frames([frame])) == ([], [])
        assert parser.mid_message is True
    assert parser.feed(join_frames(frames[-1:])) == ([(3, 'c', None, None, body)], [])
    assert parser.mid_message is False


def test_zero_length_body_has_no_body_frame(parser_impl, writer) -> None:
    data = writer.deliver(CH, TAG, 11, b'', content_type=JSON, correlation_id='empty')
    assert [frame[0] for frame in split_frames(data)] == [1, 2]
    parser, deliveries, others = parse(parser_impl, data)
    assert deliveries == [(11, 'empty', JSON, None, b'')]
    assert others == []
    assert parser.mid_message is False
    # and the next message is read normally
    assert parser.feed(writer.deliver(CH, TAG, 12, BODY, correlation_id='next')) == (
        [(12, 'next', None, None, BODY)], [])


LATER = {'reply_to': 'amq.rabbitmq.reply-to', 'expiration': '60000',
         'message_id': 'm-1', 'timestamp': 1_700_000_000, 'type': 'result', 'user_id': 'guest',
         'app_id': 'celery', 'cluster_id': 'c1'}

PROPERTY_SETS = {
    'none': {},
    'content_type only': {'content_type': JSON},
    'content_encoding only': {'content_encoding': 'binary'},
    'correlation_id only': {'correlation_id': 'only-the-id'},
    'type and encoding': {'content_type': JSON, 'content_encoding': 'utf-8'},
    'headers table then id': {'application_headers': {'x-attempt': 3, 'lang': 'py', 'nested': {'k': 'v'},
                                                      'list': [1, 'two', True], 'f': 1.5, 'none': None},
                              'correlation_id': 'after-headers'},
    'empty headers table': {'application_headers': {}, 'correlation_id': 'after-empty-table'},
    'headers without id': {'content_type': JSON, 'application_headers': {'a': 'b' * 300}},
    'delivery_mode and priority': {'delivery_mode': 2, 'priority': 9, 'correlation_id': 'dm-prio'},
    'delivery_mode only then id': {'delivery_mode': 1, 'correlation_id': 'dm'},
    'priority only then id': {'priority': 0, 'correlation_id': 'prio'},
    'later properties after id': {'content_type': JSON, 'correlation_id': 'with-later', **LATER},
    'later properties without id': {'content_encoding': 'utf-8', **LATER},
    'all fourteen': {'content_type': JSON, 'content_encoding': 'utf-8',
                     'application_headers': {'h': 1}, 'delivery_mode': 2, 'priority': 5,
                     'correlation_id': 'all', **LATER},
    'non-ascii values': {'content_type': 'text/plain; charset=utf-8', 'content_encoding': 'utf‑8',
                         'correlation_id': 'tâche-✓-日本-🎉'},
    'empty strings': {'content_type': '', 'content_encoding': '', 'correlation_id': ''},
    'longest short strings': {'content_type': 't' * 255, 'content_encoding': 'e' * 255,
                              'correlation_id': 'é' * 127 + 'x'},
}


@pytest.mark.parametrize('properties', list(PROPERTY_SETS.values()), ids=list(PROPERTY_SETS))
def test_properties_are_read_and_the_rest_skipped(parser_impl, writer, properties) -> None:
    data = writer.deliver(CH, TAG, 5, BODY, **properties)
    expected = (5, properties.get('correlation_id'), properties.get('content_type'),
                properties.get('content_encoding'), BODY)
    parser, deliveries, others = parse(parser_impl, data)
    assert deliveries == [expected]
    assert others == []
    # py-amqp's own decoding of the very same frames agrees
    events, _ = read_with_py_amqp(split_frames(data))
    (event,) = events
    assert event.args[1] == 5
    assert event.body == BODY
    assert tuple(event.properties.get(key) for key in ('correlation_id', 'content_type', 'content_encoding')) \
        == expected[1:4]


def test_largest_delivery_tag_and_channel(parser_impl, writer) -> None:
    data = writer.deliver(65535, TAG, 2 ** 64 - 1, BODY, correlation_id='max')
    parser = parser_impl.FrameParser(65535, TAG)
    assert parser.feed(data) == ([(2 ** 64 - 1, 'max', None, None, BODY)], [])


def test_non_ascii_consumer_tag(parser_impl, writer) -> None:
    tag = 'consumer-ünïcødé-✓'
    parser = parser_impl.FrameParser(CH, tag)
    assert parser.consumer_tag == tag.encode('utf-8')
    assert parser.feed(writer.deliver(CH, tag, 1, BODY, correlation_id='u')) == (
        [(1, 'u', None, None, BODY)], [])


def test_invalid_utf8_in_a_short_string_does_not_crash(parser_impl) -> None:
    """Bytes that are not UTF-8 come out the same on both twins (surrogateescape), never as a crash."""
    header = (b'\x00\x3c\x00\x00' + (3).to_bytes(8, 'big') + b'\x84\x00'
              + bytes([3]) + b'\xffa\x80' + bytes([2]) + b'\xed\xa0')
    data = (raw_frame(1, CH, method_args(DELIVER, TAG, 4, False, '', 'q'))
            + raw_frame(2, CH, header) + raw_frame(3, CH, b'abc'))
    parser = parser_impl.FrameParser(CH, TAG)
    assert parser.feed(data) == ([(4, '\udced\udca0', '\udcffa\udc80', None, b'abc')], [])


def test_lone_surrogate_in_correlation_id_decodes_as_py_amqp_does(parser_impl, writer) -> None:
    """A str correlation id with a lone surrogate (kombu and py-amqp encode with surrogatepass).

    py-amqp reads it back as the very same str; the parser must too, or the reply reaches
    a different task id depending on which reader read it (ours or py-amqp's).
    """
    correlation_id = 'task-\ud800-id'
    data = writer.deliver(CH, TAG, 1, BODY, correlation_id=correlation_id)
    events, _ = read_with_py_amqp(split_frames(data))
    assert events[0].properties['correlation_id'] == correlation_id
    parser, deliveries, _ = parse(parser_impl, data)
    assert deliveries == [(1, correlation_id, None, None, BODY)]


# -- everything else passes through unchanged -------------------------------------------------------

def mixed_stream(writer: Writer) -> Tuple[bytes, List[Any], List[Any]]:
    """A stream of ours and others' frames: ``(bytes, expected deliveries, expected passed frames)``."""
    parts: List[Tuple[bytes, bool]] = [
        (writer.heartbeat(), False),
        (writer.method(CH, CONSUME_OK, TAG), False),
        (writer.deliver(CH, TAG, 1, b'first', content_type=JSON, correlation_id='a'), True),
        (writer.deliver(CH, 'someone-else', 2, b'not ours', content_type=JSON, correlation_id='b'), False),
        (writer.deliver(CH, TAG[:-1], 3, b'prefix of our tag', correlation_id='c'), False),
        (writer.deliver(CH, TAG + 'x', 4, b'our tag is its prefix', correlation_id='d'), False),
        (writer.deliver(CH, 'someone-else', 5, b'', correlation_id='e'), False),  # bodyless, not ours
        (writer.deliver(2, TAG, 6, b'our tag, another channel', correlation_id='f'), False),
        (writer.basic_return(CH, b'returned body', correlation_id='g', content_type=JSON), False),
        (writer.basic_return(CH, b''), False),
        (writer.get_ok(CH, 8, b'got it', correlation_id='h'), False),
        (writer.heartbeat(), False),
        (writer.deliver(CH, TAG, 9, b'second', content_type='application/x-python-serialize',
                        content_encoding='binary', correlation_id='i'), True),
        (writer.method(CH, QOS_OK), False),
        (writer.method(CH, CHANNEL_FLOW, True), False),
        (writer.method(0, ((10, 50), 'BsBB'), 320, 'CONNECTION_FORCED', 0, 0), False),  # connection.close
        (writer.method(CH, CANCEL, TAG, False), False),
        (writer.deliver(CH, TAG, 10, b'', correlation_id='j'), True),
        (writer.method(CH, CHANNEL_CLOSE, 404, "NOT_FOUND - no queue 'x'", 50, 10), False),
        (writer.heartbeat(), False),
    ]
    data = b''.join(chunk for chunk, _ in parts)
    ours = [frame for chunk, mine in parts if mine for frame in split_frames(chunk)]
    deliveries = _py_amqp_deliveries(ours)  # as py-amqp itself reads our frames
    others = [frame for chunk, mine in parts if not mine for frame in split_frames(chunk)]
    return data, deliveries, others


def _py_amqp_deliveries(frames: List[Any]) -> List[Any]:
    events, _ = read_with_py_amqp(frames)
    return [(event.args[1], event.properties.get('correlation_id'), event.properties.get('content_type'),
             event.properties.get('content_encoding'), event.body) for event in events]


def test_other_frames_are_returned_unchanged_in_order(parser_impl, writer) -> None:
    data, expected_deliveries, expected_others = mixed_stream(writer)
    parser, deliveries, others = parse(parser_impl, data)
    assert deliveries == expected_deliveries
    assert [d[0] for d in deliveries] == [1, 9, 10]
    assert others == expected_others
    assert all(type(payload) is bytes for _, _, payload in others)
    # what passed through is a stream py-amqp reads without complaint
    events, _ = read_with_py_amqp(others)
    assert [event.method_sig for event in events] == [
        (60, 21), (60, 60), (60, 60), (60, 60), (60, 60), (60, 60), (60, 50), (60, 50), (60, 71),
        (60, 11), (20, 20), (10, 50), (60, 30), (20, 40)]
    assert [event.body for event in events if event.body is not None] == [
        b'not ours', b'prefix of our tag', b'our tag is its prefix', b'', b'our tag, another channel',
        b'returned body', b'', b'got it']
    assert parser.frames_parsed == len(split_frames(data))


def test_heartbeats_and_other_channels_between_our_content_frames(parser_impl, writer) -> None:
    """Frames of other channels may come between ours; a heartbeat may come anywhere."""
    small = Writer(4096)
    ours = split_frames(small.deliver(CH, TAG, 1, b'q' * 9000, correlation_id='ours'))
    theirs = split_frames(small.deliver(2, 'their-tag', 1, b't' * 5000, correlation_id='theirs'))
    beat = (8, 0, b'')
    beat_on_ours = (8, CH, b'')
    stream = [ours[0], theirs[0], beat, ours[1], theirs[1], beat_on_ours, ours[2], theirs[2], ours[3],
              beat, theirs[3], ours[4]]
    assert len(ours) == 5 and len(theirs) == 4
    parser = parser_impl.FrameParser(CH, TAG, 4096)
    deliveries, others = parser.feed(join_frames(stream))
    assert deliveries == [(1, 'ours', None, None, b'q' * 9000)]
    assert others == [theirs[0], beat, theirs[1], beat_on_ours, theirs[2], beat, theirs[3]]


def test_others_content_keeps_the_parser_mid_message(parser_impl, writer) -> None:
    frames = split_frames(writer.basic_return(CH, b'r' * 10))
    parser = parser_impl.FrameParser(CH, TAG)
    assert parser.feed(join_frames(frames[:1])) == ([], frames[:1])
    assert parser.mid_message is True
    assert parser.feed(join_frames(frames[1:2])) == ([], frames[1:2])
    assert parser.mid_message is True
    assert parser.feed(join_frames(frames[2:])) == ([], frames[2:])
    assert parser.mid_message is False


# -- chunking ---------------------------------------------------------------------------------------

def chunkings(data: bytes) -> List[Tuple[str, List[bytes]]]:
    rng = random.Random(1234)
    ways = [('all at once', [data]), ('1-byte chunks', [data[i:i + 1] for i in range(len(data))]),
            ('7-byte chunks', chunked(data, range(7, len(data), 7))),
            ('at every frame end', chunked(data, _frame_ends(data))),
            ('one byte after every frame end', chunked(data, [end + 1 for end in _frame_ends(data)]))]
    for index in range(8):
        cuts = rng.sample(range(1, len(data)), rng.randint(1, min(60, len(data) - 1)))
        ways.append((f'random chunks #{index}', chunked(data, cuts)))
    return ways


def _frame_ends(data: bytes) -> List[int]:
    ends, pos = [], 0
    for _, _, payload in split_frames(data):
        pos += 8 + len(payload)
        ends.append(pos)
    return ends


def test_any_chunking_gives_the_same_output(parser_impl, writer) -> None:
    data, expected_deliveries, expected_others = mixed_stream(writer)
    data += Writer(4096).deliver(CH, TAG, 99, bytes(range(256)) * 40, correlation_id='long')
    expected_deliveries = expected_deliveries + [(99, 'long', None, None, bytes(range(256)) * 40)]
    for name, chunks in chunkings(data):
        assert b''.join(chunks) == data
        parser = parser_impl.FrameParser(CH, TAG, 131072)
        deliveries, others = feed_all(parser, chunks)
        assert deliveries == expected_deliveries, name
        assert others == expected_others, name
        assert parser.buffered == 0, name
        assert parser.mid_message is False, name


@pytest.mark.parametrize('as_type', ['bytes', 'bytearray', 'memoryview of a reused buffer'])
def test_chunks_as_bytearray_or_views_of_a_reused_buffer(parser_impl, writer, as_type) -> None:
    """The reader feeds ``memoryview(buffer)[:count]`` of one buffer it reuses for every recv."""
    data, expected_deliveries, expected_others = mixed_stream(writer)
    reused = bytearray(64)
    view = memoryview(reused)
    parser = parser_impl.FrameParser(CH, TAG)
    deliveries: List[Any] = []
    others: List[Any] = []
    for chunk in chunked(data, range(37, len(data), 37)):
        if as_type == 'bytes':
            fed: Any = bytes(chunk)
        elif as_type == 'bytearray':
            fed = bytearray(chunk)
        else:
            reused[:len(chunk)] = chunk
            fed = view[:len(chunk)]
        got, passed = parser.feed(fed)
        if as_type == 'memoryview of a reused buffer':
            reused[:] = b'\xAA' * len(reused)  # the next recv overwrites it
        deliveries.extend(got)
        others.extend(passed)
    assert deliveries == expected_deliveries
    assert others == expected_others


def test_empty_feed_changes_nothing(parser_impl, writer) -> None:
    data = writer.deliver(CH, TAG, 1, BODY, correlation_id='e')
    parser = parser_impl.FrameParser(CH, TAG)
    assert parser.feed(b'') == ([], [])
    assert parser.feed(data[:5]) == ([], [])
    assert parser.feed(b'') == ([], [])
    assert parser.buffered == 5
    assert parser.feed(data[5:]) == ([(1, 'e', None, None, BODY)], [])


# -- mid_message, buffered, take_remainder, set_consumer_tag ----------------------------------------

def test_buffered_counts_the_bytes_of_an_incomplete_frame(parser_impl, writer) -> None:
    data = writer.deliver(CH, TAG, 1, BODY, correlation_id='b')
    first = split_frames(data)[0]
    first_len = len(first[2]) + 8
    for cut in range(1, first_len):
        parser = parser_impl.FrameParser(CH, TAG)
        assert parser.feed(data[:cut]) == ([], [])
        assert parser.buffered == cut
        assert parser.mid_message is False
        assert parser.frames_parsed == 0
    parser = parser_impl.FrameParser(CH, TAG)
    parser.feed(data[:first_len + 3])
    assert parser.buffered == 3
    assert parser.mid_message is True
    assert parser.frames_parsed == 1


def test_mid_message_through_a_delivery(parser_impl, writer) -> None:
    frames = split_frames(writer.deliver(CH, TAG, 1, BODY, correlation_id='m'))
    parser = parser_impl.FrameParser(CH, TAG)
    assert parser.mid_message is False
    parser.feed(join_frames(frames[:1]))
    assert parser.mid_message is True
    parser.feed(join_frames(frames[1:2]))
    assert parser.mid_message is True
    deliveries, _ = parser.feed(join_frames(frames[2:]))
    assert deliveries and parser.mid_message is False
    # a bodyless delivery ends with its header
    frames = split_frames(writer.deliver(CH, TAG, 2, b'', correlation_id='n'))
    parser.feed(join_frames(frames[:1]))
    assert parser.mid_message is True
    deliveries, _ = parser.feed(join_frames(frames[1:]))
    assert deliveries == [(2, 'n', None, None, b'')]
    assert parser.mid_message is False
    # a method with no content never makes it mid-message
    parser.feed(writer.method(CH, CONSUME_OK, TAG))
    assert parser.mid_message is False


def test_take_remainder_hands_back_the_incomplete_frame(parser_impl, writer) -> None:
    """What ``settle()`` does: the bytes of a partial frame go back to py-amqp's read buffer."""
    first = writer.method(CH, CONSUME_OK, TAG)
    second = writer.method(CH, CHANNEL_FLOW, False)
    parser = parser_impl.FrameParser(CH, TAG)
    deliveries, others = parser.feed(first + second[:6])
    assert others == split_frames(first)
    assert parser.buffered == 6
    remainder = parser.take_remainder()
    assert remainder == second[:6]
    assert parser.buffered == 0
    assert parser.take_remainder() == b''
    # py-amqp reads the handed-back bytes plus the rest of the socket as one whole frame
    events, _ = read_with_py_amqp(split_frames(remainder + second[6:]))
    assert [(event.method_sig, event.args) for event in events] == [((20, 20), (False,))]
    # and the parser, fed again from a frame boundary, goes on normally
    assert parser.feed(second) == ([], split_frames(second))


def test_take_remainder_after_a_chunk_fed_directly(parser_impl, writer) -> None:
    """The compiled twin parses a chunk in place when nothing is buffered; the tail must be kept."""
    data = writer.deliver(CH, TAG, 1, BODY, correlation_id='x') + writer.heartbeat()
    parser = parser_impl.FrameParser(CH, TAG)
    assert parser.feed(data[:-1]) == ([(1, 'x', None, None, BODY)], [])
    assert parser.take_remainder() == data[-8:-1]


def test_set_consumer_tag_follows_a_new_consumer(parser_impl, writer) -> None:
    old = writer.deliver(CH, TAG, 1, b'old', correlation_id='o')
    new = writer.deliver(CH, 'rpcresults-new', 2, b'new', correlation_id='n')
    parser = parser_impl.FrameParser(CH, TAG)
    deliveries, others = parser.feed(old + new)
    assert deliveries == [(1, 'o', None, None, b'old')]
    assert others == split_frames(new)
    parser.set_consumer_tag('rpcresults-new')
    assert parser.consumer_tag == b'rpcresults-new'
    deliveries, others = parser.feed(old + new)
    assert deliveries == [(2, 'n', None, None, b'new')]
    assert others == split_frames(old)


def test_frame_max_zero_means_no_limit(parser_impl) -> None:
    body = b'z' * 300_000
    data = Writer(400_000).deliver(CH, TAG, 1, body, correlation_id='big')
    assert len(split_frames(data)) == 3  # one body frame far above 131072
    parser = parser_impl.FrameParser(CH, TAG, 0)
    assert parser.feed(data) == ([(1, 'big', None, None, body)], [])


def test_frame_of_exactly_frame_max_is_accepted(parser_impl) -> None:
    frame = raw_frame(8, 0, b'\x00' * (4096 - 8))
    assert len(frame) == 4096
    parser = parser_impl.FrameParser(CH, TAG, 4096)
    assert parser.feed(frame) == ([], [(8, 0, b'\x00' * 4088)])


def test_body_of_exactly_max_body_is_accepted(parser_impl, writer) -> None:
    data = writer.deliver(CH, TAG, 1, b'm' * 100, correlation_id='m')
    parser = parser_impl.FrameParser(CH, TAG, 131072, max_body=100)
    assert parser.feed(data) == ([(1, 'm', None, None, b'm' * 100)], [])


def test_max_body_does_not_apply_to_others_content(parser_impl, writer) -> None:
    data = writer.deliver(CH, 'not-us', 1, b'm' * 1000)
    parser = parser_impl.FrameParser(CH, TAG, 131072, max_body=100)
    assert parser.feed(data) == ([], split_frames(data))


# -- errors -----------------------------------------------------------------------------------------

def _deliver_method(tag: str = TAG, delivery_tag: int = 1) -> bytes:
    return method_args(DELIVER, tag, delivery_tag, False, '', 'q')


def _ours_then(*frames: bytes) -> bytes:
    return raw_frame(1, CH, _deliver_method()) + b''.join(frames)


ERROR_CASES = {
    'frame larger than frame_max': (
        raw_frame(3, CH, b'\x00' * 4089), 4096, 'frame of 4097 bytes exceeds frame_max=4096'),
    'frame larger than frame_max, header only': (
        raw_frame(1, CH, b'\x00' * 200_000)[:8], 131072, 'frame of 200008 bytes exceeds frame_max=131072'),
    'frame larger than frame_max on another channel': (
        raw_frame(1, 7, b'\x00' * 5000), 4096, 'frame of 5008 bytes exceeds frame_max=4096'),
    'largest announced size': (
        raw_frame(1, CH, b'', size=0xFFFFFFFF), 131072, 'frame of 4294967303 bytes exceeds frame_max=131072'),
    'announced size near the 32-bit limit': (
        raw_frame(1, CH, b'', size=0xFFFFFFF8), 131072, 'frame of 4294967296 bytes exceeds frame_max=131072'),
    'bad frame-end byte': (
        raw_frame(8, 0, b'', end=0x00), 131072, 'frame end byte is 0x00, expected 0xce'),
    'bad frame-end byte 0xcd': (
        raw_frame(1, CH, method_args(CONSUME_OK, TAG), end=0xCD), 131072, 'frame end byte is 0xcd, expected 0xce'),
    'bad frame-end byte on another channel': (
        raw_frame(1, 9, b'abcd', end=0xFF), 131072, 'frame end byte is 0xff, expected 0xce'),
    'deliver cut before the delivery tag': (
        raw_frame(1, CH, _deliver_method()[:5 + len(TAG)]), 131072, 'basic.deliver is truncated'),
    'deliver cut inside the delivery tag': (
        raw_frame(1, CH, _deliver_method()[:5 + len(TAG) + 7]), 131072, 'basic.deliver is truncated'),
    'deliver with the method id only': (
        raw_frame(1, CH, _deliver_method()[:4]), 131072, 'basic.deliver is truncated'),
    'deliver with the consumer tag running past the frame': (
        raw_frame(1, CH, _deliver_method()[:5 + len(TAG) - 1]), 131072,
        'basic.deliver consumer tag runs past the frame'),
    'deliver for someone else with the consumer tag running past the frame': (
        raw_frame(1, CH, method_args(DELIVER, 'other', 1, False, '', 'q')[:7]), 131072,
        'basic.deliver consumer tag runs past the frame'),
    'content header shorter than 14 bytes': (
        _ours_then(raw_frame(2, CH, header_payload(3)[:13])), 131072, 'content header is truncated'),
    'empty content header': (
        _ours_then(raw_frame(2, CH, b'')), 131072, 'content header is truncated'),
    "others' content header shorter than 14 bytes": (
        raw_frame(1, CH, _deliver_method('other')) + raw_frame(2, CH, header_payload(3)[:10]), 131072,
        'content header is truncated'),
    'body frames exceeding the announced size': (
        _ours_then(raw_frame(2, CH, header_payload(10)), raw_frame(3, CH, b'x' * 11)), 131072,
        'body frames carry 11 bytes, more than the announced 10'),
    'second body frame exceeding the announced size': (
        _ours_then(raw_frame(2, CH, header_payload(10)), raw_frame(3, CH, b'x' * 6), raw_frame(3, CH, b'x' * 6)),
        131072, 'body frames carry 12 bytes, more than the announced 10'),
    "others' body frames exceeding the announced size": (
        raw_frame(1, CH, _deliver_method('other'))
        + raw_frame(2, CH, header_payload(2)) + raw_frame(3, CH, b'abc'), 131072,
        'body frames carry 3 bytes, more than the announced 2'),
    'body larger than max_body': (
        _ours_then(raw_frame(2, CH, header_payload(256 * 1024 * 1024 + 1))), 131072,
        'message body of 268435457 bytes exceeds the limit of 268435456'),
    'header frame when a method is expected': (
        raw_frame(2, CH, header_payload(0)), 131072, 'frame type 2 on channel 1 while expecting a method'),
    'body frame when a method is expected': (
        raw_frame(3, CH, b'stray'), 131072, 'frame type 3 on channel 1 while expecting a method'),
    'unknown frame type when a method is expected': (
        raw_frame(4, CH, b'????'), 131072, 'frame type 4 on channel 1 while expecting a method'),
    'method frame shorter than a method id': (
        raw_frame(1, CH, b'\x00\x3c\x00'), 131072, 'frame type 1 on channel 1 while expecting a method'),
    'method frame when a header is expected': (
        _ours_then(raw_frame(1, CH, _deliver_method())), 131072, 'frame type 1 on channel 1 while expecting type 2'),
    'body frame when a header is expected': (
        _ours_then(raw_frame(3, CH, b'x')), 131072, 'frame type 3 on channel 1 while expecting type 2'),
    'method frame when a body is expected': (
        _ours_then(raw_frame(2, CH, header_payload(5)), raw_frame(1, CH, method_args(CONSUME_OK, TAG))),
        131072, 'frame type 1 on channel 1 while expecting type 3'),
    'header frame when a body is expected': (
        _ours_then(raw_frame(2, CH, header_payload(5)), raw_frame(2, CH, header_payload(5))),
        131072, 'frame type 2 on channel 1 while expecting type 3'),
    'content_type running past the frame': (
        _ours_then(raw_frame(2, CH, header_payload(0, content_type='application/json')[:-3])), 131072,
        'short string runs past the end of its frame'),
    'content_type flagged but absent': (
        _ours_then(raw_frame(2, CH, header_payload(0)[:12] + b'\x80\x00')), 131072,
        'short string runs past the end of its frame'),
    'content_encoding running past the frame': (
        _ours_then(raw_frame(2, CH, header_payload(0, content_encoding='utf-8')[:-1])), 131072,
        'short string runs past the end of its frame'),
    'correlation_id running past the frame': (
        _ours_then(raw_frame(2, CH, header_payload(0, correlation_id='abcdef')[:-2])), 131072,
        'short string runs past the end of its frame'),
    'correlation_id flagged but absent after delivery_mode': (
        _ours_then(raw_frame(2, CH, header_payload(0)[:12] + b'\x14\x00' + b'\x02')), 131072,
        'short string runs past the end of its frame'),
    'headers table length cut': (
        _ours_then(raw_frame(2, CH, header_payload(0)[:12] + b'\x20\x00' + b'\x00\x00')), 131072,
        'headers table is truncated'),
    'headers table running past the frame': (
        _ours_then(raw_frame(2, CH, header_payload(0, application_headers={'k': 'value'})[:-2])), 131072,
        'content header properties run past the frame'),
    'headers table running into the correlation id': (
        _ours_then(raw_frame(2, CH, header_payload(0, application_headers={'k': 'v'}, correlation_id='id')[:-4])),
        131072, 'short string runs past the end of its frame'),
    'delivery_mode flagged but absent': (
        _ours_then(raw_frame(2, CH, header_payload(0)[:12] + b'\x10\x00')), 131072,
        'content header properties run past the frame'),
    'priority flagged but absent': (
        _ours_then(raw_frame(2, CH, header_payload(0)[:12] + b'\x08\x00')), 131072,
        'content header properties run past the frame'),
    'continuation flag with no next flags word': (
        _ours_then(raw_frame(2, CH, header_payload(0)[:12] + b'\x00\x01')), 131072,
        'content header flags are truncated'),
    'continuation flag with a cut next flags word': (
        _ours_then(raw_frame(2, CH, header_payload(0)[:12] + b'\x00\x01\x00')), 131072,
        'content header flags are truncated'),
}


@pytest.mark.parametrize('data,frame_max,message', list(ERROR_CASES.values()), ids=list(ERROR_CASES))
def test_malformed_input_raises_the_twins_own_frame_error(parser_impl, data, frame_max, message) -> None:
    parser = parser_impl.FrameParser(CH, TAG, frame_max)
    with pytest.raises(parser_impl.FrameError, match=f'^{re.escape(message)}$') as info:
        parser.feed(data)
    assert type(info.value) is parser_impl.FrameError


@pytest.mark.parametrize('data,frame_max,message', list(ERROR_CASES.values()), ids=list(ERROR_CASES))
def test_malformed_input_raises_at_any_chunking(parser_impl, data, frame_max, message) -> None:
    """The error does not depend on where the chunks were cut (fed one byte at a time here)."""
    parser = parser_impl.FrameParser(CH, TAG, frame_max)
    with pytest.raises(parser_impl.FrameError, match=f'^{re.escape(message)}$'):
        for index in range(len(data)):
            parser.feed(data[index:index + 1])


def test_max_body_is_the_parsers_own_limit(parser_impl, writer) -> None:
    data = writer.deliver(CH, TAG, 1, b'm' * 101, correlation_id='m')
    parser = parser_impl.FrameParser(CH, TAG, 131072, max_body=100)
    with pytest.raises(parser_impl.FrameError, match=r'^message body of 101 bytes exceeds the limit of 100$'):
        parser.feed(data)


def test_oversized_frame_raises_before_its_payload_arrives(parser_impl) -> None:
    """An announced size past frame_max fails on the frame header, not after buffering the payload."""
    parser = parser_impl.FrameParser(CH, TAG, 4096)
    frame = raw_frame(3, CH, b'\x00' * 10_000)
    assert parser.feed(frame[:7]) == ([], [])
    with pytest.raises(parser_impl.FrameError, match='exceeds frame_max=4096'):
        parser.feed(frame[7:8])


def test_frames_before_an_error_are_consumed(parser_impl, writer) -> None:
    """Whole frames ahead of a bad one are dropped from the buffer; the bad one and after stay."""
    good = writer.method(CH, CONSUME_OK, TAG)
    bad = raw_frame(8, 0, b'', end=0x00)
    parser = parser_impl.FrameParser(CH, TAG)
    with pytest.raises(parser_impl.FrameError):
        parser.feed(good + bad + b'tail')
    assert parser.frames_parsed == 1
    assert parser.buffered == len(bad) + 4


def test_twins_raise_the_same_message_for_every_error_case() -> None:
    """Belt and braces beside the per-twin assertions: run both twins side by side."""
    pure = load_twin('pure', 'frames')
    compiled = load_twin('compiled', 'frames')
    for name, (data, frame_max, _) in ERROR_CASES.items():
        outcomes = []
        for module in (pure, compiled):
            parser = module.FrameParser(CH, TAG, frame_max)
            try:
                parser.feed(data)
            except module.FrameError as exc:
                outcomes.append((str(exc), parser.buffered, parser.frames_parsed, parser.mid_message))
            else:
                outcomes.append(None)
        assert outcomes[0] == outcomes[1], name
