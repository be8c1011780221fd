"""``blockstore cache stats|ls|verify|gc|compact|pin|unpin|rm``: look after the chunk cache.

Targets are blob digests (``sha256:...``) or image references; a reference
names the blobs (layers) of the images resolved under it before, matched on
the reference's canonical form.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

from blockstore.cache import CacheDamaged, ChunkStore
from blockstore.cache.env import looking
from blockstore.cache.indexes import IndexShelf
from blockstore.cache.layout import LMDB_DATA_FILE
from blockstore.cache.seal import VerifyReport
from blockstore.cache.store import READ_ONLY_FATE
from blockstore.cache.write_access import check_enterable
from blockstore.cli.common import add_cache_options, cache_dir_from, say
from blockstore.errors import CacheError, IntegrityError, InvalidReference, NotFound
from blockstore.progress import human

if TYPE_CHECKING:
    from blockstore.registry.reference import Reference

DIGEST = re.compile(r"^[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-fA-F0-9]{32,}$")


def register(subparsers: argparse._SubParsersAction) -> None:
    cache = subparsers.add_parser("cache", help="inspect and look after the chunk cache")
    commands = cache.add_subparsers(dest="cache_command", metavar="ACTION", required=True)

    def command(
        name: str, func: Callable[[argparse.Namespace], int], help: str, targets: bool = False
    ) -> argparse.ArgumentParser:
        parser = commands.add_parser(name, help=help, description=help)
        add_cache_options(parser, size=name == "gc")
        parser.add_argument("--json", action="store_true", help="print JSON")
        if targets:
            parser.add_argument("targets", nargs="+", metavar="IMAGE|DIGEST")
        parser.set_defaults(func=func)
        return parser

    command("stats", cmd_stats, "totals and counters")
    command("ls", cmd_ls, "cached blobs: size, fraction cached, sealed, pinned, last use, images")
    command(
        "verify",
        cmd_verify,
        "re-check every chunk, every complete blob, and the chunks of incomplete blobs "
        "against their chunk index where one is kept, dropping what is bad "
        f"(exit {IntegrityError.exit_code} if anything was)",
    )
    command("gc", cmd_gc, "evict least recently used chunks down to the size cap")
    command(
        "compact",
        cmd_compact,
        "give the space of evicted and removed chunks back to the disk "
        "(only while no server or mount uses the cache)",
    )
    command("pin", cmd_pin, "keep images or blobs from eviction", targets=True)
    command("unpin", cmd_unpin, "let eviction take images or blobs again", targets=True)
    command("rm", cmd_rm, "remove images or blobs from the cache", targets=True)


def open_store(
    args: argparse.Namespace, *, create: bool = False, looks: bool = False
) -> ChunkStore:
    """The cache these commands look after: one that does not exist is made only for a
    command that puts something in it (``create``). Damage it cannot move aside is the
    command's error, not a warning that it goes on without the cache. A command that
    ``looks`` opens it without waiting for the write lock while it writes nothing."""
    path = cache_dir_from(args) if create else existing_cache_dir(args)
    with looking() if looks else nullcontext():
        return ChunkStore(path, size_cap=args.cache_size, goes_on=False)


NAME_THE_CACHE = (
    "name the cache mount, serve or prefetch used with --cache-dir (or $BLOCKSTORE_CACHE_DIR)"
)
"""What to do where no cache is: the one used may be another user's (root's, under sudo)
or one a --cache-dir named."""


def existing_cache_dir(args: argparse.Namespace) -> Path:
    """The cache directory the arguments name, refused if there is no cache there."""
    path = cache_dir_from(args)
    check_enterable(path)
    if not path.exists():
        raise CacheError(f"no cache at {path}: nothing was ever kept there; {NAME_THE_CACHE}")
    if path.is_dir() and not (path / LMDB_DATA_FILE).exists():
        # A directory made anew (or by hand) is no cache: taking it for an empty one
        # would make one there and report it sound.
        raise CacheError(
            f"no cache at {path}: the directory holds no {LMDB_DATA_FILE}; {NAME_THE_CACHE}"
        )
    return path


def emit(args: argparse.Namespace, data: object, text: str) -> None:
    print(json.dumps(data, indent=2, sort_keys=True) if args.json else text)


def emit_done(args: argparse.Namespace, data: object, text: str) -> None:
    """What a command that acts did: its JSON when asked for, else lines ``-q`` silences."""
    if args.json:
        emit(args, data, text)
    else:
        say(args, text)


def cmd_stats(args: argparse.Namespace) -> int:
    with open_store(args, looks=True) as store:
        stats = store.stats()
    served = stats["hits"] + stats["misses"]
    lines = [
        f"cache        {cache_dir_from(args)}",
        f"stored       {human(stats['stored_bytes'])} of {human(stats['size_cap'])} cap "
        f"({stats['chunks']} chunks, {stats['parts']} parts of chunks, "
        f"file {human(stats['file_bytes'])})",
        f"blobs        {stats['blobs']} ({stats['sealed_blobs']} sealed, "
        f"{stats['pinned_blobs']} pinned)",
        f"hits         {stats['hits']} chunks"
        + (f" ({100 * stats['hits'] / served:.1f}%)" if served else ""),
        f"misses       {stats['misses']} chunks",
        f"served       {human(stats['bytes_served'])}",
        f"fetched      {human(stats['bytes_fetched'])} in {stats['requests_fetched']} requests",
        f"checksum failures {stats['checksum_failures']}, seals {stats['seals']}, "
        f"seal failures {stats['seal_failures']}, evictions {stats['evictions']}",
    ]
    emit(args, stats, "\n".join(lines))
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    with open_store(args, looks=True) as store:
        infos = sorted(store.blobs(), key=lambda i: i.last_use, reverse=True)
        records = store.images.all()  # once: a damaged record is warned of once
        tar_of = _inflated_tars(store, records)
        users = _images_of_layers(records)
    used_by = {i.digest: sorted(users.get(tar_of.get(i.digest, i.digest), ())) for i in infos}
    lines = [f"{'DIGEST':<71}  {'SIZE':>10}  CACHED  SEALED  PINNED  LAST USE  IMAGES"]
    for info in infos:
        when = (
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.last_use))
            if info.last_use
            else "never"
        )
        layer = tar_of.get(info.digest)
        lines.append(
            f"{info.digest:<71}  {human(info.size):>10}  {100 * info.cached_fraction:5.1f}%  "
            f"{'yes' if info.sealed else 'no':<6}  {'yes' if info.pinned else 'no':<6}  {when}"
            + f"  {', '.join(used_by[info.digest]) or '-'}"
            + (f"  (the tar of layer {layer[:19]}...)" if layer else "")
        )
    rows = [
        {**i.to_dict(), "tar_of": tar_of.get(i.digest), "images": used_by[i.digest]} for i in infos
    ]
    emit(args, rows, "\n".join(lines))
    return 0


def _images_of_layers(records: list[dict]) -> dict[str, set[str]]:
    """The images the cache keeps whose layers each layer digest is: a digest alone does
    not say what it is of, and no other command lists the images kept."""
    users: dict[str, set[str]] = {}
    for record in records:
        for layer in record.get("layers", []):
            users.setdefault(layer["digest"], set()).add(str(record.get("reference")))
    return users


def _inflated_tars(store: ChunkStore, records: list[dict]) -> dict[str, str]:
    """The compressed tar layer each tar in the cache was inflated from: no image lists a
    tar's digest (its diff_id) among its layers, so ``ls`` says whose it is. Only the
    tar layers of the images kept are looked up (the index module loads only then)."""
    layers = {
        layer["digest"]
        for record in records
        for layer in record.get("layers", [])
        if "tar" in layer.get("mediaType", "")
    }
    if not layers:
        return {}
    from blockstore.tarlayer.indexcache import IndexCache

    tar_digest = IndexCache(store).tar_digest
    found = {}
    for layer in sorted(layers):
        tar = tar_digest(layer)
        if tar is not None and tar != layer:
            found[tar] = layer
    return found


def cmd_verify(args: argparse.Namespace) -> int:
    from blockstore.tarlayer.indexcache import IndexCache

    try:
        store = open_store(args, looks=True)
    except CacheDamaged as exc:
        # Raised only where the damaged file cannot be moved aside: a read-only cache.
        return _verified(args, VerifyReport(damage=str(exc)), {}, READ_ONLY_FATE)
    with store:
        report = store.verify()
        # Kept tar indexes are checked on every load; verify finds them damaged first.
        indexes = IndexCache(store)
        damaged = indexes.damaged_records()
        if damaged and not store.read_only:
            indexes.heal(damaged)
        report.damaged_records += damaged
        # Blobs not complete yet cannot be judged by their digest; a kept chunk index can.
        # Sealed ones judge their index instead.
        shelf = IndexShelf(store)
        report.bad_chunks += shelf.check_incomplete()
        lying = shelf.check_all_sealed()
    return _verified(args, report, lying, store.fate)


def _verified(
    args: argparse.Namespace, report: VerifyReport, lying: dict[str, list[int]], fate: str
) -> int:
    """Say what verify found and what became of it (``fate``); its exit status."""
    lines = [
        f"checked {report.chunks_checked} chunks and {report.blobs_checked} complete blobs",
        *(f"bad chunk {digest} #{index}: {fate}" for digest, index in report.bad_chunks),
        *(f"blob {digest} does not match its digest: {fate}" for digest in report.bad_blobs),
        *(f"sealed {digest}" for digest in report.newly_sealed),
        *(f"repaired the record of {digest}" for digest in report.repaired_records),
        *(f"the cached record of {ref} is damaged: {fate}" for ref in report.damaged_records),
        *(
            f"the chunk index of {digest} disagrees with the sealed layer at chunk(s) "
            f"{', '.join(map(str, wrong[:8]))}: {fate}"
            for digest, wrong in lying.items()
        ),
    ]
    if report.damage:
        moved = "left as it is" if fate == READ_ONLY_FATE else "moved aside"
        lines.append(f"the cache file was damaged and {moved}: {report.damage}")
    if report.orphan_chunks:
        lines.append(f"{report.orphan_chunks} chunks of no known blob: {fate}")
    ok = report.ok and not lying
    lines.append("ok" if ok else f"bad data found and {fate}")
    emit_done(args, {**report.to_dict(), "ok": ok, "lying_indexes": lying}, "\n".join(lines))
    if ok:
        return 0
    # The report is the output (JSON with --json); the failure is said as every error is.
    print(f"blockstore: {lines[-1]} in the cache at {cache_dir_from(args)}", file=sys.stderr)
    return IntegrityError.exit_code


def cmd_gc(args: argparse.Namespace) -> int:
    with open_store(args) as store:
        result = store.gc()
        pinned = sum(info.cached_bytes for info in store.blobs() if info.pinned)
        result.update(
            stored_bytes=store.stats()["stored_bytes"], size_cap=store.size_cap, pinned_bytes=pinned
        )
    text = (
        f"evicted {result['evicted_chunks']} chunks or parts ({human(result['freed_bytes'])}); "
        f"{human(result['stored_bytes'])} of {human(result['size_cap'])} stored"
    )
    for digest in result["held"]:
        text += f"\nkept {digest}: served from the cache alone (offline) by a running server"
    if result["stored_bytes"] > result["size_cap"] and pinned:
        # Eviction passes over pinned layers: say so, or the cap looks broken.
        text += (
            f"\nover the cap: pinned layers hold {human(pinned)}, which gc never evicts "
            "(blockstore cache unpin IMAGE|DIGEST lets it)"
        )
    emit_done(args, result, text)
    return 0


def cmd_compact(args: argparse.Namespace) -> int:
    from blockstore.cache.compact import compact

    result = compact(existing_cache_dir(args))
    emit_done(
        args,
        {"before_bytes": result.before, "after_bytes": result.after},
        f"data.mdb: {human(result.before)} -> {human(result.after)} "
        f"({human(result.before - result.after)} given back)",
    )
    return 0


def resolve_targets(store: ChunkStore, targets: list[str]) -> tuple[dict[str, int | None], list]:
    """Blob digests (with sizes when known) and matching ref records of each target."""
    from blockstore.image import kept_of_repository
    from blockstore.registry.reference import normalize_digest, parse_reference

    blobs: dict[str, int | None] = {}
    matched_refs: list[dict] = []
    records = store.images.all()
    for target in targets:
        if DIGEST.match(target) or (target.startswith("sha256:") and "/" not in target):
            # A mistyped digest is one, not an image named "sha256" on Docker Hub (which
            # is still reachable as docker.io/library/sha256:TAG).
            blobs.setdefault(normalize_digest(target), None)
            continue
        reference = parse_reference(target)
        canonical = str(reference)
        found = [r for r in records if _names(reference, canonical, r)]
        if not found:
            raise NotFound(
                f"no image {canonical} in the cache; {kept_of_repository(store, canonical)}"
            )
        matched_refs.extend(found)
        for record in found:
            for layer in record.get("layers", []):
                blobs[layer["digest"]] = layer.get("size")
    return blobs, matched_refs


def _names(reference: Reference, canonical: str, record: dict) -> bool:
    """Whether ``reference`` names the image of ``record``: as it was opened, or, with a
    digest, as the manifest of the same repository the record keeps, or the index it was
    chosen from (an image opened by tag is named by the digests ``inspect`` shows, as a
    registry would take them; an index's names every platform kept)."""
    if record.get("reference") == canonical:
        return True
    digests = (record.get("manifest_digest"), record.get("index_digest"))
    if reference.digest is None or reference.digest not in digests:
        return False
    from blockstore.registry.reference import parse_reference

    try:
        opened = parse_reference(str(record.get("reference")))
    except InvalidReference:
        return False
    return (opened.registry, opened.repository) == (reference.registry, reference.repository)


def _images_served(images: dict[str, set[str]], held: set[str], kept: set[str]) -> set[str]:
    """Of the images to remove (each with its blobs), those a running server serves:
    each with a held blob of its own among them that no image staying (``kept``)
    keeps anyway; then each with a held blob none of those keeps either (one that
    several share, held for which of them cannot be told: all of them stay)."""
    busy = set()
    for reference, blobs in images.items():
        others = set().union(*(b for r, b in images.items() if r != reference))
        if blobs & held - kept - others:
            busy.add(reference)
    kept = kept | set().union(*(images[reference] for reference in busy))
    return busy | {r for r, blobs in images.items() if blobs & held - kept}


def _layer_blobs(record: dict, tars: Callable[[str], str | None]) -> set[str]:
    """The blobs an image record's layers are read from: each layer, and the tar a
    compressed tar layer was inflated into (``tars``)."""
    blobs = set()
    for layer in record.get("layers", []):
        blobs.add(layer["digest"])
        if (tar := tars(layer["digest"])) is not None:
            blobs.add(tar)
    return blobs


def _must_be_cached(store: ChunkStore, digests: list[str]) -> None:
    """A blob named by digest and not cached is not found, as an unknown image is, and
    no failure of the cache."""
    for digest in digests:
        if store.lookup(digest) is None:
            raise NotFound(f"no blob {digest} in the cache")


def _set_pin(args: argparse.Namespace, on: bool) -> int:
    from blockstore.tarlayer.indexcache import IndexCache

    with open_store(args) as store:
        blobs, refs = resolve_targets(store, args.targets)
        # A digest alone names a cached blob (an image's layers come with sizes, so
        # they can be pinned before they are).
        _must_be_cached(store, [digest for digest, size in blobs.items() if size is None])
        # An image's compressed tar layers are served from the tar they were inflated
        # into: pinned and unpinned with them, as ``prefetch --pin`` pins both.
        tars = IndexCache(store).tar_digest
        for record in refs:
            blobs.update(dict.fromkeys(_layer_blobs(record, tars) - set(blobs)))
        kept = {} if on else _pinned_by_others(store, refs, tars)
        loose = set() if on else {d for d in blobs if not _is_pinned(store, d)}
        for reference in {r["reference"] for r in refs}:
            store.images.mark_pinned(reference, on)
        for digest, size in blobs.items():
            if on:
                if size is not None or store.lookup(digest) is not None:
                    store.pin(digest, size)
            elif digest not in kept and digest not in loose:
                store.unpin(digest)  # not a loose one: it may have no record (cache rm)
        cached = {d: _cached_fraction(store, d) for d in blobs} if on else {}
        for digest in list(cached):
            # A compressed layer is read from its tar, offline too: its tar whole, it is.
            if (tar := tars(digest)) is not None and cached.get(tar) == 1.0:
                cached[digest] = 1.0
    verb = "pinned" if on else "unpinned"
    done = sorted(set(blobs) - set(kept) - loose)
    lines = [f"{verb} {d}{_not_whole(cached.get(d, 1.0))}" for d in done]
    lines += [f"kept pinned {d}: pinned image {kept[d]} uses it too" for d in sorted(kept)]
    lines += [f"was not pinned {d}" for d in sorted(loose)]
    report = {verb: done, "kept_pinned": sorted(kept)}
    if on:
        report["not_whole"] = [d for d in done if cached[d] < 1.0]
    else:
        report["not_pinned"] = sorted(loose)
    emit_done(args, report, "\n".join(lines))
    return 0


def _cached_fraction(store: ChunkStore, digest: str) -> float:
    """How much of a blob the cache holds (none, with no record): a pin keeps what is
    cached, and what is not only once it is fetched."""
    record = store.lookup(digest)
    if record is None:
        return 0.0
    return record.present / record.chunks if record.chunks else 1.0


def _not_whole(fraction: float) -> str:
    """What ``pin`` adds of a blob not cached whole, which an offline mount could not read."""
    if fraction >= 1.0:
        return ""
    if fraction == 0.0:
        return ": none of it is cached yet (kept once fetched)"
    shown = int(1000 * fraction) / 10  # rounded down: never "100.0%" of a blob not whole
    return f": {shown:.1f}% of it is cached (the rest kept once fetched)"


def _is_pinned(store: ChunkStore, digest: str) -> bool:
    """Whether the cache keeps this blob pinned now (a blob it has no record of is not):
    ``unpin`` says "unpinned" only of what was."""
    record = store.lookup(digest)
    return record is not None and record.pinned


def _pinned_by_others(
    store: ChunkStore, refs: list[dict], tars: Callable[[str], str | None]
) -> dict[str, str]:
    """The blobs of the images being unpinned (``refs``) that another cached image pinned
    as a whole (``cache pin IMAGE``, ``prefetch --pin``) reads too: each with that
    image. Pins are kept per blob, so unpinning one image would otherwise let eviction
    take the layers it shares with another image pinned for offline use."""
    leaving = {r["reference"] for r in refs}
    mine = set().union(*(_layer_blobs(r, tars) for r in refs)) if refs else set()
    kept: dict[str, str] = {}
    for record in store.images.all():
        if record.get("pinned") and record["reference"] not in leaving:
            for digest in _layer_blobs(record, tars) & mine:
                kept.setdefault(digest, record["reference"])
    return kept


def cmd_pin(args: argparse.Namespace) -> int:
    return _set_pin(args, True)


def cmd_unpin(args: argparse.Namespace) -> int:
    return _set_pin(args, False)


def cmd_rm(args: argparse.Namespace) -> int:
    """Remove images and blobs; a layer another cached image still uses is kept, and so
    is an image whole while a running server serves it, or any of its layers, from the
    cache alone (its server would read I/O errors from then on, with nowhere to fetch
    from, and one restarted could not resolve it)."""
    from blockstore.registry.reference import normalize_digest
    from blockstore.tarlayer.indexcache import IndexCache

    with open_store(args) as store:
        blobs, refs = resolve_targets(store, args.targets)
        explicit = {normalize_digest(t) for t in args.targets if DIGEST.match(t)}
        # Checked before anything goes: a mistyped digest among others removes nothing,
        # and a second rm of one says it is gone, as for an image.
        _must_be_cached(store, sorted(explicit))
        tars = IndexCache(store).tar_digest
        images = {r["reference"]: set() for r in refs}
        for record in refs:
            images[record["reference"]] |= _layer_blobs(record, tars)
        # A compressed tar layer is served from the tar its first pass inflated: that goes too.
        for digest in list(blobs):
            if (tar := tars(digest)) is not None:
                blobs.setdefault(tar, None)
        in_use: set[str] = set()
        for record in store.images.all():
            if record["reference"] not in images:
                in_use |= _layer_blobs(record, tars)
        served = {d for d in blobs if store.is_held(d)}
        # Held, and about to go: a layer another image keeps anyway is no reason to keep.
        held = sorted(d for d in served if d in explicit or d not in in_use)
        busy = _images_served(images, served, in_use)
        busy |= {reference for reference in images if store.image_is_held(reference)}
        keep_whole = set().union(*(images[reference] for reference in busy))
        in_use |= keep_whole
        removed, kept = [], []
        for digest in sorted(blobs):
            if digest in held:
                continue
            if digest in in_use and digest not in explicit:
                kept.append(digest)
            elif store.remove(digest):
                removed.append(digest)
        gone = sorted(set(images) - busy)
        for reference in gone:
            store.images.remove(reference)
    lines = [f"removed {d}" for d in removed] + [f"removed image {r}" for r in gone]
    lines += [f"kept {d} (used by another image)" for d in kept if d not in keep_whole]
    lines += [f"kept {d}: served from the cache alone (offline) by a running server" for d in held]
    lines += [f"kept image {r} whole: a running server serves it" for r in sorted(busy)]
    emit_done(
        args,
        {
            "removed": removed,
            "removed_images": gone,
            "kept": kept,
            "held": held,
            "kept_images": sorted(busy),
        },
        "\n".join(lines) or "nothing to remove",
    )
    if not (held or busy):
        return 0
    # The report is the output (JSON with --json); the failure is said as every error is.
    kept_back = ", ".join(sorted(busy) or held)
    print(
        f"blockstore: not removed, a running server serves it from the cache alone "
        f"(offline): {kept_back}; stop the server, then remove it",
        file=sys.stderr,
    )
    return CacheError.exit_code
