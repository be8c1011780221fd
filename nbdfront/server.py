"""The NBD server: sockets and threads around the sans-I/O protocol.

Each connection has one reader thread that receives and parses requests and
answers cache hits itself, with no hand-off; reads that must wait (a miss,
or a read larger than one piece) and cache hints go to the connection's
worker threads. Replies go out in the order they finish, through an outbox
that sends at once what the socket takes and queues the rest for a writer
thread: no thread that reads requests or serves a read ever blocks on a
slow client, so a client that writes a burst of requests before it reads
any reply cannot deadlock with the server. A per-connection budget counts
the bytes of reads in flight and of replies queued; over it, the reader
stops taking requests, so memory stays bounded however many requests a
client queues, and a misbehaving client only ever occupies its own threads.

Connections get a deadline for the whole handshake, an optional idle limit
once transmission has begun, and a count limit at which a connection still
in its handshake makes room for a newcomer; one that has chosen its export
is never cut for another (the spec allows a disconnect only for a broken
rule, and it may be a mounted disk). Stopping is bounded: new options and
requests are refused (ERR_SHUTDOWN, ESHUTDOWN) while replies in flight get
a drain timeout, then connections are cut; every thread is a daemon, so a
read stuck in a fetch never holds up the exit.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import ipaddress
import logging
import os
import queue
import select
import signal
import socket
import stat
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping, Sequence

from blockstore.errors import BlockstoreError
from blockstore.export import Buffer, Export, Held
from blockstore.throttledlog import ThrottledLog
from nbdfront.protocol import (
    NEED_DATA,
    CacheRequest,
    Catalog,
    CommandDone,
    ConnectionClosed,
    ExportSelected,
    ReadFailed,
    ReadPiece,
    ReadReply,
    ReadRequest,
    ServerConnection,
    StartTLS,
    TLSPolicy,
    nbd_error,
)
from nbdfront.protocol.constants import CommandFlag
from nbdfront.tls import ServerTLS, TLSStream

log = logging.getLogger(__name__)

DEFAULT_PORT = 10809
# Worker threads per connection: enough that a handful of slow registry
# fetches leave room for more.
WORKERS_PER_CONNECTION = 16
# A longer read is read from the export, and with structured replies sent,
# in pieces of this size; so is a cache hint asked of the export.
READ_PIECE = 4 * 1024 * 1024
# Bytes of reads in flight and replies queued, per connection: eight pieces, or a share
# of SERVER_INFLIGHT_BYTES when many connections are open (a piece at least), so that
# clients that send reads and take no replies cannot hold gigabytes between them.
INFLIGHT_BYTES = 8 * READ_PIECE
SERVER_INFLIGHT_BYTES = 512 * 1024 * 1024
# How often a read larger than its connection's share looks again for room server-wide.
ROOM_POLL = 0.05
INFLIGHT_REQUESTS = 512
# Reply bytes of hits gathered before they are handed to the outbox, and buffers of
# any replies (tiny reads and flushes make many buffers of few bytes).
BATCH_BYTES = 256 * 1024
BATCH_BUFFERS = 512
# Queued replies in more buffers than this, averaging fewer bytes than SMALL_BUFFER,
# are joined into one: each buffer costs a view and an iovec, more than its bytes.
JOIN_BUFFERS = 16
SMALL_BUFFER = 4096
RECV_SIZE = 256 * 1024
# A client that has not chosen an export this long after connecting is dropped.
HANDSHAKE_TIMEOUT = 10.0
# Connections beyond this many make room by closing one stalled in its handshake.
MAX_CONNECTIONS = 256
# ... if it has sent nothing for this long; else the newcomer is refused.
EVICTABLE_IDLE = 2.0
# How often shutdown looks whether the replies in flight are all sent.
DRAIN_POLL = 0.01
# How long shutdown waits for in-flight replies before cutting connections.
DRAIN_TIMEOUT = 5.0
# After the cut, how long shutdown waits for connection threads to notice. A thread
# stuck in an export's read past this is a daemon and never holds up the exit.
CUT_GRACE = 1.0
# How often deadlines (handshake, idle) are checked.
WATCH_INTERVAL = 0.1
_IOV_MAX = 1024
# What the writer thread sends between two notes that the client took bytes.
SEND_STEP = 1024 * 1024
# How long a reply sent from the cache's buffers may wait for the client to take it
# before the rest is copied and queued.
HELD_SEND_WAIT = 0.05
_DF = int(CommandFlag.DF)


def send_buffers(sock: socket.socket | TLSStream, buffers: Sequence[Buffer]) -> None:
    """Send every byte of ``buffers`` with scatter-gather writes, no joining copy. More
    buffers than one ``sendmsg`` takes go in windows of that many, each walked once."""
    for start in range(0, len(buffers), _IOV_MAX):
        window = buffers[start : start + _IOV_MAX]
        sent = sock.sendmsg(window)
        if sent == _length(window):
            continue  # the usual case: one call, no views made
        rest = _advance(window, sent)
        first = 0
        while first < len(rest):
            first = _skip_sent(rest, first, sock.sendmsg(rest[first:]))


def _steps(buffers: Sequence[Buffer], size: int) -> Iterator[list[Buffer]]:
    """``buffers`` in groups of about ``size`` bytes, a longer buffer cut into views."""
    step: list[Buffer] = []
    room = size
    for buffer in buffers:
        view = memoryview(buffer).cast("B")
        while view.nbytes > room:
            step.append(view[:room])
            yield step
            view, step, room = view[room:], [], size
        if view.nbytes:
            step.append(view)
            room -= view.nbytes
    if step:
        yield step


def _advance(buffers: Sequence[Buffer], sent: int) -> list[memoryview]:
    """What is left of ``buffers`` once ``sent`` bytes went out, as byte views."""
    rest: list[memoryview] = []
    for buffer in buffers:
        view = memoryview(buffer).cast("B")
        size = view.nbytes
        if sent >= size:
            sent -= size
            continue
        rest.append(view[sent:] if sent else view)
        sent = 0
    return rest


def _skip_sent(views: list[memoryview], first: int, sent: int) -> int:
    """The index of the first view not wholly sent once ``sent`` more bytes from
    ``views[first]`` on went out; a view sent in part is cut down in place. Walking
    an index, not rebuilding the list, keeps a long batch linear in its length."""
    while sent and first < len(views):
        size = views[first].nbytes
        if sent < size:
            views[first] = views[first][sent:]
            return first
        sent -= size
        first += 1
    while first < len(views) and not views[first].nbytes:
        first += 1
    return first


class _Budget:
    """Bytes and requests in flight on one connection; ``acquire`` waits while over.

    Reads handed to workers hold what they were granted until their reply is
    in the outbox; reply bytes the socket has not taken are ``charge``\\ d by
    the outbox until sent. ``close`` wakes every waiter for good.
    """

    def __init__(
        self,
        max_bytes: Callable[[], int],
        max_requests: int,
        room: Callable[[int], bool] = lambda nbytes: True,
    ):
        """``max_bytes()``: the limit now (it shrinks as connections open). ``room(n)``:
        whether the server as a whole can take ``n`` more bytes; asked of a read larger
        than the limit, which would otherwise be granted whole to a connection holding
        nothing (a read that is not streamed, up to 32 MiB)."""
        self._max_bytes = max_bytes
        self._max_requests = max_requests
        self._room = room
        self.bytes = 0
        self.requests = 0
        self._closed = False
        self._cond = threading.Condition(threading.Lock())

    def acquire(self, nbytes: int, *, wait: bool = True) -> bool:
        """Take ``nbytes`` and one request; False (nothing taken) if over and not
        ``wait``, or if closed. Something is always granted when nothing is held."""
        with self._cond:
            while True:
                limit = self._max_bytes()
                if (self.requests or self.bytes > 0) and (
                    self.bytes + nbytes > limit or self.requests >= self._max_requests
                ):
                    if not wait or self._closed:
                        return False
                    self._cond.wait()
                elif nbytes > limit and not self._room(nbytes):
                    # Other connections free what they hold without a word to this one.
                    if not wait or self._closed:
                        return False
                    self._cond.wait(ROOM_POLL)
                else:
                    break
            if self._closed:
                return False
            self.bytes += nbytes
            self.requests += 1
            return True

    def release(self, nbytes: int) -> None:
        with self._cond:
            self.bytes -= nbytes
            self.requests -= 1
            self._cond.notify_all()

    def charge(self, nbytes: int) -> None:
        """Count queued reply bytes: never waits, may go over."""
        with self._cond:
            self.bytes += nbytes

    def refund(self, nbytes: int) -> None:
        with self._cond:
            self.bytes -= nbytes
            self._cond.notify_all()

    def wait_for_room(self) -> None:
        """Return once the bytes are within the limit (or the connection is gone)."""
        with self._cond:
            while self.bytes > self._max_bytes() and not self._closed:
                self._cond.wait()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


class _Outbox:
    """Reply bytes on their way to one client, in the order they were put.

    ``put`` sends at once what the socket takes without waiting; the rest
    is queued for a writer thread (started at the first need) and charged
    to the budget until sent. A failed send marks the connection broken:
    later replies are dropped, and the socket is shut so the reader stops.
    """

    def __init__(self, sock: socket.socket, budget: _Budget, name: str):
        self.sock: socket.socket | TLSStream = sock
        self._direct = True  # a plain socket takes a send that must not wait
        self._budget = budget
        self._name = name
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._queue: list[Buffer] = []
        self._queued = 0
        self._writing = False  # the writer is sending bytes taken off the queue
        self._last_taken = time.monotonic()  # when the client last took reply bytes
        self._closing = False
        self._writer: threading.Thread | None = None
        self.broken = False

    @property
    def busy(self) -> bool:
        return bool(self._queue) or self._writing

    def stalled_for(self, now: float) -> float:
        """How long replies have waited with the client taking none of them (0 when
        nothing waits): a racy glance, for deadlines."""
        return now - self._last_taken if self.busy else 0.0

    @property
    def last_taken(self) -> float:
        """When the client last took queued reply bytes (or replies began to wait)."""
        return self._last_taken

    def _taken(self) -> None:
        self._last_taken = time.monotonic()

    def put(self, buffers: Sequence[Buffer], *, borrowed: bool = False) -> bool:
        """Send or queue ``buffers``; True if some are left queued behind a slow client.

        ``borrowed`` buffers are valid only until this returns (views into
        the cache): what must wait for the writer is copied first.
        """
        with self._lock:
            if self.broken:
                return False
            if self._queue or self._writing or not self._direct:
                rest, left = list(buffers), _length(buffers)
            else:
                total = _length(buffers)
                try:
                    try:
                        sent = self.sock.sendmsg(buffers[:_IOV_MAX], (), socket.MSG_DONTWAIT)  # type: ignore[call-arg]
                    except BlockingIOError:
                        sent = 0
                    if sent < total and borrowed:
                        sent += self._send_while_taken(_advance(buffers, sent))
                except OSError as exc:
                    self._break(exc)
                    return False
                if sent == total:
                    return False
                rest, left = _advance(buffers, sent), total - sent
            if borrowed or (len(rest) > JOIN_BUFFERS and left < SMALL_BUFFER * len(rest)):
                rest = [b"".join(rest)]
            if not self.busy:
                self._last_taken = time.monotonic()  # the wait starts now
            self._queue += rest
            self._queued += left
            self._budget.charge(left)
            if self._writer is None:
                writer = threading.Thread(
                    target=self._write, name=f"{self._name}-send", daemon=True
                )
                try:
                    writer.start()
                except RuntimeError as exc:  # out of threads: the queue cannot drain
                    self._break(exc)
                    return False
                self._writer = writer
            self._changed.notify_all()
            return True

    def _send_while_taken(self, rest: list[memoryview]) -> int:
        """Go on sending borrowed ``rest`` while the client keeps taking it, for
        ``HELD_SEND_WAIT`` seconds at most in all; the bytes sent.

        A client with many reads in flight (nbdcopy) fills the socket's buffer
        with the first replies: waiting a moment for it to drain sends the rest
        from the cache's own buffers, where queueing it would copy it first and
        hand it to the writer thread. A client that takes bytes slowly, or not
        at all, costs one such wait: the rest is then queued, and the read
        transaction, which must not be held for long, ends.
        """
        sock = self.sock
        assert isinstance(sock, socket.socket)
        sent = first = 0
        poller = select.poll()
        poller.register(sock, select.POLLOUT)
        deadline = time.monotonic() + HELD_SEND_WAIT
        while first < len(rest):
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(left * 1000):
                break
            try:
                took = sock.sendmsg(rest[first : first + _IOV_MAX], (), socket.MSG_DONTWAIT)
            except BlockingIOError:
                continue
            sent += took
            first = _skip_sent(rest, first, took)
        return sent

    def use(self, stream: TLSStream) -> None:
        """Send through ``stream`` from now on (TLS), always from the writer thread:
        a TLS stream's send cannot be asked not to wait."""
        with self._lock:
            self.sock = stream
            self._direct = False

    def drained(self, timeout: float) -> bool:
        """Wait, ``timeout`` at most, until everything put has been sent."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self.busy and not self.broken:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(left)
            return not self.broken

    def close(self, timeout: float) -> None:
        """Let queued bytes go out, for ``timeout`` at most, then end the writer."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self.busy and not self.broken:
                left = deadline - time.monotonic()
                if left <= 0:
                    self._break(TimeoutError("queued replies were not taken in time"))
                    break
                self._changed.wait(left)
            self._closing = True
            self._changed.notify_all()

    def cut(self) -> None:
        with self._lock:
            self._break(ConnectionAbortedError("connection cut"))

    def _write(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._closing and not self.broken:
                    self._changed.wait()
                if self.broken or not self._queue:
                    return
                batch, self._queue = self._queue, []
                nbytes, self._queued = self._queued, 0
                self._writing = True
            try:
                # In steps, each a sign the client takes its replies: a slow reader of a
                # large batch is slow, not stalled (``stalled_for``).
                for step in _steps(batch, SEND_STEP):
                    send_buffers(self.sock, step)
                    self._taken()
            except OSError as exc:
                with self._lock:
                    self._break(exc)
            finally:
                with self._lock:
                    self._writing = False
                    self._last_taken = time.monotonic()
                    self._changed.notify_all()
                self._budget.refund(nbytes)

    def _break(self, exc: BaseException) -> None:
        """With the lock held: drop what is queued, stop the reader and every waiter."""
        if self.broken:
            return
        self.broken = True
        log.info("%s: sending failed: %s", self._name, exc)
        self._queue = []
        self._budget.refund(self._queued)
        self._queued = 0
        self._budget.close()
        _shutdown_quietly(self.sock, socket.SHUT_RDWR)
        self._changed.notify_all()


class _Workers:
    """The daemon threads of one connection that serve what may wait.

    Threads start as jobs need them, up to ``limit``; a job waits in the
    queue only while every thread is busy. Not a ``ThreadPoolExecutor``:
    its threads are joined, without a bound, when the interpreter exits,
    so one read stuck in a fetch would hold a stopping server past any
    deadline; these are daemons, and stopping waits for them within a bound.
    """

    def __init__(self, name: str, limit: int):
        self._name = name
        self._limit = limit
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._idle = 0  # threads waiting for a job no submit has claimed, less jobs queued
        self._pending = 0  # jobs submitted and not finished
        self._lock = threading.Lock()
        self._done = threading.Condition(self._lock)

    def submit(self, job: Callable[[], None]) -> bool:
        """Queue ``job``; False (not queued) if no thread runs and none can be started
        (the process is out of threads): the caller answers for it."""
        with self._lock:
            if self._idle <= 0 and len(self._threads) < self._limit:
                thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                try:
                    thread.start()
                except RuntimeError:  # "can't start new thread"
                    if not self._threads:
                        return False
                    # the running threads take it in turn
                else:
                    self._threads.append(thread)
                    self._idle += 1  # the new thread, waiting for this job
            # A job claims an idle thread, or the next one to finish (below zero: jobs
            # queued behind busy threads), so no thread counts as idle while it works.
            self._idle -= 1
            self._pending += 1
        self._jobs.put(job)
        return True

    def stop(self) -> None:
        """Wait for every job, including those jobs submit meanwhile; end the threads."""
        with self._lock:
            while self._pending:
                self._done.wait()
            threads = len(self._threads)
        for _ in range(threads):
            self._jobs.put(None)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                job()
            except Exception:  # a bug costs its own request, not the thread
                log.exception("internal error in %s", self._name)
            with self._lock:
                self._idle += 1
                self._pending -= 1
                if not self._pending:
                    self._done.notify_all()


class _Session:
    """One client connection, from greeting to close.

    Its reader thread receives, parses and answers hits
    (``Export.read_cached``); reads that must wait and cache hints go to the
    workers, within the budget. Every reply leaves through the outbox.
    """

    def __init__(self, server: NBDServer, sock: socket.socket, peer: str):
        self._server = server
        self._sock: socket.socket | TLSStream = sock
        self.peer = peer
        policy = server.tls.policy if server.tls is not None else TLSPolicy.OFF
        self._protocol = ServerConnection(server.catalog, tls=policy)
        self._budget = _Budget(server.connection_budget, INFLIGHT_REQUESTS, server.has_room)
        self._outbox = _Outbox(sock, self._budget, f"nbd-{peer}")
        self._workers = _Workers(f"nbd-{peer}", WORKERS_PER_CONNECTION)
        self._export: Export | None = None
        # The export's zero-copy hit (``CachedBlob.hold_cached``), when it has one.
        self._hold: Callable[[int, int], Held | None] | None = None  # the export's hold_cached
        self._batch: list[Buffer] = []
        self._batch_bytes = 0
        self._reads_since_recv = 0
        self._recv_view = memoryview(bytearray(RECV_SIZE))
        self.started = self.last_heard = time.monotonic()
        self.selected = False
        self.thread = threading.Thread(target=self.run, name=f"nbd-{peer}", daemon=True)

    @property
    def bytes_held(self) -> int:
        """Bytes of reads in flight and replies not sent (a racy glance)."""
        return self._budget.bytes

    @property
    def idle(self) -> bool:
        """Nothing in flight and nothing waiting to be sent (a racy glance, for deadlines)."""
        return not self._budget.requests and not self._outbox.busy

    def stalled_for(self, now: float) -> float:
        """How long its replies have waited for the client to take any (see ``_Outbox``)."""
        return self._outbox.stalled_for(now)

    def quiet_for(self, now: float) -> float:
        """How long since the client last sent a byte or took a queued reply."""
        return now - max(self.last_heard, self._outbox.last_taken)

    def run(self) -> None:
        try:
            self._serve()
        except Exception:
            log.exception("internal error on the connection from %s; closing it", self.peer)
            self.cut()
        finally:
            self._workers.stop()
            self._outbox.close(self._server.drain_timeout)
            self._finish()

    @property
    def stopping(self) -> bool:
        return self._protocol.shutting_down

    def refuse_new_work(self) -> None:
        """Shutdown has begun: options and requests from now on are refused
        (ERR_SHUTDOWN, ESHUTDOWN), which tells the client to disconnect."""
        self._protocol.begin_shutdown()

    def stop_reading(self) -> None:
        """Shutdown, once nothing is in flight: take nothing more; what is queued is sent."""
        _shutdown_quietly(self._sock, socket.SHUT_RD)

    def cut(self) -> None:
        """Break the connection: blocked receives and sends return, replies are dropped."""
        self._outbox.cut()

    def _serve(self) -> None:
        """Receive and parse until the conversation is over, answering or handing off work."""
        protocol = self._protocol
        while True:
            event = protocol.next_event()
            if type(event) is ReadRequest:
                # What the protocol answered itself before this read waits for
                # the next event (at the latest, the flush before a receive).
                self._reads_since_recv += 1
                self._answer(event)
                continue
            out = protocol.data_to_send()
            if out:
                self._batch += out
                self._batch_bytes += _length(out)
                if len(self._batch) >= BATCH_BUFFERS:
                    self._flush()
            if event is NEED_DATA:
                data = self._receive()
                if data is None:
                    return
                protocol.receive_data(data)
            elif isinstance(event, CacheRequest):
                step = min(event.length, READ_PIECE)
                self._hand_off(step, functools.partial(self._serve_cache_hint, event, step), event)
            elif isinstance(event, StartTLS):
                if not self._start_tls():
                    return
            elif isinstance(event, ExportSelected):
                self._export = self._server.exports[event.name]
                self._hold = getattr(self._export, "hold_cached", None)
                self._server.count_reading(self)
                log.info("%s reads export %r", self.peer, event.name)
            else:
                self._flush()
                if isinstance(event, ConnectionClosed):
                    reason = event.reason
                    if self.stopping and event.clean and reason.startswith("client hung up"):
                        reason = "the server is stopping"  # its own shutdown of the read side
                    if event.clean:
                        log.info("closing connection from %s: %s", self.peer, reason)
                    else:
                        self._server.hangups.warning(
                            "closing connection from %s: %s", self.peer, reason
                        )
                else:
                    log.info("%s disconnected", self.peer)
                return

    def _start_tls(self) -> bool:
        """Send the STARTTLS ACK, then make the handshake; False if it failed."""
        assert self._server.tls is not None and isinstance(self._sock, socket.socket)
        self._flush()
        if not self._outbox.drained(self._server.handshake_timeout):
            return False
        try:
            self._sock = TLSStream.accept(self._sock, self._server.tls.context)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            log.warning("TLS handshake with %s failed: %s", self.peer, exc)
            return False
        self._outbox.use(self._sock)
        self._protocol.tls_started()
        log.info("%s now speaks TLS", self.peer)
        return True

    def _recv(self, flags: int) -> Buffer:
        """One receive; on a plain socket into the connection's own buffer, as a view
        valid until the next receive. ``recv`` would allocate its whole size anew each
        time, which for a large size is an mmap and a munmap per request."""
        sock = self._sock
        if type(sock) is TLSStream:
            return sock.recv(RECV_SIZE, flags)
        return self._recv_view[: sock.recv_into(self._recv_view, RECV_SIZE, flags)]

    def _receive(self) -> Buffer | None:
        """The client's next bytes (``b""`` at its end), None if the socket failed.

        The batch goes to the outbox before this thread waits. When the
        client sends requests in bursts, those already waiting in the socket
        are taken first, so the replies to a burst leave in one send; a
        client waiting on each reply costs no extra system call.
        """
        pipelined, self._reads_since_recv = self._reads_since_recv > 1, 0
        try:
            if pipelined and self._batch:
                try:
                    data = self._recv(socket.MSG_DONTWAIT)
                except BlockingIOError:
                    pass
                else:
                    self.last_heard = time.monotonic()
                    return data
            self._flush()
            data = self._recv(0)
        except OSError as exc:
            log.info("connection from %s ended: %s", self.peer, exc)
            return None
        self.last_heard = time.monotonic()
        return data

    def _answer(self, request: ReadRequest) -> None:
        """A hit goes into the batch at once; anything else to a worker.

        A hit whose reply is sent at once (the only request the client has
        sent, or one that fills the batch) is sent from the cache's own
        buffers, before anything else is done: at depth 1 the client waits
        for nothing else, and this thread's bookkeeping then overlaps its
        next step. Hits batched behind others are copied, so that no read
        transaction is held while another is taken.
        """
        length = request.length
        if length <= READ_PIECE:
            assert self._export is not None
            protocol = self._protocol
            at_once = (
                (self._reads_since_recv == 1 and not self._batch and not protocol.buffered)
                or self._batch_bytes + length >= BATCH_BYTES
                or len(self._batch) >= BATCH_BUFFERS
            )
            if at_once and self._hold is not None:
                if self._send_held(request):
                    return
            else:
                try:
                    data = self._export.read_cached(request.offset, length)
                except Exception:  # the worker's read meets the same fault and reports it
                    data = None
                if data is not None and _length(data) == length:
                    self._batch += protocol.send_read(request, data)
                    self._batch_bytes += length
                    if at_once:
                        self._flush()
                    return
        grant = READ_PIECE if self._streams(request) else request.length
        self._hand_off(grant, functools.partial(self._serve_miss, request, grant), request)

    def _send_held(self, request: ReadRequest) -> bool:
        """Send the batch and this hit's reply from the cache's buffers; False (nothing
        sent) if it is not a hit. The views are let go once the socket took them, or
        what it did not take was copied to the queue."""
        try:
            held = self._hold(request.offset, request.length)  # type: ignore[misc]
        except Exception:  # the worker's read meets the same fault and reports it
            return False
        if held is None:
            return False
        views, release = held
        try:
            if _length(views) != request.length:
                return False
            batch, self._batch, self._batch_bytes = self._batch, [], 0
            reply = batch + self._protocol.send_read(request, views)
            queued = self._outbox.put(reply, borrowed=True)
        finally:
            release()
        if queued:
            self._budget.wait_for_room()
        return True

    def _streams(self, request: ReadRequest) -> bool:
        """Whether a read goes out piece by piece, each piece as it is read."""
        return (
            request.length > READ_PIECE
            and self._protocol.transmission is not None
            and self._protocol.transmission.structured
            and not request.flags & _DF
        )

    def _hand_off(
        self, nbytes: int, job: Callable[[], None], request: ReadRequest | CacheRequest
    ) -> None:
        if not self._budget.acquire(nbytes, wait=False):
            self._flush()  # hits already answered never wait for the budget
            if not self._budget.acquire(nbytes):
                return  # the connection broke; the reader is about to see it
        if not self._workers.submit(job):
            self._budget.release(nbytes)
            exc = OSError(errno.ENOMEM, "no thread could be started to serve it")
            said = _describe(exc, request)
            if isinstance(request, ReadRequest):
                self._batch += self._protocol.send(ReadFailed(request, nbd_error(exc), said, None))
            else:
                self._batch += self._protocol.send(CommandDone(request, nbd_error(exc), said))
            self._server.failures.failed(exc, request)

    def _flush(self) -> None:
        """Hand the batch to the outbox; wait for room if the client is slow to take it."""
        if self._batch:
            batch, self._batch, self._batch_bytes = self._batch, [], 0
            if self._outbox.put(batch):
                self._budget.wait_for_room()

    def _serve_miss(self, request: ReadRequest, granted: int) -> None:
        """On a worker: a read that may wait (a miss, or longer than a piece).

        Read through the export in pieces; streamed reads send each piece
        as it comes, taking budget for the next, others send all at once.
        A failure is reported at the first byte not sent, never as data.
        """
        assert self._export is not None
        offset, end = request.offset, request.offset + request.length
        streamed = self._streams(request)
        data: list[Buffer] = []
        try:
            while offset < end:
                size = min(READ_PIECE, end - offset)
                piece = self._export.read(offset, size)
                got = _length(piece)
                if got != size:
                    raise OSError(5, f"export returned {got} bytes for {size}")
                if not streamed:
                    data += piece
                    offset += size
                    continue
                done = offset + size == end
                self._outbox.put(self._protocol.send(ReadPiece(request, offset, piece, done)))
                offset += size
                if self._outbox.broken:
                    return  # the client is gone: read no more for it
                if not done:
                    self._budget.release(granted)
                    granted = 0
                    if not self._budget.acquire(READ_PIECE):
                        return
                    granted = READ_PIECE
            if not streamed:
                self._outbox.put(self._protocol.send(ReadReply(request, data)))
        except Exception as exc:
            at = offset if streamed else None  # nothing of an unstreamed read was sent
            failed = ReadFailed(request, nbd_error(exc), _describe(exc, request), at)
            self._outbox.put(self._protocol.send(failed))
            self._server.failures.failed(exc, request)
        finally:
            if granted:
                self._budget.release(granted)

    def _serve_cache_hint(self, request: CacheRequest, granted: int, done: int = 0) -> None:
        """On a worker: one step (a piece) of a cache hint, then the next step queues up.

        A hint over a huge range never holds a worker for long, reads queued
        behind it get their turn between steps, and the budget counts the
        piece each step may make the export hold.
        """
        assert self._export is not None
        size = min(READ_PIECE, request.length - done)
        try:
            if size > 0 and not self._outbox.broken:
                self._export.cache(request.offset + done, size)
        except Exception as exc:
            reply = CommandDone(request, nbd_error(exc), _describe(exc, request))
            self._server.failures.failed(exc, request)
        else:
            if done + size < request.length and not self._outbox.broken:
                step = functools.partial(self._serve_cache_hint, request, granted, done + size)
                if self._workers.submit(step):  # this thread runs, so it is taken
                    return
            reply = CommandDone(request)
        self._outbox.put(self._protocol.send(reply))
        self._budget.release(granted)

    def _finish(self) -> None:
        _shutdown_quietly(self._sock, socket.SHUT_RDWR)
        self._sock.close()
        self._server._forget(self)


def _length(buffers: Sequence[Buffer]) -> int:
    """Bytes in ``buffers``, whatever their item size."""
    if len(buffers) == 1 and type(buffers[0]) is bytes:
        return len(buffers[0])  # a hit in one chunk
    total = 0
    for b in buffers:
        total += len(b) if type(b) is bytes else memoryview(b).nbytes
    return total


def _describe(exc: BaseException, request: ReadRequest | CacheRequest) -> str:
    return f"{type(exc).__name__} at {request.offset}+{request.length}: {exc}"


class _FailureLog(ThrottledLog):
    """Warnings of failed requests, throttled. Failures that are bugs (neither an
    ``OSError`` nor one of the engine's own errors, such as a damaged cache) are
    always logged whole, with their traceback."""

    def __init__(self) -> None:
        super().__init__(
            log, "%d more requests failed in the %.0f s after those logged, not logged one by one"
        )

    def failed(self, exc: BaseException, request: ReadRequest | CacheRequest) -> None:
        if not isinstance(exc, OSError | BlockstoreError):
            log.exception("request %s failed unexpectedly", request)
            return
        self.warning("request %s failed: %s", request, exc)


class NBDServer:
    """Serves read-only ``Export``\\ s to NBD clients over TCP and/or a Unix socket.

    ``default_export`` names the export a client gets when it asks for the
    empty name. ``start()`` returns once the sockets listen;
    ``serve_forever()`` blocks until ``request_shutdown()`` (safe in a
    signal handler) or ``shutdown()``, which lets in-flight replies finish,
    for ``drain_timeout`` at most, before closing.

    ``handshake_timeout`` bounds the whole handshake; ``idle_timeout``
    (None: no limit) closes a connection that has had nothing in flight
    and sent nothing for that long, or whose replies have waited that long
    with the client taking none of them. At ``max_connections``, a newcomer
    closes the connection that has been silent longest in its handshake (for
    ``EVICTABLE_IDLE`` seconds at least), or is refused.
    """

    def __init__(
        self,
        exports: Mapping[str, Export],
        *,
        tcp: tuple[str, int] | None = None,
        unix: str | os.PathLike[str] | None = None,
        default_export: str | None = None,
        inflight_bytes: int = INFLIGHT_BYTES,
        server_inflight_bytes: int = SERVER_INFLIGHT_BYTES,
        max_connections: int = MAX_CONNECTIONS,
        drain_timeout: float = DRAIN_TIMEOUT,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        idle_timeout: float | None = None,
        tls: ServerTLS | None = None,
    ):
        if tcp is None and unix is None:
            raise ValueError("give a TCP address, a Unix socket path, or both")
        self.exports = dict(exports)
        self.catalog = Catalog(self.exports, default_export)
        self.inflight_bytes = inflight_bytes
        self.server_inflight_bytes = server_inflight_bytes
        self.max_connections = max_connections
        self.drain_timeout = drain_timeout
        self.handshake_timeout = handshake_timeout
        self.idle_timeout = idle_timeout
        self.tls = tls
        self._tcp = tcp
        self.unix_path = os.fspath(unix) if unix is not None else None
        self._listeners: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._sessions: set[_Session] = set()
        self._reading = 0  # sessions that chose an export (a plain count: read on every wait)
        self._lock = threading.Lock()
        # Shutdown requests: a plain flag and a byte down a pipe, no lock, so a
        # signal handler can ask at any moment, even while this thread holds a lock.
        self._shutdown_requested = False
        self._wake_read, self._wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._stopped = threading.Event()
        self.failures = _FailureLog()
        self.accept_trouble = ThrottledLog(
            log,
            "%d more connections could not be accepted in the %.0f s after those logged, "
            "not logged one by one",
        )
        self.hangups = ThrottledLog(
            log,
            "%d more connections ended uncleanly in the %.0f s after those logged, "
            "not logged one by one",
        )
        self._stopping = False
        self.tcp_address: tuple[str, int] | None = None

    @property
    def connection_count(self) -> int:
        with self._lock:
            return len(self._sessions)

    def connection_budget(self) -> int:
        """Bytes each connection may hold now: ``inflight_bytes``, or an equal share of
        ``server_inflight_bytes`` among those that chose an export, once that is
        smaller, but a read piece at least."""
        share = self.server_inflight_bytes // max(1, self._reading)
        return max(READ_PIECE, min(self.inflight_bytes, share))

    def has_room(self, nbytes: int) -> bool:
        """Whether ``nbytes`` more fit in ``server_inflight_bytes``, or nothing at all is
        held (so a lone client's largest read is always served)."""
        held = self.bytes_in_flight
        return held == 0 or held + nbytes <= self.server_inflight_bytes

    @property
    def bytes_in_flight(self) -> int:
        """Bytes the connections hold: reads in flight and replies not taken yet."""
        with self._lock:
            return sum(session.bytes_held for session in self._sessions)

    def start(self) -> None:
        if self._tcp is not None:
            host, port = self._tcp
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            listener = socket.socket(family, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((host, port))
            listener.listen(128)
            self.tcp_address = listener.getsockname()[:2]
            self._listeners.append(listener)
        if self.unix_path is not None:
            _remove_stale_socket(self.unix_path)
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(self.unix_path)
            listener.listen(128)
            self._listeners.append(listener)
        for listener in self._listeners:
            self._start_thread("nbd-accept", self._accept_loop, listener)
        self._start_thread("nbd-deadlines", self._watch_deadlines)

    def _start_thread(self, name: str, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def uris(self) -> dict[str, str]:
        """The NBD URI of each export, in catalog order (see ``uri``)."""
        return {name: self.uri(name) for name in self.exports}

    def uri(self, name: str) -> str:
        """The NBD URI of export ``name``: TCP when listening on TCP, else the Unix socket.

        ``nbds`` when TLS is offered, so a client that follows it uses TLS.
        """
        scheme = "nbd" if self.tls is None or self.tls.policy is TLSPolicy.OFF else "nbds"
        if self.tcp_address is not None:
            host, port = self.tcp_address
            netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            return f"{scheme}://{netloc}/{_quote(name)}"
        path = urllib.parse.quote(self.unix_path, safe="/")
        return f"{scheme}+unix:///{_quote(name)}?socket={path}"

    def serve_forever(self) -> None:
        """Wait for ``request_shutdown`` (or ``shutdown`` from another thread), then stop.

        On the main thread, signals also write to the wake pipe: a signal that
        the kernel hands to another of the many threads only flags its Python
        handler, which runs when this thread next runs Python code, and it
        would sit in ``select`` for ever instead.
        """
        on_main = threading.current_thread() is threading.main_thread()
        previous = signal.set_wakeup_fd(self._wake_write) if on_main else -1
        try:
            while not self._shutdown_requested:
                try:
                    select.select([self._wake_read], [], [])
                    os.read(self._wake_read, 4096)
                except BlockingIOError:
                    pass
                except (OSError, ValueError):
                    break  # the pipe was closed: shutdown() ran on another thread
        finally:
            if on_main:
                signal.set_wakeup_fd(previous)
        self.shutdown()

    def request_shutdown(self) -> None:
        """Ask ``serve_forever`` to stop. Takes no lock: safe inside a signal handler."""
        self._shutdown_requested = True
        with contextlib.suppress(OSError):
            os.write(self._wake_write, b"\0")

    def shutdown(self) -> None:
        """Stop accepting, let in-flight replies finish (within the drain timeout), close."""
        with self._lock:
            already, self._stopping = self._stopping, True
            sessions = list(self._sessions)
        if already:
            self._stopped.wait()
            return
        self.request_shutdown()
        for listener in self._listeners:
            _shutdown_quietly(listener, socket.SHUT_RDWR)
            listener.close()
        for thread in self._threads:
            thread.join()
        deadline = time.monotonic() + self.drain_timeout
        for session in sessions:
            session.refuse_new_work()
        while any(not s.idle for s in sessions) and time.monotonic() < deadline:
            time.sleep(DRAIN_POLL)
        for session in sessions:
            session.stop_reading()
        if not self._wait_sessions(max(0.0, deadline - time.monotonic())):
            log.warning("in-flight requests did not finish in %ss; cutting", self.drain_timeout)
            with self._lock:
                for session in self._sessions:
                    session.cut()
            self._wait_sessions(CUT_GRACE)
        self.failures.flush()
        self.hangups.flush()
        self.accept_trouble.flush()
        if self.unix_path is not None:
            _remove_stale_socket(self.unix_path)
        # A late signal finds -1 and writes nowhere, never to a reused descriptor.
        wake_read, wake_write = self._wake_read, self._wake_write
        self._wake_read = self._wake_write = -1
        os.close(wake_write)
        os.close(wake_read)
        self._stopped.set()

    def _wait_sessions(self, timeout: float) -> bool:
        """Wait, ``timeout`` in all, for every connection thread to end."""
        with self._lock:
            threads = [s.thread for s in self._sessions]
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in threads)

    def _accept_loop(self, listener: socket.socket) -> None:
        while True:
            try:
                sock, address = listener.accept()
            except OSError as exc:
                if self._stopping:
                    return  # the listener was shut down
                # Out of file descriptors, or a client gone before accept: go on.
                self.accept_trouble.warning("accepting a connection failed: %s", exc)
                time.sleep(0.1)
                continue
            if listener.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                peer = f"{address[0]}:{address[1]}"
            else:
                peer = "unix"
            if not self._admit(_Session(self, sock, peer)):
                sock.close()
                if self._stopping:
                    return

    def _admit(self, session: _Session) -> bool:
        """Count ``session`` in and start it, making room at the limit if one is idle."""
        with self._lock:
            if self._stopping:
                return False
            evicted = None
            if len(self._sessions) >= self.max_connections:
                evicted = self._stalled_longest(session.started)
                if evicted is None:
                    log.warning(
                        "connection limit of %d reached, none stalled in its handshake: "
                        "refusing %s",
                        self.max_connections,
                        session.peer,
                    )
                    return False
                self._sessions.discard(evicted)
            self._sessions.add(session)
        if evicted is not None:
            log.warning(
                "connection limit of %d reached: closing %s, silent in its handshake "
                "for %.0fs, to admit %s",
                self.max_connections,
                evicted.peer,
                session.started - evicted.last_heard,
                session.peer,
            )
            evicted.cut()
        try:
            session.thread.start()
        except RuntimeError as exc:  # "can't start new thread": refused, accepting goes on
            with self._lock:
                self._sessions.discard(session)
            self.accept_trouble.warning("refusing %s: %s", session.peer, exc)
            return False
        return True

    def _stalled_longest(self, now: float) -> _Session | None:
        """The connection silent longest before choosing an export, if for
        ``EVICTABLE_IDLE`` at least (lock held). One that chose an export is never
        taken: it may be a mounted disk, idle for hours, and the spec lets a server
        disconnect only a client that broke a rule."""
        candidates = [
            s
            for s in self._sessions
            if not s.selected and s.idle and now - s.last_heard >= EVICTABLE_IDLE
        ]
        return min(candidates, key=lambda s: s.last_heard, default=None)

    def _watch_deadlines(self) -> None:
        """Close connections past the handshake deadline or the idle limit."""
        while not self._stopping:
            time.sleep(WATCH_INTERVAL)
            now = time.monotonic()
            with self._lock:
                sessions = list(self._sessions)
            for session in sessions:
                if not session.selected:
                    if now - session.started > self.handshake_timeout:
                        log.info(
                            "closing %s: no export chosen within %ss",
                            session.peer,
                            self.handshake_timeout,
                        )
                        session.cut()
                elif self.idle_timeout is None:
                    continue
                elif session.quiet_for(now) > self.idle_timeout and session.idle:
                    log.info("closing %s: idle for %ss", session.peer, self.idle_timeout)
                    session.cut()
                elif session.stalled_for(now) > self.idle_timeout:
                    # Not idle, but as good as gone: it holds its replies' memory and
                    # its slot while it reads nothing.
                    log.info(
                        "closing %s: took no reply byte for %ss", session.peer, self.idle_timeout
                    )
                    session.cut()

    def count_reading(self, session: _Session) -> None:
        """``session`` chose an export: it counts toward the shares from now on."""
        with self._lock:
            session.selected = True
            if session in self._sessions:  # not one evicted meanwhile
                self._reading += 1

    def _forget(self, session: _Session) -> None:
        with self._lock:
            if session in self._sessions:
                self._sessions.discard(session)
                self._reading -= session.selected


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable only from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _shutdown_quietly(sock: socket.socket, how: int) -> None:
    """``shutdown`` that ignores a socket the peer already closed."""
    with contextlib.suppress(OSError):
        sock.shutdown(how)


def _quote(name: str) -> str:
    return urllib.parse.quote(name, safe="")


def _remove_stale_socket(path: str) -> None:
    """Remove a socket left by an earlier run; refuse to delete anything else."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise FileExistsError(f"{path} exists and is not a socket")
    os.unlink(path)
