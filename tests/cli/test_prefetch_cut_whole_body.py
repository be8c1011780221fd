"""``blockstore prefetch`` from storage that ignores Range and cuts its whole-blob reply."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from rig.fault_proxy import Fault
from rig.processes import QuietHTTPServer

SENT = 100_000
"""Bytes of the blob the storage sends before it closes the connection."""


@pytest.fixture
def cutting_storage(erofs_images) -> Iterator[str]:
    """A storage host (plain HTTP) that answers every GET 200 with the small image's
    blob, Range ignored and no ``Content-Length`` (the body runs to the connection's
    close), and closes after ``SENT`` bytes: its URL."""
    blob = erofs_images.small.path.read_bytes()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(blob[:SENT])
            self.close_connection = True

        def log_message(self, *args: object) -> None:
            pass

    server = QuietHTTPServer(("127.0.0.1", 0), Handler)
    server.start_in_background()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.stop()


def test_a_whole_blob_reply_without_length_cut_short_ends_a_prefetch_as_out_of_reach(
    registry, pushed_images, fault_proxy, cutting_storage, tmp_path: Path
):
    """Tried: ``prefetch --timeout 5`` of the small image from a registry that redirects
    blob reads to storage answering each one 200 with the whole blob (Range ignored), no
    ``Content-Length``, closing the connection after 100 kB. Must hold: exit 5, the
    registry out of reach, in one line naming the blob, as for a 206 or a sized 200 whose
    body is cut short. Before, it exited 7, the code of a read that met an offline cache:
    a body with no length to fall short of ended cleanly, and its end before the range
    was taken for no fault of the registry."""
    front = fault_proxy(registry)
    front.fault = Fault(
        "redirect", path_contains="/blobs/sha256:", method="GET", redirect_to=cutting_storage
    )
    reference = pushed_images.small.replace(registry.host, front.host)

    argv = ["prefetch", reference, "--insecure", "--timeout", "5"]
    got = subprocess.run(
        [sys.executable, "-m", "blockstore", *argv, "--cache-dir", str(tmp_path / "cache")],
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert got.returncode == 5, got.stderr
    (line,) = got.stderr.strip().splitlines()
    assert "blob sha256:" in line and "fixtures/small" in line, line
