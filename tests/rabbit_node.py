"""A private RabbitMQ node for fault tests that must stop or restart a broker.

The shared broker (5672) is never touched: :class:`RabbitNode` runs the installed
``rabbitmq-server`` as a node of its own (own node name, AMQP and distribution
ports, data/log dirs, Erlang cookie, no plugins, own config file), so it can be
stopped and started again at will. ``restart()`` keeps the data dir, so durable
queues and persistent messages survive, as they would on a real broker restart.

    with RabbitNode() as node:          # or the module-scoped ``private_node`` fixture
        app = make_app(node.url)
        node.restart()

Every wait is bounded; teardown always kills the node's process group and removes
its directory.
"""
from __future__ import annotations

import atexit
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from typing import Dict, Iterator, List, Optional

import pytest

__all__ = ('RabbitNode', 'RabbitNodeError', 'find_rabbitmq_server', 'free_port', 'private_node')

logger = logging.getLogger(__name__)

#: Bound on one start (a boot here takes ~5 s; a loaded 2-core CI box is slower).
START_TIMEOUT = 90.0
#: Bound on one graceful stop before the process group is killed.
STOP_TIMEOUT = 30.0


class RabbitNodeError(RuntimeError):
    """The private node could not be started or stopped (the message carries its log's tail)."""


def find_rabbitmq_server() -> Optional[str]:
    """The ``rabbitmq-server`` start script itself, or None when RabbitMQ is not installed.

    Debian's ``/usr/sbin/rabbitmq-server`` is a wrapper that re-runs the script as the
    ``rabbitmq`` user with its home (and the shared node's cookie) and sends output to
    /var/log/rabbitmq; we run the script it wraps, as ourselves, with a home of our own.
    """
    found = shutil.which('rabbitmq-server') or shutil.which('rabbitmq-server', path='/usr/sbin:/usr/local/sbin')
    if found is None:
        return None
    real = os.path.realpath(found)
    if os.path.basename(real) == 'rabbitmq-script-wrapper':
        wrapped = os.path.join(os.path.dirname(real), 'rabbitmq-server')
        if os.access(wrapped, os.X_OK):
            return wrapped
    return real


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(('127.0.0.1', port), timeout=1):
            return True
    except OSError:
        return False


class RabbitNode:
    """One private RabbitMQ node: ``start()``, ``stop()``, ``restart()``, ``close()``."""

    def __init__(self, start_timeout: float = START_TIMEOUT, stop_timeout: float = STOP_TIMEOUT) -> None:
        script = find_rabbitmq_server()
        if script is None:
            raise RabbitNodeError('rabbitmq-server is not installed (not on PATH nor in /usr/sbin)')
        self.script = script
        self.ctl = os.path.join(os.path.dirname(script), 'rabbitmqctl')
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.nodename = f'rpcr-{uuid.uuid4().hex[:10]}@localhost'
        self.port = free_port()
        self.dist_port = free_port()
        while self.dist_port == self.port:
            self.dist_port = free_port()
        self.base = tempfile.mkdtemp(prefix='rpcr-rabbit-')
        self.home = os.path.join(self.base, 'home')
        self.log_dir = os.path.join(self.base, 'log')
        for path in (self.home, self.log_dir, os.path.join(self.base, 'mnesia')):
            os.makedirs(path)
        self.output_path = os.path.join(self.log_dir, 'console.out')
        self.process: Optional[subprocess.Popen] = None
        self.starts: List[float] = []  # seconds each start took until AMQP answered
        self._write_files()
        atexit.register(self._abandon)  # a test run that never reaches teardown leaves no node behind

    @property
    def url(self) -> str:
        """The AMQP URL of this node (guest/guest, default vhost)."""
        return f'amqp://guest:guest@127.0.0.1:{self.port}//'

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    # -- files and environment -------------------------------------------------------------
    def _write_files(self) -> None:
        with open(os.path.join(self.base, 'enabled_plugins'), 'w') as f:
            f.write('[].\n')  # the shared node's management plugin would clash on 15672
        with open(os.path.join(self.base, 'rabbitmq.conf'), 'w') as f:
            f.write(f'listeners.tcp.default = 127.0.0.1:{self.port}\n'
                    'disk_free_limit.absolute = 1MB\n'  # no disk alarm blocking the tests' publishers
                    'log.console = false\n'
                    'log.file.level = info\n')
        open(os.path.join(self.base, 'rabbitmq-env.conf'), 'w').close()  # not /etc's (its NODENAME)

    def _env(self) -> Dict[str, str]:
        env = {key: value for key, value in os.environ.items()
               if not key.startswith(('RABBITMQ_', 'ERL_'))}
        env.update({
            'HOME': self.home,  # our own Erlang cookie, used by our rabbitmqctl calls too
            'LC_ALL': env.get('LC_ALL') or 'C.UTF-8',
            'RABBITMQ_NODENAME': self.nodename,
            'RABBITMQ_NODE_IP_ADDRESS': '127.0.0.1',
            'RABBITMQ_NODE_PORT': str(self.port),
            'RABBITMQ_DIST_PORT': str(self.dist_port),
            'RABBITMQ_MNESIA_BASE': os.path.join(self.base, 'mnesia'),
            'RABBITMQ_LOG_BASE': self.log_dir,
            'RABBITMQ_PID_FILE': os.path.join(self.base, 'node.pid'),
            'RABBITMQ_ENABLED_PLUGINS_FILE': os.path.join(self.base, 'enabled_plugins'),
            'RABBITMQ_CONFIG_FILE': os.path.join(self.base, 'rabbitmq.conf'),
            'RABBITMQ_ADVANCED_CONFIG_FILE': os.path.join(self.base, 'advanced.config'),
            'RABBITMQ_CONF_ENV_FILE': os.path.join(self.base, 'rabbitmq-env.conf'),
            'RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS': '-kernel inet_dist_use_interface {127,0,0,1}',
            'ERL_EPMD_ADDRESS': '127.0.0.1',
            'ERL_CRASH_DUMP_SECONDS': '0',
        })
        return env

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> float:
        """Boot the node and wait (bounded) until it accepts AMQP; returns the seconds it took."""
        if self.running:
            return 0.0
        if _port_open(self.port):
            raise RabbitNodeError(f'port {self.port} is taken by someone else; not starting {self.nodename}')
        began = time.monotonic()
        with open(self.output_path, 'ab') as out:
            self.process = subprocess.Popen([self.script], env=self._env(), cwd=self.base, stdin=subprocess.DEVNULL,
                                            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = began + self.start_timeout
        while not self._amqp_ready():
            if not self.running:
                code = self.process.returncode
                self.process = None
                raise RabbitNodeError(f'{self.nodename} exited with {code} while starting\n{self.log_tail()}')
            if time.monotonic() >= deadline:
                self.kill()
                raise RabbitNodeError(f'{self.nodename} did not accept AMQP on {self.port} within '
                                      f'{self.start_timeout} s\n{self.log_tail()}')
            time.sleep(0.1)
        took = time.monotonic() - began
        self.starts.append(took)
        logger.info('private RabbitMQ %s up on port %d after %.1f s', self.nodename, self.port, took)
        return took

    def _amqp_ready(self) -> bool:
        """The listener is up and a full AMQP handshake works (it is ours: we checked it was free)."""
        if not self.running or not _port_open(self.port):
            return False
        import amqp
        conn = amqp.Connection(f'127.0.0.1:{self.port}', userid='guest', password='guest', connect_timeout=2)
        try:
            conn.connect()
            conn.close()
        except Exception:  # not ready yet: any failure means "try again"
            try:
                conn.collect()
            except Exception:
                pass
            return False
        return True

    def stop(self) -> None:
        """Stop the node the way an operator would (``rabbitmqctl stop``), bounded; kill as fallback."""
        if not self.running:
            self.process = None
            return
        try:
            subprocess.run([self.ctl, '-n', self.nodename, 'stop'], env=self._env(), cwd=self.base,
                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           timeout=self.stop_timeout, check=False)
        except subprocess.TimeoutExpired:
            logger.warning('rabbitmqctl stop of %s timed out; killing it', self.nodename)
        assert self.process is not None
        try:
            self.process.wait(self.stop_timeout)
        except subprocess.TimeoutExpired:
            logger.warning('%s still running after rabbitmqctl stop; killing it', self.nodename)
        self.kill()
        deadline = time.monotonic() + self.stop_timeout
        while _port_open(self.port):
            if time.monotonic() >= deadline:
                raise RabbitNodeError(f'port {self.port} still open after {self.nodename} stopped')
            time.sleep(0.05)

    def restart(self) -> float:
        """``stop()`` then ``start()`` on the same data dir; returns the seconds the start took."""
        self.stop()
        return self.start()

    def kill(self) -> None:
        """SIGKILL the node's whole process group (no-op when it is not running)."""
        process, self.process = self.process, None
        if process is None:
            return
        try:  # the whole group: helpers the node leaves behind (erl_child_setup) must go too
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            logger.error('%s (pid %d) survived SIGKILL', self.nodename, process.pid)

    def ctl_call(self, *args: str, timeout: float = 30.0) -> str:
        """Output of ``rabbitmqctl -n <this node> <args>`` (raises on failure)."""
        done = subprocess.run([self.ctl, '-n', self.nodename, *args], env=self._env(), cwd=self.base,
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              timeout=timeout, check=False)
        output = done.stdout.decode('utf-8', 'replace')
        if done.returncode:
            raise RabbitNodeError(f'rabbitmqctl {" ".join(args)} failed ({done.returncode}):\n{output}')
        return output

    def close(self) -> None:
        """Kill the node and remove its directory (idempotent)."""
        try:
            if self.running:
                try:
                    self.stop()
                except Exception:
                    logger.warning('could not stop %s cleanly', self.nodename, exc_info=True)
        finally:
            self._abandon()
            atexit.unregister(self._abandon)

    def _abandon(self) -> None:
        self.kill()
        shutil.rmtree(self.base, ignore_errors=True)

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the console output and the node's log (for failure messages)."""
        parts = []
        for path in (self.output_path, os.path.join(self.log_dir, f'{self.nodename}.log')):
            try:
                with open(path, 'rb') as f:
                    text = f.read().decode('utf-8', 'replace').splitlines()[-lines:]
            except OSError:
                continue
            parts.append(f'--- {path}\n' + '\n'.join(text))
        return '\n'.join(parts) or '(no log written)'

    def __enter__(self) -> 'RabbitNode':
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f'<RabbitNode {self.nodename} port={self.port} running={self.running}>'


@pytest.fixture(scope='module')
def private_node() -> Iterator[RabbitNode]:
    """A private RabbitMQ node for this module (import this fixture into the test module).

    Skipped only when RabbitMQ is not installed at all; installed but failing to start is
    a loud failure with the node's log.
    """
    if find_rabbitmq_server() is None:
        pytest.skip('rabbitmq-server is not installed on this machine (not on PATH nor in /usr/sbin), '
                    'so no private node can be started for broker-restart tests')
    node = RabbitNode()
    try:
        node.start()
    except RabbitNodeError as exc:
        node.close()
        pytest.fail(f'could not start a private RabbitMQ node: {exc}', pytrace=False)
    try:
        yield node
    finally:
        node.close()
