"""``blockstore trace export|import|ls|show|rm``: the access traces kept per layer.

A cold mount records which chunks it reads first; the next cold mount of
the same layer replays them as prefetch. ``export`` writes an image's
traces to one file and ``import`` loads such a file into another cache,
so a mount on another machine starts warm.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from blockstore.cache.traces import TraceShelf
from blockstore.cli.cache_cmds import human, open_store, resolve_targets
from blockstore.cli.common import add_cache_options
from blockstore.errors import NotFound, UsageError
from blockstore.prefetch.trace import Trace

FILE_KIND = "blockstore-traces"


def register(subparsers: argparse._SubParsersAction) -> None:
    trace = subparsers.add_parser("trace", help="manage the access traces replayed on cold mounts")
    commands = trace.add_subparsers(dest="trace_command", metavar="ACTION", required=True)

    def command(name: str, func, help: str) -> argparse.ArgumentParser:
        parser = commands.add_parser(name, help=help, description=help)
        add_cache_options(parser)
        parser.set_defaults(func=func)
        return parser

    export = command("export", cmd_export, "write the traces of an image's layers to a file")
    export.add_argument("image", metavar="IMAGE|DIGEST")
    export.add_argument("file", type=Path, metavar="FILE")
    load = command("import", cmd_import, "load traces from a file written by export")
    load.add_argument("file", type=Path, metavar="FILE")
    listing = command("ls", cmd_ls, "the kept traces: layer, chunks, span, when recorded")
    listing.add_argument("--json", action="store_true", help="print JSON")
    show = command("show", cmd_show, "the accesses of the traces of an image or layer")
    show.add_argument("targets", nargs="+", metavar="IMAGE|DIGEST")
    remove = command("rm", cmd_rm, "forget the traces of images or layers")
    remove.add_argument("targets", nargs="+", metavar="IMAGE|DIGEST")


def _traces_of(shelf: TraceShelf, store, targets: list[str]) -> list[Trace]:
    blobs, _ = resolve_targets(store, targets)
    traces = [t for t in (shelf.get(digest) for digest in blobs) if t is not None]
    if not traces:
        raise NotFound(f"no trace kept for {' '.join(targets)}")
    return traces


def cmd_export(args: argparse.Namespace) -> int:
    with open_store(args) as store:
        traces = _traces_of(TraceShelf(store), store, [args.image])
    document = {"kind": FILE_KIND, "traces": [t.to_record() for t in traces]}
    partial = args.file.with_name(args.file.name + ".partial")
    partial.write_text(json.dumps(document, separators=(",", ":")) + "\n")
    partial.replace(args.file)
    print(f"exported {len(traces)} trace(s) to {args.file}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    try:
        document = json.loads(args.file.read_text())
        if not isinstance(document, dict) or document.get("kind") != FILE_KIND:
            raise ValueError("not a file written by 'blockstore trace export'")
        traces = [Trace.from_record(record) for record in document["traces"]]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{args.file}: {exc}") from None
    with open_store(args) as store:
        shelf = TraceShelf(store)
        for trace in traces:
            shelf.put(trace)
    print(f"imported {len(traces)} trace(s)")
    return 0


def _row(trace: Trace) -> dict:
    return {
        "digest": trace.digest,
        "chunks": len(trace.order()),
        "bytes": len(trace.order()) * trace.chunk_size,
        "span_ms": trace.events[-1][0] if trace.events else 0,
        "recorded": trace.recorded,
    }


def cmd_ls(args: argparse.Namespace) -> int:
    with open_store(args) as store:
        rows = [_row(t) for t in TraceShelf(store).all()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(row["recorded"]))
        print(
            f"{row['digest']}  {row['chunks']} chunks ({human(row['bytes'])}) "
            f"over {row['span_ms'] / 1000:.1f}s, recorded {when}"
        )
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    with open_store(args) as store:
        traces = _traces_of(TraceShelf(store), store, args.targets)
    for trace in traces:
        print(f"{trace.digest}: {len(trace.events)} accesses")
        for ms, index in trace.events:
            print(f"  {ms:>8} ms  chunk {index}  (offset {index * trace.chunk_size})")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    with open_store(args) as store:
        shelf = TraceShelf(store)
        blobs, _ = resolve_targets(store, args.targets)
        removed = sum(shelf.remove(digest) for digest in blobs)
    if not removed:
        raise NotFound(f"no trace kept for {' '.join(args.targets)}")
    print(f"removed {removed} trace(s)")
    return 0
