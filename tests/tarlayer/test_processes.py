"""Tar layers opened by several processes sharing one cache at once."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
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


def test_two_servers_opening_a_new_gzip_layer_index_it_once(tmp_path, registry, fault_proxy):
    """Tried: two ``serve`` processes on one empty cache open the same tar.gz image, the
    second while the first is still reading the layer to index it (its blob paced by a
    proxy). Must hold: the layer is read and indexed by one of them only; the other
    waits, then takes the index it kept; each serves the layer's tar whole and right.
    Before, both inflated the whole layer, and the second pass, starting, dropped the
    tar the first one was storing."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(4):
        (src / f"f{i}.bin").write_bytes(os.urandom(1 << 20))
    tar = make_tar(src, tmp_path / "layer.tar").read_bytes()
    ref = push_tar_layer(registry, "o/twice", "v1", "gzip", tar, tmp_path)
    digest = "sha256:" + hashlib.sha256(compress("gzip", tar)).hexdigest()
    proxy = fault_proxy(registry)
    proxy.fault = Fault("pace", path_contains=digest, method="GET", seconds=0.08)
    reference = ref.replace(registry.host, proxy.host)
    cache = tmp_path / "cache"
    procs = [start_serving(reference, cache, tmp_path / "a.sock")]
    try:
        assert wait_for(lambda: any(digest in r.path for r in proxy.requests), 60)
        procs.append(start_serving(reference, cache, tmp_path / "b.sock"))
        for proc, sock in zip(procs, ("a.sock", "b.sock"), strict=True):
            name = ready_export(proc)
            uri = f"nbd+unix:///{name}?socket={tmp_path / sock}"
            served = subprocess.run(["nbdcopy", uri, "-"], capture_output=True, timeout=120)
            assert served.returncode == 0, served.stderr
            assert tar in served.stdout
    finally:
        for proc in procs:
            proc.terminate()
    logs = []
    for proc in procs:
        assert proc.wait(timeout=30) == 0
        logs.append(proc.stderr.read())
        proc.stdout.close()
        proc.stderr.close()
    assert sum(log.count(INDEXING) for log in logs) == 1, logs
    assert "waiting for its index" in logs[1], logs[1]
