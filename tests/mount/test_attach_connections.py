"""How the nbdfuse attach talks to a server that offers multi-conn.

nbdfuse opens four connections to such a server by default; the attach asks
for one (``attach.FUSE_CONNECTIONS``), which is faster for the kernel's
low-depth reads through FUSE. Tried: an export read whole through the FUSE
file by several threads at once. Must hold: every byte right, served over
exactly one connection, though the server offers multi-conn.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

from nbdfront.mount import attach
from nbdfront.protocol import ServerConnection
from nbdfront.server import NBDServer

SIZE = 8 << 20


class PatternExport:
    """Bytes that differ at every offset; counts the connections that read them."""

    name, description, size = "pattern", "a test pattern", SIZE

    def __init__(self) -> None:
        self._bytes = os.urandom(SIZE)

    def read(self, offset: int, length: int) -> list[memoryview]:
        return [memoryview(self._bytes)[offset : offset + length]]

    def read_cached(self, offset: int, length: int) -> list[memoryview]:
        return self.read(offset, length)

    def cache(self, offset: int, length: int) -> None:
        pass


def test_the_fuse_attach_reads_over_one_connection(mount_dirs, nbdfuse_only, monkeypatch):
    tmp, _run = mount_dirs
    opened: list[ServerConnection] = []
    lock = threading.Lock()
    real_init = ServerConnection.__init__

    def counting_init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        with lock:
            opened.append(self)

    monkeypatch.setattr(ServerConnection, "__init__", counting_init)
    export = PatternExport()
    server = NBDServer({export.name: export}, unix=str(tmp / "nbd.sock"))
    server.start()
    try:
        uri = f"nbd+unix:///{export.name}?socket={tmp / 'nbd.sock'}"
        attached = attach.attach(uri, export.name, tmp / "att", tmp / "fuse.log", attach.NBDFUSE)
        try:
            pieces = range(0, SIZE, 1 << 20)

            def read_piece(offset: int) -> bytes:
                with open(attached.device, "rb", buffering=0) as device:
                    return os.pread(device.fileno(), 1 << 20, offset)

            with ThreadPoolExecutor(4) as pool:
                got = b"".join(pool.map(read_piece, pieces))
            assert got == export.read(0, SIZE)[0]
            assert len(opened) == attach.FUSE_CONNECTIONS == 1, "nbdfuse's default is four"
        finally:
            attach.detach(attached)
    finally:
        server.shutdown()
