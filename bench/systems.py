"""The systems under test, each one small class: start, its NBD URIs, stop.

Every system serves the same image. Those that read the registry do it
through the emulated link (``Rig.link``), which counts their bytes and
requests the same way for all; the rest read a local file or a filled cache
and never touch it. Adding a variant is one class here, or, for this engine,
a name, extra ``blockstore serve`` arguments and, for a before-and-after in one
run, another checkout of it (``EngineVariant``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from bench.images import Image
from bench.link import LinkProxy
from bench.processes import (
    BenchError,
    Daemon,
    ForkingDaemon,
    engine_environment,
    free_port,
    wait_for_port,
)


@dataclass
class Rig:
    """What every system and workload of one image shares."""

    workdir: Path
    image: Image
    link: LinkProxy
    warm_caches: dict[str, Path] = field(default_factory=dict)
    traces: dict[tuple[str, str], Path] = field(default_factory=dict)
    """The access traces a cold engine recorded, by (variant, workload): what its traced
    mode replays on the next run of that workload."""
    workload: str = ""
    """The workload now running."""

    @property
    def reference(self) -> str:
        return self.image.reference(self.link.host)

    def scratch(self, prefix: str) -> Path:
        return Path(tempfile.mkdtemp(prefix=prefix, dir=self.workdir))


@dataclass(frozen=True)
class EngineVariant:
    """This engine with extra ``blockstore serve`` arguments, under its own name."""

    label: str
    args: tuple[str, ...] = ()
    checkout: str | None = None
    """Another source tree of the engine whose commands (``serve``, ``prefetch``, the
    cache's) this variant runs, so that two versions take turns in one run; None:
    this one."""
    commit: str | None = None
    """``checkout``'s commit, for the report."""

    def blockstore(self, args: list[str]) -> str:
        """A ``blockstore`` command of this variant's engine."""
        return blockstore(args, self.environment)

    @property
    def environment(self) -> dict[str, str] | None:
        return engine_environment(None if self.checkout is None else Path(self.checkout))


def nbdcopy_to_null(uri: str) -> None:
    """Read the whole export once (to warm a cache)."""
    subprocess.run(["nbdcopy", uri, "null:"], check=True, stdin=subprocess.DEVNULL)


class System:
    """One way of serving the image over NBD."""

    name: ClassVar[str]
    remote: ClassVar[bool] = False
    """Reads the registry while a workload runs: its figures are cold ones."""
    tools: ClassVar[tuple[str, ...]] = ()
    fetch_seconds: float = 0.0
    """Time spent fetching before the first read could be served (the naive path)."""
    prefetches_at_start: ClassVar[bool] = False
    """Fetches on its own from its start (the EROFS start, a trace replayed): what crosses
    the link while its size is checked is its work and is counted."""
    bytes_served: int | None = None
    """What the clients read from the export during the last run, where the system counts it."""

    def __init__(self, rig: Rig):
        self.rig = rig
        self.daemons: list[Daemon | ForkingDaemon] = []
        self.scratch: list[Path] = []
        """Directories of this start (a cold cache, a download), removed at stop."""

    def missing(self) -> str | None:
        """Why this system cannot run on this machine, or None."""
        for tool in self.tools:
            if shutil.which(tool) is None:
                return f"{tool} is not installed"
        return None

    def start(self, servers: int = 1) -> list[str]:
        """Start ``servers`` servers of the image (sharing what they can); their URIs."""
        return [self.serve_one(i) for i in range(servers)]

    def serve_one(self, index: int) -> str:
        raise NotImplementedError

    def stop(self) -> None:
        for daemon in self.daemons:
            daemon.stop()
        if self.daemons:
            self.stopped()
        self.daemons.clear()
        for directory in self.scratch:
            shutil.rmtree(directory, ignore_errors=True)
        self.scratch.clear()

    def stopped(self) -> None:
        """After the servers stopped, before their scratch directories go: what to keep."""

    def cpu_seconds(self) -> float | None:
        """CPU time the servers have used so far, or None where it is not known."""
        times = [daemon.cpu_seconds() for daemon in self.daemons]
        if not times or None in times:
            return None
        return sum(times)  # type: ignore[arg-type]

    def scratch_dir(self, prefix: str) -> Path:
        directory = self.rig.scratch(prefix)
        self.scratch.append(directory)
        return directory

    def log(self, what: str) -> Path:
        return self.rig.workdir / f"{self.name}-{what}.log"


class Engine(System):
    """``blockstore serve`` of the image's reference, through the link.

    cold: an empty cache directory per start; traced: an empty cache holding
    only the access trace that this variant's last cold run of the same
    workload recorded; warm: a cache filled once by ``blockstore prefetch``;
    offline: that cache with ``--offline``. Several servers started together
    share one cache directory.
    """

    remote = True
    prefetches_at_start = True

    def __init__(self, rig: Rig, mode: str, variant: EngineVariant):
        super().__init__(rig)
        self.mode = mode
        self.variant = variant
        self.name = f"{variant.label}-{mode}"
        self.remote = mode in FROM_REGISTRY

    def start(self, servers: int = 1) -> list[str]:
        self.bytes_served = None
        cache = self.scratch_dir("cache-") if self.mode in FROM_REGISTRY else self.warm_cache()
        if self.mode == "traced":
            recorded = self.rig.traces.get((self.variant.label, self.rig.workload))
            if recorded is None:
                raise BenchError(
                    f"no trace to replay: {self.variant.label}-cold has not run "
                    f"{self.rig.workload} before"
                )
            self.variant.blockstore(["trace", "import", str(recorded), "--cache-dir", str(cache)])
        self.cache = cache
        extra = ["--offline"] if self.mode == "offline" else []
        return [self.serve(self.rig.reference, cache, extra) for _ in range(servers)]

    def stopped(self) -> None:
        """Read what the servers served from the cold cache's counters (kept at close):
        the clients' own reads, before any chunk rounding or prefetch."""
        if self.mode in FROM_REGISTRY:
            self.bytes_served = cache_stats(self.cache, self.variant)["bytes_served"]
            if self.mode == "cold":
                self.keep_trace()

    def keep_trace(self) -> None:
        """Export what this cold run recorded, for the traced mode's next run."""
        kept = self.rig.workdir / f"trace-{self.variant.label}-{self.rig.workload}.json"
        self.variant.blockstore(
            ["trace", "export", self.rig.image.digest, str(kept), "--cache-dir", str(self.cache)]
        )
        self.rig.traces[(self.variant.label, self.rig.workload)] = kept

    def serve(self, reference: str, cache: Path, extra: list[str] | None = None) -> str:
        daemon = Daemon(
            [sys.executable, "-m", "blockstore", "-q", "serve", reference, "--insecure"]
            + ["--cache-dir", str(cache), "--listen", "127.0.0.1:0"]
            + (extra or [])
            + list(self.variant.args),
            self.log("serve"),
            self.variant.environment,
        )
        self.daemons.append(daemon)
        line = daemon.wait_for_line('export "" ')
        return line.split()[-1]

    def warm_cache(self) -> Path:
        cache = self.rig.warm_caches.get(self.variant.label)
        if cache is None:
            cache = self.rig.scratch("warm-cache-")
            self.variant.blockstore(
                ["prefetch", self.rig.reference, "--insecure", "--cache-dir", str(cache)]
            )
            self.rig.warm_caches[self.variant.label] = cache
        return cache


def cache_stats(cache: Path, variant: EngineVariant) -> dict:
    """``blockstore cache stats`` of a cache directory, as a dict."""
    return json.loads(variant.blockstore(["cache", "stats", "--json", "--cache-dir", str(cache)]))


def blockstore(args: list[str], env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "blockstore", "-q", *args],
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )
    if done.returncode != 0:
        raise BenchError(f"blockstore {args[0]} failed: {done.stderr.strip()}")
    return done.stdout


class Nbdkit(System):
    """An nbdkit server on a free TCP port; subclasses give the plugin and filters."""

    tools = ("nbdkit",)

    def plugin(self) -> list[str]:
        raise NotImplementedError

    def serve_one(self, index: int) -> str:
        port = free_port()
        env = dict(os.environ, TMPDIR=str(self.scratch_dir("nbdkit-tmp-")))
        daemon = Daemon(
            [
                *("nbdkit", "-f", "--exit-with-parent", "-r", "-i", "127.0.0.1"),
                *("-p", str(port), *self.plugin()),
            ],
            self.log("nbdkit"),
            env=env,
        )
        self.daemons.append(daemon)
        daemon.wait_for_port(port)
        return f"nbd://127.0.0.1:{port}/"


class NbdkitCurl(Nbdkit):
    """nbdkit's curl plugin on the blob URL: every read its own ranged GET."""

    name = "curl"
    remote = True

    def plugin(self) -> list[str]:
        return ["curl", f"url={self.rig.image.blob_url(self.rig.link.host)}"]


class NbdkitCurlCached(NbdkitCurl):
    """What a user puts together today: curl with readahead and a cache that keeps reads."""

    name = "curl-cache"

    def plugin(self) -> list[str]:
        return ["--filter=readahead", "--filter=cache", *super().plugin(), "cache-on-read=true"]


class NbdkitCurlCachedWarm(NbdkitCurlCached):
    """The same after one whole read, so every read is a hit of its cache."""

    name = "curl-cache-warm"
    remote = False
    tools = ("nbdkit", "nbdcopy")

    def serve_one(self, index: int) -> str:
        uri = super().serve_one(index)
        nbdcopy_to_null(uri)
        return uri


class NbdkitFile(Nbdkit):
    """The ceiling of this machine in C: nbdkit's file plugin on the image file."""

    name = "nbdkit-file"

    def plugin(self) -> list[str]:
        return ["file", str(self.rig.image.path)]


class NbdServer(System):
    """The reference NBD server on the image file."""

    name = "nbd-server"
    tools = ("nbd-server",)

    def serve_one(self, index: int) -> str:
        port = free_port()
        config = self.scratch_dir("nbd-server-") / "config"
        config.write_text(
            f"[generic]\nlistenaddr = 127.0.0.1\nport = {port}\n"
            f"[image]\nexportname = {self.rig.image.path}\nreadonly = true\n"
        )
        pidfile = config.with_name("pid")
        self.daemons.append(
            ForkingDaemon(
                ["nbd-server", "-C", str(config), "-p", str(pidfile)], pidfile, self.log("server")
            )
        )
        wait_for_port(port)
        return f"nbd://127.0.0.1:{port}/image"


class Naive(NbdkitFile):
    """The whole blob in one GET through the link, then read locally.

    Its start-up time (the download) is added to every figure: for anything
    that reads every byte once, no lazy engine can beat it on the same link.
    """

    name = "naive"
    remote = True
    tools = ("nbdkit", "curl")

    def start(self, servers: int = 1) -> list[str]:
        self.fetch_seconds, self.download = download(self.rig, self.scratch_dir("download-"))
        return super().start(servers)

    def plugin(self) -> list[str]:
        return ["file", str(self.download)]


def download(rig: Rig, directory: Path) -> tuple[float, Path]:
    """One whole-blob GET through the link to a file, by curl; its seconds and the file."""
    target = directory / "blob"
    url = rig.image.blob_url(rig.link.host)
    started = time.perf_counter()
    done = subprocess.run(
        ["curl", "--silent", "--show-error", "--fail", "--output", str(target), url],
        capture_output=True,
        text=True,
        check=False,
    )
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise BenchError(f"downloading the blob: {done.stderr.strip()}")
    return seconds, target


PEERS: list[type[System]] = [
    NbdkitCurl,
    NbdkitCurlCached,
    NbdkitCurlCachedWarm,
    NbdkitFile,
    NbdServer,
    Naive,
]
ENGINE_MODES = ("cold", "traced", "warm", "offline")
FROM_REGISTRY = ("cold", "traced")


def all_systems(rig: Rig, variants: list[EngineVariant]) -> list[System]:
    """Every system of one run, engine variants first."""
    engines = [Engine(rig, mode, v) for v in variants for mode in ENGINE_MODES]
    return engines + [kind(rig) for kind in PEERS]


def system_names(variants: list[EngineVariant]) -> set[str]:
    return {f"{v.label}-{mode}" for v in variants for mode in ENGINE_MODES} | {
        kind.name for kind in PEERS
    }
