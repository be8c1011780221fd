"""``blockstore trace export|import|push|ls|show|rm``: the access traces kept per layer.

A cold mount records which 4 KiB blocks it reads first; the next cold mount
of the same layer replays them as prefetch. ``export`` writes an image's
traces to one file and ``import`` loads such a file into another cache,
so a mount on another machine starts warm; ``push`` attaches them to the
image in the registry, where a cold mount anywhere finds and replays them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

from blockstore.cache import ChunkStore
from blockstore.cache.traces import TraceShelf
from blockstore.cli.cache_cmds import existing_cache_dir, open_store, resolve_targets
from blockstore.cli.common import (
    add_cache_options,
    add_registry_options,
    image_argument,
    is_standard_stream,
    keep_traces,
    open_image_from_args,
    read_trace_file,
    say,
    write_whole,
)
from blockstore.errors import NotFound, UsageError
from blockstore.prefetch.trace import Trace, traces_document
from blockstore.progress import human


def register(subparsers: argparse._SubParsersAction) -> None:
    trace = subparsers.add_parser("trace", help="manage the access traces replayed on cold mounts")
    commands = trace.add_subparsers(dest="trace_command", metavar="ACTION", required=True)

    def command(
        name: str, func: Callable[[argparse.Namespace], int], help: str
    ) -> argparse.ArgumentParser:
        parser = commands.add_parser(name, help=help, description=help)
        add_cache_options(parser, size=False)
        parser.set_defaults(func=func)
        return parser

    export = command("export", cmd_export, "write the traces of an image's layers to a file")
    export.add_argument("image", metavar="IMAGE|DIGEST")
    export.add_argument("file", type=Path, metavar="FILE", help="- for standard output")
    push = command("push", cmd_push, "attach the image's traces to it in the registry")
    push.add_argument("image", type=image_argument, metavar="IMAGE")
    add_registry_options(push)
    load = command("import", cmd_import, "load traces from a file written by export")
    load.add_argument("file", type=Path, metavar="FILE", help="- for standard input")
    listing = command(
        "ls",
        cmd_ls,
        "the kept traces (of the images or layers named, else all): layer, "
        "blocks, span, when recorded",
    )
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.add_argument("targets", nargs="*", metavar="IMAGE|DIGEST")
    show = command("show", cmd_show, "the accesses of the traces of an image or layer")
    show.add_argument("targets", nargs="+", metavar="IMAGE|DIGEST")
    remove = command("rm", cmd_rm, "forget the traces of images or layers")
    remove.add_argument("targets", nargs="+", metavar="IMAGE|DIGEST")


def _traces_of(shelf: TraceShelf, store: ChunkStore, targets: list[str]) -> list[Trace]:
    blobs, _ = resolve_targets(store, targets)
    traces = [t for t in (shelf.get(digest) for digest in blobs) if t is not None]
    if not traces:
        raise NotFound(f"no trace kept for {' '.join(targets)}")
    return traces


def _traces_to_export(store: ChunkStore, args: argparse.Namespace) -> list[Trace]:
    """The traces of the image named. Where it is not found and FILE names an image the
    cache holds, the two were given the wrong way round: said so, not that the file's
    name is no cached image."""
    try:
        return _traces_of(TraceShelf(store), store, [args.image])
    except NotFound:
        if _names_cached_image(store, str(args.file)):
            raise UsageError(
                f"{args.image} names nothing in the cache, and FILE, {args.file}, names an "
                "image or a layer: the arguments are the wrong way round: blockstore trace "
                "export IMAGE|DIGEST FILE"
            ) from None
        raise


def _names_cached_image(store: ChunkStore, text: str) -> bool:
    """Whether ``text`` names a cached image, or a layer digest: no file name does."""
    try:
        resolve_targets(store, [text])
    except (UsageError, NotFound):  # UsageError: no reference at all
        return False
    return True


def cmd_export(args: argparse.Namespace) -> int:
    with open_store(args, looks=True) as store:
        traces = _traces_to_export(store, args)
    document = traces_document(traces)
    if is_standard_stream(args.file):
        sys.stdout.buffer.write(document)  # the output is the document, and nothing else
        return 0
    write_whole(args.file, document)
    say(args, f"exported {len(traces)} trace(s) to {args.file}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    traces = read_trace_file(args.file)
    with open_store(args, create=True) as store:
        count = keep_traces(store, traces)
    say(args, f"imported {count} trace(s)")
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    # Imported here: the registry client is loaded only by the commands that use it.
    from blockstore.attachments import push_traces, subject_of
    from blockstore.registry.mediatypes import compressed_tar

    existing_cache_dir(args)  # the traces to push are in it: a missing one holds none
    image = open_image_from_args(args, needs_registry=True)
    try:
        # A compressed tar layer is replayed by no trace (its span pump reads it whole,
        # in order): one kept for it (an earlier version recorded its indexing pass)
        # is not published, and one attached already is dropped from the artifact.
        layers = [layer for layer in image.resolved.layers if not compressed_tar(layer.media_type)]
        shelf = TraceShelf(image.store)
        local = [t for t in (shelf.get(layer.digest) for layer in layers) if t]
        if not local:
            raise NotFound(f"no trace kept for {image.resolved.reference}: mount it first")
        subject = subject_of(image.resolved, image.repository)
        digest, merged = push_traces(image.client, subject, layers, local)
    finally:
        image.close()
    say(args, f"{merged} trace(s) attached to {subject.digest} as {digest}")
    return 0


def _row(trace: Trace) -> dict:
    return {
        "digest": trace.digest,
        "blocks": len(trace.order()),
        "unit": trace.unit,
        "bytes": len(trace.order()) * trace.unit,
        "span_ms": trace.span_ms,
        "recorded": trace.recorded,
    }


def cmd_ls(args: argparse.Namespace) -> int:
    with open_store(args, looks=True) as store:
        shelf = TraceShelf(store)
        traces = _traces_of(shelf, store, args.targets) if args.targets else shelf.all()
        rows = [_row(t) for t in traces]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        say(args, "no traces kept")  # as ``mounts`` says it has none: an empty output looks broken
        return 0
    for row in rows:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(row["recorded"]))
        print(
            f"{row['digest']}  {row['blocks']} block{'' if row['blocks'] == 1 else 's'} of "
            f"{human(row['unit'])} "
            f"({human(row['bytes'])}) "
            f"over {row['span_ms'] / 1000:.1f}s, recorded {when}"
        )
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    with open_store(args, looks=True) as store:
        traces = _traces_of(TraceShelf(store), store, args.targets)
    for trace in traces:
        print(f"{trace.digest}: {len(trace.events)} accesses")
        for ms, first, count in trace.events:
            start, nbytes = first * trace.unit, count * trace.unit
            print(f"  {ms:>8} ms  offset {start}, {human(nbytes)}")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    with open_store(args) as store:
        shelf = TraceShelf(store)
        blobs, _ = resolve_targets(store, args.targets)
        removed = sum(shelf.remove(digest) for digest in blobs)
    if not removed:
        raise NotFound(f"no trace kept for {' '.join(args.targets)}")
    say(args, f"removed {removed} trace(s)")
    return 0
