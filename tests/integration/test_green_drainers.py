"""gevent and eventlet drainers: chosen by the monkey-patched environment, as in Celery.

Monkey-patching must never touch the pytest process, so each case runs
``tests/green/green_waiters.py`` in a subprocess (bounded by a timeout): it patches,
makes an app on the real broker, checks which drainer the consumer got, has many green
threads wait in ``get()`` while a worker publishes, and prints a JSON report that is
asserted here. The subprocess inherits ``RPCRESULTS_NO_EXTENSIONS``, so CI's two passes
cover both state-table twins.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict

import pytest

import rpcresults.protocol
from rpcresults.backends.asynchronous import (Drainer, EventletDrainer, GeventDrainer, detect_environment,
                                              drainers)

ROOT = Path(__file__).resolve().parents[2]
SUBPROCESS_TIMEOUT = 120
WAITERS = 50


def run_green(library: str, broker_url: str, script: str = 'green_waiters', *args: str) -> Dict[str, Any]:
    if importlib.util.find_spec(library) is None:
        pytest.fail(f'{library} is not installed: install the test extra (pip install -e ".[test]")',
                    pytrace=False)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get('PYTHONPATH', ''))
    proc = subprocess.run([sys.executable, '-m', f'tests.green.{script}', library, broker_url, *args],
                          cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    lines = [line for line in proc.stdout.splitlines() if line.startswith('REPORT ')]
    assert proc.returncode == 0 and lines, (
        f'{library} script failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}')
    return json.loads(lines[-1][len('REPORT '):])


def test_registry_has_every_environment_and_the_plain_process_uses_the_default(client):
    assert drainers['default'] is Drainer
    assert drainers['gevent'] is GeventDrainer
    assert drainers['eventlet'] is EventletDrainer
    assert detect_environment() == 'default'
    assert type(client.result_consumer.drainer) is Drainer


@pytest.mark.parametrize('library, drainer', [('gevent', 'GeventDrainer'), ('eventlet', 'EventletDrainer')])
def test_green_threads_wait_through_the_green_drainer(library, drainer, broker_url):
    report = run_green(library, broker_url, 'green_waiters', str(WAITERS))
    assert report['environment'] == library
    assert report['drainer'] == drainer
    assert report['using_extension'] is rpcresults.protocol.USING_EXTENSION  # the same twin as this pass
    assert report['all_waiting'] is True, 'not every green thread was waiting at once'
    assert report['ticked_while_waiting'] is True, 'waiting blocked the other green threads'
    assert report['joined'] is True
    assert report['errors'] == []
    assert report['received'] == WAITERS
    assert report['values_ok'] is True, 'a green thread got another one\'s value'
    assert report['timeout'] == 'TimeoutError'
    assert report['waiting_after'] == 0
    assert report['reader_ended'] is True
    assert report['readers_started'] >= 1


@pytest.mark.parametrize('library', ['gevent', 'eventlet'])
def test_green_threads_of_several_os_threads_share_one_consumer(library, broker_url):
    """Patched without ``thread``: a real thread's hub runs the reader of a socket made on the main
    hub; green threads of the main hub wait meanwhile (their hub keeps running), and once that
    thread is gone a later wait still gets its reply (the reader is replaced)."""
    report = run_green(library, broker_url, 'green_threads')
    assert report['drainer'] == f'{library.capitalize()}Drainer'
    assert report['reader_in_thread'] is True
    assert report['ticked_while_waiting'] is True, 'a wait blocked the other green threads of its hub'
    assert report['main_got'] == 'second'
    assert report['thread_got'] == 'first'
    assert report['thread_ended'] is True
    assert report['later_got'] == 'third'
    assert report['readers_started'] >= 2
