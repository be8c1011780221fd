"""A small HTTP proxy in front of a real registry that misbehaves on request.

Faults are what real networks and registries do: answer slowly, trickle the
body a byte at a time, drop the connection mid-body (with a FIN, or a reset),
send fewer bytes than asked, cut an upload short, flip bytes (or send another
blob's, of the same length), send a
``Content-Range`` that is not the span asked for, refuse with a status
(429/503 with ``Retry-After``), ignore ``Range`` and send the whole blob with
200 (or ignore its end, and send the rest of the blob with 206), redirect
(307) to another host, as registries backed by object storage or a CDN do,
or say other statuses or headers than the registry's (a second auth
challenge). Every request a client sends is recorded.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import urlsplit

from rig.processes import QuietHTTPServer

_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailers",
    "transfer-encoding",
    "upgrade",
}
KINDS = {
    "delay",
    "trickle",
    "pace",
    "status",
    "drop",
    "cut",
    "reset",
    "truncate",
    "corrupt",
    "bad_range",
    "ignore_range",
    "redirect",
    "rewrite_headers",
    "cut_request",
    "open_range",
    "short_range",
    "rewrite_status",
    "replace",
}


@dataclass
class Fault:
    """What to do to matching requests: ``kind`` is one of ``KINDS``."""

    kind: str
    path_contains: str = ""
    method: str | None = None
    times: int | None = None
    """How many matching requests get the fault; None: all of them."""
    seconds: float = 0.0
    """delay: pause before forwarding; trickle: pause before each body byte;
    pace: pause before each 32 KiB of the body (a slow link that streams); status: pause
    before the reply (a registry slow to say it is busy)."""
    status: int = 503
    headers: dict[str, str] = field(default_factory=dict)
    """status: the reply's status and headers (e.g. ``Retry-After``); rewrite_status: the
    status said in place of the registry's, its reply forwarded; rewrite_headers:
    each header the registry sent that is named here, rewritten to this value with
    ``{}`` standing for the registry's own (one it did not send is added)."""
    body: bytes | None = None
    """status: the reply's body (default: an OCI error), e.g. a hand-made manifest;
    replace: another blob of the same length, whose bytes at the range the registry
    sends are sent in their place (a registry serving the wrong blob)."""
    after_bytes: int | None = None
    """cut/reset/truncate/corrupt: body bytes sent intact (default: half the body);
    short_range: the most bytes of a range asked that the reply holds (default 64 KiB);
    cut_request: request body bytes forwarded before both connections are cut."""
    redirect_to: str | None = None
    """redirect: base URL of the other host; the path is kept, and a query the URL
    carries goes after it (a signed storage URL's)."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown fault {self.kind!r}; one of {sorted(KINDS)}")

    @classmethod
    def document(cls, document: object, media_type: str, **match: Any) -> Fault:
        """Answer matching requests with ``document`` as JSON of ``media_type`` (a
        hand-made manifest, index or listing), in place of the registry's."""
        return cls(
            "status",
            status=200,
            body=json.dumps(document).encode(),
            headers={"Content-Type": media_type},
            **match,
        )


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]
    arrived: float = field(default_factory=time.monotonic)
    """When the proxy read it, before any fault's pause: which requests went out
    together, whatever the time each took."""


class FaultProxy:
    """Listens on ``listen`` (127.0.0.1, or another loopback address to be another host)."""

    def __init__(
        self,
        upstream: str,
        *,
        listen: str = "127.0.0.1",
        upstream_headers: dict[str, str] | None = None,
    ):
        parts = urlsplit(upstream)
        self.upstream_host, self.upstream_port = parts.hostname, parts.port or 80
        self.upstream_headers = upstream_headers or {}
        """Headers set on every forwarded request (credentials of a storage backend)."""
        self.fault: Fault | None = None
        self.more_faults: list[Fault] = []
        """Faults for other requests than ``fault``'s (a lying manifest and a lying HEAD):
        the first whose match a request meets is the one it gets."""
        self.faults_applied = 0
        self.requests: list[RecordedRequest] = []
        self.connections = 0
        """TCP connections clients opened: keep-alive shows as few."""
        self._lock = threading.Lock()
        self._server = QuietHTTPServer((listen, 0), _handler(self))
        self.host = f"{listen}:{self._server.server_address[1]}"
        self.url = f"http://{self.host}"

    def start(self) -> None:
        self._server.start_in_background()

    def stop(self) -> None:
        self._server.stop()

    def take_fault(self, method: str, path: str) -> Fault | None:
        """The fault for this request, if any, counting it against ``times``."""
        with self._lock:
            for fault in (self.fault, *self.more_faults):
                if fault is not None and _takes(fault, method, path):
                    self.faults_applied += 1
                    return fault
            return None

    def count_connection(self) -> None:
        with self._lock:
            self.connections += 1

    def record(self, request: RecordedRequest) -> None:
        with self._lock:
            self.requests.append(request)


def _handler(proxy: FaultProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def setup(self) -> None:
            super().setup()
            proxy.count_connection()

        def do_GET(self) -> None:
            self._proxy()

        do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

        def _proxy(self) -> None:
            # A list, not a dict: a pull-through registry sends one Accept line per type.
            pairs = [(k, v) for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP]
            headers = dict(pairs)
            proxy.record(RecordedRequest(self.command, self.path, headers))
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            fault = proxy.take_fault(self.command, self.path)
            kind = fault.kind if fault else None
            if kind == "drop":
                self._hang_up()
                return
            if kind == "status":
                time.sleep(fault.seconds)
                body = fault.body if fault.body is not None else _oci_error(fault.status)
                self._reply(fault.status, fault.headers, body)
                return
            if kind == "redirect":
                base, _, query = fault.redirect_to.partition("?")
                location = base.rstrip("/") + self.path + (f"?{query}" if query else "")
                self._reply(307, {"Location": location}, b"")
                return
            if kind == "delay":
                time.sleep(fault.seconds)
            if kind == "ignore_range":
                pairs = [(k, v) for k, v in pairs if k.lower() != "range"]
            if kind == "open_range":  # the range's end ignored: the 206 runs to the blob's
                pairs = [(k, _open_ended(v) if k.lower() == "range" else v) for k, v in pairs]
            if kind == "short_range":  # at most after_bytes of the range sent, as a CDN may
                limit = fault.after_bytes or 65536
                pairs = [(k, _capped(v, limit) if k.lower() == "range" else v) for k, v in pairs]
            replaced = {k.lower() for k in proxy.upstream_headers}
            pairs = [(k, v) for k, v in pairs if k.lower() not in replaced]
            pairs += proxy.upstream_headers.items()
            upstream = http.client.HTTPConnection(
                proxy.upstream_host, proxy.upstream_port, timeout=30
            )
            try:
                upstream.putrequest(
                    self.command, self.path, skip_host=True, skip_accept_encoding=True
                )
                for key, value in pairs:
                    upstream.putheader(key, value)
                if body is not None and "content-length" not in {k.lower() for k, _ in pairs}:
                    upstream.putheader("Content-Length", str(len(body)))
                if kind == "cut_request":
                    self._cut_request(upstream, body or b"", fault)
                    return
                upstream.endheaders(body)
                reply = upstream.getresponse()
                self._relay(reply, fault)
            except (BrokenPipeError, ConnectionResetError):
                # The client hung up early (it had the bytes it wanted).
                self.close_connection = True
            finally:
                upstream.close()

        def _cut_request(
            self, upstream: http.client.HTTPConnection, body: bytes, fault: Fault
        ) -> None:
            """Forward part of the request body, as a link that breaks mid-upload does:
            the registry reads it to its end (and answers, unheard), the client gets
            no reply."""
            upstream.endheaders()
            intact = fault.after_bytes if fault.after_bytes is not None else len(body) // 2
            upstream.send(body[:intact])
            upstream.sock.shutdown(socket.SHUT_WR)
            with contextlib.suppress(OSError, http.client.HTTPException):
                upstream.getresponse().read()
            self._hang_up()

        def _relay(self, reply: http.client.HTTPResponse, fault: Fault | None) -> None:
            kind = fault.kind if fault else None
            out = {k: v for k, v in reply.getheaders() if k.lower() not in _HOP_BY_HOP}
            if kind == "rewrite_headers":
                _rewrite(out, fault.headers)
            declared = reply.getheader("Content-Length")
            status = fault.status if kind == "rewrite_status" else reply.status
            if self.command == "HEAD" or reply.status in (204, 304):
                self._reply(status, out, b"", keep_length=True)
                return
            if declared is None:
                data = reply.read()
                out["Content-Length"] = str(len(data))
                declared = str(len(data))
            total = int(declared)
            intact = fault.after_bytes if fault and fault.after_bytes is not None else total // 2
            if kind == "truncate":
                out["Content-Length"] = str(min(intact, total))
            if kind == "bad_range" and "Content-Range" in out:
                out["Content-Range"] = _shifted(out["Content-Range"])
            self.send_response(status)
            for key, value in out.items():
                self.send_header(key, value)
            self.end_headers()
            sent = 0
            limit = intact if kind in ("cut", "reset", "truncate") else total
            while sent < limit:
                if kind in ("trickle", "pace"):
                    time.sleep(fault.seconds)
                    self.wfile.flush()
                piece = {"trickle": 1, "pace": 32 << 10}.get(kind, 256 << 10)
                chunk = reply.read(min(piece, limit - sent))
                if not chunk:
                    break
                if kind == "replace":
                    first = _range_start(out.get("Content-Range")) + sent
                    chunk = fault.body[first : first + len(chunk)]
                if kind == "corrupt" and sent <= intact < sent + len(chunk):
                    flipped = bytearray(chunk)
                    flipped[intact - sent] ^= 0xFF
                    chunk = bytes(flipped)
                self.wfile.write(chunk)
                sent += len(chunk)
            if kind == "cut":
                self._hang_up()
            if kind == "reset":
                self._reset()

        def _reply(
            self, status: int, headers: dict[str, str], body: bytes, keep_length: bool = False
        ) -> None:
            self.send_response(status)
            for key, value in headers.items():
                if keep_length or key.lower() != "content-length":
                    self.send_header(key, value)
            if not keep_length:
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _reset(self) -> None:
            """Close with an RST, as a crashed peer or a middlebox does, not a FIN."""
            self.wfile.flush()
            self.close_connection = True
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()

        def _hang_up(self) -> None:
            self.wfile.flush()
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)

    return Handler


def _takes(fault: Fault, method: str, path: str) -> bool:
    """Whether ``fault`` matches the request and has a use left, counting this one."""
    if fault.path_contains not in path or (fault.method and fault.method != method):
        return False
    if fault.times is not None:
        if fault.times <= 0:
            return False
        fault.times -= 1
    return True


def _rewrite(headers: dict[str, str], rewrites: dict[str, str]) -> None:
    """Each of ``headers`` named in ``rewrites`` (in any case) made its value there, with
    ``{}`` replaced by the header's own value; one not there is added, unless its value
    says ``{}``."""
    present = {key.lower() for key in headers}
    for key, value in list(headers.items()):
        for name, rewritten in rewrites.items():
            if key.lower() == name.lower():
                headers[key] = rewritten.replace("{}", value)
    for name, value in rewrites.items():
        if name.lower() not in present and "{}" not in value:
            headers[name] = value


def _capped(range_header: str, limit: int) -> str:
    """``bytes=a-b`` made at most ``limit`` bytes long: ``bytes=a-min(b, a+limit-1)``."""
    first, _, last = range_header.removeprefix("bytes=").partition("-")
    end = int(first) + limit - 1
    return f"bytes={first}-{min(int(last), end) if last else end}"


def _open_ended(range_header: str) -> str:
    """``bytes=a-b`` made ``bytes=a-``: from the first byte asked to the end."""
    return range_header.partition("-")[0] + "-"


def _range_start(content_range: str | None) -> int:
    """Where a reply's body starts in the blob: its ``Content-Range``'s first byte, or 0."""
    if content_range is None:
        return 0
    return int(content_range.split()[1].split("-")[0])


def _shifted(content_range: str) -> str:
    """``bytes a-b/total`` moved one byte on: a plausible range, but not the one asked."""
    span, _, total = content_range.removeprefix("bytes ").partition("/")
    first, _, last = span.partition("-")
    return f"bytes {int(first) + 1}-{int(last) + 1}/{total}"


def _oci_error(status: int) -> bytes:
    code = {429: "TOOMANYREQUESTS", 503: "UNAVAILABLE"}.get(status, "UNKNOWN")
    message = {429: "too many requests", 503: "service unavailable"}.get(status, "injected fault")
    return json.dumps({"errors": [{"code": code, "message": message}]}).encode()
