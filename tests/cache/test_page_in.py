"""Paging a warm blob in from the cache file ahead of its reader.

What is tried: a 96 MiB blob is stored whole, the cache file's pages are
dropped from the page cache (as after a reboot), and a client reads 4 KiB of
it. What must hold: the blob's chunks are then read from disk in the
background, so the whole cache file is resident, far beyond what the read's
own faults bring in (the kernel reads ``read_ahead_kb`` around each fault of
the lookup: up to a third of this file where that is 8 MiB); not with
``page_in`` off; and never more than the memory budget.
"""

from __future__ import annotations

import os
import subprocess
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
from blockstore.cli.mount_cmds import serve_command
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


@pytest.fixture
def cold_cache(cache_dir: Path) -> tuple[Path, str]:
    """A cache holding one whole 96 MiB blob, none of its file in the page cache."""
    data, digest = make_blob(BLOB_SIZE, seed=7)
    with ChunkStore(cache_dir) as store:
        CachedBlob(store, digest, BLOB_SIZE, ScriptedSource(data, digest)).prefetch()
    data_file = cache_dir / "data.mdb"
    drop_pages(data_file)
    if resident(data_file) > FAULT_READS_AT_MOST:
        pytest.skip("this file system keeps its files in memory (tmpfs?)")
    return cache_dir, digest


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
        assert blob._page_in.advised == 8 * MiB
        assert resident(cache_dir / "data.mdb") <= FAULT_READS_AT_MOST
    finally:
        close(blob)


def test_the_budget_is_shared_by_the_blobs_served_and_given_back_at_close(cold_cache, monkeypatch):
    """Two exports in one process take from one budget: with 8 MiB left for page-in, the
    first takes it all and the second none; once the first closes, a third has it."""
    cache_dir, digest = cold_cache
    monkeypatch.setattr(pagein, "memory_available", lambda: 8 * MiB * pagein.MEMORY_SHARE)
    with ChunkStore(cache_dir) as store:
        exports = []
        for _ in range(2):
            blob = CachedBlob(store, digest, BLOB_SIZE, None)
            assert blob.read_cached(0, 4096) is not None
            blob._page_in.join(10)
            exports.append(blob)
        assert [blob._page_in.advised for blob in exports] == [8 * MiB, 0]
        exports[0].close()
        third = CachedBlob(store, digest, BLOB_SIZE, None)
        assert third.read_cached(0, 4096) is not None
        third._page_in.join(10)
        assert third._page_in.advised == 8 * MiB
        for blob in (exports[1], third):
            blob.close()


def test_page_runs_merge_views_that_follow_each_other():
    """As LMDB stores chunks one after the other: each value begins a page past the last
    one's end (its page header). A view further away starts a run of its own."""
    page = pagein._PAGE
    view = memoryview(bytearray(12 * page))
    start = pagein.address_of(view)
    runs = pagein.page_runs(
        [view[0:100], None, view[100:5000], view[2 * page + 16 : 3 * page], view[10 * page :]]
    )
    assert runs[0] == (start - start % page, start % page + 3 * page)
    assert runs[1][0] == (start + 10 * page) - (start + 10 * page) % page
    assert len(runs) == 2


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
