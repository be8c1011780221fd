"""The benchmark harness end to end, as small as it goes: it runs and writes its outputs.

Nothing here is timed: the figures are whatever this machine gives. What is
checked is that one command builds and pushes an image, serves it cold
through the emulated link and from a local file, runs real clients, and
writes well-formed JSON, Markdown and PNG that agree with each other.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_bench(arguments: list[str]) -> subprocess.CompletedProcess:
    """``python -m bench`` with these arguments, which must succeed."""
    done = subprocess.run(
        [sys.executable, "-m", "bench", *arguments],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done


def test_quick_mode_writes_json_markdown_and_png(tmp_path):
    """Quick mode on a 4 MiB image, the cold engine against nbdkit file, nbdcopy and fio:
    the JSON describes the machine and holds one run per scenario; the cold copy fetched
    the whole image through the counting link and the local file fetched nothing; the
    servers' CPU time is recorded beside each figure; the Markdown tabulates both; every
    plot it names is a real PNG."""
    for tool in ("nbdkit", "nbdcopy", "fio", "mkfs.erofs", "docker-registry"):
        if shutil.which(tool) is None:
            pytest.skip(f"the harness needs {tool}")
    out = tmp_path / "out"
    command = ["--quick", "--image-size", "4M", "--fio-seconds", "1", "--out", str(out)]
    command += ["--only", "engine-cold,nbdkit-file,nbdcopy,fio-qd1", "--workdir", str(tmp_path)]
    done = run_bench(command)
    assert "[bench " in done.stderr  # the progress line names each scenario

    document = json.loads((out / "results.json").read_text())
    machine = document["machine"]
    assert machine["cpus"] == os.cpu_count()
    assert machine["kernel"] == platform.release()
    assert "nbdkit" in machine["tools"]["nbdkit"]
    image = document["images"][0]
    runs = {(r["system"], r["workload"], r["network"]): r["runs"] for r in document["results"]}
    assert set(runs) == {  # "nbdcopy" names nbdcopy-sync too, as a prefix
        (system, workload, "wan-20ms-1g" if system == "engine-cold" else "loopback")
        for system in ("engine-cold", "nbdkit-file")
        for workload in ("nbdcopy", "nbdcopy-sync", "fio-qd1")
    }
    cold_copy = runs[("engine-cold", "nbdcopy", "wan-20ms-1g")][0]
    assert cold_copy["metrics"]["MiB/s"] > 0
    assert cold_copy["bytes_read"] == image["size"]
    assert cold_copy["registry"]["bytes"] >= image["size"]
    assert cold_copy["registry"]["blob_requests"] >= 1
    assert runs[("nbdkit-file", "nbdcopy", "loopback")][0]["registry"]["bytes"] == 0
    assert runs[("nbdkit-file", "fio-qd1", "loopback")][0]["metrics"]["IOPS"] > 0
    for system, network in (("engine-cold", "wan-20ms-1g"), ("nbdkit-file", "loopback")):
        cpu = runs[(system, "nbdcopy", network)][0]["metrics"]["server CPU s"]
        assert 0 <= cpu < 30, (system, cpu)  # the servers' own time, not the machine's
    cold_cpu = cold_copy["metrics"]["server CPU s"]
    assert cold_cpu > 0  # fetching, checking and storing 4 MiB takes a tick of CPU at least

    markdown = (out / "results.md").read_text()
    assert "| wan-20ms-1g | **engine-cold** |" in markdown
    assert "| loopback | **nbdkit-file** |" in markdown
    assert "| server CPU s |" in markdown
    plots = [line[line.index("(") + 1 : -1] for line in markdown.splitlines() if line[:2] == "!["]
    assert {"throughput.png", "latency.png", "bytes.png"} <= set(plots)
    for name in plots:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE), name
        width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        assert width > 200 and height > 200, name


def test_mount_runs_cold_then_with_the_trace_the_cold_run_recorded(tmp_path):
    """Mount-and-use on a 4 MiB image, cold and then traced: the traced run starts from an
    empty cache holding only the trace the cold run recorded, so it fetches no more than
    the cold run did. Both report what their clients read from the export (the server's
    own count), and the headline sets one against the other."""
    if os.geteuid() != 0:
        pytest.skip("mounting needs root")
    out = tmp_path / "out"
    command = ["--quick", "--image-size", "4M", "--out", str(out), "--workdir", str(tmp_path)]
    command += ["--only", "engine-cold,engine-traced,mount,wan-20ms-1g"]
    done = run_bench(command)
    document = json.loads((out / "results.json").read_text())
    runs = {r["system"]: r["runs"] for r in document["results"] if r["workload"] == "mount"}
    assert set(runs) == {"engine-cold", "engine-traced"}, done.stderr
    cold, traced = runs["engine-cold"][0], runs["engine-traced"][0]
    for run in (cold, traced):
        assert 0 < run["bytes_served"] <= run["registry"]["bytes"]
    assert traced["registry"]["bytes"] <= cold["registry"]["bytes"]
    markdown = (out / "results.md").read_text()
    assert "fetched ÷ served" in markdown
    assert "with a replayed trace: done" in markdown


def test_mount_all_reads_every_file_of_a_warm_cache_and_a_local_file(tmp_path):
    """The mount stack's hit path (mount-all) on a 4 MiB image, twice: the warm engine and
    nbdkit file each read every file of the tree the image was built from, no system
    that reads the registry runs it, the headline sets the engine against nbdkit file,
    and, as it drops the page cache, it runs after every repeat of the other workloads.
    Its ``--workdir`` does not exist yet: it is made, as ``--out`` is (before, the run
    ended at once in a traceback)."""
    if os.geteuid() != 0:
        pytest.skip("mounting needs root")
    out = tmp_path / "out"
    workdir = tmp_path / "scratch" / "bench"
    command = ["--quick", "--image-size", "4M", "--out", str(out), "--workdir", str(workdir)]
    command += ["--repeats", "2", "--fio-seconds", "0.5"]
    command += ["--only", "engine-warm,engine-cold,nbdkit-file,mount-all,fio-qd1"]
    done = run_bench(command)
    order = [line.split()[-1] for line in done.stderr.splitlines() if line.startswith("[bench ")]
    assert order.count("mount-all") == 4 and order.count("fio-qd1") == 6, order
    assert order.index("mount-all") > max(i for i, w in enumerate(order) if w == "fio-qd1")
    document = json.loads((out / "results.json").read_text())
    runs = {r["system"]: r["runs"] for r in document["results"] if r["workload"] == "mount-all"}
    assert set(runs) == {"engine-warm", "nbdkit-file"}, done.stderr
    image = document["images"][0]
    assert image["file bytes"] > 0
    for system, system_runs in runs.items():
        assert len(system_runs) == 2, system
        run = system_runs[0]
        assert run["bytes_read"] == image["file bytes"], system
        assert run["detail"]["files"] == image["regular files"], system
    assert (
        "the warm mount stack (mount-all: every file read): engine-warm"
        in (out / "results.md").read_text()
    )


def test_a_baseline_checkout_runs_beside_the_engine_in_the_same_repeats(tmp_path):
    """``--baseline`` with another checkout (a clone of this one, one commit on, whose
    package marks that it was imported): its commands, not this tree's, serve and warm
    the baseline's scenarios, in the same repeats as the engine's, and the report sets
    the engine against it by the ratio of the medians and by the repeats' own ratios,
    naming the baseline's commit."""
    for tool in ("nbdkit", "nbdcopy", "mkfs.erofs", "docker-registry", "git"):
        if shutil.which(tool) is None:
            pytest.skip(f"the harness needs {tool}")
    base = tmp_path / "base"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(base)], check=True)
    marker = "ran-from-this-checkout"
    with (base / "blockstore" / "__init__.py").open("a") as init:
        init.write(f"\n__import__('pathlib').Path(__file__).with_name({marker!r}).touch()\n")
    git = ["git", "-C", str(base), "-c", "user.name=bench", "-c", "user.email=bench@localhost"]
    subprocess.run([*git, "commit", "-qam", "a marked baseline"], check=True)
    commit = subprocess.run(
        [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    out = tmp_path / "out"
    command = ["--quick", "--image-size", "4M", "--out", str(out), "--workdir", str(tmp_path)]
    command += ["--repeats", "2", "--baseline", str(base)]
    command += ["--only", "engine-warm,baseline-warm,nbdcopy-sync"]
    done = run_bench(command)

    assert (base / "blockstore" / marker).exists(), done.stderr
    assert not (ROOT / "blockstore" / marker).exists()
    document = json.loads((out / "results.json").read_text())
    runs = {r["system"]: r["runs"] for r in document["results"]}
    assert set(runs) == {"engine-warm", "baseline-warm"}, done.stderr
    for system_runs in runs.values():
        assert [run["repeat"] for run in system_runs] == [0, 1]
        assert all(run["metrics"]["MiB/s"] > 0 for run in system_runs)
    markdown = (out / "results.md").read_text()
    assert f"## The engine against baseline ({commit}), in the same repeats" in markdown
    row = next(line for line in markdown.splitlines() if "engine-warm nbdcopy-sync" in line)
    ratios = [cell.strip() for cell in row.split("|")[-3:-1]]
    assert all(cell.endswith("x") and float(cell[:-1]) > 0 for cell in ratios), row
    assert f"baseline at {commit}" in markdown
