"""Warm NBD read throughput: this server against ``nbdkit file`` on the same image.

Builds an EROFS image (or takes ``--image``), fills a chunk cache with it,
then serves it two ways over TCP on 127.0.0.1: this server reading the
cache offline (every read a checked cache hit), and nbdkit's file plugin
reading the image file (the C ceiling of this machine). Each is measured
with nbdcopy (default four connections, and one synchronous connection)
and fio's nbd engine (4 KiB random reads at depth 1 and 16, 1 MiB
sequential reads at depth 4), the two servers back to back, and prints
the median of each and the ratio of the medians to nbdkit.

    .venv/bin/python bench/bench_nbd.py [--size-mib 256] [--image FILE] [--seconds 3] [--repeats 5]
        [--only randread]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from blockstore.cache import CachedBlob, ChunkStore
from blockstore.source import LocalFileSource
from nbdfront.server import NBDServer

FIXED_UUID = "6e0c1a52-5a2b-4f3e-9d1c-0b10c5b0a7e1"


def build_image(work: Path, size_mib: int) -> Path:
    """An uncompressed EROFS image of about ``size_mib`` MiB of random files."""
    tree = work / "tree"
    for i in range(size_mib):
        directory = tree / f"d{i % 16:02d}"
        directory.mkdir(parents=True, exist_ok=True)
        (directory / f"f{i:05d}").write_bytes(os.urandom(1 << 20))
    image = work / "image.erofs"
    subprocess.run(
        ["mkfs.erofs", "--quiet", "-T0", "--all-root", "-U", FIXED_UUID, str(image), str(tree)],
        check=True,
    )
    shutil.rmtree(tree)
    return image


def sha256_of(path: Path) -> str:
    with path.open("rb") as f:
        return "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_nbdkit(image: Path, work: Path) -> tuple[int, str]:
    """nbdkit's file plugin, daemonised (a foreground nbdkit may be stopped by the shell)."""
    port = free_port()
    pidfile = work / "nbdkit.pid"
    subprocess.run(
        [
            "nbdkit",
            "-P",
            str(pidfile),
            "-i",
            "127.0.0.1",
            "-p",
            str(port),
            "--read-only",
            "file",
            str(image),
        ],
        check=True,
    )
    deadline = time.monotonic() + 10
    while not (pidfile.exists() and pidfile.read_text().strip()):
        if time.monotonic() > deadline:
            raise TimeoutError("nbdkit did not write its pidfile")
        time.sleep(0.05)
    return int(pidfile.read_text()), f"nbd://127.0.0.1:{port}/"


def nbdcopy_rate(uri: str, size: int, options: list[str]) -> float:
    """MiB/s of one whole-image copy to nbdcopy's null sink."""
    t0 = time.perf_counter()
    subprocess.run(["nbdcopy", *options, uri, "null:"], check=True)
    return size / (time.perf_counter() - t0) / 2**20


def fio_rate(uri: str, size: int, rw: str, bs: str, iodepth: int, seconds: float) -> float:
    """fio MiB/s over ``seconds`` of ``rw`` with block size ``bs`` at ``iodepth``."""
    result = subprocess.run(
        [
            "fio",
            "--name=bench",
            "--ioengine=nbd",
            f"--uri={uri}",
            f"--rw={rw}",
            f"--bs={bs}",
            f"--iodepth={iodepth}",
            "--readonly",
            f"--size={size}",
            f"--runtime={seconds}",
            "--time_based",
            "--output-format=json",
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    job = json.loads(result.stdout[result.stdout.index("{") :])["jobs"][0]
    return job["read"]["bw_bytes"] / 2**20


TESTS = {
    "nbdcopy, 4 connections": lambda uri, size, seconds: nbdcopy_rate(uri, size, []),
    "nbdcopy, 1 synchronous connection": lambda uri, size, seconds: nbdcopy_rate(
        uri, size, ["--connections=1", "--synchronous"]
    ),
    "fio randread 4k depth 1": lambda uri, size, s: fio_rate(uri, size, "randread", "4k", 1, s),
    "fio randread 4k depth 16": lambda uri, size, s: fio_rate(uri, size, "randread", "4k", 16, s),
    "fio read 1M depth 4": lambda uri, size, s: fio_rate(uri, size, "read", "1M", 4, s),
}


def compare(
    ours: str, theirs: str, size: int, seconds: float, repeats: int, only: list[str]
) -> None:
    """Run each test on both servers back to back, ``repeats`` times; print the medians.

    Interleaving keeps both sides under the same load when other work shares
    the machine; medians keep one lucky or disturbed run from deciding.
    """
    print(f"{'':36s} {'blockstore':>12s} {'nbdkit file':>12s} {'ratio':>7s}")
    for name, test in TESTS.items():
        if only and not any(word in name for word in only):
            continue
        ours_runs, theirs_runs = [], []
        for _ in range(repeats):
            ours_runs.append(test(ours, size, seconds))
            theirs_runs.append(test(theirs, size, seconds))
        mine, nbdkit = statistics.median(ours_runs), statistics.median(theirs_runs)
        print(f"{name:36s} {mine:8.0f} MiB/s {nbdkit:6.0f} MiB/s {mine / nbdkit:7.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=256, help="size of the image to build")
    parser.add_argument("--image", type=Path, default=None, help="use this image instead")
    parser.add_argument("--seconds", type=float, default=3.0, help="fio run time per test")
    parser.add_argument("--repeats", type=int, default=5, help="runs per test (median is kept)")
    parser.add_argument(
        "--only", action="append", default=[], help="run only tests whose name contains this"
    )
    parser.add_argument("--dir", type=Path, default=None, help="where to put image and cache")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-nbd-", dir=args.dir))
    nbdkit_pid = None
    try:
        image = args.image or build_image(work, args.size_mib)
        size = image.stat().st_size
        digest = sha256_of(image)
        source = LocalFileSource(image, digest)
        store = ChunkStore(work / "cache", size_cap=4 * size)
        CachedBlob(store, digest, size, source).prefetch()
        warm = CachedBlob(store, digest, size, None, name="image")  # offline: hits only
        server = NBDServer({"image": warm}, tcp=("127.0.0.1", 0), default_export="image")
        server.start()
        nbdkit_pid, nbdkit_uri = start_nbdkit(image, work)
        print(f"image: {size / 2**20:.0f} MiB, {os.cpu_count()} CPUs")
        compare(server.uri(""), nbdkit_uri, size, args.seconds, args.repeats, args.only)
        server.shutdown()
        warm.close()
        store.close()
        source.close()
    finally:
        if nbdkit_pid is not None:
            os.kill(nbdkit_pid, signal.SIGTERM)
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
