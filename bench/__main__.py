"""``python -m bench``: parse the command line, run the plan, write the results."""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
import time
from pathlib import Path

from bench import machine, plots, report
from bench.link import LOOPBACK, wan
from bench.processes import BenchError, compile_engine
from bench.runner import Findings, Plan, run
from bench.systems import EngineVariant
from bench.workloads import (
    Clients,
    Copy,
    Fleet,
    MountAndUse,
    MountReadAll,
    OneGet,
    RandomReads,
)

MiB = 1 << 20
UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str) -> int:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([KMG]?)(?:i?B)?", text.strip(), re.IGNORECASE)
    if match is None:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 64M or 1G)")
    size = int(float(match[1]) * UNITS.get(match[2].upper(), 1))
    if size < MiB:
        raise argparse.ArgumentTypeError("an image of at least 1M, please")
    return size


def parse_variant(text: str) -> EngineVariant:
    name, sep, args = text.partition("=")
    if not sep or not name or not name.replace("-", "").isalnum():
        raise argparse.ArgumentTypeError(
            f"{text!r}: give NAME=ARGS, e.g. noreadahead=--no-readahead"
        )
    return EngineVariant(name, tuple(shlex.split(args)))


def baseline_variant(checkout: Path, serve_args: tuple[str, ...]) -> EngineVariant:
    """The engine of another checkout, as the variant named ``baseline``."""
    root = checkout.resolve()
    if not (root / "blockstore" / "__main__.py").is_file():
        raise BenchError(f"--baseline {checkout}: not a checkout of this engine")
    return EngineVariant("baseline", serve_args, str(root), machine.commit_of(root))


def arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="This engine against nbdkit curl, nbdkit file, nbd-server and one "
        "whole-blob GET, on one image, through one emulated network.",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="mode", action="store_const", const="quick")
    mode.add_argument("--full", dest="mode", action="store_const", const="full")
    parser.set_defaults(mode="quick")
    parser.add_argument("--repeats", type=int, default=None, help="runs of each scenario")
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="output dir")
    parser.add_argument("--image-size", type=parse_size, default=None, help="e.g. 64M, 1G")
    parser.add_argument("--compression", default=None, help="lz4hc, none, or both: lz4hc,none")
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        help="run only these systems, workloads, networks or images (comma-separated, "
        "a name or its prefix: engine, curl-cache, fio, mount, wan-20ms-1g)",
    )
    parser.add_argument(
        "--engine-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="one more argument to the engine's `blockstore serve` (repeatable)",
    )
    parser.add_argument(
        "--engine-variant",
        action="append",
        type=parse_variant,
        default=[],
        metavar="NAME=ARGS",
        help="also run the engine with these serve arguments, named NAME (repeatable)",
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        default=None,
        metavar="CHECKOUT",
        help="also run another checkout of the engine, with the same serve arguments, "
        "as baseline-cold, baseline-warm, ...: before and after in one run",
    )
    parser.add_argument("--fio-seconds", type=float, default=None)
    parser.add_argument("--workdir", type=Path, default=None, help="where scratch files go")
    args = parser.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def make_plan(args: argparse.Namespace) -> Plan:
    full = args.mode == "full"
    fio_seconds = args.fio_seconds or (5.0 if full else 2.0)
    workloads = [
        OneGet(),
        Copy("nbdcopy", []),
        Copy("nbdcopy-sync", ["--connections=1", "--synchronous"]),
        RandomReads(1, fio_seconds),
        RandomReads(16, fio_seconds),
        MountAndUse(),
        MountReadAll(),
    ]
    if full:
        workloads += [Clients("clients-4", 4, 1), Clients("two-servers", 2, 2), Fleet(3)]
    compressions = (args.compression or ("lz4hc,none" if full else "lz4hc")).split(",")
    for compression in compressions:
        if compression not in ("lz4hc", "none"):
            raise BenchError(f"--compression {compression}: lz4hc or none")
    variants = [EngineVariant("engine", tuple(args.engine_arg)), *args.engine_variant]
    if args.baseline is not None:
        variants.append(baseline_variant(args.baseline, tuple(args.engine_arg)))
    return Plan(
        mode=args.mode,
        repeats=args.repeats or (3 if full else 1),
        image_size=args.image_size or ((256 if full else 48) * MiB),
        compressions=compressions,
        networks=[LOOPBACK, wan(20, 1000), wan(20, 100)] if full else [wan(20, 1000)],
        sweep=[wan(rtt, 1000) for rtt in (0, 5, 20, 50)] if full else [],
        workloads=workloads,
        variants=variants,
        only=[term for value in args.only for term in value.split(",") if term],
        in_process_seconds=1.0 if full else 0.5,
        workdir=args.workdir,
        excluded={}
        if full
        else {("curl", "mount"): "quick mode leaves it out (about 45 s at 20 ms RTT)"},
    )


def main(argv: list[str]) -> int:
    args = arguments(argv)
    try:
        plan = make_plan(args)
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    compile_engine()
    for variant in plan.variants:
        if variant.checkout is not None:
            compile_engine(Path(variant.checkout))
    started = time.time()
    described = machine.describe()
    found = Findings()

    def document(complete: bool) -> dict:
        return report.document(plan, described, found, started, complete)

    def checkpoint() -> None:
        """The JSON so far, so a run cut short keeps what it measured."""
        write_json(args.out, document(complete=False))

    try:
        run(plan, found, checkpoint)
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted; writing what was measured", file=sys.stderr)
        write_all(args.out, document(complete=False))
        return 130
    write_all(args.out, document(complete=True))
    return 0


def write_json(out: Path, doc: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    partial = out / "results.json.tmp"
    partial.write_text(json.dumps(doc, indent=1) + "\n")
    partial.replace(out / "results.json")


def write_all(out: Path, doc: dict) -> None:
    write_json(out, doc)
    figures = plots.draw(doc, out)
    (out / "results.md").write_text(report.markdown(doc, figures))
    print(f"bench: wrote {out}/results.json, results.md, {', '.join(figures)}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
