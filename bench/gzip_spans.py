"""Every span of an eStargz-like tar.gz layer inflated in this process, against a baseline.

    .venv/bin/python -m bench.gzip_spans --baseline <checkout> [--size MIB] [--runs N]

A real tree of this machine (the harness's ``copy_tree``) is archived with
GNU tar and compressed one gzip member per tar entry, a big file's cut every
4 MiB (as eStargz writes it), so nearly every 4 MiB span crosses members'
seams. The layer is indexed once. Each round then reads every span with
``read_span`` from the blob in memory, once by this checkout and once by the
baseline's, each in an interpreter of its own started for the round (its
start-up and the blob's loading not timed), taking turns. Printed: each
side's seconds by round, the medians, and the median of the rounds' ratios.
"""

from __future__ import annotations

import argparse
import io
import itertools
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import zlib
from pathlib import Path

from bench.images import copy_tree
from blockstore.tarlayer.gzindex import GzipIndexer

MiB = 1 << 20
PIECE = 4 * MiB
TAR_FLAGS = ["--format=posix", "--numeric-owner", "--sort=name", "--mtime=@0"]
TIMED = """
import sys, time
from blockstore.tarlayer.gzindex import Zinfo, read_span
blob = open(sys.argv[1], "rb").read()
zinfo = Zinfo.from_bytes(open(sys.argv[2], "rb").read())
ends = [p.uncompressed for p in zinfo.checkpoints[1:]] + [int(sys.argv[3])]
read = lambda o, n: blob[o : o + n]
started = time.perf_counter()
for i, (point, end) in enumerate(zip(zinfo.checkpoints, ends)):
    length = end - point.uncompressed
    assert len(read_span(read, len(blob), zinfo, i, length)) == length
print(time.perf_counter() - started)
"""


def member_per_entry(tar: bytes) -> list[bytes]:
    """``tar`` as gzip members, one per entry (header and data), data cut every ``PIECE``."""
    cuts = {0, len(tar)}
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        for entry in archive:
            cuts.add(entry.offset)
            cuts.update(range(entry.offset_data + PIECE, entry.offset_data + entry.size, PIECE))
    bounds = sorted(cuts)
    members = []
    for start, end in itertools.pairwise(bounds):
        deflate = zlib.compressobj(6, zlib.DEFLATED, 31)
        members.append(deflate.compress(tar[start:end]) + deflate.flush())
    return members


def timed(checkout: Path, blob: Path, zinfo: Path, size: int) -> float:
    done = subprocess.run(
        [sys.executable, "-c", TIMED, str(blob), str(zinfo), str(size)],
        cwd=checkout,
        env={**os.environ, "PYTHONPATH": str(checkout)},
        capture_output=True,
        text=True,
        check=True,
    )
    return float(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, required=True, help="a checkout to compare with")
    parser.add_argument("--size", type=int, default=64, help="MiB of tree to archive")
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    here = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory(prefix="gzip-spans-") as work:
        tree = Path(work, "tree")
        copy_tree(tree, args.size * MiB)
        tar = subprocess.run(
            ["tar", *TAR_FLAGS, "-C", str(tree), "-cf", "-", "."], capture_output=True, check=True
        ).stdout
        members = member_per_entry(tar)
        blob = b"".join(members)
        zinfo, size = GzipIndexer(io.BytesIO(blob)).finish()
        blob_path, zinfo_path = Path(work, "layer.gz"), Path(work, "layer.zinfo")
        blob_path.write_bytes(blob)
        zinfo_path.write_bytes(zinfo.to_bytes())
        print(
            f"{size / MiB:.1f} MiB tar, {len(blob) / MiB:.1f} MiB blob, "
            f"{len(members)} gzip members, {len(zinfo.checkpoints)} spans"
        )
        rounds: dict[str, list[float]] = {"this checkout": [], "baseline": []}
        for _ in range(args.runs):
            rounds["this checkout"].append(timed(here, blob_path, zinfo_path, size))
            rounds["baseline"].append(timed(args.baseline, blob_path, zinfo_path, size))
    for name, seconds in rounds.items():
        by_round = ", ".join(f"{s:.3f}" for s in seconds)
        print(f"{name}: {by_round} s; median {statistics.median(seconds):.3f} s")
    ratios = [b / a for a, b in zip(rounds["this checkout"], rounds["baseline"], strict=True)]
    print(f"baseline ÷ this checkout, median of the rounds: {statistics.median(ratios):.2f}x")


if __name__ == "__main__":
    main()
