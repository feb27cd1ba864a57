"""A small TCP proxy of the tests' own, to cut a client's broker connection on demand.

One selector thread forwards bytes between every accepted client socket and its
own upstream socket, with bounded non-blocking buffers in each direction (a
side that stops reading stalls only its own pair, never the loop). Control
calls (``cut``, ``pause``, ``resume``, ``close``) are handed to that thread and
wait, bounded, until it has carried them out, so when ``cut()`` returns every
pair that was live is closed.

    with TcpProxy('127.0.0.1', 5672) as proxy:
        app = make_app(proxy.url_for(broker_url))
        ...
        proxy.cut()      # close every live pair; keep listening, reconnects work
        proxy.pause()    # accept, then close at once (the client cannot get through)
        proxy.resume()   # forward again
        proxy.black_hole()  # accept, then never answer (a broker that hangs); resume() ends it
        proxy.stall()    # live pairs keep reading but write nothing: bytes pile up here
        proxy.held()     # how many bytes are held (a cut drops them, as a dead network would)

    with TcpProxy('127.0.0.1', 5672, track_frames=True) as proxy:
        ...
        proxy.inject(b'garbage')  # into each live pair's broker->client stream, at a frame boundary

Pure stdlib.
"""
from __future__ import annotations

import queue
import selectors
import socket
import threading
from struct import unpack_from
from typing import Any, Dict, List, Optional, Tuple
from urllib.parse import urlsplit, urlunsplit

__all__ = ('TcpProxy',)

#: Bytes read per ``recv``.
CHUNK = 256 * 1024
#: Stop reading a side while this much is waiting to be written to the other side.
HIGH_WATER = 4 * 1024 * 1024
#: Bound on every control call.
CONTROL_TIMEOUT = 10.0


class _FrameBoundaries:
    """Follows an AMQP 0-9-1 frame stream (broker to client) to know where its frames end."""

    __slots__ = ('_header', '_left')

    def __init__(self) -> None:
        self._header = bytearray()  # the part of a 7-byte frame header read so far
        self._left = 0              # payload and frame-end bytes of the current frame still due

    @property
    def at_boundary(self) -> bool:
        return not self._header and not self._left

    def ends_in(self, data: bytes) -> List[int]:
        """Follow ``data``; the offsets in it (1..len) just past a frame end."""
        ends: List[int] = []
        pos, total = 0, len(data)
        while pos < total:
            if self._left:
                step = min(self._left, total - pos)
                pos += step
                self._left -= step
                if not self._left:
                    ends.append(pos)
                continue
            take = min(7 - len(self._header), total - pos)
            self._header += data[pos:pos + take]
            pos += take
            if len(self._header) == 7:
                self._left = unpack_from('>I', self._header, 3)[0] + 1
                self._header.clear()
        return ends


class _Pair:
    """A client socket, its upstream socket, and what waits to be written to each."""

    __slots__ = ('client', 'upstream', 'out', 'events', 'eof', 'closed', 'stalled', 'frames', 'inject')

    def __init__(self, client: socket.socket, upstream: socket.socket, track_frames: bool = False) -> None:
        self.client = client
        self.upstream = upstream
        # bytes waiting to be written *to* the keyed socket
        self.out: Dict[socket.socket, bytearray] = {client: bytearray(), upstream: bytearray()}
        self.events: Dict[socket.socket, int] = {}  # what each socket is registered for (0: not)
        self.eof = False  # one side ended: flush what is buffered, then close both
        self.closed = False
        self.stalled = False  # read, buffer, but write nothing (a black-holed link)
        # frame boundaries of the broker->client stream (only with track_frames), and bytes to
        # put into that stream at the next boundary
        self.frames: Optional[_FrameBoundaries] = _FrameBoundaries() if track_frames else None
        self.inject = bytearray()

    def peer(self, sock: socket.socket) -> socket.socket:
        return self.upstream if sock is self.client else self.client


class TcpProxy:
    """Forward 127.0.0.1:<ephemeral port> to ``(target_host, target_port)``."""

    def __init__(self, target_host: str, target_port: int, listen_host: str = '127.0.0.1',
                 connect_timeout: float = 5.0, track_frames: bool = False) -> None:
        self.target = (target_host, int(target_port))
        #: follow AMQP frame boundaries of what the broker sends (needed by ``inject``)
        self.track_frames = track_frames
        self.injected = 0   # injections placed into a client-bound stream
        self.listen_host = listen_host
        self.connect_timeout = connect_timeout
        self.port = 0
        self.accepted = 0   # connections forwarded upstream
        self.refused = 0    # connections accepted and closed at once while paused
        self.swallowed = 0  # connections accepted and never answered while black-holed
        self.cuts = 0
        self._paused = False
        self._black_hole = False
        self._swallowed: List[socket.socket] = []
        self._listener: Optional[socket.socket] = None
        self._selector: Optional[selectors.BaseSelector] = None
        self._pairs: List[_Pair] = []
        self._commands: 'queue.Queue[Tuple[str, threading.Event]]' = queue.Queue()
        self._wake_r: Optional[socket.socket] = None
        self._wake_w: Optional[socket.socket] = None
        self._thread: Optional[threading.Thread] = None
        self._stopped = threading.Event()
        self._lock = threading.Lock()

    @classmethod
    def for_broker(cls, broker_url: str, **options: Any) -> 'TcpProxy':
        """A proxy (not started yet: use it as a context manager) in front of ``broker_url``'s broker."""
        parts = urlsplit(broker_url)
        return cls(parts.hostname or 'localhost', parts.port or 5672, **options)

    # -- public ------------------------------------------------------------------------------
    @property
    def live(self) -> int:
        """How many client/upstream pairs are open now."""
        with self._lock:
            return len(self._pairs)

    def start(self) -> 'TcpProxy':
        """Bind an ephemeral port and start forwarding (returns self)."""
        if self._thread is not None:
            return self
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.listen_host, 0))
        listener.listen(128)
        listener.setblocking(False)
        self._listener = listener
        self.port = listener.getsockname()[1]
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(listener, selectors.EVENT_READ, 'accept')
        self._selector.register(self._wake_r, selectors.EVENT_READ, 'wake')
        self._thread = threading.Thread(target=self._run, name=f'TcpProxy:{self.port}', daemon=True)
        self._thread.start()
        return self

    def url_for(self, broker_url: str) -> str:
        """``broker_url`` with its host and port replaced by this proxy's."""
        parts = urlsplit(broker_url)
        netloc = parts.netloc
        userinfo = ''
        if '@' in netloc:
            userinfo, _ = netloc.rsplit('@', 1)
            userinfo += '@'
        return urlunsplit((parts.scheme, f'{userinfo}{self.listen_host}:{self.port}', parts.path,
                           parts.query, parts.fragment))

    def cut(self) -> int:
        """Close every live client/upstream pair at once; keep listening. Returns how many."""
        return self._control('cut')

    def pause(self) -> None:
        """Accept new connections and close them at once (refuse service) until ``resume()``."""
        self._control('pause')

    def black_hole(self) -> None:
        """Accept new connections and never answer them (no byte back, no close) until ``resume()``:
        to the client, a broker that hangs during the handshake."""
        self._control('black_hole')

    def resume(self) -> None:
        """Forward new connections again (the swallowed ones are closed)."""
        self._control('resume')

    def stall(self) -> int:
        """Stop writing on every live pair (both directions); what arrives is held here, up to
        the high-water mark. A ``cut()`` then loses it, as a dead link would. Returns how many pairs."""
        return self._control('stall')

    def unstall(self) -> None:
        """Let stalled pairs forward what they hold, and go on forwarding."""
        self._control('unstall')

    def held(self) -> int:
        """Bytes read but not yet written, over every live pair."""
        return self._control('held')

    def inject(self, data: bytes) -> int:
        """Put ``data`` into every live pair's broker->client stream at a frame boundary: at once
        when the broker's bytes forwarded so far end on one, else right after the frame in
        progress. Needs ``track_frames=True``. Returns how many pairs it was queued for;
        ``injected`` counts the ones placed."""
        if not self.track_frames:
            raise RuntimeError('inject() needs a TcpProxy(..., track_frames=True)')
        return self._control('inject', bytes(data))

    def close(self) -> None:
        """Stop the loop and close every socket (idempotent)."""
        thread = self._thread
        if thread is None:
            return
        if thread.is_alive():
            try:
                self._control('stop')
            except RuntimeError:
                pass
            thread.join(CONTROL_TIMEOUT)
        self._thread = None
        self._teardown()

    def __enter__(self) -> 'TcpProxy':
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f'<TcpProxy 127.0.0.1:{self.port} -> {self.target[0]}:{self.target[1]} '
                f'accepted={self.accepted} live={self.live} cuts={self.cuts}>')

    # -- control -----------------------------------------------------------------------------
    def _control(self, command: str, argument: Any = None) -> Any:
        if self._thread is None or not self._thread.is_alive():
            raise RuntimeError('the proxy is not running')
        done = threading.Event()
        done.result = None  # type: ignore[attr-defined]
        done.argument = argument  # type: ignore[attr-defined]
        self._commands.put((command, done))
        try:
            self._wake_w.send(b'x')  # type: ignore[union-attr]
        except OSError:
            pass
        if not done.wait(CONTROL_TIMEOUT):
            raise RuntimeError(f'proxy did not carry out {command!r} within {CONTROL_TIMEOUT} s')
        return done.result  # type: ignore[attr-defined]

    def _handle_commands(self) -> bool:
        """Run queued commands; False when the loop must stop."""
        keep_going = True
        while True:
            try:
                command, done = self._commands.get_nowait()
            except queue.Empty:
                return keep_going
            result: Any = None
            if command == 'cut':
                with self._lock:
                    pairs = list(self._pairs)
                for pair in pairs:
                    self._close_pair(pair)
                self.cuts += 1
                result = len(pairs)
            elif command == 'pause':
                self._paused = True
            elif command == 'black_hole':
                self._black_hole = True
            elif command == 'resume':
                self._paused = False
                self._black_hole = False
                for sock in self._swallowed:
                    _hard_close(sock)
                self._swallowed.clear()
            elif command in ('stall', 'unstall'):
                with self._lock:
                    pairs = list(self._pairs)
                for pair in pairs:
                    pair.stalled = command == 'stall'
                    if not pair.stalled:
                        for sock in (pair.client, pair.upstream):
                            if not pair.closed:
                                self._on_writable(pair, sock)
                    if not pair.closed:
                        self._update(pair)
                result = len(pairs)
            elif command == 'held':
                with self._lock:
                    pairs = list(self._pairs)
                result = sum(len(buf) for pair in pairs for buf in pair.out.values())
            elif command == 'inject':
                with self._lock:
                    pairs = list(self._pairs)
                for pair in pairs:
                    pair.inject += done.argument  # type: ignore[attr-defined]
                    if pair.frames is not None and pair.frames.at_boundary:
                        self._place_injection(pair, 0, b'')
                    if not pair.closed:
                        self._update(pair)
                result = len(pairs)
            elif command == 'stop':
                keep_going = False
            done.result = result  # type: ignore[attr-defined]
            done.set()

    # -- the loop ----------------------------------------------------------------------------
    def _run(self) -> None:
        selector = self._selector
        assert selector is not None
        try:
            while True:
                for key, mask in selector.select(timeout=1.0):
                    tag = key.data
                    if tag == 'accept':
                        self._accept()
                    elif tag == 'wake':
                        try:
                            while self._wake_r.recv(4096):  # type: ignore[union-attr]
                                pass
                        except (BlockingIOError, InterruptedError):
                            pass
                    else:
                        pair: _Pair = tag
                        if pair.closed:
                            continue
                        if mask & selectors.EVENT_READ:
                            self._on_readable(pair, key.fileobj)  # type: ignore[arg-type]
                        if not pair.closed and mask & selectors.EVENT_WRITE:
                            self._on_writable(pair, key.fileobj)  # type: ignore[arg-type]
                        if not pair.closed:
                            self._update(pair)
                if not self._handle_commands():
                    return
        finally:
            self._stopped.set()
            # fail any control call still queued rather than leave it waiting
            while True:
                try:
                    _, done = self._commands.get_nowait()
                except queue.Empty:
                    break
                done.set()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()  # type: ignore[union-attr]
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            if self._paused:
                self.refused += 1
                _hard_close(client)
                continue
            if self._black_hole:
                self.swallowed += 1
                self._swallowed.append(client)  # kept open, never read: the client waits in vain
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=self.connect_timeout)
            except OSError:
                _hard_close(client)
                continue
            for sock in (client, upstream):
                sock.setblocking(False)
                try:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                except OSError:
                    pass
            pair = _Pair(client, upstream, self.track_frames)
            with self._lock:
                self._pairs.append(pair)
            self.accepted += 1
            self._update(pair)

    def _on_readable(self, pair: _Pair, sock: socket.socket) -> None:
        try:
            data = sock.recv(CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close_pair(pair)
            return
        if not data:
            pair.eof = True
            self._maybe_finish(pair)
            return
        if sock is pair.upstream and pair.frames is not None:
            ends = pair.frames.ends_in(data)
            if pair.inject and ends:
                self._place_injection(pair, ends[0], data)
                return
        pair.out[pair.peer(sock)] += data
        if not pair.stalled:
            self._on_writable(pair, pair.peer(sock))  # try at once: usually it all goes

    def _place_injection(self, pair: _Pair, at: int, data: bytes) -> None:
        """Queue ``data[:at]``, the pending injection, then ``data[at:]`` for the client."""
        out = pair.out[pair.client]
        out += data[:at]
        out += pair.inject
        out += data[at:]
        pair.inject.clear()
        self.injected += 1
        if not pair.stalled:
            self._on_writable(pair, pair.client)

    def _on_writable(self, pair: _Pair, sock: socket.socket) -> None:
        buf = pair.out[sock]
        while buf:
            try:
                sent = sock.send(buf)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._close_pair(pair)
                return
            if sent <= 0:
                break
            del buf[:sent]
        self._maybe_finish(pair)

    def _maybe_finish(self, pair: _Pair) -> None:
        if pair.eof and not pair.closed and not any(pair.out.values()):
            self._close_pair(pair)

    def _update(self, pair: _Pair) -> None:
        """Watch each socket for what it needs: read unless its peer's buffer is full or EOF was
        seen, write while something is owed to it, nothing otherwise."""
        for sock in (pair.client, pair.upstream):
            events = 0
            if not pair.eof and len(pair.out[pair.peer(sock)]) < HIGH_WATER:
                events |= selectors.EVENT_READ
            if pair.out[sock] and not pair.stalled:
                events |= selectors.EVENT_WRITE
            current = pair.events.get(sock, 0)
            if events == current:
                continue
            try:
                if events == 0:
                    self._selector.unregister(sock)  # type: ignore[union-attr]
                elif current == 0:
                    self._selector.register(sock, events, pair)  # type: ignore[union-attr]
                else:
                    self._selector.modify(sock, events, pair)  # type: ignore[union-attr]
            except (KeyError, ValueError, OSError):
                self._close_pair(pair)
                return
            pair.events[sock] = events

    def _close_pair(self, pair: _Pair) -> None:
        if pair.closed:
            return
        pair.closed = True
        for sock in (pair.client, pair.upstream):
            if pair.events.pop(sock, 0):
                try:
                    self._selector.unregister(sock)  # type: ignore[union-attr]
                except (KeyError, ValueError, OSError):
                    pass
            _hard_close(sock)
        with self._lock:
            try:
                self._pairs.remove(pair)
            except ValueError:
                pass

    def _teardown(self) -> None:
        with self._lock:
            pairs = list(self._pairs)
        for pair in pairs:
            self._close_pair(pair)
        for sock in self._swallowed:
            _hard_close(sock)
        self._swallowed.clear()
        for sock in (self._listener, self._wake_r, self._wake_w):
            if sock is not None:
                try:
                    sock.close()
                except OSError:
                    pass
        self._listener = self._wake_r = self._wake_w = None
        if self._selector is not None:
            try:
                self._selector.close()
            except OSError:
                pass
            self._selector = None


def _hard_close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass
