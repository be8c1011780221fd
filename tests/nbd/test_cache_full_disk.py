"""A cache on a small real file system (ext4 on a loop device) that a prefetch would fill."""

from __future__ import annotations

import filecmp
import hashlib
import json
import random
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import nbd
import pytest
from rig.local_source import LocalFileSource
from rig.pushed import push_erofs
from rig.small_disk import small_disk
from rig.stored_chunks import zero_tree_pages
from test_serve_cli import serving, stop

from blockstore.cache import CachedBlob, ChunkStore, DiskFull
from blockstore.cache.layout import DB_MANIFESTS

CLI = [sys.executable, "-m", "blockstore"]


def blockstore(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120)


def test_a_prefetch_the_disk_cannot_hold_is_refused_and_costs_no_other_layer(
    registry, pushed_images, erofs_images, tmp_path
):
    """A cache on a 24 MiB ext4 holding the small image, prefetched and sealed; then a
    prefetch of the large image (64 MiB), under the default cap: refused before a byte is
    fetched (exit 8), in one line saying how much it needs and how much room there is; the
    small image is still whole and sealed. Before, each store that found the disk full
    evicted half of the cache: the small image went to 0%, and the prefetch failed all
    the same."""
    with small_disk(tmp_path / "disk", "24M") as disk:
        cache = str(disk / "cache")
        done = blockstore("prefetch", pushed_images.small, "--insecure", "--cache-dir", cache)
        assert done.returncode == 0, done.stderr
        refused = blockstore("prefetch", pushed_images.large, "--insecure", "--cache-dir", cache)
        assert refused.returncode == 8, refused.stderr
        (line,) = refused.stderr.splitlines()
        assert f"{erofs_images.large.digest} needs about" in line, line
        assert "nothing was fetched or evicted" in line, line
        listed = blockstore("cache", "ls", "--json", "--cache-dir", cache)
        assert listed.returncode == 0, listed.stderr
        cached = {blob["digest"]: blob for blob in json.loads(listed.stdout)}
        small = cached[erofs_images.small.digest]
        assert small["sealed"] and small["cached_fraction"] == 1.0
        assert erofs_images.large.digest not in cached


def test_a_fill_the_disk_cannot_hold_is_skipped_and_costs_no_other_layer(
    registry, pushed_images, erofs_images, tmp_path
):
    """The same small disk holding the small image, sealed; `serve --fill` of the large
    image: the fill is skipped with one warning saying how much it needs, the server
    serves, and the small image stays whole and sealed. Before, the fill's stores found
    the disk full one after another, each evicting half of the cache (a warning each,
    many a second): the small image went to 0%."""
    with small_disk(tmp_path / "disk", "24M") as disk:
        cache = str(disk / "cache")
        done = blockstore("prefetch", pushed_images.small, "--insecure", "--cache-dir", cache)
        assert done.returncode == 0, done.stderr
        quiet = ["--no-erofs-start", "--no-erofs-walk", "--no-trace", "--no-readahead"]
        args = [pushed_images.large, "--insecure", "--fill", *quiet, "--cache-dir", cache]
        with serving(*args, "--listen", "127.0.0.1:0") as (proc, _):
            time.sleep(2)
            assert stop(proc) == 0
            (line,) = proc.stderr.read().splitlines()
            assert f"{erofs_images.large.digest} needs about" in line, line
            assert "not filled, so nothing else is evicted for it" in line, line
        listed = blockstore("cache", "ls", "--json", "--cache-dir", cache)
        cached = {blob["digest"]: blob for blob in json.loads(listed.stdout)}
        small = cached[erofs_images.small.digest]
        assert small["sealed"] and small["cached_fraction"] == 1.0


def test_a_prefetch_the_cap_makes_room_for_is_not_refused(tmp_path):
    """A cache on a 32 MiB ext4 whose cap (20 MiB) the disk can hold, holding a 14 MiB
    layer: a second 14 MiB layer is prefetched, the first evicted under the cap as ever,
    the new one whole. Before, the room check counted only the disk's free space and
    refused it, though storing it evicts the first layer and reuses its pages."""
    with small_disk(tmp_path / "disk", "32M") as disk:
        sources = []
        for seed in (1, 2):
            data = random.Random(seed).randbytes(14 << 20)
            path = tmp_path / f"layer{seed}"
            path.write_bytes(data)
            sources.append((data, f"sha256:{hashlib.sha256(data).hexdigest()}", path))
        with ChunkStore(disk / "cache", size_cap=20 << 20) as store:
            for data, digest, path in sources:
                source = LocalFileSource(path, digest)
                try:
                    CachedBlob(store, digest, len(data), source).prefetch()
                finally:
                    source.close()
            record = store.lookup(sources[1][1])
            assert record is not None and record.sealed
            assert record.present == record.chunks


def test_room_counts_what_a_stored_chunk_takes_in_the_file(tmp_path):
    """A cache on a 32 MiB ext4 holding a 16 MiB layer (its file full, no page free), then
    a prefetch of a 7 MiB layer needing more than the disk's free space: refused before a
    byte is fetched, the first layer still whole. Before, the room counted each stored
    chunk as 32 KiB of the file, not the 36 KiB it takes, so 2 MiB the file did not have
    counted as room: the prefetch went ahead, the disk filled, and half of the first
    layer was evicted for it."""
    with small_disk(tmp_path / "disk", "32M") as disk:
        layers = []
        for seed, size in ((1, 16 << 20), (2, 7 << 20)):
            data = random.Random(seed).randbytes(size)
            path = tmp_path / f"layer{seed}"
            path.write_bytes(data)
            layers.append((data, f"sha256:{hashlib.sha256(data).hexdigest()}", path))
        with ChunkStore(disk / "cache") as store:
            blobs = []
            for data, digest, path in layers:
                source = LocalFileSource(path, digest)
                blobs.append((CachedBlob(store, digest, len(data), source), source))
            try:
                blobs[0][0].prefetch()
                with pytest.raises(DiskFull):
                    blobs[1][0].prefetch()
            finally:
                for _, source in blobs:
                    source.close()
            first = store.lookup(layers[0][1])
            assert first is not None and first.present == first.chunks


def test_damage_found_while_serving_a_cache_that_cannot_be_moved_aside_costs_no_read(
    registry, pushed_images, erofs_images, tmp_path
):
    """Tried: a server whose --cache-dir is a mount point (a volume given to the cache, so
    a damaged cache cannot be renamed aside) reads a block, then the cache's B-tree pages
    are zeroed under it, then nbdcopy reads the whole export twice. Must hold: every byte
    is right, from the registry; the log says once that the cache is damaged, cannot be
    moved aside, what to do, and that the server goes on without it; the server stops
    cleanly. Before, every read after the damage was EIO."""
    with small_disk(tmp_path / "volume", "64M") as cache:
        args = [pushed_images.large, "--insecure", "--cache-dir", str(cache)]
        args += ["--no-erofs-start", "--no-erofs-walk", "--no-readahead", "--no-trace"]
        with serving(*args, "--listen", "127.0.0.1:0") as (proc, exports):
            h = nbd.NBD()
            h.connect_uri(exports[""])
            assert h.pread(4096, 0) == erofs_images.large.path.read_bytes()[:4096]
            h.shutdown()
            assert zero_tree_pages(cache) > 0
            outs = [tmp_path / "first.img", tmp_path / "second.img"]
            copies = [
                subprocess.run(["nbdcopy", exports[""], str(out)], capture_output=True, timeout=120)
                for out in outs
            ]
            assert stop(proc) == 0
            log = proc.stderr.read()
    for out, copied in zip(outs, copies, strict=True):
        assert copied.returncode == 0, copied.stderr.decode() + log
        assert filecmp.cmp(out, erofs_images.large.path, shallow=False)
    [line] = [line for line in log.splitlines() if "goes on without it" in line]
    assert f"the cache at {cache} is damaged" in line, line
    assert "cannot be moved aside (Device or resource busy)" in line, line
    assert "move its files out of that directory" in line, line
    assert "Traceback" not in log


@contextmanager
def serving_logged(args: list[str], log: Path) -> Iterator[tuple[str, str]]:
    """``serve ARGS`` on a free port with metrics, its log written to ``log``, until it says
    ``ready``: its metrics URL and default export's URI; stopped after (exit 0)."""
    argv = [*CLI, "serve", *args, "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0"]
    with log.open("w") as out:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=out, text=True)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line.split())
            if lines[-1] == ["ready"]:
                break
        (url,) = [words[1] for words in lines if words[0] == "metrics"]
        (uri,) = [words[2] for words in lines if words[:2] == ["export", '""']]
        yield url, uri
    finally:
        assert stop(proc) == 0
        proc.stdout.close()


def test_metrics_of_a_server_gone_on_without_its_damaged_cache_are_still_scraped(
    registry, pushed_images, erofs_images, tmp_path
):
    """Tried: ``serve --metrics`` with a --cache-dir that is a mount point (so a damaged
    cache cannot be renamed aside) reads a block, the cache's B-tree pages are zeroed
    under it, a read finds the damage, then /metrics is scraped twice. Must hold: each
    scrape answers 200 with the cache's gauges (nothing stored: the server goes on without
    the cache) and this process's counters, no traceback in the log. Before, every scrape
    after the damage was a 500 with the lost cache's error in a traceback."""
    with small_disk(tmp_path / "volume", "64M") as cache:
        args = [pushed_images.large, "--insecure", "--cache-dir", str(cache)]
        args += ["--no-erofs-start", "--no-erofs-walk", "--no-readahead", "--no-trace"]
        with serving_logged(args, tmp_path / "serve.log") as (url, uri):
            h = nbd.NBD()
            h.connect_uri(uri)
            image = erofs_images.large.path.read_bytes()
            assert h.pread(4096, 0) == image[:4096]
            assert zero_tree_pages(cache) > 0
            assert h.pread(4096, 1 << 20) == image[1 << 20 : (1 << 20) + 4096]
            h.shutdown()
            for _ in range(2):
                with urllib.request.urlopen(url, timeout=10) as answer:
                    assert answer.status == 200
                    text = answer.read().decode()
                assert "blockstore_cache_stored_bytes 0.0" in text, text
                assert "blockstore_cache_bytes_fetched_total" in text, text
    logged = (tmp_path / "serve.log").read_text()
    assert "goes on without it" in logged, logged
    assert "Traceback" not in logged, logged


def test_a_fill_whose_cache_is_lost_as_it_fills_stops_fetching(
    registry, pushed_images, erofs_images, tmp_path
):
    """Tried: ``serve --fill`` at a quarter of the layer per second, with a --cache-dir that
    is a mount point (so a damaged cache cannot be renamed aside); a second into the
    fill, the cache's B-tree pages are zeroed and a read finds the damage. Must hold:
    the read is right; the fill ends with the round it was in (the layer fetched less
    than one and a half times in all), saying the cache keeps nothing. Before, it went
    on for all its rounds, fetching the whole layer each time for a cache that kept
    none of it, then said it gave up as if the disk were full."""
    size = erofs_images.large.size
    log = tmp_path / "serve.log"
    with small_disk(tmp_path / "volume", "256M") as cache:
        args = [pushed_images.large, "--insecure", "--cache-dir", str(cache)]
        args += ["--no-erofs-start", "--no-erofs-walk", "--no-readahead", "--no-trace"]
        args += ["--fill", "--fill-rate", str(size // 4)]
        with serving_logged(args, log) as (url, uri):
            h = nbd.NBD()
            h.connect_uri(uri)
            image = erofs_images.large.path.read_bytes()
            assert h.pread(4096, 0) == image[:4096]
            time.sleep(1)
            assert zero_tree_pages(cache) > 0
            assert h.pread(4096, 1 << 20) == image[1 << 20 : (1 << 20) + 4096]
            h.shutdown()
            deadline = time.monotonic() + 60
            ended = ("not filled", "gave up")
            while not any(w in log.read_text() for w in ended) and time.monotonic() < deadline:
                time.sleep(0.5)
            text = urllib.request.urlopen(url, timeout=10).read().decode()
    logged = log.read_text()
    assert "not filled, as the cache keeps nothing" in logged, logged
    assert "gave up" not in logged and "Traceback" not in logged, logged
    (fetched,) = [
        float(line.split()[1])
        for line in text.splitlines()
        if line.startswith("blockstore_cache_bytes_fetched_total ")
    ]
    assert fetched < 1.5 * size, (fetched, size)


def manifests_root_zeroed(data: Path) -> bool:
    """Zero the root page of data.mdb's ``manifests`` database in place (the records kept
    beside the manifests: image configs, chunk indexes), as a failing disk might: found
    only once read, not when the cache opens. Whether one was found to zero."""
    raw = data.read_bytes()
    # The newest meta page (0 or 1) names the main database's root; its leaf holds each
    # named database's record (48 bytes after its name), the root page last in it.
    metas = [raw[n * 4096 : (n + 1) * 4096] for n in (0, 1)]
    meta = max(metas, key=lambda m: int.from_bytes(m[144:152], "little"))
    main = int.from_bytes(meta[128:136], "little")
    page = raw[main * 4096 : (main + 1) * 4096]
    at = page.find(DB_MANIFESTS)
    if at < 0 or not page[10] & 0x2:  # P_LEAF
        return False
    root = int.from_bytes(page[at + len(DB_MANIFESTS) + 40 : at + len(DB_MANIFESTS) + 48], "little")
    with open(data, "r+b") as f:
        f.seek(root * 4096)
        f.write(bytes(4096))
    return True


def test_damage_found_as_a_server_opens_a_cache_that_cannot_be_moved_aside_costs_no_read(
    registry, erofs_images, tmp_path
):
    """Tried: a cache on a mount point (so a damaged cache cannot be renamed aside) holding
    a prefetched image, then the root page of the records kept beside the manifests
    zeroed (found only once read, as the next open reads them), then ``serve`` of
    another image from it. Must hold: the server goes on without the cache, as one that
    finds damage while serving does: ready, every byte read right, a clean stop, one
    warning that it goes on without it. Before, the open exited 8 right after that
    warning had said the process goes on without the cache."""
    small = push_erofs(registry.host, "damage/opened-a", "v1", [erofs_images.small.path])
    large = push_erofs(registry.host, "damage/opened-b", "v1", [erofs_images.large.path])
    with small_disk(tmp_path / "volume", "256M") as cache:
        where = ["--insecure", "--cache-dir", str(cache)]
        assert blockstore("prefetch", small, *where).returncode == 0
        assert manifests_root_zeroed(cache / "data.mdb")
        args = [large, *where, "--no-trace", "--listen", "127.0.0.1:0"]
        with serving(*args) as (proc, exports):
            out = tmp_path / "copy.img"
            copied = subprocess.run(
                ["nbdcopy", exports[""], str(out)], capture_output=True, timeout=120
            )
            assert stop(proc) == 0
            log = proc.stderr.read()
    assert copied.returncode == 0, copied.stderr.decode() + log
    assert filecmp.cmp(out, erofs_images.large.path, shallow=False)
    assert len([line for line in log.splitlines() if "goes on without it" in line]) == 1, log
    assert "what it holds is served from it" not in log, log  # it serves nothing from it
    assert "Traceback" not in log, log
