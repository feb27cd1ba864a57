"""The benchmark runner works end to end: ``python -m bench --quick --only P1,P2`` on the real broker.

Checks the structure of what it prints (a table per target, a row per peer), never timing values.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _table(stdout: str, title: str) -> str:
    """The lines of the table whose title starts with ``title`` (up to the next blank line)."""
    match = re.search(rf'^{re.escape(title)}.*?(?=^\s*$|\Z)', stdout, re.MULTILINE | re.DOTALL)
    assert match, f'no table {title!r} in:\n{stdout}'
    return match.group(0)


def test_bench_quick_p1_p2_prints_a_row_per_peer(broker_url: str) -> None:
    env = dict(os.environ)
    env.pop('RPCRESULTS_NO_EXTENSIONS', None)
    proc = subprocess.run([sys.executable, '-m', 'bench', '--quick', '--only', 'P1,P2', '--broker', broker_url],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f'stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}'
    out = proc.stdout

    # the header: date, host, CPU, versions, whether the extension is importable
    assert re.search(r'^rpcresults bench: \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC on \S+', out, re.MULTILINE)
    for needle in ('CPU ', 'Python ', 'kombu ', 'amqp ', 'celery ', 'extension importable: '):
        assert needle in out, needle
    assert 'P3 ' not in out and 'P5 ' not in out  # --only was honoured

    for title in ('P1 ', 'P2 '):
        table = _table(out, title)
        assert re.search(r'^peer\s+value\s+ratio\s+target\s+met\?', table, re.MULTILINE), table
        # compiled: measured, or a clear note that the extension is not built
        assert re.search(r'^rpcresults compiled\s+(\S.*(results/s|µs CPU/result)|not built)', table,
                         re.MULTILINE), table
        assert re.search(r'^rpcresults pure\s+\S', table, re.MULTILINE), table
        assert re.search(r'^celery rpc://\s+\S', table, re.MULTILINE), table
        assert re.search(r'^py-amqp basic_consume\s+\S', table, re.MULTILINE), table
        assert re.search(r'^C rabbitmq-c\s+\S', table, re.MULTILINE), table  # a value or an n/a note
        assert 'FAILED' not in table, table

    p1 = _table(out, 'P1 ')
    for peer in ('rpcresults pure', 'celery rpc://', 'py-amqp basic_consume'):
        assert re.search(rf'^{re.escape(peer)}\s+[\d,]+ results/s', p1, re.MULTILINE), (peer, p1)
    # the ratios are computed in the run, against each reference peer
    assert re.search(r'× celery', p1) and re.search(r'× py-amqp', p1), p1
    # one progress line per case on stderr
    assert re.search(r'^\[P1 1/1\] rpcresults pure: ', proc.stderr, re.MULTILINE), proc.stderr
