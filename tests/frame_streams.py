"""Feeding byte streams to a frame parser twin and recording what comes out, for the frame tests
and the atheris harness (pure stdlib: the harness imports it outside pytest)."""
from __future__ import annotations

from types import ModuleType
from typing import Any, Iterable, List, Sequence, Tuple


def feed_all(parser: Any, chunks: Iterable[bytes]) -> Tuple[List[Any], List[Any]]:
    """Feed ``chunks`` one by one; every delivery and every passed-through frame, in order."""
    deliveries: List[Any] = []
    others: List[Any] = []
    for chunk in chunks:
        got, passed = parser.feed(chunk)
        deliveries.extend(got)
        others.extend(passed)
    return deliveries, others


def outcomes(module: ModuleType, chunks: Sequence[bytes], channel: int, tag: str, frame_max: int) -> List[Any]:
    """Per feed: its output or ``('FrameError', message)``, plus the parser's state after it; then
    what ``take_remainder`` hands back. Only the twin's own FrameError (not a subclass) is caught."""
    parser = module.FrameParser(channel, tag, frame_max)
    out: List[Any] = []
    for chunk in chunks:
        try:
            result: Any = parser.feed(chunk)
        except module.FrameError as exc:
            if type(exc) is not module.FrameError:
                raise AssertionError(f'{module.__name__} raised a subclass {type(exc)!r}') from exc
            result = ('FrameError', str(exc))
        out.append((result, parser.buffered, parser.mid_message, parser.frames_parsed))
    out.append(parser.take_remainder())
    return out
