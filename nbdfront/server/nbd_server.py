"""The listening side: sockets, admission at the connection limit, deadlines, stopping."""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import os
import select
import signal
import socket
import stat
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping

from blockstore.export import Export
from blockstore.throttledlog import ThrottledLog
from nbdfront.protocol import Catalog, TLSPolicy
from nbdfront.server.sending import shutdown_quietly
from nbdfront.server.session import READ_PIECE, FailureLog, Session
from nbdfront.tls import ServerTLS

log = logging.getLogger(__name__)

DEFAULT_PORT = 10809
# Bytes of reads in flight and replies queued, per connection: eight pieces, or a share
# of SERVER_INFLIGHT_BYTES when many connections are open (a piece at least), so that
# clients that send reads and take no replies cannot hold gigabytes between them.
INFLIGHT_BYTES = 8 * READ_PIECE
SERVER_INFLIGHT_BYTES = 512 * 1024 * 1024
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
# A TCP connection quiet this long is probed, KEEPALIVE_PROBES times a sixth of it
# apart, and closed when its peer's host no longer answers: a client that vanished
# without closing (a crash, a cut network) would otherwise hold its slot for good.
KEEPALIVE = 60.0
KEEPALIVE_PROBES = 6


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
    with the client taking none of them; ``keepalive`` is how long a TCP connection may
    be quiet before its peer's host is probed. At ``max_connections``, a newcomer
    closes the connection that has been silent longest in its handshake (for
    ``EVICTABLE_IDLE`` seconds at least), or is refused.

    ``cancel_reads`` (None: nothing to call) is called when the drain runs out,
    before the wait for the connections cut: it ends the reads their threads are
    stuck in (the image's fetches), which cutting a socket cannot.
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
        keepalive: float = KEEPALIVE,
        tls: ServerTLS | None = None,
    ):
        if tcp is None and unix is None:
            raise ValueError("give a TCP address, a Unix socket path, or both")
        self.offer(exports, default_export)
        self.inflight_bytes = inflight_bytes
        self.server_inflight_bytes = server_inflight_bytes
        self.max_connections = max_connections
        self.drain_timeout = drain_timeout
        self.handshake_timeout = handshake_timeout
        self.idle_timeout = idle_timeout
        self.keepalive = keepalive
        self.tls = tls
        self._tcp = tcp
        self.unix_path = os.fspath(unix) if unix is not None else None
        self._bound_socket: tuple[int, int] | None = None  # (device, inode) of ours
        self._listeners: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._sessions: set[Session] = set()
        self._reading = 0  # sessions that chose an export (a plain count: read on every wait)
        self._lock = threading.Lock()
        # Shutdown requests: a plain flag and a byte down a pipe, no lock, so a
        # signal handler can ask at any moment, even while this thread holds a lock.
        self._shutdown_requested = False
        self._wake_read, self._wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._stopped = threading.Event()
        self.failures = FailureLog()
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
        # A flood of connections, what the limit is for, meets it once per connection.
        self.at_limit = ThrottledLog(
            log,
            "%d more connections were refused, or closed to admit another, at the "
            "connection limit in the %.0f s after those logged, not logged one by one",
        )
        self._stopping = False
        self.tcp_address: tuple[str, int] | None = None
        self.cancel_reads: Callable[[], None] | None = None

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

    def offer(self, exports: Mapping[str, Export], default_export: str | None = None) -> None:
        """Serve ``exports`` in place of those given at construction (before ``start``):
        a caller can bind first (``listen``) and make its exports once that worked."""
        self.exports = dict(exports)
        self.catalog = Catalog(self.exports, default_export)

    def start(self) -> None:
        self.listen()
        for listener in self._listeners:
            self._start_thread("nbd-accept", self._accept_loop, listener)
        self._start_thread("nbd-deadlines", self._watch_deadlines)

    def listen(self) -> None:
        """Bind the addresses and listen, once (``start`` does it if no caller has): an
        address in use is then known before anything costly is made to serve on it."""
        if self._listeners:
            return
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
            self._bound_socket = _identity(self.unix_path)
            listener.listen(128)
            self._listeners.append(listener)

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
            return f"{scheme}://{netloc(host, port)}/{_quote(name)}"
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
            shutdown_quietly(listener, socket.SHUT_RDWR)
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
            if self.cancel_reads is not None:
                self.cancel_reads()
            self._wait_sessions(CUT_GRACE)
        self.failures.flush()
        self.hangups.flush()
        self.at_limit.flush()
        self.accept_trouble.flush()
        bound = self._bound_socket
        if self.unix_path is not None and bound is not None and _identity(self.unix_path) == bound:
            os.unlink(self.unix_path)  # ours: another server may have taken the path since
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
                self._probe_when_quiet(sock)
                peer = f"{address[0]}:{address[1]}"
            else:
                peer = "unix"
            if not self._admit(Session(self, sock, peer)):
                sock.close()
                if self._stopping:
                    return

    def _probe_when_quiet(self, sock: socket.socket) -> None:
        """TCP keepalive on ``sock``: the kernel probes the peer of a quiet connection and
        fails its reads once the peer's host stops answering, which ends the connection."""
        idle = max(1, round(self.keepalive))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, max(1, idle // 6))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_PROBES)

    def _admit(self, session: Session) -> bool:
        """Count ``session`` in and start it, making room at the limit if one is idle."""
        with self._lock:
            if self._stopping:
                return False
            evicted = None
            if len(self._sessions) >= self.max_connections:
                evicted = self._stalled_longest(session.started)
                if evicted is None:
                    self.at_limit.warning(
                        "connection limit of %d reached, none stalled in its handshake: "
                        "refusing %s",
                        self.max_connections,
                        session.peer,
                    )
                    return False
                self._sessions.discard(evicted)
            self._sessions.add(session)
        if evicted is not None:
            self.at_limit.warning(
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

    def _stalled_longest(self, now: float) -> Session | None:
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

    def count_reading(self, session: Session) -> None:
        """``session`` chose an export: it counts toward the shares from now on."""
        with self._lock:
            session.selected = True
            if session in self._sessions:  # not one evicted meanwhile
                self._reading += 1

    def forget(self, session: Session) -> None:
        """``session``'s thread has ended: it no longer counts toward the limit or shares."""
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


def is_wildcard(host: str) -> bool:
    """Whether ``host`` stands for every address of this machine (``0.0.0.0``, ``::``):
    one to listen on, never one a client can be told to connect to."""
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def netloc(host: str, port: int | None) -> str:
    """``HOST:PORT`` as a URI or a message writes it: an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _quote(name: str) -> str:
    return urllib.parse.quote(name, safe="")


def _remove_stale_socket(path: str) -> None:
    """Remove a socket left by an earlier run; refuse to delete anything else, or one a
    running server listens on (removed, it would run on unreachable)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise FileExistsError(f"{path} exists and is not a socket")
    if _is_listened_on(path):
        raise OSError(errno.EADDRINUSE, os.strerror(errno.EADDRINUSE))
    os.unlink(path)


def _identity(path: str) -> tuple[int, int] | None:
    """The file at ``path`` as (device, inode), None if there is none."""
    try:
        found = os.lstat(path)
    except FileNotFoundError:
        return None
    return found.st_dev, found.st_ino


def _is_listened_on(path: str) -> bool:
    """Whether a process accepts connections on the Unix socket at ``path``. Only a
    refusal says nobody does: a socket this user may not connect to (another user's
    server) raises, as it cannot be told from a live one."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except (TimeoutError, BlockingIOError):  # a backlog full: someone listens, and is busy
            return True
        except (ConnectionRefusedError, FileNotFoundError):  # nobody listens (or gone since)
            return False
    return True
