"""Tar layers opened by several processes sharing one cache at once."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from oci_layout import compress, push_tar_layer
from rig.fault_proxy import Fault
from rig.waiting import wait_for
from trees import make_tar

INDEXING = "reading the gzip layer once to index it"


def start_serving(reference: str, cache: Path, sock: Path) -> subprocess.Popen:
    """``blockstore -v serve`` of ``reference`` on a Unix socket, logging what it does."""
    argv = [sys.executable, "-m", "blockstore", "-v", "serve", reference, "--insecure"]
    argv += ["--cache-dir", str(cache), "--unix", str(sock), "--no-trace"]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


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


def test_two_servers_opening_a_new_gzip_layer_index_it_once(tmp_path, registry, fault_proxy):
    """Tried: two ``serve`` processes on one empty cache open the same tar.gz image, the
    second while the first is reading the layer to index it: the first is stopped
    (SIGSTOP) once it says it indexes, and let go once the second says it waits, so
    the second opens in the middle of the pass however loaded the machine (its blob is
    paced by a proxy, so the pass cannot end before the first is stopped). Must hold:
    the layer is read and indexed by one of them only; the other waits, then takes the
    index it kept; each serves the layer's tar whole and right. Before, both inflated
    the whole layer, and the second pass, starting, dropped the tar the first one was
    storing."""
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
    procs = [start_serving(reference, cache, tmp_path / "a.sock")]
    logs = [Stderr(procs[0])]
    stopped = False
    try:
        assert wait_for(lambda: logs[0].said(INDEXING), 60), logs[0].lines
        os.kill(procs[0].pid, signal.SIGSTOP)
        stopped = True
        procs.append(start_serving(reference, cache, tmp_path / "b.sock"))
        logs.append(Stderr(procs[1]))
        waited = wait_for(lambda: logs[1].said("waiting for its index"), 60)
        os.kill(procs[0].pid, signal.SIGCONT)
        stopped = False
        assert waited, logs[1].lines
        for proc, sock in zip(procs, ("a.sock", "b.sock"), strict=True):
            name = ready_export(proc)
            uri = f"nbd+unix:///{name}?socket={tmp_path / sock}"
            served = subprocess.run(["nbdcopy", uri, "-"], capture_output=True, timeout=120)
            assert served.returncode == 0, served.stderr
            assert tar in served.stdout
    finally:
        if stopped:
            os.kill(procs[0].pid, signal.SIGCONT)
        for proc in procs:
            proc.terminate()
    for proc in procs:
        assert proc.wait(timeout=30) == 0
        proc.stdout.close()
    whole = [log.whole() for log in logs]
    assert sum(text.count(INDEXING) for text in whole) == 1, whole
