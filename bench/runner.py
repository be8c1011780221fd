"""One run of the harness: the plan of scenarios, run in turn, each figure kept.

A scenario is an image, a network, a system and a workload. Systems that
read the registry while a workload runs are run on every network of the
plan; the others (a warm cache, a local file) never touch the link and run
once, on loopback. Repeats go round the whole plan, so each system sees the
same load from the rest of the machine as its peers; a workload that drops
the page cache runs after all the others.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench import images, inprocess
from bench.link import LOOPBACK, LinkProxy, Profile
from bench.processes import BenchError
from bench.systems import EngineVariant, Rig, System, all_systems, system_names
from bench.workloads import Copy, OneGet, Workload
from blockstore.errors import BlockstoreError
from blockstore.localregistry import LocalRegistry

IN_PROCESS = "engine-in-process"
SERVER_CPU = "server CPU s"
"""The servers' CPU time during each run, a figure beside the workload's own: where the
client shares the machine's cores, a server's speed follows the CPU it spends."""


@dataclass
class Plan:
    mode: str
    repeats: int
    image_size: int
    compressions: list[str]
    networks: list[Profile]
    sweep: list[Profile]
    """Extra networks for the cold sequential figure alone (throughput against RTT)."""
    workloads: list[Workload]
    variants: list[EngineVariant]
    only: list[str] = field(default_factory=list)
    in_process_seconds: float = 1.0
    workdir: Path | None = None
    excluded: dict[tuple[str, str], str] = field(default_factory=dict)
    """(system, workload) pairs this plan leaves out, and why (said, never silent)."""


@dataclass
class Result:
    """Every run of one scenario; ``runs`` holds one entry per repeat."""

    image: str
    network: str
    system: str
    workload: str
    primary: str
    higher_is_better: bool
    remote: bool
    runs: list[dict] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


@dataclass
class Scenario:
    profile: Profile
    system: System
    workload: Workload
    result: Result


class Selection:
    """``--only``: each term names systems, workloads, networks or images (or a prefix-)."""

    def __init__(self, terms: list[str], names: dict[str, set[str]]):
        self.terms: dict[str, list[str]] = {kind: [] for kind in names}
        for term in terms:
            kinds = [k for k, known in names.items() if any(_matches(term, n) for n in known)]
            if not kinds:
                every = sorted(set().union(*names.values()))
                raise BenchError(f"--only {term}: names nothing; known: {', '.join(every)}")
            for kind in kinds:
                self.terms[kind].append(term)

    def wants(self, **names: str) -> bool:
        return all(
            not self.terms[kind] or any(_matches(t, name) for t in self.terms[kind])
            for kind, name in names.items()
        )


def _matches(term: str, name: str) -> bool:
    return name == term or name.startswith(term + "-")


class Progress:
    """One line on stderr per scenario: where the run is and how long it has taken."""

    def __init__(self, total: int):
        self.total = total
        self.done = 0
        self.started = time.monotonic()

    def step(self, *what: str) -> None:
        self.done += 1
        elapsed = int(time.monotonic() - self.started)
        print(
            f"[bench {self.done:3d}/{self.total} {elapsed // 60}:{elapsed % 60:02d}] "
            + "  ".join(what),
            file=sys.stderr,
            flush=True,
        )


def say(line: str) -> None:
    print(f"bench: {line}", file=sys.stderr, flush=True)


def selection_of(plan: Plan) -> Selection:
    """``--only`` against every name the plan has, checked before anything is built."""
    names = {
        "system": system_names(plan.variants) | {IN_PROCESS},
        "workload": {w.name for w in plan.workloads} | {"in-process"},
        "network": {p.name for p in plan.networks + plan.sweep} | {LOOPBACK.name},
        "image": set(plan.compressions),
    }
    return Selection(plan.only, names)


@dataclass
class Findings:
    """What a run has found so far: kept whole even if the run is cut short."""

    results: list[Result] = field(default_factory=list)
    images: list[dict] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def run(plan: Plan, found: Findings, checkpoint: Callable[[], None] = lambda: None) -> None:
    """Run the plan into ``found``; ``checkpoint`` is called after every scenario."""
    selection = selection_of(plan)
    if plan.workdir is not None:
        plan.workdir.mkdir(parents=True, exist_ok=True)  # as ``--out`` is made
    workdir = Path(tempfile.mkdtemp(prefix="bench-", dir=plan.workdir))
    registry = LocalRegistry(workdir / "registry")
    try:
        registry.start()
        link = LinkProxy(registry.port)
        link.start()
        try:
            for compression in plan.compressions:
                say(f"building a {plan.image_size >> 20} MiB {compression} image of a real tree")
                image = images.prepare(workdir, plan.image_size, compression, registry.host)
                say(f"image {image.name}: {image.size / 2**20:.1f} MiB, {image.digest[:19]}")
                found.images.append(image.describe())
                run_image(plan, Rig(workdir, image, link), selection, found, checkpoint)
        finally:
            link.stop()
    finally:
        registry.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def run_image(
    plan: Plan, rig: Rig, selection: Selection, found: Findings, checkpoint: Callable[[], None]
) -> None:
    systems = all_systems(rig, plan.variants)
    scenarios = plan_scenarios(plan, rig, systems, selection, found.skipped)
    in_process = selection.wants(
        system=IN_PROCESS, workload="in-process", network=LOOPBACK.name, image=rig.image.name
    )
    progress = Progress(len(scenarios) * plan.repeats + (plan.repeats if in_process else 0))
    found.results += [s.result for s in scenarios]
    by_name: dict[str, Result] = {}
    # A workload that drops the page cache goes last, all its repeats together, so that
    # no other scenario finds the machine's caches in a state it left.
    rounds = [
        [s for s in scenarios if not s.workload.drops_page_cache],
        [s for s in scenarios if s.workload.drops_page_cache],
    ]
    for group, scheduled in enumerate(rounds):
        for repeat in range(plan.repeats):
            for scenario in scheduled:
                progress.step(
                    rig.image.name,
                    scenario.profile.name,
                    scenario.system.name,
                    scenario.workload.name,
                )
                measure(rig, scenario, repeat)
                checkpoint()
            if in_process and group == 0:
                progress.step(rig.image.name, LOOPBACK.name, IN_PROCESS, "in-process")
                found.results += measure_in_process(plan, rig, by_name)
                checkpoint()


def measure_in_process(plan: Plan, rig: Rig, by_name: dict[str, Result]) -> list[Result]:
    """One round of the in-process reads; the results it made new."""
    new = []
    cache = rig.scratch("in-process-")
    try:
        for name, metrics in inprocess.measure(rig.image, cache, plan.in_process_seconds):
            result = by_name.get(name)
            if result is None:
                result = Result(
                    rig.image.name, LOOPBACK.name, IN_PROCESS, name, "MiB/s", True, False
                )
                by_name[name] = new_result = result
                new.append(new_result)
            result.runs.append({"metrics": metrics, "bytes_read": rig.image.size})
    except BlockstoreError as exc:
        say(f"FAILED {IN_PROCESS}: {exc}")
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return new


def plan_scenarios(
    plan: Plan, rig: Rig, systems: list[System], selection: Selection, skipped: list[str]
) -> list[Scenario]:
    scenarios = []
    image = rig.image.name
    usable = []
    for system in systems:
        reason = system.missing()
        if reason is None:
            usable.append(system)
        elif selection.wants(system=system.name):
            note(skipped, f"skipping {system.name}: {reason}")
    for workload in plan.workloads:
        reason = workload.missing()
        if reason is not None:
            if selection.wants(workload=workload.name):
                note(skipped, f"skipping {workload.name}: {reason}")
            continue
        for system in usable:
            for profile in networks_for(plan, system, workload):
                if not selection.wants(
                    system=system.name, workload=workload.name, network=profile.name, image=image
                ):
                    continue
                reason = plan.excluded.get((system.name, workload.name))
                reason = reason or workload.applies_to(system)
                if reason is not None:
                    if not isinstance(workload, OneGet):
                        note(skipped, f"not running {workload.name} on {system.name}: {reason}")
                    break
                result = Result(
                    image,
                    profile.name,
                    system.name,
                    workload.name,
                    workload.primary,
                    workload.higher_is_better,
                    system.remote,
                )
                scenarios.append(Scenario(profile, system, workload, result))
    return scenarios


def networks_for(plan: Plan, system: System, workload: Workload) -> list[Profile]:
    """Where a scenario runs: a local system on loopback; a remote one on every network,
    and for the cold sequential copy on the RTT sweep too."""
    if not system.remote:
        return [LOOPBACK]
    profiles = list(plan.networks)
    if isinstance(workload, OneGet) or (isinstance(workload, Copy) and workload.options == []):
        profiles += [p for p in plan.sweep if p not in profiles]
    return profiles


def check_size(uri: str, size: int) -> None:
    """A server that serves something else than the whole image measures nothing."""
    done = subprocess.run(["nbdinfo", "--size", uri], capture_output=True, text=True, check=False)
    if done.returncode != 0 or done.stdout.strip() != str(size):
        found = done.stdout.strip() or done.stderr.strip()
        raise BenchError(f"{uri} serves {found}, not the image's {size} bytes")


def note(skipped: list[str], line: str) -> None:
    if line not in skipped:
        skipped.append(line)
        say(line)


def measure(rig: Rig, scenario: Scenario, repeat: int) -> None:
    """One run of one scenario; a failure is recorded and said, and the run goes on.
    The run keeps its ``repeat``: the systems' runs of one repeat ran back to back,
    which is what pairs them (``report.paired_ratio``)."""
    system, workload, result = scenario.system, scenario.workload, scenario.result
    # A remote system's start is part of its cost (the naive path's download, a
    # manifest fetched): counted. A local one's (a cache warmed) is not.
    rig.link.profile = scenario.profile
    rig.workload = workload.name
    try:
        try:
            before = rig.link.traffic()
            uris = system.start(workload.servers)
            checking = rig.link.traffic()
            for uri in uris:
                check_size(uri, rig.image.size)
            checked = rig.link.traffic()
            # The size check's own requests (nbdkit curl asks on connecting) are not counted.
            if not system.remote:
                before = checked
            elif not system.prefetches_at_start:
                before = before + (checked - checking)
            cpu_before = system.cpu_seconds()
            outcome = workload.run(uris, rig, system)
            traffic = rig.link.traffic() - before
            cpu_after = system.cpu_seconds()
            if cpu_before is not None and cpu_after is not None:
                outcome.metrics[SERVER_CPU] = cpu_after - cpu_before
        finally:
            system.stop()
            rig.link.profile = LOOPBACK
    except (BenchError, BlockstoreError, OSError, subprocess.CalledProcessError) as exc:
        message = f"{system.name} {workload.name} on {scenario.profile.name}: {exc}"
        result.errors.append(message)
        say(f"FAILED {message}")
        return
    result.runs.append(
        {
            "repeat": repeat,
            "metrics": outcome.metrics,
            "bytes_read": outcome.bytes_read,
            "registry": {
                "bytes": traffic.down,
                "bytes_sent": traffic.up,
                "requests": traffic.requests,
                "blob_requests": traffic.blob_requests,
            },
            "detail": outcome.detail,
            "bytes_served": system.bytes_served,
        }
    )
