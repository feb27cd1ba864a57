"""P1 and P2: ``join_native`` over N results already waiting in the reply queue, at several sizes.

Per size (``--p1-sizes``, default 10k, 100k and 1M; ``--quick`` 10k) every peer joins N results
published beforehand in Celery's wire format, median of ``--rounds`` rounds in rotating order
(sizes above 100,000 get proportionally fewer rounds, at least one). P1 is the rate, P2 the
client's CPU per result in the same runs. Celery's peers are skipped above ``--p1-celery-max``
(default 100,000: a million pending Celery results take minutes and GBs). Each case deletes its
queue when done, so the broker never holds more than one size's results.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

from bench.common import new_queue_name, task_ids
from bench.core import BenchBase
from bench.envinfo import c_argv
from bench.proc import Child, PeerFailed, log, python_peer
from bench.report import (C, CELERY, CELERY_RPCR, COMPILED, HEADERS, LABELS, PURE, PYAMQP, median, met, num,
                          other_name, ratio_text, table)

#: P2 targets: compiled at the smallest size, compiled at larger sizes relative to that, pure.
P2_COMPILED_US, P2_GROWTH, P2_PURE_US = 2.5, 1.2, 8.0
#: Sizes up to this run ``--rounds`` rounds; above it proportionally fewer.
FULL_ROUNDS_UP_TO = 100_000


class JoinTargets(BenchBase):
    """P1/P2 cases and tables."""

    def p1_rounds(self, size: int) -> int:
        rounds = self.args.rounds
        return rounds if size <= FULL_ROUNDS_UP_TO else max(1, rounds * FULL_ROUNDS_UP_TO // size)

    def join_once(self, peer: str, count: int) -> Dict[str, Any]:
        """One peer joins ``count`` results that already wait in its reply queue."""
        seed = self._next_seed()
        ids = task_ids(seed, count)
        timeout = max(60.0, count / 400)
        raw_queue = None
        if peer in (PYAMQP, C):
            raw_queue = new_queue_name(peer)
            self.broker.channel.queue_declare(queue=raw_queue, durable=True, auto_delete=False)
        if peer == C:
            assert self.c_binary is not None
            child = Child(c_argv([self.c_binary], self.url, raw_queue, str(count)), label=LABELS[C])
        else:
            kind = {COMPILED: 'rpcresults', PURE: 'rpcresults', CELERY: 'celery', CELERY_RPCR: 'celery-rpcresults',
                    PYAMQP: 'pyamqp'}[peer]
            child = python_peer('join', {'url': self.url, 'kind': kind, 'seed': seed, 'count': count,
                                         'queue': raw_queue, 'timeout': timeout},
                                pure=(peer == PURE), label=LABELS[peer])
        queue = raw_queue
        try:
            ready = child.expect('ready', max(120.0, count / 2000))
            queue = ready.get('queue') or raw_queue
            self._check_impl(peer, ready)
            fill = self.broker.fill(queue, ids)
            child.send('go')
            done = child.expect('done', timeout + 30)
            done['fill_seconds'] = fill
            if not done.get('ok', False):
                raise PeerFailed(f'{LABELS[peer]}: joined values were wrong')
            if done.get('count') != count:
                raise PeerFailed(f"{LABELS[peer]}: joined {done.get('count')} of {count}")
            done['rate'] = count / done['wall']
            done['cpu_us'] = done['cpu'] / count * 1e6
            child.finish()
            # Every result was acked by the time the client closed: nothing is left for redelivery.
            done['left_in_queue'] = left = self.broker.depth(queue)
            if left:
                log(f'[P1] note: {LABELS[peer]} left {left} message(s) unacked in its reply queue')
            return done
        finally:
            child.finish()
            self.broker.delete(queue)

    def run_p1(self) -> None:
        sizes: List[int] = self.args.p1_sizes
        self.raw['P1'] = {'sizes': sizes, 'by_size': {}}
        celery_max = self.args.p1_celery_max
        for size in sizes:
            rounds = self.p1_rounds(size)
            candidates = self.rpc_peers() + [CELERY, CELERY_RPCR, PYAMQP] + ([C] if self.c_binary else [])
            skipped = {peer: f'n/a: skipped above {num(celery_max)} results (--p1-celery-max)'
                       for peer in (CELERY, CELERY_RPCR) if celery_max and size > celery_max}
            peers = [peer for peer in self.selected(candidates) if peer not in skipped]
            runs: Dict[str, List[Dict[str, Any]]] = {peer: [] for peer in peers}
            errors: Dict[str, str] = {}
            for round_ in range(1, rounds + 1):
                # rotate the order each round so no peer always runs first (or last)
                order = peers[(round_ - 1) % len(peers):] + peers[:(round_ - 1) % len(peers)] if peers else []
                for peer in order:
                    if peer in errors:
                        continue
                    try:
                        done = self.join_once(peer, size)
                    except Exception as exc:
                        errors[peer] = self.fail('P1', peer, exc)
                        continue
                    runs[peer].append(done)
                    log(f"[P1 {round_}/{rounds}] {LABELS[peer]}: {num(size)} results, {num(done['rate'])} results/s, "
                        f"{done['wall']:.3f} s wall, {done['cpu_us']:.1f} µs CPU/result, "
                        f"peak RSS {done['peak_rss'] / 2**20:.0f} MiB")
            summary = {}
            for peer in peers:
                if runs[peer]:
                    summary[peer] = {
                        'rate': median([r['rate'] for r in runs[peer]]),
                        'rate_min': min(r['rate'] for r in runs[peer]),
                        'rate_max': max(r['rate'] for r in runs[peer]),
                        'cpu_us': median([r['cpu_us'] for r in runs[peer]]),
                        'peak_rss': max(r['peak_rss'] for r in runs[peer]),
                        'rss_growth': median([r['rss_after'] - r['rss_before'] for r in runs[peer]
                                              if 'rss_after' in r]) if peer != C else None,
                    }
            self.raw['P1']['by_size'][size] = {'count': size, 'rounds': rounds, 'runs': runs, 'summary': summary,
                                               'errors': errors, 'skipped': skipped}

    def _p1_value(self, data: Dict[str, Any], peer: str) -> str:
        summary, errors = data['summary'], data['errors']
        if peer in summary:
            s = summary[peer]
            spread = f" ({num(s['rate_min'])}-{num(s['rate_max'])})" if data['rounds'] > 1 else ''
            return f"{num(s['rate'])} results/s{spread}"
        if peer in data['skipped']:
            return data['skipped'][peer]
        return self.missing(peer, errors)

    def table_p1(self, size: int) -> str:
        data = self.raw['P1']['by_size'][size]
        summary = data['summary']
        rows: List[List[str]] = []
        for peer in (COMPILED, PURE):
            if peer == COMPILED and not self.ext:
                rows.append([LABELS[peer], self.not_built, 'n/a', '≥ 15× celery', 'n/a'])
                continue
            first = True
            for other, target, bound, as_percent in ((CELERY, '≥ 15× celery', 15.0, False),
                                                     (PYAMQP, '≥ 2× py-amqp', 2.0, False),
                                                     (C, '≥ 85 % of C', 0.85, True)):
                if peer in summary and other in summary:
                    ratio = summary[peer]['rate'] / summary[other]['rate']
                    shown = ratio_text(ratio, other_name(other), as_percent)
                    ok: Optional[bool] = ratio >= bound if peer == COMPILED else None
                else:
                    shown, ok = f'n/a vs {other_name(other)}', None
                rows.append([LABELS[peer] if first else '', self._p1_value(data, peer) if first else '', shown,
                             target if peer == COMPILED else f'({target}: compiled only)', met(ok)])
                first = False
        if CELERY_RPCR in summary and CELERY in summary:
            dropin = f"{summary[CELERY_RPCR]['rate'] / summary[CELERY]['rate']:.2f}× celery"
        else:
            dropin = 'n/a vs celery'
        rows.append([LABELS[CELERY_RPCR], self._p1_value(data, CELERY_RPCR), dropin, '', ''])
        for peer in (CELERY, PYAMQP, C):
            if peer == C and not self.c_binary:
                rows.append([LABELS[C], self.c_note, 'reference', '', ''])
                continue
            rows.append([LABELS[peer], self._p1_value(data, peer), 'reference', '', ''])
        notes = [f"median of {data['rounds']} round(s) (min-max in brackets); every peer in its own "
                 'subprocess, connecting inside the timed section;',
                 "Celery + rpcresults backend: the celery rpc:// workload (Celery's app, AsyncResult, "
                 "ResultSet.join_native) with result_backend = 'rpcresults.contrib.celery:RPCBackend';",
                 'py-amqp: basic_consume, manual acks (multiple, every 256), json.loads of each body;',
                 'C: rabbitmq-c, same acks, parses frames and properties but NOT the JSON body.']
        return table(f"P1  join_native over {num(size)} results waiting in the reply queue "
                     f'(Celery wire format)', HEADERS, rows, notes)

    def _p2_compiled_target(self, size: int) -> tuple:
        """``(text, bound)`` of compiled's P2 target at ``size``: an absolute bound at the smallest
        size, else relative to compiled's value at the smallest size (None when not measured)."""
        smallest = min(self.raw['P1']['sizes'])
        if size == smallest:
            return f'≤ {P2_COMPILED_US:g} µs', P2_COMPILED_US
        base = self.raw['P1']['by_size'][smallest]['summary'].get(COMPILED)
        text = f'≤ {P2_GROWTH:g}× at {num(smallest)}'
        return (f"{text} ({P2_GROWTH * base['cpu_us']:.2f} µs)", P2_GROWTH * base['cpu_us']) if base \
            else (text, None)

    def table_p2(self, size: int) -> str:
        data = self.raw['P1']['by_size'][size]
        summary = data['summary']
        rows = []
        celery = summary.get(CELERY, {}).get('cpu_us')
        compiled_target, compiled_bound = self._p2_compiled_target(size)
        for peer, target, bound in ((COMPILED, compiled_target, compiled_bound),
                                    (PURE, f'≤ {P2_PURE_US:g} µs', P2_PURE_US),
                                    (CELERY_RPCR, '', None), (CELERY, '', None), (PYAMQP, '', None),
                                    (C, '', None)):
            if peer == COMPILED and not self.ext:
                rows.append([LABELS[peer], self.not_built, 'n/a', target, 'n/a'])
                continue
            if peer == C and not self.c_binary:
                rows.append([LABELS[C], self.c_note, '', '', ''])
                continue
            if peer not in summary:
                rows.append([LABELS[peer], self._p1_value(data, peer), '', target,
                             'NO' if target and peer in data['errors'] else ('n/a' if target else '')])
                continue
            s = summary[peer]
            ratio = f"{s['cpu_us'] / celery * 100:.1f} % of celery's" if celery and peer != CELERY else \
                ('reference' if peer == CELERY else 'n/a')
            rss = f"peak RSS {s['peak_rss'] / 2**20:.0f} MiB"
            ok = met(s['cpu_us'] <= bound) if bound is not None else ('n/a' if target else '')
            rows.append([LABELS[peer], f"{s['cpu_us']:.2f} µs CPU/result  ({rss})", ratio, target, ok])
        return table(f"P2  client CPU per result (user+system, whole process incl. connecting), same runs as P1 "
                     f"({num(size)} results)", HEADERS, rows)
