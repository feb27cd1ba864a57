"""Small pieces the CLI commands share: broker probe, a progress bar for long joins, the results table."""
from __future__ import annotations

import sys
from typing import Any, Callable, List, Optional, Sequence

from .app import App

__all__ = ('broker_problem', 'Progress', 'print_table')


def broker_problem(url: str) -> Optional[str]:
    """Why the broker at ``url`` does not answer (``None`` when it does)."""
    connection = App(url).connection(connect_timeout=2)
    try:
        connection.ensure_connection(max_retries=1)
        return None
    except Exception as exc:  # the reason is printed to the user
        return str(exc) or type(exc).__name__
    finally:
        connection.release()


class Progress:
    """A progress bar on stderr while a join runs: tqdm when installed, else a plain counter line.

    ``counter`` reports how many results arrived so far; :meth:`tick` (a join's
    ``on_interval``) refreshes the bar from it, so the hot path never calls us per result.
    """

    def __init__(self, total: int, counter: Callable[[], int], label: str, enabled: bool = True) -> None:
        self.total = total
        self.counter = counter
        self.start = counter()
        self.enabled = enabled
        self._bar: Any = None
        self._shown = 0
        self._last_plain = -1
        if not enabled:
            return
        try:
            from tqdm import tqdm
        except ImportError:
            tqdm = None
        if tqdm is not None:
            self._bar = tqdm(total=total, desc=label, unit='res', file=sys.stderr, leave=False,
                             mininterval=0.2)
        else:
            self.label = label

    def tick(self) -> None:
        if not self.enabled:
            return
        done = min(self.counter() - self.start, self.total)
        if self._bar is not None:
            if done > self._shown:
                self._bar.update(done - self._shown)
                self._shown = done
            return
        percent = done * 100 // max(self.total, 1)
        if percent // 10 != self._last_plain:
            self._last_plain = percent // 10
            print(f'  {self.label}: {done}/{self.total} ({percent}%)', file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self.tick()
            self._bar.close()


def print_table(headers: Sequence[str], rows: List[Sequence[Any]]) -> None:
    """A plain text table with ``|`` between columns (easy to read and to parse)."""
    cells = [list(map(str, headers))] + [[str(value) for value in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [' | '.join(value.ljust(width) for value, width in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, '-+-'.join('-' * width for width in widths))
    print('\n'.join(lines))
