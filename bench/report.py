"""Results as one JSON document and as Markdown tables of medians, ratios and limits.

Every ratio column is a speed ratio: above 1 means the row does better than
the column's system (for times, the column's time over the row's). Cold
figures are also given as a fraction of the one-GET limit on the same
network: the whole blob in one GET through the same link.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict

from bench.link import LOOPBACK
from bench.runner import IN_PROCESS, Findings, Plan

MiB = 1 << 20
LIMIT_WORKLOAD = "one-get"
NO_LIMIT = {"fio-qd1", "fio-qd16", LIMIT_WORKLOAD}
"""Workloads for which one whole-blob GET is no limit (random reads stop at a time)."""


def document(plan: Plan, machine: dict, found: Findings, started: float, complete: bool) -> dict:
    return {
        "mode": plan.mode,
        "complete": complete,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "seconds": round(time.time() - started, 1),
        "machine": machine,
        "plan": {
            "repeats": plan.repeats,
            "image_size": plan.image_size,
            "networks": [asdict(p) for p in plan.networks],
            "rtt_sweep": [asdict(p) for p in plan.sweep],
            "workloads": [w.name for w in plan.workloads],
            "engine_variants": [asdict(v) for v in plan.variants],
            "only": plan.only,
        },
        "images": found.images,
        "skipped": found.skipped,
        "results": [asdict(r) for r in found.results],
    }


def values(result: dict, metric: str) -> list[float]:
    return [run["metrics"][metric] for run in result["runs"] if metric in run["metrics"]]


def median(result: dict, metric: str) -> float | None:
    found = values(result, metric)
    return statistics.median(found) if found else None


def registry_median(result: dict, key: str) -> float | None:
    found = [run["registry"][key] for run in result["runs"] if "registry" in run]
    return statistics.median(found) if found else None


def speed_ratio(own: float | None, other: float | None, higher_is_better: bool) -> float | None:
    if not own or not other:
        return None
    return own / other if higher_is_better else other / own


class Index:
    """Results of one document, found by (image, network, system, workload)."""

    def __init__(self, doc: dict):
        self.results = doc["results"]
        self.by_key = {
            (r["image"], r["network"], r["system"], r["workload"]): r for r in self.results
        }

    def peer(self, row: dict, system: str) -> dict | None:
        """``system``'s result beside ``row``: same network, or its only (local) one."""
        image, network, workload = row["image"], row["network"], row["workload"]
        found = self.by_key.get((image, network, system, workload))
        if found is None:
            found = self.by_key.get((image, LOOPBACK.name, system, workload))
            if found is not None and found["remote"]:
                return None
        return found

    def limit(self, row: dict) -> dict | None:
        if not row["remote"] or row["workload"] in NO_LIMIT or row["workload"].startswith("fleet"):
            return None
        return self.by_key.get((row["image"], row["network"], "naive", LIMIT_WORKLOAD))


def limit_ratio(index: Index, row: dict) -> float | None:
    limit = index.limit(row)
    if limit is None:
        return None
    own = median(row, row["primary"])
    if row["primary"] == "MiB/s":
        return speed_ratio(own, median(limit, "MiB/s"), True)
    return speed_ratio(own, median(limit, "s"), False)


def figure(result: dict, metric: str) -> str:
    found = values(result, metric)
    if not found:
        return "—"
    mid = statistics.median(found)
    if len(found) == 1:
        return number(mid)
    return f"{number(mid)} [{number(min(found))}, {number(max(found))}]"


def number(x: float) -> str:
    if x >= 100:
        return f"{x:,.0f}"
    if x >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}" if x >= 0.1 else f"{x:.3f}"


def ratio(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}x" if x < 10 else f"{x:.0f}x"


def markdown(doc: dict, figures: list[str]) -> str:
    index = Index(doc)
    out = [f"# Benchmark results ({doc['mode']} mode, {doc['started']})", ""]
    if not doc["complete"]:
        out += ["**This run was cut short: the tables hold what it measured.**", ""]
    out += machine_lines(doc)
    out += headline(doc, index)
    out += before_and_after(doc, index)
    for image in doc["images"]:
        workloads = ordered(r["workload"] for r in doc["results"] if r["image"] == image["name"])
        for workload in workloads:
            rows = [
                r
                for r in doc["results"]
                if r["image"] == image["name"]
                and r["workload"] == workload
                and r["system"] != IN_PROCESS
            ]
            if rows:
                out += table(image, workload, rows, index)
        out += in_process_table(image, doc["results"])
    if doc["skipped"]:
        out += ["## Skipped", ""] + [f"- {line}" for line in doc["skipped"]] + [""]
    errors = [e for r in doc["results"] for e in r["errors"]]
    if errors:
        out += ["## Failed runs", ""] + [f"- {e}" for e in errors] + [""]
    if figures:
        out += ["## Plots", ""] + [f"![{name}]({name})" for name in figures] + [""]
    return "\n".join(out)


def ordered(items) -> list:
    return list(dict.fromkeys(items))


def machine_lines(doc: dict) -> list[str]:
    m = doc["machine"]
    tools = "; ".join(f"{name}: {version}" for name, version in m["tools"].items())
    plan = doc["plan"]
    networks = ", ".join(
        f"{p['name']} ({p['rtt_ms']:g} ms RTT, {p['mbit'] or 'no cap'} Mbit/s)"
        for p in plan["networks"]
    )
    others = "".join(
        f", {v['label']} at {v['commit']}"
        for v in plan["engine_variants"]
        if v.get("checkout") is not None
    )
    lines = [
        f"Machine: {m['cpus']} CPUs ({m['cpu']}), {m['memory_gib']} GiB, kernel {m['kernel']}, "
        f"Python {m['python']}, engine at {m['engine_commit']}{others}, load average at start "
        f"{' '.join(str(x) for x in m['load_average'])}.",
        "",
        f"Tools: {tools}.",
        "",
        f"Plan: {plan['repeats']} repeat(s), networks for cold systems: {networks}; "
        "warm and local systems run on loopback. "
        f"Whole run: {doc['seconds']:.0f} s.",
        "",
    ]
    for image in doc["images"]:
        lines.append(
            f"Image `{image['name']}`: {image['size'] / MiB:.1f} MiB EROFS "
            f"({image['compression']}), {image['files']} files, {image['digest'][:19]}…"
        )
    lines += [
        "",
        "Each cell: median [min, max] over the repeats. Ratio columns are speed ratios "
        "(above 1: the row does better than that system on the same network; a local "
        "system's single figure is used on every network). `÷ one-get`: the cold figure "
        "as a fraction of one whole-blob GET through the same link.",
        "",
    ]
    return lines


def table(image: dict, workload: str, rows: list[dict], index: Index) -> list[str]:
    primary = rows[0]["primary"]
    better = "higher is better" if rows[0]["higher_is_better"] else "lower is better"
    metrics = ordered(m for r in rows for run in r["runs"] for m in run["metrics"])
    systems = ordered(r["system"] for r in rows)
    served = any(run.get("bytes_served") for r in rows for run in r["runs"])
    head = ["network", "system", *metrics, "registry MiB", "requests", "fetched ÷ read"]
    head += ["fetched ÷ served"] if served else []
    head += ["÷ one-get"] + [f"vs {s}" for s in systems]
    lines = [
        f"## `{image['name']}` image, {workload} ({primary}, {better})",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for row in rows:
        fetched = registry_median(row, "bytes")
        read = statistics.median([run["bytes_read"] for run in row["runs"]] or [0])
        requests = registry_median(row, "requests")
        cells = [row["network"], f"**{row['system']}**"]
        cells += [figure(row, m) for m in metrics]
        cells += [
            "—" if fetched is None else number(fetched / MiB),
            "—" if requests is None else f"{requests:.0f}",
            "—" if fetched is None or not read else f"{fetched / read:.2f}",
        ]
        if served:
            by_server = [run["bytes_served"] for run in row["runs"] if run.get("bytes_served")]
            cells.append(
                f"{fetched / statistics.median(by_server):.2f}"
                if fetched is not None and by_server
                else "—"
            )
        cells.append(ratio(limit_ratio(index, row)))
        own = median(row, primary)
        for system in systems:
            peer = index.peer(row, system) if system != row["system"] else None
            cells.append(
                ratio(speed_ratio(own, median(peer, primary), row["higher_is_better"]))
                if peer
                else "—"
            )
        if not row["runs"]:
            cells[2] = "failed"
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


def in_process_table(image: dict, results: list[dict]) -> list[str]:
    """The cache read in this process: one row per read method and size."""
    rows = [r for r in results if r["image"] == image["name"] and r["system"] == IN_PROCESS]
    if not rows:
        return []
    lines = [
        f"## `{image['name']}` image, the cache in process ({IN_PROCESS}, no NBD, no network)",
        "",
        "| what | MiB/s | reads/s |",
        "|---|---|---|",
    ]
    for row in rows:
        lines.append(f"| {row['workload']} | {figure(row, 'MiB/s')} | {figure(row, 'reads/s')} |")
    return [*lines, ""]


def headline(doc: dict, index: Index) -> list[str]:
    """The three comparisons a user picks an engine on, where this run measured them."""
    lines = ["## Headline", ""]
    engines = [v["label"] for v in doc["plan"]["engine_variants"]]
    wan = [p["name"] for p in doc["plan"]["networks"] if p["rtt_ms"]]
    for image in doc["images"]:
        for label in engines:
            for network in wan:
                row = index.by_key.get((image["name"], network, f"{label}-cold", "nbdcopy"))
                if row and row["runs"]:
                    lines.append(
                        f"- `{image['name']}`, cold sequential (nbdcopy) on {network}: "
                        f"{label}-cold {figure(row, 'MiB/s')} MiB/s = "
                        f"{compare(index, row, 'curl-cache')} curl-cache, "
                        f"{ratio(limit_ratio(index, row))} of the one-GET limit."
                    )
            for workload in ("fio-qd1", "fio-qd16"):
                key = (image["name"], LOOPBACK.name, f"{label}-warm", workload)
                row = index.by_key.get(key)
                if row and row["runs"]:
                    lines.append(
                        f"- `{image['name']}`, warm 4 KiB random reads ({workload}): "
                        f"{label}-warm {figure(row, 'IOPS')} IOPS = "
                        f"{compare(index, row, 'curl-cache-warm')} curl-cache-warm, "
                        f"{compare(index, row, 'nbdkit-file')} nbdkit-file."
                    )
            row = index.by_key.get((image["name"], LOOPBACK.name, f"{label}-warm", "mount-all"))
            if row and row["runs"]:
                lines.append(
                    f"- `{image['name']}`, the warm mount stack (mount-all: every file read): "
                    f"{label}-warm {figure(row, 'done s')} s = "
                    f"{compare(index, row, 'nbdkit-file')} nbdkit-file."
                )
            lines += mount_headline(doc, index, image["name"], label, wan)
        for network in wan:
            parts = []
            for row in doc["results"]:
                key = (row["image"], row["network"], row["workload"])
                if key == (image["name"], network, "mount") and row["runs"]:
                    fetched = registry_median(row, "bytes") or 0
                    read = statistics.median(run["bytes_read"] for run in row["runs"])
                    parts.append(
                        f"{row['system']} {fetched / MiB:.1f} MiB for {read / MiB:.1f} MiB "
                        f"({figure(row, 'done s')} s)"
                    )
            if parts:
                lines.append(
                    f"- `{image['name']}`, mount-and-use on {network}, fetched for read: "
                    + "; ".join(parts)
                    + "."
                )
    return [*lines, ""]


def mount_headline(
    doc: dict, index: Index, image: str, label: str, networks: list[str]
) -> list[str]:
    """Cold mount-and-use as the fetch engine's goals read it: the first listing over the
    warm one in round trips, bytes fetched for bytes read, and what a trace buys."""
    rtts = {p["name"]: p["rtt_ms"] / 1000 for p in doc["plan"]["networks"]}
    warm = index.by_key.get((image, LOOPBACK.name, f"{label}-warm", "mount"))
    lines = []
    for network in networks:
        cold = index.by_key.get((image, network, f"{label}-cold", "mount"))
        if not cold or not cold["runs"]:
            continue
        line = f"- `{image}`, cold mount-and-use on {network}: first listing "
        if warm and warm["runs"]:
            over = median(cold, "first listing s") - median(warm, "first listing s")
            line += f"{over:+.3f} s over warm ({over / rtts[network]:.1f} RTT)"
        else:
            line += f"{figure(cold, 'first listing s')} s"
        line += f", done {figure(cold, 'done s')} s, fetched ÷ read {fetched_per_read(cold):.2f}"
        traced = index.by_key.get((image, network, f"{label}-traced", "mount"))
        if traced and traced["runs"]:
            line += (
                f"; with a replayed trace: done {figure(traced, 'done s')} s "
                f"({median(traced, 'done s') / median(cold, 'done s'):.2f}x the time), "
                f"fetched ÷ read {fetched_per_read(traced):.2f}"
            )
        lines.append(line + ".")
    return lines


def before_and_after(doc: dict, index: Index) -> list[str]:
    """Each scenario of the engine against the same scenario of another checkout run
    in the same repeats (``--baseline``): the ratio of the medians, and the median of
    the repeats' own ratios, whose two runs were back to back."""
    lines: list[str] = []
    for variant in doc["plan"]["engine_variants"]:
        if variant.get("checkout") is None:
            continue
        label = variant["label"]
        lines += [
            f"## The engine against {label} ({variant['commit']}), in the same repeats",
            "",
            "Speed ratios, above 1: the engine does better. Paired: the median of each "
            "repeat's own ratio.",
            "",
            "| image | network | scenario | engine | "
            + label
            + " | engine ÷ "
            + label
            + " | paired |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in doc["results"]:
            system = row["system"]
            if not system.startswith(f"{label}-"):
                continue
            mine = index.by_key.get(
                (row["image"], row["network"], "engine" + system[len(label) :], row["workload"])
            )
            if mine is None or not mine["runs"] or not row["runs"]:
                continue
            primary, higher = row["primary"], row["higher_is_better"]
            lines.append(
                f"| {row['image']} | {row['network']} | {mine['system']} {row['workload']} "
                f"({primary}) | {figure(mine, primary)} | {figure(row, primary)} | "
                f"{ratio(speed_ratio(median(mine, primary), median(row, primary), higher))} | "
                f"{ratio(paired_ratio(mine, row))} |"
            )
        lines.append("")
    return lines


def paired_ratio(mine: dict, other: dict) -> float | None:
    """The median over the repeats both ran of ``mine``'s speed ratio to ``other``."""
    primary, higher = mine["primary"], mine["higher_is_better"]
    theirs = {
        run.get("repeat"): run["metrics"][primary]
        for run in other["runs"]
        if primary in run["metrics"]
    }
    found = [
        speed_ratio(run["metrics"][primary], theirs.get(run.get("repeat")), higher)
        for run in mine["runs"]
        if primary in run["metrics"] and run.get("repeat") is not None
    ]
    found = [x for x in found if x is not None]
    return statistics.median(found) if found else None


def fetched_per_read(row: dict) -> float:
    read = statistics.median(run["bytes_read"] for run in row["runs"])
    return (registry_median(row, "bytes") or 0) / read if read else 0.0


def compare(index: Index, row: dict, system: str) -> str:
    peer = index.peer(row, system)
    if peer is None:
        return "(not measured)"
    own = median(row, row["primary"])
    return ratio(speed_ratio(own, median(peer, row["primary"]), row["higher_is_better"]))
