"""Reply bytes on their way to one client: sent at once, or queued for a writer."""

from __future__ import annotations

import logging
import select
import socket
import threading
import time
from collections.abc import Sequence

from blockstore.export import Buffer
from nbdfront.server.budget import Budget
from nbdfront.server.sending import (
    IOV_MAX,
    advance,
    buffers_length,
    send_buffers,
    shutdown_quietly,
    skip_sent,
    steps,
)
from nbdfront.tls import TLSStream

log = logging.getLogger(__name__)

# Queued replies in more buffers than this, averaging fewer bytes than SMALL_BUFFER,
# are joined into one: each buffer costs a view and an iovec, more than its bytes.
JOIN_BUFFERS = 16
SMALL_BUFFER = 4096
# What the writer thread sends before it marks that the client took bytes. Small:
# the idle limit counts from the last step sent, so a client must take a whole step
# within it; at 1 MiB one reading steadily at under 1 MiB/s was cut under a 1 s limit.
SEND_STEP = 64 * 1024
# How long a reply sent from the cache's buffers may wait for the client to take it
# before the rest is copied and queued.
HELD_SEND_WAIT = 0.05


class Outbox:
    """Reply bytes on their way to one client, in the order they were put.

    ``put`` sends at once what the socket takes without waiting; the rest
    is queued for a writer thread (started at the first need) and charged
    to the budget until sent. A failed send marks the connection broken:
    later replies are dropped, and the socket is shut so the reader stops.
    """

    def __init__(self, sock: socket.socket, budget: Budget, name: str):
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
                rest, left = list(buffers), buffers_length(buffers)
            else:
                total = buffers_length(buffers)
                try:
                    try:
                        sent = self.sock.sendmsg(buffers[:IOV_MAX], (), socket.MSG_DONTWAIT)  # type: ignore[call-arg]
                    except BlockingIOError:
                        sent = 0
                    if sent < total and borrowed:
                        sent += self._send_while_taken(advance(buffers, sent))
                except OSError as exc:
                    self._break(exc)
                    return False
                if sent == total:
                    return False
                rest, left = advance(buffers, sent), total - sent
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
                took = sock.sendmsg(rest[first : first + IOV_MAX], (), socket.MSG_DONTWAIT)
            except BlockingIOError:
                continue
            sent += took
            first = skip_sent(rest, first, took)
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
        """Let queued bytes go out while the client takes them, then end the writer.

        Given up once the client has taken none for ``timeout``: a slow client that
        said goodbye behind its reads still gets them all (the spec has a server
        answer every request before DISC), one that reads nothing holds nothing long.
        """
        started = time.monotonic()
        with self._lock:
            while self.busy and not self.broken:
                left = max(started, self._last_taken) + timeout - time.monotonic()
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
                for step in steps(batch, SEND_STEP):
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
        shutdown_quietly(self.sock, socket.SHUT_RDWR)
        self._changed.notify_all()
