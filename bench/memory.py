"""P4: bytes per pending result (objects, then registration), tracemalloc and RSS, in a peer process.

``role_pending`` is the peer (``python -m bench.peers pending CONFIG``); ``MemoryTarget`` runs it.
"""
from __future__ import annotations

import gc
import sys
import time
import uuid
from typing import Any, Dict, List

from bench.common import emit, peak_rss_bytes, rss_bytes, task_ids
from bench.core import BenchBase
from bench.peers import _celery_app, implementation
from bench.proc import log, python_peer
from bench.report import CELERY, COMPILED, LABELS, PURE, met, num, table


# -- the peer (runs in its own process) --------------------------------------------------------
def role_pending(config: Dict[str, Any]) -> None:
    """Memory of ``count`` pending results: objects, registration, peak during a (timed-out) join."""
    import tracemalloc
    kind, mode, url, count = config['kind'], config['mode'], config['url'], config['count']
    ids = task_ids(config['seed'], count)
    warm_id = str(uuid.uuid4())
    extra: Dict[str, Any] = {}
    if kind == 'rpcresults':
        import rpcresults
        from rpcresults import ResultSet
        from rpcresults.exceptions import TimeoutError as JoinTimeout
        app = rpcresults.App(url)
        backend = app.backend
        # Warm-up: connect and consume (one result), so the connection is not counted below.
        ResultSet([app.AsyncResult(warm_id)], app=app).ready()
        make = app.AsyncResult
        extra.update(implementation())

        def register(members: List[Any]) -> Any:
            results = ResultSet(members, app=app)
            results.backend.add_pending_results(results.results)
            # Whether the documented registration call tracked anything (it is what Celery's
            # iter_native uses); ready() once is the path that surely does.
            extra['add_pending_results_tracked'] = backend.stats().get('tracked')
            results.ready()
            extra['tracked_after_ready'] = backend.stats().get('tracked')
            return results
    elif kind == 'celery':
        from celery.exceptions import TimeoutError as JoinTimeout  # type: ignore[no-redef]
        from celery.result import ResultSet  # type: ignore[no-redef]
        app = _celery_app(url)
        backend = app.backend
        warm = app.AsyncResult(warm_id)
        backend.add_pending_results([warm])  # starts Celery's consumer (its reply queue)
        backend.remove_pending_result(warm)
        make = app.AsyncResult

        def register(members: List[Any]) -> Any:
            results = ResultSet(members, app=app)  # registers its members already (vine barrier)
            results.backend.add_pending_results(results.results)
            return results
    else:
        raise SystemExit(f'unknown pending kind {kind!r}')
    queue = backend.oid

    def collect() -> None:
        gc.collect()
        gc.collect()

    if mode == 'tracemalloc':
        tracemalloc.start()

        def measure() -> int:
            return tracemalloc.get_traced_memory()[0]

        def peak() -> int:
            return tracemalloc.get_traced_memory()[1]

        def reset_peak() -> None:
            tracemalloc.reset_peak()
    else:
        measure = rss_bytes
        peak = peak_rss_bytes

        def reset_peak() -> None:
            pass
    collect()
    base = measure()
    members = [make(task_id) for task_id in ids]
    collect()
    objects = measure() - base
    results = register(members)
    collect()
    registered = measure() - base
    reset_peak()
    before_join = measure()
    join_timeout = float(config.get('join_timeout', 0.3))
    t0 = time.perf_counter()
    try:
        results.join_native(timeout=join_timeout)
        timed_out = False
    except JoinTimeout:
        timed_out = True
    join_wall = time.perf_counter() - t0
    join_peak = peak() - base if mode == 'tracemalloc' else None
    collect()
    after_timeout = measure() - base
    del results, members
    collect()
    after_release = measure() - base
    if mode == 'tracemalloc':
        tracemalloc.stop()
    emit({'event': 'done', 'kind': kind, 'mode': mode, 'count': count, 'queue': queue,
          'objects': objects, 'registered': registered, 'join_peak': join_peak,
          'join_start': before_join - base, 'after_timeout': after_timeout,
          'after_release': after_release, 'timed_out': timed_out, 'join_wall': join_wall,
          'id_size': sys.getsizeof(ids[0]), **extra})
    try:
        if kind == 'rpcresults':
            app.close()
        else:
            backend.result_consumer.stop()
    except Exception:
        pass


class MemoryTarget(BenchBase):
    """The P4 case and table."""

    def run_p4(self) -> None:
        count = self.args.p4_count
        peers = self.selected(self.rpc_peers() + [CELERY])
        results: Dict[str, Dict[str, Any]] = {}
        errors: Dict[str, str] = {}
        for peer in peers:
            kind = 'celery' if peer == CELERY else 'rpcresults'
            per_mode: Dict[str, Any] = {}
            try:
                for mode in ('tracemalloc', 'rss'):
                    child = python_peer('pending', {'url': self.url, 'kind': kind, 'mode': mode, 'count': count,
                                                    'seed': self._next_seed()},
                                        pure=(peer == PURE), label=LABELS[peer])
                    done = None
                    try:
                        done = child.expect('done', 300)
                    finally:
                        child.finish()
                        if done is not None:
                            self.broker.delete(done.get('queue'))
                    if peer != CELERY:
                        self._check_impl(peer, done)
                    per_mode[mode] = done
            except Exception as exc:
                errors[peer] = self.fail('P4', peer, exc)
                continue
            tm, rss = per_mode['tracemalloc'], per_mode['rss']
            r = {
                'count': count, 'id_size': tm['id_size'],
                'objects': tm['objects'] / count, 'registered': tm['registered'] / count,
                'join_peak': tm['join_peak'] / count, 'after_timeout': tm['after_timeout'] / count,
                'after_release': tm['after_release'] / count,
                'rss_registered': rss['registered'] / count, 'rss_after_timeout': rss['after_timeout'] / count,
                'add_pending_results_tracked': tm.get('add_pending_results_tracked'),
                'tracked_after_ready': tm.get('tracked_after_ready'),
                'raw': per_mode,
            }
            results[peer] = r
            log(f"[P4] {LABELS[peer]}: {r['registered']:.0f} B/pending result (tracemalloc: "
                f"{r['objects']:.0f} objects + {r['registered'] - r['objects']:.0f} registration), "
                f"RSS {r['rss_registered']:.0f} B, peak in a join {r['join_peak']:.0f} B")
        self.raw['P4'] = {'count': count, 'results': results, 'errors': errors}

    def table_p4(self) -> str:
        data = self.raw['P4']
        rows = []
        celery = data['results'].get(CELERY)
        for peer in (COMPILED, PURE, CELERY):
            target = '≤ 300 B' if peer != CELERY else ''
            r = data['results'].get(peer)
            unavailable = self.unavailable_row(LABELS[peer], peer, r, data['errors'], target)
            if unavailable is not None:
                rows.append(unavailable)
                continue
            worst = max(r['registered'], r['rss_registered'])
            value = (f"{r['registered']:.0f} B/result (objects {r['objects']:.0f} + registration "
                     f"{r['registered'] - r['objects']:.0f}; RSS {r['rss_registered']:.0f}; "
                     f"join peak {r['join_peak']:.0f}; after timed-out join {r['after_timeout']:.0f})")
            ratio = 'reference' if peer == CELERY else (
                f"{r['registered'] / celery['registered'] * 100:.1f} % of celery's" if celery else 'n/a')
            rows.append([LABELS[peer], value, ratio, target, met(worst <= 300) if target else ''])
        id_size = next((r['id_size'] for r in data['results'].values()), 85)
        notes = [f"{num(data['count'])} pending results: AsyncResult objects ('objects'), then a ResultSet of them, "
                 "backend.add_pending_results(rs.results) and, for rpcresults, rs.ready() once ('registration');",
                 f'bytes above the id strings themselves (created before the baseline; {id_size} B each, '
                 'not counted); tracemalloc, RSS in a second process;',
                 "'join peak' = tracemalloc peak during a join_native(timeout=0.3) that times out; "
                 "'met?' uses the larger of tracemalloc and RSS."]
        for peer in (COMPILED, PURE):
            r = data['results'].get(peer)
            if r and r.get('add_pending_results_tracked') is not None \
                    and r['add_pending_results_tracked'] < data['count']:
                notes.append(f"{LABELS[peer]}: stats()['tracked'] was {num(r['add_pending_results_tracked'])} "
                             f"after backend.add_pending_results() of {num(data['count'])} results, "
                             f"{num(r['tracked_after_ready'] or 0)} after rs.ready().")
        return table(f"P4  memory per pending result ({num(data['count'])} pending)",
                     ('peer', 'value', 'ratio', 'target', 'met?'), rows, notes)

