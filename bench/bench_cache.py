"""Warm in-process reads through the chunk cache.

Fills a cache with a 256 MiB blob from a local file, then reads it whole,
sequentially, in 4 KiB, 128 KiB and 1 MiB reads, every byte served from
LMDB with its checksum checked, both through ``read`` and through
``read_cached`` (the server's hit path), on an export with a source, so
readahead runs as it does when serving. Prints the median MiB/s of
``--repeats`` runs per read size.

    .venv/bin/python bench/bench_cache.py [--size-mib 256] [--dir DIR] [--repeats 3]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from blockstore.cache import CachedBlob, ChunkStore
from blockstore.source import LocalFileSource


def make_blob(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    with path.open("wb") as f:
        block = os.urandom(1 << 20)
        for i in range(size >> 20):
            piece = block[i % 7 :] + block[: i % 7]  # not all chunks alike
            f.write(piece)
            digest.update(piece)
    return "sha256:" + digest.hexdigest()


def warm_rate(
    read: Callable[[int, int], object], size: int, read_size: int, seconds: float
) -> float:
    """MiB/s of whole sequential passes over the blob, for at least ``seconds``."""
    done = 0
    t0 = time.perf_counter()
    while True:
        for offset in range(0, size, read_size):
            read(offset, read_size)
        done += size
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            return done / elapsed / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--dir", type=Path, default=None, help="where to put the blob and cache")
    parser.add_argument("--seconds", type=float, default=1.0, help="minimum time per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per read size (median kept)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-cache-", dir=args.dir))
    try:
        size = args.size_mib << 20
        blob_path = work / "blob"
        digest = make_blob(blob_path, size)
        source = LocalFileSource(blob_path, digest)
        store = ChunkStore(work / "cache", size_cap=4 * size)
        blob = CachedBlob(store, digest, size, source)
        t0 = time.perf_counter()
        blob.prefetch()
        fill = time.perf_counter() - t0
        rate = size / fill / 2**20
        print(f"fill (fetch, store, sha256 seal) {size >> 20} MiB: {rate:8.0f} MiB/s")
        # Read through an export with a source, as served: readahead is live on hits.
        warm = CachedBlob(store, digest, size, source)
        for method in (warm.read, warm.read_cached):
            for read_size in (4 << 10, 128 << 10, 1 << 20):
                rate = statistics.median(
                    warm_rate(method, size, read_size, args.seconds) for _ in range(args.repeats)
                )
                print(
                    f"warm {method.__name__:11s} of {read_size >> 10:5d} KiB: "
                    f"{rate:8.0f} MiB/s ({rate * 2**20 / read_size:9.0f} reads/s)"
                )
        warm.close()
        blob.close()
        store.close()
        source.close()
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
