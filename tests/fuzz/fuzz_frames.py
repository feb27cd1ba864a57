"""atheris (libFuzzer) harness for the frame parser twins: only FrameError escapes, twins agree.

Run it (from the project root; extra libFuzzer flags pass straight through)::

    python -m tests.fuzz.fuzz_frames -runs=200000
    python -m tests.fuzz.fuzz_frames -max_total_time=300 -max_len=4096 corpus_dir/

Each input is read as a little program, so the fuzzer gets past the framing and the
consumer-tag check into the header and body parsing: a parser setup byte (frame_max, our
channel), then ops that append a whole valid frame from a fixed set (our ``basic.deliver``,
content headers with every property, body frames, heartbeats, others' content), a raw frame
envelope around fuzzed bytes, or raw fuzzed bytes. The stream is fed to both twins in the
same fuzzed chunking. Any exception other than ``FrameError`` (one class, which both twins
raise: ``rpcresults.exceptions.FrameError``), a segfault, or a difference between the twins
(per feed: deliveries, frames, error message, parser state) stops the run with the input
saved as ``crash-*``. Coverage feedback comes from the
pure twin (instrumented); the compiled one is compared against it.

Needs ``atheris`` (test extra) and the compiled twin built (``pip install -e .``).
"""
from __future__ import annotations

import sys
from struct import pack
from typing import Any, List, Sequence, Tuple

import atheris

with atheris.instrument_imports():
    from rpcresults.protocol import _frames_py as pure
from rpcresults.protocol import _frames_c as compiled  # noqa: E402  (not instrumentable: compiled code)
from tests.frame_streams import outcomes  # noqa: E402

TAG = 'rpcresults-0f3c2a9e-5b7d-4e61-8c2a-9d4b1e7f6a30'
FRAME_MAXES = (0, 8, 64, 4096, 131072)


def _frame(frame_type: int, channel: int, payload: bytes) -> bytes:
    return pack('>BHI', frame_type, channel, len(payload)) + payload + b'\xce'


def _shortstr(text: bytes) -> bytes:
    return bytes([len(text)]) + text


def _deliver(tag: str, delivery_tag: int) -> bytes:
    return (pack('>HH', 60, 60) + _shortstr(tag.encode()) + pack('>QB', delivery_tag, 0)
            + _shortstr(b'') + _shortstr(b'reply'))


def _header(body_size: int, flags: int, properties: bytes) -> bytes:
    return pack('>HHQH', 60, 0, body_size, flags) + properties


#: Whole valid frames the fuzzer can splice in (channel 1 is ours unless the setup says otherwise).
PIECES: Tuple[bytes, ...] = (
    _frame(1, 1, _deliver(TAG, 1)),
    _frame(1, 1, _deliver('someone-else', 2)),
    _frame(1, 2, _deliver(TAG, 3)),
    _frame(2, 1, _header(5, 0x8000 | 0x4000 | 0x0400,
                         _shortstr(b'application/json') + _shortstr(b'utf-8') + _shortstr(b'task-1'))),
    _frame(2, 1, _header(0, 0x0400, _shortstr(b'empty'))),
    _frame(2, 1, _header(3, 0x2000 | 0x1000 | 0x0800 | 0x0400,
                         pack('>I', 0) + b'\x02\x05' + _shortstr(b'id'))),
    _frame(2, 1, _header(2, 0x0001, b'\x00\x00')),
    _frame(3, 1, b'hello'),
    _frame(3, 1, b'ab'),
    _frame(8, 0, b''),
    _frame(8, 1, b''),
    _frame(1, 1, pack('>HH', 60, 50) + pack('>H', 312) + _shortstr(b'NO_ROUTE') + _shortstr(b'') * 2),
    _frame(1, 1, pack('>HH', 60, 21) + _shortstr(TAG.encode())),
)


def build(fdp: Any) -> Tuple[int, int, bytes, List[int]]:
    """``(channel, frame_max, stream, chunk sizes)`` from the fuzzer's bytes."""
    setup = fdp.ConsumeIntInRange(0, 255)
    frame_max = FRAME_MAXES[setup % len(FRAME_MAXES)]
    channel = (setup >> 4) % 3
    stream = bytearray()
    for _ in range(fdp.ConsumeIntInRange(0, 24)):
        if fdp.remaining_bytes() == 0:
            break
        op = fdp.ConsumeIntInRange(0, 3)
        if op == 0:
            stream += PIECES[fdp.ConsumeIntInRange(0, len(PIECES) - 1)]
        elif op == 1:  # a raw envelope: type, channel and announced size fuzzed, end octet mostly right
            frame_type, frame_channel = fdp.ConsumeIntInRange(0, 9), fdp.ConsumeIntInRange(0, 2)
            payload = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 64))
            size = len(payload) if fdp.ConsumeBool() else fdp.ConsumeIntInRange(0, 2 ** 32 - 1)
            end = 0xCE if fdp.ConsumeIntInRange(0, 7) else fdp.ConsumeIntInRange(0, 255)
            stream += pack('>BHI', frame_type, frame_channel, size) + payload + bytes([end])
        elif op == 2:
            stream += fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 32))
        else:  # truncate what we have so far
            del stream[fdp.ConsumeIntInRange(0, len(stream)):]
    chunks = [fdp.ConsumeIntInRange(1, 64) for _ in range(fdp.ConsumeIntInRange(0, 8))]
    return channel, frame_max, bytes(stream), chunks


def split(data: bytes, sizes: Sequence[int]) -> List[bytes]:
    """``data`` cut into pieces of ``sizes`` (cycled), the last piece taking the rest."""
    if not sizes:
        return [data]
    pieces, pos, index = [], 0, 0
    while pos < len(data):
        step = sizes[index % len(sizes)]
        pieces.append(data[pos:pos + step])
        pos += step
        index += 1
    return pieces or [b'']


def test_one_input(data: bytes) -> None:
    """The libFuzzer entry point."""
    channel, frame_max, stream, sizes = build(atheris.FuzzedDataProvider(data))
    chunks = split(stream, sizes)
    expected = outcomes(pure, chunks, channel, TAG, frame_max)
    got = outcomes(compiled, chunks, channel, TAG, frame_max)
    if got != expected:
        raise AssertionError(f'the twins disagree on {stream!r} (chunks {sizes}, channel {channel}, '
                             f'frame_max {frame_max}):\npure     {expected!r}\ncompiled {got!r}')


def main(argv: Sequence[str]) -> None:
    atheris.Setup(list(argv), test_one_input)
    atheris.Fuzz()


if __name__ == '__main__':
    main(sys.argv)
