"""Cold mount-and-use of an ordinary tar.gz image, against pulling and extracting it whole.

    sudo .venv/bin/python -m bench.tar_figures [--size MIB] [--runs N] [--rtt MS] [--mbit M]

A real tree of this machine (the harness's ``copy_tree``) is archived with
GNU tar, compressed with ``gzip -6`` and pushed as a one-layer OCI image to a
local registry behind the harness's emulated link. Each run starts from
nothing on this side of the link:

- ``pull+extract``: the blob in one GET (curl), then ``tar -xzf`` (gunzip and
  untar), then ``find`` and a seeded fifth of the files read;
- ``engine``: ``blockstore serve`` on an empty cache, the export mounted as
  ``blockstore mount`` does, then the same ``find`` and reads; the layer's
  index is built on this side, so the whole blob is read first;
- ``engine+shared-index``: the same after ``blockstore index --push`` has
  attached the layer's index to the image (done once, not timed).

Reported per system: the median of the runs for the first ``find`` line
(first listing), the time to done, and the bytes that crossed the link.
The results are printed as a Markdown table and written as JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.images import copy_tree
from bench.link import LinkProxy, wan
from bench.processes import BenchError, Daemon
from bench.workloads import SEED, listing, read_files
from blockstore.localregistry import LocalRegistry
from blockstore.registry import RegistryClient, RegistryOptions
from blockstore.registry.push import push_image
from nbdfront.mount import attach, syscall

MiB = 1 << 20
REPOSITORY = "bench/targz"
GZIP_MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"
BLOCKSTORE = [sys.executable, "-m", "blockstore", "-q"]
TAR_FLAGS = ["--format=posix", "--numeric-owner", "--sort=name", "--mtime=@0"]


def build_image(workdir: Path, size: int, registry_host: str) -> tuple[str, Path, int]:
    """Archive a real tree of about ``size`` bytes as tar.gz and push it;
    (reference, the blob's file, the tar's size)."""
    tree = workdir / "tree"
    tree.mkdir()
    copy_tree(tree, size)
    tar = workdir / "layer.tar"
    subprocess.run(["tar", *TAR_FLAGS, "-cf", str(tar), "-C", str(tree), "."], check=True)
    blob = workdir / "layer.tar.gz"
    with blob.open("wb") as out:
        subprocess.run(["gzip", "-6", "-n", "-c", str(tar)], stdout=out, check=True)
    client = RegistryClient(registry_host, RegistryOptions(insecure=True))
    try:
        push_image(client, REPOSITORY, "v1", [blob], media_type=GZIP_MEDIA_TYPE)
    finally:
        client.close()
    return f"{registry_host}/{REPOSITORY}:v1", blob, tar.stat().st_size


def use(root: Path, started: float) -> dict:
    """``find`` the tree, read a seeded fifth of its files: seconds since ``started``."""
    first, files = listing(root)
    read = read_files(random.Random(SEED).sample(files, len(files) // 5))
    return {
        "first listing s": first - started,
        "done s": time.perf_counter() - started,
        "files": len(files),
        "bytes read": read,
    }


def pull_and_extract(work: Path, blob_url: str) -> dict:
    started = time.perf_counter()
    blob = work / "blob.tar.gz"
    subprocess.run(["curl", "-sSf", "-o", str(blob), blob_url], check=True)
    root = work / "rootfs"
    root.mkdir()
    subprocess.run(["tar", "-xzf", str(blob), "-C", str(root)], check=True)
    return use(root, started)


def engine(work: Path, reference: str, extra: list[str]) -> dict:
    started = time.perf_counter()
    serve = ["serve", reference, "--insecure", "--listen", "127.0.0.1:0", *extra]
    daemon = Daemon([*BLOCKSTORE, *serve, "--cache-dir", str(work / "cache")], work / "serve.log")
    try:
        uri = daemon.wait_for_line('export "" ', timeout=600).split()[-1]
        mnt = work / "mnt"
        mnt.mkdir()
        attached = attach.attach(uri, "", work, work / "attach.log", attach.choose_method())
        try:
            syscall.mount(attached.device, str(mnt), "erofs")
            try:
                return use(mnt, started)
            finally:
                syscall.umount(str(mnt))
        finally:
            attach.detach(attached)
    finally:
        daemon.stop()


def measure(name: str, runs: int, link: LinkProxy, run: Callable[[Path], dict]) -> dict:
    """``runs`` runs, each in a fresh directory: the medians of every figure they report,
    with the bytes and requests that crossed the link, and the runs themselves."""
    samples = []
    for i in range(runs):
        work = Path(tempfile.mkdtemp(prefix="sidefig-"))
        try:
            before = link.traffic()
            got = run(work)
            moved = link.traffic() - before
            got.update({"bytes fetched": moved.down, "requests": moved.requests})
        finally:
            shutil.rmtree(work, ignore_errors=True)
        print(f"  {name} run {i + 1}: {json.dumps(got)}", file=sys.stderr)
        samples.append(got)
    medians = {key: statistics.median(s[key] for s in samples) for key in samples[0]}
    return {"system": name, "runs": samples, **medians}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64, help="tree size in MiB (default 64)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rtt", type=float, default=20.0, help="round-trip time, ms")
    parser.add_argument("--mbit", type=float, default=1000.0, help="bandwidth cap, Mbit/s")
    parser.add_argument(
        "--serve-arg",
        action="append",
        default=[],
        help="an option for blockstore serve (repeatable), e.g. --serve-arg=--fill",
    )
    parser.add_argument("--json", type=Path, default=Path("tar-figures.json"))
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="tarfig-"))
    registry = LocalRegistry(workdir / "registry")
    registry.start()
    link = LinkProxy(registry.port, wan(args.rtt, args.mbit))
    link.start()
    try:
        ref, blob, tar_size = build_image(workdir, args.size * MiB, registry.host)
        blob_size = blob.stat().st_size
        reference = ref.replace(registry.host, link.host)
        print(f"tar {tar_size / MiB:.1f} MiB, tar.gz {blob_size / MiB:.1f} MiB", file=sys.stderr)
        digest = "sha256:" + hashlib.sha256(blob.read_bytes()).hexdigest()
        url = f"http://{link.host}/v2/{REPOSITORY}/blobs/{digest}"
        cold = lambda w: engine(w, reference, args.serve_arg)  # noqa: E731
        rows = [
            measure("pull+extract", args.runs, link, lambda w: pull_and_extract(w, url)),
            measure("engine", args.runs, link, cold),
        ]
        pushed = subprocess.run(
            [*BLOCKSTORE, "index", "--push", "--insecure", "--cache-dir", str(workdir / "x"), ref],
            capture_output=True,
            text=True,
        )
        if pushed.returncode != 0:
            raise BenchError(f"blockstore index --push failed: {pushed.stderr.strip()}")
        rows.append(measure("engine+shared-index", args.runs, link, cold))
    finally:
        link.stop()
        registry.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    base = rows[0]["done s"]
    print(
        f"\ntar.gz image: tar {tar_size / MiB:.1f} MiB, blob {blob_size / MiB:.1f} MiB; "
        f"{args.rtt:g} ms RTT, {args.mbit:g} Mbit/s; median of {args.runs}\n"
    )
    print("| system | first listing s | done s | done / pull | MiB fetched |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['system']} | {row['first listing s']:.2f} | {row['done s']:.2f} "
            f"| {row['done s'] / base:.2f} | {row['bytes fetched'] / MiB:.1f} |"
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {
                "tar bytes": tar_size,
                "blob bytes": blob_size,
                "rtt ms": args.rtt,
                "mbit": args.mbit,
                "runs": args.runs,
                "rows": rows,
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
