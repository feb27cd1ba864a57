"""P3: 4 publisher processes send N/4 results each while one client joins all of them.

Reported: how long after the last publish (acknowledged by the broker: a synchronous call queued
behind it) the join ends, as % of the publishing time, upper median of ``--p3-rounds`` rounds.
"""
from __future__ import annotations

from typing import Any, Dict, List

from bench.common import new_queue_name
from bench.core import BenchBase
from bench.proc import Child, PeerFailed, log, python_peer
from bench.report import CELERY, COMPILED, LABELS, PURE, PYAMQP, met, num, table


class LiveTarget(BenchBase):
    """The P3 case and table."""

    def live_once(self, peer: str, total: int, workers: int) -> Dict[str, Any]:
        seed = self._next_seed()
        raw_queue = None
        if peer == PYAMQP:
            raw_queue = new_queue_name('p3')
            self.broker.channel.queue_declare(queue=raw_queue, durable=True, auto_delete=False)
        kind = {COMPILED: 'rpcresults', PURE: 'rpcresults', CELERY: 'celery', PYAMQP: 'pyamqp'}[peer]
        timeout = max(120.0, total / 500)
        client = python_peer('join', {'url': self.url, 'kind': kind, 'seed': seed, 'count': total,
                                      'queue': raw_queue, 'timeout': timeout},
                             pure=(peer == PURE), label=LABELS[peer])
        publishers: List[Child] = []
        queue = raw_queue
        try:
            ready = client.expect('ready', 180)
            queue = ready.get('queue') or raw_queue
            self._check_impl(peer, ready)
            chunk = -(-total // workers)
            for start in range(0, total, chunk):
                publishers.append(python_peer('publish', {
                    'url': self.url, 'queue': queue, 'seed': seed, 'start': start,
                    'count': min(chunk, total - start)}, label=f'publisher {len(publishers) + 1}'))
            for publisher in publishers:
                publisher.expect('ready', 120)
            client.send('go')
            client.expect('started', 30)
            for publisher in publishers:
                publisher.send('go')
            published = [publisher.expect('done', timeout) for publisher in publishers]
            done = client.expect('done', timeout)
            if not done.get('ok'):
                raise PeerFailed(f'{LABELS[peer]}: joined values were wrong')
        finally:
            for publisher in publishers:
                publisher.finish()
            client.finish()
            self.broker.delete(queue)
        first = min(p['first'] for p in published)
        last_sent = max(p['sent'] for p in published)
        last = max(p['confirmed'] for p in published)
        publish_span = last - first
        after = done['end_abs'] - last
        return {'total': total, 'workers': workers, 'first_publish': first, 'last_sent': last_sent,
                'last_publish': last, 'join_start': done['start_abs'], 'join_end': done['end_abs'],
                'publish_seconds': publish_span, 'join_after_seconds': after,
                'after_percent': after / publish_span * 100, 'publish_rate': total / publish_span,
                'client_cpu': done['cpu'], 'cpu_us': done['cpu'] / total * 1e6,
                'stats': done.get('stats')}

    def run_p3(self) -> None:
        total, workers, rounds = self.args.p3_count, 4, self.args.p3_rounds
        peers = self.selected(self.rpc_peers() + [PYAMQP] + ([CELERY] if self.args.p3_celery else []))
        runs: Dict[str, List[Dict[str, Any]]] = {peer: [] for peer in peers}
        errors: Dict[str, str] = {}
        for round_ in range(1, rounds + 1):
            order = peers[round_ - 1:] + peers[:round_ - 1] if len(peers) >= round_ else peers
            for peer in order:
                if peer in errors:
                    continue
                try:
                    r = self.live_once(peer, total, workers)
                except Exception as exc:
                    errors[peer] = self.fail('P3', peer, exc)
                    continue
                runs[peer].append(r)
                log(f"[P3 {round_}/{rounds}] {LABELS[peer]}: publish {r['publish_seconds']:.2f} s "
                    f"({num(r['publish_rate'])}/s), join ends {r['after_percent']:+.1f} % "
                    f"({r['join_after_seconds'] * 1000:+.0f} ms) after the last publish, "
                    f"{r['cpu_us']:.1f} µs CPU/result")
        results = {}
        for peer, done in runs.items():
            if done:
                ordered = sorted(done, key=lambda r: r['after_percent'])
                mid = dict(ordered[len(ordered) // 2])  # the median run (upper median for even counts)
                mid['after_min'], mid['after_max'] = ordered[0]['after_percent'], ordered[-1]['after_percent']
                results[peer] = mid
        self.raw['P3'] = {'total': total, 'workers': workers, 'rounds': rounds, 'runs': runs,
                          'results': results, 'errors': errors}

    def table_p3(self) -> str:
        data = self.raw['P3']
        rows = []
        ref = data['results'].get(PYAMQP)
        peers = [COMPILED, PURE, PYAMQP] + ([CELERY] if self.args.p3_celery else [])
        for peer in peers:
            target = '≤ 5 %' if peer in (COMPILED, PURE) else ''
            r = data['results'].get(peer)
            unavailable = self.unavailable_row(LABELS[peer], peer, r, data['errors'], target)
            if unavailable is not None:
                rows.append(unavailable)
                continue
            spread = (f" [{r['after_min']:.1f} .. {r['after_max']:.1f}]" if data['rounds'] > 1 else '')
            value = (f"join ends {r['after_percent']:.1f} %{spread} after the last publish "
                     f"({r['join_after_seconds'] * 1000:.0f} ms after {r['publish_seconds']:.2f} s of publishing, "
                     f"{num(r['publish_rate'])}/s)")
            ratio = 'reference' if peer == PYAMQP else (
                f"{r['after_percent'] - ref['after_percent']:+.1f} pp vs py-amqp" if ref else 'n/a')
            rows.append([LABELS[peer], value, ratio, target, met(r['after_percent'] <= 5.0) if target else ''])
        notes = [f"upper median of {data['rounds']} round(s) [min .. max]; "
                 f"{data['workers']} publisher processes (raw py-amqp, Celery-format results, bodies "
                 'pre-built) publish while the client joins all;',
                 'publish end = when the broker answered a synchronous call queued behind the last publish.',
                 "with 2 cores the publishers, the broker and the client share CPU: the client's share is "
                 'what keeps it from lagging.']
        return table(f"P3  live: {data['workers']} workers × {num(data['total'] // data['workers'])} results "
                     'published while the client joins them', ('peer', 'value', 'ratio', 'target', 'met?'),
                     rows, notes)

