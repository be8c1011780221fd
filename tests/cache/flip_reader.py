"""Flip bits in a copy of a cache's LMDB file, one at a time, and read everything back.

    python flip_reader.py PRISTINE_DIR WORK_DIR --kind tree|keys|values|records --seed N
        --flips N PATH=DIGEST...

For each flip: copy the pristine cache to a fresh directory, flip one bit at
an offset drawn (seeded) from the ranges of that kind, open the cache
offline and read every blob in 32 KiB and 4 KiB reads. Each read must give
the right bytes or fail with an error (EIO, a cache error); a wrong byte
exits 1 at once. Prints a line before each flip, so a death by a signal
names its flip, and ``ok RIGHT FAILED OPEN_REFUSED`` at the end.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lmdb_pages import regions

from blockstore.cache import CachedBlob, ChunkStore
from blockstore.errors import BlockstoreError


def read_all(cache: Path, blobs: list[tuple[bytes, str]]) -> tuple[int, int]:
    right = failed = 0
    with ChunkStore(cache, offline=True) as store:
        for data, digest in blobs:
            blob = CachedBlob(store, digest, len(data), None)
            for step in (32768, 4096):
                for offset in range(0, len(data), step):
                    try:
                        got = b"".join(bytes(b) for b in blob.read(offset, step))
                    except OSError:
                        failed += 1
                        continue
                    if got != data[offset : offset + step]:
                        print(f"WRONG BYTES at {digest} {offset}+{step}", flush=True)
                        sys.exit(1)
                    right += 1
            blob.close()
        store.verify()
    return right, failed


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("pristine", type=Path)
    parser.add_argument("work", type=Path)
    parser.add_argument("blobs", nargs="+")
    parser.add_argument("--kind", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--flips", type=int, default=20)
    args = parser.parse_args()
    blobs = []
    for spec in args.blobs:
        path, digest = spec.split("=", 1)
        blobs.append((Path(path).read_bytes(), digest))
    ranges = regions(args.pristine / "data.mdb")[args.kind]
    if not ranges:
        print(f"no {args.kind} in the file", flush=True)
        return 2
    rng = random.Random(args.seed)
    right = failed = refused = 0
    for n in range(args.flips):
        start, end = rng.choice(ranges)
        offset, bit = rng.randrange(start, end), rng.randrange(8)
        print(f"flip {n}: {args.kind} byte {offset} bit {bit}", flush=True)
        cache = args.work / f"flip{n}"
        shutil.copytree(args.pristine, cache)
        with open(cache / "data.mdb", "r+b") as f:
            f.seek(offset)
            byte = f.read(1)[0]
            f.seek(offset)
            f.write(bytes([byte ^ (1 << bit)]))
        try:
            r, e = read_all(cache, blobs)
            right, failed = right + r, failed + e
        except BlockstoreError as exc:  # refused whole: damaged, moved aside
            print(f"  refused: {exc}", flush=True)
            refused += 1
        for path in args.work.glob(f"flip{n}*"):
            shutil.rmtree(path)
    print(f"ok {right} {failed} {refused}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
