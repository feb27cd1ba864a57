"""Fuzzing the frame parser twins with hypothesis: bad input is a FrameError or nothing.

Complements tests/unit/test_frames_differential.py (which proves the twins agree with each
other and with py-amqp on valid streams, and never raise anything but FrameError on garbage)
with properties about *what* a cut or broken stream yields:

- a valid stream cut at any offset, fed in any chunking, yields exactly the deliveries and
  frames of its whole frames (py-amqp's reading of those frames is the oracle), keeps the
  rest pending (``buffered``, ``take_remainder``, ``mid_message``) and, fed the rest, finishes;
- an announced frame size above ``frame_max`` raises a FrameError naming both sizes as soon
  as the frame header is in, whatever came before it and however it was chunked;
- a frame-end octet other than 0xCE raises a FrameError naming the octet, after exactly the
  frames before it, and the error is sticky (the parser never skips the bad bytes);
- garbage spliced into a valid stream at a frame boundary (what the integration test injects
  through a proxy) fails with FrameError or parses, never anything else;
- bounded work and memory: N bytes never give more than N // 8 frames, and between feeds the
  parser holds less than one ``frame_max`` of bytes.

Each property runs on each twin (the ``parser_impl`` fixture, as in tests/unit/test_frames.py);
the ``both`` tests run both twins side by side on the same inputs. Hypothesis is derandomized
and keeps no example database, so every CI run tries the very same inputs.
"""
from __future__ import annotations

import itertools
from struct import pack, unpack_from
from types import ModuleType
from typing import Any, List, Optional, Sequence, Tuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.amqp_frames import Frame, Writer, read_with_py_amqp, split_frames
from tests.frame_streams import feed_all, outcomes
from tests.twins import TWINS, load_twin
from tests.unit.test_frames_differential import (
    TAG, cuts_of, delivery_of, is_our_delivery, no_hang, streams)

#: Derandomized, no database: the same examples on every run; no deadline (CI machines are slow).
FUZZ = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
MANY = settings(FUZZ, max_examples=100)

#: ``basic.deliver``, ``basic.return``, ``basic.get-ok``: the methods followed by content.
CONTENT_METHODS = {pack('>HH', 60, 60), pack('>HH', 60, 50), pack('>HH', 60, 71)}


@pytest.fixture(scope='module', params=TWINS)
def parser_impl(request) -> ModuleType:
    """The module holding ``FrameParser`` and ``FrameError`` for one twin."""
    return load_twin(request.param, 'frames')


@pytest.fixture(scope='module')
def both() -> Tuple[ModuleType, ModuleType]:
    """(pure, compiled); skipped in the pure-only pass (nothing to compare with there)."""
    return load_twin('pure', 'frames'), load_twin('compiled', 'frames')


# -- oracles (independent of the parser under test) -------------------------------------------------

def frame_ends(frames: Sequence[Frame]) -> List[int]:
    """Offset just past each frame of the stream ``frames`` makes."""
    return list(itertools.accumulate(len(payload) + 8 for _, _, payload in frames))


def expected_after(stream: dict, count: int) -> Tuple[List[Any], List[Frame], bool]:
    """What the first ``count`` whole frames must give: (our deliveries, other frames, mid_message).

    Deliveries come from py-amqp's own frame handler; mid_message from walking the content
    frames of our channel (a content method opens content, the header's body size and then
    the body frames close it).
    """
    frames, channel = stream['frames'][:count], stream['channel']
    events, _ = read_with_py_amqp(frames, stream['frame_max'])
    deliveries = [delivery_of(event) for event in events if is_our_delivery(event, channel)]
    others = [frame for frame, ours in zip(frames, stream['ours']) if not ours]
    pending: Optional[Any] = None  # None: no content open; 'header'; or body bytes still due
    for frame_type, frame_channel, payload in frames:
        if frame_channel != channel or frame_type == 8:
            continue
        if pending is None:
            if frame_type == 1 and payload[:4] in CONTENT_METHODS:
                pending = 'header'
        elif pending == 'header':
            pending = unpack_from('>Q', payload, 4)[0] or None
        else:
            pending -= len(payload)
            pending = pending or None
    return deliveries, others, pending is not None


def chunks_split_at(data: Any, raw: bytes, offset: int, label: str) -> List[bytes]:
    """``raw`` in drawn chunks, one of them starting exactly at ``offset`` (``label`` names the later ones)."""
    before = data.draw(cuts_of(raw[:offset]), label='chunks before') if offset else []
    return before + data.draw(cuts_of(raw[offset:]), label=label)


def feed_until_error(module: ModuleType, parser: Any, chunks: Sequence[bytes]):
    """Feed ``chunks``; ``(deliveries, others, error or None, bytes fed)`` up to the first FrameError."""
    deliveries: List[Any] = []
    others: List[Any] = []
    fed = 0
    for chunk in chunks:
        fed += len(chunk)
        try:
            got, passed = parser.feed(chunk)
        except module.FrameError as exc:
            assert type(exc) is module.FrameError
            return deliveries, others, exc, fed
        deliveries.extend(got)
        others.extend(passed)
    return deliveries, others, None, fed


# -- truncated streams ------------------------------------------------------------------------------

@MANY
@given(stream=streams(), data=st.data())
def test_stream_cut_anywhere_gives_exactly_its_whole_frames(parser_impl, stream, data) -> None:
    raw, frames = stream['data'], stream['frames']
    cut = data.draw(st.integers(0, len(raw)), label='cut')
    ends = frame_ends(frames)
    whole = sum(1 for end in ends if end <= cut)
    boundary = ends[whole - 1] if whole else 0
    want_deliveries, want_others, want_mid = expected_after(stream, whole)

    parser = parser_impl.FrameParser(stream['channel'], TAG, stream['frame_max'])
    with no_hang():
        got = feed_all(parser, data.draw(cuts_of(raw[:cut]), label='chunks before the cut'))
    assert got == (want_deliveries, want_others)
    assert parser.frames_parsed == whole
    assert parser.buffered == cut - boundary
    assert parser.mid_message is want_mid

    # the rest of the stream completes it: everything, nothing twice, nothing left over
    all_deliveries, all_others, _ = expected_after(stream, len(frames))
    with no_hang():
        rest = feed_all(parser, data.draw(cuts_of(raw[cut:]), label='chunks after the cut'))
    assert (got[0] + rest[0], got[1] + rest[1]) == (all_deliveries, all_others)
    assert (parser.buffered, parser.mid_message, parser.frames_parsed) == (0, False, len(frames))


@FUZZ
@given(stream=streams(), data=st.data())
def test_take_remainder_after_a_cut_hands_back_the_partial_frame(parser_impl, stream, data) -> None:
    """What ``settle()`` relies on: the bytes past the last whole frame, exactly, and only once."""
    raw = stream['data']
    cut = data.draw(st.integers(0, len(raw)), label='cut')
    boundary = max([end for end in frame_ends(stream['frames']) if end <= cut], default=0)
    parser = parser_impl.FrameParser(stream['channel'], TAG, stream['frame_max'])
    feed_all(parser, data.draw(cuts_of(raw[:cut]), label='chunks'))
    assert parser.take_remainder() == raw[boundary:cut]
    assert parser.buffered == 0
    assert parser.take_remainder() == b''


def test_small_stream_cut_at_every_offset(parser_impl) -> None:
    """Every offset of a stream with a multi-frame body, a heartbeat and others' content in it."""
    writer = Writer(4096)
    parts = [(writer.deliver(1, TAG, 1, b'a' * 9000, content_type='application/json',
                             correlation_id='x'), True),
             (writer.heartbeat(), False),
             (writer.basic_return(1, b'r' * 30), False),
             (writer.deliver(1, TAG, 2, b'', correlation_id='empty'), True),
             (writer.deliver(2, TAG, 3, b'other channel'), False),
             (writer.deliver(1, TAG, 4, b'last', correlation_id='z'), True)]
    frames, ours = [], []
    for chunk, mine in parts:
        for frame in split_frames(chunk):
            frames.append(frame)
            ours.append(mine)
    stream = {'frames': frames, 'ours': ours, 'channel': 1, 'frame_max': 4096,
              'data': b''.join(chunk for chunk, _ in parts)}
    raw, ends = stream['data'], frame_ends(frames)
    expected = [expected_after(stream, count) for count in range(len(frames) + 1)]
    for cut in range(len(raw) + 1):
        whole = sum(1 for end in ends if end <= cut)
        parser = parser_impl.FrameParser(1, TAG, 4096)
        deliveries, others = parser.feed(raw[:cut])
        assert (deliveries, others, parser.mid_message) == expected[whole], cut
        assert parser.buffered == cut - (ends[whole - 1] if whole else 0), cut
        rest = parser.feed(raw[cut:])
        assert (deliveries + rest[0], others + rest[1]) == expected[-1][:2], cut


# -- oversized frames -------------------------------------------------------------------------------

@MANY
@given(stream=streams(), data=st.data())
def test_oversized_frame_raises_naming_its_size(parser_impl, stream, data) -> None:
    """After any valid prefix, a header announcing more than frame_max fails, naming the sizes."""
    frame_max = stream['frame_max']
    size = data.draw(st.integers(frame_max - 7, 2 ** 32 - 1) | st.just(frame_max - 7), label='size')
    frame_type = data.draw(st.integers(0, 255), label='frame type')
    channel = data.draw(st.sampled_from([0, stream['channel'], 65535]), label='channel')
    header = pack('>BHI', frame_type, channel, size)
    tail = data.draw(st.binary(min_size=1, max_size=64), label='payload start')
    prefix = stream['data']
    want_deliveries, want_others, _ = expected_after(stream, len(stream['frames']))

    parser = parser_impl.FrameParser(stream['channel'], TAG, frame_max)
    with no_hang():
        before = feed_all(parser, data.draw(cuts_of(prefix), label='prefix chunks'))
        assert before == (want_deliveries, want_others)
        # the header alone is not enough to tell: nothing happens yet
        assert parser.feed(header) == ([], [])
        with pytest.raises(parser_impl.FrameError) as info:
            parser.feed(tail)
    assert type(info.value) is parser_impl.FrameError
    assert str(info.value) == f'frame of {size + 8} bytes exceeds frame_max={frame_max}'
    assert parser.frames_parsed == len(stream['frames'])
    # sticky: feeding more (or nothing) raises the same error again, nothing is skipped
    with pytest.raises(parser_impl.FrameError, match=f'^frame of {size + 8} bytes'):
        parser.feed(b'')


@FUZZ
@given(frame_max=st.integers(8, 1 << 20), data=st.data())
def test_oversized_frame_alone(parser_impl, frame_max, data) -> None:
    """Any announced size against any frame_max: a FrameError naming the size exactly when too big."""
    size = data.draw(st.integers(0, 2 ** 32 - 1) | st.sampled_from([frame_max - 8, frame_max - 7]), label='size')
    frame_type = data.draw(st.integers(0, 255), label='frame type')
    channel = data.draw(st.sampled_from([0, 2, 65535]), label='channel')  # not ours: passed through
    frame = pack('>BHI', frame_type, channel, size) + b'\xce'
    parser = parser_impl.FrameParser(1, TAG, frame_max)
    if size + 8 > frame_max:
        with pytest.raises(parser_impl.FrameError) as info:
            parser.feed(frame)
        assert str(info.value) == f'frame of {size + 8} bytes exceeds frame_max={frame_max}'
    elif size == 0:
        assert parser.feed(frame) == ([], [(frame_type, channel, b'')])
        assert parser.buffered == 0
    else:
        assert parser.feed(frame) == ([], [])
        assert parser.buffered == len(frame)


# -- corrupted frame-end octet ----------------------------------------------------------------------

@MANY
@given(stream=streams(), data=st.data())
def test_corrupted_frame_end_raises_after_exactly_the_frames_before_it(parser_impl, stream, data) -> None:
    frames = stream['frames']
    if not frames:
        return
    index = data.draw(st.integers(0, len(frames) - 1), label='corrupted frame')
    octet = data.draw(st.integers(0, 255).filter(lambda value: value != 0xCE), label='end octet')
    ends = frame_ends(frames)
    start = ends[index - 1] if index else 0
    raw = bytearray(stream['data'])
    raw[ends[index] - 1] = octet
    raw = bytes(raw)
    want_deliveries, want_others, want_mid = expected_after(stream, index)

    parser = parser_impl.FrameParser(stream['channel'], TAG, stream['frame_max'])
    chunks = chunks_split_at(data, raw, start, 'chunks from the bad frame')
    with no_hang():
        deliveries, others, error, fed = feed_until_error(parser_impl, parser, chunks)
    assert error is not None, 'a bad frame-end octet went unnoticed'
    assert str(error) == f'frame end byte is {octet:#04x}, expected 0xce'
    assert (deliveries, others) == (want_deliveries, want_others)
    assert parser.frames_parsed == index
    assert parser.mid_message is want_mid
    assert parser.buffered == fed - start  # the bad frame and what follows it stay put
    with pytest.raises(parser_impl.FrameError, match='^frame end byte is'):
        parser.feed(b'')


# -- garbage at a frame boundary --------------------------------------------------------------------

garbage = st.one_of(
    st.binary(min_size=1, max_size=200),
    st.builds(lambda head, rest: head + rest,  # something shaped like a frame header first
              st.builds(lambda t, ch, size: pack('>BHI', t, ch, size), st.integers(0, 255),
                        st.sampled_from([0, 1, 2, 65535]), st.integers(0, 2 ** 32 - 1) | st.integers(0, 64)),
              st.binary(max_size=80)))


@MANY
@given(stream=streams(), data=st.data(), junk=garbage)
def test_garbage_spliced_at_a_frame_boundary(parser_impl, stream, data, junk) -> None:
    """What the proxy injects in the integration test: whole frames before it come out intact; then
    FrameError, or (garbage that happens to be well-formed) more frames; never another exception."""
    frames = stream['frames']
    at = data.draw(st.integers(0, len(frames)), label='frames before the garbage')
    offset = frame_ends(frames)[at - 1] if at else 0
    raw = stream['data'][:offset] + junk + stream['data'][offset:]
    want_deliveries, want_others, _ = expected_after(stream, at)
    parser = parser_impl.FrameParser(stream['channel'], TAG, stream['frame_max'])
    chunks = chunks_split_at(data, raw, offset, 'chunks from the garbage')
    with no_hang():
        deliveries, others, _, _ = feed_until_error(parser_impl, parser, chunks)
    assert deliveries[:len(want_deliveries)] == want_deliveries
    assert others[:len(want_others)] == want_others
    assert parser.frames_parsed >= at


# -- bounded work and memory ------------------------------------------------------------------------

@MANY
@given(raw=st.binary(max_size=4000) | st.builds(lambda n: b'\x08\x00\x00\x00\x00\x00\x00\xce' * n,
                                                 st.integers(0, 500)),
       frame_max=st.sampled_from([0, 8, 9, 64, 4096, 131072]), data=st.data())
def test_bounded_work_and_memory(parser_impl, raw, frame_max, data) -> None:
    """N bytes: at most N // 8 frames out, no more payload bytes out than in, and between feeds
    less than one frame_max held (a peer cannot make the parser buffer more than one frame)."""
    chunks = data.draw(cuts_of(raw), label='chunks')
    parser = parser_impl.FrameParser(data.draw(st.sampled_from([0, 1, 2])), TAG, frame_max)
    out_frames = out_bytes = 0
    fed = 0
    with no_hang():
        for chunk in chunks:
            fed += len(chunk)
            try:
                deliveries, others = parser.feed(chunk)
            except parser_impl.FrameError:
                break
            out_frames += len(others) + len(deliveries)
            out_bytes += sum(len(payload) for _, _, payload in others) \
                + sum(len(delivery[4]) for delivery in deliveries)
            assert parser.frames_parsed <= fed // 8
            assert out_frames <= parser.frames_parsed
            assert out_bytes <= fed
            assert parser.buffered <= fed
            if frame_max:
                assert parser.buffered < max(frame_max, 8)


# -- the twins side by side -------------------------------------------------------------------------

@MANY
@given(stream=streams(), data=st.data(), junk=garbage)
def test_twins_agree_on_spliced_cut_and_oversized_streams(both, stream, data, junk) -> None:
    frames = stream['frames']
    at = data.draw(st.integers(0, len(frames)), label='splice point')
    offset = frame_ends(frames)[at - 1] if at else 0
    how = data.draw(st.sampled_from(['splice garbage', 'cut', 'oversized', 'bad end']), label='how')
    raw = stream['data']
    if how == 'splice garbage':
        raw = raw[:offset] + junk + raw[offset:]
    elif how == 'cut':
        raw = raw[:data.draw(st.integers(0, len(raw)), label='cut')]
    elif how == 'oversized':
        raw = raw[:offset] + pack('>BHI', 3, stream['channel'], stream['frame_max']) + junk + raw[offset:]
    elif frames:
        mutable = bytearray(raw)
        mutable[frame_ends(frames)[max(at - 1, 0)] - 1] ^= data.draw(st.integers(1, 255), label='xor')
        raw = bytes(mutable)
    chunks = data.draw(cuts_of(raw), label='chunks')
    with no_hang():
        pure, compiled = (outcomes(module, chunks, stream['channel'], TAG, stream['frame_max']) for module in both)
    assert compiled == pure


def test_a_negative_body_limit_is_refused(parser_impl) -> None:
    with pytest.raises(ValueError, match='max_body'):
        parser_impl.FrameParser(1, 'tag', 131072, -1)
