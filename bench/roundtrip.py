"""P5: one request at a time: request -> echo process -> Celery-format reply -> ``get()``; p50/p99."""
from __future__ import annotations

from typing import Any, Dict, List

from bench.common import new_queue_name
from bench.core import BenchBase
from bench.proc import Child, PeerFailed, log, python_peer
from bench.report import CELERY, COMPILED, PURE, PYAMQP, RTT_LABELS, met, num, table


class RoundTripTarget(BenchBase):
    """The P5 case and table."""

    def run_p5(self) -> None:
        count, warmup = self.args.p5_count, max(20, self.args.p5_count // 10)
        batches = max(1, min(self.args.p5_batches, count))
        peers = self.selected(self.rpc_peers() + [PYAMQP, CELERY])
        request_queue = new_queue_name('echo')
        results: Dict[str, Dict[str, Any]] = {}
        errors: Dict[str, str] = {}
        clients: Dict[str, Child] = {}
        queues: List[str] = []
        echo = python_peer('echo', {'url': self.url, 'queue': request_queue}, label='echo responder')
        try:
            echo.expect('ready', 120)
            for peer in peers:  # one client process per peer, each warmed up before any is measured
                kind = {COMPILED: 'rpcresults', PURE: 'rpcresults', CELERY: 'celery', PYAMQP: 'pyamqp'}[peer]
                child = python_peer('rtt', {'url': self.url, 'kind': kind, 'request_queue': request_queue,
                                            'count': count, 'warmup': warmup, 'timeout': 10},
                                    pure=(peer == PURE), label=RTT_LABELS[peer])
                try:
                    ready = child.expect('ready', 120)
                    queues.append(ready['queue'])
                    if peer in (COMPILED, PURE):
                        self._check_impl(peer, ready)
                except Exception as exc:
                    child.finish()
                    errors[peer] = self.fail('P5', peer, exc, RTT_LABELS)
                    continue
                clients[peer] = child
            # Interleave: batch after batch, each peer in turn (rotated), so noise hits all alike.
            sizes = [count // batches + (1 if i < count % batches else 0) for i in range(batches)]
            for number, size in enumerate(sizes):
                live = [peer for peer in peers if peer in clients]
                order = live[number % len(live):] + live[:number % len(live)] if live else []
                for peer in order:
                    try:
                        clients[peer].send(f'go {size}')
                        clients[peer].expect('batch', 60 + size * 0.05)
                    except Exception as exc:
                        errors[peer] = self.fail('P5', peer, exc, RTT_LABELS)
                        clients.pop(peer).finish()
            for peer, child in list(clients.items()):
                try:
                    child.close_stdin()
                    done = child.expect('done', 60)
                    if done.get('wrong'):
                        raise PeerFailed(f"{done['wrong']} replies had the wrong value")
                except Exception as exc:
                    errors[peer] = self.fail('P5', peer, exc, RTT_LABELS)
                    continue
                finally:
                    child.finish()
                results[peer] = done
                log(f"[P5] {RTT_LABELS[peer]}: p50 {done['p50'] * 1e6:.0f} µs, p99 {done['p99'] * 1e6:.0f} µs, "
                    f"client CPU {done['cpu_per_call'] * 1e6:.0f} µs/call")
        except Exception as exc:
            errors['echo'] = self.fail('P5', 'echo responder', exc)
        finally:
            for child in clients.values():
                child.finish()
            echo.finish()
            for name in queues + [request_queue]:
                self.broker.delete(name)
        self.raw['P5'] = {'count': count, 'warmup': warmup, 'batches': batches, 'results': results,
                          'errors': errors}

    def table_p5(self) -> str:
        data = self.raw['P5']
        rows = []
        ref = data['results'].get(PYAMQP)
        for peer in (COMPILED, PURE, PYAMQP, CELERY):
            target = '≤ 1.2× py-amqp' if peer in (COMPILED, PURE) else ''
            r = data['results'].get(peer)
            unavailable = self.unavailable_row(RTT_LABELS[peer], peer, r, data['errors'], target)
            if unavailable is not None:
                rows.append(unavailable)
                continue
            value = (f"p50 {r['p50'] * 1e6:.0f} µs, p99 {r['p99'] * 1e6:.0f} µs "
                     f"(CPU {r['cpu_per_call'] * 1e6:.0f} µs/call)")
            if peer == PYAMQP:
                ratio, ok = 'reference', None
            elif ref:
                p50, p99 = r['p50'] / ref['p50'], r['p99'] / ref['p99']
                ratio, ok = f'p50 {p50:.2f}×, p99 {p99:.2f}×', (p50 <= 1.2 and p99 <= 1.2)
            else:
                ratio, ok = 'n/a', None
            rows.append([RTT_LABELS[peer], value, ratio, target, met(ok) if target else ''])
        notes = [f"{num(data['count'])} requests one at a time per peer after {data['warmup']} warm-up ones, in "
                 f"{data['batches']} batches interleaved across peers; an echo process (raw py-amqp) answers each "
                 'with a Celery-format SUCCESS;',
                 'requests go out with a raw basic_publish for every peer; the clients differ only in how '
                 'they wait for the reply (get() vs a basic_consume loop, ack each).']
        return table('P5  round trip: request -> echo worker -> reply -> get()',
                     ('peer', 'value', 'ratio', 'target', 'met?'), rows, notes)

