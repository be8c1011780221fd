"""The HTTP connections under every registry request: pooled, and each reply's status
line and headers bounded by the request's deadline.

A socket's timeout bounds one receive only: a server that sends ``HTTP/1.1 200 OK``,
then a header byte a second, never trips it, and held a read (an NBD read, a reader
in a FUSE mount) for ever. So while a reply's head is read, each receive may wait
only the deadline's stall or the time left, as ``receive`` does for a body, and once
the deadline has passed the read fails as a timeout does: urllib3 then closes the
connection rather than hand it back to the pool. An upload's request, with no overall
deadline, gets its head within one stall. No thread: a head mostly comes in one
receive, so this costs the hot path of range reads one ``settimeout`` each.
"""

from __future__ import annotations

import contextlib
import contextvars
import http.client
import io
import socket
from collections.abc import Iterator
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from blockstore.registry.retry import Deadline

_deadline: contextvars.ContextVar[Deadline | None] = contextvars.ContextVar(
    "blockstore_reply_deadline", default=None
)
"""The deadline of the request this thread makes in ``heads_within``, if any."""


def pooled_session(pool_size: int, extra_cas: str | None = None) -> requests.Session:
    """A session keeping up to ``pool_size`` connections per host, whose replies' heads
    are read within the deadline of ``heads_within`` around each request.

    ``extra_cas``: PEM certificates trusted beside the bundle each request names as
    ``verify`` (``--ca-file``, added to the system's CAs as Docker's ``certs.d`` is: a
    private registry may redirect its blobs to storage with a public certificate)."""
    session = requests.Session()
    # Proxies, netrc and CA bundles from the environment would change where
    # requests go and with which credentials behind our back.
    session.trust_env = False
    for scheme in ("http://", "https://"):
        adapter = _Adapter(extra_cas, pool_connections=4, pool_maxsize=pool_size)
        session.mount(scheme, adapter)
    return session


@contextlib.contextmanager
def heads_within(deadline: Deadline) -> Iterator[None]:
    """Requests made in this block (through a ``pooled_session``) get their status line
    and headers before ``deadline`` passes, or fail as timed out. Under a deadline
    without an end (an upload's), they must come within its stall of being asked for:
    a head comes whole once the server answers, and a server silent longer than the
    stall fails the receive anyway."""
    token = _deadline.set(deadline)
    try:
        yield
    finally:
        _deadline.reset(token)


class _HeadWithin(io.RawIOBase):
    """A socket's bytes, each receive bounded by ``deadline`` until it is set to None
    (the head is in: the body's readers set their own timeouts)."""

    def __init__(self, sock: socket.socket, deadline: Deadline):
        self._sock = sock
        self._io = sock.makefile("rb", buffering=0)  # counted as a user of the socket
        self.deadline: Deadline | None = deadline

    def readable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._io.fileno()

    def readinto(self, buffer) -> int | None:
        deadline = self.deadline
        if deadline is not None:
            if deadline.expired:
                raise TimeoutError("timed out")  # urllib3's read timeout: conn closed
            self._sock.settimeout(deadline.receive_timeout())
        return self._io.readinto(buffer)

    def close(self) -> None:
        if not self.closed:
            self._io.close()
        super().close()


class _Reply(http.client.HTTPResponse):
    """A reply whose status line and headers are read within the request's deadline."""

    def __init__(self, sock: socket.socket, *args, **kwargs):
        super().__init__(sock, *args, **kwargs)
        deadline = _deadline.get()
        self._head: _HeadWithin | None = None
        if deadline is not None:
            if deadline.seconds is None:  # the request has been sent: the head is due
                deadline = Deadline(deadline.stall, stall=deadline.stall)
            self.fp.close()  # nothing read from it yet
            self._head = _HeadWithin(sock, deadline)
            self.fp = io.BufferedReader(self._head)

    def begin(self) -> None:
        try:
            super().begin()
        finally:
            if self._head is not None:
                self._head.deadline = None


class _Connection(HTTPConnection):
    response_class = _Reply


class _TLSConnection(HTTPSConnection):
    response_class = _Reply


class _Pool(HTTPConnectionPool):
    ConnectionCls = _Connection


class _TLSPool(HTTPSConnectionPool):
    ConnectionCls = _TLSConnection


class _Adapter(HTTPAdapter):
    """requests' adapter, its pools making connections whose replies are ``_Reply``, and
    trusting ``extra_cas`` beside each request's ``verify`` bundle."""

    def __init__(self, extra_cas: str | None, **kwargs) -> None:
        self._extra_cas = extra_cas  # read by init_poolmanager, which the base's init calls
        super().__init__(**kwargs)

    def init_poolmanager(self, *args, **kwargs) -> None:
        if self._extra_cas is not None:  # urllib3 loads it with the bundle (plain HTTP: not)
            kwargs["ca_cert_data"] = self._extra_cas
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _Pool, "https": _TLSPool}


def url_host(url: str) -> str:
    """``url``'s host and port as written, without the user part a URL may carry
    (``user:password@``): what a message or the log may say of where a request went."""
    return urlsplit(url).netloc.rpartition("@")[2]
