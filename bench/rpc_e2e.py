"""P7: end-to-end RPC. One client with N calls in flight (default 20,000), one echo responder process.

Pairs (client and responder of the same kind, each in its own process; the peers are in
``bench/rpc_peers.py`` and ``bench/c_rpc.c``): rpcresults ``Client.call`` + ``Responder`` (compiled
and pure: both processes run the same twin), a raw py-amqp pipeline, a C (rabbitmq-c) pair, and
aio-pika's ``patterns.RPC``. Every responder consumes with the same prefetch (``--p7-prefetch``) and
acks each request after publishing its reply. Reported: calls/s and the client's CPU per call,
median of ``--p7-rounds`` rounds in rotating order, ratios within the run.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

from bench.common import new_queue_name
from bench.core import BenchBase
from bench.envinfo import c_argv
from bench.proc import Child, PeerFailed, log, python_peer
from bench.report import (AIOPIKA, C, COMPILED, E2E_LABELS, HEADERS, PURE, PYAMQP, median, met, num,
                          other_name, ratio_text, table)

#: Targets of rpcresults compiled: ≥ 70 % of the C pair, ≥ 3× the py-amqp pipeline, ≥ 10× aio-pika.
VERSUS = ((C, '≥ 70 % of C', 0.70, True), (PYAMQP, '≥ 3× py-amqp', 3.0, False),
          (AIOPIKA, '≥ 10× aio-pika', 10.0, False))
KINDS = {COMPILED: 'rpcresults', PURE: 'rpcresults', PYAMQP: 'pyamqp', AIOPIKA: 'aiopika'}


class RpcTarget(BenchBase):
    """The P7 case and table."""

    def rpc_once(self, peer: str, count: int, warmup: int) -> Dict[str, Any]:
        label = E2E_LABELS[peer]
        queue = new_queue_name('p7')
        if peer != AIOPIKA:  # as Responder declares it; aio-pika's register() declares its own
            self.broker.channel.queue_declare(queue=queue, durable=True, auto_delete=False)
        prefetch = str(self.args.p7_prefetch)
        timeout = max(60.0, count / 200)
        if peer == C:
            assert self.c_rpc_binary is not None
            responder = Child(c_argv([self.c_rpc_binary, 'echo'], self.url, queue, prefetch),
                              label=f'{label} (echo)')
        else:
            responder = python_peer('rpc-responder', {'url': self.url, 'kind': KINDS[peer], 'queue': queue,
                                                      'prefetch': prefetch},
                                    pure=(peer == PURE), label=f'{label} (responder)')
        client: Optional[Child] = None
        queues = [queue]
        try:
            ready = responder_ready = responder.expect('ready', 120)
            self._check_impl(peer, ready)
            if peer == C:
                client = Child(c_argv([self.c_rpc_binary, 'client'], self.url, queue, str(count), str(warmup)),
                               label=f'{label} (client)')
            else:
                client = python_peer('rpc-client', {'url': self.url, 'kind': KINDS[peer], 'queue': queue,
                                                    'count': count, 'warmup': warmup, 'timeout': timeout},
                                     pure=(peer == PURE), label=f'{label} (client)')
            ready = client.expect('ready', 120)
            queues.append(ready.get('queue'))
            self._check_impl(peer, ready)
            client.send('go')
            done = client.expect('done', timeout + 30)
            if not done.get('ok'):
                raise PeerFailed(f'{label}: answers were wrong or missing ({done.get("wrong", "?")} wrong)')
            if done.get('count') != count:
                raise PeerFailed(f"{label}: {done.get('count')} answers of {count}")
            client.finish()
            responder.close_stdin()
            done['responder'] = served = responder.expect('done', 30)
            done['rate'] = count / done['wall']
            done['cpu_us'] = done['cpu'] / count * 1e6
            # the responder's CPU from ready to done, over every request it answered (warm-up included)
            done['responder_cpu_us'] = (served['cpu'] - responder_ready['cpu']) / max(1, served['served']) * 1e6
            return done
        finally:
            if client is not None:
                client.finish()
            responder.finish()
            for name in queues:
                self.broker.delete(name)

    def run_p7(self) -> None:
        count, rounds = self.args.p7_count, self.args.p7_rounds
        warmup = min(200, max(10, count // 100))
        peers = self.selected(self.rpc_peers() + [PYAMQP] + ([C] if self.c_rpc_binary else []) + [AIOPIKA])
        runs: Dict[str, List[Dict[str, Any]]] = {peer: [] for peer in peers}
        errors: Dict[str, str] = {}
        for round_ in range(1, rounds + 1):
            shift = (round_ - 1) % len(peers) if peers else 0
            for peer in peers[shift:] + peers[:shift]:
                if peer in errors:
                    continue
                try:
                    done = self.rpc_once(peer, count, warmup)
                except Exception as exc:
                    errors[peer] = self.fail('P7', peer, exc, E2E_LABELS)
                    continue
                runs[peer].append(done)
                log(f"[P7 {round_}/{rounds}] {E2E_LABELS[peer]}: {num(done['rate'])} calls/s, "
                    f"{done['wall']:.3f} s for {num(count)} calls, {done['cpu_us']:.1f} µs client CPU/call, "
                    f"responder {done['responder_cpu_us']:.1f} µs/call")
        summary = {}
        for peer, done in runs.items():
            if done:
                summary[peer] = {'rate': median([r['rate'] for r in done]),
                                 'rate_min': min(r['rate'] for r in done),
                                 'rate_max': max(r['rate'] for r in done),
                                 'cpu_us': median([r['cpu_us'] for r in done]),
                                 'responder_cpu_us': median([r['responder_cpu_us'] for r in done])}
        self.raw['P7'] = {'count': count, 'warmup': warmup, 'rounds': rounds, 'prefetch': self.args.p7_prefetch,
                          'runs': runs, 'summary': summary, 'errors': errors}

    def _p7_value(self, peer: str) -> str:
        data = self.raw['P7']
        s = data['summary'].get(peer)
        if s is None:
            if peer == C and not self.c_rpc_binary:
                return self.c_rpc_note
            return self.missing(peer, data['errors'])
        spread = f" ({num(s['rate_min'])}-{num(s['rate_max'])})" if data['rounds'] > 1 else ''
        return (f"{num(s['rate'])} calls/s{spread}, CPU/call: client {s['cpu_us']:.1f} µs, "
                f"responder {s['responder_cpu_us']:.1f} µs")

    def table_p7(self) -> str:
        data = self.raw['P7']
        summary = data['summary']
        rows: List[List[str]] = []
        for peer in (COMPILED, PURE):
            label = E2E_LABELS[peer]
            if peer == COMPILED and not self.ext:
                rows.append([label, self.not_built, 'n/a', VERSUS[0][1], 'n/a'])
                continue
            for number, (other, target, bound, as_percent) in enumerate(VERSUS):
                if peer in summary and other in summary:
                    ratio = summary[peer]['rate'] / summary[other]['rate']
                    shown = ratio_text(ratio, other_name(other), as_percent)
                    ok: Optional[bool] = ratio >= bound if peer == COMPILED else None
                else:
                    shown, ok = f'n/a vs {other_name(other)}', None
                if peer == COMPILED and peer in data['errors']:
                    ok = False
                rows.append([label if number == 0 else '', self._p7_value(peer) if number == 0 else '', shown,
                             target if peer == COMPILED else f'({target}: compiled only)',
                             met(ok) if peer == COMPILED else 'n/a'])
        for peer in (PYAMQP, C, AIOPIKA):
            rows.append([E2E_LABELS[peer], self._p7_value(peer), 'reference', '', ''])
        notes = [f"{num(data['count'])} calls in flight per round after {data['warmup']} warm-up calls, median of "
                 f"{data['rounds']} round(s) (min-max); one client and one responder process per pair, the responder "
                 f"consuming with prefetch {data['prefetch']} and acking each request after its reply;",
                 'timed from the first request published to the last answer received; CPU = user+system of the '
                 'client process over that section, and of the responder from its ready to its end (warm-up included);',
                 'rpcresults: Client(app).call(queue, i) for all i, then ResultSet(results).join_native(); '
                 'Responder(app, queue, echo) answering in Celery\'s format;',
                 'py-amqp: the same request messages (JSON, delivery_mode 2) by basic_publish, replies by '
                 'basic_consume (acks every 256, json.loads); its echo json.loads each request and publishes a '
                 'Celery-format reply;',
                 'C: rabbitmq-c, same requests; its echo republishes the body verbatim (no JSON decoded anywhere);',
                 'aio-pika: patterns.RPC with its defaults (pickle, publisher confirms, transient requests), '
                 'asyncio.gather of N rpc.call().']
        return table(f"P7  end-to-end RPC: one client, {num(data['count'])} calls in flight, one echo responder",
                     HEADERS, rows, notes)
