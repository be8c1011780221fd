"""How a mount's server tells the mount it is ready, or why it is not: one JSON line on a pipe.

The mount hands ``blockstore serve`` the write end of a pipe (``--ready-fd
N``). The server writes exactly one line and closes it: either
``{"ready": true, "exports": {NAME: URI, ...}, "warnings": [...]}`` once it
listens, or ``{"ready": false, "error": MESSAGE}`` when it gives up first.
A server that dies without a word closes the pipe by dying, so the mount
sees end-of-file at once instead of waiting out a timeout; its exit status
then comes from its parent. Nothing is learned from the server's log.

This module holds both ends of that format, so the two cannot drift apart.
"""

from __future__ import annotations

import json
import logging
import os
import select
import time
from dataclasses import dataclass, field
from types import TracebackType

MAX_LINE = 1 << 20
"""More than any status line needs: a server cannot make the mount buffer without end."""


@dataclass(frozen=True)
class Ready:
    exports: dict[str, str]  # export name -> NBD URI, in the order the server gave them
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Failed:
    error: str


@dataclass(frozen=True)
class Silent:
    """The pipe closed with no status line: the server died before it could say."""


@dataclass(frozen=True)
class TimedOut:
    """Nothing within the time allowed, and the pipe still open."""


Status = Ready | Failed | Silent | TimedOut


def encode_ready(exports: dict[str, str], warnings: list[str]) -> bytes:
    return _line({"ready": True, "exports": exports, "warnings": warnings})


def encode_failed(error: str) -> bytes:
    return _line({"ready": False, "error": error})


def _line(message: dict) -> bytes:
    return json.dumps(message, ensure_ascii=True).encode() + b"\n"


def decode(line: bytes) -> Ready | Failed:
    """The status a line says; a line that does not parse is the server's failure to say it."""
    try:
        message = json.loads(line)
        if message.get("ready") is True:
            exports = message["exports"]
            warnings = message.get("warnings", [])
            if isinstance(exports, dict) and all(
                isinstance(k, str) and isinstance(v, str) for k, v in exports.items()
            ):
                return Ready(dict(exports), [str(w) for w in warnings])
        elif message.get("ready") is False:
            return Failed(str(message["error"]))
    except (ValueError, KeyError, TypeError, AttributeError):
        pass
    return Failed(f"the server sent a status line that does not parse: {line[:200]!r}")


def receive(fd: int, timeout: float) -> Status:
    """Wait up to ``timeout`` seconds for the one line on ``fd`` (the pipe's read end)."""
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
            return decode(bytes(received)) if received.strip() else Silent()
        received += chunk
        line, newline, _ = received.partition(b"\n")
        if newline or len(received) > MAX_LINE:
            return decode(bytes(line))


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

    def __enter__(self) -> ReadinessPipe:
        logging.getLogger().addHandler(self._collector)
        return self

    def ready(self, exports: dict[str, str]) -> None:
        self._say(encode_ready(exports, list(self._warnings)))

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        _tb: TracebackType | None,
    ) -> None:
        if error is not None:
            self._say(encode_failed(str(error) or kind.__name__))
        self._say(b"")

    def _say(self, line: bytes) -> None:
        """Send ``line`` (nothing, to just close), once: the first status said is the one."""
        if self._file.closed:
            return
        logging.getLogger().removeHandler(self._collector)
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
