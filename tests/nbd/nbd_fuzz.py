"""Fuzzing a running server through its socket, and the long run of it.

Hypothesis writes whole client conversations (handshake and transmission,
well formed or mutated) and sends them to a real ``NBDServer`` in random
pieces, then half-closes. Whatever arrives, the server must never crash or
log an internal error, must close each conversation once the client has
gone, and must keep serving the right bytes: a connection held open across
the run reads through it, and ``nbdcopy`` copies the whole export at the end.

The suite runs a short pass (``test_port_faults.py``). For a long one:

    .venv/bin/python tests/nbd/nbd_fuzz.py --minutes 10
"""

from __future__ import annotations

import argparse
import filecmp
import hashlib
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nbd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nbd_strategies import conversations, mutated, pieces

from nbdfront.server import NBDServer

# Export names the strategies draw from; both serve the same bytes.
EXPORTS = ("layer0", "layer1")


def exchange(address: tuple[str, int] | str, script: bytes, cuts: list[int]) -> None:
    """Send ``script`` in pieces, half-close, and read until the server closes.

    The server may hang up early (bad bytes end a conversation); it must not
    keep a conversation open once the client has finished.
    """
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(address)
        try:
            for piece in pieces(script, cuts):
                sock.sendall(piece)
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(1 << 20):
                pass
        except TimeoutError:
            raise AssertionError("the server kept a finished conversation open") from None
        except OSError:
            pass  # the server hung up on bytes it would not take (reset, not connected)


class ErrorLog(logging.Handler):
    """Collects the server's internal errors (``log.exception`` and worse)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(self.format(record))


def fuzz(server: NBDServer, steady: nbd.NBD, data: bytes, examples: int) -> None:
    """Run ``examples`` hypothesis conversations against ``server``, alternating TCP and
    the Unix socket; after each, ``steady`` (connected beforehand) reads right bytes."""
    scripts = st.one_of(conversations(), mutated(), st.binary(max_size=300))

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(scripts, st.lists(st.integers(0, 4000), max_size=6), st.booleans(), st.integers())
    def conversation(script: bytes, cuts: list[int], over_unix: bool, where: int) -> None:
        address = server.unix_path if over_unix and server.unix_path else server.tcp_address
        exchange(address, script, cuts)
        offset = where % (len(data) - 4096)
        assert steady.pread(4096, offset) == data[offset : offset + 4096]

    conversation()


def wait_for_no_connections(server: NBDServer, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while server.connection_count and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.connection_count == 0, f"{server.connection_count} connections left"


def copy_is_exact(uri: str, expected: Path, scratch: Path) -> None:
    """nbdcopy of the whole export equals the file it serves."""
    out = scratch / "copy.bin"
    subprocess.run(["nbdcopy", uri, str(out)], check=True, timeout=120)
    assert filecmp.cmp(out, expected, shallow=False), "nbdcopy got other bytes"
    out.unlink()


def main() -> int:
    parser = argparse.ArgumentParser(description="Fuzz a running NBD server for a while.")
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--batch", type=int, default=300, help="conversations between checks")
    args = parser.parse_args()
    from rig.local_source import LocalFileSource

    from blockstore.cache import CachedBlob, ChunkStore

    errors = ErrorLog()
    logging.getLogger("nbdfront").addHandler(errors)
    with tempfile.TemporaryDirectory(prefix="nbd-fuzz-") as tmp:
        work = Path(tmp)
        data = os.urandom(3 * 1024 * 1024 + 123)
        path = work / "blob.bin"
        path.write_bytes(data)
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        source = LocalFileSource(path, digest)
        store = ChunkStore(work / "cache")
        blob = CachedBlob(store, digest, len(data), source, name="layer0")
        server = NBDServer(
            dict.fromkeys(EXPORTS, blob),
            tcp=("127.0.0.1", 0),
            unix=str(work / "nbd.sock"),
            default_export="layer1",
        )
        server.start()
        steady = nbd.NBD()
        steady.connect_uri(server.uri("layer0"))
        deadline = time.monotonic() + args.minutes * 60
        rounds = 0
        try:
            while time.monotonic() < deadline:
                fuzz(server, steady, data, args.batch)
                rounds += 1
                assert not errors.records, errors.records
                copy_is_exact(server.uri("layer1"), path, work)
                print(f"{rounds * args.batch} conversations, every byte right", flush=True)
            steady.shutdown()
            wait_for_no_connections(server)
        finally:
            server.shutdown()
            blob.close()
            store.close()
            source.close()
    return 0


if __name__ == "__main__":
    here = Path(__file__).resolve().parent
    sys.path[:0] = [str(here), str(here.parent)]
    sys.exit(main())
