"""The plain benchmark runner: the performance targets P1-P5, every peer measured in one run, ratios of that run.

    python -m bench [--broker URL] [--count N] [--quick] [--only P1,P2,...] [--json PATH]
    python bench/run.py ...

Each peer runs in its own subprocess (``bench/peers.py``): rpcresults compiled (when the extension
is importable), rpcresults pure (``RPCRESULTS_NO_EXTENSIONS=1``), Celery's ``rpc://`` backend, a raw
py-amqp loop and, for P1, a C consumer on rabbitmq-c (compiled here when ``librabbitmq-dev`` is
installed). One progress line per case goes to stderr; the tables go to stdout at the end.
Absolute numbers are noise on a shared 2-core machine; the ratios are what the targets are about.

Exit status: 0 when every case ran (whether or not its target was met), 1 when a case failed.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import queue as queue_mod
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from typing import Any, Dict, List, Optional, Sequence, Tuple

if __package__ in (None, ''):  # ``python bench/run.py``
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import (BENCH_DIR, DEFAULT_BROKER, REPO_ROOT, Broker,  # noqa: E402
                          broker_params, new_queue_name, task_ids)

TARGETS = ('P1', 'P2', 'P3', 'P4', 'P5')
C_SOURCE = os.path.join(BENCH_DIR, 'c_consumer.c')
C_BINARY = os.path.join(BENCH_DIR, 'c_consumer')

# Peer keys and their labels in the tables.
COMPILED, PURE, CELERY, PYAMQP, C = 'compiled', 'pure', 'celery', 'pyamqp', 'c'
#: Celery's own app and ResultSet with result_backend = 'rpcresults.contrib.celery:RPCBackend'.
CELERY_RPCR = 'celery-rpcresults'
LABELS = {
    COMPILED: 'rpcresults compiled',
    PURE: 'rpcresults pure',
    CELERY: "celery rpc://",
    CELERY_RPCR: 'Celery + rpcresults backend',
    PYAMQP: 'py-amqp basic_consume',
    C: 'C rabbitmq-c',
}
RTT_LABELS = dict(LABELS, pyamqp='py-amqp round trip')


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- subprocesses ------------------------------------------------------------------------------
class PeerFailed(RuntimeError):
    """A peer subprocess reported an error, died, or did not answer in time."""


class Child:
    """A peer subprocess speaking JSON lines on stdout and reading ``go`` on stdin."""

    def __init__(self, argv: Sequence[str], env: Optional[Dict[str, str]] = None, label: str = '') -> None:
        self.label = label or argv[0]
        self._stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._stderr, env=env, cwd=REPO_ROOT, text=True, bufsize=1)
        self._lines: 'queue_mod.Queue[Optional[str]]' = queue_mod.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def stderr_tail(self, limit: int = 2000) -> str:
        self._stderr.seek(0)
        text = self._stderr.read().decode('utf-8', 'replace')
        return text[-limit:].strip()

    def expect(self, event: str, timeout: float) -> Dict[str, Any]:
        """The next message whose ``event`` is ``event`` (an ``error`` message raises)."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.kill()
                raise PeerFailed(f'{self.label}: no "{event}" within {timeout:.0f} s')
            try:
                line = self._lines.get(timeout=remaining)
            except queue_mod.Empty:
                continue
            if line is None:
                self.proc.wait(timeout=10)
                raise PeerFailed(f'{self.label}: exited ({self.proc.returncode}) before "{event}": '
                                 f'{self.stderr_tail(600)}')
            try:
                message = json.loads(line)
            except ValueError:
                continue  # something printed by a library: not ours
            if message.get('event') == 'error':
                raise PeerFailed(f"{self.label}: {message.get('error')}")
            if message.get('event') == event:
                return message

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + '\n')
        self.proc.stdin.flush()

    def close_stdin(self) -> None:
        try:
            if self.proc.stdin is not None and not self.proc.stdin.closed:
                self.proc.stdin.close()
        except OSError:
            pass

    def finish(self, timeout: float = 30.0) -> None:
        self.close_stdin()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def peer_env(pure: bool) -> Dict[str, str]:
    env = dict(os.environ)
    env.pop('RPCRESULTS_NO_EXTENSIONS', None)
    if pure:
        env['RPCRESULTS_NO_EXTENSIONS'] = '1'
    path = env.get('PYTHONPATH')
    env['PYTHONPATH'] = REPO_ROOT + (os.pathsep + path if path else '')
    env['PYTHONUNBUFFERED'] = '1'
    return env


def python_peer(role: str, config: Dict[str, Any], pure: bool = False, label: str = '') -> Child:
    return Child([sys.executable, '-m', 'bench.peers', role, json.dumps(config)], env=peer_env(pure),
                 label=label or role)


# -- environment -------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or 'unknown'


def extension_importable() -> Tuple[bool, str]:
    """``rpcresults.USING_EXTENSION`` in a fresh interpreter without ``RPCRESULTS_NO_EXTENSIONS``."""
    code = 'import json, rpcresults; print(json.dumps(bool(rpcresults.USING_EXTENSION)))'
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                          env=peer_env(pure=False), cwd=REPO_ROOT, timeout=120)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ['?'])[-1]
        return False, f'no (rpcresults does not import: {last})'
    using = json.loads(proc.stdout.strip().splitlines()[-1])
    return using, ('yes' if using else 'no (rpcresults.USING_EXTENSION is False)')


def git_describe() -> str:
    try:
        rev = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True,
                             cwd=REPO_ROOT, timeout=10).stdout.strip()
        dirty = subprocess.run(['git', 'status', '--porcelain', '--', 'rpcresults'], capture_output=True,
                               text=True, cwd=REPO_ROOT, timeout=10).stdout.strip()
        return f"{rev}{' +uncommitted changes in rpcresults/' if dirty else ''}" if rev else 'unknown'
    except (OSError, subprocess.SubprocessError):
        return 'unknown'


def versions() -> Dict[str, str]:
    found = {'python': platform.python_version()}
    for name in ('kombu', 'amqp', 'celery', 'rpcresults'):
        try:
            module = __import__(name)
            found[name] = getattr(module, '__version__', '?')
        except Exception as exc:  # shown in the header
            found[name] = f'not importable ({type(exc).__name__})'
    return found


def build_c_consumer() -> Tuple[Optional[str], str]:
    """``(path, note)``: the C consumer binary (built when needed), or None and why not."""
    cc = shutil.which(os.environ.get('CC', 'cc')) or shutil.which('gcc') or shutil.which('clang')
    if cc is None:
        return None, 'n/a: no C compiler'
    if not (os.path.exists('/usr/include/amqp.h') or os.path.exists('/usr/include/rabbitmq-c/amqp.h')
            or os.path.exists('/usr/local/include/amqp.h')
            or os.path.exists('/usr/local/include/rabbitmq-c/amqp.h')):
        return None, 'n/a: librabbitmq-dev is not installed (apt-get install librabbitmq-dev)'
    if os.path.exists(C_BINARY) and os.path.getmtime(C_BINARY) >= os.path.getmtime(C_SOURCE):
        return C_BINARY, 'built'
    with tempfile.TemporaryDirectory(prefix='rpcresults-bench-build-') as build:
        out = os.path.join(build, 'c_consumer')
        proc = subprocess.run([cc, '-O2', C_SOURCE, '-lrabbitmq', '-o', out], capture_output=True,
                              text=True, timeout=120)
        if proc.returncode != 0:
            return None, f'n/a: the C consumer did not compile: {proc.stderr.strip()[-300:]}'
        staged = f'{C_BINARY}.{os.getpid()}.tmp'
        shutil.copy2(out, staged)
        os.replace(staged, C_BINARY)  # atomic: a concurrent run never sees half a binary
    return C_BINARY, 'built (bench/c_consumer)'


def mask(url: str) -> str:
    params = broker_params(url)
    return url.replace(f":{params['password']}@", ':***@', 1) if params['password'] else url


# -- tables ------------------------------------------------------------------------------------
def table(title: str, headers: Sequence[str], rows: Sequence[Sequence[str]], notes: Sequence[str] = ()) -> str:
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))

    def fmt(row: Sequence[str]) -> str:
        return '  '.join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip()

    lines = [title, fmt(headers), '  '.join('-' * w for w in widths)]
    lines.extend(fmt(row) for row in rows)
    lines.extend(f'  {note}' for note in notes)
    return '\n'.join(lines)


def num(value: float, digits: int = 0) -> str:
    return f'{value:,.{digits}f}'


def met(ok: Optional[bool]) -> str:
    return 'n/a' if ok is None else ('yes' if ok else 'NO')


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float('nan')


# -- the cases ---------------------------------------------------------------------------------
class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.url: str = args.broker
        self.params = broker_params(self.url)
        self.quick: bool = args.quick
        self.failures: List[str] = []
        self.raw: Dict[str, Any] = {}
        self.broker = Broker(self.url)
        self.ext, self.ext_note = extension_importable()
        self.not_built = 'not built: ' + self.ext_note[len('no ('):-1] if self.ext_note.startswith('no (') \
            else f'not built ({self.ext_note})'
        self.has_celery = importlib.util.find_spec('celery') is not None
        self.c_binary: Optional[str] = None
        self.c_note = 'not needed'
        self.seed = int(time.time() * 1000) & 0xFFFFFFFF
        self.started = datetime.now(timezone.utc)

    # -- helpers -------------------------------------------------------------------------------
    def rpc_peers(self) -> List[str]:
        return ([COMPILED] if self.ext else []) + [PURE]

    def selected(self, peers: List[str]) -> List[str]:
        return [peer for peer in peers if peer in self.args.peer_set
                and (peer not in (CELERY, CELERY_RPCR) or self.has_celery)]

    def missing(self, peer: str, errors: Dict[str, str]) -> str:
        """What a row says for a peer without a measurement."""
        if peer in errors:
            return f'FAILED: {errors[peer][:60]}'
        if peer in (CELERY, CELERY_RPCR) and not self.has_celery:
            return 'n/a: celery is not installed'
        if peer not in self.args.peer_set:
            return 'n/a: not selected (--peers)'
        if peer == C and not self.c_binary:
            return self.c_note
        return 'n/a'

    def _next_seed(self) -> int:
        self.seed += 1
        return self.seed

    def fail(self, case: str, peer: str, exc: BaseException) -> str:
        message = f'{case} {LABELS.get(peer, peer)}: {exc}'
        self.failures.append(message)
        log(f'[{case}] FAILED {message}')
        return str(exc)

    def header(self) -> str:
        v = versions()
        lines = [
            f"rpcresults bench: {self.started.strftime('%Y-%m-%d %H:%M:%S')} UTC on {socket.gethostname()}",
            f'  CPU        {cpu_model()} ({os.cpu_count()} cores)',
            f'  software   Python {v["python"]}, kombu {v["kombu"]}, amqp {v["amqp"]}, celery {v["celery"]}, '
            f'rpcresults {v["rpcresults"]} (git {git_describe()})',
            f'  broker     {self.broker.server_version()} at {mask(self.url)}',
            f'  compiled   extension importable: {self.ext_note}',
            f'  C consumer {self.c_note}',
            '  Absolute numbers are noise on this machine; ratios are within this one run.',
        ]
        self.raw['env'] = {'date': self.started.isoformat(), 'hostname': socket.gethostname(),
                           'cpu': cpu_model(), 'cores': os.cpu_count(), 'versions': v,
                           'broker': self.broker.server_version(), 'extension': self.ext,
                           'extension_note': self.ext_note, 'c_consumer': self.c_note,
                           'git': git_describe(), 'quick': self.quick}
        return '\n'.join(lines)

    # -- P1 / P2 ---------------------------------------------------------------------------------
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
            p = self.params
            host, _, port = p['host'].rpartition(':')
            child = Child([self.c_binary, host, port, p['userid'], p['password'], p['virtual_host'],
                           raw_queue, str(count)], label=LABELS[C])
        else:
            kind = {COMPILED: 'rpcresults', PURE: 'rpcresults', CELERY: 'celery', CELERY_RPCR: 'celery-rpcresults',
                    PYAMQP: 'pyamqp'}[peer]
            child = python_peer('join', {'url': self.url, 'kind': kind, 'seed': seed, 'count': count,
                                         'queue': raw_queue, 'timeout': timeout},
                                pure=(peer == PURE), label=LABELS[peer])
        queue = raw_queue
        try:
            ready = child.expect('ready', 120)
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

    def _check_impl(self, peer: str, ready: Dict[str, Any]) -> None:
        if peer == COMPILED and not ready.get('using_extension'):
            raise PeerFailed('the compiled peer runs the pure twin (USING_EXTENSION is False)')
        if peer == PURE and ready.get('using_extension'):
            raise PeerFailed('the pure peer runs the extension despite RPCRESULTS_NO_EXTENSIONS=1')
        if peer == CELERY_RPCR and self.ext and not ready.get('using_extension'):
            raise PeerFailed('the Celery drop-in runs the pure twin although the extension is built')

    def run_p1(self) -> None:
        count = self.args.count
        rounds = self.args.rounds
        peers = self.selected(self.rpc_peers() + [CELERY, CELERY_RPCR, PYAMQP] + ([C] if self.c_binary else []))
        runs: Dict[str, List[Dict[str, Any]]] = {peer: [] for peer in peers}
        errors: Dict[str, str] = {}
        for round_ in range(1, rounds + 1):
            # rotate the order each round so no peer always runs first (or last)
            order = peers[round_ - 1:] + peers[:round_ - 1]
            for peer in order:
                if peer in errors:
                    continue
                tag = f'[P1 {round_}/{rounds}] {LABELS[peer]}'
                try:
                    done = self.join_once(peer, count)
                except Exception as exc:
                    errors[peer] = self.fail('P1', peer, exc)
                    continue
                runs[peer].append(done)
                log(f"{tag}: {num(done['rate'])} results/s, {done['wall']:.3f} s wall, "
                    f"{done['cpu_us']:.1f} µs CPU/result, peak RSS {done['peak_rss'] / 2**20:.0f} MiB")
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
        self.raw['P1'] = {'count': count, 'rounds': rounds, 'runs': runs, 'summary': summary,
                          'errors': errors}

    def table_p1(self) -> str:
        data = self.raw['P1']
        summary, errors = data['summary'], data['errors']
        rows: List[List[str]] = []

        def value(peer: str) -> str:
            if peer in summary:
                s = summary[peer]
                spread = (f" ({num(s['rate_min'])}-{num(s['rate_max'])})" if data['rounds'] > 1 else '')
                return f"{num(s['rate'])} results/s{spread}"
            if peer in errors:
                return f'FAILED: {errors[peer][:60]}'
            return self.missing(peer, errors)

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
                    shown = f'{ratio * 100:.0f} % of {other_name(other)}' if as_percent else \
                        f'{ratio:.2f}× {other_name(other)}'
                    ok: Optional[bool] = ratio >= bound if peer == COMPILED else None
                else:
                    shown, ok = f'n/a vs {other_name(other)}', None
                rows.append([LABELS[peer] if first else '', value(peer) if first else '', shown,
                             target if peer == COMPILED else f'({target}: compiled only)', met(ok)])
                first = False
        if CELERY_RPCR in summary and CELERY in summary:
            dropin = f"{summary[CELERY_RPCR]['rate'] / summary[CELERY]['rate']:.2f}× celery"
        else:
            dropin = 'n/a vs celery'
        rows.append([LABELS[CELERY_RPCR], value(CELERY_RPCR), dropin, '', ''])
        for peer in (CELERY, PYAMQP, C):
            if peer == C and not self.c_binary:
                rows.append([LABELS[C], self.c_note, 'reference', '', ''])
                continue
            rows.append([LABELS[peer], value(peer), 'reference', '', ''])
        notes = [f"median of {data['rounds']} round(s) (min-max in brackets); every peer in its own "
                 'subprocess, connecting inside the timed section;',
                 "Celery + rpcresults backend: the celery rpc:// workload (Celery's app, AsyncResult, "
                 "ResultSet.join_native) with result_backend = 'rpcresults.contrib.celery:RPCBackend';",
                 'py-amqp: basic_consume, manual acks (multiple, every 256), json.loads of each body;',
                 'C: rabbitmq-c, same acks, parses frames and properties but NOT the JSON body.']
        return table(f"P1  join_native over {num(data['count'])} results waiting in the reply queue "
                     f'(Celery wire format)', ('peer', 'value', 'ratio', 'target', 'met?'), rows, notes)

    def unavailable_row(self, label: str, peer: str, result: Any, errors: Dict[str, str],
                        target: str) -> Optional[List[str]]:
        """The row of a peer without a result (compiled twin not built, or failed/absent); None otherwise."""
        if peer == COMPILED and not self.ext:
            return [label, self.not_built, 'n/a', target, 'n/a']
        if result is None:
            return [label, self.missing(peer, errors), '', target,
                    ('NO' if peer in errors else 'n/a') if target else '']
        return None

    def table_p2(self) -> str:
        data = self.raw['P1']
        summary, errors = data['summary'], data['errors']
        rows = []
        celery = summary.get(CELERY, {}).get('cpu_us')
        for peer, target, bound in ((COMPILED, '≤ 3 µs', 3.0), (PURE, '≤ 12 µs', 12.0),
                                    (CELERY_RPCR, '', None), (CELERY, '', None), (PYAMQP, '', None),
                                    (C, '', None)):
            if peer == COMPILED and not self.ext:
                rows.append([LABELS[peer], self.not_built, 'n/a', target, 'n/a'])
                continue
            if peer == C and not self.c_binary:
                rows.append([LABELS[C], self.c_note, '', '', ''])
                continue
            if peer not in summary:
                rows.append([LABELS[peer], self.missing(peer, errors), '', target,
                             'NO' if bound and peer in errors else ('n/a' if bound else '')])
                continue
            s = summary[peer]
            ratio = f"{s['cpu_us'] / celery * 100:.1f} % of celery's" if celery and peer != CELERY else \
                ('reference' if peer == CELERY else 'n/a')
            rss = f"peak RSS {s['peak_rss'] / 2**20:.0f} MiB"
            rows.append([LABELS[peer], f"{s['cpu_us']:.2f} µs CPU/result  ({rss})", ratio, target,
                         met(s['cpu_us'] <= bound) if bound else ''])
        return table("P2  client CPU per result (user+system, whole process incl. connecting), same runs as P1",
                     ('peer', 'value', 'ratio', 'target', 'met?'), rows)

    # -- P3 --------------------------------------------------------------------------------------
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

    # -- P4 --------------------------------------------------------------------------------------
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

    # -- P5 --------------------------------------------------------------------------------------
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
                    errors[peer] = self.fail('P5', peer, exc)
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
                        errors[peer] = self.fail('P5', peer, exc)
                        clients.pop(peer).finish()
            for peer, child in list(clients.items()):
                try:
                    child.close_stdin()
                    done = child.expect('done', 60)
                    if done.get('wrong'):
                        raise PeerFailed(f"{done['wrong']} replies had the wrong value")
                except Exception as exc:
                    errors[peer] = self.fail('P5', peer, exc)
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

    # -- all -------------------------------------------------------------------------------------
    def run(self, only: Sequence[str]) -> int:
        if 'P1' in only or 'P2' in only:
            if self.args.no_c:
                self.c_binary, self.c_note = None, 'n/a: --no-c'
            else:
                self.c_binary, self.c_note = build_c_consumer()
            log(f'C consumer: {self.c_note}')
        header = self.header()
        log(f"compiled extension importable: {self.ext_note}; seed {self.seed}")
        tables = []
        try:
            if 'P1' in only or 'P2' in only:
                self.run_p1()
                if 'P1' in only:
                    tables.append(self.table_p1())
                if 'P2' in only:
                    tables.append(self.table_p2())
            if 'P3' in only:
                self.run_p3()
                tables.append(self.table_p3())
            if 'P4' in only:
                self.run_p4()
                tables.append(self.table_p4())
            if 'P5' in only:
                self.run_p5()
                tables.append(self.table_p5())
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
        if self.args.json:
            self.raw['failures'] = self.failures
            with open(self.args.json, 'w') as f:
                json.dump(self.raw, f, indent=1, default=str)
            log(f'raw numbers written to {self.args.json}')
        return 1 if self.failures else 0


def other_name(peer: str) -> str:
    return {CELERY: 'celery', PYAMQP: 'py-amqp', C: 'C'}[peer]


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog='python -m bench', description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--broker', default=DEFAULT_BROKER, help=f'AMQP broker URL (default {DEFAULT_BROKER})')
    parser.add_argument('--count', type=int, default=None, help='results per P1/P2 join (default 10,000)')
    parser.add_argument('--quick', action='store_true', help='small sizes, one round (smoke test)')
    parser.add_argument('--only', default=','.join(TARGETS), help='targets to run, e.g. P1,P2 (default all)')
    parser.add_argument('--json', metavar='PATH', help='also write the raw numbers as JSON')
    parser.add_argument('--rounds', type=int, default=None, help='P1/P2 rounds per peer (default 5, --quick 1)')
    parser.add_argument('--p3-count', type=int, default=None,
                        help='P3 results in all, over 4 publishers (default 100,000)')
    parser.add_argument('--p3-rounds', type=int, default=None, help='P3 rounds per peer (default 2, --quick 1)')
    parser.add_argument('--p3-celery', action='store_true', help="also run Celery's client in P3 (slow)")
    parser.add_argument('--p4-count', type=int, default=None, help='P4 pending results (default 100,000)')
    parser.add_argument('--p5-count', type=int, default=None, help='P5 round trips per peer (default 2,000)')
    parser.add_argument('--p5-batches', type=int, default=8,
                        help='P5: each peer runs its round trips in this many batches, interleaved (default 8)')
    parser.add_argument('--no-c', action='store_true', help='skip the C consumer')
    parser.add_argument('--peers', default=None,
                        help='only these peers, e.g. compiled,pure,pyamqp (default all; tables show the rest as n/a)')
    args = parser.parse_args(argv)
    quick = args.quick
    args.count = args.count or (2000 if quick else 10000)
    args.rounds = args.rounds or (1 if quick else 5)
    args.p3_count = args.p3_count or (10000 if quick else 100000)
    args.p3_rounds = args.p3_rounds or (1 if quick else 2)
    args.p4_count = args.p4_count or (10000 if quick else 100000)
    args.p5_count = args.p5_count or (200 if quick else 2000)
    only = [t.strip().upper() for t in args.only.split(',') if t.strip()]
    unknown = [t for t in only if t not in TARGETS]
    if unknown:
        parser.error(f"unknown target(s) {', '.join(unknown)}; choose from {', '.join(TARGETS)}")
    if min(args.count, args.rounds, args.p3_count, args.p3_rounds, args.p5_batches, args.p4_count, args.p5_count) < 1:
        parser.error('counts and rounds must be at least 1')
    args.only_list = only
    known = (COMPILED, PURE, CELERY, CELERY_RPCR, PYAMQP, C)
    args.peer_set = set(known)
    if args.peers:
        args.peer_set = {p.strip().lower() for p in args.peers.split(',') if p.strip()}
        if args.peer_set - set(known):
            parser.error(f"unknown peer(s) {', '.join(sorted(args.peer_set - set(known)))}; "
                         f"choose from {', '.join(known)}")
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
