"""One reply connection: open, declare, consume, recover, heartbeats and acks.

A :class:`ReplyConnection` consumes one reply queue (:class:`ReplyQueue`: the
client's own queue of ``rpc://`` and the Celery drop-in, or RabbitMQ's direct
reply-to pseudo-queue) into a state table, and keeps doing so across connection
loss. Every call that may block takes the caller's deadline: connecting, the
retries between attempts and the broker calls of the set-up (channel, declare,
consume) all end by then with :class:`~rpcresults.exceptions.TimeoutError`, never
with a kombu or py-amqp error raised late. A reply is acked only after it is in
the state table, so a reconnect loses nothing that reached the queue.

Lock order, everywhere in rpcresults (take them in this order, never the reverse):

1. the reader election (:class:`~rpcresults.engine.reader.ReaderElection`): who reads the socket;
2. :attr:`ReplyConnection.lock`: connecting, recovering, closing (and, for direct
   reply-to, tracking a request together with publishing it);
3. :attr:`ReplyConnection.write_lock`: writes by anyone but the reader (direct reply-to
   requests) and heartbeats.

(Inside the connection, a private lock guards only the swap of the live connection and channel;
it is never held across I/O, so :meth:`ReplyConnection.close` never waits for a connection
attempt in progress: that attempt drops what it made once it sees the connection closed.)
"""
from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import Any, Callable, Dict, Optional, Tuple

import kombu
import kombu.exceptions

from ..exceptions import FrameError, ResultBackendClosed, TimeoutError
from .channel import ReplyChannel, detach_after_fork, reply_channel_for, wait_readable
from .replyqueue import ReplyQueue

__all__ = ('ReplyConnection', 'ACK_BATCH')

logger = logging.getLogger(__name__)

#: Replies dispatched between two ack flushes while a burst is being read.
ACK_BATCH = 1024
#: The pause between connection attempts grows by this much (seconds), up to RETRY_PAUSE_MAX.
RETRY_PAUSE_STEP = 0.5
RETRY_PAUSE_MAX = 2.0
#: A poll on a backend that never connected makes one attempt bounded by this (seconds).
FIRST_CONNECT_BUDGET = 2.0


class ReplyConnection:
    """Consumes one :class:`ReplyQueue` into ``table`` over a connection of its own; survives its loss."""

    def __init__(self, app: Any, table: Any, queue: ReplyQueue, *,
                 lost_error: Callable[[list, str], BaseException]) -> None:
        self.app = app
        self.table = table
        self.queue = queue
        self.lost_error = lost_error
        #: Held while connecting, recovering and closing (see the lock order above).
        self.lock = threading.RLock()
        #: Held for writes by anyone but the reader, and for heartbeats.
        self.write_lock = threading.RLock()
        self._swap = threading.Lock()  # the live connection and channel change only under it (no I/O)
        self.closed = False
        self._closing = threading.Event()  # set by close(): ends a pause between connection attempts
        self._connection: Any = None
        self._replies: Optional[ReplyChannel] = None
        self._connected_once = False
        self._cancelled = False
        self._heartbeat_due = float('inf')
        self._errors: Tuple[type, ...] = ()
        self.reconnects = 0
        self.queues_lost = 0
        self.frame_errors = 0
        self.queue_polls = 0  # poll markers sent
        self._marks = 0
        self._mark_token = uuid.uuid4().hex.encode()  # tells our markers from any other
        self._before = {'acked': 0, 'reads': 0, 'frames': 0}  # counts of the channels already replaced

    # -- state -------------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        """True while consuming on a live connection (as far as we know)."""
        return self._replies is not None

    @property
    def channel(self) -> Any:
        """The consuming channel (direct reply-to requests must go out on it); None when not connected."""
        replies = self._replies
        return replies.channel if replies is not None else None

    @property
    def socket(self) -> Any:
        """The socket replies arrive on, when there is one to poll; None otherwise."""
        replies = self._replies
        return replies.socket if replies is not None else None

    @property
    def heartbeat(self) -> float:
        """The heartbeat interval of the live connection (0 without heartbeats or a connection)."""
        connection = self._connection
        return (connection.heartbeat or 0) if connection is not None else 0

    def needs_service(self) -> bool:
        """True when a heartbeat is due or input (perhaps an EOF or a close) waits on the socket."""
        return time.monotonic() >= self._heartbeat_due or wait_readable(self.socket, 0)

    def recoverable(self) -> Tuple[type, ...]:
        """The errors after which the connection is dropped and built again."""
        if not self._errors:
            probe = self.app.connection()
            self._errors = (tuple(probe.connection_errors) + tuple(probe.channel_errors)
                            + (OSError, EOFError, FrameError, kombu.exceptions.OperationalError))
        return self._errors

    def _count_replaced(self, replies: Optional[ReplyChannel]) -> None:
        if replies is not None:
            for key, value in _channel_counts(replies).items():
                self._before[key] += value

    def stats(self) -> Dict[str, int]:
        """Counters over every connection so far: reconnects, queues_lost, frame_errors (streams
        dropped as unreadable), acked, reads (socket reads by our chunked reader), frames (frames
        its parser took apart), queue_polls (polls that sent a marker through the queue to read
        every reply ahead of it); and of the live connection: heartbeat (seconds, as negotiated),
        frame_max, fast_read (1 while our chunked reader reads it, 0 while py-amqp does)."""
        replies = self._replies
        live = _channel_counts(replies) if replies is not None else {}
        raw = getattr(self._connection, '_connection', None)  # py-amqp's, once connected
        counters = {'reconnects': self.reconnects, 'queues_lost': self.queues_lost,
                    'frame_errors': self.frame_errors, 'queue_polls': self.queue_polls}
        for key, value in self._before.items():
            counters[key] = value + live.get(key, 0)
        counters.update(heartbeat=int(getattr(raw, 'heartbeat', 0) or 0),
                        frame_max=int(getattr(raw, 'frame_max', 0) or 0),
                        fast_read=int(bool(getattr(replies, 'fast', False))))
        return counters

    # -- opening and closing -----------------------------------------------------------------
    def open(self, deadline: Optional[float]) -> None:
        """Connect, declare and consume unless already consuming; gives up at ``deadline``.

        Raises :class:`TimeoutError` at the deadline and :class:`ResultBackendClosed` once
        :meth:`close` ran (until :meth:`reopen`).
        """
        if self._replies is not None:
            return
        with self.lock:
            if self.closed:
                raise ResultBackendClosed()
            if self._replies is None:
                self._connect(deadline)

    def refuse_reconnects(self) -> None:
        """The first step of closing: from now on a read that fails raises :class:`ResultBackendClosed`."""
        self.closed = True
        self._closing.set()

    def reopen(self) -> None:
        """After :meth:`close`: let the next read connect again (connects nothing by itself)."""
        self.closed = False
        self._closing.clear()

    def close(self, polite: bool) -> None:
        """Stop consuming; ``polite``: ack what was handled, cancel and close with the handshake.

        Impolite (a thread may be blocked reading): drop the socket without a handshake,
        which ends that read; the broker requeues the unacked replies.
        """
        self.refuse_reconnects()
        with self._swap:
            replies, self._replies = self._replies, None
            connection, self._connection = self._connection, None
            self._count_replaced(replies)
        if connection is None:
            return
        if polite:
            try:
                if replies is not None:
                    replies.flush_acks()
                    replies.cancel()
                connection.release()
                return
            except Exception:  # closing anyway: a dead connection cannot ack
                logger.debug('could not close the reply connection politely', exc_info=True)
        _drop(connection)

    def forget_after_fork(self) -> None:
        """In a forked child: let go of the parent's connection without touching its socket."""
        detach_after_fork(self._connection)
        self._connection = None
        self._replies = None
        self._connected_once = False  # the child has a queue of its own: nothing to have lost
        self.lock = threading.RLock()  # a parent thread may have held them at fork time
        self.write_lock = threading.RLock()
        self._swap = threading.Lock()
        self._closing = threading.Event()
        self.closed = False

    # -- connecting --------------------------------------------------------------------------
    def _connect(self, deadline: Optional[float]) -> None:
        """Attempt to connect until it works, :meth:`close` is called, or ``deadline`` (lock held)."""
        conf = self.app.conf
        retries = conf.broker_connection_max_retries
        attempt = 0
        pause = 0.0
        last: Optional[BaseException] = None
        connection = self.app.connection()
        self.queue.check(connection)
        while True:
            if self.closed:
                raise ResultBackendClosed()
            budget = conf.broker_connection_timeout or None
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError('The operation timed out while connecting to the broker'
                                       + (f' (last error: {last!r})' if attempt else ''))
                budget = remaining if budget is None else min(budget, remaining)
            try:
                self._connect_once(connection, budget)
                return
            except self.recoverable() as exc:
                last = exc
                attempt += 1
                connection.maybe_switch_next()  # with failover URLs, the next broker
                replacement = connection.clone()
                _drop(connection)
                connection = replacement
                if self.closed:
                    raise ResultBackendClosed() from exc
                if deadline is None and retries is not None and attempt > retries:
                    raise
                logger.warning('cannot connect the reply consumer for %s (attempt %d): %r',
                               self.queue.name, attempt, exc)
            if deadline is not None:
                pause = min(pause, max(deadline - time.monotonic(), 0.0))
            self._closing.wait(pause)
            pause = min(pause + RETRY_PAUSE_STEP, RETRY_PAUSE_MAX)

    def _connect_once(self, connection: kombu.Connection, budget: Optional[float]) -> None:
        """One attempt: connect, declare, consume; each broker call bounded by ``budget`` seconds.

        The connection is dropped when the attempt fails.
        """
        connection.connect_timeout = budget
        try:
            # one attempt, no retry with a pause of kombu's own: the pauses are ours
            connection.ensure_connection(max_retries=0, reraise_as_library_errors=False)
            sock = _socket_of(connection)
            if sock is not None:
                sock.settimeout(budget)  # the set-up's synchronous calls must end by the deadline too
            channel, lost = self.queue.setup(connection, connection.channel(), self._connected_once)
            replies = reply_channel_for(channel, self.table, self._on_cancel, no_ack=self.queue.no_ack)
            replies.consume(self.queue.name, f'rpcresults-{uuid.uuid4()}')
            if sock is not None:
                sock.settimeout(None)
        except BaseException:
            _drop(connection)
            raise
        with self._swap:
            if self.closed:  # close() ran during this attempt: it must not find a connection later
                _drop(connection)
                raise ResultBackendClosed()
            self._connection = connection
            self._replies = replies
        self._connected_once = True
        self._cancelled = False
        heartbeat = connection.heartbeat or 0
        self._heartbeat_due = time.monotonic() + heartbeat / 4 if heartbeat else float('inf')
        if lost:
            self._report_lost(lost)

    def _on_cancel(self, consumer_tag: str) -> None:
        self._cancelled = True

    def _report_lost(self, detail: str) -> None:
        self.queues_lost += 1
        lost = self.queue.report_lost(self.table, lambda ids: self.lost_error(ids, detail))
        if lost:
            logger.error('reply queue %s lost with %d result(s) pending: %s',
                         self.queue.name, len(lost), detail)

    def _consume_again(self) -> None:
        """The broker cancelled our consumer: consume again and report what was lost."""
        with self.lock, self.write_lock:
            replies = self._replies
            self._cancelled = False
            if replies is None or self.closed:
                return
            replies.settle()
            detail = self.queue.consume_again(replies, f'rpcresults-{uuid.uuid4()}')
            self._report_lost(detail)

    def _break(self, exc: BaseException) -> None:
        """Forget the broken connection (lock held); the next :meth:`open` builds a new one."""
        with self._swap:
            replies, self._replies = self._replies, None
            old, self._connection = self._connection, None
            self._count_replaced(replies)
        if old is not None:
            _drop(old)
        if isinstance(exc, FrameError):
            self.frame_errors += 1
            logger.error('unreadable input on the reply connection for %s: %s', self.queue.name, exc)

    def recover(self, exc: BaseException, deadline: Optional[float]) -> None:
        """Drop the broken connection and build a new one (re-declare, re-consume) by ``deadline``."""
        with self.lock:
            if self.closed:  # close() ran: never reconnect behind it
                raise ResultBackendClosed() from exc
            self.reconnects += 1
            logger.warning('reply consumer for %s lost its connection (%r); reconnecting',
                           self.queue.name, exc)
            self._break(exc)
            self._connect(deadline)

    # -- reading -----------------------------------------------------------------------------
    def read(self, timeout: Optional[float], deadline: Optional[float], recover: bool = True) -> bool:
        """Wait up to ``timeout`` for input and dispatch it: False when nothing came.

        A lost connection is rebuilt by ``deadline`` (True: something happened, look
        again); with ``recover=False`` it is only dropped (False), for the next wait to
        rebuild. Raises :class:`ResultBackendClosed` once :meth:`close` ran.
        """
        replies, connection = self._replies, self._connection
        if replies is None:
            if not recover and self._connected_once:
                return False
            self.open(deadline)
            replies, connection = self._replies, self._connection
            if replies is None:  # closed meanwhile
                raise ResultBackendClosed()
        try:
            return replies.read(connection, timeout)
        except Exception as exc:
            if self.closed:
                raise ResultBackendClosed() from exc
            if not isinstance(exc, self.recoverable()):
                raise
            if not recover:
                with self.lock:
                    if self._replies is replies:
                        self.reconnects += 1
                        self._break(exc)
                return False
            self.recover(exc, deadline)
            return True
        finally:
            if self._cancelled and not self.closed:
                self._consume_again()

    def read_available(self, limit: Optional[int] = None, deadline: Optional[float] = None,
                       recover: bool = True) -> Tuple[int, bool]:
        """Dispatch what already arrived, without blocking, then ack it: ``(count, exhausted)``.

        Stops once more than ``limit`` replies were dispatched (``exhausted`` is then False).
        """
        table = self.table
        start = table.received
        exhausted = True
        try:
            while True:
                if limit is not None and table.received - start > limit:
                    exhausted = False
                    break
                if not self.read(0, deadline, recover):
                    break
                replies = self._replies
                if replies is not None and replies.unacked >= ACK_BATCH:
                    self._flush_acks(deadline, recover)
        finally:
            self._flush_acks(deadline, recover)
            self.heartbeat_if_due(deadline, recover)
        return table.received - start, exhausted

    def read_queued(self, limit: Optional[int] = None, deadline: Optional[float] = None) -> Tuple[int, bool]:
        """Dispatch every reply the queue held when called, up to ``limit``: ``(count, exhausted)``.

        What a poll needs (``state``, ``get_task_meta``): replies still in the broker's queue,
        not only those already on the socket. A marker published to the queue goes in behind
        them, so once it is read, so are they; by ``deadline`` this returns what it has.
        Never reconnects: a broken connection is only dropped, for the next wait to rebuild.
        The caller leads the read (see the reader election).
        """
        table = self.table
        start = table.received
        count, exhausted = self.read_available(limit, deadline, recover=False)
        replies = self._replies
        if not exhausted or replies is None or not self.queue.countable:
            return count, exhausted
        try:
            arrived = self._mark(replies)
            while not arrived():
                if limit is not None and table.received - start > limit:
                    exhausted = False
                    break
                timeout = None if deadline is None else deadline - time.monotonic()
                if timeout is not None and timeout <= 0:
                    logger.debug('the marker of a poll of %s did not come back in time', self.queue.name)
                    break
                self.read(timeout, deadline, recover=False)
                if replies.unacked >= ACK_BATCH:
                    self._flush_acks(deadline, False)
        except self.recoverable() as exc:
            self._lost_while_writing(replies, exc, deadline, False)
        finally:
            self._flush_acks(deadline, False)
        count = table.received - start
        return count, exhausted and (limit is None or count <= limit)

    def ask_queued(self) -> Optional[Callable[[], bool]]:
        """While another thread reads: mark the queue; returns a check that is True once the
        reading thread dispatched every reply ahead of the marker, or gave up on this connection.

        None when nothing was sent: the connection is not up (the reader is connecting for the
        first time: ask again), or it cannot be written beside its reader.
        """
        replies = self._replies
        if replies is None or not self.marks_beside_reader:
            return None
        try:
            return self._mark(replies)
        except self.recoverable():
            return None  # the reader finds out and recovers

    @property
    def marks_beside_reader(self) -> bool:
        """Whether a poll can mark the queue while another thread reads (a real queue over
        py-amqp). During the first connection attempt too, as that usually ends at once; not
        while reconnecting: a poll then answers from the table without waiting."""
        replies = self._replies
        if replies is None:
            return self.queue.countable and not self._connected_once
        return self.queue.countable and replies.marks_beside_reader

    def _mark(self, replies: ReplyChannel) -> Callable[[], bool]:
        """Publish the next poll marker; a check that is True once it was read (or the
        connection was replaced, which ends the poll)."""
        with self.write_lock:
            self._marks += 1
            number = self._marks
            replies.send_marker(self.queue.name, b'%s:%d' % (self._mark_token, number))
        self.queue_polls += 1
        table, token = self.table, self._mark_token

        def arrived() -> bool:
            seen, _, count = table.marker.partition(b':')
            return (seen == token and int(count) >= number) or self._replies is not replies

        return arrived

    def read_until(self, until: Callable[[], bool], deadline: Optional[float],
                   give_up_at: Optional[float],
                   wait_input: Optional[Callable[[Any, Optional[float]], bool]] = None) -> None:
        """Dispatch replies until ``until()`` holds or ``deadline`` passes (at least one look).

        Reconnects give up at ``give_up_at``. ``wait_input(socket, seconds)``, when given, may
        wait for input itself and return True instead of a blocking read (a green hub that does
        not own the socket polls it); False means: read blocking as usual.
        """
        while True:
            self.read_available(deadline=give_up_at)
            if until():
                return
            timeout: Optional[float] = None
            if deadline is not None:
                timeout = deadline - time.monotonic()
                if timeout <= 0:
                    return
            heartbeat = self.heartbeat
            if heartbeat:  # wake up in time to send our heartbeats and check the broker's
                timeout = heartbeat / 4 if timeout is None else min(timeout, heartbeat / 4)
            if wait_input is not None and self._replies is not None and wait_input(self.socket, timeout):
                continue
            self.read(timeout, give_up_at)
            self._flush_acks(give_up_at, True)
            self.heartbeat_if_due(give_up_at, True)
            if until():
                return

    def _flush_acks(self, deadline: Optional[float], recover: bool) -> None:
        replies = self._replies
        if replies is None or not replies.unacked:
            return
        try:
            with self.write_lock:  # a poll may write its marker beside the reader
                replies.flush_acks()
        except self.recoverable() as exc:
            # unacked replies are redelivered after the reconnect; the table ignores repeats
            self._lost_while_writing(replies, exc, deadline, recover)

    def heartbeat_if_due(self, deadline: Optional[float], recover: bool = True) -> None:
        """Send and check heartbeats when due (cheap otherwise): also while only polling state."""
        connection = self._connection
        if connection is None or time.monotonic() < self._heartbeat_due:
            return
        self._heartbeat_due = time.monotonic() + (connection.heartbeat or 0) / 4
        replies = self._replies
        try:
            with self.write_lock:
                connection.heartbeat_check()
        except self.recoverable() as exc:
            self._lost_while_writing(replies, exc, deadline, recover)

    def _lost_while_writing(self, replies: Any, exc: BaseException, deadline: Optional[float],
                            recover: bool) -> None:
        if self.closed:
            return
        if recover:
            self.recover(exc, deadline)
            return
        with self.lock:
            if self._replies is replies and replies is not None:
                self.reconnects += 1
                self._break(exc)


def _channel_counts(replies: ReplyChannel) -> Dict[str, int]:
    return {'acked': replies.acked, 'reads': replies.reads, 'frames': replies.frames_parsed}


def _socket_of(connection: Any) -> Any:
    transport = getattr(getattr(connection, 'connection', None), 'transport', None)
    return getattr(transport, 'sock', None)


def _drop(connection: Any) -> None:
    """Drop ``connection`` without a handshake (a thread blocked reading it wakes up)."""
    try:
        connection.collect()
    except Exception:
        logger.debug('error while dropping a reply connection', exc_info=True)
    connection._closed = True  # kombu would otherwise reconnect on the next use of it

