"""Paging a warm blob in from the cache file ahead of its reader.

What is tried: a 96 MiB blob is stored whole, the cache file's pages are
dropped from the page cache (as after a reboot), and a client reads 4 KiB of
it. What must hold: the blob's chunks are then read from disk in the
background, so the whole cache file is resident, far beyond what the read's
own faults bring in (the kernel reads ``read_ahead_kb`` around each fault of
the lookup: up to a third of this file where that is 8 MiB); not with
``page_in`` off; nothing walked beyond the memory budget; and nothing at all
for a blob already in memory.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
from cache_sources import ScriptedSource, make_blob

from blockstore.cache import pagein
from blockstore.cache.blob import CachedBlob
from blockstore.cache.store import ChunkStore
from blockstore.cli import build_parser
from blockstore.cli.common import prefetch_settings_from
from blockstore.cli.mount_options import serve_command
from blockstore.prefetch import PrefetchSettings

MiB = 1 << 20
BLOB_SIZE = 96 * MiB
FAULT_READS_AT_MOST = 64 * MiB
"""What a 4 KiB read's own faults may bring in: read-around of the B-tree's pages and
of the chunk's."""


def resident(path: Path) -> int:
    """Bytes of ``path`` in the page cache (util-linux ``fincore``)."""
    out = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return int(out.split()[0])


def drop_pages(path: Path) -> None:
    with path.open("rb") as file:
        os.fsync(file.fileno())
        os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def warm_blob(store: ChunkStore, size: int = 4 * MiB, seed: int = 3) -> str:
    """A blob of ``size`` random bytes stored whole in ``store``; its digest."""
    data, digest = make_blob(size, seed=seed)
    CachedBlob(store, digest, size, ScriptedSource(data, digest)).prefetch()
    return digest


def cold(cache_dir: Path, sizes: list[int]) -> list[str]:
    """Whole blobs of ``sizes`` stored in a cache at ``cache_dir``, then none of its
    file left in the page cache; their digests."""
    with ChunkStore(cache_dir) as store:
        digests = [warm_blob(store, size, seed) for seed, size in enumerate(sizes)]
    data_file = cache_dir / "data.mdb"
    drop_pages(data_file)
    if resident(data_file) > FAULT_READS_AT_MOST:
        pytest.skip("this file system keeps its files in memory (tmpfs?)")
    return digests


@pytest.fixture
def cold_cache(cache_dir: Path) -> tuple[Path, str]:
    """A cache holding one whole 96 MiB blob, none of its file in the page cache."""
    return cache_dir, cold(cache_dir, [BLOB_SIZE])[0]


def serve_one_read(cache_dir: Path, digest: str, settings: PrefetchSettings) -> CachedBlob:
    store = ChunkStore(cache_dir)
    blob = CachedBlob(store, digest, BLOB_SIZE, None, settings=settings)
    assert blob.read_cached(20 * MiB, 4096) is not None
    return blob


def close(blob: CachedBlob) -> None:
    page_in = blob._page_in
    blob.close()
    if page_in is not None:
        page_in.join(10)
    blob._store.close()


def test_a_first_hit_pages_the_whole_blob_in(cold_cache):
    cache_dir, digest = cold_cache
    blob = serve_one_read(cache_dir, digest, PrefetchSettings())
    try:
        deadline = time.monotonic() + 10
        while resident(cache_dir / "data.mdb") < BLOB_SIZE and time.monotonic() < deadline:
            time.sleep(0.05)
        assert resident(cache_dir / "data.mdb") >= BLOB_SIZE
    finally:
        close(blob)


def test_without_page_in_only_the_read_is_paged_in(cold_cache):
    cache_dir, digest = cold_cache
    blob = serve_one_read(cache_dir, digest, replace(PrefetchSettings(), page_in=False))
    try:
        assert blob._page_in is None
        time.sleep(0.5)
        assert resident(cache_dir / "data.mdb") <= FAULT_READS_AT_MOST
    finally:
        close(blob)


def test_paging_in_stops_at_its_share_of_the_memory(cold_cache, monkeypatch):
    cache_dir, digest = cold_cache
    monkeypatch.setattr(pagein, "memory_available", lambda: 8 * MiB * pagein.MEMORY_SHARE)
    blob = serve_one_read(cache_dir, digest, PrefetchSettings())
    try:
        assert blob._page_in is not None
        blob._page_in.join(10)
        assert blob._page_in.walked == 8 * MiB
    finally:
        close(blob)


def test_the_budget_is_shared_by_the_blobs_served_and_given_back_at_close(
    cache_dir: Path, monkeypatch
):
    """Exports of three cold blobs in one process take from one budget: with 8 MiB for
    page-in, the first takes it all and the second none; once the first closes, the
    third has it. Each walk is told its blob is out of memory: the first hit's fault
    reads 8 MiB around it, whose async readahead, racing the sample, could make the
    first blob look resident (so walked by no one) on a busy disk; the sample has a
    test of its own."""
    digests = cold(cache_dir, [32 * MiB] * 3)
    monkeypatch.setattr(pagein, "memory_available", lambda: 8 * MiB * pagein.MEMORY_SHARE)
    monkeypatch.setattr(pagein.PageIn, "_sample_in_memory", lambda self: False)
    with ChunkStore(cache_dir) as store:

        def first_read(digest: str) -> CachedBlob:
            blob = CachedBlob(store, digest, 32 * MiB, None)
            assert blob.read_cached(0, 4096) is not None
            blob._page_in.join(10)
            return blob

        first, second = first_read(digests[0]), first_read(digests[1])
        assert (first._page_in.walked, second._page_in.walked) == (8 * MiB, 0)
        first.close()
        third = first_read(digests[2])
        assert third._page_in.walked == 8 * MiB
        second.close()
        third.close()


def test_a_blob_in_memory_already_is_not_walked(cache_dir: Path):
    """Just stored, the blob's pages are all in memory: the sample of its chunks shows it,
    and nothing is asked for (a warm copy does not pay for a walk it does not need)."""
    with ChunkStore(cache_dir) as store:
        digest = warm_blob(store, BLOB_SIZE // 4, seed=8)
        blob = CachedBlob(store, digest, BLOB_SIZE // 4, None)
        assert blob.read_cached(0, 4096) is not None
        blob._page_in.join(10)
        assert blob._page_in.walked == 0
        blob.close()


def test_no_page_in_is_a_switch_of_serve_and_reaches_the_server_of_a_mount(tmp_path: Path):
    """``serve --no-page-in`` turns it off (on by default); ``mount --no-page-in`` starts
    its server with the same switch."""
    parser = build_parser()
    serve = ["serve", "127.0.0.1:5000/a/b:v1"]
    assert prefetch_settings_from(parser.parse_args(serve)).page_in is True
    assert prefetch_settings_from(parser.parse_args([*serve, "--no-page-in"])).page_in is False
    mount = parser.parse_args(["mount", "127.0.0.1:5000/a/b:v1", str(tmp_path), "--no-page-in"])
    argv, _ = serve_command(mount)
    assert "--no-page-in" in argv
    assert prefetch_settings_from(parser.parse_args(argv[argv.index("serve") :])).page_in is False


@pytest.fixture
def cold_looking(monkeypatch):
    """Every walk starts at once and finds the blob out of memory."""
    monkeypatch.setattr(pagein, "START_AFTER", 0.0)
    monkeypatch.setattr(pagein.PageIn, "_sample_in_memory", lambda self: False)


def test_two_first_hits_at_once_start_one_walk_and_leave_no_budget_behind(
    cache_dir: Path, cold_looking
):
    """Two client threads make an export's first hit at once, the first switched out
    between the check and the start: one walk starts, and once the export closes the
    budget holds nothing of it."""
    with ChunkStore(cache_dir) as store:
        digest = warm_blob(store)
        blob = CachedBlob(store, digest, 4 * MiB, None)
        started: list[pagein.PageIn | None] = []
        original = blob._start_page_in

        def start(blob_id: int) -> None:
            if not started:
                started.append(None)
                time.sleep(0.2)
            original(blob_id)
            started.append(blob._page_in)

        blob._start_page_in = start
        hits = [threading.Thread(target=blob.read_cached, args=(0, 4096)) for _ in range(2)]
        for hit in hits:
            hit.start()
            time.sleep(0.05)
        for hit in hits:
            hit.join()
        for page_in in started[1:]:
            page_in.join(10)
        blob.close()
        assert len({id(page_in) for page_in in started[1:]}) == 1, "two walks of one export"
        assert pagein._budget._taken == 0, "budget held after the export closed"


def test_a_first_hit_racing_close_leaves_no_walk_behind(cache_dir: Path, cold_looking, monkeypatch):
    """``close`` comes while a first hit is starting the walk: the walk is stopped all
    the same, and gives its budget back."""
    with ChunkStore(cache_dir) as store:
        digest = warm_blob(store)
        blob = CachedBlob(store, digest, 4 * MiB, None)
        real_init = pagein.PageIn.__init__
        closings: list[threading.Thread] = []

        def init(self, *args, **kwargs):
            closing = threading.Thread(target=blob.close)
            closings.append(closing)
            closing.start()
            closing.join(0.2)
            real_init(self, *args, **kwargs)

        monkeypatch.setattr(pagein.PageIn, "__init__", init)
        assert blob.read_cached(0, 4096) is not None
        closings[0].join(10)
        if blob._page_in is not None:
            blob._page_in.join(10)
            assert blob._page_in.walked == 0, "walked the blob after its export closed"
        assert pagein._budget._taken == 0


def test_two_exports_of_one_blob_walk_it_once(cache_dir: Path, cold_looking):
    """The same layer in two images of one server: one walk, one share of the budget."""
    with ChunkStore(cache_dir) as store:
        digest = warm_blob(store)
        exports = [CachedBlob(store, digest, 4 * MiB, None) for _ in range(2)]
        for blob in exports:
            assert blob.read_cached(0, 4096) is not None
        for blob in exports:
            blob._page_in.join(10)
        assert sorted(blob._page_in.walked for blob in exports) == [0, 4 * MiB]
        for blob in exports:
            blob.close()
        assert pagein._budget._taken == 0


def test_no_thread_to_be_had_fails_no_hit(cache_dir: Path, monkeypatch):
    """Out of threads, the first hit is served all the same, with no page-in."""

    def refuse(self) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(pagein.PageIn, "start", refuse)
    with ChunkStore(cache_dir) as store:
        digest = warm_blob(store)
        blob = CachedBlob(store, digest, 4 * MiB, None)
        assert blob.read_cached(0, 4096) is not None
        assert blob._page_in is None
        blob.close()


def test_a_forked_child_inherits_no_walk_and_no_held_lock(cache_dir: Path, cold_looking):
    """A fork taken while a walk holds the budget's lock and part of the budget: in the
    child the budget is empty and usable, and closing the export does not hang."""
    with ChunkStore(cache_dir) as store:
        digest = warm_blob(store)
        blob = CachedBlob(store, digest, 4 * MiB, None)
        assert blob.read_cached(0, 4096) is not None
        blob._page_in.join(10)
        with pagein._budget._lock:
            pid = os.fork()
            if pid == 0:  # the child: exits 0 only if nothing hangs and nothing is held
                try:
                    ok = pagein._budget._taken == 0 and pagein._budget.take(4096)
                    blob._page_in.stop()
                    os._exit(0 if ok else 1)
                finally:
                    os._exit(2)
        deadline = time.monotonic() + 10
        while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        if done[0] == 0:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        blob.close()
        assert done[0] == pid and os.waitstatus_to_exitcode(done[1]) == 0, "the child hung"
