"""How far a warm hit's own work is from the least any checked read can cost, in process.

Each read size is read over a warm random blob, the blob whole, in turns:
through ``hold_cached`` (the server's hit: lookups, checks, bookkeeping), then
as the least that serves checked bytes: the chunks' lookups and their checks
alone, in one read transaction, with no bookkeeping; then the lookups alone.
The best of ``--rounds`` passes is printed per read: what ``hold_cached``
adds over the floor is what any rework of its bookkeeping can win, and the
floor (lookups, and hashing the bytes from memory) is what a Python server
pays before its first system call, however lean its protocol code.

    .venv/bin/python -m bench.hit_floor [--size-mib 256] [--rounds 15]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.inprocess import warm_random_blob
from blockstore.cache import CHUNK_SIZE, CachedBlob, ChunkStore
from blockstore.cache.integrity import blob_seed, checked_chunks

READ_SIZES = (256 << 10, 128 << 10, CHUNK_SIZE)


def per_read_us(read: Callable[[int, int], None], size: int, read_size: int) -> float:
    """Microseconds per read of one sequential pass over ``size`` bytes."""
    offsets = range(0, size - size % read_size, read_size)
    started = time.perf_counter()
    for offset in offsets:
        read(offset, read_size)
    return (time.perf_counter() - started) / len(offsets) * 1e6


def readers(store: ChunkStore, blob: CachedBlob) -> dict[str, Callable[[int, int], None]]:
    """The three ways of reading, each taking (offset, length) of whole chunks."""
    blob_id = store.lookup(blob.digest).blob_id  # type: ignore[union-attr]
    seed = blob_seed(blob.digest)

    def hold(offset: int, length: int) -> None:
        held = blob.hold_cached(offset, length)
        if held is None:
            raise SystemExit(f"hit-floor: no hit at {offset}: the blob is not warm")
        held[1]()

    def checked(offset: int, length: int) -> None:
        first = offset // CHUNK_SIZE
        values, txn = store.read_chunks(blob_id, first, first + length // CHUNK_SIZE - 1)
        try:
            if checked_chunks(values, seed, first) is None:
                raise SystemExit(f"hit-floor: a chunk at {offset} fails its check")
        finally:
            store.end_read(txn)

    def looked_up(offset: int, length: int) -> None:
        first = offset // CHUNK_SIZE
        _, txn = store.read_chunks(blob_id, first, first + length // CHUNK_SIZE - 1)
        store.end_read(txn)

    return {"hold_cached": hold, "lookups and checks": checked, "lookups": looked_up}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=256, help="size of the blob")
    parser.add_argument("--rounds", type=int, default=15, help="passes of each way and size")
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory(prefix="hit-floor-") as scratch,
        warm_random_blob(Path(scratch), args.size_mib) as (image, store),
    ):
        blob = CachedBlob(store, image.digest, image.size, None)
        ways = readers(store, blob)
        print(f"{args.size_mib} MiB warm blob, best of {args.rounds} passes, us per read:")
        print("| read | " + " | ".join(ways) + " | hold_cached ÷ floor |")
        print("|---|" + "---|" * (len(ways) + 1))
        for read_size in READ_SIZES:
            best = {name: float("inf") for name in ways}
            for _ in range(args.rounds):
                for name, read in ways.items():
                    best[name] = min(best[name], per_read_us(read, image.size, read_size))
            cells = " | ".join(f"{best[name]:.1f}" for name in ways)
            floor = best["lookups and checks"]
            print(f"| {read_size >> 10} KiB | {cells} | {best['hold_cached'] / floor:.2f} |")
        blob.close()


if __name__ == "__main__":
    main()
