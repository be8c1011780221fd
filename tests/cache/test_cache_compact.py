"""`blockstore cache compact`: the space of removed chunks goes back to the disk, and
nothing else changes."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cache_rig import REPO, lockless_user, run_cli
from cache_sources import ScriptedSource, make_blob
from lmdb_pages import regions
from rig.small_disk import fail_read_only, small_disk
from test_cache_processes import worker, write_blobs

from blockstore.cache import CachedBlob, ChunkStore
from blockstore.cache.compact import COMMAND_SHOWN, COPY_NAME, _command


def fill(cache_dir, sizes: list[int], seed: int) -> list[tuple[bytes, str]]:
    blobs = [make_blob(size, seed=seed + i) for i, size in enumerate(sizes)]
    with ChunkStore(cache_dir) as store:
        for data, digest in blobs:
            blob = CachedBlob(store, digest, len(data), ScriptedSource(data, digest))
            blob.prefetch()
            blob.close()
    return blobs


def read_offline(cache_dir, data: bytes, digest: str) -> bytes:
    """The blob read with no source at all: every byte must come from the cache."""
    with ChunkStore(cache_dir) as store:
        blob = CachedBlob(store, digest, len(data), None)
        try:
            return b"".join(bytes(b) for b in blob.read(0, len(data)))
        finally:
            blob.close()


def test_compact_gives_back_what_rm_freed_and_keeps_every_other_byte(cache_dir):
    """Two sealed 6 MiB blobs; `cache rm` of one leaves data.mdb as large as before.
    `cache compact` shrinks it by at least 5 MiB (exit 0, sizes in --json), and the
    other blob still reads right with no source, still sealed, and verifies clean."""
    (kept, kept_digest), (_, gone_digest) = fill(cache_dir, [6 << 20, 6 << 20], seed=500)
    assert run_cli("cache", "rm", gone_digest, "--cache-dir", str(cache_dir)).returncode == 0
    before = (cache_dir / "data.mdb").stat().st_size

    result = run_cli("cache", "compact", "--json", "--cache-dir", str(cache_dir))

    assert result.returncode == 0, result.stderr
    sizes = json.loads(result.stdout)
    after = (cache_dir / "data.mdb").stat().st_size
    assert sizes == {"before_bytes": before, "after_bytes": after}
    assert after <= before - (5 << 20)
    assert not (cache_dir / COPY_NAME).exists()
    assert read_offline(cache_dir, kept, kept_digest) == kept
    with ChunkStore(cache_dir) as store:
        assert store.verify().ok
        assert {b.digest: b.sealed for b in store.blobs()} == {kept_digest: True}
    again = run_cli("cache", "compact", "--cache-dir", str(cache_dir))
    assert again.returncode == 0 and "given back" in again.stdout


def test_compact_refuses_a_cache_in_use_and_names_who_uses_it(cache_dir, tmp_path):
    """A process reading through the cache: compaction is refused (exit 8), naming its
    pid, and the file is left as it was; once it has exited, compaction runs."""
    blobs = write_blobs(tmp_path, [1 << 20])
    user = worker(cache_dir, blobs, "--cap", str(64 << 20), "--seconds", "60")
    assert user.stdout.readline().strip() == "ready"
    refused_while_open(cache_dir, user, f"in use by pid {user.pid} ")


def test_a_long_command_line_is_cut_after_a_whole_word():
    """The process named in a refusal: a command line longer than the message shows is
    cut after its last whole word, with " ..." after it; a short one is shown whole.
    Before, it was cut mid-word ("... serve 127.0.0.1:5000/tools/rootfs:v")."""
    words = ["127.0.0.1:5000/tools/rootfs:v1", "--cache-dir", "/var/cache/" + "x" * 40]
    argv = [sys.executable, "-c", "import time; print(flush=True); time.sleep(60)", *words]
    with subprocess.Popen(argv, stdout=subprocess.PIPE) as proc:
        try:
            proc.stdout.readline()  # running: its command line is the one it was given
            shown = _command(proc.pid)
        finally:
            proc.kill()
    assert shown.endswith(" ...") and len(shown) <= COMMAND_SHOWN + 4, shown
    kept = shown.removesuffix(" ...").split(" ")
    assert kept == " ".join(argv).split(" ")[: len(kept)], shown


def refused_while_open(cache_dir: Path, user: subprocess.Popen, said: str) -> None:
    """Compaction while ``user`` has the cache open: exit 8 with ``said`` in the message,
    the file left as it was; once ``user`` is gone, compaction runs."""
    inode = (cache_dir / "data.mdb").stat().st_ino
    try:
        result = run_cli("cache", "compact", "--cache-dir", str(cache_dir))
        assert result.returncode == 8, result.stderr
        assert said in result.stderr
        assert (cache_dir / "data.mdb").stat().st_ino == inode
    finally:
        user.kill()
        user.wait()
    assert run_cli("cache", "compact", "--cache-dir", str(cache_dir)).returncode == 0
    assert (cache_dir / "data.mdb").stat().st_ino != inode


def test_compact_refuses_a_cache_open_in_a_process_that_takes_no_lock(cache_dir):
    """Tried: compaction while a process has the cache open as an older version of the
    same format does (LMDB's files mapped, no lock of this version's). Must hold:
    refused (exit 8) naming its pid, the file left as it was; before, the file was
    replaced under it, and all it fetched afterwards went into the deleted one."""
    fill(cache_dir, [1 << 20], seed=7)
    user = lockless_user(cache_dir)
    refused_while_open(cache_dir, user, f"open in pid {user.pid} ")


def test_a_process_opening_the_cache_during_compaction_waits_then_uses_the_new_file(
    cache_dir, tmp_path
):
    """While a compaction holds the cache (its exclusive lock taken here, as compaction
    takes it), a process that opens the cache waits. The file is then replaced by a
    copy, as compaction replaces it: the process goes on with the new file, so a
    compaction tried now is refused in its name, and it reads every byte right."""
    blobs = write_blobs(tmp_path, [1 << 20])
    data, digest, _ = blobs[0]
    fill_store = ChunkStore(cache_dir)
    CachedBlob(fill_store, digest, len(data), ScriptedSource(data, digest)).prefetch()
    fill_store.close()
    fd = os.open(cache_dir / "data.mdb", os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    user = None
    try:
        user = worker(cache_dir, blobs, "--cap", str(64 << 20), "--seconds", "60")
        time.sleep(1.5)
        assert user.poll() is None
        assert not _readable(user), "the process opened a cache being compacted"
        shutil.copyfile(cache_dir / "data.mdb", tmp_path / "copy")
        os.replace(tmp_path / "copy", cache_dir / "data.mdb")
        os.close(fd)
        fd = -1
        assert user.stdout.readline().strip() == "ready"

        result = run_cli("cache", "compact", "--cache-dir", str(cache_dir))

        assert result.returncode == 8 and f"pid {user.pid} " in result.stderr, result.stderr
        user.send_signal(15)
        user.wait(timeout=30)
    finally:
        if fd >= 0:
            os.close(fd)
        if user is not None and user.poll() is None:
            user.kill()
            user.wait()
    assert read_offline(cache_dir, data, digest) == data


def _readable(process: subprocess.Popen) -> bool:
    import select

    return bool(select.select([process.stdout], [], [], 0)[0])


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_compact_with_no_room_for_the_copy_leaves_the_cache_as_it_was(tmp_path):
    """A 6 MiB cache on a 16 MiB tmpfs, the rest of the disk filled: compaction fails
    with one line saying there is no room (exit 8), leaves no partial copy, and the
    cache's file is byte for byte what it was, and serves every byte."""
    disk = tmp_path / "small"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)], check=True)
    try:
        cache_dir = disk / "cache"
        [(data, digest)] = fill(cache_dir, [6 << 20], seed=520)
        before = hashlib.sha256((cache_dir / "data.mdb").read_bytes()).hexdigest()
        with open(disk / "filler", "wb", buffering=0) as filler, contextlib.suppress(OSError):
            while True:
                filler.write(bytes(1 << 16))

        result = run_cli("cache", "compact", "--cache-dir", str(cache_dir))

        assert result.returncode == 8, result.stdout + result.stderr
        assert "no room" in result.stderr and "Traceback" not in result.stderr
        assert not (cache_dir / COPY_NAME).exists()
        assert hashlib.sha256((cache_dir / "data.mdb").read_bytes()).hexdigest() == before
        (disk / "filler").unlink()
        assert read_offline(cache_dir, data, digest) == data
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_compaction_whose_disk_goes_read_only_mid_copy_fails_in_one_line(tmp_path):
    """Tried: `cache compact` of a 96 MiB cache on an ext4 that fails into read-only (an
    error under ``errors=remount-ro``) as soon as the compacted copy appears. Must hold:
    exit 8 and one line saying the compaction failed and why, naming the cache, not the
    copy; the cache, opened read-only there, reads every byte right. Before, removing
    the copy failed as well, and that second error ended the command with exit 1 and
    "[Errno 30] Read-only file system: DIR/data.mdb.compacting"."""
    with small_disk(tmp_path / "disk", "256M") as disk:
        cache_dir = disk / "cache"
        [(data, digest)] = fill(cache_dir, [96 << 20], seed=530)
        compaction = subprocess.Popen(
            [sys.executable, "-m", "blockstore", "cache", "compact", "--cache-dir", str(cache_dir)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        while not (cache_dir / COPY_NAME).exists() and compaction.poll() is None:
            time.sleep(0.001)
        fail_read_only(disk)
        _, said = compaction.communicate(timeout=60)
        assert compaction.returncode == 8, said
        [line] = said.splitlines()
        assert line.startswith(f"blockstore: compacting the cache at {cache_dir} failed: "), line
        assert COPY_NAME not in line and "Read-only file system" in line, line
        assert read_offline(cache_dir, data, digest) == data


def test_a_copy_left_by_a_killed_compaction_goes_with_the_next_open(cache_dir):
    """A compaction killed mid-copy leaves its copy beside data.mdb: the next process to
    open the cache (none compacts meanwhile) removes it, so it does not hold the disk
    until some later compaction."""
    fill(cache_dir, [1 << 20], seed=570)
    (cache_dir / COPY_NAME).write_bytes(bytes(1 << 20))
    with ChunkStore(cache_dir):
        pass
    assert not (cache_dir / COPY_NAME).exists()


def test_compact_of_a_cache_with_corrupted_pages_names_it_and_the_cure(cache_dir):
    """Tried: a sealed 3 MiB blob, then every tree page of ``data.mdb`` but the first two
    overwritten with random bytes (the file keeps its length, so nothing is cut short),
    and `cache compact`. Must hold: one line, exit 8, saying the cache is damaged and
    that `cache verify` moves it aside; no copy left; then `cache verify` does (exit 6)
    and compaction succeeds. Before, it said only "compacting the cache at DIR failed:
    mdb_env_copyfd3: MDB_CORRUPTED: ...", naming no cure."""
    fill(cache_dir, [3 << 20], seed=580)
    data = cache_dir / "data.mdb"
    tree = regions(data)["tree"]
    assert len(tree) > 2, tree
    with open(data, "r+b") as f:
        for start, end in tree[2:]:
            f.seek(start)
            f.write(random.Random(start).randbytes(end - start))

    result = run_cli("cache", "compact", "--cache-dir", str(cache_dir))

    assert result.returncode == 8, result.stdout + result.stderr
    (line,) = result.stderr.splitlines()
    assert f"the cache at {cache_dir} is damaged" in line, line
    assert "`blockstore cache verify` moves it aside" in line, line
    assert not (cache_dir / COPY_NAME).exists()
    verified = run_cli("cache", "verify", "--cache-dir", str(cache_dir))
    assert verified.returncode == 6, verified.stdout + verified.stderr
    again = run_cli("cache", "compact", "--cache-dir", str(cache_dir))
    assert again.returncode == 0, again.stderr


@contextlib.contextmanager
def small_tmpfs(at: Path, size: str):
    """A tmpfs of ``size`` mounted at ``at`` (root), unmounted after."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    at.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(at)], check=True)
    try:
        yield at
    finally:
        subprocess.run(["umount", "-l", str(at)], check=False)


def fill_disk(disk: Path) -> None:
    """Write zeros to ``disk/filler`` until the file system is full."""
    with open(disk / "filler", "wb", buffering=0) as filler, contextlib.suppress(OSError):
        while True:
            filler.write(bytes(1 << 16))


def test_a_compacted_cache_opens_on_a_disk_filled_after(tmp_path):
    """Tried: two sealed 3 MiB blobs on a 16 MiB tmpfs, `cache rm` of one, `cache
    compact`, then the disk filled to the last byte (as any other writer may). Must
    hold: the cache still opens: `cache ls` lists the kept blob (exit 0) and it reads
    whole with no source, as before compaction. Before, compaction removed LMDB's lock
    file, which the next open could not make again on the full disk: every command,
    offline serving included, failed with "the disk holding the cache ... is full"."""
    with small_tmpfs(tmp_path / "small", "16m") as disk:
        cache_dir = disk / "cache"
        (kept, kept_digest), (_, gone_digest) = fill(cache_dir, [3 << 20, 3 << 20], seed=590)
        assert run_cli("cache", "rm", gone_digest, "--cache-dir", str(cache_dir)).returncode == 0
        compacted = run_cli("cache", "compact", "--cache-dir", str(cache_dir))
        assert compacted.returncode == 0, compacted.stderr
        fill_disk(disk)

        listing = run_cli("cache", "ls", "--json", "--cache-dir", str(cache_dir))

        assert listing.returncode == 0, listing.stderr
        assert [b["digest"] for b in json.loads(listing.stdout)] == [kept_digest]
        assert read_offline(cache_dir, kept, kept_digest) == kept


def test_no_room_to_compact_an_emptied_cache_names_the_little_room_it_needs(tmp_path):
    """Tried: a sealed 6 MiB blob on a 16 MiB tmpfs, `cache rm` of it, the disk filled to
    the last byte, then `cache compact`. Must hold: exit 8, one line naming the room
    the copy needs, well under 1 MiB (the pages still in use, not the file's 6 MiB);
    once that much (and a page) is freed, compaction succeeds. Before, the line said
    the copy needs "as much free space as the cache holds", so the user freed 6 MiB
    for a copy of a few pages."""
    with small_tmpfs(tmp_path / "small", "16m") as disk:
        cache_dir = disk / "cache"
        [(_, digest)] = fill(cache_dir, [6 << 20], seed=600)
        assert run_cli("cache", "rm", digest, "--cache-dir", str(cache_dir)).returncode == 0
        fill_disk(disk)

        result = run_cli("cache", "compact", "--cache-dir", str(cache_dir))

        assert result.returncode == 8, result.stdout + result.stderr
        (line,) = result.stderr.splitlines()
        said = re.search(r"needs about ([0-9.]+) KiB free", line)
        assert said is not None, line
        need = float(said.group(1)) * 1024
        assert need < 1 << 20, line
        filler = disk / "filler"
        os.truncate(filler, filler.stat().st_size - int(need) - 4096)
        again = run_cli("cache", "compact", "--cache-dir", str(cache_dir))
        assert again.returncode == 0, again.stderr


def compaction_caught_copying(cache_dir: Path) -> subprocess.Popen:
    """A real `cache compact` of ``cache_dir``, stopped (SIGSTOP) while it writes its
    copy, so while it holds the cache; started again until caught so."""
    argv = [sys.executable, "-m", "blockstore", "cache", "compact", "--cache-dir", str(cache_dir)]
    for _ in range(10):
        first = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        while first.poll() is None and not (cache_dir / COPY_NAME).exists():
            time.sleep(0.001)
        if first.poll() is None:
            first.send_signal(signal.SIGSTOP)
            return first
        first.communicate()
    pytest.fail("no compaction was caught writing its copy")


def test_a_compaction_beside_another_says_to_wait_for_it(cache_dir):
    """Tried: a 32 MiB cache, `cache compact` of it stopped while it writes its copy, and
    a second `cache compact` meanwhile. Must hold: the second is refused (exit 8) in one
    line saying the cache is being compacted by the first's pid, to wait for it, and
    nothing of servers or mounts; the first then ends well. Before, it was told to
    "stop its servers and unmount its mounts", of a compaction."""
    fill(cache_dir, [32 << 20], seed=610)
    first = compaction_caught_copying(cache_dir)
    try:
        second = run_cli("cache", "compact", "--cache-dir", str(cache_dir))
    finally:
        first.send_signal(signal.SIGCONT)
        first.communicate(timeout=60)

    assert second.returncode == 8, second.stdout + second.stderr
    (line,) = second.stderr.splitlines()
    assert f"is being compacted by pid {first.pid} " in line, line
    assert "wait for it" in line and "servers" not in line, line
    assert first.returncode == 0


def test_compaction_leaves_no_lease_file_behind(cache_dir):
    """Tried: two sealed 1 MiB blobs (each fetch leaves its blob's lease file under
    ``leases/``), `cache rm` of one, then `cache compact`. Must hold: no lease file is
    left (no process has the cache open then, so none holds a lease), and the kept
    blob still reads whole with no source, while a third blob fetched afterwards makes
    its lease file anew. Before, lease files were never removed: one for each blob ever
    fetched, removed ones included, for as long as the cache lived."""
    (kept, kept_digest), (_, gone_digest) = fill(cache_dir, [1 << 20, 1 << 20], seed=620)
    leases = cache_dir / "leases"
    assert {lease_file(kept_digest), lease_file(gone_digest)} <= set(os.listdir(leases))
    assert run_cli("cache", "rm", gone_digest, "--cache-dir", str(cache_dir)).returncode == 0

    result = run_cli("cache", "compact", "--cache-dir", str(cache_dir))

    assert result.returncode == 0, result.stderr
    assert os.listdir(leases) == []
    assert read_offline(cache_dir, kept, kept_digest) == kept
    [(_, new_digest)] = fill(cache_dir, [1 << 20], seed=630)
    assert lease_file(new_digest) in os.listdir(leases)


def lease_file(digest: str) -> str:
    return digest.replace(":", "-")
