"""How a mount's server tells the mount it is ready, or why it is not: one JSON line on a pipe.

The mount hands ``blockstore serve`` the write end of a pipe (``--ready-fd
N``). The server writes one status line and closes it: either
``{"ready": true, "exports": {NAME: URI, ...}, "warnings": [...]}`` once it
listens (with ``"metrics": URL`` when it publishes metrics), or
``{"ready": false, "error": MESSAGE}`` when it gives up first.
Before it, long work (the first indexing pass of a large tar layer) may
send ``{"progress": TEXT}`` lines: the mount waits for as long as they come,
its timeout counting from the last one.
A server that dies without a word closes the pipe by dying, so the mount
sees end-of-file at once instead of waiting out a timeout; its exit status
then comes from its parent. Nothing is learned from the server's log.

This module holds both ends of that format, so the two cannot drift apart.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType

from blockstore.progress import PROGRESS_LOGGER

MAX_LINE = 1 << 20
"""More than any status line needs: a server cannot make the mount buffer without end."""


@dataclass(frozen=True)
class Ready:
    exports: dict[str, str]  # export name -> NBD URI, in the order the server gave them
    warnings: list[str] = field(default_factory=list)
    metrics: str | None = None  # the metrics URL, its port the one picked for port 0


@dataclass(frozen=True)
class Failed:
    error: str


@dataclass(frozen=True)
class Progress:
    """The server is at work on something long before it can be ready."""

    text: str


@dataclass(frozen=True)
class Silent:
    """The pipe closed with no status line: the server died before it could say."""


@dataclass(frozen=True)
class TimedOut:
    """Nothing within the time allowed, and the pipe still open."""


Status = Ready | Failed | Silent | TimedOut


def encode_ready(exports: dict[str, str], warnings: list[str], metrics: str | None = None) -> bytes:
    said = {"ready": True, "exports": exports, "warnings": warnings}
    return _line(said if metrics is None else {**said, "metrics": metrics})


def encode_failed(error: str) -> bytes:
    return _line({"ready": False, "error": error})


def encode_progress(text: str) -> bytes:
    return _line({"progress": text})


def _line(message: dict) -> bytes:
    return json.dumps(message, ensure_ascii=True).encode() + b"\n"


def decode(line: bytes) -> Ready | Failed | Progress:
    """The status a line says; a line that does not parse is the server's failure to say it."""
    try:
        message = json.loads(line)
        if "ready" not in message and isinstance(message.get("progress"), str):
            return Progress(message["progress"])
        if message.get("ready") is True:
            exports = message["exports"]
            warnings = message.get("warnings", [])
            metrics = message.get("metrics")
            if isinstance(exports, dict) and all(
                isinstance(k, str) and isinstance(v, str) for k, v in exports.items()
            ):
                metrics = metrics if isinstance(metrics, str) else None
                return Ready(dict(exports), [str(w) for w in warnings], metrics)
        elif message.get("ready") is False:
            return Failed(str(message["error"]))
    except (ValueError, KeyError, TypeError, AttributeError):
        pass
    return Failed(f"the server sent a status line that does not parse: {line[:200]!r}")


def receive(
    fd: int, timeout: float, on_progress: Callable[[str], None] = lambda text: None
) -> Status:
    """Wait for the status line on ``fd`` (the pipe's read end), ``timeout`` seconds from
    the start or from the last progress line, each of which goes to ``on_progress``."""
    deadline = time.monotonic() + timeout
    received = bytearray()
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return TimedOut()
        readable, _, _ = select.select([fd], [], [], left)
        if not readable:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            last = decode(bytes(received)) if received.strip() else Silent()
            return Silent() if isinstance(last, Progress) else last
        received += chunk
        while True:
            line, newline, rest = received.partition(b"\n")
            if not newline and len(received) <= MAX_LINE:
                break
            status = decode(bytes(line))
            if not isinstance(status, Progress):
                return status
            received = bytearray(rest)
            deadline = time.monotonic() + timeout
            on_progress(status.text)


class ReadinessPipe:
    """The server's end: collects the warnings logged before ready, then says one line.

    Used as a context manager around everything the server does before it is
    ready: an exception that escapes before ``ready()`` is sent as the error
    (and goes on to be reported as usual), so the mount hears the cause from
    the server itself, not from its log.
    """

    def __init__(self, fd: int):
        os.set_inheritable(fd, False)  # a child of the server must not hold the mount waiting
        self._file = os.fdopen(fd, "wb", buffering=0)
        self._warnings: list[str] = []
        self._collector = _Collector(self._warnings)
        self._forwarder = _Forwarder(self._progress)

    def __enter__(self) -> ReadinessPipe:
        logging.getLogger().addHandler(self._collector)
        progress = logging.getLogger(PROGRESS_LOGGER)
        progress.setLevel(logging.INFO)
        progress.addHandler(self._forwarder)
        return self

    def ready(self, exports: dict[str, str], metrics: str | None = None) -> None:
        self._say(encode_ready(exports, list(self._warnings), metrics))

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        _tb: TracebackType | None,
    ) -> None:
        if error is not None:
            self._say(encode_failed(str(error) or kind.__name__))
        self._say(b"")

    def _progress(self, text: str) -> None:
        """Tell the mount the server is at work (before the status; never closes)."""
        if self._file.closed:
            return
        # OSError: the mount gave up waiting; ValueError: the status closed it meanwhile.
        with contextlib.suppress(OSError, ValueError):
            self._file.write(encode_progress(text))

    def _say(self, line: bytes) -> None:
        """Send ``line`` (nothing, to just close), once: the first status said is the one."""
        if self._file.closed:
            return
        logging.getLogger().removeHandler(self._collector)
        logging.getLogger(PROGRESS_LOGGER).removeHandler(self._forwarder)
        try:
            if line:
                self._file.write(line)
        except OSError:
            pass  # the mount gave up waiting; the server's own exit says the rest
        finally:
            self._file.close()


class _Collector(logging.Handler):
    def __init__(self, into: list[str]):
        super().__init__(logging.WARNING)
        self._into = into

    def emit(self, record: logging.LogRecord) -> None:
        self._into.append(record.getMessage())


class _Forwarder(logging.Handler):
    """Sends what the progress logger says down the pipe, as progress lines."""

    def __init__(self, send: Callable[[str], None]):
        super().__init__(logging.INFO)
        self._send = send

    def emit(self, record: logging.LogRecord) -> None:
        self._send(record.getMessage())
