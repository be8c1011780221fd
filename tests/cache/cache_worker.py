"""A process that reads blobs through a shared cache and checks every byte.

Run by the crash and multi-process tests:

    python cache_worker.py CACHE_DIR --cap BYTES --seed N [--seconds T]
        [--initial-map BYTES] PATH=DIGEST...

Prints ``ready`` once it has stored something, then reads random ranges
(sometimes prefetching a whole blob, sometimes evicting) until killed or
until ``--seconds`` have passed; then prints ``ok READS`` and exits 0.
Wrong bytes exit 1 at once.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' rig

from rig.local_source import LocalFileSource

import blockstore.cache.env as cache_env
from blockstore.cache import CachedBlob, ChunkStore
from blockstore.errors import CacheError


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("cache_dir", type=Path)
    parser.add_argument("blobs", nargs="+")
    parser.add_argument("--cap", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seconds", type=float, default=None)
    parser.add_argument("--initial-map", type=int, default=None)
    args = parser.parse_args()
    if args.initial_map:
        cache_env.INITIAL_MAP_SIZE = args.initial_map
    rng = random.Random(args.seed)
    store = ChunkStore(args.cache_dir, size_cap=args.cap, flush_interval=0.05)
    blobs = []
    for spec in args.blobs:
        path, digest = spec.split("=", 1)
        data = Path(path).read_bytes()
        source = LocalFileSource(path, digest)
        blobs.append((data, CachedBlob(store, digest, len(data), source)))
    deadline = time.monotonic() + args.seconds if args.seconds else None
    reads = 0
    while deadline is None or time.monotonic() < deadline:
        data, blob = rng.choice(blobs)
        action = rng.random()
        if action < 0.05:
            with contextlib.suppress(CacheError):  # larger than the cap: fine
                blob.prefetch()
        elif action < 0.08:
            store.gc()
        else:
            offset = rng.randrange(len(data))
            length = min(len(data) - offset, rng.randrange(1, 300_000))
            got = b"".join(bytes(b) for b in blob.read(offset, length))
            if got != data[offset : offset + length]:
                print(f"WRONG BYTES at {offset}+{length}", flush=True)
                return 1
            reads += 1
        if reads == 1:
            print("ready", flush=True)
    for _, blob in blobs:
        blob.close()
    store.close()
    print(f"ok {reads}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
