"""The command line: ``python -m rpcresults demo`` (workers publish, this client joins)."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from .app import DEFAULT_BROKER_URL

__all__ = ('main',)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog='rpcresults', description=__doc__)
    sub = parser.add_subparsers(dest='command', required=True)
    demo_parser = sub.add_parser('demo', help='worker processes publish results; this client joins them')
    demo_parser.add_argument('--broker', default=os.environ.get('RPCRESULTS_BROKER_URL', DEFAULT_BROKER_URL),
                             help='broker URL (default: $RPCRESULTS_BROKER_URL or the local RabbitMQ)')
    demo_parser.add_argument('--count', type=int, default=20000, help='results to publish and join')
    demo_parser.add_argument('--workers', type=int, default=4, help='worker processes')
    demo_parser.add_argument('--timeout', type=float, default=120.0, help='seconds to wait for the join')
    args = parser.parse_args(argv)
    if args.command == 'demo':
        if args.count < 1 or args.workers < 1:
            parser.error('--count and --workers must be at least 1')
        from .demo import demo
        return demo(args.broker, args.count, args.workers, args.timeout)
    return 2  # pragma: no cover - argparse enforces the choices


if __name__ == '__main__':
    sys.exit(main())
