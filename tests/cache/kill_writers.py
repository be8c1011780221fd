"""SIGKILL a cache writer in the middle of heavy writes, many times in a row, then check.

    python kill_writers.py CACHE_DIR [--rounds 100] [--seed N]

Each round forks a child that opens the cache and stores, evicts, seals,
pins and removes chunks of a few blobs as fast as it can (small commits,
under a small size cap); the parent kills it with SIGKILL at a random
moment within its first 50 ms of writing. A child that died of anything
else fails the run. After the last round the cache must open, ``verify``
must find nothing bad or inconsistent, and every cached byte must be the
blob's. Prints ``ok ROUNDS``; exits 1 on the first problem.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import signal
import sys
import time
from pathlib import Path

from blockstore.cache import CHUNK_SIZE, CachedBlob, ChunkStore
from blockstore.errors import CacheError, NotCached

SIZES = (40 * CHUNK_SIZE + 123, 24 * CHUNK_SIZE, 9 * CHUNK_SIZE + 1)
CAP = 48 * CHUNK_SIZE


def make_blobs(seed: int) -> list[tuple[bytes, str]]:
    rng = random.Random(seed)
    blobs = []
    for size in SIZES:
        data = rng.randbytes(size)
        blobs.append((data, "sha256:" + hashlib.sha256(data).hexdigest()))
    return blobs


def write_forever(cache_dir: Path, blobs, seed: int, started: int) -> None:
    """The child: small, varied commits without end."""
    rng = random.Random(seed)
    store = ChunkStore(cache_dir, size_cap=CAP, flush_interval=0.005)
    os.write(started, b"w")
    while True:
        data, digest = rng.choice(blobs)
        chunks = (len(data) + CHUNK_SIZE - 1) // CHUNK_SIZE
        action = rng.random()
        try:
            if action < 0.75:
                first = rng.randrange(chunks)
                last = min(chunks, first + rng.randint(1, 4))
                pieces = [data[i * CHUNK_SIZE : (i + 1) * CHUNK_SIZE] for i in range(first, last)]
                store.store_chunks(digest, len(data), first, pieces)
            elif action < 0.85:
                store.seal(digest)
            elif action < 0.9:
                store.remove(digest)
            elif action < 0.95:
                store.pin(digest, len(data)) if rng.random() < 0.5 else store.unpin(digest)
            else:
                store.gc()
        except CacheError:
            pass  # e.g. unpinning a blob just removed


def check(cache_dir: Path, blobs) -> str | None:
    """What is wrong with the cache after the kills, or None."""
    with ChunkStore(cache_dir) as store:
        report = store.verify()
        if not report.ok or report.repaired_records or report.orphan_chunks:
            return f"verify: {report}"
        for data, digest in blobs:
            blob = CachedBlob(store, digest, len(data), None)
            for offset in range(0, len(data), CHUNK_SIZE):
                length = min(CHUNK_SIZE, len(data) - offset)
                try:
                    got = b"".join(bytes(b) for b in blob.read(offset, length))
                except NotCached:
                    continue
                if got != data[offset : offset + CHUNK_SIZE]:
                    return f"wrong bytes in {digest} at {offset}"
            blob.close()
    return None


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("cache_dir", type=Path)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    blobs = make_blobs(args.seed)
    rng = random.Random(args.seed)
    for round_ in range(args.rounds):
        started, ready = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(started)
            try:
                write_forever(args.cache_dir, blobs, args.seed * 1000 + round_, ready)
            finally:
                os._exit(3)
        os.close(ready)
        began = os.read(started, 1)
        os.close(started)
        if began:
            time.sleep(rng.uniform(0.0, 0.05))
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        if not os.WIFSIGNALED(status) or os.WTERMSIG(status) != signal.SIGKILL:
            print(f"round {round_}: the writer ended by itself: status {status}", flush=True)
            return 1
    problem = check(args.cache_dir, blobs)
    if problem:
        print(problem, flush=True)
        return 1
    print(f"ok {args.rounds}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
