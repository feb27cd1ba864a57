"""Differential property tests of the frame parser twins.

Hypothesis builds random but real AMQP 0-9-1 frame streams with py-amqp's own encoder
(tests/amqp_frames.py): replies for us with random correlation ids, content types and
encodings (non-ASCII, empty and absent included), random header tables and later
properties, bodies of random sizes split at a random ``frame_max``; deliveries for other
consumer tags and on other channels (their frames interleaved with ours, as frames of
different channels may be), heartbeats, other methods, ``basic.return`` and
``basic.get-ok`` with content. Each stream is cut at random chunk boundaries and fed to
both twins, which must agree on every single ``feed`` (deliveries, passed-through frames,
``buffered``, ``mid_message``, ``frames_parsed``) and on the whole with what py-amqp's own
``frame_handler`` reads from the same frames.

A second family feeds garbage: arbitrary bytes, random frame envelopes, and valid streams
truncated or corrupted. Both twins must never fail with anything but their own
``FrameError``, never hang, and raise in the same cases with the same message.
"""
from __future__ import annotations

import os
import random
import signal
from contextlib import contextmanager
from types import ModuleType
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.amqp_frames import (
    ACK, CANCEL, CANCEL_OK, CHANNEL_CLOSE, CHANNEL_FLOW, CONSUME_OK, QOS_OK, Frame, Writer, chunked,
    join_frames, raw_frame, read_with_py_amqp, split_frames)
from tests.twins import NO_EXTENSIONS_VAR, load_twin

TAG = 'rpcresults-0f3c2a9e-5b7d-4e61-8c2a-9d4b1e7f6a30'
OTHER_TAGS = ('rpcresults-other', TAG[:-1], TAG + '0', 'amq.ctag-abc', '')

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope='module')
def twins() -> Tuple[ModuleType, ...]:
    """(pure, compiled); the pure twin alone when RPCRESULTS_NO_EXTENSIONS is set.

    Without the compiled twin there is nothing to compare the pure one with, but the
    agreement with py-amqp and the garbage-in checks still run on it.
    """
    pure = load_twin('pure', 'frames')
    if os.environ.get(NO_EXTENSIONS_VAR):
        return (pure,)
    return pure, load_twin('compiled', 'frames')  # fails loudly when the extension is not built


@contextmanager
def no_hang(seconds: int = 20) -> Iterator[None]:
    """Fail instead of hanging when one example takes longer than ``seconds``."""
    def alarm(signum: int, frame: Any) -> None:
        raise AssertionError(f'a parser did not return within {seconds} s (hang?)')
    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# -- strategies -------------------------------------------------------------------------------------

# any str: ASCII, accents, CJK, emoji, and lone surrogates (kombu and py-amqp write those with surrogatepass)
# (st.text() drops surrogates whatever its alphabet: build those strings from lists of characters)
any_char = st.characters() | st.characters(categories=['Cs'])
short_text = st.text(max_size=20) | st.lists(any_char, max_size=20).map(''.join)
content_types = st.sampled_from(['application/json', 'application/x-python-serialize',
                                 'application/x-msgpack', 'application/x-yaml', 'text/plain']) | short_text
content_encodings = st.sampled_from(['utf-8', 'binary', 'UTF-8', 'latin-1']) | short_text
correlation_ids = st.uuids().map(str) | st.text(max_size=60) | st.lists(any_char, max_size=60).map(''.join)

table_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2 ** 63, 2 ** 63 - 1) | st.text(max_size=12)
    | st.floats(allow_nan=False),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6)
header_tables = st.dictionaries(st.text(max_size=10), table_values, max_size=4)

properties = st.fixed_dictionaries({}, optional={
    'content_type': content_types,
    'content_encoding': content_encodings,
    'application_headers': header_tables,
    'delivery_mode': st.sampled_from([1, 2]),
    'priority': st.integers(0, 255),
    'correlation_id': correlation_ids,
    'reply_to': short_text,
    'expiration': st.integers(0, 10 ** 9).map(str),
    'message_id': short_text,
    'timestamp': st.integers(0, 2 ** 64 - 1),
    'type': short_text,
    'user_id': short_text,
    'app_id': short_text,
    'cluster_id': short_text,
})


@st.composite
def bodies(draw: Any, frame_max: int) -> bytes:
    """Empty, small, or up to a few body frames long; random bytes from a drawn seed."""
    size = draw(st.one_of(st.just(0), st.integers(1, 64), st.integers(0, 3 * frame_max + 17),
                          st.integers(frame_max - 48, 3 * frame_max + 17)))  # several body frames
    return random.Random(draw(st.integers(0, 2 ** 32))).randbytes(size)


MethodSpec = Tuple[Tuple[Tuple[int, int], str], Tuple[Any, ...]]


@st.composite
def plain_methods(draw: Any) -> MethodSpec:
    return draw(st.sampled_from([
        (CONSUME_OK, (TAG,)), (CONSUME_OK, ('amq.ctag-x',)), (QOS_OK, ()), (CHANNEL_FLOW, (True,)),
        (CANCEL, (TAG, False)), (CANCEL_OK, (TAG,)), (ACK, (draw(st.integers(0, 2 ** 64 - 1)), True)),
        (CHANNEL_CLOSE, (406, 'PRECONDITION_FAILED - unknown delivery tag 7', 60, 80)),
    ]))


@st.composite
def streams(draw: Any) -> Dict[str, Any]:
    """A frame stream: its frames, our channel, frame_max, and which frames are our deliveries."""
    frame_max = draw(st.integers(4096, 16384))  # 4096: the protocol's smallest
    our_channel = draw(st.integers(1, 4))
    channels = [our_channel, *(ch for ch in range(1, 6) if ch != our_channel)]
    writer = Writer(frame_max)
    lanes: Dict[int, List[Tuple[Frame, bool]]] = {}  # channel -> frames in that channel's order

    def add(channel: int, data: bytes, ours: bool) -> None:
        lanes.setdefault(channel, []).extend((frame, ours) for frame in split_frames(data))

    count = draw(st.integers(0, 12))
    delivery_tag = draw(st.integers(0, 2 ** 64 - 50))
    for _ in range(count):
        kind = draw(st.sampled_from(['ours', 'ours', 'ours', 'other tag', 'other channel', 'heartbeat',
                                     'method', 'return', 'get-ok']))
        if kind == 'ours':
            delivery_tag += 1
            add(our_channel, writer.deliver(our_channel, TAG, delivery_tag, draw(bodies(frame_max)),
                                            redelivered=draw(st.booleans()), **draw(properties)), True)
        elif kind == 'other tag':
            add(our_channel, writer.deliver(our_channel, draw(st.sampled_from(OTHER_TAGS)),
                                            draw(st.integers(1, 2 ** 64 - 1)), draw(bodies(frame_max)),
                                            **draw(properties)), False)
        elif kind == 'other channel':
            channel = draw(st.sampled_from(channels[1:]))
            tag = draw(st.sampled_from((TAG,) + OTHER_TAGS))
            add(channel, writer.deliver(channel, tag, draw(st.integers(1, 1000)), draw(bodies(frame_max)),
                                        **draw(properties)), False)
        elif kind == 'heartbeat':
            channel = draw(st.sampled_from([0, 0, 0, our_channel]))
            add(channel, writer.heartbeat(channel), False)
        elif kind == 'method':
            channel = draw(st.sampled_from(channels))
            method, args = draw(plain_methods())
            add(channel, writer.method(channel, method, *args), False)
        elif kind == 'return':
            channel = draw(st.sampled_from(channels))
            add(channel, writer.basic_return(channel, draw(bodies(frame_max)), **draw(properties)), False)
        else:
            channel = draw(st.sampled_from(channels))
            add(channel, writer.get_ok(channel, draw(st.integers(1, 2 ** 64 - 1)), draw(bodies(frame_max)),
                                       message_count=draw(st.integers(0, 2 ** 32 - 1)),
                                       **draw(properties)), False)
    # interleave the channels' frames (each channel keeps its own order)
    order = draw(st.lists(st.sampled_from(sorted(lanes)), min_size=0, max_size=200)) if lanes else []
    positions = {channel: 0 for channel in lanes}
    merged: List[Tuple[int, Frame, bool]] = []
    for channel in order + [ch for ch in sorted(lanes) for _ in lanes[ch]]:
        if positions[channel] < len(lanes[channel]):
            frame, ours = lanes[channel][positions[channel]]
            merged.append((channel, frame, ours))
            positions[channel] += 1
    frames = [frame for _, frame, _ in merged]
    for frame in frames:
        assert len(frame[2]) + 8 <= frame_max  # py-amqp's writer never exceeds it
    return {'frames': frames, 'ours': [ours for _, _, ours in merged], 'channel': our_channel,
            'frame_max': frame_max, 'data': join_frames(frames)}


@st.composite
def cuts_of(draw: Any, data: bytes) -> List[bytes]:
    if len(data) < 2:
        return [data]
    how = draw(st.sampled_from(['random', 'random', 'random', 'single bytes', 'all at once', 'fixed']))
    if how == 'single bytes' and len(data) <= 4000:
        return [data[i:i + 1] for i in range(len(data))]
    if how == 'all at once':
        return [data]
    if how == 'fixed':
        step = draw(st.integers(1, 300))
        return chunked(data, range(step, len(data), step))
    return chunked(data, draw(st.lists(st.integers(1, len(data) - 1), max_size=40)))


# -- running both twins -----------------------------------------------------------------------------

Outcome = Tuple[Any, ...]


def run(module: ModuleType, chunks: Sequence[bytes], channel: int, frame_max: int,
        max_body: Optional[int] = None, as_view: bool = False) -> List[Outcome]:
    """Feed ``chunks``; one outcome per feed: its result or its FrameError, plus the parser state."""
    parser = (module.FrameParser(channel, TAG, frame_max) if max_body is None
              else module.FrameParser(channel, TAG, frame_max, max_body))
    reused = bytearray(max((len(chunk) for chunk in chunks), default=0))
    outcomes: List[Outcome] = []
    for chunk in chunks:
        fed: Any = chunk
        if as_view:  # as the reader feeds: a view of one receive buffer it overwrites on the next recv
            reused[:len(chunk)] = chunk
            fed = memoryview(reused)[:len(chunk)]
        try:
            deliveries, others = parser.feed(fed)
        except module.FrameError as exc:
            assert type(exc) is module.FrameError
            result: Outcome = ('FrameError', str(exc))
        else:
            result = ('ok', deliveries, others)
        if as_view:
            reused[:] = b'\x5a' * len(reused)
        outcomes.append(result + (parser.buffered, parser.mid_message, parser.frames_parsed))
    return outcomes


def collect(outcomes: Sequence[Outcome]) -> Tuple[List[Any], List[Any]]:
    deliveries: List[Any] = []
    others: List[Any] = []
    for outcome in outcomes:
        assert outcome[0] == 'ok', outcome
        deliveries.extend(outcome[1])
        others.extend(outcome[2])
    return deliveries, others


def delivery_of(event: Any) -> Tuple[Any, ...]:
    props = event.properties
    return (event.args[1], props.get('correlation_id'), props.get('content_type'),
            props.get('content_encoding'), event.body)


def is_our_delivery(event: Any, channel: int) -> bool:
    return event.channel == channel and event.method_sig == (60, 60) and event.args[0] == TAG


# -- valid streams ----------------------------------------------------------------------------------

@SETTINGS
@given(stream=streams(), data=st.data())
def test_twins_agree_with_each_other_and_with_py_amqp(twins, stream, data) -> None:
    frames, channel, frame_max = stream['frames'], stream['channel'], stream['frame_max']
    chunks = data.draw(cuts_of(stream['data']), label='chunks')
    as_view = data.draw(st.booleans(), label='fed as views of a reused buffer')
    with no_hang():
        pure_out, *compiled_out = [run(module, chunks, channel, frame_max, as_view=as_view) for module in twins]
    for other in compiled_out:
        assert other == pure_out  # feed by feed, state included

    deliveries, others = collect(pure_out)
    assert pure_out[-1][-3:] == (0, False, len(frames))  # nothing left over, whole stream parsed
    # exactly the frames that are not our deliveries pass through, unchanged and in order
    assert others == [frame for frame, ours in zip(frames, stream['ours']) if not ours]

    # py-amqp's own reading of the whole stream: our deliveries are what the parser extracted
    events, _ = read_with_py_amqp(frames, frame_max)
    ours = [event for event in events if is_our_delivery(event, channel)]
    assert deliveries == [delivery_of(event) for event in ours]
    # py-amqp reads what passed through without complaint, and sees every other method in it
    passed_events, handled = read_with_py_amqp(others, frame_max)
    assert handled == len(others)
    assert passed_events == [event for event in events if not is_our_delivery(event, channel)]


@SETTINGS
@given(stream=streams(), data=st.data())
def test_same_output_whatever_the_chunking(twins, stream, data) -> None:
    """All at once, one byte at a time, or random cuts: the same deliveries and frames."""
    channel, frame_max, raw = stream['channel'], stream['frame_max'], stream['data']
    chunks = data.draw(cuts_of(raw), label='chunks')
    for module in twins:
        with no_hang():
            whole = collect(run(module, [raw], channel, frame_max))
            cut = collect(run(module, chunks, channel, frame_max))
        assert cut == whole
        if len(raw) <= 3000:
            with no_hang():
                assert collect(run(module, [raw[i:i + 1] for i in range(len(raw))], channel, frame_max)) == whole


# -- garbage in -------------------------------------------------------------------------------------

def assert_twins_agree_on(twins: Sequence[ModuleType], chunks: Sequence[bytes], channel: int,
                          frame_max: int, max_body: Optional[int]) -> List[Outcome]:
    """Both twins give the same outcome for every feed (``run`` lets only their own FrameError through)."""
    with no_hang():
        pure_out, *compiled_out = [run(module, chunks, channel, frame_max, max_body) for module in twins]
    for other in compiled_out:
        assert other == pure_out
    return pure_out


limits = st.tuples(st.sampled_from([0, 8, 9, 16, 64, 4096, 131072]),
                   st.sampled_from([None, 0, 1, 10, 1000]))


@SETTINGS
@given(raw=st.binary(max_size=3000), data=st.data(), limit=limits)
def test_arbitrary_bytes(twins, raw, data, limit) -> None:
    frame_max, max_body = limit
    chunks = data.draw(cuts_of(raw), label='chunks')
    assert_twins_agree_on(twins, chunks, data.draw(st.sampled_from([0, 1, 2, 65535])), frame_max, max_body)


deliver_for_us = st.builds(
    lambda tag, rest: b'\x00\x3c\x00\x3c' + bytes([len(TAG)]) + TAG.encode() + tag.to_bytes(8, 'big') + rest,
    st.integers(0, 2 ** 64 - 1), st.binary(max_size=30))
header_like = st.builds(
    lambda size, flags, rest: b'\x00\x3c\x00\x00' + size.to_bytes(8, 'big') + flags.to_bytes(2, 'big') + rest,
    st.integers(0, 2 ** 64 - 1) | st.integers(0, 40), st.integers(0, 0xFFFF), st.binary(max_size=60))
payloads = st.one_of(st.binary(max_size=60), deliver_for_us, header_like,
                     st.sampled_from([b'\x00\x3c\x00\x32', b'\x00\x3c\x00\x47', b'\x00\x3c\x00\x15']).flatmap(
                         lambda head: st.binary(max_size=40).map(lambda rest: head + rest)))
envelopes = st.tuples(st.sampled_from([1, 1, 2, 3, 8, 0, 4, 206]), st.sampled_from([0, 1, 1, 2]), payloads,
                      st.sampled_from([0xCE] * 12 + [0x00, 0xCD]),
                      st.none() | st.none() | st.none() | st.integers(0, 2 ** 32 - 1)
                      | st.integers(2 ** 32 - 16, 2 ** 32 - 1))  # announced size; the field's top too


@SETTINGS
@given(frames=st.lists(envelopes, max_size=30), data=st.data(), limit=limits)
def test_random_frames_in_valid_envelopes(twins, frames, data, limit) -> None:
    """Well-framed garbage reaches the method, header and body parsing, not just the framing."""
    frame_max, max_body = limit
    raw = b''.join(raw_frame(frame_type, channel, payload, end=end, size=size)
                   for frame_type, channel, payload, end, size in frames)
    chunks = data.draw(cuts_of(raw), label='chunks')
    assert_twins_agree_on(twins, chunks, 1, frame_max, max_body)


@st.composite
def corrupted_streams(draw: Any) -> Tuple[bytes, int, int]:
    stream = draw(streams())
    raw = bytearray(stream['data'])
    for _ in range(draw(st.integers(1, 4))):
        if not raw:
            break
        how = draw(st.sampled_from(['truncate', 'flip', 'flip', 'delete', 'insert', 'overwrite header']))
        at = draw(st.integers(0, len(raw) - 1))
        if how == 'truncate':
            del raw[at:]
        elif how == 'flip':
            raw[at] ^= draw(st.integers(1, 255))
        elif how == 'delete':
            del raw[at:at + draw(st.integers(1, 16))]
        elif how == 'insert':
            raw[at:at] = draw(st.binary(min_size=1, max_size=16))
        else:  # a frame header's worth of bytes replaced
            raw[at:at + 7] = draw(st.binary(min_size=7, max_size=7))
    return bytes(raw), stream['channel'], stream['frame_max']


@SETTINGS
@given(corrupted=corrupted_streams(), data=st.data(), max_body=st.sampled_from([None, 0, 100, 10_000]))
def test_truncated_and_corrupted_streams(twins, corrupted, data, max_body) -> None:
    raw, channel, frame_max = corrupted
    chunks = data.draw(cuts_of(raw), label='chunks')
    assert_twins_agree_on(twins, chunks, channel, frame_max, max_body)


def test_truncated_valid_stream_is_never_an_error(twins) -> None:
    """A valid stream cut anywhere is just incomplete: no error, the tail stays buffered."""
    writer = Writer(4096)
    raw = (writer.deliver(1, TAG, 1, b'a' * 9000, content_type='application/json', correlation_id='x')
           + writer.heartbeat() + writer.basic_return(1, b'r' * 5000) + writer.deliver(1, TAG, 2, b''))
    for module in twins:
        for cut in range(0, len(raw), 7):
            outcomes = run(module, [raw[:cut]], 1, 4096)
            assert outcomes[0][0] == 'ok'
