"""What indexing a tar layer of many small files costs in memory and time.

    .venv/bin/python -m bench.tar_index_memory [--entries N] [--runs R]

Writes a tar (and its ``gzip -6``) of ``N`` entries shaped like a layer of
``node_modules``: directories of a few dozen files with names of realistic
lengths, a symlink every 40 entries, a hard link every 500, xattrs on every
200th file, a few bytes of data each. Each is then indexed by the code a
server runs (``index_plain_tar`` over range reads, ``index_compressed_tar`` over
the blob), each run in an interpreter of its own, which reports its peak
resident memory above what it held before indexing, its tracemalloc peak (a
second run: tracing slows it) and its time. Printed as a Markdown table.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import tracemalloc
from pathlib import Path

WORDS = [
    "array",
    "buffer",
    "compile",
    "config",
    "core",
    "debug",
    "define",
    "event",
    "format",
    "handler",
    "index",
    "inspect",
    "iterator",
    "loader",
    "module",
    "parser",
    "plugin",
    "promise",
    "render",
    "resolve",
    "runtime",
    "schema",
    "stream",
    "string",
    "transform",
    "utils",
    "validate",
    "visitor",
    "webpack",
]
FILES_PER_DIRECTORY = 40


def _entry_name(number: int) -> str:
    """A path of realistic length: ``node_modules/@scope/package-words/lib/word-word.js``."""
    package, inside = divmod(number, FILES_PER_DIRECTORY * 5)
    folder, file = divmod(inside, FILES_PER_DIRECTORY)
    first, second = WORDS[package % len(WORDS)], WORDS[(package // len(WORDS)) % len(WORDS)]
    scope = f"@{WORDS[package % 7]}/" if package % 3 == 0 else ""
    words = f"{WORDS[file % len(WORDS)]}-{WORDS[(file * 7 + folder) % len(WORDS)]}"
    return f"node_modules/{scope}{first}-{second}-{package}/lib/part{folder}/{words}-{file}.js"


def _member(number: int, name: str) -> tuple[tarfile.TarInfo, bytes]:
    """Entry ``number``: a file mostly, else a symlink or a hard link to the file before."""
    info = tarfile.TarInfo(name)
    info.mtime, info.mode, info.uid, info.gid = 1_700_000_000 + number % 1000, 0o644, 1000, 1000
    if number % 40 == 39:
        info.type, info.linkname = tarfile.SYMTYPE, f"../part0/{WORDS[number % len(WORDS)]}.js"
        return info, b""
    if number % 500 == 499:
        info.type, info.linkname = tarfile.LNKTYPE, _entry_name(number - 1)
        return info, b""
    if number % 200 == 0:
        info.pax_headers = {"SCHILY.xattr.user.origin": f"registry.npmjs.org/{number % 97}"}
    data = name.encode()[-(number % 64) :]
    info.size = len(data)
    return info, data


def write_many_entries_tar(path: Path, entries: int) -> None:
    """A PAX tar of ``entries`` members (files, symlinks, hard links, a few xattrs),
    each directory written before what it holds, as ``tar`` writes a tree."""
    made: set[str] = set()
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as archive:
        for number in range(entries):
            name = _entry_name(number)
            parent = name.rpartition("/")[0]
            if parent not in made:
                for depth in range(1, parent.count("/") + 2):
                    directory = "/".join(parent.split("/")[:depth])
                    if directory not in made:
                        made.add(directory)
                        info = tarfile.TarInfo(directory)
                        info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 1_700_000_000
                        archive.addfile(info)
            info, data = _member(number, name)
            archive.addfile(info, io.BytesIO(data))


def gzip_file(source: Path, target: Path) -> None:
    with source.open("rb") as raw, gzip.GzipFile(target, "wb", 6, mtime=0) as out:
        shutil.copyfileobj(raw, out, 1 << 20)


def count_entries(path: Path) -> int:
    with tarfile.open(path) as archive:
        return sum(1 for _ in archive)


def index_layer(path: Path) -> bytes:
    """The metadata image of the layer at ``path`` (a tar, or a tar.gz by its name), built
    as a server builds it: a plain tar by range reads, a compressed one in one pass."""
    from blockstore.registry.mediatypes import GZIP
    from blockstore.tarlayer.layerindex import index_compressed_tar, index_plain_tar

    with path.open("rb") as blob:
        if path.suffix == ".gz":
            index = index_compressed_tar(blob, GZIP, blob_digest=None, diff_id=None)
        else:
            size = os.fstat(blob.fileno()).st_size
            index = index_plain_tar(lambda at, n: os.pread(blob.fileno(), n, at), size, "")
    return index.metadata


def _peak_resident() -> int:
    """This program's peak resident memory: ``VmHWM``, where ``ru_maxrss`` would keep
    the peak of the process that started it (Linux carries it across ``exec``)."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) << 10


def measure(path: Path, traced: bool) -> dict[str, float]:
    """One indexing of ``path`` in this process: bytes of peak memory it added (resident,
    or traced by tracemalloc), seconds taken and seconds of CPU (the fairer figure on a
    busy machine)."""
    import blockstore.tarlayer.layerindex  # noqa: F401  (imported before the baseline)

    before = _peak_resident()
    if traced:
        tracemalloc.start()
    start, cpu = time.perf_counter(), time.process_time()
    index_layer(path)
    times = {"seconds": time.perf_counter() - start, "cpu": time.process_time() - cpu}
    if traced:
        return {"traced": tracemalloc.get_traced_memory()[1]} | times
    return {"rss": _peak_resident() - before} | times


def measured_apart(path: Path, traced: bool) -> dict[str, float]:
    """``measure`` in an interpreter of its own, so that no earlier peak hides this one."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.tar_index_memory", "--measure", str(path)]
        + (["--traced"] if traced else []),
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--entries", type=int, default=200_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--traced", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure is not None:
        print(json.dumps(measure(args.measure, args.traced)))
        return
    with tempfile.TemporaryDirectory(prefix="tar-index-memory-") as scratch:
        tar = Path(scratch) / "layer.tar"
        write_many_entries_tar(tar, args.entries)
        gzip_file(tar, tar.with_suffix(".tar.gz"))
        entries = count_entries(tar)
        print(f"{entries} entries, tar {tar.stat().st_size >> 20} MiB\n")
        print("| layer | RSS added MiB | B/entry | traced peak MiB | B/entry | CPU s | s |")
        print("|---|---|---|---|---|---|---|")
        for layer in (tar, tar.with_suffix(".tar.gz")):
            runs = [measured_apart(layer, traced=False) for _ in range(args.runs)]
            rss = statistics.median(r["rss"] for r in runs)
            cpu = statistics.median(r["cpu"] for r in runs)
            seconds = statistics.median(r["seconds"] for r in runs)
            traced = measured_apart(layer, traced=True)["traced"]
            print(
                f"| {layer.name} | {rss / 2**20:.0f} | {rss / entries:.0f} |"
                f" {traced / 2**20:.0f} | {traced / entries:.0f} | {cpu:.1f} | {seconds:.1f} |"
            )


if __name__ == "__main__":
    main()
