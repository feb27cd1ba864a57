"""The runner's shared state and helpers: which peers run, failures, the header, seeds.

Each target lives in its own module as a mixin of :class:`BenchBase` (``join.py`` P1/P2, ``live.py``
P3, ``memory.py`` P4, ``roundtrip.py`` P5, ``publish.py`` P6, ``rpc_e2e.py`` P7); ``run.py`` puts
them together, parses the command line and prints the tables.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import socket
import time
from datetime import datetime, timezone
from typing import Any, Dict, List, Optional

from bench.common import Broker, broker_params
from bench.envinfo import cpu_model, extension_importable, git_describe, mask, versions
from bench.proc import PeerFailed, log
from bench.report import AIOPIKA, C, CELERY, CELERY_RPCR, COMPILED, LABELS, PURE


def importable(name: str) -> bool:
    """Whether ``import name`` works here (the peers run this same interpreter)."""
    try:
        importlib.import_module(name)
    except Exception:
        return False
    return True


class BenchBase:
    """One run of the bench: the broker, the selected peers, the raw numbers, the failures."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.url: str = args.broker
        self.params = broker_params(self.url)
        self.quick: bool = args.quick
        self.failures: List[str] = []
        self.raw: Dict[str, Any] = {}
        self.broker = Broker(self.url)
        self.ext, self.ext_note = extension_importable()
        self.not_built = 'not built: ' + self.ext_note[len('no ('):-1] if self.ext_note.startswith('no (') \
            else f'not built ({self.ext_note})'
        self.has_celery = importlib.util.find_spec('celery') is not None
        self.has_aiopika = importable('aio_pika')
        self.c_binary: Optional[str] = None
        self.c_note = 'not needed'
        self.c_rpc_binary: Optional[str] = None
        self.c_rpc_note = 'not needed'
        self.seed = int(time.time() * 1000) & 0xFFFFFFFF
        self.started = datetime.now(timezone.utc)

    # -- peers ---------------------------------------------------------------------------------
    def rpc_peers(self) -> List[str]:
        return ([COMPILED] if self.ext else []) + [PURE]

    def selected(self, peers: List[str]) -> List[str]:
        return [peer for peer in peers if peer in self.args.peer_set
                and (peer not in (CELERY, CELERY_RPCR) or self.has_celery)
                and (peer != AIOPIKA or self.has_aiopika)]

    def missing(self, peer: str, errors: Dict[str, str]) -> str:
        """What a row says for a peer without a measurement."""
        if peer in errors:
            return f'FAILED: {errors[peer][:60]}'
        if peer in (CELERY, CELERY_RPCR) and not self.has_celery:
            return 'n/a: celery is not installed'
        if peer == AIOPIKA and not self.has_aiopika:
            return "n/a: aio-pika does not import (pip install -e '.[bench]')"
        if peer not in self.args.peer_set:
            return 'n/a: not selected (--peers)'
        if peer == C and not self.c_binary:
            return self.c_note
        return 'n/a'

    def unavailable_row(self, label: str, peer: str, result: Any, errors: Dict[str, str],
                        target: str) -> Optional[List[str]]:
        """The row of a peer without a result (compiled twin not built, or failed/absent); None otherwise."""
        if peer == COMPILED and not self.ext:
            return [label, self.not_built, 'n/a', target, 'n/a']
        if result is None:
            return [label, self.missing(peer, errors), '', target,
                    ('NO' if peer in errors else 'n/a') if target else '']
        return None

    def _check_impl(self, peer: str, ready: Dict[str, Any]) -> None:
        if peer == COMPILED and not ready.get('using_extension'):
            raise PeerFailed('the compiled peer runs the pure twin (USING_EXTENSION is False)')
        if peer == PURE and ready.get('using_extension'):
            raise PeerFailed('the pure peer runs the extension despite RPCRESULTS_NO_EXTENSIONS=1')
        if peer == CELERY_RPCR and self.ext and not ready.get('using_extension'):
            raise PeerFailed('the Celery drop-in runs the pure twin although the extension is built')

    def _next_seed(self) -> int:
        self.seed += 1
        return self.seed

    def fail(self, case: str, peer: str, exc: BaseException, labels: Optional[Dict[str, str]] = None) -> str:
        message = f'{case} {(labels or LABELS).get(peer, peer)}: {exc}'
        self.failures.append(message)
        log(f'[{case}] FAILED {message}')
        return str(exc)

    # -- header --------------------------------------------------------------------------------
    def header(self) -> str:
        v = versions()
        lines = [
            f"rpcresults bench: {self.started.strftime('%Y-%m-%d %H:%M:%S')} UTC on {socket.gethostname()}",
            f'  CPU        {cpu_model()} ({os.cpu_count()} cores)',
            f'  software   Python {v["python"]}, kombu {v["kombu"]}, amqp {v["amqp"]}, celery {v["celery"]}, '
            f'aio-pika {v["aio_pika"]}, rpcresults {v["rpcresults"]} (git {git_describe()})',
            f'  broker     {self.broker.server_version()} at {mask(self.url)}',
            f'  compiled   extension importable: {self.ext_note}',
            f'  C consumer {self.c_note}',
            f'  C RPC pair {self.c_rpc_note}',
            '  Absolute numbers are noise on this machine; ratios are within this one run.',
        ]
        self.raw['env'] = {'date': self.started.isoformat(), 'hostname': socket.gethostname(),
                           'cpu': cpu_model(), 'cores': os.cpu_count(), 'versions': v,
                           'broker': self.broker.server_version(), 'extension': self.ext,
                           'extension_note': self.ext_note, 'c_consumer': self.c_note,
                           'c_rpc': self.c_rpc_note, 'git': git_describe(), 'quick': self.quick}
        return '\n'.join(lines)
