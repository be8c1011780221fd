"""A cache on a read-only medium (a read-only bind mount, a volume shipped pre-warmed):
read, listed and verified where it is; anything that would write to it refused in a line."""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import nbd
import pytest
from rig.read_only import contents, read_only_view
from rig.small_disk import fail_read_only, small_disk
from rig.stored_chunks import flip_stored_byte
from test_serve_cli import serving, stop

from blockstore.cache import ChunkStore

CLI = [sys.executable, "-m", "blockstore"]


def blockstore(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=60)


def prefetched(image: str, cache) -> None:
    result = blockstore("prefetch", image, "--insecure", "--cache-dir", str(cache))
    assert result.returncode == 0, result.stderr


def test_a_read_only_cache_serves_offline_lists_and_verifies(
    registry, pushed_images, erofs_images, tmp_path
):
    """A prefetched cache bound read-only: `serve --offline` serves every byte to nbdcopy,
    `cache ls` lists the layer, `cache verify` checks it (exit 0), and not a byte of the
    cache changes. Before, each exited 8 with "Read-only file system"."""
    cache = tmp_path / "cache"
    prefetched(pushed_images.small, cache)
    before = contents(cache)
    with read_only_view(cache, tmp_path / "ro") as ro:
        listed = blockstore("cache", "ls", "--cache-dir", str(ro))
        assert listed.returncode == 0, listed.stderr
        assert erofs_images.small.digest in listed.stdout
        verified = blockstore("cache", "verify", "--json", "--cache-dir", str(ro))
        assert verified.returncode == 0, verified.stderr
        report = json.loads(verified.stdout)
        assert report["ok"] and report["blobs_checked"] == 1 and report["chunks_checked"] > 1
        args = [pushed_images.small, "--offline", "--cache-dir", str(ro)]
        with serving(*args, "--listen", "127.0.0.1:0") as (proc, exports):
            out = tmp_path / "copy.img"
            subprocess.run(["nbdcopy", exports[""], str(out)], check=True, timeout=60)
            assert filecmp.cmp(out, erofs_images.small.path, shallow=False)
            assert stop(proc) == 0
            assert proc.stderr.read() == ""
    assert contents(cache) == before


def test_what_would_write_a_read_only_cache_is_refused_in_one_line(
    registry, pushed_images, erofs_images, tmp_path
):
    """gc, compact, pin, rm and prefetch on a read-only cache: exit 8, one line saying the
    cache is read-only here; a bad chunk is reported by verify (exit 6) and left as it is.
    Before, compact died with an OSError (exit 1)."""
    cache = tmp_path / "cache"
    prefetched(pushed_images.small, cache)
    with ChunkStore(cache) as store:
        assert flip_stored_byte(store, erofs_images.small.digest, 2, 5000)
    before = contents(cache)
    with read_only_view(cache, tmp_path / "ro") as ro:
        where = ["--cache-dir", str(ro)]
        for command in (
            ["cache", "gc", *where],
            ["cache", "compact", *where],
            ["cache", "pin", erofs_images.small.digest, *where],
            ["cache", "rm", pushed_images.small, *where],
            ["prefetch", pushed_images.small, "--insecure", *where],
        ):
            result = blockstore(*command)
            assert result.returncode == 8, (command, result.stderr)
            (line,) = result.stderr.splitlines()
            assert f"the cache at {ro} is read-only here" in line, line
        verified = blockstore("cache", "verify", *where)
        assert verified.returncode == 6, verified.stderr
        digest = erofs_images.small.digest
        assert f"bad chunk {digest} #2: left as it is" in verified.stdout, verified.stdout
    assert contents(cache) == before


def test_a_read_only_view_of_a_cache_a_server_writes_is_refused(registry, pushed_images, tmp_path):
    """A server writing the cache through its own path, the same cache bound read-only:
    read without LMDB's lock beside a writer, pages could be reused under the reader, so
    `cache ls` and `serve --offline` there exit 8 naming the writer's pid; once it stops,
    the read-only view is read."""
    cache = tmp_path / "cache"
    prefetched(pushed_images.small, cache)
    with read_only_view(cache, tmp_path / "ro") as ro:
        args = [pushed_images.small, "--insecure", "--cache-dir", str(cache)]
        with serving(*args, "--listen", "127.0.0.1:0") as (proc, _):
            listed = blockstore("cache", "ls", "--cache-dir", str(ro))
            assert listed.returncode == 8, listed.stderr
            assert f"pid {proc.pid} has it open for writing" in listed.stderr
            assert stop(proc) == 0
        listed = blockstore("cache", "ls", "--cache-dir", str(ro))
        assert listed.returncode == 0, listed.stderr


def test_online_a_read_only_cache_serves_what_it_lacks_unkept_with_one_line(
    registry, pushed_images, erofs_images, tmp_path
):
    """A read-only cache that lacks a layer, served online: every byte of it comes from the
    registry, right, and the log says once that nothing is kept, where before each store
    and each lease file was a warning of its own (dozens for one nbdcopy)."""
    cache = tmp_path / "cache"
    prefetched(pushed_images.small, cache)
    before = contents(cache)
    with read_only_view(cache, tmp_path / "ro") as ro:
        args = [pushed_images.multilayer, "--layer", "1", "--insecure", "--cache-dir", str(ro)]
        with serving(*args, "--listen", "127.0.0.1:0") as (proc, exports):
            out = tmp_path / "copy.img"
            subprocess.run(["nbdcopy", exports[""], str(out)], check=True, timeout=60)
            assert filecmp.cmp(out, erofs_images.layers[1].path, shallow=False)
            assert stop(proc) == 0
            (line,) = proc.stderr.read().splitlines()
            assert "is read-only here: what it holds is served from it" in line, line
    assert contents(cache) == before


def as_nobody(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["runuser", "-u", "nobody", "--", *CLI, *args], capture_output=True, text=True, timeout=60
    )


@contextmanager
def users_directory() -> Iterator[Path]:
    """A directory user nobody can reach, in a private one of root's (0755)."""
    if os.geteuid() != 0:
        pytest.skip("needs root, to act as root and as another user")
    if as_nobody("--help").returncode != 0:
        pytest.skip("this checkout cannot be run by user nobody")
    base = Path(tempfile.mkdtemp(prefix="bs-users-"))
    try:
        base.chmod(0o755)
        yield base
    finally:
        shutil.rmtree(base)


def test_a_users_cache_holding_a_file_of_roots_is_read_by_the_user(registry, pushed_images):
    """A user's own cache directory whose data.mdb is root's (a root run made the cache,
    the directory was then given to the user): the user's `cache ls` and `verify` read
    it, and `cache gc` is refused in one line naming root's file. Before, every command
    exited 8 with "Permission denied" alone."""
    with users_directory() as base:
        cache = base / "cache"
        prefetched(pushed_images.small, cache)
        shutil.chown(cache, "nobody")
        listed = as_nobody("cache", "ls", "--json", "--cache-dir", str(cache))
        assert listed.returncode == 0, listed.stderr
        assert [blob["sealed"] for blob in json.loads(listed.stdout)] == [True]
        verified = as_nobody("cache", "verify", "--cache-dir", str(cache))
        assert verified.returncode == 0, verified.stderr
        refused = as_nobody("cache", "gc", "--cache-dir", str(cache))
        assert refused.returncode == 8
        assert refused.stderr.splitlines() == [
            f"blockstore: the cache at {cache} is read-only here (data.mdb is root's and "
            "cannot be written by this user): nothing in it can be changed"
        ]


def test_a_user_writes_no_file_another_linked_into_a_cache_all_may_write(registry, pushed_images):
    """Tried: user nobody's ``prefetch`` into a cache directory every user may write (as
    one made in /tmp by someone else), where another user put ``lock.mdb`` and
    ``data.mdb`` as links to files of nobody's (one holding bytes, one empty); then the
    same directory empty. Must hold: each refused in one line (exit 8), the second
    saying the directory is writable by other users; both files untouched. Before,
    nobody's prefetch wrote LMDB's lock header and the cache's pages over them: root
    alone was kept from writing such a cache."""
    with users_directory() as base:
        cache = base / "cache"
        cache.mkdir()
        cache.chmod(0o777)
        victims = {"lock.mdb": b"nobody's own bytes\n", "data.mdb": b""}
        for name, content in victims.items():
            victim = base / f"nobodys-{name}"
            victim.write_bytes(content)
            shutil.chown(victim, "nobody")
            (cache / name).symlink_to(victim)
        prefetch = ["prefetch", pushed_images.small, "--insecure", "--cache-dir", str(cache)]
        refused = as_nobody(*prefetch)
        assert refused.returncode == 8, refused.stderr
        (line,) = refused.stderr.splitlines()
        assert "lock.mdb is not a regular file" in line, line
        for name, content in victims.items():
            assert (base / f"nobodys-{name}").read_bytes() == content
            (cache / name).unlink()
        refused = as_nobody(*prefetch)
        assert refused.returncode == 8, refused.stderr
        (line,) = refused.stderr.splitlines()
        assert "its directory is writable by other users, and no cache is written" in line


def test_a_cache_root_makes_is_not_readable_by_other_users(registry, pushed_images):
    """Tried: root's ``prefetch`` of an image into a cache directory it makes (under a
    directory all may enter, as /var/cache), then user nobody reading its ``data.mdb``.
    Must hold: the cache directory is root's alone (0700) and nobody reads no byte of
    the image. Before, it was 0755 and ``data.mdb`` 0644: any user read every byte of
    every cached image, files the image keeps 0600 (keys, /etc/shadow) included."""
    with users_directory() as base:
        cache = base / "var" / "cache"
        prefetched(pushed_images.small, cache)
        assert stat.S_IMODE(cache.stat().st_mode) == 0o700
        read = ["runuser", "-u", "nobody", "--", "cat", str(cache / "data.mdb")]
        refused = subprocess.run(read, capture_output=True, timeout=60)
        assert refused.returncode != 0 and refused.stdout == b""
        assert b"Permission denied" in refused.stderr


def test_a_cache_another_user_cannot_enter_is_refused_saying_whose_it_is(registry, pushed_images):
    """Tried: user nobody's ``cache ls`` and ``prefetch`` naming root's cache (0700, as
    every cache blockstore makes is), as after a mount made with sudo, then one inside a
    directory of root's that nobody cannot enter (as root's home). Must hold: each exits
    8 (the cache cannot be opened) in one line saying whose the directory is, or that
    one above it is another user's, and what to do. Before, each exited 1 with a bare
    ``[Errno 13] Permission denied``."""
    with users_directory() as base:
        cache, private = base / "cache", base / "private"
        prefetched(pushed_images.small, cache)
        private.mkdir(mode=0o700)
        refusals = {
            cache: "its directory is root's and this user cannot enter it",
            private / "cache": "this user cannot reach it (a directory above it is another user's)",
        }
        for path, why in refusals.items():
            for command in (["cache", "ls"], ["prefetch", pushed_images.small, "--insecure"]):
                refused = as_nobody(*command, "--cache-dir", str(path))
                assert refused.returncode == 8, refused.stderr
                assert refused.stderr.splitlines() == [
                    f"blockstore: cannot open the cache at {path}: {why}; run the command as "
                    "that user, or give another --cache-dir"
                ]


def test_root_writes_no_file_another_user_linked_into_a_cache(
    registry, pushed_images, erofs_images
):
    """A cache directory of another user's, where that user put `lock.mdb` as a link to a
    file of root's: root's `prefetch` is refused in one line (exit 8) and the file is
    untouched; once the user has filled the cache, root serves it offline read-only,
    byte for byte, and writes nothing there. Before, root's prefetch wrote LMDB's lock
    header over the linked file and grew it to 512 KiB."""
    with users_directory() as base:
        victim = base / "roots-file"
        victim.write_bytes(b"root's own bytes\n")
        cache = base / "cache"
        cache.mkdir()
        shutil.chown(cache, "nobody")
        link = ["runuser", "-u", "nobody", "--", "ln", "-s", str(victim), str(cache / "lock.mdb")]
        subprocess.run(link, check=True)
        refused = blockstore(
            "prefetch", pushed_images.small, "--insecure", "--cache-dir", str(cache)
        )
        assert refused.returncode == 8, refused.stderr
        (line,) = refused.stderr.splitlines()
        assert "its directory is nobody's, and root writes no cache where another user" in line
        assert victim.read_bytes() == b"root's own bytes\n"
        (cache / "lock.mdb").unlink()
        filled = as_nobody("prefetch", pushed_images.small, "--insecure", "--cache-dir", str(cache))
        assert filled.returncode == 0, filled.stderr
        before = contents(cache)
        args = [pushed_images.small, "--offline", "--cache-dir", str(cache)]
        with serving(*args, "--listen", "127.0.0.1:0") as (proc, exports):
            copied = subprocess.run(["nbdcopy", exports[""], "-"], capture_output=True, check=True)
            assert copied.stdout == erofs_images.small.path.read_bytes()
            assert stop(proc) == 0
        assert contents(cache) == before


@contextmanager
def _serving_large_quietly(registry, pushed_images, proxy, tmp_path, *extra: str) -> Iterator:
    """``serve`` online, through ``proxy``, of the large image on a read-only cache that
    holds only the small one, every prefetch heuristic off (but ``extra``): the server
    process and its exports."""
    cache = tmp_path / "cache"
    prefetched(pushed_images.small, cache)
    reference = pushed_images.large.replace(registry.host, proxy.host)
    with read_only_view(cache, tmp_path / "ro") as ro:
        quiet = ["--no-erofs-start", "--no-erofs-walk", "--no-trace", "--no-readahead"]
        args = [reference, "--insecure", *extra, *quiet, "--cache-dir", str(ro)]
        with serving(*args, "--listen", "127.0.0.1:0") as served:
            yield served


def _layer_gets(proxy, digest: str) -> list:
    """The GETs of blob ``digest`` the proxy forwarded."""
    return [r for r in proxy.requests if r.method == "GET" and digest in r.path]


def test_fill_on_a_read_only_cache_is_skipped_not_fetched_for_nothing(
    registry, pushed_images, erofs_images, fault_proxy, tmp_path
):
    """`serve --fill` online on a read-only cache that lacks the layer: the fill is skipped,
    said in the one warning, and the layer's blob is not asked for while no client reads.
    Before, the fill fetched the whole layer, kept none of it, and fetched it twice more
    before giving up: three times the layer's bytes for nothing."""
    proxy = fault_proxy(registry)
    with _serving_large_quietly(registry, pushed_images, proxy, tmp_path, "--fill") as served:
        proc, _ = served
        time.sleep(2)
        assert _layer_gets(proxy, erofs_images.large.digest) == []
        assert stop(proc) == 0
        (line,) = proc.stderr.read().splitlines()
        assert "--fill is skipped, having nowhere to keep the layers" in line, line


def test_prefetch_on_a_read_only_cache_fetches_nothing_a_read_fetches_again(
    registry, pushed_images, erofs_images, fault_proxy, tmp_path
):
    """`serve` online, every prefetch heuristic on, on a read-only cache that lacks the layer
    but holds its trace (naming blocks past the first 16 MiB); a client reads the first
    16 MiB in order, 128 KiB at a time. Must hold: every byte right, and the layer's bytes
    asked of the registry are the 16 MiB read, no more. Before, readahead, the EROFS start
    and the trace replay fetched bytes that could not be kept, and the reads fetched
    them again: some three times what was read."""
    proxy = fault_proxy(registry)
    reference = pushed_images.large.replace(registry.host, proxy.host)
    layer = erofs_images.large
    data = layer.path.read_bytes()
    read = 16 << 20
    trace = tmp_path / "trace.json"
    events = [[0, block, 1] for block in range(read // 4096, read // 4096 + 400, 4)]
    record = {"version": 2, "digest": layer.digest, "unit": 4096, "recorded": 1.0}
    document = {"kind": "blockstore-traces", "traces": [{**record, "events": events}]}
    trace.write_text(json.dumps(document))
    cache = tmp_path / "cache"
    assert blockstore("trace", "import", str(trace), "--cache-dir", str(cache)).returncode == 0
    with read_only_view(cache, tmp_path / "ro") as ro:
        args = [reference, "--insecure", "--cache-dir", str(ro), "--listen", "127.0.0.1:0"]
        with serving(*args) as (proc, exports):
            client = nbd.NBD()
            client.connect_uri(exports[""])
            step = 128 << 10
            for offset in range(0, read, step):
                assert client.pread(step, offset) == data[offset : offset + step], offset
            client.shutdown()
            time.sleep(1)  # what prefetch would still ask for
            asked = 0
            for request in proxy.requests:
                if request.method == "GET" and layer.digest in request.path:
                    first, last = request.headers["Range"].removeprefix("bytes=").split("-")
                    asked += int(last) - int(first) + 1
            assert asked == read
            assert stop(proc) == 0


def test_a_cache_command_on_a_read_only_cache_fetches_nothing(
    registry, pushed_images, erofs_images, fault_proxy, tmp_path
):
    """`serve` online, prefetch off, on a read-only cache that lacks the layer; a client
    sends NBD CACHE for 8 MiB. Must hold: answered at once, and nothing of the layer is
    asked of the registry. Before, the range was fetched only to be dropped, and the
    reads it was meant to speed up fetched it again."""
    proxy = fault_proxy(registry)
    with _serving_large_quietly(registry, pushed_images, proxy, tmp_path) as served:
        proc, exports = served
        client = nbd.NBD()
        client.connect_uri(exports[""])
        assert client.can_cache()
        client.cache(8 << 20, 0)
        time.sleep(2)
        client.shutdown()
        assert _layer_gets(proxy, erofs_images.large.digest) == []
        assert stop(proc) == 0


def test_a_damaged_read_only_cache_is_reported_by_verify_and_left(
    registry, pushed_images, tmp_path
):
    """A prefetched cache whose data.mdb is cut short, bound read-only: `cache verify`
    says the file is damaged and left as it is (exit 6, as verify exits for damage it
    moves aside where it can), `serve --offline` refuses it in one line (exit 8), and
    nothing is moved or changed. Before, verify exited 8, as for a cache it could not
    open at all."""
    cache = tmp_path / "cache"
    prefetched(pushed_images.small, cache)
    data = cache / "data.mdb"
    os.truncate(data, data.stat().st_size // 2)
    before = contents(cache)
    with read_only_view(cache, tmp_path / "ro") as ro:
        verified = blockstore("cache", "verify", "--cache-dir", str(ro))
        assert verified.returncode == 6, verified.stderr
        assert f"the cache file was damaged and left as it is: the cache at {ro} is damaged" in (
            verified.stdout
        )
        served = blockstore(
            "serve",
            pushed_images.small,
            "--offline",
            "--cache-dir",
            str(ro),
            "--listen",
            "127.0.0.1:0",
        )
        assert served.returncode == 8, served.stderr
        (line,) = served.stderr.splitlines()
        assert f"the cache at {ro} is damaged" in line, line
    assert contents(cache) == before


def test_root_reading_a_users_cache_opens_no_fifo_put_as_its_lock_file(registry, pushed_images):
    """A user's filled cache whose `lock.mdb` the user replaced by a FIFO: root's
    `cache ls` there ends at once, refused in one line naming the file (exit 8). Before,
    root's look for a writer opened the FIFO and waited for a writer of it for ever."""
    with users_directory() as base:
        cache = base / "cache"
        cache.mkdir()
        shutil.chown(cache, "nobody")
        filled = as_nobody("prefetch", pushed_images.small, "--insecure", "--cache-dir", str(cache))
        assert filled.returncode == 0, filled.stderr
        fifo = [
            "runuser",
            "-u",
            "nobody",
            "--",
            "sh",
            "-c",
            f"rm {cache}/lock.mdb && mkfifo {cache}/lock.mdb",
        ]
        subprocess.run(fifo, check=True)
        try:
            listed = subprocess.run(
                [*CLI, "cache", "ls", "--cache-dir", str(cache)],
                capture_output=True,
                text=True,
                timeout=20,
            )
        except subprocess.TimeoutExpired:
            pytest.fail("root's cache ls waited on the user's FIFO")
        assert listed.returncode == 8, listed.stderr
        (line,) = listed.stderr.splitlines()
        assert f"{cache / 'lock.mdb'} is not a regular file" in line, line


def test_a_cache_whose_disk_went_read_only_after_an_error_is_read_read_only(
    registry, pushed_images, erofs_images, tmp_path
):
    """Tried: a prefetched cache on an ext4 that then failed into read-only (an error
    under ``errors=remount-ro``: writes fail with EROFS, though ``statvfs`` and
    ``access(2)`` still call it writable). Must hold: it is opened read-only, as on a
    read-only mount: `cache ls` and `cache verify` exit 0, `serve --offline` serves every
    byte, `cache gc` is refused in one line saying the file system is read-only. Before,
    each exited 8 with "cannot open the cache at DIR: Read-only file system"."""
    with small_disk(tmp_path / "disk", "64M") as disk:
        cache = disk / "cache"
        prefetched(pushed_images.small, cache)
        fail_read_only(disk)
        listed = blockstore("cache", "ls", "--cache-dir", str(cache))
        assert listed.returncode == 0, listed.stderr
        assert erofs_images.small.digest in listed.stdout
        verified = blockstore("cache", "verify", "--cache-dir", str(cache))
        assert verified.returncode == 0, verified.stderr
        collected = blockstore("cache", "gc", "--cache-dir", str(cache))
        assert collected.returncode == 8
        assert "read-only file system" in collected.stderr, collected.stderr
        args = [pushed_images.small, "--offline", "--cache-dir", str(cache)]
        with serving(*args, "--listen", "127.0.0.1:0") as (proc, exports):
            out = tmp_path / "copy.img"
            subprocess.run(["nbdcopy", exports[""], str(out)], check=True, timeout=60)
            assert filecmp.cmp(out, erofs_images.small.path, shallow=False)
            assert stop(proc) == 0


def test_a_server_whose_cache_disk_went_read_only_reads_it_read_only_saying_so_once(
    registry, pushed_images, erofs_images, tmp_path
):
    """Tried: a server reading a cache on an ext4 that fails into read-only while it
    serves (an error under ``errors=remount-ro``), then read on and left idle 5 s. Must
    hold: every byte read is right; the first write refused opens the cache again,
    read-only, said once; that its counters cannot be saved is said once at most, not at
    each flush; nothing calls the cache damaged, and it is left where it is, holding
    what it held. Before, the flush warned each second for as long as the server ran;
    and a write that failed as LMDB updated its meta page (``MDB_PANIC``, then every
    transaction of the process failing) had the cache taken for damaged."""
    with small_disk(tmp_path / "disk", "64M") as disk:
        cache = disk / "cache"
        args = [pushed_images.small, "--insecure", "--cache-dir", str(cache)]
        with serving(*args, "--listen", "127.0.0.1:0") as (proc, exports):
            client = nbd.NBD()
            client.connect_uri(exports[""])
            image = erofs_images.small.path.read_bytes()
            half = len(image) // 2
            assert client.pread(half, 0) == image[:half]
            fail_read_only(disk)
            assert client.pread(len(image) - half, half) == image[half:]
            assert client.pread(half, 0) == image[:half]
            time.sleep(5)
            client.shutdown()
            assert stop(proc) == 0
            text = proc.stderr.read()
        assert text.count("opened it again, read-only") == 1, text
        assert text.count("cache counters not saved") <= 1, text
        assert "damaged" not in text, text
        listed = blockstore("cache", "ls", "--cache-dir", str(cache))
        assert listed.returncode == 0, listed.stderr
        assert erofs_images.small.digest in listed.stdout


def test_a_read_only_cache_whose_data_file_is_empty_is_said_to_be_empty(tmp_path):
    """A cache directory whose data.mdb is empty (made, never written), bound read-only:
    `cache ls` and `cache verify` each refuse in one line (exit 8) saying the cache is
    empty and cannot be started there, nothing changed. Before, LMDB's own "Bad file
    descriptor" was all they said."""
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "data.mdb").touch()
    with read_only_view(cache, tmp_path / "ro") as ro:
        for command in ("ls", "verify"):
            result = blockstore("cache", command, "--cache-dir", str(ro))
            assert result.returncode == 8, result.stderr
            (line,) = result.stderr.splitlines()
            assert f"the cache at {ro} is empty (its data.mdb is 0 bytes)" in line, line
            assert "read-only file system" in line, line
    assert os.listdir(cache) == ["data.mdb"]


def test_a_cache_an_earlier_version_left_readable_is_made_its_owners_alone(registry, pushed_images):
    """Tried: user nobody's filled cache whose directory is 0755, as earlier versions
    made it, listed by root (who reads it read-only), then by nobody, twice. Must hold:
    root's look changes no mode; nobody's first `cache ls` makes the directory 0700,
    said once at info (`-v`), and `data.mdb` keeps its mode; the second says nothing of
    it. Before, the directory stayed 0755 and every user could read every cached byte."""
    with users_directory() as base:
        cache = base / "cache"
        cache.mkdir()
        shutil.chown(cache, "nobody")
        filled = as_nobody("prefetch", pushed_images.small, "--insecure", "--cache-dir", str(cache))
        assert filled.returncode == 0, filled.stderr
        cache.chmod(0o755)
        data_mode = (cache / "data.mdb").stat().st_mode
        looked = blockstore("cache", "ls", "--cache-dir", str(cache))
        assert looked.returncode == 0, looked.stderr
        assert stat.S_IMODE(cache.stat().st_mode) == 0o755
        tightened = as_nobody("-v", "cache", "ls", "--cache-dir", str(cache))
        assert tightened.returncode == 0, tightened.stderr
        assert stat.S_IMODE(cache.stat().st_mode) == 0o700
        assert (cache / "data.mdb").stat().st_mode == data_mode
        said = [line for line in tightened.stderr.splitlines() if "0700" in line]
        assert len(said) == 1 and str(cache) in said[0], tightened.stderr
        again = as_nobody("-v", "cache", "ls", "--cache-dir", str(cache))
        assert again.returncode == 0 and "0700" not in again.stderr, again.stderr
