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
- ``engine+shared-index``: the same layer pushed as a second image, to which
  ``blockstore index --push`` has attached the layer's index (done once, not
  timed).

The systems take turns, one run each per round, so a change in the machine's
load weighs on all of them alike.

Reported per system: the median of the runs for the first ``find`` line
(first listing), the time to done (also as the median of each round's own
ratio to the pull's), and the bytes that crossed the link; for the engine,
the CPU time ``serve`` used until done.
For the engine, also when ``serve`` said ``ready``: it prints that once every
layer's index is available (taken from the registry and checked, or built
here) and its socket listens, so "listing after ready" is the mount, the
kernel's first metadata reads and ``find``'s first line, measured from a
real event. The results are printed as a Markdown table and written as JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
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
from bench.processes import BenchError, Daemon, compile_engine, engine_environment
from bench.workloads import listing, read_files, seeded_fifth
from blockstore.localregistry import LocalRegistry
from blockstore.registry import RegistryClient, RegistryOptions
from blockstore.registry.mediatypes import OCI_TAR_GZIP
from blockstore.registry.push import push_image
from nbdfront.mount import attach, syscall

MiB = 1 << 20
REPOSITORY = "bench/targz"
INDEXED_REPOSITORY = "bench/targz-indexed"
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
        push_image(client, REPOSITORY, "v1", [blob], media_type=OCI_TAR_GZIP)
    finally:
        client.close()
    return f"{registry_host}/{REPOSITORY}:v1", blob, tar.stat().st_size


def push_indexed(blob: Path, registry_host: str) -> str:
    """The same layer as a second image, with its tar index attached by ``blockstore
    index --push`` (done once, not timed); the first image keeps none."""
    client = RegistryClient(registry_host, RegistryOptions(insecure=True))
    try:
        push_image(client, INDEXED_REPOSITORY, "v1", [blob], media_type=OCI_TAR_GZIP)
    finally:
        client.close()
    ref = f"{registry_host}/{INDEXED_REPOSITORY}:v1"
    with tempfile.TemporaryDirectory(prefix="tarfig-index-") as cache:
        pushed = subprocess.run(
            [*BLOCKSTORE, "index", "--push", "--insecure", "--cache-dir", cache, ref],
            capture_output=True,
            text=True,
        )
    if pushed.returncode != 0:
        raise BenchError(f"blockstore index --push failed: {pushed.stderr.strip()}")
    return ref


def use(root: Path, started: float, ready: float | None = None) -> dict:
    """``find`` the tree, read a seeded fifth of its files: seconds since ``started``
    (and the first listing since ``ready``, when the server said so)."""
    first, files = listing(root)
    read = read_files(seeded_fifth(files))
    got = {
        "first listing s": first - started,
        "done s": time.perf_counter() - started,
        "files": len(files),
        "bytes read": read,
    }
    if ready is not None:
        got |= {"ready s": ready - started, "listing after ready s": first - ready}
    return got


def pull_and_extract(work: Path, blob_url: str) -> dict:
    started = time.perf_counter()
    blob = work / "blob.tar.gz"
    subprocess.run(["curl", "-sSf", "-o", str(blob), blob_url], check=True)
    root = work / "rootfs"
    root.mkdir()
    subprocess.run(["tar", "-xzf", str(blob), "-C", str(root)], check=True)
    return use(root, started)


def engine(work: Path, reference: str, extra: list[str], checkout: Path | None = None) -> dict:
    """``checkout``: run the engine of that source tree instead of this one."""
    started = time.perf_counter()
    serve = ["serve", reference, "--insecure", "--listen", "127.0.0.1:0", *extra]
    argv = [*BLOCKSTORE, *serve, "--cache-dir", str(work / "cache")]
    daemon = Daemon(argv, work / "serve.log", engine_environment(checkout))
    try:
        uri = daemon.wait_for_line('export "" ', timeout=600).split()[-1]
        ready = time.perf_counter()  # the "ready" line: every index available, listening
        mnt = work / "mnt"
        mnt.mkdir()
        attached = attach.attach(uri, "", work, work / "attach.log", attach.choose_method())
        try:
            syscall.mount(attached.device, str(mnt), "erofs")
            try:
                got = use(mnt, started, ready)
                return got | {"serve CPU s": daemon.cpu_seconds()}
            finally:
                syscall.umount(str(mnt))
        finally:
            attach.detach(attached)
    finally:
        daemon.stop()


def settle() -> None:
    """Give every run the same machine: what earlier runs wrote is on disk and out of
    the page cache, and the programs each system starts are read in again.

    On this kind of machine the kernel's cost of writing new files grows with
    the page cache that earlier runs left: ``tar -xzf`` of this layer took
    1.3 s, 2.2 s, 2.8 s, 3.2 s in four runs back to back (its system time
    0.5 s to 2.7 s) and 1.3 s each time with the page cache dropped between
    them. Without this, the pull slows round after round, and the engine
    (which also writes the whole tar, to its cache) with it.
    """
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("1\n")
    warm = "import blockstore.cli.serve_cmds, blockstore.image, nbdfront.mount.attach"
    subprocess.run([sys.executable, "-c", warm], check=True)
    for tool in (["curl", "--version"], ["tar", "--version"], ["find", "--version"]):
        subprocess.run(tool, check=True, stdout=subprocess.DEVNULL)


def sample(name: str, link: LinkProxy, run: Callable[[Path], dict]) -> dict:
    """One run in a fresh directory, on a settled machine (``settle``, not timed):
    what it reports, and the bytes and requests that crossed the link."""
    settle()
    work = Path(tempfile.mkdtemp(prefix="sidefig-"))
    try:
        before = link.traffic()
        got = run(work)
        moved = link.traffic() - before
        got.update({"bytes fetched": moved.down, "requests": moved.requests})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"  {name}: {json.dumps(got)}", file=sys.stderr)
    return got


def summarize(name: str, samples: list[dict]) -> dict:
    """The medians of every figure the runs report, with the runs themselves."""
    medians = {key: statistics.median(s[key] for s in samples) for key in samples[0]}
    return {"system": name, "runs": samples, **medians}


def paired(row: dict, other: dict) -> float:
    """The median over the rounds of ``row``'s done time ÷ ``other``'s in the same round."""
    return statistics.median(
        mine["done s"] / theirs["done s"]
        for mine, theirs in zip(row["runs"], other["runs"], strict=True)
    )


def measure(name: str, runs: int, link: LinkProxy, run: Callable[[Path], dict]) -> dict:
    """``runs`` runs of one system, each in a fresh directory, summarized."""
    return summarize(name, [sample(name, link, run) for _ in range(runs)])


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
    parser.add_argument(
        "--baseline",
        type=Path,
        help="another checkout of the engine, run with the shared index beside this one",
    )
    parser.add_argument("--json", type=Path, default=Path("bench/results/tar-figures.json"))
    args = parser.parse_args()
    compile_engine()
    if args.baseline is not None:
        compile_engine(args.baseline)
    workdir = Path(tempfile.mkdtemp(prefix="tarfig-"))
    registry = LocalRegistry(workdir / "registry")
    registry.start()
    link = LinkProxy(registry.port, wan(args.rtt, args.mbit))
    link.start()
    try:
        ref, blob, tar_size = build_image(workdir, args.size * MiB, registry.host)
        blob_size = blob.stat().st_size
        indexed = push_indexed(blob, registry.host)
        print(f"tar {tar_size / MiB:.1f} MiB, tar.gz {blob_size / MiB:.1f} MiB", file=sys.stderr)
        digest = "sha256:" + hashlib.sha256(blob.read_bytes()).hexdigest()
        url = f"http://{link.host}/v2/{REPOSITORY}/blobs/{digest}"
        through_link = {r: r.replace(registry.host, link.host) for r in (ref, indexed)}
        systems: list[tuple[str, Callable[[Path], dict]]] = [
            ("pull+extract", lambda w: pull_and_extract(w, url)),
            ("engine", lambda w: engine(w, through_link[ref], args.serve_arg)),
            ("engine+shared-index", lambda w: engine(w, through_link[indexed], args.serve_arg)),
        ]
        if args.baseline is not None:
            systems.append(
                (
                    f"engine+shared-index, {args.baseline.name}",
                    lambda w: engine(w, through_link[indexed], args.serve_arg, args.baseline),
                )
            )
        # Round by round, so a machine whose load changes meanwhile weighs on all alike.
        samples: dict[str, list[dict]] = {name: [] for name, _ in systems}
        for i in range(args.runs):
            for name, run in systems:
                samples[name].append(sample(f"{name} run {i + 1}", link, run))
        rows = [summarize(name, got) for name, got in samples.items()]
    finally:
        link.stop()
        registry.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    base = rows[0]["done s"]
    print(
        f"\ntar.gz image: tar {tar_size / MiB:.1f} MiB, blob {blob_size / MiB:.1f} MiB; "
        f"{args.rtt:g} ms RTT, {args.mbit:g} Mbit/s; median of {args.runs}\n"
    )
    print(
        "| system | ready s | first listing s | listing after ready s | done s | done / pull "
        "| done / pull, by round | serve CPU s | MiB fetched |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        ready = f"{row['ready s']:.2f}" if "ready s" in row else "-"
        after = f"{row['listing after ready s']:.2f}" if "ready s" in row else "-"
        cpu = f"{row['serve CPU s']:.2f}" if "serve CPU s" in row else "-"
        print(
            f"| {row['system']} | {ready} | {row['first listing s']:.2f} | {after} "
            f"| {row['done s']:.2f} | {row['done s'] / base:.2f} "
            f"| {paired(row, rows[0]):.2f} | {cpu} | {row['bytes fetched'] / MiB:.1f} |"
        )
    if args.baseline is not None:
        print(
            f"\nengine+shared-index ÷ {rows[-1]['system']}, done time by round (median): "
            f"{paired(rows[2], rows[-1]):.2f}; serve CPU "
            f"{rows[2]['serve CPU s'] / rows[-1]['serve CPU s']:.2f} (medians)"
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
