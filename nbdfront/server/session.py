"""One client connection: its reader thread, its workers, its outbox."""

from __future__ import annotations

import errno
import functools
import logging
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

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
from nbdfront.server.budget import Budget
from nbdfront.server.outbox import Outbox
from nbdfront.server.sending import buffers_length, shutdown_quietly
from nbdfront.server.workers import Workers
from nbdfront.tls import ServerTLS, TLSStream

log = logging.getLogger(__name__)

# Worker threads per connection: enough that a handful of slow registry
# fetches leave room for more.
WORKERS_PER_CONNECTION = 16
# A longer read is read from the export, and with structured replies sent,
# in pieces of at most this size that end on its multiples; a cache hint is
# asked of the export in pieces of this size.
READ_PIECE = 4 * 1024 * 1024
INFLIGHT_REQUESTS = 512
# Reply bytes of hits gathered before they are handed to the outbox, and buffers of
# any replies (tiny reads and flushes make many buffers of few bytes).
BATCH_BYTES = 256 * 1024
BATCH_BUFFERS = 512
RECV_SIZE = 256 * 1024
# Bytes received at a time before an export is chosen. An option may be answered with
# far more than it takes (LIST names every export): a client that sends options without
# reading the answers gets those of a few answered, and is read from again only once they
# are sent, as the spec has a client wait for each answer before its next option.
HANDSHAKE_RECV_SIZE = 256
# Requests parsed while the budget is full that wait their turn for room, while those
# behind them that need none (hits, flushes, block status, refusals) are answered; at
# most this many, so a client that sends misses without end is read no further.
WAITING_REQUESTS = 128
# After DISC, how often reads still waiting for room look whether the client has given
# up taking the replies that hold it.
ABANDONED_POLL = 0.16
_DF = int(CommandFlag.DF)

Waiting = tuple[int, Callable[[], None], ReadRequest | CacheRequest]


class Host(Protocol):
    """What a session needs of its server (``NBDServer``): its exports and settings, its
    throttled logs, and word of the session choosing an export and ending. Named here, so
    that the server's module imports this one and not the other way round."""

    tls: ServerTLS | None
    catalog: Catalog
    exports: dict[str, Export]
    drain_timeout: float
    handshake_timeout: float
    hangups: ThrottledLog
    failures: FailureLog

    def connection_budget(self) -> int: ...

    def has_room(self, nbytes: int) -> bool: ...

    def count_reading(self, session: Session) -> None: ...

    def forget(self, session: Session) -> None: ...


class Session:
    """One client connection, from greeting to close.

    Its reader thread receives, parses and answers hits
    (``Export.read_cached``); reads that must wait and cache hints go to the
    workers, within the budget. Every reply leaves through the outbox.
    """

    def __init__(self, server: Host, sock: socket.socket, peer: str):
        self._server = server
        self._sock: socket.socket | TLSStream = sock
        self._plain_sock = sock  # under TLS too: what the client sends arrives on it
        self._poller: select.poll | None = None  # made once requests wait for room
        self.peer = peer
        policy = server.tls.policy if server.tls is not None else TLSPolicy.OFF
        self._protocol = ServerConnection(server.catalog, tls=policy)
        self._budget = Budget(server.connection_budget, INFLIGHT_REQUESTS, server.has_room)
        self._outbox = Outbox(sock, self._budget, f"nbd-{peer}")
        self._workers = Workers(f"nbd-{peer}", WORKERS_PER_CONNECTION)
        self._export: Export | None = None
        # The export's zero-copy hit (``CachedBlob.hold_cached``), when it has one.
        self._hold: Callable[[int, int], Held | None] | None = None  # the export's hold_cached
        self._batch: list[Buffer] = []
        self._batch_bytes = 0
        self._waiting: deque[Waiting] = deque()  # parsed, for workers once there is room
        self._reads_since_recv = 0
        self._recv_view = memoryview(bytearray(RECV_SIZE))
        self.started = self.last_heard = time.monotonic()
        self.selected = False
        self._ended = False  # the client has gone: hints in flight stop
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
        """How long its replies have waited for the client to take any (see ``Outbox``)."""
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
            self._ended = True
            self._workers.stop(give_up=self._replies_abandoned)
            self._outbox.close(self._server.drain_timeout)
            self._finish()

    def _replies_abandoned(self) -> bool:
        """The client has gone and took no reply for the drain: cut, so reads waiting for
        room that only its taking replies would make end now (``Outbox.close`` then
        has nothing to wait for)."""
        if self._outbox.stalled_for(time.monotonic()) <= self._server.drain_timeout:
            return False
        self.cut()
        return True

    @property
    def stopping(self) -> bool:
        return self._protocol.shutting_down

    def refuse_new_work(self) -> None:
        """Shutdown has begun: options and requests from now on are refused
        (ERR_SHUTDOWN, ESHUTDOWN), which tells the client to disconnect."""
        self._protocol.begin_shutdown()

    def stop_reading(self) -> None:
        """Shutdown, once nothing is in flight: take nothing more; what is queued is sent."""
        shutdown_quietly(self._sock, socket.SHUT_RD)

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
                self._batch_bytes += buffers_length(out)
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
                # The answer to GO (or EXPORT_NAME) leaves before any request behind it
                # is parsed: a worker's reply goes straight to the outbox, and a client
                # that sent requests without waiting would read one in its place.
                self._flush()
            else:
                # The spec has every request before DISC answered, while the client
                # takes the answers: one that takes none is cut after the drain.
                while self._waiting:
                    if not self._start_next(ABANDONED_POLL):
                        self._replies_abandoned()
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
            self._sock = TLSStream.accept(self._sock, self._server.tls.context, self._tls_failed)
        except (OSError, ValueError):  # said by _tls_failed, before the alert went out
            return False
        self._outbox.use(self._sock)
        self._protocol.tls_started()
        log.info("%s now speaks TLS", self.peer)
        return True

    def _tls_failed(self, exc: Exception) -> None:
        """Said throttled: one cause (a scanner, clients of another CA) fails them by
        the hundred."""
        self._server.hangups.warning("TLS handshake with %s failed: %s", self.peer, exc)

    def _recv(self, flags: int) -> Buffer:
        """One receive; on a plain socket into the connection's own buffer, as a view
        valid until the next receive. ``recv`` would allocate its whole size anew each
        time, which for a large size is an mmap and a munmap per request."""
        sock = self._sock
        size = RECV_SIZE if self.selected else HANDSHAKE_RECV_SIZE
        if type(sock) is TLSStream:
            return sock.recv(size, flags)
        return self._recv_view[: sock.recv_into(self._recv_view, size, flags)]

    def _receive(self) -> Buffer | None:
        """The client's next bytes (``b""`` at its end), None if the socket failed.

        The batch goes to the outbox before this thread waits. When the
        client sends requests in bursts, those already waiting in the socket
        are taken first, so the replies to a burst leave in one send; a
        client waiting on each reply costs no extra system call. Requests
        waiting for budget room are started first; while they wait, this
        thread wakes for room or for the client's next bytes, whichever
        comes first, so that what needs no room is answered at once.
        """
        pipelined, self._reads_since_recv = self._reads_since_recv > 1, 0
        try:
            while self._waiting:
                wait = self._start_waiting()
                if not wait:
                    continue
                try:
                    data = self._recv(socket.MSG_DONTWAIT)
                except BlockingIOError:
                    self._room_or_request(wait)
                    continue
                self.last_heard = time.monotonic()
                return data
            if pipelined and self._batch:
                try:
                    data = self._recv(socket.MSG_DONTWAIT)
                except BlockingIOError:
                    pass
                else:
                    self.last_heard = time.monotonic()
                    return data
            self._flush()
            if not self.selected and not self._answers_sent():
                return None
            data = self._recv(0)
        except OSError as exc:
            log.info("connection from %s ended: %s", self.peer, exc)
            return None
        self.last_heard = time.monotonic()
        return data

    def _room_or_request(self, timeout: float) -> None:
        """Wait, ``timeout`` seconds at most, until the budget may have room
        (``Budget.signal``) or the client has sent more."""
        if self._poller is None:
            self._poller = select.poll()
            self._poller.register(self._plain_sock, select.POLLIN)
            self._poller.register(self._budget.signal, select.POLLIN)
        self._poller.poll(timeout * 1000)

    def _answers_sent(self) -> bool:
        """Before an export is chosen: wait, within the handshake deadline, until the
        answers to the options so far are sent; False if they never were."""
        timeout = self._server.handshake_timeout
        if self._outbox.drained(max(0.0, self.started + timeout - time.monotonic())):
            return True
        if not self._outbox.broken:  # else it was cut, or it went, and that was said
            log.info("closing %s: its option answers not taken within %ss", self.peer, timeout)
        return False

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
                if data is not None and buffers_length(data) == length:
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
            if buffers_length(views) != request.length:
                return False
            batch, self._batch, self._batch_bytes = self._batch, [], 0
            reply = batch + self._protocol.send_read(request, views)
            queued = self._outbox.put(reply, borrowed=True)
        finally:
            release()
        if queued:
            self._wait_for_room()
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
        """Give ``job`` to a worker within the budget; with no room now, it waits its
        turn (``_start_next``) and the requests parsed behind it are answered meanwhile
        if they need no room: a flush or block status never waits for slow reads."""
        if self._waiting or not self._budget.acquire(nbytes, wait=False):
            self._waiting.append((nbytes, job, request))
            if len(self._waiting) >= WAITING_REQUESTS:
                self._start_next()
            return
        self._submit(nbytes, job, request)

    def _start_next(self, timeout: float | None = None) -> bool:
        """Start the first waiting request, waiting ``timeout`` at most for room, then
        those behind it that fit at once; False if no room came in time (True if the
        connection broke: nothing waits then). Every answer made so far leaves first."""
        self._send_answered()
        if not self._budget.acquire(self._waiting[0][0], timeout=timeout):
            return self._given_up()
        self._start_granted()
        return True

    def _start_waiting(self) -> float:
        """Start the first waiting request, and those behind it, if it fits now (0.0);
        else how long to wait at most for ``Budget.signal`` before asking again (0.0
        if the connection broke: nothing waits then). Every answer made so far leaves
        first."""
        self._send_answered()
        wait = self._budget.acquire_or_signal(self._waiting[0][0])
        if not wait:
            self._start_granted()
        elif self._given_up():
            return 0.0
        return wait

    def _given_up(self) -> bool:
        """No room came: True if that is because the connection broke (nothing waits
        any more, and the reader is about to see it)."""
        if self._outbox.broken:
            self._waiting.clear()
        return self._outbox.broken

    def _start_granted(self) -> None:
        """Submit the first waiting request, granted its bytes, and those behind it that fit."""
        self._submit(*self._waiting.popleft())
        while self._waiting and self._budget.acquire(self._waiting[0][0], wait=False):
            self._submit(*self._waiting.popleft())

    def _send_answered(self) -> None:
        """Hand the outbox every answer made on this thread: the batch, and what the
        protocol answered itself (a flush or block status parsed ahead of this read)."""
        self._batch += self._protocol.data_to_send()
        self._flush()

    def _submit(
        self, nbytes: int, job: Callable[[], None], request: ReadRequest | CacheRequest
    ) -> None:
        """Give ``job``, granted ``nbytes``, to a worker; if none can start, answer
        ``request`` with ENOMEM."""
        if not self._workers.submit(job):
            self._budget.release(nbytes)
            exc = OSError(errno.ENOMEM, "no thread could be started to serve it")
            said = describe(exc, request)
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
                self._wait_for_room()

    def _wait_for_room(self) -> None:
        """Wait until the bytes held are within the limit again, which may take reads in
        flight ending (the limit shrinks as connections open). What the protocol
        answered itself (a flush or block status parsed ahead of this read) is queued
        first: it would otherwise wait as long, unsent."""
        out = self._protocol.data_to_send()
        if out:
            self._outbox.put(out)
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
                # Pieces end on multiples of their size: between the ends of an unaligned
                # read every chunk is aligned, as the spec asks of a server.
                size = min(READ_PIECE - offset % READ_PIECE, end - offset)
                piece = self._export.read(offset, size)
                got = buffers_length(piece)
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
            failed = ReadFailed(request, nbd_error(exc), describe(exc, request), at)
            # Logged before the error goes out: a mount failing on it reads the log for
            # the cause as soon as the kernel has it.
            self._server.failures.failed(exc, request)
            self._outbox.put(self._protocol.send(failed))
        finally:
            if granted:
                self._budget.release(granted)

    @property
    def _client_gone(self) -> bool:
        """The client hung up, sent DISC, or stopped taking replies for good."""
        return self._ended or self._outbox.broken

    def _serve_cache_hint(self, request: CacheRequest, granted: int, done: int = 0) -> None:
        """On a worker: one step (a piece) of a cache hint, then the next step queues up.

        A hint over a huge range never holds a worker for long, reads queued
        behind it get their turn between steps, and the budget counts the
        piece each step may make the export hold. Once the client has gone
        (hung up, or sent DISC) the hint stops: it is advice, and nothing would
        read what it fetched.
        """
        assert self._export is not None
        size = min(READ_PIECE, request.length - done)
        try:
            if size > 0 and not self._client_gone:
                self._export.cache(request.offset + done, size)
        except Exception as exc:
            reply = CommandDone(request, nbd_error(exc), describe(exc, request))
            self._server.failures.failed(exc, request)
        else:
            if done + size < request.length and not self._client_gone:
                step = functools.partial(self._serve_cache_hint, request, granted, done + size)
                if self._workers.submit(step):  # this thread runs, so it is taken
                    return
            reply = CommandDone(request)
        self._outbox.put(self._protocol.send(reply))
        self._budget.release(granted)

    def _finish(self) -> None:
        shutdown_quietly(self._sock, socket.SHUT_RDWR)
        self._sock.close()
        self._budget.close_signal()
        self._server.forget(self)


def describe(exc: BaseException, request: ReadRequest | CacheRequest) -> str:
    return f"{type(exc).__name__} at {request.offset}+{request.length}: {exc}"


class FailureLog(ThrottledLog):
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
