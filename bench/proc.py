"""The runner's side of a peer subprocess: start it, read its JSON lines, feed it ``go``, end it.

Every peer (``bench/peers.py`` roles, the C programs) prints JSON lines on stdout (``ready``,
``started``, ``done``, ``error``) and reads lines on stdin. The runner never shares a process with
a peer, so the compiled / pure choice of rpcresults is made by the environment (``peer_env``).
"""
from __future__ import annotations

import json
import os
import queue as queue_mod
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Dict, Optional, Sequence

from bench.common import REPO_ROOT


def log(message: str) -> None:
    """One progress line on stderr."""
    print(message, file=sys.stderr, flush=True)


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
    """The environment of a peer: the repo on the path, ``RPCRESULTS_NO_EXTENSIONS=1`` for the pure twin."""
    env = dict(os.environ)
    env.pop('RPCRESULTS_NO_EXTENSIONS', None)
    if pure:
        env['RPCRESULTS_NO_EXTENSIONS'] = '1'
    path = env.get('PYTHONPATH')
    env['PYTHONPATH'] = REPO_ROOT + (os.pathsep + path if path else '')
    env['PYTHONUNBUFFERED'] = '1'
    return env


def python_peer(role: str, config: Dict[str, Any], pure: bool = False, label: str = '') -> Child:
    """``python -m bench.peers ROLE CONFIG_JSON`` as a :class:`Child`."""
    return Child([sys.executable, '-m', 'bench.peers', role, json.dumps(config)], env=peer_env(pure),
                 label=label or role)
