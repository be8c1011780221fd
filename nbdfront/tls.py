"""TLS for the NBD server: certificates from a directory, and the upgraded stream.

The certificate directory follows nbdkit's layout, so one made for nbdkit,
qemu-nbd or libnbd works here: ``server-cert.pem`` and ``server-key.pem``
identify the server; ``ca-cert.pem`` is the CA that client certificates must
chain to when peers are verified (``--tls-verify-peer``), and
``ca-crl.pem``, if present, revokes some of them.

The stream runs TLS over memory buffers rather than wrapping the socket:
a connection's reader thread receives while its worker threads send, and
an OpenSSL connection must not be used by two threads at once. One lock
guards the TLS state, and socket I/O happens outside it.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from nbdfront.protocol import TLSPolicy
from nbdfront.protocol.events import Buffer

SERVER_CERT = "server-cert.pem"
SERVER_KEY = "server-key.pem"
CA_CERT = "ca-cert.pem"
CA_CRL = "ca-crl.pem"
_RECV_SIZE = 256 * 1024


class TLSSetupError(Exception):
    """The certificate directory cannot make a working TLS server."""


@dataclass(frozen=True)
class ServerTLS:
    """What the server offers (``policy``) and with which credentials (``context``)."""

    policy: TLSPolicy
    context: ssl.SSLContext


def server_context(directory: Path, verify_peer: bool = False) -> ssl.SSLContext:
    """A TLS 1.2+ server context from ``directory``; client certificates only if ``verify_peer``."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # A client-started renegotiation is a handshake a client makes the server do for
    # free, as often as it likes; no NBD client needs one. OpenSSL 3 refuses it by
    # default, 1.1.1 does not.
    context.options |= ssl.OP_NO_RENEGOTIATION
    cert, key, ca = directory / SERVER_CERT, directory / SERVER_KEY, directory / CA_CERT
    _require_files(directory, [cert, key, ca] if verify_peer else [cert, key])

    def no_passphrase() -> str:
        # Without a callback OpenSSL asks for the passphrase on the terminal, and the
        # server waits there for it; nbdkit, whose directory layout this is, takes none.
        raise TLSSetupError(f"{key} is encrypted: the server takes an unencrypted key")

    try:
        context.load_cert_chain(cert, key, password=no_passphrase)
    except (OSError, ssl.SSLError) as exc:
        if isinstance(exc, ssl.SSLError) and exc.reason == "KEY_VALUES_MISMATCH":
            # Both files parse: saying they are not PEM would send the user the wrong way.
            raise TLSSetupError(f"{key} is not the private key of {cert}") from None
        expected = "a PEM certificate and its private key"
        raise TLSSetupError(f"cannot load {cert} with {key}: {_reason(exc, expected)}") from None
    if verify_peer:
        for authority in (ca, directory / CA_CRL):
            if authority.exists():
                try:
                    context.load_verify_locations(cafile=authority)
                except (OSError, ssl.SSLError) as exc:
                    reason = _reason(exc, "PEM certificates or revocation lists")
                    raise TLSSetupError(f"cannot load {authority}: {reason}") from None
        if (directory / CA_CRL).exists():
            context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def dates_warning(directory: Path) -> str | None:
    """What is wrong with the dates of the server's certificate, if anything.

    OpenSSL serves a certificate that expired (or is not valid yet) without a word;
    every client that checks it (libnbd, qemu) then hangs up, which the server sees
    only as a reset connection. Not refused: a client that checks nothing (the
    mount's own nbdfuse) is still served.
    """
    cert = directory / SERVER_CERT
    dates = _validity(cert)
    if dates is None:
        return None
    not_before, not_after = dates
    now = datetime.now(UTC)
    if now > not_after:
        problem = f"expired on {not_after:%Y-%m-%d %H:%M} UTC"
    elif now < not_before:
        problem = f"is not valid before {not_before:%Y-%m-%d %H:%M} UTC"
    else:
        return None
    return f"{cert} {problem}: clients that check it (nbdinfo, nbdcopy, qemu) will hang up"


def _validity(cert: Path) -> tuple[datetime, datetime] | None:
    """notBefore and notAfter of the certificate in ``cert``, None if it does not parse.
    The stdlib's public ``ssl`` API gives the dates of a peer's certificate only; its
    decoder of a file (OpenSSL's own, which CPython's tests use) reads them here, and
    a Python without it just goes unwarned."""
    decode = getattr(ssl._ssl, "_test_decode_cert", None)
    if decode is None:
        return None
    try:
        decoded = decode(str(cert))
        not_before = ssl.cert_time_to_seconds(decoded["notBefore"])
        not_after = ssl.cert_time_to_seconds(decoded["notAfter"])
    except (OSError, ValueError, KeyError):  # ssl.SSLError is an OSError
        return None
    return datetime.fromtimestamp(not_before, UTC), datetime.fromtimestamp(not_after, UTC)


def _require_files(directory: Path, paths: list[Path]) -> None:
    missing = [path.name for path in paths if not path.is_file()]
    if missing:
        raise TLSSetupError(f"{directory} lacks {', '.join(missing)}")


def _reason(exc: OSError, expected: str) -> str:
    if isinstance(exc, ssl.SSLError):
        detail = f" ({exc.reason.lower().replace('_', ' ')})" if exc.reason else ""
        return f"not {expected}{detail}"
    return exc.strerror or str(exc)


class TLSStream:
    """The socket-like end of a TLS session: what the NBD server calls on a socket.

    ``recv`` and ``sendmsg`` may be called from different threads at once.
    ``sendmsg`` sends everything it is given before it returns.
    """

    def __init__(self, sock: socket.socket, context: ssl.SSLContext):
        self._sock = sock
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self._state_lock = threading.Lock()  # the TLS object, never held across I/O
        self._send_lock = threading.Lock()  # keeps records on the wire in the order made
        self._closed_notify = False

    @classmethod
    def accept(
        cls, sock: socket.socket, context: ssl.SSLContext, failed: Callable[[Exception], None]
    ) -> TLSStream:
        """Make the server side of the handshake on ``sock`` (within its timeout).

        ``failed`` is told why the handshake failed before the alert that says so is
        sent: a client failing on the alert may look for the cause at once.
        """
        stream = cls(sock, context)
        try:
            while True:
                try:
                    with stream._state_lock:
                        stream._tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    stream._flush()
                    stream._feed(0)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            failed(exc)
            # Send the alert that says why (no certificate, unknown CA), then give up.
            with contextlib.suppress(OSError):
                stream._flush()
            raise
        stream._flush()
        return stream

    def recv(self, size: int, flags: int = 0) -> bytes:
        """Up to ``size`` bytes of plain text; ``b""`` once the client is gone.

        With ``MSG_DONTWAIT`` it raises ``BlockingIOError`` when no whole
        record is waiting, as a socket would.
        """
        while True:
            data, ended = self._decrypted(size)
            if self._outgoing.pending:  # a key update or alert to answer
                self._flush()
            if data or ended:
                return data
            if not self._feed(flags):
                return b""

    def _decrypted(self, size: int) -> tuple[bytes, bool]:
        """Plain text of every whole record received, up to ``size``; True at the end.

        One TLS read yields one record, and clients send each small request as
        a record of its own: taking them all at once lets a burst of requests
        be answered with one send, as on a plain socket.
        """
        pieces: list[bytes] = []
        total = 0
        with self._state_lock:
            while total < size:
                try:
                    piece = self._tls.read(size - total)
                except ssl.SSLWantReadError:
                    break
                except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                    piece = b""
                if not piece:  # the client's close_notify, or the end of the stream
                    return b"".join(pieces), not pieces
                pieces.append(piece)
                total += len(piece)
        return b"".join(pieces), False

    def sendmsg(self, buffers: Sequence[Buffer]) -> int:
        """Encrypt and send all of ``buffers``; returns how many plain bytes that was."""
        plain = b"".join(buffers)
        with self._send_lock:
            with self._state_lock:
                self._tls.write(plain)
                record = self._outgoing.read()
            self._sock.sendall(record)
        return len(plain)

    def settimeout(self, timeout: float | None) -> None:
        self._sock.settimeout(timeout)

    def shutdown(self, how: int) -> None:
        """Say goodbye in TLS (close_notify) if no send is stuck, then shut the socket."""
        if how != socket.SHUT_RD and not self._closed_notify and self._send_lock.acquire(False):
            try:
                self._closed_notify = True
                with self._state_lock, contextlib.suppress(ssl.SSLError):
                    self._tls.unwrap()
                with self._state_lock:
                    record = self._outgoing.read()
                with contextlib.suppress(OSError):
                    self._sock.send(record, socket.MSG_DONTWAIT)
            finally:
                self._send_lock.release()
        self._sock.shutdown(how)

    def close(self) -> None:
        self._sock.close()

    def _feed(self, flags: int) -> bool:
        """Move the client's next bytes into TLS; False at the end of the stream."""
        data = self._sock.recv(_RECV_SIZE, flags)
        with self._state_lock:
            if data:
                self._incoming.write(data)
            else:
                self._incoming.write_eof()
        return bool(data)

    def _flush(self) -> None:
        with self._send_lock:
            with self._state_lock:
                record = self._outgoing.read()
            if record:
                self._sock.sendall(record)
