"""Two servers on one cache directory never fetch the same chunk at once, nor twice."""

from __future__ import annotations

import itertools
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from fetch_sources import PieceSource, make_blob
from rig.fault_proxy import Fault

from blockstore.cache import CHUNK_SIZE, CachedBlob, ChunkStore
from blockstore.cache.leases import RangeLeases
from blockstore.cache.traces import TraceShelf
from blockstore.prefetch import PrefetchSettings, Trace

WORKER = Path(__file__).with_name("fetch_worker.py")
RANGE = re.compile(r"bytes=(\d+)-(\d+)")


def run_two_workers(argv: list[str], start: Path, proxy, digest: str) -> list[tuple[int, int]]:
    """Two ``fetch_worker.py`` processes started together; both must print ok. The byte
    ranges of the blob the registry was asked for, in order."""
    workers = [
        subprocess.Popen(
            [sys.executable, str(WORKER), *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    time.sleep(1.0)  # both have opened the cache
    start.touch()
    outputs = [worker.communicate(timeout=60) for worker in workers]
    for worker, (out, err) in zip(workers, outputs, strict=True):
        assert worker.returncode == 0 and out.strip() == "ok", err
    return sorted(
        (int(m[1]), int(m[2]))
        for r in proxy.requests
        if r.method == "GET" and r.path.endswith(digest)
        for m in [RANGE.fullmatch(r.headers.get("Range", ""))]
        if m
    )


def test_two_processes_on_one_cache_fetch_each_chunk_once(
    pushed_blob, registry, fault_proxy, cache_dir, tmp_path
):
    """Two processes read the same blob, start to end, through one cache at once over a
    slow link: the registry is asked for every byte exactly once in all (no two ranges
    overlap, and together they cover the blob), and both read every byte right."""
    proxy = fault_proxy(registry)
    proxy.fault = Fault("pace", path_contains="/blobs/", seconds=0.005)
    expected = tmp_path / "expected"
    expected.write_bytes(pushed_blob.data)
    start = tmp_path / "start"
    argv = [
        str(cache_dir),
        proxy.host,
        pushed_blob.repository,
        pushed_blob.digest,
        str(expected),
        str(start),
    ]
    spans = run_two_workers(argv, start, proxy, pushed_blob.digest)
    covered = 0
    for first, last in spans:
        assert first == covered, f"overlap or gap at {first}: {spans}"
        covered = last + 1
    assert covered == len(pushed_blob.data)


def test_two_processes_replaying_one_trace_fetch_each_block_once(
    pushed_blob, registry, fault_proxy, cache_dir, tmp_path
):
    """Tried: two processes open the blob at once on one cache that keeps a trace of 60
    scattered 4 KiB blocks, and replay it over a slow link. Must hold: no byte is asked
    of the registry twice (the block ranges are leased across processes as chunk ranges
    are), and both read the traced blocks right."""
    rng = random.Random(7)
    blocks = sorted(rng.sample(range(len(pushed_blob.data) // 4096), 60))
    with ChunkStore(cache_dir) as store:
        events = [(n, block, 1) for n, block in enumerate(blocks)]
        TraceShelf(store).put(Trace(pushed_blob.digest, 4096, time.time(), events))
    proxy = fault_proxy(registry)
    proxy.fault = Fault("delay", path_contains="/blobs/", seconds=0.05)
    expected = tmp_path / "expected"
    expected.write_bytes(pushed_blob.data)
    start = tmp_path / "start"
    argv = [str(cache_dir), proxy.host, pushed_blob.repository, pushed_blob.digest]
    argv += [str(expected), str(start), "replay"]
    spans = run_two_workers(argv, start, proxy, pushed_blob.digest)
    for (_, last), (first, _) in itertools.pairwise(spans):
        assert first > last, f"asked twice: {spans}"
    assert {b * 4096 for b in blocks} <= {
        offset for first, last in spans for offset in range(first, last + 1, 4096)
    }


def test_a_lease_held_by_a_dead_process_is_free(cache_dir, tmp_path):
    """A process that holds a lease and dies leaves nothing behind: the range can be
    leased at once by another process; while it lived, it could not."""
    cache_dir.mkdir()
    digest = "sha256:" + "c" * 64
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path\n"
            "from blockstore.cache.leases import RangeLeases\n"
            f"leases = RangeLeases(Path({str(cache_dir)!r}), {digest!r})\n"
            "assert leases.try_take(10, 20)\n"
            "print('held', flush=True)\n"
            "time.sleep(60)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    leases = RangeLeases(cache_dir, digest)
    assert not leases.try_take(25, 1)
    assert leases.try_take(0, 10)  # next to it: free
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert leases.try_take(25, 1)


def test_a_read_waits_for_another_process_s_lease_no_longer_than_its_lease_wait(
    cache_dir, tmp_path
):
    """Another process holds the lease on every chunk of a blob and never lets go (a
    server stuck on a slower registry, or stopped): a read with a lease wait of 0.5 s
    fetches the range itself once that has passed, and gets the right bytes, instead of
    waiting for as long as that process lives."""

    data, digest = make_blob(4 * CHUNK_SIZE, seed=51)
    cache_dir.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time; from pathlib import Path\n"
            "from blockstore.cache.leases import RangeLeases\n"
            f"leases = RangeLeases(Path({str(cache_dir)!r}), {digest!r})\n"
            "assert leases.try_take(0, 1000)\n"
            "print('held', flush=True)\n"
            "time.sleep(60)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        settings = PrefetchSettings(readahead=False, lease_wait=0.5)
        with ChunkStore(cache_dir) as store:
            source = PieceSource(data, digest)
            blob = CachedBlob(store, digest, len(data), source, settings=settings)
            started = time.monotonic()
            got = b"".join(bytes(b) for b in blob.read(CHUNK_SIZE, 100))
            took = time.monotonic() - started
            blob.close()
        assert got == data[CHUNK_SIZE : CHUNK_SIZE + 100]
        assert 0.45 < took < 5, took
    finally:
        holder.kill()
        holder.wait()


def test_a_cache_on_a_file_system_without_locks_still_fetches(tmp_path, monkeypatch, caplog):
    """The lease files live where locking fails for want of support (ENOLCK, as on some
    network file systems): a read is fetched and served right at once, with one warning
    that processes may fetch the same bytes twice, rather than waiting forever for a
    lease no process holds."""
    import errno
    import fcntl
    import threading

    def unsupported(*_args) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "lockf", unsupported)
    data, digest = make_blob(8 * CHUNK_SIZE, seed=540)
    got: list[bytes] = []
    with ChunkStore(tmp_path / "cache") as store:
        blob = CachedBlob(store, digest, len(data), PieceSource(data, digest))
        reader = threading.Thread(
            target=lambda: got.append(b"".join(bytes(b) for b in blob.read(0, len(data)))),
            daemon=True,
        )
        reader.start()
        reader.join(10)
        assert not reader.is_alive(), "the read waited for a lease"
        blob.read(0, 4096)
        blob.close()
    assert got == [data]
    assert caplog.text.count("no leases between processes") == 1
