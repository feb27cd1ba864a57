"""The plain benchmark runner: the performance targets P1-P7, every peer measured in one run, ratios of that run.

    python -m bench [--broker URL] [--quick] [--only P1,P2,...] [--json PATH] [--chart PATH]
    python bench/run.py ...

Each peer runs in its own subprocess (``bench/peers.py`` and the modules it names): rpcresults
compiled (when the extension is importable), rpcresults pure (``RPCRESULTS_NO_EXTENSIONS=1``),
Celery's ``rpc://`` backend, raw py-amqp, aio-pika (P7) and C programs on rabbitmq-c (P1, P7;
compiled here when ``librabbitmq-dev`` is installed). One progress line per case goes to stderr;
the tables go to stdout at the end, and a bar chart of P1/P6/P7 to ``--chart`` (SVG). Absolute
numbers are noise on a shared 2-core machine; the ratios are what the targets are about.

One module per target: ``join.py`` (P1, P2), ``live.py`` (P3), ``memory.py`` (P4), ``roundtrip.py``
(P5), ``publish.py`` (P6), ``rpc_e2e.py`` (P7); this one puts them together.

Exit status: 0 when every case ran (whether or not its target was met), 1 when a case failed.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from typing import List, Optional, Sequence, Tuple

if __package__ in (None, ''):  # ``python bench/run.py``
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.chart import Bar, write_chart  # noqa: E402
from bench.common import BENCH_DIR, DEFAULT_BROKER  # noqa: E402
from bench.envinfo import build_c, cpu_model, mask  # noqa: E402
from bench.join import JoinTargets  # noqa: E402
from bench.live import LiveTarget  # noqa: E402
from bench.memory import MemoryTarget  # noqa: E402
from bench.proc import log  # noqa: E402
from bench.publish import PublishTarget  # noqa: E402
from bench.report import (AIOPIKA, C, CELERY, CELERY_RPCR, COMPILED, LABELS, PEERS, PURE,  # noqa: E402
                          PYAMQP)
from bench.roundtrip import RoundTripTarget  # noqa: E402
from bench.rpc_e2e import RpcTarget  # noqa: E402

TARGETS = ('P1', 'P2', 'P3', 'P4', 'P5', 'P6', 'P7')
DEFAULT_CHART = os.path.join(BENCH_DIR, 'results.svg')
CHART_LEGEND = dict(LABELS, celery='Celery rpc://', pyamqp='raw py-amqp', c='C rabbitmq-c')
#: The same colour for a peer in every chart.
CHART_COLOURS = {COMPILED: '#1f77b4', PURE: '#aec7e8', CELERY_RPCR: '#2ca02c', CELERY: '#d62728',
                 PYAMQP: '#ff7f0e', C: '#7f7f7f', AIOPIKA: '#9467bd'}


def short_size(size: int) -> str:
    """``1000000`` -> ``1M``, ``100000`` -> ``100k``."""
    for unit, scale in (('M', 1000000), ('k', 1000)):
        if size >= scale and size % scale == 0:
            return f'{size // scale}{unit}'
    return f'{size:,}'


class Bench(JoinTargets, LiveTarget, MemoryTarget, RoundTripTarget, PublishTarget, RpcTarget):
    """Every target of one run."""

    def chart_groups(self) -> List[Tuple[str, List[Bar]]]:
        groups: List[Tuple[str, List[Bar]]] = []
        if 'P1' in self.raw:
            for size in self.raw['P1']['sizes']:
                summary = self.raw['P1']['by_size'][size]['summary']
                groups.append((f'P1 join\n{short_size(size)} results',
                               [(peer, summary.get(peer, {}).get('rate'))
                                for peer in (COMPILED, PURE, CELERY_RPCR, CELERY, PYAMQP, C)]))
        if 'P6' in self.raw:
            summary = self.raw['P6']['summary']
            groups.append(('P6 worker publish\nresults/s', [(peer, summary.get(peer, {}).get('rate'))
                                                             for peer in (COMPILED, PURE, CELERY, PYAMQP)]))
        if 'P7' in self.raw:
            summary = self.raw['P7']['summary']
            groups.append(('P7 end-to-end RPC\ncalls/s', [(peer, summary.get(peer, {}).get('rate'))
                                                          for peer in (COMPILED, PURE, PYAMQP, C, AIOPIKA)]))
        return groups

    def write_chart(self, path: str) -> None:
        groups = self.chart_groups()
        if not groups:
            return
        title = f"rpcresults bench, {self.started.strftime('%Y-%m-%d %H:%M')} UTC"
        subtitle = (f'{socket.gethostname()}, {cpu_model()} ({os.cpu_count()} cores)'
                    + (', --quick sizes' if self.quick else '')
                    + '\nrates normalised per group (fastest peer = 100 %); labels: absolute rates')
        try:
            write_chart(path, title, subtitle, groups, CHART_LEGEND, CHART_COLOURS)
        except OSError as exc:
            log(f'chart not written to {path}: {exc}')
            return
        self.raw['chart'] = path
        log(f'chart written to {path}')

    def run(self, only: Sequence[str]) -> int:
        if 'P1' in only or 'P2' in only:
            self.c_binary, self.c_note = (None, 'n/a: --no-c') if self.args.no_c else build_c('c_consumer')
            log(f'C consumer: {self.c_note}')
        if 'P7' in only:
            self.c_rpc_binary, self.c_rpc_note = (None, 'n/a: --no-c') if self.args.no_c else build_c('c_rpc')
            log(f'C RPC pair: {self.c_rpc_note}')
        header = self.header()
        log(f"compiled extension importable: {self.ext_note}; seed {self.seed}")
        tables = []
        try:
            if 'P1' in only or 'P2' in only:
                self.run_p1()
                sizes = self.raw['P1']['sizes']
                tables.extend(self.table_p1(size) for size in sizes if 'P1' in only)
                tables.extend(self.table_p2(size) for size in sizes if 'P2' in only)
            for target, run, show in (('P3', self.run_p3, self.table_p3), ('P4', self.run_p4, self.table_p4),
                                      ('P5', self.run_p5, self.table_p5), ('P6', self.run_p6, self.table_p6),
                                      ('P7', self.run_p7, self.table_p7)):
                if target in only:
                    run()
                    tables.append(show())
        finally:
            self.broker.close()
        print(header)
        for text in tables:
            print()
            print(text)
        if self.failures:
            print()
            print(f'{len(self.failures)} case(s) FAILED:')
            for failure in self.failures:
                print(f'  {failure}')
        if self.args.chart:
            self.write_chart(self.args.chart)
        if self.args.json:
            self.raw['failures'] = self.failures
            with open(self.args.json, 'w') as f:
                json.dump(self.raw, f, indent=1, default=str)
            log(f'raw numbers written to {self.args.json}')
        return 1 if self.failures else 0


def sizes_arg(text: str) -> List[int]:
    """``10000,100k,1M`` -> ``[10000, 100000, 1000000]``."""
    sizes = []
    for word in text.replace('_', '').split(','):
        word = word.strip().lower()
        if not word:
            continue
        scale = {'k': 1000, 'm': 1000000}.get(word[-1], 1)
        try:
            sizes.append(int(float(word[:-1] if scale > 1 else word) * scale))
        except ValueError:
            raise argparse.ArgumentTypeError(f'not a size: {word!r}') from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError('give at least one size, each at least 1')
    return sorted(set(sizes))


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog='python -m bench', description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--broker', default=DEFAULT_BROKER, help=f'AMQP broker URL (default {DEFAULT_BROKER})')
    parser.add_argument('--quick', action='store_true', help='small sizes, one round (smoke test)')
    parser.add_argument('--only', default=','.join(TARGETS), help='targets to run, e.g. P1,P2 (default all)')
    parser.add_argument('--json', metavar='PATH', help='also write the raw numbers as JSON')
    parser.add_argument('--chart', metavar='PATH', default=DEFAULT_CHART,
                        help="bar chart (SVG) of P1/P6/P7 (default bench/results.svg; '' for none)")
    parser.add_argument('--p1-sizes', type=sizes_arg, default=None, metavar='N,N,...',
                        help='P1/P2 join sizes (default 10000,100000,1000000; --quick 10000)')
    parser.add_argument('--count', type=int, default=None, help='one P1/P2 size (same as --p1-sizes N)')
    parser.add_argument('--rounds', type=int, default=None,
                        help='P1/P2 rounds per peer up to 100,000 results, fewer above (default 5, --quick 1)')
    parser.add_argument('--p1-celery-max', type=int, default=100000,
                        help="largest P1 size Celery's peers run at (default 100,000; 0: no limit)")
    parser.add_argument('--p3-count', type=int, default=None,
                        help='P3 results in all, over 4 publishers (default 100,000)')
    parser.add_argument('--p3-rounds', type=int, default=None, help='P3 rounds per peer (default 2, --quick 1)')
    parser.add_argument('--p3-celery', action='store_true', help="also run Celery's client in P3 (slow)")
    parser.add_argument('--p4-count', type=int, default=None, help='P4 pending results (default 100,000)')
    parser.add_argument('--p5-count', type=int, default=None, help='P5 round trips per peer (default 2,000)')
    parser.add_argument('--p5-batches', type=int, default=8,
                        help='P5: each peer runs its round trips in this many batches, interleaved (default 8)')
    parser.add_argument('--p6-count', type=int, default=None, help='P6 results per worker run (default 20,000)')
    parser.add_argument('--p6-rounds', type=int, default=None, help='P6 rounds per peer (default 3, --quick 1)')
    parser.add_argument('--p7-count', type=int, default=None, help='P7 calls in flight (default 20,000)')
    parser.add_argument('--p7-rounds', type=int, default=None, help='P7 rounds per pair (default 3, --quick 1)')
    parser.add_argument('--p7-prefetch', type=int, default=256, help='P7 responders\' prefetch (default 256)')
    parser.add_argument('--no-c', action='store_true', help='skip the C peers')
    parser.add_argument('--peers', default=None,
                        help=f"only these peers, e.g. compiled,pure,pyamqp (of {','.join(PEERS)}; default all; "
                             'tables show the rest as n/a)')
    args = parser.parse_args(argv)
    quick = args.quick
    if args.p1_sizes is None:
        args.p1_sizes = [args.count] if args.count else ([10000] if quick else [10000, 100000, 1000000])
    args.rounds = args.rounds or (1 if quick else 5)
    args.p3_count = args.p3_count or (10000 if quick else 100000)
    args.p3_rounds = args.p3_rounds or (1 if quick else 2)
    args.p4_count = args.p4_count or (10000 if quick else 100000)
    args.p5_count = args.p5_count or (200 if quick else 2000)
    args.p6_count = args.p6_count or (2000 if quick else 20000)
    args.p6_rounds = args.p6_rounds or (1 if quick else 3)
    args.p7_count = args.p7_count or (2000 if quick else 20000)
    args.p7_rounds = args.p7_rounds or (1 if quick else 3)
    only = [t.strip().upper() for t in args.only.split(',') if t.strip()]
    unknown = [t for t in only if t not in TARGETS]
    if unknown:
        parser.error(f"unknown target(s) {', '.join(unknown)}; choose from {', '.join(TARGETS)}")
    if min(min(args.p1_sizes), args.rounds, args.p3_count, args.p3_rounds, args.p5_batches, args.p4_count,
           args.p5_count, args.p6_count, args.p6_rounds, args.p7_count, args.p7_rounds, args.p7_prefetch) < 1:
        parser.error('counts and rounds must be at least 1')
    if args.p7_prefetch > 65535:
        parser.error('--p7-prefetch is at most 65535 (AMQP prefetch_count is 16 bits)')
    args.only_list = only
    args.peer_set = set(PEERS)
    if args.peers:
        args.peer_set = {p.strip().lower() for p in args.peers.split(',') if p.strip()}
        if args.peer_set - set(PEERS):
            parser.error(f"unknown peer(s) {', '.join(sorted(args.peer_set - set(PEERS)))}; "
                         f"choose from {', '.join(PEERS)}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        bench = Bench(args)
    except (OSError, Exception) as exc:
        if isinstance(exc, SystemExit):
            raise
        print(f'no broker answers at {mask(args.broker)} ({exc}); start RabbitMQ with: '
              'rabbitmq-server -detached   (or pass --broker URL)', file=sys.stderr)
        return 2
    return bench.run(args.only_list)


if __name__ == '__main__':
    sys.exit(main())
