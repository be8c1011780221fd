"""Several processes on one cache directory, and writers killed with SIGKILL."""

from __future__ import annotations

import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from cache_rig import REPO, WORKER, run_cli
from cache_sources import ScriptedSource, make_blob
from rig.local_source import LocalFileSource
from rig.waiting import wait_for
from rig.write_lock import stopped_writer

from blockstore.cache import CHUNK_SIZE, CachedBlob, ChunkStore
from blockstore.errors import NotCached


def write_blobs(tmp_path: Path, sizes: list[int]) -> list[tuple[bytes, str, Path]]:
    blobs = []
    for i, size in enumerate(sizes):
        data, digest = make_blob(size, seed=100 + i)
        path = tmp_path / f"blob{i}"
        path.write_bytes(data)
        blobs.append((data, digest, path))
    return blobs


def worker(cache_dir: Path, blobs, *extra: str) -> subprocess.Popen:
    specs = [f"{path}={digest}" for _, digest, path in blobs]
    return subprocess.Popen(
        [sys.executable, str(WORKER), str(cache_dir), *extra, *specs],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def check_cache(cache_dir: Path, blobs) -> None:
    """The cache opens, verify finds nothing to repair, every cached byte is right."""
    with ChunkStore(cache_dir) as store:
        report = store.verify()
        assert report.ok, report
        assert not report.repaired_records and not report.orphan_chunks, report
        for data, digest, _ in blobs:
            blob = CachedBlob(store, digest, len(data), None)
            for offset in range(0, len(data), CHUNK_SIZE):
                try:
                    length = min(CHUNK_SIZE, len(data) - offset)
                    got = b"".join(bytes(b) for b in blob.read(offset, length))
                except NotCached:
                    continue
                assert got == data[offset : offset + CHUNK_SIZE]


def test_sigkill_at_any_moment_leaves_a_correct_cache(cache_dir, tmp_path):
    """A writer (reads, stores, evictions under a small cap, seals, map growth) is
    SIGKILLed 24 times at random moments; after each kill the cache opens, verify finds
    nothing bad or inconsistent, and every cached byte is the blob's."""
    blobs = write_blobs(tmp_path, [3 << 20, 1 << 20])
    rng = random.Random(7)
    for kill in range(24):
        proc = worker(
            cache_dir, blobs, "--cap", str(2 << 20), "--seed", str(kill), "--initial-map", "1048576"
        )
        try:
            assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
            time.sleep(rng.uniform(0.0, 0.25))
            assert proc.poll() is None, proc.stderr.read()
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
            proc.stdout.close()
            proc.stderr.close()
        check_cache(cache_dir, blobs)


def test_two_processes_share_one_cache(cache_dir, tmp_path):
    """Two processes read, store, evict, seal and grow the map of one cache at once for
    two seconds; both see only right bytes, and the counters of both are persisted for a
    third process (the CLI) to see."""
    blobs = write_blobs(tmp_path, [2 << 20, 1 << 20 | 77])
    procs = [
        worker(
            cache_dir,
            blobs,
            "--cap",
            str(3 << 20),
            "--seed",
            str(seed),
            "--seconds",
            "2",
            "--initial-map",
            "1048576",
        )
        for seed in (1, 2)
    ]
    reads = 0
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, out + err
            lines = out.split()
            assert lines[-2] == "ok", out
            reads += int(lines[-1])
    finally:
        for proc in procs:
            proc.kill()
            proc.communicate()
    check_cache(cache_dir, blobs)
    result = run_cli("cache", "stats", "--json", "--cache-dir", str(cache_dir))
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)
    assert stats["hits"] + stats["misses"] >= reads
    assert stats["bytes_fetched"] > 0 and stats["requests_fetched"] > 0


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_full_disk_evicts_or_serves_uncached_never_corrupts(tmp_path):
    """On an 8 MiB tmpfs with the default 10 GiB cap, reading 24 MiB of blobs fills the
    disk: every read still returns the right bytes, and the cache reopens clean."""
    mountpoint = tmp_path / "small"
    mountpoint.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mountpoint)], check=True)
    try:
        cache_dir = mountpoint / "cache"
        blobs = write_blobs(tmp_path, [16 << 20, 8 << 20])
        rng = random.Random(3)
        with ChunkStore(cache_dir) as store:
            opened = [
                (data, CachedBlob(store, digest, len(data), _file_source(path, digest)))
                for data, digest, path in blobs
            ]
            for _ in range(3):
                for data, blob in opened:
                    for offset in range(0, len(data), 1 << 20):
                        got = b"".join(bytes(b) for b in blob.read(offset, 1 << 20))
                        assert got == data[offset : offset + (1 << 20)]
            for _ in range(200):
                data, blob = rng.choice(opened)
                offset = rng.randrange(len(data))
                length = min(len(data) - offset, rng.randrange(1, 200_000))
                assert (
                    b"".join(bytes(b) for b in blob.read(offset, length))
                    == data[offset : offset + length]
                )
            assert store.stats()["evictions"] > 0
            for _, blob in opened:
                blob.close()
        check_cache(cache_dir, blobs)
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def _file_source(path: Path, digest: str) -> LocalFileSource:
    return LocalFileSource(path, digest)


def test_a_stopped_process_holding_the_write_lock_costs_caching_not_reads(
    cache_dir, tmp_path, monkeypatch, caplog
):
    """Another process takes the cache's write lock and is stopped (as Ctrl-Z stops a
    prefetch). Reads that miss here are answered within seconds each, with the right
    bytes, not after a minute's wait for their store; what arrives is served unkept;
    the log says the cache takes no writes and names the lock's wait. Once the
    process goes on and ends, the cache takes writes again."""
    from blockstore.fetch import keeper

    monkeypatch.setattr(keeper, "STUCK_AFTER", 0.5)
    caplog.set_level(logging.INFO)
    blobs = write_blobs(tmp_path, [16 << 20])
    data, digest, path = blobs[0]
    store = ChunkStore(cache_dir)
    blob = CachedBlob(store, digest, len(data), _file_source(path, digest))
    with stopped_writer(cache_dir):
        started = time.monotonic()
        for offset in range(0, 8 << 20, 1 << 20):
            got = b"".join(bytes(b) for b in blob.read(offset, 1 << 20))
            assert got == data[offset : offset + (1 << 20)]
        assert time.monotonic() - started < 20
        # The lock's wait is said once past its warning's time, at the watch's next look.
        said = ("the cache has taken no write", "so far for the write lock of the cache")
        assert wait_for(lambda: all(line in caplog.text for line in said), 30), caplog.text
    assert b"".join(bytes(b) for b in blob.read(12 << 20, 1 << 20)) == data[12 << 20 : 13 << 20]
    blob.close()
    store.close()
    check_cache(cache_dir, blobs)


def test_ctrl_c_ends_a_command_waiting_for_a_stopped_writers_lock(
    cache_dir, registry, pushed_images
):
    """Tried: ``cache pin``, ``cache gc`` and ``serve IMAGE`` started while another
    process holds the cache's write lock, stopped (Ctrl-Z on a prefetch), then
    SIGINT (Ctrl-C) to each once it waits. Must hold: each ends within seconds, one
    line ("interrupted"), exit 130, no traceback. Before, none ended: LMDB's lock is
    a mutex no signal interrupts, and the Ctrl-C waited with it for the other
    process to go on."""
    commands = [
        ["cache", "pin", pushed_images.small],
        ["cache", "gc"],
        ["serve", pushed_images.small, "--insecure", "--listen", "127.0.0.1:0"],
    ]
    with stopped_writer(cache_dir):
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "blockstore", *argv, "--cache-dir", str(cache_dir)],
                cwd=REPO,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            for argv in commands
        ]
        try:
            time.sleep(2.5)  # each is past its start, waiting for the lock
            assert [proc.poll() for proc in procs] == [None] * len(procs)
            for proc in procs:
                proc.send_signal(signal.SIGINT)
            for proc in procs:
                proc.wait(timeout=5)
                err = proc.stderr.read()
                assert proc.returncode == 130 and "Traceback" not in err, err
                assert err.splitlines()[-1] == "blockstore: interrupted", err
        finally:
            for proc in procs:
                proc.kill()
                proc.wait()
                proc.stderr.close()


def test_a_server_stops_while_a_stopped_process_holds_the_write_lock(
    cache_dir, tmp_path, registry, pushed_images
):
    """Tried: ``serve IMAGE`` read whole with nbdcopy while another process holds the
    cache's write lock, stopped (Ctrl-Z on a prefetch), so its stores, trace and
    counters wait for the lock; then SIGTERM. Must hold: the server ends within
    seconds (exit 0), saying what it left unkept, and the cache is whole for the next
    opener. Before, it never ended: its close waited on those writes, and they on the
    stopped process."""
    sock = tmp_path / "serve.sock"
    argv = [sys.executable, "-m", "blockstore", "serve", pushed_images.small, "--insecure"]
    proc = subprocess.Popen(
        [*argv, "--cache-dir", str(cache_dir), "--unix", str(sock)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert wait_for(lambda: proc.stdout.readline().strip() == "ready", 30)
        with stopped_writer(cache_dir):
            uri = f"nbd+unix:///?socket={sock}"
            subprocess.run(["nbdcopy", uri, str(tmp_path / "copy")], check=True, timeout=30)
            proc.send_signal(signal.SIGTERM)
            started = time.monotonic()
            assert proc.wait(timeout=15) == 0, proc.stderr.read()
            assert time.monotonic() - started < 10
        err = proc.stderr.read()
        assert "Traceback" not in err, err
        assert "writes waiting for its write lock" in err, err
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    result = run_cli("cache", "verify", "--cache-dir", str(cache_dir))
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_slow_store_is_waited_for_not_taken_for_a_stuck_one(monkeypatch):
    """A store that takes 1.5 s (a large commit on a slow disk) while 2 MiB more arrives:
    no write lock is being waited for, so every chunk is queued and stored, none
    dropped. Only a store waiting for the lock is stuck."""
    from blockstore.fetch import keeper

    monkeypatch.setattr(keeper, "STUCK_AFTER", 0.5)
    stored: list[int] = []
    dropped: list[int] = []

    def slow_store(runs) -> None:
        time.sleep(1.5)
        stored.extend(first + i for first, chunks in runs for i in range(len(chunks)))

    kept = keeper.Keeper(slow_store, dropped.append, "test", lambda: 0.0)
    kept.put(0, bytes(CHUNK_SIZE))
    time.sleep(0.7)  # the first store runs, past STUCK_AFTER
    for index in range(1, 65):
        kept.put(index, bytes(CHUNK_SIZE))
    assert kept.drain(10)
    assert dropped == [] and sorted(stored) == list(range(65))


_HOLD_DIRECTORY = """
import fcntl, os, signal, sys
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)
fcntl.flock(fd, fcntl.LOCK_EX)
print("holding", flush=True)
os.kill(os.getpid(), signal.SIGSTOP)
"""


def test_an_open_waiting_on_a_stopped_opener_says_so_then_goes_on(cache_dir):
    """Tried: a process stopped (as by Ctrl-Z) while it holds the cache directory's lock,
    which writable opens take in turn, then `cache gc` run. Must hold: within seconds gc
    says it is waiting for the cache's write lock and that a stopped process holds it
    until it goes on; once that process ends, gc finishes (exit 0) and says it got the
    lock. Before, gc waited without a word for as long as the process stayed stopped."""
    ChunkStore(cache_dir).close()
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_DIRECTORY, str(cache_dir)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "holding"
        gc = subprocess.Popen(
            [sys.executable, "-m", "blockstore", "cache", "gc", "--cache-dir", str(cache_dir)],
            cwd=REPO,
            stderr=subprocess.PIPE,
            text=True,
        )
        # The watch looks once a second, from 5 s on; if it never speaks, the holder's
        # end after 20 s lets gc go on, and its first line (or none) is not the wait's.
        give_up = threading.Timer(20, holder.kill)
        give_up.start()
        first = gc.stderr.readline()
        give_up.cancel()
        assert "so far for the write lock of the cache at" in first, first
        assert "one stopped, as by Ctrl-Z, holds it until it goes on" in first, first
        assert gc.poll() is None
    finally:
        holder.send_signal(signal.SIGCONT)
        holder.kill()
        holder.wait()
    rest = gc.communicate(timeout=30)[1]
    assert gc.returncode == 0, rest
    assert "got the write lock of the cache" in rest, rest


def test_commands_that_look_answer_beside_a_stopped_writer(cache_dir, tmp_path):
    """Tried: a cache holding a sealed layer, a partial one and an image naming them;
    another process takes its write lock and is stopped (Ctrl-Z on a prefetch); then
    ``cache ls``, ``cache stats``, ``cache verify`` (finding nothing bad) and ``trace
    ls``, then ``cache rm`` of the image. Must hold: each command that looks answers
    within seconds (exit 0) what it says without the stopped process, and writes nothing
    (``data.mdb`` byte for byte); ``rm``, which writes, still waits for the lock and says
    so after 5 s. Before, each of them waited as long as the process stayed stopped:
    opening the cache took a write transaction though nothing needed writing."""
    sealed = make_blob(6 * CHUNK_SIZE, seed=60)
    partial = make_blob(9 * CHUNK_SIZE, seed=61)
    image = "127.0.0.1:5000/demo/img:latest"
    with ChunkStore(cache_dir) as store:
        for data, digest in (sealed, partial):
            blob = CachedBlob(store, digest, len(data), ScriptedSource(data, digest))
            blob.read(0, len(data) if digest == sealed[1] else 2 * CHUNK_SIZE)
            blob.close()
        store.seal(sealed[1])
        layers = [{"index": 0, "digest": sealed[1], "size": len(sealed[0]), "mediaType": "x"}]
        store.images.put(
            image, "linux/amd64", {"reference": image, "platform": "linux/amd64", "layers": layers}
        )
    before = (cache_dir / "data.mdb").read_bytes()
    cache = ["--cache-dir", str(cache_dir)]
    with stopped_writer(cache_dir):
        # Each would wait for as long as the holder stays stopped: ending is the point.
        listed = run_cli("cache", "ls", "--json", *cache, timeout=30)
        stats = run_cli("cache", "stats", "--json", *cache, timeout=30)
        verified = run_cli("cache", "verify", *cache, timeout=30)
        traces = run_cli("trace", "ls", *cache, timeout=30)
        for done in (listed, stats, verified, traces):
            assert done.returncode == 0 and "write lock" not in done.stderr, done.stderr
        rows = {row["digest"]: row for row in json.loads(listed.stdout)}
        assert rows[sealed[1]]["sealed"] and rows[sealed[1]]["images"] == [image]
        assert rows[partial[1]]["present"] == 2 and not rows[partial[1]]["sealed"]
        assert json.loads(stats.stdout)["blobs"] == 2
        assert verified.stdout.splitlines() == [
            "checked 8 chunks and 1 complete blobs",
            "ok",
        ], verified.stdout
        assert traces.stdout.strip() == "no traces kept"
        assert (cache_dir / "data.mdb").read_bytes() == before
        said = tmp_path / "rm.err"
        with said.open("w") as err:
            removing = subprocess.Popen(
                [sys.executable, "-m", "blockstore", "cache", "rm", image, *cache],
                cwd=REPO,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        try:
            waiting = r"waiting \d+s so far for the write lock of the cache"
            assert wait_for(lambda: re.search(waiting, said.read_text()), 30), said.read_text()
            assert removing.poll() is None
        finally:
            removing.kill()
            removing.wait()
