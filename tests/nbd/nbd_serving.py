"""Starting servers for tests and naming their URIs."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from rig.images import ErofsImage

from blockstore.export import Export
from nbdfront.protocol import MAX_PAYLOAD
from nbdfront.server import NBDServer


@dataclass
class Facts:
    """Size and description of an export with no bytes behind it: all the handshake needs."""

    size: int
    description: str = ""


@dataclass
class Served:
    """A running server, the URIs of its default export, and what it serves."""

    server: NBDServer
    uri: str
    unix_uri: str
    unix_path: str
    image: ErofsImage | None
    export: Export


def start_server(exports: Mapping[str, Export], tmp: Path, default: str) -> NBDServer:
    server = NBDServer(
        exports, tcp=("127.0.0.1", 0), unix=str(tmp / "nbd.sock"), default_export=default
    )
    server.start()
    return server


def served(server: NBDServer, name: str, image: ErofsImage | None, export: Export) -> Served:
    host, port = server.tcp_address
    path = server.unix_path
    return Served(
        server,
        f"nbd://{host}:{port}/{name}",
        f"nbd+unix:///{name}?socket={path}",
        path,
        image,
        export,
    )


class ZeroExport:
    """A 1 TiB export of zeros that counts the reads it was asked for."""

    name, description, size = "zeros", "zeros", 1 << 40

    def __init__(self):
        self.reads = 0
        self._zeros = bytes(MAX_PAYLOAD)
        self._lock = threading.Lock()

    def read(self, offset, length):
        with self._lock:
            self.reads += 1
        return [memoryview(self._zeros)[:length]]

    def read_cached(self, offset, length):
        return self.read(offset, length)

    def cache(self, offset, length):
        pass


class SlowMissExport(ZeroExport):
    """Zeros that are never cached: every read is a miss taking ``delay`` seconds.

    Counts the reads running at once (``most_in_flight``), which only the
    server's byte budget keeps below its number of workers.
    """

    def __init__(self, delay: float = 0.05):
        super().__init__()
        self.delay = delay
        self.in_flight = 0
        self.most_in_flight = 0

    def read(self, offset, length):
        with self._lock:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            time.sleep(self.delay)
            return super().read(offset, length)
        finally:
            with self._lock:
                self.in_flight -= 1

    def read_cached(self, offset, length):
        return None


class SlowLookupExport(ZeroExport):
    """Zeros whose cache lookup, made on the connection's reader thread, takes ``delay``
    seconds and always misses: every read is then served by a worker, at once, while the
    reader thread is still busy with the next request."""

    def __init__(self, delay: float = 0.3):
        super().__init__()
        self.delay = delay

    def read_cached(self, offset, length):
        time.sleep(self.delay)
        return None
