"""What a client does with the export, timed: copies, random reads, mount-and-use.

Each workload runs against URIs a system has just started and returns its
figures; the runner counts the registry traffic around it. A system's
``fetch_seconds`` (the naive path's download) is added to every time.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from bench.processes import BenchError
from bench.systems import Engine, Naive, Rig, System
from blockstore.errors import BlockstoreError
from blockstore.localregistry import LocalRegistry
from nbdfront.mount import attach, syscall

MiB = 1 << 20
SEED = 20260101
"""The mount-and-use workload reads the same files on every run and machine."""


@dataclass
class Outcome:
    metrics: dict[str, float]
    """Figures of this run, by name with unit (``MiB/s``, ``IOPS``, ``done s``)."""
    bytes_read: int
    """What the client read: set against the registry bytes fetched for it."""
    detail: dict = field(default_factory=dict)


class Workload:
    name: ClassVar[str]
    primary: ClassVar[str]
    """The figure the table ranks and compares."""
    higher_is_better: ClassVar[bool] = True
    servers: ClassVar[int] = 1
    tools: ClassVar[tuple[str, ...]] = ("nbdcopy",)
    drops_page_cache: ClassVar[bool] = False
    """Whether a run empties the machine's page cache (the runner then runs it last)."""

    def missing(self) -> str | None:
        for tool in self.tools:
            if shutil.which(tool) is None:
                return f"{tool} is not installed"
        return None

    def applies_to(self, system: System) -> str | None:
        """Why this workload says nothing about ``system``, or None."""
        if isinstance(system, Engine) and system.mode == "traced":
            return "a replayed trace is measured on mount-and-use alone"
        return None

    def run(self, uris: list[str], rig: Rig, system: System) -> Outcome:
        raise NotImplementedError


def run_tool(argv: list[str]) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise BenchError(f"{argv[0]} failed ({done.returncode}): {done.stderr.strip()[-300:]}")
    return done.stdout


class Copy(Workload):
    """The whole export once, sequentially, to nbdcopy's null sink."""

    primary = "MiB/s"

    def __init__(self, name: str, options: list[str]):
        self.name = name
        self.options = options

    def run(self, uris: list[str], rig: Rig, system: System) -> Outcome:
        started = time.perf_counter()
        run_tool(["nbdcopy", *self.options, uris[0], "null:"])
        seconds = time.perf_counter() - started + system.fetch_seconds
        size = rig.image.size
        return Outcome({"MiB/s": size / seconds / MiB, "s": seconds}, size)


class Clients(Workload):
    """Several whole copies at once: ``count`` clients of one export, or one per server."""

    primary = "MiB/s"

    def __init__(self, name: str, count: int, servers: int):
        self.name = name
        self.count = count
        self.servers = servers

    def run(self, uris: list[str], rig: Rig, system: System) -> Outcome:
        started = time.perf_counter()
        copies = [
            subprocess.Popen(
                ["nbdcopy", uris[i % len(uris)], "null:"],
                stdin=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            for i in range(self.count)
        ]
        failed = [p.stderr.read().decode(errors="replace") for p in copies if p.wait() != 0]
        if failed:
            raise BenchError(f"nbdcopy failed: {failed[0].strip()[-300:]}")
        seconds = time.perf_counter() - started + system.fetch_seconds
        total = rig.image.size * self.count
        return Outcome({"MiB/s": total / seconds / MiB, "s": seconds}, total)


class RandomReads(Workload):
    """4 KiB random reads with fio's nbd engine at a queue depth, for a fixed time."""

    primary = "IOPS"
    tools = ("fio",)

    def __init__(self, depth: int, seconds: float):
        self.name = f"fio-qd{depth}"
        self.depth = depth
        self.seconds = seconds

    def applies_to(self, system: System) -> str | None:
        if isinstance(system, Naive):
            return "no read is served before its download ends; see one-get"
        return super().applies_to(system)

    def run(self, uris: list[str], rig: Rig, system: System) -> Outcome:
        out = run_tool(
            [
                "fio",
                "--name=randread",
                "--ioengine=nbd",
                f"--uri={uris[0]}",
                "--rw=randread",
                "--bs=4k",
                f"--iodepth={self.depth}",
                "--readonly",
                f"--size={rig.image.size}",
                f"--runtime={self.seconds}",
                "--time_based",
                "--output-format=json",
            ]
        )
        job = json.loads(out[out.index("{") :])["jobs"][0]["read"]
        percentiles = {float(p): ns / 1e6 for p, ns in job["clat_ns"]["percentile"].items()}
        return Outcome(
            {
                "IOPS": job["iops"],
                "p50 ms": percentiles.get(50.0, 0.0),
                "p99 ms": percentiles.get(99.0, 0.0),
            },
            job["io_bytes"],
            {"latency_ms": percentiles},
        )


class MountAndUse(Workload):
    """Mount the EROFS image, ``find`` it, read a seeded fifth of its files.

    The export is attached as ``blockstore mount`` does (kernel NBD where
    ``/dev/nbd*`` exists, else nbdfuse and a file-backed EROFS mount).
    """

    name = "mount"
    primary = "done s"
    higher_is_better = False
    tools = ("find",)

    def applies_to(self, system: System) -> str | None:
        return None

    def missing(self) -> str | None:
        if os.geteuid() != 0:
            return "mounting needs root"
        try:
            attach.choose_method()
        except BlockstoreError as exc:
            return str(exc)
        return super().missing()

    def run(self, uris: list[str], rig: Rig, system: System) -> Outcome:
        where = rig.scratch("mount-")
        mountpoint = where / "mnt"
        mountpoint.mkdir()
        started = time.perf_counter()
        attached = attach.attach(uris[0], "", where, where / "attach.log", attach.choose_method())
        try:
            syscall.mount(attached.device, str(mountpoint), "erofs")
            try:
                first, files = listing(mountpoint)
                read = read_files(self.chosen(files))
                done = time.perf_counter() - started
            finally:
                syscall.umount(str(mountpoint))
        finally:
            attach.detach(attached)
            shutil.rmtree(where, ignore_errors=True)
        extra = system.fetch_seconds
        return Outcome(
            {"first listing s": first - started + extra, "done s": done + extra},
            read,
            {"files": len(files)},
        )

    def chosen(self, files: list[str]) -> list[str]:
        """The files the workload reads: a seeded fifth."""
        return seeded_fifth(files)


class MountReadAll(MountAndUse):
    """The hit path through the whole mount stack: the page cache dropped, then mount,
    ``find`` and every file read. Only for systems that never touch the link while
    they serve (a warm cache, a local file): through the emulated link it is a cold
    copy, which ``nbdcopy`` measures."""

    name = "mount-all"
    drops_page_cache = True

    def applies_to(self, system: System) -> str | None:
        if system.remote:
            return "the mount stack's hit path is measured on warm and local systems"
        return None

    def run(self, uris: list[str], rig: Rig, system: System) -> Outcome:
        # What earlier runs wrote (a peer's cache file, this cache's recency) goes to
        # disk now: dirty pages survive drop_caches and would be written back meanwhile.
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return super().run(uris, rig, system)

    def chosen(self, files: list[str]) -> list[str]:
        return files


def seeded_fifth(files: list[str]) -> list[str]:
    """A fifth of ``files``, the same ones for every system: what mount-and-use reads."""
    return random.Random(SEED).sample(files, len(files) // 5)


def listing(root: Path) -> tuple[float, list[str]]:
    """``find`` every regular file: when the first one was printed, and all of them."""
    process = subprocess.Popen(
        ["find", str(root), "-mindepth", "1", "-type", "f"],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    assert process.stdout is not None
    files = [process.stdout.readline()]
    first = time.perf_counter()
    files += process.stdout.readlines()
    if process.wait() != 0:
        raise BenchError(f"find {root} failed ({process.returncode})")
    return first, sorted(os.fsdecode(f.rstrip(b"\n")) for f in files if f)


def read_files(paths: list[str]) -> int:
    buffer = bytearray(MiB)
    total = 0
    for path in paths:
        with open(path, "rb", buffering=0) as file:
            while n := file.readinto(buffer):
                total += n
    return total


class OneGet(Workload):
    """The limit: the whole blob in one GET through the same link."""

    name = "one-get"
    primary = "MiB/s"
    tools = ()

    def applies_to(self, system: System) -> str | None:
        return None if isinstance(system, Naive) else "only the naive path downloads"

    def run(self, uris: list[str], rig: Rig, system: System) -> Outcome:
        size = rig.image.size
        seconds = system.fetch_seconds
        return Outcome({"MiB/s": size / seconds / MiB, "s": seconds}, size)


class Fleet(Workload):
    """``nodes`` cold caches at once, each a whole copy, through a pull-through mirror.

    The mirror is a CNCF registry in proxy mode whose upstream is the real
    registry behind the link, so the link's bytes are what the upstream
    served: against one image's size, they show what the mirror saved.
    """

    servers = 0
    primary = "upstream ÷ image"
    higher_is_better = False
    tools = ("nbdcopy", "docker-registry")

    def __init__(self, nodes: int):
        self.name = f"fleet-{nodes}"
        self.nodes = nodes

    def applies_to(self, system: System) -> str | None:
        if isinstance(system, Engine) and system.mode == "cold":
            return None
        return "only a cold engine node pulls through a mirror here"

    def run(self, uris: list[str], rig: Rig, system: System) -> Outcome:
        assert isinstance(system, Engine)
        mirror = LocalRegistry(
            rig.scratch("mirror-"), settings={"proxy": {"remoteurl": f"http://{rig.link.host}"}}
        )
        mirror.start()
        try:
            before = rig.link.traffic()
            # Timed from the nodes' start: a node starting up already makes the
            # mirror pull the whole blob, before any client reads.
            started = time.perf_counter()
            reference = rig.image.reference(mirror.host)
            node_uris = [
                system.serve(reference, system.scratch_dir("node-")) for _ in range(self.nodes)
            ]
            outcome = Clients("", self.nodes, self.nodes).run(node_uris, rig, system)
            seconds = time.perf_counter() - started
            upstream = (rig.link.traffic() - before).down
        finally:
            system.stop()
            mirror.stop()
        total = rig.image.size * self.nodes
        outcome.metrics.update(
            {
                "MiB/s": total / seconds / MiB,
                "s": seconds,
                "upstream ÷ image": upstream / rig.image.size,
            }
        )
        return outcome
