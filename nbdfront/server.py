"""The NBD server: sockets and threads around the sans-I/O protocol.

Each connection has one thread that receives and parses requests and
answers cache hits itself, with no hand-off; only reads that must wait (a
fetch) and cache hints go to the connection's few worker threads. Replies
go out in the order they finish: hits gathered while parsing are sent
before the thread waits for anything, so a hit never waits behind a slow
fetch on the same connection, and a misbehaving client only ever occupies
its own threads. A per-connection budget of bytes in flight stops the
reading, and with it the client, when replies fall behind: memory stays
bounded however many requests a client queues.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import queue
import socket
import stat
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence

from blockstore.export import Buffer, Export
from nbdfront.protocol import (
    MAX_PAYLOAD,
    NEED_DATA,
    CacheRequest,
    Catalog,
    CommandDone,
    ConnectionClosed,
    ExportSelected,
    ReadFailed,
    ReadReply,
    ReadRequest,
    ServerConnection,
    StartTLS,
    TLSPolicy,
    nbd_error,
)
from nbdfront.tls import ServerTLS, TLSStream

log = logging.getLogger(__name__)

DEFAULT_PORT = 10809
# Worker threads per connection: enough that a handful of slow registry
# fetches leave room for more.
WORKERS_PER_CONNECTION = 16
# Bytes of reads handed to workers but not yet sent, per connection: eight maximum reads.
INFLIGHT_BYTES = 8 * MAX_PAYLOAD
INFLIGHT_REQUESTS = 512
# Reply bytes of hits gathered before one send: fewer system calls, bounded memory.
BATCH_BYTES = 256 * 1024
RECV_SIZE = 256 * 1024
# A client that has not chosen an export by then is dropped.
HANDSHAKE_TIMEOUT = 30.0
# Connections beyond this many are closed at once: threads are per connection.
MAX_CONNECTIONS = 256
# How long shutdown waits for in-flight replies before cutting connections.
DRAIN_TIMEOUT = 15.0
# After the cut, how long shutdown waits for connection threads to notice. A thread
# stuck in an export's read past this is a daemon and never holds up the exit.
CUT_GRACE = 1.0
_IOV_MAX = 1024


def send_buffers(sock: socket.socket, buffers: Sequence[Buffer]) -> None:
    """Send every byte of ``buffers`` with scatter-gather writes, no joining copy."""
    if len(buffers) <= _IOV_MAX:
        sent = sock.sendmsg(buffers)
        if sent == _length(buffers):
            return  # the usual case: one call, no views made
    else:
        sent = 0
    views = [memoryview(b).cast("B") for b in buffers if len(b)]
    first = 0
    while True:
        while sent:
            size = views[first].nbytes
            if sent >= size:
                sent -= size
                first += 1
            else:
                views[first] = views[first][sent:]
                sent = 0
        if first == len(views):
            return
        sent = sock.sendmsg(views[first : first + _IOV_MAX])


class _Budget:
    """Counts bytes and requests in flight; ``acquire`` waits while over the limit."""

    def __init__(self, max_bytes: int, max_requests: int):
        self._max_bytes = max_bytes
        self._max_requests = max_requests
        self._bytes = 0
        self._requests = 0
        self._cond = threading.Condition()

    def acquire(self, nbytes: int, *, wait: bool = True) -> bool:
        """Take ``nbytes`` and one request; False (nothing taken) if over and not ``wait``."""
        with self._cond:
            while self._requests and (
                self._bytes + nbytes > self._max_bytes or self._requests >= self._max_requests
            ):
                if not wait:
                    return False
                self._cond.wait()
            self._bytes += nbytes
            self._requests += 1
            return True

    def release(self, nbytes: int) -> None:
        with self._cond:
            self._bytes -= nbytes
            self._requests -= 1
            self._cond.notify_all()


class _Workers:
    """The threads of one connection that serve what may wait: misses and cache hints.

    Threads start as jobs need them, up to ``limit``; a job waits in the
    queue only while every thread is busy. ``stop`` lets queued jobs finish.
    """

    def __init__(self, name: str, limit: int):
        self._name = name
        self._limit = limit
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._idle = 0  # threads waiting for a job that no submit has claimed yet
        self._lock = threading.Lock()

    def submit(self, job: Callable[[], None]) -> None:
        with self._lock:
            if self._idle:
                self._idle -= 1
            elif len(self._threads) < self._limit:
                thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._threads.append(thread)
                thread.start()
        self._jobs.put(job)

    def stop(self) -> None:
        """Finish the queued jobs, then end every thread."""
        with self._lock:
            threads = list(self._threads)
        for _ in threads:
            self._jobs.put(None)
        for thread in threads:
            thread.join()

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                job()
            except Exception:  # a bug costs its own request, not the thread
                log.exception("internal error in %s", self._name)
            with self._lock:
                self._idle += 1


class _Session:
    """One client connection, from greeting to close.

    Its own thread receives, parses and answers hits (``Export.read_cached``)
    in batches sent before it waits for anything; reads that must wait and
    cache hints go to the workers, within the budget.
    """

    def __init__(self, server: NBDServer, sock: socket.socket, peer: str):
        self._server = server
        self._sock: socket.socket | TLSStream = sock
        self.peer = peer
        policy = server.tls.policy if server.tls is not None else TLSPolicy.OFF
        self._protocol = ServerConnection(server.catalog, tls=policy)
        self._send_lock = threading.Lock()
        self._budget = _Budget(server.inflight_bytes, INFLIGHT_REQUESTS)
        self._workers = _Workers(f"nbd-{peer}", WORKERS_PER_CONNECTION)
        self._export: Export | None = None
        self._batch: list[Buffer] = []
        self._batch_bytes = 0
        self._reads_since_recv = 0
        self._broken = False
        self.thread = threading.Thread(target=self.run, name=f"nbd-{peer}", daemon=True)

    def run(self) -> None:
        try:
            self._sock.settimeout(HANDSHAKE_TIMEOUT)
            self._serve()
        except Exception:
            log.exception("internal error on the connection from %s; closing it", self.peer)
            self.cut()
        finally:
            self._workers.stop()
            self._finish()

    def stop_reading(self) -> None:
        """Shutdown: take no more requests; what is in flight still gets its reply."""
        self._protocol.begin_shutdown()
        _shutdown_quietly(self._sock, socket.SHUT_RD)

    def cut(self) -> None:
        """Shutdown took too long: break the connection so blocked sends return."""
        self._broken = True
        _shutdown_quietly(self._sock, socket.SHUT_RDWR)

    def _serve(self) -> None:
        """Receive and parse until the conversation is over, answering or handing off work."""
        protocol = self._protocol
        while True:
            event = protocol.next_event()
            out = protocol.data_to_send()
            if out:
                self._batch += out
            if event is NEED_DATA:
                try:
                    data = self._receive()
                except OSError as exc:
                    log.info("connection from %s ended: %s", self.peer, exc)
                    return
                protocol.receive_data(data)
            elif type(event) is ReadRequest:
                self._reads_since_recv += 1
                self._answer(event)
            elif isinstance(event, CacheRequest):
                self._hand_off(event, 0, self._serve_cache_hint)
            elif isinstance(event, StartTLS):
                if not self._start_tls():
                    return
            elif isinstance(event, ExportSelected):
                self._export = self._server.exports[event.name]
                self._sock.settimeout(None)
                log.info("%s reads export %r", self.peer, event.name)
            else:
                self._send_batch()
                if isinstance(event, ConnectionClosed):
                    level = logging.INFO if event.clean else logging.WARNING
                    log.log(level, "closing connection from %s: %s", self.peer, event.reason)
                else:
                    log.info("%s disconnected", self.peer)
                return

    def _start_tls(self) -> bool:
        """Send the STARTTLS ACK, then make the handshake; False if it failed."""
        assert self._server.tls is not None and isinstance(self._sock, socket.socket)
        self._send_batch()
        try:
            self._sock = TLSStream.accept(self._sock, self._server.tls.context)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            log.warning("TLS handshake with %s failed: %s", self.peer, exc)
            return False
        self._protocol.tls_started()
        log.info("%s now speaks TLS", self.peer)
        return True

    def _receive(self) -> bytes:
        """The client's next bytes; the batch goes out before this thread waits for them.

        When the client sends requests in bursts, those already waiting in
        the socket are taken first, so the replies to a burst leave in one
        send; a client waiting on each reply costs no extra system call.
        """
        if self._broken:
            return b""
        pipelined, self._reads_since_recv = self._reads_since_recv > 1, 0
        if pipelined and self._batch:
            try:
                return self._sock.recv(RECV_SIZE, socket.MSG_DONTWAIT)
            except BlockingIOError:
                pass
        self._send_batch()
        return self._sock.recv(RECV_SIZE)

    def _answer(self, request: ReadRequest) -> None:
        """A hit goes into the batch at once; anything else to a worker."""
        assert self._export is not None
        try:
            data = self._export.read_cached(request.offset, request.length)
        except Exception:  # read meets the same fault and reports it as the reply
            data = None
        if data is None or _length(data) != request.length:
            self._hand_off(request, request.length, self._serve_miss)
            return
        self._batch += self._protocol.send(ReadReply(request, data))
        self._batch_bytes += request.length
        if self._batch_bytes >= BATCH_BYTES:
            self._send_batch()

    def _hand_off(
        self,
        request: ReadRequest | CacheRequest,
        nbytes: int,
        serve: Callable[[ReadRequest | CacheRequest], None],
    ) -> None:
        if not self._budget.acquire(nbytes, wait=False):
            self._send_batch()  # hits already answered never wait for the budget
            self._budget.acquire(nbytes)
        self._workers.submit(lambda: serve(request))

    def _send_batch(self) -> None:
        if self._batch:
            batch, self._batch, self._batch_bytes = self._batch, [], 0
            self._send(batch)

    def _serve_miss(self, request: ReadRequest) -> None:
        """On a worker: read through the export, which may fetch, and send the reply."""
        assert self._export is not None
        try:
            try:
                data = self._export.read(request.offset, request.length)
                got = _length(data)
                if got != request.length:
                    raise OSError(5, f"export returned {got} bytes for {request.length}")
                reply: ReadReply | ReadFailed = ReadReply(request, data)
            except Exception as exc:
                reply = ReadFailed(request, nbd_error(exc), _describe(exc, request))
                _log_failure(exc, request)
            self._send(self._protocol.send(reply))
        finally:
            self._budget.release(request.length)

    def _serve_cache_hint(self, request: CacheRequest) -> None:
        """On a worker: have the export bring the range into its cache, then answer."""
        assert self._export is not None
        try:
            try:
                self._export.cache(request.offset, request.length)
                reply = CommandDone(request)
            except Exception as exc:
                reply = CommandDone(request, nbd_error(exc), _describe(exc, request))
                _log_failure(exc, request)
            self._send(self._protocol.send(reply))
        finally:
            self._budget.release(0)

    def _send(self, buffers: Sequence[Buffer]) -> None:
        with self._send_lock:
            if self._broken:
                return
            try:
                send_buffers(self._sock, buffers)
            except OSError as exc:
                # The client is gone; stop the reader too, its replies have nowhere to go.
                self._broken = True
                log.info("sending to %s failed: %s", self.peer, exc)
                _shutdown_quietly(self._sock, socket.SHUT_RDWR)

    def _finish(self) -> None:
        _shutdown_quietly(self._sock, socket.SHUT_RDWR)
        self._sock.close()
        self._server._forget(self)


def _length(buffers: Sequence[Buffer]) -> int:
    """Bytes in ``buffers``, whatever their item size."""
    total = 0
    for b in buffers:
        total += len(b) if type(b) is bytes else memoryview(b).nbytes
    return total


def _describe(exc: BaseException, request: ReadRequest | CacheRequest) -> str:
    return f"{type(exc).__name__} at {request.offset}+{request.length}: {exc}"


def _log_failure(exc: BaseException, request: ReadRequest | CacheRequest) -> None:
    if isinstance(exc, OSError):
        log.warning("request %s failed: %s", request, exc)
    else:
        log.exception("request %s failed unexpectedly", request)


class NBDServer:
    """Serves read-only ``Export``\\ s to NBD clients over TCP and/or a Unix socket.

    ``default_export`` names the export a client gets when it asks for the
    empty name. ``start()`` returns once the sockets listen;
    ``serve_forever()`` blocks until ``request_shutdown()`` (signal-safe) or
    ``shutdown()``, which lets in-flight replies finish before closing.
    """

    def __init__(
        self,
        exports: Mapping[str, Export],
        *,
        tcp: tuple[str, int] | None = None,
        unix: str | os.PathLike[str] | None = None,
        default_export: str | None = None,
        inflight_bytes: int = INFLIGHT_BYTES,
        max_connections: int = MAX_CONNECTIONS,
        drain_timeout: float = DRAIN_TIMEOUT,
        tls: ServerTLS | None = None,
    ):
        if tcp is None and unix is None:
            raise ValueError("give a TCP address, a Unix socket path, or both")
        self.exports = dict(exports)
        self.catalog = Catalog(self.exports, default_export)
        self.inflight_bytes = inflight_bytes
        self.max_connections = max_connections
        self.drain_timeout = drain_timeout
        self.tls = tls
        self._tcp = tcp
        self.unix_path = os.fspath(unix) if unix is not None else None
        self._listeners: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._sessions: set[_Session] = set()
        self._lock = threading.Lock()
        self._stop_requested = threading.Event()
        self._stopped = threading.Event()
        self._stopping = False
        self.tcp_address: tuple[str, int] | None = None

    @property
    def connection_count(self) -> int:
        with self._lock:
            return len(self._sessions)

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
            thread = threading.Thread(
                target=self._accept_loop, args=(listener,), name="nbd-accept", daemon=True
            )
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
        while not self._stop_requested.wait(0.5):
            pass
        self.shutdown()

    def request_shutdown(self) -> None:
        """Ask ``serve_forever`` to stop; safe inside a signal handler."""
        self._stop_requested.set()

    def shutdown(self) -> None:
        """Stop accepting, let in-flight replies finish, close every socket."""
        with self._lock:
            already, self._stopping = self._stopping, True
            sessions = list(self._sessions)
        if already:
            self._stopped.wait()
            return
        self._stop_requested.set()
        for listener in self._listeners:
            _shutdown_quietly(listener, socket.SHUT_RDWR)
            listener.close()
        for thread in self._threads:
            thread.join()
        for session in sessions:
            session.stop_reading()
        if not self._wait_sessions(self.drain_timeout):
            log.warning("in-flight requests did not finish in %ss; cutting", self.drain_timeout)
            with self._lock:
                for session in self._sessions:
                    session.cut()
            self._wait_sessions(CUT_GRACE)
        if self.unix_path is not None:
            _remove_stale_socket(self.unix_path)
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
                log.warning("accepting a connection failed: %s", exc)
                time.sleep(0.1)
                continue
            if listener.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                peer = f"{address[0]}:{address[1]}"
            else:
                peer = "unix"
            session = _Session(self, sock, peer)
            with self._lock:
                if self._stopping:
                    sock.close()
                    return
                full = len(self._sessions) >= self.max_connections
                if not full:
                    self._sessions.add(session)
            if full:
                log.warning("refusing %s: already %d connections", peer, self.max_connections)
                sock.close()
                continue
            session.thread.start()

    def _forget(self, session: _Session) -> None:
        with self._lock:
            self._sessions.discard(session)


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
