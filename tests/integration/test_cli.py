"""The command line: ``python -m rpcresults demo|bench`` as subprocesses (bounded), checked through
exit codes and the results table they print."""
from __future__ import annotations

import subprocess
import sys
from typing import Dict, List

import pytest

CLOSED_PORT_BROKER = 'amqp://guest:guest@127.0.0.1:1//'


def run(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, '-m', 'rpcresults', *args, '--no-progress'],
                          capture_output=True, text=True, timeout=timeout)


def table(stdout: str) -> List[Dict[str, str]]:
    """The rows of the ``|``-separated table at the end of the output, keyed by header."""
    lines = [line for line in stdout.splitlines() if ' | ' in line]
    assert lines, f'no table in:\n{stdout}'
    headers = [cell.strip() for cell in lines[0].split('|')]
    return [dict(zip(headers, (cell.strip() for cell in line.split('|')))) for line in lines[1:]]


def test_demo_joins_every_call(broker_url: str) -> None:
    proc = run('demo', '--broker', broker_url, '--count', '1500', '--timeout', '120')
    assert proc.returncode == 0, proc.stderr
    (row,) = table(proc.stdout)
    assert row['client'] == 'rpcresults rpc://'
    assert row['count'] == '1500'
    assert row['correct'] == 'yes'
    assert float(row['results/s']) > 0


def test_demo_over_direct_reply_to(broker_url: str) -> None:
    proc = run('demo', '--broker', broker_url, '--count', '300', '--direct', '--timeout', '60')
    assert proc.returncode == 0, proc.stderr
    (row,) = table(proc.stdout)
    assert row['client'] == 'rpcresults rpc+direct://'
    assert (row['count'], row['correct']) == ('300', 'yes')


def test_demo_falls_back_to_memory_when_no_broker_answers() -> None:
    proc = run('demo', '--broker', CLOSED_PORT_BROKER, '--count', '200', '--timeout', '60', timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f'no broker answers at {CLOSED_PORT_BROKER}' in proc.stderr
    assert 'running on memory://' in proc.stderr
    assert 'rabbitmq-server -detached' in proc.stderr
    (row,) = table(proc.stdout)
    assert (row['count'], row['correct']) == ('200', 'yes')


def test_bench_prints_a_row_per_client(broker_url: str) -> None:
    pytest.importorskip('celery')
    proc = run('bench', '--broker', broker_url, '--count', '2000', '--workers', '2', '--celery',
               '--timeout', '120')
    assert proc.returncode == 0, proc.stderr
    rows = table(proc.stdout)
    assert [row['client'] for row in rows] == ['rpcresults', 'celery rpc://', 'rpcresults call→Responder']
    for row in rows:
        assert row['count'] == '2000'
        assert row['correct'] == 'yes'
        assert float(row['client CPU us/result']) > 0


def test_bench_needs_a_broker() -> None:
    proc = run('bench', '--broker', CLOSED_PORT_BROKER, '--count', '10', timeout=120)
    assert proc.returncode == 2
    assert f'no broker answers at {CLOSED_PORT_BROKER}' in proc.stderr


@pytest.mark.parametrize('args', [['demo', '--count', '0'], ['bench', '--workers', '0']])
def test_nonsense_arguments_are_refused(args: List[str]) -> None:
    proc = run(*args, timeout=60)
    assert proc.returncode == 2
    assert '--count and --workers must be at least 1' in proc.stderr
