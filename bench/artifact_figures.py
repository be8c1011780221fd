"""What the artifacts attached to an image buy and cost: chunk indexes and access traces.

    sudo .venv/bin/python -m bench.artifact_figures [--size MIB] [--runs N] [--rtt MS] [--mbit M]

An EROFS image of a real tree (the harness's ``images.build``) is pushed
three times, under three repositories, to a local registry behind the
harness's emulated link. Every run starts from an empty cache:

- cold ``nbdcopy`` of the whole export, the image as it is against the same
  image with its chunk index attached (``blockstore index --push``): the cost
  of checking each chunk's sha256 on arrival;
- cold mount-and-use (mount, ``find``, read a seeded fifth of the files) of
  the image as it is, against the same after one mount in another cache
  directory recorded its access trace and ``blockstore trace push`` attached
  it: the replayed trace's worth to a fleet's first mount.

Reported: medians of the runs, bytes and requests that crossed the link,
and ratios side by side, as a Markdown table; the raw runs as JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.images import build, push
from bench.link import LinkProxy, wan
from bench.processes import BenchError, Daemon, compile_engine
from bench.tar_figures import engine as mount_and_use
from bench.tar_figures import measure
from blockstore.localregistry import LocalRegistry

MiB = 1 << 20
BLOCKSTORE = [sys.executable, "-m", "blockstore", "-q"]


def blockstore(*args: str) -> None:
    done = subprocess.run([*BLOCKSTORE, *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise BenchError(f"blockstore {args[0]} failed: {done.stderr.strip()}")


def copy_cold(work: Path, reference: str) -> dict:
    """Serve from an empty cache and read the whole export once with nbdcopy."""
    serve = ["serve", reference, "--insecure", "--listen", "127.0.0.1:0"]
    daemon = Daemon([*BLOCKSTORE, *serve, "--cache-dir", str(work / "cache")], work / "serve.log")
    try:
        uri = daemon.wait_for_line('export "" ', timeout=120).split()[-1]
        started = time.perf_counter()
        subprocess.run(["nbdcopy", uri, "null:"], check=True, stdin=subprocess.DEVNULL)
        return {"s": time.perf_counter() - started}
    finally:
        daemon.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=48, help="image size in MiB (default 48)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rtt", type=float, default=20.0, help="round-trip time, ms")
    parser.add_argument("--mbit", type=float, default=1000.0, help="bandwidth cap, Mbit/s")
    parser.add_argument("--json", type=Path, default=Path("bench/results/artifact-figures.json"))
    args = parser.parse_args()
    compile_engine()
    workdir = Path(tempfile.mkdtemp(prefix="artfig-"))
    registry = LocalRegistry(workdir / "registry")
    registry.start()
    link = LinkProxy(registry.port, wan(args.rtt, args.mbit))
    link.start()
    try:
        image, _ = build(workdir, args.size * MiB, "lz4hc")
        refs = {}
        for name in ("plain", "indexed", "traced"):
            push(image, f"{registry.host}/bench/{name}:v1")
            refs[name] = f"{link.host}/bench/{name}:v1"
        blockstore("index", f"{registry.host}/bench/indexed:v1", "--push", "--insecure",
                   "--cache-dir", str(workdir / "index-cache"))  # fmt: skip
        size = image.stat().st_size
        print(f"image {size / MiB:.1f} MiB, {args.rtt:g} ms RTT", file=sys.stderr)
        copies = [
            measure("cold nbdcopy", args.runs, link, lambda w: copy_cold(w, refs["plain"])),
            measure(
                "cold nbdcopy, chunk index",
                args.runs,
                link,
                lambda w: copy_cold(w, refs["indexed"]),
            ),
        ]
        plain = measure("cold mount-and-use", args.runs, link,
                        lambda w: mount_and_use(w, refs["plain"], []))  # fmt: skip
        recorder = workdir / "recorder"
        recorder.mkdir()
        mount_and_use(recorder, refs["traced"], [])  # records the trace in recorder/cache
        blockstore("trace", "push", f"{registry.host}/bench/traced:v1", "--insecure",
                   "--cache-dir", str(recorder / "cache"))  # fmt: skip
        traced = measure("cold mount-and-use, trace from the registry", args.runs, link,
                         lambda w: mount_and_use(w, refs["traced"], []))  # fmt: skip
    finally:
        link.stop()
        registry.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"\nimage {size / MiB:.1f} MiB (lz4hc); {args.rtt:g} ms RTT, {args.mbit:g} Mbit/s; "
          f"median of {args.runs}\n")  # fmt: skip
    print("| cold nbdcopy | s | MiB/s | requests | ratio to no index |")
    print("|---|---|---|---|---|")
    for row in copies:
        print(f"| {row['system']} | {row['s']:.2f} | {size / MiB / row['s']:.1f} "
              f"| {row['requests']:.0f} | {copies[0]['s'] / row['s']:.2f}x |")  # fmt: skip
    print("\n| cold mount-and-use | first listing s | done s | MiB fetched | fetched ÷ read "
          "| requests | done ÷ without trace |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for row in (plain, traced):
        ratio = row["bytes fetched"] / max(1, row["bytes read"])
        print(f"| {row['system']} | {row['first listing s']:.3f} | {row['done s']:.2f} "
              f"| {row['bytes fetched'] / MiB:.1f} | {ratio:.2f} | {row['requests']:.0f} "
              f"| {row['done s'] / plain['done s']:.2f} |")  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    document = {"image bytes": size, "rtt ms": args.rtt, "mbit": args.mbit,
                "copies": copies, "mount": [plain, traced]}  # fmt: skip
    args.json.write_text(json.dumps(document, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
