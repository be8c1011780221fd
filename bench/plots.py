"""PNG plots of one results document (matplotlib, Agg: no display needed).

throughput.png: MiB/s and IOPS per system and workload, one column per
network; latency.png: fio's completion-latency percentiles; bytes.png:
registry bytes fetched against bytes the client read; rtt.png: cold
sequential throughput against round-trip time (full mode).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from bench.report import MiB, median, ordered, registry_median
from bench.runner import IN_PROCESS

DPI = 72


def draw(doc: dict, out: Path) -> list[str]:
    """Write every plot this document has data for; their file names."""
    if not doc["images"]:
        return []
    image = doc["images"][0]["name"]
    rows = [r for r in doc["results"] if r["image"] == image and r["runs"]]
    written = []
    for name, plot in (
        ("throughput.png", throughput),
        ("latency.png", latency),
        ("bytes.png", fetched_vs_read),
        ("rtt.png", rtt),
    ):
        figure = plot(rows, doc, image)
        if figure is not None:
            figure.savefig(out / name, dpi=DPI)
            plt.close(figure)
            written.append(name)
    return written


def sweep_names(doc: dict) -> set[str]:
    networks = {p["name"] for p in doc["plan"]["networks"]}
    return {p["name"] for p in doc["plan"]["rtt_sweep"]} - networks


def throughput(rows: list[dict], doc: dict, image: str):
    kept = [r for r in rows if r["network"] not in sweep_names(doc) and r["workload"] != "fleet"]
    panels = [
        ("MiB/s", [r for r in kept if r["primary"] == "MiB/s" and r["system"] != IN_PROCESS]),
        ("IOPS", [r for r in kept if r["primary"] == "IOPS"]),
    ]
    panels = [(metric, found) for metric, found in panels if found]
    networks = ordered(r["network"] for r in kept)
    if not panels:
        return None
    figure, axes = plt.subplots(
        len(panels),
        len(networks),
        figsize=(5.5 * len(networks), 3.8 * len(panels)),
        squeeze=False,
    )
    for i, (metric, found) in enumerate(panels):
        for j, network in enumerate(networks):
            bars(axes[i][j], [r for r in found if r["network"] == network], metric)
            axes[i][j].set_title(f"{metric}, {network}", fontsize=9)
    figure.suptitle(f"Throughput per system and workload ({image} image, log scale)")
    figure.tight_layout()
    return figure


def bars(axis, rows: list[dict], metric: str) -> None:
    workloads = ordered(r["workload"] for r in rows)
    systems = ordered(r["system"] for r in rows)
    width = 0.8 / max(1, len(workloads))
    for k, workload in enumerate(workloads):
        heights = []
        for system in systems:
            found = [r for r in rows if r["system"] == system and r["workload"] == workload]
            heights.append(median(found[0], metric) or 0 if found else 0)
        positions = [s + (k - (len(workloads) - 1) / 2) * width for s in range(len(systems))]
        axis.bar(positions, heights, width, label=workload)
    axis.set_xticks(range(len(systems)), systems, rotation=35, ha="right", fontsize=8)
    axis.set_yscale("log")
    axis.set_ylabel(metric)
    axis.legend(fontsize=7)
    axis.grid(axis="y", alpha=0.3)


def latency(rows: list[dict], doc: dict, image: str):
    found = [
        r for r in rows if r["workload"].startswith("fio") and r["network"] not in sweep_names(doc)
    ]
    panels = ordered((r["network"], r["workload"]) for r in found)
    if not panels:
        return None
    columns = min(2, len(panels))
    lines = (len(panels) + columns - 1) // columns
    figure, axes = plt.subplots(lines, columns, figsize=(6.5 * columns, 4 * lines), squeeze=False)
    for n, (network, workload) in enumerate(panels):
        axis = axes[n // columns][n % columns]
        for row in found:
            if (row["network"], row["workload"]) != (network, workload):
                continue
            percentiles = row["runs"][-1]["detail"].get("latency_ms", {})
            points = sorted((float(p), ms) for p, ms in percentiles.items())
            if points:
                axis.plot(
                    [ms for _, ms in points],
                    [p for p, _ in points],
                    marker=".",
                    label=row["system"],
                )
        axis.set_xscale("log")
        axis.set_xlabel("completion latency, ms (log)")
        axis.set_ylabel("percentile")
        axis.set_title(f"{workload}, {network}", fontsize=9)
        axis.legend(fontsize=7)
        axis.grid(alpha=0.3)
    for n in range(len(panels), lines * columns):
        axes[n // columns][n % columns].axis("off")
    figure.suptitle(f"4 KiB random-read latency distribution ({image} image)")
    figure.tight_layout()
    return figure


def fetched_vs_read(rows: list[dict], doc: dict, image: str):
    found = [
        r
        for r in rows
        if r["remote"] and r["network"] not in sweep_names(doc) and r["workload"] != "one-get"
    ]
    if not found:
        return None
    figure, axis = plt.subplots(figsize=(8, 5.5))
    markers = dict(zip(ordered(r["workload"] for r in found), "os^vD<>ph*", strict=False))
    colours = {s: f"C{i}" for i, s in enumerate(ordered(r["system"] for r in found))}
    low, high = float("inf"), 0.0
    for row in found:
        fetched = (registry_median(row, "bytes") or 0) / MiB
        read = (
            median({"runs": [{"metrics": {"r": run["bytes_read"]}} for run in row["runs"]]}, "r")
            / MiB
        )
        if fetched <= 0 or read <= 0:
            continue
        low, high = min(low, fetched, read), max(high, fetched, read)
        axis.scatter(
            read, fetched, marker=markers[row["workload"]], color=colours[row["system"]], s=50
        )
    if high == 0:
        plt.close(figure)
        return None
    axis.plot([low, high], [low, high], "k--", linewidth=0.8, label="fetched = read")
    for system, colour in colours.items():
        axis.scatter([], [], color=colour, label=system)
    for workload, marker in markers.items():
        axis.scatter([], [], color="grey", marker=marker, label=workload)
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlabel("bytes the client read, MiB (log)")
    axis.set_ylabel("bytes fetched from the registry, MiB (log)")
    axis.legend(fontsize=7, ncol=2)
    axis.grid(alpha=0.3)
    axis.set_title(f"Registry bytes against bytes read, cold systems ({image} image)")
    figure.tight_layout()
    return figure


def rtt(rows: list[dict], doc: dict, image: str):
    profiles = {p["name"]: p["rtt_ms"] for p in doc["plan"]["rtt_sweep"]}
    found = [
        r
        for r in rows
        if r["network"] in profiles
        and (r["workload"] == "one-get" or (r["workload"] == "nbdcopy" and r["system"] != "naive"))
    ]
    if len({r["network"] for r in found}) < 2:
        return None
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for system in ordered(r["system"] for r in found):
        points = sorted(
            (profiles[r["network"]], median(r, "MiB/s")) for r in found if r["system"] == system
        )
        label = "one GET (limit)" if system == "naive" else system
        xs = [x for x, y in points if y]
        ys = [y for x, y in points if y]
        axis.plot(xs, ys, marker="o", label=label)
    axis.set_xlabel("round-trip time, ms (bandwidth cap 1 Gbit/s)")
    axis.set_ylabel("cold sequential MiB/s (nbdcopy, log)")
    axis.set_yscale("log")
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    axis.set_title(f"Cold throughput against RTT ({image} image)")
    figure.tight_layout()
    return figure
