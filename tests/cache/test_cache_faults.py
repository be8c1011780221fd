"""Faults on the host under a cache: flipped bits in the LMDB file, SIGKILL while writing.

The readers and writers run in child processes, so a death by a signal is
seen as such (a negative exit status), not as a crashed test run.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cache_rig import REPO, run_cli
from cache_sources import ScriptedSource, make_blob
from lmdb_pages import regions
from rig.small_disk import fail_read_only, small_disk
from rig.turn_holder import turn_held

import blockstore.cache.blob as blob_mod
import blockstore.cache.turns as turns
from blockstore.cache import CHUNK_SIZE, CachedBlob, ChunkStore, DiskFull
from blockstore.errors import CacheError
from blockstore.image import open_image
from blockstore.throttledlog import ThrottledLog

HERE = Path(__file__).resolve().parent
FLIPS = 25


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> tuple[Path, list[str]]:
    """A cache holding a sealed blob and half of another, and the blobs as files."""
    root = tmp_path_factory.mktemp("flips")
    specs = []
    with ChunkStore(root / "pristine") as store:
        for n, (size, whole) in enumerate(
            [(24 * CHUNK_SIZE + 100, True), (16 * CHUNK_SIZE, False)]
        ):
            data, digest = make_blob(size, seed=70 + n)
            (root / f"blob{n}").write_bytes(data)
            specs.append(f"{root / f'blob{n}'}={digest}")
            blob = CachedBlob(store, digest, size, ScriptedSource(data, digest))
            if whole:
                blob.prefetch()
            else:
                blob.read(0, size // 2)
            blob.close()
    return root / "pristine", specs


@pytest.mark.parametrize("kind", ["tree", "keys", "values", "records"])
def test_flipped_bits_in_the_lmdb_file_never_serve_a_wrong_byte_nor_kill(pristine, kind, tmp_path):
    """25 single-bit flips (seeded) in the file's B-tree pages, in the keys of chunk
    records, in chunk values, or in small records (blob records, counters, meta), each in a
    fresh copy of one cache: a child process opens
    it offline, reads every blob in 32 KiB and 4 KiB reads and verifies it. Every read is
    the right bytes or an error, never a wrong byte; the child ends by itself (exit 0),
    never by a signal; and flips in keys and values are noticed (reads fail beyond the
    half blob that is not cached)."""
    cache, specs = pristine
    assert regions(cache / "data.mdb")[kind]
    result = subprocess.run(
        [
            sys.executable,
            str(HERE / "flip_reader.py"),
            str(cache),
            str(tmp_path),
            *specs,
            "--kind",
            kind,
            "--flips",
            str(FLIPS),
            "--seed",
            "11",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    ok, right, failed, refused = result.stdout.splitlines()[-1].split()
    assert ok == "ok" and int(right) > 0
    uncached_reads = 8 + 8 * 8  # the half blob's uncached chunks, in 32 and 4 KiB reads
    if kind in ("keys", "values"):
        assert int(failed) > FLIPS * uncached_reads or int(refused) > 0, result.stdout


def test_sigkill_in_heavy_writes_ten_times_in_a_row_leaves_a_right_cache(tmp_path):
    """A writer storing, evicting, sealing, pinning and removing in small commits is
    SIGKILLed at a random moment within its first 50 ms, ten times in a row (the script
    takes --rounds 100 for the long run): each dies of the SIGKILL and of nothing else;
    then verify finds nothing bad or inconsistent and every cached byte is right."""
    result = subprocess.run(
        [
            sys.executable,
            str(HERE / "kill_writers.py"),
            str(tmp_path / "cache"),
            "--rounds",
            "10",
            "--seed",
            "5",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert result.stdout.split()[-2:] == ["ok", "10"]


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_a_damaged_cache_on_a_full_disk_is_one_clear_error_or_an_empty_cache(tmp_path):
    """A cache on a 2 MiB tmpfs, its data.mdb cut short, the rest of the disk then filled:
    `cache stats` either moves it aside and starts an empty cache (exit 0) or, with no room
    for one, fails with the cache error's exit code (8); one message either way, never a
    traceback or a signal. A blob then reads right through the store, cached or not."""
    disk = tmp_path / "small"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], check=True)
    try:
        cache = disk / "cache"
        data, digest = make_blob(24 * CHUNK_SIZE, seed=72)
        with ChunkStore(cache) as store:
            blob = CachedBlob(store, digest, len(data), ScriptedSource(data, digest))
            blob.prefetch()
            blob.close()
        os.truncate(cache / "data.mdb", (cache / "data.mdb").stat().st_size // 2)
        with open(disk / "filler", "wb", buffering=0) as filler, contextlib.suppress(OSError):
            while True:
                filler.write(bytes(1 << 16))
        result = run_cli("cache", "stats", "--cache-dir", str(cache))
        assert result.returncode in (0, 8), result.stdout + result.stderr
        assert "damaged" in result.stderr and "Traceback" not in result.stderr
        (disk / "filler").unlink()
        with ChunkStore(cache) as store:
            blob = CachedBlob(store, digest, len(data), ScriptedSource(data, digest))
            assert b"".join(blob.read(0, len(data))) == data
            blob.close()
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_lease_file_that_cannot_be_made_costs_the_leases_not_the_read(cache_dir, caplog):
    """Tried: a cold read where the blob's lease file cannot be made (here `leases` is a
    file, as a full inode table or a read-only directory would refuse it). Must hold:
    the read returns the right bytes, with one warning that processes may fetch the same
    bytes twice; the chunks are kept. Before, the error failed the read, and `serve`
    and `prefetch` on a cache out of inodes did not start."""
    data, digest = make_blob(4 * CHUNK_SIZE, seed=90)
    cache_dir.mkdir(parents=True, exist_ok=True)
    (cache_dir / "leases").write_bytes(b"")
    with ChunkStore(cache_dir) as store:
        blob = CachedBlob(store, digest, len(data), ScriptedSource(data, digest))
        assert b"".join(blob.read(0, len(data))) == data
        blob.close()
        [info] = store.blobs()
        assert info.present == 4
    assert "no leases between processes" in caplog.text


def test_a_prefetch_whose_stores_fail_says_why_it_could_not_keep_the_layer(
    registry, pushed_images, tmp_path
):
    """Tried: a layer's first chunk read into a cache on an ext4, which then fails into
    read-only (an error under ``errors=remount-ro``), and the layer prefetched. Must
    hold: the prefetch fails saying storing the layer failed, and why (the read-only file
    system). Before, it said only that parts of the layer "went as it was filled",
    listing eviction, `cache rm` in another process, a full disk and another process's
    write lock, but not the cause."""
    with small_disk(tmp_path / "disk", "64M") as disk:
        image = open_image(
            pushed_images.small, cache_dir=disk / "cache", options=registry.options()
        )
        try:
            [layer] = image.select()
            export = image.layer_export(layer)
            export.read(0, CHUNK_SIZE)
            fail_read_only(disk)
            with pytest.raises(CacheError) as caught:
                export.prefetch()
        finally:
            image.close()
    said = str(caught.value)
    assert "could not be kept whole in the cache: storing it failed" in said, said
    assert "read-only file system" in said.lower(), said


def test_a_prefetch_whose_stores_fail_beside_another_says_why_at_once(
    registry, pushed_images, tmp_path, monkeypatch
):
    """Tried: a layer's first chunk read into a cache on an ext4, another prefetch filling
    the same cache (holding its turn), then the ext4 failing into read-only (an
    error under ``errors=remount-ro``) and the layer prefetched. Must hold: the prefetch
    fails at once saying storing the layer failed, and why (the read-only file system):
    chunks lost to failing stores are no other prefetch's doing, so it does not wait to
    fill alone. Before, it waited for the other prefetch (here 20 s), and then failed on
    its first write after the wait, "cache write failed", without naming the layer."""
    monkeypatch.setattr(turns, "WAIT", 20.0)
    with small_disk(tmp_path / "disk", "64M") as disk:
        cache = disk / "cache"
        image = open_image(pushed_images.small, cache_dir=cache, options=registry.options())
        try:
            [layer] = image.select()
            export = image.layer_export(layer)
            export.read(0, CHUNK_SIZE)
            with turn_held(cache, alone=False):
                fail_read_only(disk)
                started = time.monotonic()
                with pytest.raises(CacheError) as caught:
                    export.prefetch()
                took = time.monotonic() - started
        finally:
            image.close()
    said = str(caught.value)
    assert "could not be kept whole in the cache: storing it failed" in said, said
    assert "read-only file system" in said.lower(), said
    assert took < 10, took


def test_a_cache_that_keeps_nothing_serves_every_byte_and_says_so_a_few_times(
    cache_dir, caplog, monkeypatch
):
    """Tried: forty cold reads, each its own fetch, while every store fails (a full disk,
    a file size limit: here the store raises the error a full disk gives). Must hold:
    every read returns the right bytes; the failure is logged a few times, not once per
    fetch (1,934 lines for one copy under RLIMIT_FSIZE before)."""
    data, digest = make_blob(40 * CHUNK_SIZE, seed=91)
    # Its own throttle: what earlier tests of this process logged counts for nothing.
    monkeypatch.setattr(blob_mod, "_unkept", ThrottledLog(blob_mod.log, "%d more in %.0f s"))
    with ChunkStore(cache_dir) as store:

        def full(*args, **kwargs):
            raise DiskFull("the disk holding the cache is full")

        store.store_runs = full  # type: ignore[method-assign]
        blob = CachedBlob(store, digest, len(data), ScriptedSource(data, digest))
        for index in range(40):
            start = index * CHUNK_SIZE
            assert b"".join(blob.read(start, CHUNK_SIZE)) == data[start : start + CHUNK_SIZE]
        blob.close()
    said = [r for r in caplog.records if "serving uncached bytes" in r.getMessage()]
    assert 1 <= len(said) <= 10, len(said)
