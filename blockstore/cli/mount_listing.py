"""What ``blockstore mounts`` shows: each mount's image, layers, state and how much of
it is cached, as a table or JSON, and for a mount hidden or broken, what to run next.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from pathlib import Path

from blockstore.cli.mount_layers import with_layers
from blockstore.logformat import count_trouble
from nbdfront.mount import finding, listing
from nbdfront.mount.commands import printable, shell_word, umount_command
from nbdfront.mount.records import MountRecord


def served_layers(record: MountRecord) -> str:
    """``3`` for a whole three-layer image; ``layer 1 of 3`` for one layer mounted alone."""
    mounted = record.info.get("layers") or []
    total = record.info.get("image_layers")
    indexes = [layer["index"] for layer in mounted if "index" in layer]
    if not total or not indexes or len(indexes) == total:
        return str(len(record.attachments))
    noun = "layer" if len(indexes) == 1 else "layers"
    return f"{noun} {', '.join(map(str, indexes))} of {total}"


def percent(fraction: float) -> str:
    """A cached fraction for people: one decimal under 10%, and a layer partly cached
    never shown as 0% or 100%, which would say nothing or everything is there."""
    if fraction <= 0:
        return "0%"
    if fraction >= 1:
        return "100%"
    shown = fraction * 100
    if shown < 0.1:
        return "<0.1%"
    if shown < 9.95:
        return f"{shown:.1f}%"
    return f"{min(round(shown), 99)}%"


def with_warnings(state: str, warnings: int) -> str:
    """A mount's state for people, with the warnings and errors its server logged so
    far (a read answered EIO, the cache found damaged and moved aside): they do not
    stop the mount, and would otherwise show only at ``umount``."""
    if not warnings:
        return state
    return f"{state}, {warnings} warning{'s' if warnings > 1 else ''} in its log"


CACHE_ANSWER_SECONDS = 3.0
"""How long ``mounts`` waits for a mount's cache to say how much it holds: it is opened
to look (``looking``), but an open that must write (a cache of an older format brought
up) waits for its write lock, which a process stopped while writing (Ctrl-Z on a
prefetch) holds for as long as it is stopped."""

_unanswered: set[Path] = set()


def cached_fractions(record: MountRecord) -> list[float | None]:
    """How much of each mounted layer is in the cache now (None where the cache cannot
    say, or does not within ``CACHE_ANSWER_SECONDS``: the listing is not held up).

    A compressed tar layer is read from its decompressed tar, which the cache keeps
    under the tar's own digest: that is the fraction shown for it, or None where the
    cache keeps no index to name that tar (a mount with a local ``--tarindex``).
    """
    from blockstore.cache.layout import holds_cache

    layers = record.info.get("layers") or []
    unknown: list[float | None] = [None] * len(layers)
    if not layers or not record.info.get("cache_dir"):
        return unknown
    cache_dir = Path(record.info["cache_dir"])
    if cache_dir in _unanswered or not holds_cache(cache_dir):
        return unknown  # its cache silent before, or moved or removed since
    answer: list[list[float | None]] = []
    looking = threading.Thread(
        target=lambda: answer.append(_fractions_in(cache_dir, layers)),
        name="cache-look",
        daemon=True,  # left waiting on the lock if it must be: the command ends anyway
    )
    looking.start()
    looking.join(CACHE_ANSWER_SECONDS)
    if answer:
        return answer[0]
    _unanswered.add(cache_dir)
    print(
        f"blockstore: the cache at {cache_dir} did not answer within "
        f"{CACHE_ANSWER_SECONDS:.0f}s (a process stopped while writing to it holds its "
        "lock): how much its mounts hold is shown as ?",
        file=sys.stderr,
    )
    return unknown


def _fractions_in(cache_dir: Path, layers: list[dict]) -> list[float | None]:
    """``cached_fractions``' answer from the cache itself; all None where it cannot give
    one (damaged, not readable by this user): ``mounts`` lists what is mounted whatever
    state its cache is in, and shows what it cannot say as ?."""
    from blockstore.cache import ChunkStore
    from blockstore.cache.env import looking
    from blockstore.registry.mediatypes import compressed_tar
    from blockstore.tarlayer.indexcache import IndexCache

    try:
        with looking(), ChunkStore(cache_dir) as store:
            present = {blob.digest: blob.cached_fraction for blob in store.blobs()}
            indexes = IndexCache(store)
            read_from = [
                indexes.tar_digest(layer["digest"])
                if compressed_tar(layer.get("mediaType") or "")
                else layer["digest"]
                for layer in layers
            ]
    except Exception:
        return [None] * len(layers)
    return [present.get(digest, 0.0) if digest else None for digest in read_from]


def run_mounts(args: argparse.Namespace) -> int:
    statuses = listing.list_mounts()
    rows = []
    for st in statuses:
        record = with_layers(st.record)
        rows.append(
            {
                "mountpoint": record.mountpoint,
                "image": record.image if st.recorded else None,
                "recorded": st.recorded,
                "layers": len(record.attachments) if st.recorded else None,
                "layer_indexes": [layer.get("index") for layer in record.info.get("layers", [])],
                "image_layers": record.info.get("image_layers"),
                "served": served_layers(record) if st.recorded else "?",
                "via": record.method or None,
                "state": st.state,
                "hidden_by": st.hidden_by,
                "server_pid": record.server.pid if record.server else None,
                "metrics": record.metrics,
                "cached": cached_fractions(record),
                "cache_dir": record.info.get("cache_dir"),
                "mount_seconds": record.mount_seconds,
                "log": record.log,
                "warnings": count_trouble(Path(record.log)),
            }
        )
    for run, count in listing.other_run_dirs().items():
        what = "1 mount" if count == 1 else f"{count} mounts"
        print(
            f"blockstore: {what} made with another run directory, {run}, not listed here: "
            f"`BLOCKSTORE_RUN_DIR={shell_word(run)} blockstore mounts` lists "
            f"{'it' if count == 1 else 'them'}",
            file=sys.stderr,
        )
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        if args.quiet <= 0:
            print("no blockstore mounts")
        return 0
    print_table(rows)
    for row in rows:
        print_what_to_do(row)
    return 0


def print_table(rows: list[dict]) -> None:
    """The mounts for people: a row each, then the line naming its server's log where
    there is one (a mount gone bad is read about there), under the row rather than a
    column, whose long path would push the table past a terminal's width."""
    table = [("MOUNTPOINT", "IMAGE", "LAYERS", "VIA", "STATE", "CACHED")]
    for row in rows:
        cached = " ".join("?" if f is None else percent(f) for f in row["cached"]) or "?"
        state = with_warnings(row["state"], row["warnings"])
        image, via = row["image"] or "?", row["via"] or "?"
        table.append((printable(row["mountpoint"]), image, row["served"], via, state, cached))
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    logs = [None, *(row["log"] if _is_file(row["log"]) else None for row in rows)]
    for line, log in zip(table, logs, strict=True):
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())
        if log is not None:
            print(f"  log {printable(log)}")


def _is_file(path: str | None) -> bool:
    return bool(path) and Path(path).is_file()


def print_what_to_do(row: dict) -> None:
    """One line on stderr for a mount listed as neither ok nor mounting: what frees a
    hidden one (unmounting what hides it), or the ``blockstore umount`` that cleans up a
    broken one."""
    mountpoint = row["mountpoint"]
    if row["hidden_by"] is not None:
        said = finding.hidden_by_message(mountpoint, row["hidden_by"])
    elif row["state"] not in ("ok", "mounting"):
        said = f"{printable(mountpoint)}: `{umount_command(mountpoint)}` cleans it up"
    else:
        return
    print(f"blockstore: {said}", file=sys.stderr)
