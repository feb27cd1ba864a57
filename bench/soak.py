"""Soak: ``python -m bench.soak --minutes 5`` publishes and waits for results without pause
against the real broker and watches this process's resident memory.

Each round mixes what a long-lived client does: a ``join_native`` over a batch, ``get()`` calls
from several threads sharing one backend, ``get()`` calls that time out, a join that times out
(its replies then arrive late), and replies for ids nobody waits for (past
``result_buffer_max`` they are evicted). Every value is checked. RSS (``VmRSS`` in
``/proc/self/status``) is sampled every ``--sample`` seconds; after the run a table of the
samples and the slope after warm-up are printed.

Exit status: 0 when RSS after warm-up grew by at most ``--max-growth-mb`` (default 8 MB);
1 when it grew more (a leak, or a bound that is too large for the run); 2 when a value was
wrong or missing. Not run in CI.
"""
from __future__ import annotations

import argparse
import logging
import random
import sys
import threading
import time
import uuid
from typing import Any, Dict, List, Optional, Sequence, Tuple

from bench.common import DEFAULT_BROKER, amqp_connect, publish_results


def rss_mb() -> float:
    """This process's resident set size (``VmRSS``), in MB."""
    with open('/proc/self/status') as status:
        for line in status:
            if line.startswith('VmRSS:'):
                return int(line.split()[1]) / 1024
    raise RuntimeError('no VmRSS in /proc/self/status')


def slope_per_minute(points: Sequence[Tuple[float, float]]) -> float:
    """Least-squares slope of ``(seconds, MB)`` points, in MB per minute (0 for fewer than 2)."""
    if len(points) < 2:
        return 0.0
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_m = sum(m for _, m in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    if var == 0:
        return 0.0
    cov = sum((t - mean_t) * (m - mean_m) for t, m in points)
    return cov / var * 60


class WrongValue(Exception):
    """A wait returned something other than what was published for it."""


class Soak:
    """One client app, one publisher connection, and the rounds between them."""

    def __init__(self, url: str, batch: int, buffer_max: int) -> None:
        import rpcresults
        self.rpcresults = rpcresults
        self.app = rpcresults.App(url, result_buffer_max=buffer_max, result_reply_queue_expires=60)
        self.backend = self.app.backend
        self.backend.result_consumer.start()
        self.queue = self.backend.oid
        self.publisher = amqp_connect(url)
        self.channel = self.publisher.channel()
        self.batch = batch
        self.rng = random.Random(1)
        self.rounds = 0
        self.waited = 0
        self.timeouts = 0

    def _ids(self, count: int) -> List[str]:
        return [str(uuid.uuid4()) for _ in range(count)]

    def _publish(self, ids: Sequence[str]) -> None:
        order = list(enumerate(ids))
        self.rng.shuffle(order)
        for n, task_id in order:
            publish_results(self.channel, self.queue, [task_id], first_value=n)

    def _result(self, task_id: str) -> Any:
        return self.rpcresults.AsyncResult(task_id, backend=self.backend, app=self.app)

    def _check(self, got: List[Any], what: str) -> None:
        if got != list(range(len(got))):
            raise WrongValue(f'{what}: values out of place or missing')
        self.waited += len(got)

    def join(self) -> None:
        ids = self._ids(self.batch)
        members = [self._result(task_id) for task_id in ids]
        self.backend.add_pending_results(members)
        self._publish(ids)
        self._check(self.rpcresults.ResultSet(members, app=self.app).join_native(timeout=60), 'join')

    def threaded_gets(self, threads: int = 4, each: int = 25) -> None:
        ids = self._ids(threads * each)
        got: Dict[int, List[Any]] = {}
        errors: List[Exception] = []

        def run(k: int) -> None:
            try:
                got[k] = [self._result(task_id).get(timeout=60) for task_id in ids[k::threads]]
            except Exception as exc:  # handed to the round, which reports it
                errors.append(exc)

        workers = [threading.Thread(target=run, args=(k,), daemon=True) for k in range(threads)]
        for worker in workers:
            worker.start()
        self._publish(ids)  # while they wait
        for worker in workers:
            worker.join(90)
        if errors or any(worker.is_alive() for worker in workers):
            raise WrongValue(f'threaded get: {errors[:1] or "a thread did not finish"}')
        values = [None] * len(ids)
        for k, part in got.items():
            values[k::threads] = part
        self._check(values, 'threaded get')

    def timeouts_and_late(self) -> None:
        TimeoutError = self.rpcresults.exceptions.TimeoutError
        for task_id in self._ids(50):
            try:
                self._result(task_id).get(timeout=0)
            except TimeoutError:
                self.timeouts += 1
            else:
                raise WrongValue('a get() of a never-published id returned')
        late = self._ids(200)
        try:
            self.rpcresults.ResultSet([self._result(t) for t in late], app=self.app).join_native(timeout=0.05)
        except TimeoutError:
            self.timeouts += 1
        else:
            raise WrongValue('a join of never-published ids returned')
        self._publish(late)  # arrive after their results were dropped: counted as late

    def unwaited(self) -> None:
        self._publish(self._ids(200))

    def round(self) -> None:
        self.join()
        self.threaded_gets()
        self.timeouts_and_late()
        self.unwaited()
        self.rounds += 1

    def close(self) -> None:
        try:
            self.publisher.close()
        finally:
            self.app.close()


def run(args: argparse.Namespace) -> int:
    soak = Soak(args.broker, args.batch, args.buffer_max)
    started = time.monotonic()
    end = started + args.minutes * 60
    warm_up = min(args.warmup, args.minutes * 60 / 3)
    samples: List[Tuple[float, float, int, int, Dict[str, int]]] = []
    next_sample = started
    status = 0
    try:
        while True:
            now = time.monotonic()
            if now >= next_sample:
                stats = soak.backend.stats()
                samples.append((now - started, rss_mb(), soak.rounds, soak.waited, stats))
                print(f'{now - started:7.1f} s  RSS {samples[-1][1]:7.1f} MB  rounds {soak.rounds}',
                      file=sys.stderr, flush=True)
                next_sample += args.sample
            if now >= end:
                break
            soak.round()
    except WrongValue as exc:
        print(f'FAILED: {exc}', file=sys.stderr)
        status = 2
    finally:
        soak.close()

    print(f'{"t (s)":>7} {"RSS MB":>8} {"rounds":>7} {"waited":>9} {"received":>9} {"tracked":>8} '
          f'{"buffer":>7} {"evicted":>8} {"late":>7}')
    for t, mb, rounds, waited, stats in samples:
        print(f'{t:7.1f} {mb:8.1f} {rounds:7d} {waited:9d} {stats["received"]:9d} {stats["tracked"]:8d} '
              f'{stats["buffer_size"]:7d} {stats["evicted"]:8d} {stats["late"]:7d}')
    after = [(t, mb) for t, mb, *_ in samples if t >= warm_up]
    if len(after) < 2:
        print(f'too few samples after the {warm_up:.0f} s warm-up to judge; run longer')
        return status or 1
    growth = max(mb for _, mb in after) - after[0][1]
    slope = slope_per_minute(after)
    print(f'after {warm_up:.0f} s warm-up: RSS {after[0][1]:.1f} -> {after[-1][1]:.1f} MB, '
          f'max growth {growth:.1f} MB (limit {args.max_growth_mb:.1f}), slope {slope:+.3f} MB/min; '
          f'{soak.rounds} rounds, {soak.waited} values checked, {soak.timeouts} timeouts')
    if status:
        return status
    if growth > args.max_growth_mb:
        print('FAILED: resident memory kept growing after warm-up')
        return 1
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m bench.soak', description=__doc__.split('\n\n')[0])
    parser.add_argument('--minutes', type=float, default=5.0, help='how long to run (default 5)')
    parser.add_argument('--broker', default=DEFAULT_BROKER, help='amqp:// URL (default %(default)s)')
    parser.add_argument('--sample', type=float, default=10.0, help='seconds between RSS samples (10)')
    parser.add_argument('--warmup', type=float, default=60.0,
                        help='seconds before RSS growth counts (60, at most a third of the run)')
    parser.add_argument('--max-growth-mb', type=float, default=8.0,
                        help='allowed RSS growth after warm-up, in MB (8)')
    parser.add_argument('--batch', type=int, default=1000, help='results per join_native (1000)')
    parser.add_argument('--buffer-max', type=int, default=1000,
                        help='result_buffer_max: small, so the buffer and the memos of evicted and '
                             'abandoned ids (10x this) reach their bounds during warm-up (1000)')
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)  # the eviction warnings are expected here
    return run(args)


if __name__ == '__main__':
    sys.exit(main())
