"""The command line: ``rpcresults demo`` (client + responder) and ``rpcresults bench`` (join throughput)."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from .app import DEFAULT_BROKER_URL
from .cli_bench import bench
from .demo import demo

__all__ = ('main',)


def _common(parser: argparse.ArgumentParser, count: int) -> None:
    parser.add_argument('--broker', default=os.environ.get('RPCRESULTS_BROKER_URL', DEFAULT_BROKER_URL),
                        help='broker URL (default: $RPCRESULTS_BROKER_URL or the local RabbitMQ)')
    parser.add_argument('--count', type=int, default=count, help='results to join')
    parser.add_argument('--timeout', type=float, default=120.0, help='seconds to wait for the join')
    parser.add_argument('--no-progress', action='store_true', help='no progress bar on stderr')


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``); the exit status."""
    parser = argparse.ArgumentParser(prog='rpcresults', description=__doc__)
    sub = parser.add_subparsers(dest='command', required=True)
    demo_parser = sub.add_parser('demo', help='a Client sends calls, a Responder answers, the client joins')
    _common(demo_parser, 5000)
    demo_parser.add_argument('--direct', action='store_true',
                             help="replies over RabbitMQ's direct reply-to (rpc+direct://)")
    bench_parser = sub.add_parser('bench', help='publisher processes send results; this client joins them')
    _common(bench_parser, 20000)
    bench_parser.add_argument('--workers', type=int, default=2, help='publisher processes')
    bench_parser.add_argument('--celery', action='store_true',
                              help="also measure Celery's own rpc:// client on the same input")
    args = parser.parse_args(argv)
    if args.count < 1 or getattr(args, 'workers', 1) < 1:
        parser.error('--count and --workers must be at least 1')
    if args.command == 'demo':
        return demo(args.broker, args.count, args.timeout, direct=args.direct, progress=not args.no_progress)
    if args.command == 'bench':
        return bench(args.broker, args.count, args.workers, args.timeout, args.celery,
                     progress=not args.no_progress)
    return 2  # pragma: no cover - argparse enforces the choices


if __name__ == '__main__':
    sys.exit(main())
