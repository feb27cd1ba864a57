"""What the bench header reports about the machine, and the build of the C peers.

The C peers (``bench/c_consumer.c`` for P1, ``bench/c_rpc.c`` for P7) are compiled here on first
use, when a C compiler and rabbitmq-c's headers (Debian: ``apt-get install librabbitmq-dev``) are
present; the binaries sit next to their sources (git-ignored) and are rebuilt when a source is newer.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from typing import Dict, List, Optional, Sequence, Tuple

from bench.common import BENCH_DIR, REPO_ROOT, broker_params
from bench.proc import peer_env

#: Where rabbitmq-c's header may be (0.11 installs amqp.h; 0.13+ rabbitmq-c/amqp.h).
AMQP_HEADERS = ('/usr/include/amqp.h', '/usr/include/rabbitmq-c/amqp.h', '/usr/local/include/amqp.h',
                '/usr/local/include/rabbitmq-c/amqp.h')


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
    for name in ('kombu', 'amqp', 'celery', 'rpcresults', 'aio_pika'):
        try:
            module = __import__(name)
            found[name] = getattr(module, '__version__', '?')
        except Exception as exc:  # shown in the header
            found[name] = f'not importable ({type(exc).__name__})'
    return found


def build_c(name: str) -> Tuple[Optional[str], str]:
    """``(path, note)``: ``bench/NAME`` built from ``bench/NAME.c`` when needed, or None and why not."""
    source, binary = os.path.join(BENCH_DIR, f'{name}.c'), os.path.join(BENCH_DIR, name)
    cc = shutil.which(os.environ.get('CC', 'cc')) or shutil.which('gcc') or shutil.which('clang')
    if cc is None:
        return None, 'n/a: no C compiler'
    if not any(os.path.exists(path) for path in AMQP_HEADERS):
        return None, 'n/a: librabbitmq-dev is not installed (apt-get install librabbitmq-dev)'
    if os.path.exists(binary) and os.path.getmtime(binary) >= os.path.getmtime(source):
        return binary, 'built'
    with tempfile.TemporaryDirectory(prefix='rpcresults-bench-build-') as build:
        out = os.path.join(build, name)
        proc = subprocess.run([cc, '-O2', '-Wall', source, '-lrabbitmq', '-o', out], capture_output=True,
                              text=True, timeout=120)
        if proc.returncode != 0:
            return None, f'n/a: bench/{name}.c did not compile: {proc.stderr.strip()[-300:]}'
        staged = f'{binary}.{os.getpid()}.tmp'
        shutil.copy2(out, staged)
        os.replace(staged, binary)  # atomic: a concurrent run never sees half a binary
    return binary, f'built (bench/{name})'


def c_argv(command: Sequence[str], url: str, *rest: str) -> List[str]:
    """A C peer's command line: ``COMMAND... HOST PORT USER PASSWORD VHOST REST...``."""
    p = broker_params(url)
    host, _, port = p['host'].rpartition(':')
    return [*command, host, port, p['userid'], p['password'], p['virtual_host'], *rest]


def mask(url: str) -> str:
    params = broker_params(url)
    return url.replace(f":{params['password']}@", ':***@', 1) if params['password'] else url
