"""What ``blockstore serve`` prints about where it listens: addresses a client can use."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest


def _serve_until_ready(argv: list[str]) -> tuple[subprocess.Popen, list[str]]:
    """The server, and the lines it printed up to ``ready``."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "blockstore", "serve", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines = []
    for line in proc.stdout:
        if line.strip() == "ready":
            return proc, lines
        lines.append(line.strip())
    proc.wait()
    raise AssertionError(f"serve exited before ready: {proc.stderr.read()}")


@pytest.mark.parametrize("listen", ["0.0.0.0:0", "[::]:0"])
def test_a_wildcard_listen_address_is_printed_as_one_clients_can_use(
    registry, pushed_images, tmp_path: Path, listen: str
):
    """``--listen 0.0.0.0`` (or ``[::]``) means every address of this machine, which no
    client elsewhere can connect to as such: the export URIs and the metrics URL name the
    machine instead, and each works; the warning names every address of this machine.
    Before, ``nbd://0.0.0.0:PORT/`` was printed, and ``0.0.0.0:PORT`` or ``:::PORT`` in
    the warning."""
    argv = [pushed_images.small, "--insecure", "--cache-dir", str(tmp_path / "cache")]
    proc, lines = _serve_until_ready([*argv, "--listen", listen, "--metrics", "0.0.0.0:0"])
    try:
        uris = [line.split()[2] for line in lines if line.startswith("export ")]
        (metrics,) = [line.split()[1] for line in lines if line.startswith("metrics ")]
        for uri in [*uris, metrics]:
            assert "0.0.0.0" not in uri and "[::]" not in uri, lines
        for uri in uris:
            size = subprocess.run(["nbdinfo", "--size", uri], capture_output=True, text=True)
            assert size.returncode == 0, size.stderr
            assert int(size.stdout) > 0
        with urllib.request.urlopen(metrics, timeout=10) as reply:
            assert b"blockstore_cache" in reply.read()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    warning = proc.stderr.read()
    proc.stdout.close()
    proc.stderr.close()
    port = uris[0].rsplit(":", 1)[1].split("/")[0]
    assert f"listening on every address of this machine (port {port}) without TLS" in warning
    assert f"anyone who can reach this machine's port {port}," in warning


def test_a_relative_socket_path_is_printed_absolute(registry, pushed_images, tmp_path: Path):
    """``--unix s.sock`` binds in the working directory, as given; the URIs printed name the
    socket by its absolute path, so a client started elsewhere (another terminal, a
    service) connects with them. Before, ``socket=s.sock`` found nothing outside that
    directory."""
    argv = [pushed_images.small, "--insecure", "--cache-dir", str(tmp_path / "cache")]
    proc = subprocess.Popen(
        [sys.executable, "-m", "blockstore", "serve", *argv, "--unix", "s.sock"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    try:
        lines = []
        for line in proc.stdout:
            if line.strip() == "ready":
                break
            lines.append(line.split())
        uris = [words[2] for words in lines if words[0] == "export"]
        assert uris and all(uri.endswith(f"?socket={tmp_path}/s.sock") for uri in uris), lines
        assert all(uri.startswith("nbd+unix:///") for uri in uris), lines
        for uri in uris:
            size = subprocess.run(["nbdinfo", "--size", uri], capture_output=True, text=True)
            assert size.returncode == 0, size.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        proc.stdout.close()
        proc.stderr.close()


@pytest.mark.parametrize(
    "mistake",
    [
        ["alice:S3cr3t-pw@127.0.0.1:1/repo:tag"],
        ["127.0.0.1:1/repo:tag", "--password", "pw"],
        ["127.0.0.1:1/repo:tag", "--platform", "linux/"],
        ["127.0.0.1:1/repo:tag", "--mirror", "http://bob:pw@127.0.0.1:2"],
    ],
    ids=["credentials-in-reference", "password-without-user", "bad-platform", "mirror-login"],
)
def test_a_mistake_in_the_arguments_is_said_before_the_address_is_taken(
    tmp_path: Path, mistake: list[str]
):
    """Tried: ``serve`` with a mistake in its image or registry arguments (a reference
    holding a login, a password with no user name, a malformed platform, a mirror address
    holding a login), at an address another process listens on. Must hold: exit 2 with
    the mistake in one line, the address neither taken nor named, no cache made. Before,
    the addresses were bound first, so the same command said "cannot listen" (exit 1)
    where the port was taken (the default port, held by any other server) and the
    mistake only once it was free."""
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("BLOCKSTORE_")}
        argv = [*mistake, "--listen", f"127.0.0.1:{port}", "--cache-dir", str(tmp_path / "c")]
        done = subprocess.run(
            [sys.executable, "-m", "blockstore", "serve", *argv],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
    assert done.returncode == 2, done.stderr
    assert "cannot listen" not in done.stderr and len(done.stderr.splitlines()) == 1, done.stderr
    assert not (tmp_path / "c").exists()
