"""Tar layers opened by several processes sharing one cache at once."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from oci_layout import compress, push_tar_layer
from rig.fault_proxy import Fault
from rig.waiting import wait_for
from trees import make_tar

from nbdfront.mount import readiness

INDEXING = "reading the gzip layer once to index it"


def start_serving(
    reference: str, cache: Path, sock: Path, extra: Sequence[str] = (), fds: Sequence[int] = ()
) -> subprocess.Popen:
    """``blockstore -v serve`` of ``reference`` on a Unix socket, logging what it does;
    ``extra`` arguments, ``fds`` passed to it."""
    argv = [sys.executable, "-m", "blockstore", "-v", "serve", reference, "--insecure"]
    argv += ["--cache-dir", str(cache), "--unix", str(sock), "--no-trace", *extra]
    return subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, pass_fds=fds
    )


def ready_export(proc: subprocess.Popen) -> str:
    """The name of the layer's export, once the server says ``ready``."""
    names = []
    for line in proc.stdout:
        words = line.split()
        if words == ["ready"]:
            return names[0]
        if words[:1] == ["export"]:
            names.append(words[1].strip('"'))
    raise AssertionError(f"serve exited before ready: {proc.wait()} {proc.stderr.read()}")


class Stderr:
    """The lines a process writes to stderr, gathered as they come, so that a test can
    wait for one while the process runs."""

    def __init__(self, proc: subprocess.Popen):
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._gather, args=(proc,), daemon=True)
        self._reader.start()

    def _gather(self, proc: subprocess.Popen) -> None:
        for line in proc.stderr:
            self.lines.append(line)

    def said(self, words: str) -> bool:
        return any(words in line for line in list(self.lines))

    def whole(self) -> str:
        """Everything, once the process has closed its stderr."""
        self._reader.join(30)
        return "".join(self.lines)


@dataclass
class StoppedPass:
    """A ``serve`` stopped (SIGSTOP) in its indexing pass over a new tar.gz layer, holding
    the layer's indexing lock; its blob paced by a proxy, so the pass cannot have ended
    before it was stopped."""

    reference: str
    cache: Path
    tar: bytes
    proc: subprocess.Popen
    log: Stderr
    stopped: bool = True

    def go_on(self) -> None:
        if self.stopped:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.stopped = False


@pytest.fixture
def stopped_pass(tmp_path, registry, fault_proxy) -> Iterator[StoppedPass]:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(4):
        (src / f"f{i}.bin").write_bytes(os.urandom(1 << 20))
    tar = make_tar(src, tmp_path / "layer.tar").read_bytes()
    ref = push_tar_layer(registry, "o/twice", "v1", "gzip", tar, tmp_path)
    digest = "sha256:" + hashlib.sha256(compress("gzip", tar)).hexdigest()
    proxy = fault_proxy(registry)
    proxy.fault = Fault("pace", path_contains=digest, method="GET", seconds=0.02)
    reference = ref.replace(registry.host, proxy.host)
    cache = tmp_path / "cache"
    proc = start_serving(reference, cache, tmp_path / "a.sock")
    log = Stderr(proc)
    try:
        assert wait_for(lambda: log.said(INDEXING), 60), log.lines
        os.kill(proc.pid, signal.SIGSTOP)
        yield StoppedPass(reference, cache, tar, proc, log)
    finally:
        if proc.poll() is None:  # not ended by the test
            os.kill(proc.pid, signal.SIGCONT)
            proc.terminate()
            proc.wait(timeout=30)
        proc.stdout.close()


def test_two_servers_opening_a_new_gzip_layer_index_it_once(tmp_path, stopped_pass):
    """Tried: two ``serve`` processes on one empty cache open the same tar.gz image, the
    second while the first is reading the layer to index it: the first is stopped
    once it says it indexes, and let go once the second says it waits, so the second
    opens in the middle of the pass however loaded the machine. Must hold: the layer
    is read and indexed by one of them only; the other waits, then takes the index it
    kept; each serves the layer's tar whole and right. Before, both inflated the whole
    layer, and the second pass, starting, dropped the tar the first one was storing."""
    first = stopped_pass
    second = start_serving(first.reference, first.cache, tmp_path / "b.sock")
    logs = [first.log, Stderr(second)]
    try:
        waited = wait_for(lambda: logs[1].said("waiting for its index"), 60)
        first.go_on()
        assert waited, logs[1].lines
        for proc, sock in zip((first.proc, second), ("a.sock", "b.sock"), strict=True):
            name = ready_export(proc)
            uri = f"nbd+unix:///{name}?socket={tmp_path / sock}"
            served = subprocess.run(["nbdcopy", uri, "-"], capture_output=True, timeout=120)
            assert served.returncode == 0, served.stderr
            assert first.tar in served.stdout
    finally:
        first.go_on()
        for proc in (first.proc, second):
            proc.terminate()
    for proc in (first.proc, second):
        assert proc.wait(timeout=30) == 0
    second.stdout.close()
    whole = [log.whole() for log in logs]
    assert sum(text.count(INDEXING) for text in whole) == 1, whole


PATIENCE = 10.0
"""The readiness timeout given to the mount's side of the pipe in the test below: well
over the 2 s between two progress lines and the server's start before its first (CI
once saw that take over 5 s under load), well under the other process's pass."""


def test_a_server_waiting_for_another_s_index_keeps_its_mount_waiting(tmp_path, stopped_pass):
    """Tried: a second ``serve``, started as ``mount`` starts it (``--ready-fd``), opens
    the layer while the first is stopped in its indexing pass, and that pass lasts
    more than twice the time the mount waits for a word from its server. Must hold:
    the waiting server says so on the pipe, as progress, so the mount waits on; once
    the first goes on, it is ready. Before, it said nothing there while it waited (up
    to 300 s), so a mount whose image shared a layer being indexed by another process
    for longer than the mount's 120 s gave up on a server that was doing as told."""
    first = stopped_pass
    read_end, write_end = os.pipe()
    argv = ["--ready-fd", str(write_end)]
    second = start_serving(first.reference, first.cache, tmp_path / "b.sock", argv, (write_end,))
    os.close(write_end)
    log = Stderr(second)
    heard: list[str] = []
    statuses: list[readiness.Status] = []

    def receive() -> None:
        statuses.append(readiness.receive(read_end, PATIENCE, heard.append))

    receiver = threading.Thread(target=receive, daemon=True)
    began = time.monotonic()
    receiver.start()
    try:
        # Let go once the wait has outlasted the mount's patience twice over (or the
        # mount gave up before that).
        assert wait_for(lambda: statuses or time.monotonic() - began > 2 * PATIENCE, 60)
        first.go_on()
        receiver.join(60)
    finally:
        first.go_on()
        second.terminate()
        second.wait(timeout=30)
        second.stdout.close()
        os.close(read_end)
    (status,) = statuses
    assert isinstance(status, readiness.Ready), (status, heard, log.whole())
    assert any("waiting for another process's index" in text for text in heard), heard


def test_a_plain_tar_layer_walked_slowly_keeps_its_mount_waiting(tmp_path, registry, fault_proxy):
    """Tried: a plain tar layer of 16 files of 1 MiB, each read of its blob held 0.8 s by a
    proxy (a far registry), opened by ``serve`` as ``mount`` starts it (``--ready-fd``):
    its index is built by walking the tar's headers, a round trip each, for longer than
    the mount waits for a word from its server. Must hold: the walk says
    how far it has got on the pipe, as progress, so the mount waits on, and the server
    is ready. Before, a header walk said nothing until it ended, so a mount of a plain
    tar layer of many files over a slow link gave up (after 120 s) on a server at work."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(16):
        (src / f"f{i:02d}.bin").write_bytes(os.urandom(1 << 20))
    tar = make_tar(src, tmp_path / "layer.tar").read_bytes()
    ref = push_tar_layer(registry, "o/walked", "v1", "tar", tar, tmp_path)
    digest = "sha256:" + hashlib.sha256(tar).hexdigest()
    proxy = fault_proxy(registry)
    proxy.fault = Fault("delay", path_contains=digest, method="GET", seconds=0.8)
    read_end, write_end = os.pipe()
    argv = ["--ready-fd", str(write_end)]
    reference = ref.replace(registry.host, proxy.host)
    server = start_serving(reference, tmp_path / "cache", tmp_path / "s.sock", argv, (write_end,))
    os.close(write_end)
    log = Stderr(server)
    heard: list[str] = []
    try:
        status = readiness.receive(read_end, PATIENCE, heard.append)
    finally:
        server.terminate()
        server.wait(timeout=30)
        server.stdout.close()
        os.close(read_end)
    assert isinstance(status, readiness.Ready), (status, heard, log.whole())
    assert any(f"{digest}: reading the tar's headers to index it" in text for text in heard), heard
