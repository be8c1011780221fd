"""``blockstore serve`` as a user runs it: a process that announces URIs and stops cleanly."""

from __future__ import annotations

import contextlib
import filecmp
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import nbd_wire as w
import pytest
from rig.fault_proxy import Fault
from rig.pushed import push_erofs

from blockstore.cache import ChunkStore, holds
from blockstore.fetch.fetcher import STOP_WAIT
from nbdfront.server.nbd_server import DRAIN_TIMEOUT


@contextmanager
def serving(*args: str, env: dict | None = None) -> Iterator[tuple[subprocess.Popen, dict]]:
    """Run ``blockstore serve ARGS`` until it says ``ready``; yield it and its exports."""
    argv = [sys.executable, "-m", "blockstore", "serve", *args]
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, **(env or {})),
    )
    exports: dict[str, str] = {}
    try:
        for line in proc.stdout:
            words = line.split()
            if words == ["ready"]:
                break
            assert words[0] == "export" and len(words) == 3, line
            exports[words[1].strip('"')] = words[2]
        else:
            raise AssertionError(f"serve exited before ready: {proc.wait()} {proc.stderr.read()}")
        yield proc, exports
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def stop(proc: subprocess.Popen, signum: int = signal.SIGTERM) -> int:
    proc.send_signal(signum)
    return proc.wait(timeout=20)


def nbdinfo(*args: str) -> dict:
    out = subprocess.run(
        ["nbdinfo", "--json", *args], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    return json.loads(out)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_serve_multilayer_image_then_sigterm(
    registry, pushed_images, erofs_images, tmp_path, signum
):
    """Each layer is announced as layer<i> with its URI and the default export is the top
    layer; --list shows them all; a pidfile names the process; SIGTERM, or SIGHUP (a
    closed terminal: before, it killed the server at once and left the pidfile) ends it
    with exit code 0, removing the socket and the pidfile."""
    sock, pidfile = tmp_path / "serve.sock", tmp_path / "serve.pid"
    with serving(
        pushed_images.multilayer,
        "--insecure",
        "--cache-dir",
        str(tmp_path / "c"),
        "--unix",
        str(sock),
        "--pidfile",
        str(pidfile),
    ) as (proc, exports):
        assert list(exports) == ["layer0", "layer1", "layer2", ""]
        assert all(uri.startswith("nbd+unix:///") for uri in exports.values())
        assert int(pidfile.read_text()) == proc.pid
        listing = nbdinfo("--list", exports[""])
        names = {e["export-name"]: e["export-size"] for e in listing["exports"]}
        assert names == {f"layer{i}": erofs_images.layers[i].size for i in range(3)}
        assert nbdinfo(exports[""])["exports"][0]["export-size"] == erofs_images.layers[2].size
        assert stop(proc, signum) == 0
        assert not sock.exists() and not pidfile.exists()


def serve_once(*args: str) -> subprocess.CompletedProcess:
    """``blockstore serve ARGS`` that is to fail before it is ready."""
    argv = [sys.executable, "-m", "blockstore", "serve", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def test_a_serve_that_fails_leaves_the_pidfile_of_the_one_running(
    registry, pushed_images, tmp_path
):
    """Tried: a second ``serve`` given the running one's address and pidfile, and a
    pidfile that names a directory. Must hold: the second fails in one line (exit 1) and
    the running server's pidfile still names it; the directory is said in one line and
    nothing is left beside it. Before, the failing server removed the running one's
    pidfile on its way out, and the directory gave a bare ``[Errno 21]`` line and left
    ``DIR.tmp`` behind."""
    pidfile, cache = tmp_path / "serve.pid", str(tmp_path / "cache")
    common = [pushed_images.small, "--insecure", "--cache-dir", cache, "--pidfile"]
    with serving(*common, str(pidfile), "--listen", "127.0.0.1:0") as (proc, exports):
        port = exports[""].rsplit(":", 1)[1].strip("/")
        second = serve_once(*common, str(pidfile), "--listen", f"127.0.0.1:{port}")
        assert second.returncode == 1, second.stderr
        assert second.stderr == (
            f"blockstore: cannot listen on 127.0.0.1:{port}: Address already in use; another "
            "server listens there: give another --listen HOST:PORT (port 0 picks a free one)\n"
        )
        assert int(pidfile.read_text()) == proc.pid
        assert stop(proc) == 0
    directory = tmp_path / "pid-dir"
    directory.mkdir()
    third = serve_once(*common, str(directory), "--listen", "127.0.0.1:0")
    assert third.returncode == 1, third.stderr
    assert third.stderr == f"blockstore: cannot write {directory}: Is a directory\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "pid-dir"]


def test_a_pidfile_in_a_shared_directory_writes_through_no_link_put_beside_it(
    registry, pushed_images, tmp_path
):
    """Tried: ``serve --pidfile`` in a directory all may write (as /tmp), where another
    user put the names the pidfile is written under first (``serve.pid.tmp``) as links
    to a file of root's. Must hold: the file of root's keeps its bytes, the pidfile names
    the server. Before, the pid was written through the link, over the linked file."""
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o1777)
    victim = tmp_path / "roots-file"
    victim.write_bytes(b"root's own bytes\n")
    pidfile = shared / "serve.pid"
    (shared / "serve.pid.tmp").symlink_to(victim)
    args = [pushed_images.small, "--insecure", "--cache-dir", str(tmp_path / "cache")]
    with serving(*args, "--pidfile", str(pidfile), "--listen", "127.0.0.1:0") as (proc, _):
        assert int(pidfile.read_text()) == proc.pid
        assert stop(proc) == 0
    assert victim.read_bytes() == b"root's own bytes\n"


def test_a_pidfile_swapped_for_a_fifo_or_a_link_does_not_hold_the_server_at_exit(
    registry, pushed_images, tmp_path
):
    """Tried: ``serve --pidfile`` in a directory all may write without the sticky bit,
    where, while it serves, another user puts a FIFO in the pidfile's place; then the
    same with a link to a file of root's that names the server's pid. Must hold: SIGTERM
    ends the server at once (exit 0), the FIFO and the linked file are left as they
    are. Before, the server, checking that the pidfile still named it, opened the FIFO
    and waited for a writer for good."""
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    pidfile = shared / "serve.pid"
    args = [pushed_images.small, "--insecure", "--cache-dir", str(tmp_path / "cache")]
    for swap in ("fifo", "link"):
        with serving(*args, "--pidfile", str(pidfile), "--listen", "127.0.0.1:0") as (proc, _):
            pidfile.unlink()
            if swap == "fifo":
                os.mkfifo(pidfile)
            else:
                victim = tmp_path / "roots-file"
                victim.write_text(f"{proc.pid}\n")
                pidfile.symlink_to(victim)
            assert stop(proc) == 0
        assert pidfile.is_fifo() if swap == "fifo" else victim.read_text() == f"{proc.pid}\n"
        pidfile.unlink()


def test_a_server_whose_pidfile_another_took_over_leaves_it_at_exit(
    registry, pushed_images, tmp_path
):
    """Tried: a second ``serve`` on another address given the running one's pidfile, which
    it then names; the first stops. Must hold: the pidfile still names the second, which
    runs on. Before, the first removed it on its way out, though it named another server
    by then: a script stopping the server by its pidfile found none."""
    pidfile, cache = tmp_path / "serve.pid", str(tmp_path / "cache")
    common = [pushed_images.small, "--insecure", "--cache-dir", cache, "--pidfile", str(pidfile)]
    listen = ["--listen", "127.0.0.1:0"]
    with serving(*common, *listen) as (first, _), serving(*common, *listen) as (second, _):
        assert int(pidfile.read_text()) == second.pid
        assert stop(first) == 0
        assert int(pidfile.read_text()) == second.pid
        assert stop(second) == 0
    assert not pidfile.exists()


def test_a_second_serve_on_a_live_unix_socket_is_refused(registry, pushed_images, tmp_path):
    """Tried: a second ``serve`` given the ``--unix`` path a running server listens on.
    Must hold: it fails in one line (exit 1, address in use, as over TCP) and the running
    server is still reached there. Before, it removed the running server's socket and
    listened in its place: the first server ran on, unreachable, and once the second
    stopped nobody listened there at all."""
    sock, cache = tmp_path / "serve.sock", str(tmp_path / "cache")
    common = [pushed_images.small, "--insecure", "--cache-dir", cache, "--unix", str(sock)]
    with serving(*common) as (proc, exports):
        second = serve_once(*common)
        assert second.returncode == 1, second.stderr
        assert second.stderr == (
            f"blockstore: cannot listen on {sock}: Address already in use; another server "
            "listens there: give another --unix PATH\n"
        )
        assert nbdinfo(exports[""])["exports"][0]["export-size"] > 0
        assert stop(proc) == 0
    assert not sock.exists()


def test_a_server_leaves_the_socket_another_took_over_at_its_path(
    registry, pushed_images, tmp_path
):
    """Tried: a server on a Unix socket whose file a user removed, a second server then
    listening at that path, and the first one stopped. Must hold: the first exits 0 and
    leaves the second's socket, which still serves. Before, stopping took the path for
    its own stale socket, found the second listening there, and failed."""
    sock, cache = tmp_path / "serve.sock", str(tmp_path / "cache")
    common = [pushed_images.small, "--insecure", "--cache-dir", cache, "--unix", str(sock)]
    with serving(*common) as (first, _):
        sock.unlink()
        with serving(*common) as (second, exports):
            assert stop(first) == 0, first.stderr.read()
            assert sock.exists()
            assert nbdinfo(exports[""])["exports"][0]["export-size"] > 0
            assert stop(second) == 0
    assert not sock.exists()


def test_a_live_unix_socket_another_user_cannot_connect_to_is_not_removed(
    registry, pushed_images, tmp_path
):
    """Tried: root's server on a Unix socket (its mode lets only root connect) in a
    directory other users may write, then user nobody's ``serve`` given the same path.
    Must hold: nobody's serve fails in one line (exit 1) saying why, and root's server is
    still reached there. Before, the refused connection (permission denied) was taken for
    a socket nobody listens on: it was removed and root's server ran on, unreachable."""
    if os.geteuid() != 0:
        pytest.skip("needs root, to serve as root and as another user")
    shared = Path(tempfile.mkdtemp(prefix="bs-shared-"))
    try:
        shared.chmod(0o777)  # writable by all, no sticky bit
        sock = shared / "serve.sock"
        image = [pushed_images.small, "--insecure", "--unix", str(sock)]
        with serving(*image, "--cache-dir", str(tmp_path / "cache")) as (proc, exports):
            argv = [sys.executable, "-m", "blockstore", "serve", *image]
            argv += ["--cache-dir", str(shared / "nobodys-cache")]
            other = subprocess.Popen(
                ["runuser", "-u", "nobody", "--", *argv],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                start_new_session=True,
            )
            try:
                _, said = other.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(other.pid, signal.SIGKILL)
                other.communicate()
                pytest.fail("nobody's serve removed the live socket and listened there")
            assert other.returncode == 1, said
            assert said == f"blockstore: cannot listen on {sock}: Permission denied\n"
            assert nbdinfo(exports[""])["exports"][0]["export-size"] > 0
            assert stop(proc) == 0
    finally:
        shutil.rmtree(shared)


def test_serve_one_layer_over_tcp_warm_then_offline(
    registry, pushed_images, erofs_images, tmp_path
):
    """--layer 1 serves only that layer on a TCP port; once nbdcopy has read it, the same
    cache serves it --offline, byte for byte, and SIGINT stops the server cleanly."""
    cache = str(tmp_path / "cache")
    common = [pushed_images.multilayer, "--insecure", "--cache-dir", cache, "--layer", "1"]
    expected = erofs_images.layers[1].path
    for extra in ([], ["--offline"]):
        with serving(*common, *extra, "--listen", "127.0.0.1:0") as (proc, exports):
            assert list(exports) == ["layer1", ""]
            assert exports["layer1"].startswith("nbd://127.0.0.1:")
            out = tmp_path / f"copy{len(extra)}.img"
            subprocess.run(["nbdcopy", exports["layer1"], str(out)], check=True, timeout=60)
            assert filecmp.cmp(out, expected, shallow=False)
            assert stop(proc, signal.SIGINT) == 0


def test_a_layer_served_offline_keeps_its_chunks_through_gc_in_another_process(
    registry, pushed_images, erofs_images, tmp_path
):
    """Layer 1 prefetched first (so its chunks are the least recently used), then the
    rest; `serve --offline --layer 1` runs while `cache gc`, another process, is given
    the smallest cap (one chunk). gc evicts the other layers, passes over layer 1 and
    names it; nbdcopy then reads layer 1 whole, byte for byte. Evicted, its chunks would
    be EIO: offline there is nowhere to fetch them from. The hold ends with the server."""
    cache = tmp_path / "cache"
    image = pushed_images.multilayer
    layer = erofs_images.layers[1]
    cli = [sys.executable, "-m", "blockstore"]
    for only in (["--layer", "1"], []):
        prefetch = subprocess.run(
            [*cli, "prefetch", image, *only, "--insecure", "--cache-dir", str(cache)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert prefetch.returncode == 0, prefetch.stderr
    gc = [*cli, "cache", "gc", "--json", "--cache-dir", str(cache), "--cache-size", "32K"]
    args = [image, "--offline", "--cache-dir", str(cache), "--layer", "1"]
    with serving(*args, "--listen", "127.0.0.1:0") as (proc, exports):
        assert holds.is_held(cache, layer.digest)
        result = subprocess.run(gc, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        assert report["held"] == [layer.digest] and report["evicted_chunks"] > 0
        with ChunkStore(cache) as store:
            assert {i.digest: i.present for i in store.blobs()}[layer.digest] == 1
        out = tmp_path / "layer1.img"
        subprocess.run(["nbdcopy", exports["layer1"], str(out)], check=True, timeout=60)
        assert filecmp.cmp(out, layer.path, shallow=False)
        assert stop(proc) == 0
    assert not holds.is_held(cache, layer.digest)


def test_cache_rm_keeps_an_image_a_server_serves_offline_whole_and_says_so(
    registry, pushed_images, erofs_images, tmp_path
):
    """Tried: ``cache rm IMAGE`` of a prefetched three-layer image while ``serve
    --offline --layer 1`` serves one of its layers. Must hold: nothing of the image is
    removed, neither that layer nor the others nor its record (a later offline serve of
    another layer would find it gone); rm names the held layer and the image, and exits
    8; nbdcopy then reads the layer byte for byte. Once the server has stopped, rm
    removes every layer and the image, and says so. Before, rm removed everything at
    once and every read of the mount failed; then, the other layers alone."""
    cache = tmp_path / "cache"
    image = pushed_images.multilayer
    layers = erofs_images.layers
    cli = [sys.executable, "-m", "blockstore"]
    prefetch = [*cli, "prefetch", image, "--insecure", "--cache-dir", str(cache)]
    assert subprocess.run(prefetch, capture_output=True, timeout=120).returncode == 0
    rm = [*cli, "cache", "rm", image, "--json", "--cache-dir", str(cache)]
    args = [image, "--offline", "--cache-dir", str(cache), "--layer", "1"]
    with serving(*args, "--listen", "127.0.0.1:0") as (proc, exports):
        result = subprocess.run(rm, capture_output=True, text=True, timeout=60)
        assert result.returncode == 8, result.stderr
        report = json.loads(result.stdout)
        assert report["removed"] == [] and report["removed_images"] == []
        assert report["held"] == [layers[1].digest]
        with ChunkStore(cache) as store:
            assert {i.digest for i in store.blobs()} >= {layer.digest for layer in layers}
        out = tmp_path / "layer.img"
        subprocess.run(["nbdcopy", exports["layer1"], str(out)], check=True, timeout=60)
        assert filecmp.cmp(out, layers[1].path, shallow=False)
        assert stop(proc) == 0
    result = subprocess.run(rm, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert sorted(report["removed"]) == sorted(layer.digest for layer in layers)
    assert len(report["removed_images"]) == 1


def prefetch_base_only_beside_multilayer(registry, pushed_images, erofs_images, cache) -> str:
    """Push an image of the three-layer image's first layer alone, and prefetch both
    into ``cache``; the new image's reference."""
    base_only = push_erofs(registry.host, "serve/base-only", "v1", [erofs_images.layers[0].path])
    for image in (pushed_images.multilayer, base_only):
        prefetch = [
            *(sys.executable, "-m", "blockstore", "prefetch", image),
            *("--insecure", "--cache-dir", str(cache)),
        ]
        assert subprocess.run(prefetch, capture_output=True, timeout=120).returncode == 0
    return base_only


def test_cache_rm_of_an_image_sharing_a_layer_with_one_served_offline_goes_on(
    registry, pushed_images, erofs_images, tmp_path
):
    """Tried: ``cache rm`` of the three-layer image while ``serve --offline`` serves
    another image made of its first layer alone. Must hold: the removed image's own
    layers and its record go (exit 0); the shared layer stays, as another image uses
    it, and the server reads it byte for byte. A layer held by a server that the other
    image keeps anyway is no reason to keep the removed image whole."""
    cache = tmp_path / "cache"
    layers = erofs_images.layers
    base_only = prefetch_base_only_beside_multilayer(registry, pushed_images, erofs_images, cache)
    cli = [sys.executable, "-m", "blockstore"]
    rm = [*cli, "cache", "rm", pushed_images.multilayer, "--json", "--cache-dir", str(cache)]
    args = [base_only, "--offline", "--cache-dir", str(cache)]
    with serving(*args, "--listen", "127.0.0.1:0") as (proc, exports):
        result = subprocess.run(rm, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        assert sorted(report["removed"]) == sorted(layer.digest for layer in layers[1:])
        assert report["kept"] == [layers[0].digest] and report["held"] == []
        assert len(report["removed_images"]) == 1 and report["kept_images"] == []
        out = tmp_path / "base.img"
        subprocess.run(["nbdcopy", exports[""], str(out)], check=True, timeout=60)
        assert filecmp.cmp(out, layers[0].path, shallow=False)
        assert stop(proc) == 0


def test_cache_rm_keeps_an_image_served_offline_whole_even_if_its_layers_stay_anyway(
    registry, pushed_images, erofs_images, tmp_path
):
    """Tried: ``cache rm A`` while ``serve --offline`` serves A, whose one layer the
    three-layer image also has. Must hold: A is kept whole and named (exit 8), so a
    second offline server of A, started meanwhile, still resolves it; once no server
    serves A, rm removes A's record and keeps the shared layer. Before, rm removed A's
    record at once (the layer stayed for the other image), and A could not be served
    offline again: a mount restarted offline failed with 'not in the cache'."""
    cache = tmp_path / "cache"
    layers = erofs_images.layers
    base_only = prefetch_base_only_beside_multilayer(registry, pushed_images, erofs_images, cache)
    cli = [sys.executable, "-m", "blockstore"]
    rm = [*cli, "cache", "rm", base_only, "--json", "--cache-dir", str(cache)]
    args = [base_only, "--offline", "--cache-dir", str(cache), "--listen", "127.0.0.1:0"]
    with serving(*args) as (proc, _):
        result = subprocess.run(rm, capture_output=True, text=True, timeout=60)
        assert result.returncode == 8, result.stderr
        report = json.loads(result.stdout)
        assert report["removed"] == [] and report["removed_images"] == []
        assert report["kept_images"] == [base_only]
        with serving(*args) as (again, exports):
            out = tmp_path / "base.img"
            subprocess.run(["nbdcopy", exports[""], str(out)], check=True, timeout=60)
            assert filecmp.cmp(out, layers[0].path, shallow=False)
            assert stop(again) == 0
        assert stop(proc) == 0
    result = subprocess.run(rm, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["removed_images"] == [base_only] and report["kept"] == [layers[0].digest]


def test_cache_rm_of_two_images_keeps_only_the_one_a_server_serves(
    registry, pushed_images, erofs_images, tmp_path
):
    """Tried: ``cache rm A B`` of two prefetched images sharing a layer, while ``serve
    --offline`` serves A. Must hold: A is kept whole (exit 8, named); B's own layer and
    its record go, as nothing serves B; the shared layer stays with A. Before, B was
    kept whole too, for the shared layer A's server holds."""
    cache = tmp_path / "cache"
    layers = erofs_images.layers
    served = pushed_images.multilayer
    other = push_erofs(
        registry.host, "serve/base-and-small", "v1", [layers[0].path, erofs_images.small.path]
    )
    cli = [sys.executable, "-m", "blockstore"]
    for image in (served, other):
        prefetch = [*cli, "prefetch", image, "--insecure", "--cache-dir", str(cache)]
        assert subprocess.run(prefetch, capture_output=True, timeout=120).returncode == 0
    rm = [*cli, "cache", "rm", served, other, "--json", "--cache-dir", str(cache)]
    with serving(served, "--offline", "--cache-dir", str(cache), "--listen", "127.0.0.1:0") as (
        proc,
        _,
    ):
        result = subprocess.run(rm, capture_output=True, text=True, timeout=60)
        assert result.returncode == 8, result.stderr
        report = json.loads(result.stdout)
        assert report["removed"] == [erofs_images.small.digest]
        assert len(report["removed_images"]) == 1 and len(report["kept_images"]) == 1
        assert report["kept_images"][0].endswith("/fixtures/multilayer:v1")
        assert report["removed_images"][0].endswith("/serve/base-and-small:v1")
        with ChunkStore(cache) as store:
            assert {i.digest for i in store.blobs()} >= {layer.digest for layer in layers}
        assert stop(proc) == 0


def test_sigterm_waits_for_reads_in_flight(registry, pushed_images, erofs_images, tmp_path):
    """SIGTERM while nbdcopy is copying the large image from a cold cache: the server
    finishes the replies in flight and exits 0, and the cache it leaves passes
    ``blockstore cache verify`` and serves again offline."""
    cache = str(tmp_path / "cache")
    args = [pushed_images.large, "--insecure", "--cache-dir", cache, "--listen", "127.0.0.1:0"]
    with serving(*args) as (proc, exports):
        copy = subprocess.Popen(
            ["nbdcopy", exports[""], str(tmp_path / "partial.img")], stderr=subprocess.DEVNULL
        )
        time.sleep(0.3)
        assert stop(proc) == 0
        copy.wait(timeout=30)
    with serving(*args, "--offline") as (proc, exports):
        verify = subprocess.run(
            [sys.executable, "-m", "blockstore", "cache", "verify", "--cache-dir", cache],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert verify.returncode == 0, verify.stdout + verify.stderr
        assert stop(proc) == 0


def test_serve_refuses_what_it_cannot_do(registry, pushed_images, tmp_path):
    """A layer that does not exist, an image never cached while offline, and a busy port
    each end the command with an error message and a non-zero exit code. Offline, a
    cache directory that does not exist is left so (exit 9): none is made there."""
    base = [sys.executable, "-m", "blockstore", "serve", "--cache-dir", str(tmp_path / "c")]
    for cache, extra in (
        ("other", [pushed_images.small, "--insecure", "--layer", "7"]),
        ("never-used", [pushed_images.small, "--offline"]),
    ):
        argv = [*base, *extra, "--listen", "127.0.0.1:0", "--cache-dir", str(tmp_path / cache)]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert result.returncode != 0 and result.stderr.startswith("blockstore: ")
    assert result.returncode == 9 and "there is no cache at" in result.stderr
    assert not (tmp_path / "never-used").exists()
    with serving(
        pushed_images.small,
        "--insecure",
        "--cache-dir",
        str(tmp_path / "c"),
        "--listen",
        "127.0.0.1:0",
    ) as (proc, exports):
        port = exports[""].split(":")[2].split("/")[0]
        busy = subprocess.run(
            [*base, pushed_images.small, "--insecure", "--listen", f"127.0.0.1:{port}"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert busy.returncode != 0 and "cannot listen" in busy.stderr
        assert stop(proc) == 0


@pytest.mark.parametrize("address", ["0.0.0.0:0"])
def test_serve_warns_when_listening_beyond_loopback(registry, pushed_images, tmp_path, address):
    """Binding a non-loopback address works but says, on stderr, that anyone who can
    connect can read the image."""
    with serving(
        pushed_images.small, "--insecure", "--cache-dir", str(tmp_path / "c"), "--listen", address
    ) as (proc, _exports):
        assert stop(proc) == 0
        assert "unencrypted and unauthenticated" in proc.stderr.read()


def test_parse_listen():
    """HOST:PORT, [v6]:PORT and a bare port are accepted; nonsense is refused."""
    import argparse

    from blockstore.cli.serve_cmds import parse_listen

    assert parse_listen("10.0.0.1:99") == ("10.0.0.1", 99)
    assert parse_listen("[::1]:10809") == ("::1", 10809)
    assert parse_listen("1234") == ("127.0.0.1", 1234)
    assert parse_listen("localhost:0") == ("localhost", 0)
    bad_ones = ("host:", "host:port", ":80", "1:99999", "[::1", "[::1]80", "::1:80", "[zz]:1")
    for bad in (*bad_ones, "[127.0.0.1]:1", "a b:1", "1.2.3:4", "[::1]:", "h:\u0663"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_listen(bad)


@pytest.mark.parametrize("option", ["--listen", "--metrics"])
@pytest.mark.parametrize("address", ["[::1", "::1:10809", "[::1]:99999", "no such:1"])
def test_a_malformed_address_is_a_usage_error_before_any_warning(tmp_path, option, address):
    """A malformed listening address stops ``serve`` with exit code 2 and a usage message,
    before it warns about listening beyond this machine or asks a resolver anything."""
    argv = [sys.executable, "-m", "blockstore", "serve", "127.0.0.1:9/none/such:v1"]
    argv += ["--cache-dir", str(tmp_path / "c"), option, address]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "not HOST:PORT" in result.stderr and "usage:" in result.stderr
    assert "beyond this machine" not in result.stderr and "Traceback" not in result.stderr


def test_a_storm_of_signals_while_stopping_ends_the_server(registry, pushed_images, tmp_path):
    """Hundreds of SIGTERMs and SIGINTs, back to back, while the server is stopping and
    one client is connected: no signal handler deadlocks the server, which exits 0
    within a few seconds."""
    with serving(
        pushed_images.small,
        "--insecure",
        "--cache-dir",
        str(tmp_path / "c"),
        "--unix",
        str(tmp_path / "s.sock"),
    ) as (proc, exports):
        client = subprocess.Popen(
            ["nbdsh", "-u", exports[""], "-c", "import time; time.sleep(30)"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            time.sleep(0.3)
            started = time.monotonic()
            sent = 0
            while proc.poll() is None and sent < 2000:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, (signal.SIGTERM, signal.SIGINT)[sent % 2])
                sent += 1
                if sent % 50 == 0:
                    time.sleep(0.001)
            assert proc.wait(timeout=15) == 0
            assert time.monotonic() - started < 12
        finally:
            client.kill()
            client.wait()


def test_idle_timeout_closes_a_quiet_connection(registry, pushed_images, tmp_path):
    """--idle-timeout 1: a client that chose its export and then sends nothing is closed
    after about a second, and the server goes on serving."""
    with serving(
        pushed_images.small,
        "--insecure",
        "--cache-dir",
        str(tmp_path / "c"),
        "--unix",
        str(tmp_path / "s.sock"),
        "--idle-timeout",
        "1",
    ) as (proc, exports):
        quiet = w.RawClient(str(tmp_path / "s.sock"))
        quiet.negotiate("layer0")
        started = time.monotonic()
        quiet.sock.settimeout(10)
        assert quiet.sock.recv(1) == b""
        assert 0.9 < time.monotonic() - started < 5
        quiet.close()
        assert nbdinfo(exports[""])["exports"][0]["export-size"] > 0
        assert stop(proc) == 0


@contextmanager
def serving_stuck(
    image: str, registry, fault_proxy, tmp_path
) -> Iterator[tuple[subprocess.Popen, str, object]]:
    """``serve`` through a registry that holds every blob request for a minute, with no
    prefetch at open (so a client's read is the one that reaches the registry):
    yields the server, its Unix socket and the proxy."""
    proxy = fault_proxy(registry)
    reference = image.replace(registry.host, proxy.host)
    sock = str(tmp_path / "s.sock")
    args = [reference, "--insecure", "--cache-dir", str(tmp_path / "c"), "--unix", sock]
    args += ["--no-erofs-start", "--no-erofs-walk", "--no-readahead", "--no-trace"]
    with serving(*args) as (proc, _exports):
        proxy.fault = Fault("delay", path_contains="/blobs/", method="GET", seconds=60)
        yield proc, sock, proxy


STUCK_STOP = DRAIN_TIMEOUT + STOP_WAIT
"""Seconds a stop with fetches stuck on the registry waits by design (8): the drain, then
the fetches' stores, once. The fetches are cancelled at the cut, so the cut connections'
threads end at once, not after the cut's grace."""
LOADED_MACHINE = 2.5
"""Seconds more the rest of such a stop (the cache's close, the interpreter's end) may
take on a loaded machine: on two busy cores one stop took 10.3 s in all."""


def seconds_to_stop_once_stuck(proc: subprocess.Popen, proxy, reads: int) -> float:
    """Once ``reads`` reads wait on the registry, how long SIGTERM takes to end ``proc``
    (which must exit 0)."""
    deadline = time.monotonic() + 10
    while proxy.faults_applied < reads and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proxy.faults_applied >= reads, "the reads never reached the registry"
    started = time.monotonic()
    assert stop(proc) == 0
    return time.monotonic() - started


def test_stopping_with_fetches_stuck_on_every_layer_ends_within_seconds(
    registry, pushed_images, fault_proxy, tmp_path
):
    """A read stuck on the registry on each of three layers: SIGTERM ends the server
    within the drain timeout and one bounded wait for the fetches, not one wait per
    layer in turn (each blob's two fetchers waited 3 s each for their jobs, then as
    long for their stores, one layer after another)."""
    with serving_stuck(pushed_images.multilayer, registry, fault_proxy, tmp_path) as (
        proc,
        sock,
        proxy,
    ):
        clients = [w.RawClient(sock) for _ in range(3)]
        try:
            for layer, client in enumerate(clients):
                client.negotiate(f"layer{layer}")
                client.send(w.CMD_READ, 1, 0, 4096)
            # 5 s of drain, then 3 s for the fetches; before, the cut's grace (1 s) came
            # between, and earlier the fetches' 3 s came twice per layer, in turn: 15 s.
            assert seconds_to_stop_once_stuck(proc, proxy, 3) < STUCK_STOP + LOADED_MACHINE
        finally:
            for client in clients:
                client.close()


def test_stopping_with_a_fetch_stuck_in_flight_ends_within_seconds(
    registry, pushed_images, fault_proxy, tmp_path
):
    """A read waits on a registry that holds every blob request for a minute; SIGTERM
    still ends the server within seconds (the drain timeout, then the cut), with exit
    code 0, instead of waiting out the fetch."""
    with serving_stuck(pushed_images.large, registry, fault_proxy, tmp_path) as (
        proc,
        sock,
        proxy,
    ):
        client = w.RawClient(sock)
        try:
            client.negotiate("layer0")
            client.send(w.CMD_READ, 1, client.size - (1 << 20), 4096)  # far from the start
            assert seconds_to_stop_once_stuck(proc, proxy, 1) < STUCK_STOP + LOADED_MACHINE
        finally:
            client.close()


@pytest.mark.parametrize(
    "given",
    [
        ["--zinfo", "layer.zinfo"],
        ["--tarindex", "layer.meta"],
        ["--tarindex", "missing.meta", "--layer", "0"],
    ],
    ids=["zinfo without tarindex", "tarindex of an EROFS layer", "tarindex missing"],
)
def test_a_first_serve_whose_tar_index_is_refused_leaves_no_cache(
    pushed_images, tmp_path: Path, given: list[str]
):
    """Tried: with no cache yet, ``serve`` of an EROFS image with ``--zinfo`` alone, with
    ``--tarindex`` (for tar layers only), and with ``--tarindex`` naming no file. Must
    hold: exit 2 with one line naming the option, and no cache directory left, as a
    usage error leaves none. Before, the cache made to open the image stayed."""
    (tmp_path / "layer.zinfo").write_bytes(b"checkpoints")
    (tmp_path / "layer.meta").write_bytes(b"an index")
    cache = tmp_path / "parent" / "cache"
    argv = [pushed_images.small, "--insecure", *given, "--cache-dir", str(cache)]
    _assert_refused_as_usage(tmp_path, [*argv, "--listen", "0"], given[0])
    assert not (tmp_path / "parent").exists(), list(tmp_path.rglob("*"))


def _assert_refused_as_usage(cwd: Path, argv: list[str], option: str) -> None:
    """``serve ARGV``, run in ``cwd``, exits 2 with one line naming ``option``."""
    done = subprocess.run(
        [sys.executable, "-m", "blockstore", "serve", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"blockstore: {option} ") and done.stderr.count("\n") == 1


@pytest.mark.parametrize(
    "given",
    [["--zinfo", "layer.zinfo"], ["--tarindex", "/dev/null"], ["--tarindex", "missing.meta"]],
    ids=["zinfo without tarindex", "tarindex no regular file", "tarindex missing"],
)
def test_a_tar_index_option_wrong_by_itself_is_refused_before_the_registry(
    tmp_path: Path, given: list[str]
):
    """Tried: ``serve`` of an image on a registry that cannot be reached, with ``--zinfo``
    alone, or ``--tarindex`` naming a device or no file: wrong whatever the image is.
    Must hold: exit 2 naming the option, as for any usage error, and no cache made. Before,
    the registry was asked first, and its being unreachable (exit 5) hid the mistake."""
    (tmp_path / "layer.zinfo").write_bytes(b"checkpoints")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]  # nothing listens there once the probe is closed
    argv = [f"127.0.0.1:{closed}/app:v1", "--insecure", *given, "--listen", "0"]
    _assert_refused_as_usage(tmp_path, [*argv, "--cache-dir", "cache"], given[0])
    assert not (tmp_path / "cache").exists()


def test_an_empty_unix_socket_path_is_refused(pushed_images, tmp_path: Path):
    """Tried: ``serve --unix ''``. Must hold: a usage error naming ``--unix`` (exit 2,
    one line), and no cache made. Before, the server bound a socket in Linux's abstract
    namespace under a name the kernel picked, printed ``nbd+unix:///layer0?`` (no socket
    a client could use) and served there, out of every client's reach, until stopped."""
    argv = [pushed_images.small, "--insecure", "--unix", "", "--cache-dir", str(tmp_path / "c")]
    done = subprocess.run(
        [sys.executable, "-m", "blockstore", "serve", *argv],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("blockstore serve: error: argument --unix: an empty path")
    assert done.stderr.count("\n") == 1 and done.stdout == ""
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("json_output", [True, False], ids=["json", "text"])
def test_cache_rm_refused_by_a_running_server_says_so_on_stderr(
    pushed_images, tmp_path: Path, json_output: bool
):
    """Tried: ``cache rm IMAGE`` (with and without ``--json``) while ``serve --offline``
    serves the image. Must hold: exit 8 with its one line on stderr, starting
    ``blockstore:`` and naming the image, as every failure has; with ``--json``, stdout
    is the JSON report alone. Before, stderr was empty: a script saw exit 8 with no
    word of why."""
    cache = tmp_path / "cache"
    image = pushed_images.small
    cli = [sys.executable, "-m", "blockstore"]
    prefetch = [*cli, "prefetch", image, "--insecure", "--cache-dir", str(cache)]
    assert subprocess.run(prefetch, capture_output=True, timeout=120).returncode == 0
    rm = [*cli, "cache", "rm", image, "--cache-dir", str(cache)] + ["--json"] * json_output
    with serving(image, "--offline", "--cache-dir", str(cache), "--listen", "127.0.0.1:0"):
        result = subprocess.run(rm, capture_output=True, text=True, timeout=60)
    assert result.returncode == 8, result.stderr
    assert result.stderr.startswith("blockstore: ") and result.stderr.count("\n") == 1
    assert image in result.stderr
    if json_output:
        assert json.loads(result.stdout)["kept_images"] == [image]


@pytest.mark.parametrize("taken", ["listen", "metrics", "unix"])
def test_an_address_in_use_fails_serve_before_it_makes_a_cache(pushed_images, tmp_path, taken):
    """Tried: a first ``serve`` whose NBD port, metrics port or Unix socket another server
    already listens on. Must hold: exit 1 with the one line naming the address, and no
    cache made where ``--cache-dir`` names none: the addresses are bound before the image
    is opened. Before, the image was opened (a cache made, the layer's warm-up already
    fetching into it) and the cache left behind."""
    cache = tmp_path / "cache"
    path = tmp_path / "nbd.sock"
    family = socket.AF_UNIX if taken == "unix" else socket.AF_INET
    with socket.socket(family) as other:
        other.bind(str(path) if taken == "unix" else ("127.0.0.1", 0))
        other.listen()
        port = None if taken == "unix" else other.getsockname()[1]
        argv = [pushed_images.small, "--insecure", "--cache-dir", str(cache)]
        argv += {
            "listen": ["--listen", f"127.0.0.1:{port}"],
            "metrics": ["--listen", "127.0.0.1:0", "--metrics", f"127.0.0.1:{port}"],
            "unix": ["--unix", str(path)],
        }[taken]
        done = subprocess.run(
            [sys.executable, "-m", "blockstore", "serve", *argv],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 1, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert "another server listens there" in line, line
    assert not cache.exists(), sorted(p.name for p in cache.iterdir())


def test_a_unix_socket_in_use_beside_a_tcp_address_is_the_one_named(pushed_images, tmp_path):
    """Tried: ``serve --listen 127.0.0.1:0 --unix PATH`` where another server listens on
    PATH. Must hold: exit 1 with one line naming PATH and ``--unix PATH`` as what to
    change. Before, the line named the TCP address, which was free, and told the user to
    give another ``--listen``."""
    path = tmp_path / "nbd.sock"
    with socket.socket(socket.AF_UNIX) as other:
        other.bind(str(path))
        other.listen()
        argv = [pushed_images.small, "--insecure", "--cache-dir", str(tmp_path / "cache")]
        done = serve_once(*argv, "--listen", "127.0.0.1:0", "--unix", str(path))
    assert done.returncode == 1, done.stderr
    assert done.stderr == (
        f"blockstore: cannot listen on {path}: Address already in use; another server "
        "listens there: give another --unix PATH\n"
    )


def test_a_unix_socket_path_too_long_is_refused_saying_the_limit(pushed_images, tmp_path):
    """Tried: ``serve --unix PATH`` with PATH of 108 bytes, one more than a Unix socket
    address holds. Must hold: exit 2 before anything is opened or fetched, one line
    naming PATH, its length and the limit of 107 bytes, and saying to give a shorter
    path, as ``mount`` says of a run directory too deep; no cache made. Before, exit 1
    with "AF_UNIX path too long" alone."""
    path = "/tmp/" + "s" * 98 + ".sock"
    assert len(path) == 108
    cache = tmp_path / "cache"
    argv = ["serve", pushed_images.small, "--insecure", "--unix", path, "--cache-dir", str(cache)]
    done = subprocess.run(
        [sys.executable, "-m", "blockstore", *argv], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2 and done.stdout == "", done.stderr
    (line,) = done.stderr.splitlines()
    assert f"{path}: 108 bytes, over the 107 a Unix socket address holds" in line, line
    assert "shorter" in line and not cache.exists()
