"""What the tables say: the peers' keys and labels, and plain-text table formatting."""
from __future__ import annotations

import statistics
from typing import Optional, Sequence

# Peer keys (``--peers``) and their labels in the tables.
COMPILED, PURE, CELERY, PYAMQP, C = 'compiled', 'pure', 'celery', 'pyamqp', 'c'
#: Celery's own app and ResultSet with result_backend = 'rpcresults.contrib.celery:RPCBackend'.
CELERY_RPCR = 'celery-rpcresults'
#: aio-pika's ``patterns.RPC`` (P7 only).
AIOPIKA = 'aiopika'
PEERS = (COMPILED, PURE, CELERY, CELERY_RPCR, PYAMQP, C, AIOPIKA)

LABELS = {
    COMPILED: 'rpcresults compiled',
    PURE: 'rpcresults pure',
    CELERY: "celery rpc://",
    CELERY_RPCR: 'Celery + rpcresults backend',
    PYAMQP: 'py-amqp basic_consume',
    C: 'C rabbitmq-c',
    AIOPIKA: 'aio-pika patterns.RPC',
}
RTT_LABELS = dict(LABELS, pyamqp='py-amqp round trip')
PUBLISH_LABELS = dict(LABELS, pyamqp='py-amqp basic_publish')
E2E_LABELS = dict(LABELS, pyamqp='py-amqp pipeline', c='C rabbitmq-c pair')


def other_name(peer: str) -> str:
    """How a ratio names the reference peer."""
    return {CELERY: 'celery', PYAMQP: 'py-amqp', C: 'C', AIOPIKA: 'aio-pika'}[peer]


def table(title: str, headers: Sequence[str], rows: Sequence[Sequence[str]], notes: Sequence[str] = ()) -> str:
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))

    def fmt(row: Sequence[str]) -> str:
        return '  '.join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip()

    lines = [title, fmt(headers), '  '.join('-' * w for w in widths)]
    lines.extend(fmt(row) for row in rows)
    lines.extend(f'  {note}' for note in notes)
    return '\n'.join(lines)


HEADERS = ('peer', 'value', 'ratio', 'target', 'met?')


def num(value: float, digits: int = 0) -> str:
    return f'{value:,.{digits}f}'


def met(ok: Optional[bool]) -> str:
    return 'n/a' if ok is None else ('yes' if ok else 'NO')


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float('nan')


def ratio_text(ratio: float, other: str, as_percent: bool) -> str:
    """``0.8`` -> ``80 % of C`` (``as_percent``) or ``0.80× C``."""
    return f'{ratio * 100:.0f} % of {other}' if as_percent else f'{ratio:.2f}× {other}'
