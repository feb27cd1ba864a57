"""P6: worker publish. One process publishes N results in Celery's exact format to a reply queue.

Peers, each in its own process (``python -m bench.peers worker CONFIG``):

- rpcresults compiled / pure: ``app.backend.mark_as_done(task_id, value, request={'reply_to': q,
  'correlation_id': task_id})`` (``RPCBackend``, publishing through its ``ResultPublisher``);
- raw py-amqp: per result the meta dict (``date_done`` now), ``json.dumps``, an ``amqp.Message`` with
  Celery's properties (content_type application/json, content_encoding utf-8, application_headers {},
  delivery_mode 1, priority 0, correlation_id), ``basic_publish`` to the default exchange;
- Celery's ``rpc://`` backend: ``app.backend.mark_as_done(task_id, value, request=...)`` with a
  request object carrying what ``RPCBackend.store_result`` reads (reply_to, correlation_id, children,
  group, parent_id, ignore_result, chord).

Each process connects and publishes ``warmup`` results first; then the clock runs from the first
measured publish until a passive ``queue_declare`` on a second connection (opened beforehand) counts
all of them in the queue (polled every millisecond, bounded), so data still buffered on the client
or in flight is not counted as done. CPU is the publishing process's user+system time over the same
section. The runner checks the wire format of the first message of every case, then deletes the queue.
"""
from __future__ import annotations

import gc
import json
import time
import types
from datetime import datetime, timezone
from typing import Any, Callable, Dict, List, Tuple

import amqp

from bench.common import amqp_connect, cpu_seconds, emit, new_queue_name, task_ids
from bench.core import BenchBase
from bench.peers import _celery_app, implementation, wait_go
from bench.proc import log, python_peer
from bench.report import (CELERY, COMPILED, HEADERS, PUBLISH_LABELS, PURE, PYAMQP, median, met, num,
                          table)

#: Targets: compiled rate ≥ 5× raw py-amqp and CPU ≤ 8 µs per result; pure rate ≥ 1.5× raw py-amqp.
COMPILED_RATE, COMPILED_CPU_US, PURE_RATE = 5.0, 8.0, 1.5
#: The body keys and properties Celery's rpc:// backend sends (checked on the first message of a case).
META_KEYS = ['status', 'result', 'traceback', 'children', 'date_done', 'task_id']
PROPERTIES = {'content_type': 'application/json', 'content_encoding': 'utf-8', 'application_headers': {},
              'delivery_mode': 1, 'priority': 0}


# -- the peer (runs in its own process) --------------------------------------------------------
Publish = Callable[[int, int], None]


def _raw_publisher(url: str, queue: str, ids: List[str]) -> Tuple[Publish, Callable[[], None]]:
    """Raw py-amqp: what a hand-written worker does per result."""
    connection = amqp_connect(url)
    basic_publish = connection.channel().basic_publish
    Message, dumps, now, utc = amqp.Message, json.dumps, datetime.now, timezone.utc

    def publish(first: int, last: int) -> None:
        for index in range(first, last):
            task_id = ids[index]
            meta = {'status': 'SUCCESS', 'result': index, 'traceback': None, 'children': [],
                    'date_done': now(utc).isoformat(), 'task_id': task_id}
            basic_publish(Message(dumps(meta).encode('utf-8'), content_type='application/json',
                                  content_encoding='utf-8', application_headers={}, delivery_mode=1,
                                  priority=0, correlation_id=task_id),
                          exchange='', routing_key=queue)

    return publish, connection.close


def _publisher(kind: str, url: str, queue: str, ids: List[str],
               extra: Dict[str, Any]) -> Tuple[Publish, Callable[[], None]]:
    """``(publish(first, last), close())`` for ``kind``: publishes results ``first .. last-1``."""
    if kind == 'pyamqp':
        return _raw_publisher(url, queue, ids)
    if kind == 'rpcresults':
        import rpcresults
        app: Any = rpcresults.App(url)
        requests: List[Any] = [{'reply_to': queue, 'correlation_id': task_id} for task_id in ids]
        extra.update(implementation())
    elif kind == 'celery':
        app = _celery_app(url)
        requests = [types.SimpleNamespace(reply_to=queue, correlation_id=task_id, children=[], group=None,
                                          parent_id=None, ignore_result=False, chord=None) for task_id in ids]
    else:
        raise SystemExit(f'unknown worker kind {kind!r}')
    backend = app.backend
    mark = backend.mark_as_done

    def publish(first: int, last: int) -> None:
        for index in range(first, last):
            mark(ids[index], index, request=requests[index])

    def close() -> None:
        if hasattr(backend, 'worker_stats'):
            extra['stats'] = backend.worker_stats()
        app.close()

    return publish, close


def role_worker(config: Dict[str, Any]) -> None:
    """Publish ``warmup`` results, then (after ``go``) ``count`` more, timed until the broker has all."""
    kind, url, queue = config['kind'], config['url'], config['queue']
    count, warmup = config['count'], config['warmup']
    ids = task_ids(config['seed'], warmup + count)
    extra: Dict[str, Any] = {}
    publish, close = _publisher(kind, url, queue, ids, extra)
    probe = amqp_connect(url)
    probe_channel = probe.channel()

    def depth() -> int:
        return probe_channel.queue_declare(queue=queue, passive=True).message_count

    publish(0, warmup)  # connects, and warms up whatever the first publish sets up
    gc.collect()
    emit({'event': 'ready', 'queue': queue, **extra})
    wait_go()
    expected = warmup + count
    wait = float(config.get('timeout', 60))
    cpu0 = cpu_seconds()
    t0 = time.perf_counter()
    publish(warmup, expected)
    loop_wall, loop_cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    deadline = time.monotonic() + wait
    held = depth()
    while held < expected and time.monotonic() < deadline:
        time.sleep(0.001)
        held = depth()
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    close()
    probe.close()
    if held < expected:
        raise RuntimeError(f'the queue holds {held} of {expected} results {wait:.0f} s after the last publish')
    emit({'event': 'done', 'kind': kind, 'count': count, 'warmup': warmup, 'wall': wall, 'cpu': cpu,
          'loop_wall': loop_wall, 'loop_cpu': loop_cpu, 'held': held, **extra})


# -- the runner's side -------------------------------------------------------------------------
def format_problems(message: Any, task_id: str) -> List[str]:
    """How a published result differs from Celery's rpc:// format (empty when it does not)."""
    problems = []
    try:
        meta = json.loads(message.body)
    except ValueError:
        return ['the body is not JSON']
    if list(meta) != META_KEYS:
        problems.append(f'body keys {list(meta)}')
    if meta.get('status') != 'SUCCESS' or meta.get('result') != 0 or meta.get('task_id') != task_id:
        problems.append('status/result/task_id')
    props = message.properties
    for key, value in dict(PROPERTIES, correlation_id=task_id).items():
        if props.get(key) != value:
            problems.append(f'{key}={props.get(key)!r}')
    extra = sorted(set(props) - set(PROPERTIES) - {'correlation_id'})
    if extra:
        problems.append(f"extra properties {', '.join(extra)}")
    return problems


class PublishTarget(BenchBase):
    """The P6 case and table."""

    def worker_once(self, peer: str, count: int, warmup: int) -> Dict[str, Any]:
        seed = self._next_seed()
        queue = new_queue_name('p6')
        self.broker.channel.queue_declare(queue=queue, durable=True, auto_delete=False)
        kind = {COMPILED: 'rpcresults', PURE: 'rpcresults', CELERY: 'celery', PYAMQP: 'pyamqp'}[peer]
        child = python_peer('worker', {'url': self.url, 'kind': kind, 'queue': queue, 'seed': seed,
                                       'count': count, 'warmup': warmup, 'timeout': 60},
                            pure=(peer == PURE), label=PUBLISH_LABELS[peer])
        try:
            self._check_impl(peer, child.expect('ready', 120))
            child.send('go')
            done = child.expect('done', 120 + count / 500)
            child.finish()
            first = self.broker.channel.basic_get(queue, no_ack=True)
            done['format_problems'] = ['no message in the queue'] if first is None else \
                format_problems(first, task_ids(seed, 1)[0])
            done['rate'] = count / done['wall']
            done['cpu_us'] = done['cpu'] / count * 1e6
            return done
        finally:
            child.finish()
            self.broker.delete(queue)

    def run_p6(self) -> None:
        count, rounds, warmup = self.args.p6_count, self.args.p6_rounds, 20
        peers = self.selected(self.rpc_peers() + [PYAMQP, CELERY])
        runs: Dict[str, List[Dict[str, Any]]] = {peer: [] for peer in peers}
        errors: Dict[str, str] = {}
        for round_ in range(1, rounds + 1):
            shift = (round_ - 1) % len(peers) if peers else 0
            for peer in peers[shift:] + peers[:shift]:
                if peer in errors:
                    continue
                try:
                    done = self.worker_once(peer, count, warmup)
                except Exception as exc:
                    errors[peer] = self.fail('P6', peer, exc, PUBLISH_LABELS)
                    continue
                runs[peer].append(done)
                if done['format_problems']:
                    log(f"[P6] note: {PUBLISH_LABELS[peer]} differs from Celery's format: "
                        f"{'; '.join(done['format_problems'])}")
                log(f"[P6 {round_}/{rounds}] {PUBLISH_LABELS[peer]}: {num(done['rate'])} results/s, "
                    f"{done['cpu_us']:.1f} µs CPU/result ({done['wall']:.3f} s, the publish loop "
                    f"{done['loop_wall']:.3f} s)")
        summary = {}
        for peer, done in runs.items():
            if done:
                summary[peer] = {'rate': median([r['rate'] for r in done]),
                                 'rate_min': min(r['rate'] for r in done),
                                 'rate_max': max(r['rate'] for r in done),
                                 'cpu_us': median([r['cpu_us'] for r in done]),
                                 'format_problems': sorted({p for r in done for p in r['format_problems']})}
        self.raw['P6'] = {'count': count, 'warmup': warmup, 'rounds': rounds, 'runs': runs,
                          'summary': summary, 'errors': errors}

    def table_p6(self) -> str:
        data = self.raw['P6']
        summary, errors = data['summary'], data['errors']
        ref = summary.get(PYAMQP)
        rows: List[List[str]] = []

        def value(s: Dict[str, Any]) -> str:
            spread = f" ({num(s['rate_min'])}-{num(s['rate_max'])})" if data['rounds'] > 1 else ''
            return f"{num(s['rate'])} results/s{spread}, {s['cpu_us']:.1f} µs CPU/result"

        checks: Dict[str, List[tuple]] = {
            COMPILED: [('rate', f'≥ {COMPILED_RATE:g}× py-amqp', lambda s: s['rate'] / ref['rate'] >= COMPILED_RATE),
                       ('cpu', f'≤ {COMPILED_CPU_US:g} µs CPU/result', lambda s: s['cpu_us'] <= COMPILED_CPU_US)],
            PURE: [('rate', f'≥ {PURE_RATE:g}× py-amqp', lambda s: s['rate'] / ref['rate'] >= PURE_RATE)],
            CELERY: [('rate', '', None)],
        }
        for peer in (COMPILED, PURE, CELERY, PYAMQP):
            label, s = PUBLISH_LABELS[peer], summary.get(peer)
            if peer == PYAMQP:
                rows.append([label, value(s) if s else self.missing(peer, errors), 'reference', '', ''])
                continue
            first_target = checks[peer][0][1]
            unavailable = self.unavailable_row(label, peer, s, errors, first_target)
            if unavailable is not None:
                rows.append(unavailable)
                continue
            for number, (what, target, check) in enumerate(checks[peer]):
                if what == 'rate':
                    shown = f"{s['rate'] / ref['rate']:.2f}× py-amqp" if ref else 'n/a vs py-amqp'
                else:
                    shown = f"CPU {s['cpu_us'] / ref['cpu_us']:.2f}× py-amqp's" if ref else 'n/a'
                needs_ref = what == 'rate'
                ok = None if check is None or (needs_ref and not ref) else check(s)
                rows.append([label if number == 0 else '', value(s) if number == 0 else '', shown, target,
                             met(ok) if target else ''])
        wrong = {peer: s['format_problems'] for peer, s in summary.items() if s['format_problems']}
        notes = [f"{num(data['count'])} results per round after {data['warmup']} warm-up ones, median of "
                 f"{data['rounds']} round(s) (min-max in brackets), every peer in its own process, connected before "
                 'the clock;',
                 'timed until a passive queue_declare on a second connection counts all of them in the queue; CPU = '
                 'user+system of the publishing process over that section;',
                 'py-amqp: per result a meta dict, json.dumps, amqp.Message with Celery\'s properties, basic_publish; '
                 'rpcresults: backend.mark_as_done(task_id, value, request={reply_to, correlation_id});',
                 "celery: app.backend.mark_as_done with a request object (rpc://); wire format checked on each "
                 "case's first message: " + ('all as Celery\'s.' if not wrong else
                                             '; '.join(f"{PUBLISH_LABELS[p]} differs ({', '.join(v)})"
                                                       for p, v in wrong.items()))]
        return table(f"P6  worker publish: one process publishes {num(data['count'])} results (Celery format) "
                     'to a reply queue', HEADERS, rows, notes)

