"""The README's main command: ``python -m rpcresults demo`` against the real broker."""
from __future__ import annotations

import subprocess
import sys


def test_demo_joins_every_result_in_order(broker_url: str) -> None:
    proc = subprocess.run(
        [sys.executable, '-m', 'rpcresults', 'demo', '--broker', broker_url, '--count', '3000',
         '--workers', '3', '--timeout', '120'],
        capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert 'results joined                    3000' in proc.stdout
    assert 'all values correct, in order      yes' in proc.stdout


def test_demo_says_when_no_broker_answers() -> None:
    proc = subprocess.run(
        [sys.executable, '-m', 'rpcresults', 'demo', '--broker', 'amqp://guest:guest@127.0.0.1:1//',
         '--count', '10'],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert 'no broker answers at amqp://guest:guest@127.0.0.1:1//' in proc.stderr
    assert 'rabbitmq-server -detached' in proc.stderr


def test_demo_rejects_nonsense_arguments() -> None:
    proc = subprocess.run([sys.executable, '-m', 'rpcresults', 'demo', '--count', '0'],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert '--count and --workers must be at least 1' in proc.stderr
