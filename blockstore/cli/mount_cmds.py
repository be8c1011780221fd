"""``blockstore mount``, ``umount`` and ``mounts``: an image from a registry as a directory.

``mount`` runs ``blockstore serve`` in the background and lets the mount
stack (nbdfront.mount) attach, mount and stack its exports. ``-o`` also takes
the option spelling of erofs-utils' ``mount.erofs -t erofs.nbd`` (``oci.layer=N``,
``oci.blob=``, ``oci.platform=``, ``oci.username=``, ``oci.password=``,
``oci.insecure``, ``oci.tarindex=``, ``oci.zinfo=``, the older ``oci=N``), so its
users need not relearn them.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import signal
import sys
import threading
from dataclasses import dataclass, fields, replace
from pathlib import Path

from blockstore.cli.common import (
    PREFETCH_FLAGS,
    add_cache_options,
    add_image_options,
    add_prefetch_options,
    add_registry_options,
    add_tar_index_options,
    cache_dir_from,
    check_image_arguments,
    check_prefetch_options,
    check_registry_arguments,
    is_standard_stream,
    parse_metrics_address,
)
from blockstore.cli.tls_options import add_tls_options, mount_tls_arguments
from blockstore.errors import (
    MountBeingUndone,
    MountError,
    MountpointBusy,
    NotCached,
    UsageError,
)
from blockstore.logformat import count_trouble
from nbdfront.mount import finding, listing, stack, unmount
from nbdfront.mount.attach import KERNEL, NBDFUSE
from nbdfront.mount.records import MountRecord

USERNAME_OPTIONS = "--username (or -o oci.username=)"
"""The ways mount takes a user name, as a refusal names them."""


@dataclass
class OciOptions:
    """What ``-o`` can say; None means not said."""

    layer: int | None = None
    blob: str | None = None
    platform: str | None = None
    username: str | None = None
    password: str | None = None
    insecure: bool | None = None
    tarindex: Path | None = None
    zinfo: Path | None = None
    suid: bool | None = None  # mount(8)'s suid and nosuid
    dev: bool | None = None  # mount(8)'s dev and nodev
    exec: bool | None = None  # mount(8)'s exec and noexec


def parse_mount_options(texts: list[str]) -> OciOptions:
    """Parse ``-o`` values (each comma-separated, ``-o`` repeatable) into ``OciOptions``.

    ``ro`` is accepted and changes nothing (every mount is read-only); ``suid``,
    ``dev``, ``exec`` and their ``no`` forms are taken as mount(8) takes them, the last one
    given winning; ``defaults`` (which every fstab line holds) stands for blockstore's
    own defaults, those flags unset; ``rw`` and anything unknown are refused, so a typo
    never passes silently.
    """
    # Here and below imported where needed: the registry loads requests, which `mounts` need not.
    from blockstore.registry import normalize_digest
    from blockstore.registry.platforms import Platform

    parsed = OciOptions()
    for text in texts:
        after_password = False
        for item in split_options(text):
            key, has_value, value = item.lstrip().partition("=")
            if not key and not has_value:
                continue
            if len(value) > 1 and value[0] == value[-1] == '"':
                value = value[1:-1]
            if key in ("oci.layer", "oci"):
                # Negative counts from the top, as --layer does.
                if not re.fullmatch(r"-?[0-9]+", value):
                    raise UsageError(f"-o {key}= wants a layer number, not {value!r}")
                parsed.layer = int(value)
            elif key == "oci.blob":
                parsed.blob = normalize_digest(value)
            elif key == "oci.platform":
                parsed.platform = str(Platform.parse(value))
            elif key in ("oci.username", "oci.password"):
                if not value:
                    raise UsageError(f"-o {key}= needs a value")
                setattr(parsed, key.removeprefix("oci."), value)
            elif key in ("oci.tarindex", "oci.zinfo"):
                if not value:
                    raise UsageError(f"-o {key}= needs a path")
                setattr(parsed, key.removeprefix("oci."), Path(value))
            elif key == "oci.insecure":
                parsed.insecure = _flag(key, value if has_value else "1")
            elif key == "ro" and not has_value:
                continue
            elif key == "defaults" and not has_value:
                # blockstore's own: read-only, nosuid, nodev, exec; not mount(8)'s rw, suid, dev.
                parsed.suid = parsed.dev = parsed.exec = None
            elif key in ("suid", "nosuid", "dev", "nodev", "exec", "noexec") and not has_value:
                setattr(parsed, key.removeprefix("no"), not key.startswith("no"))
            elif key == "rw" and not has_value:
                raise UsageError("blockstore mounts are read-only: -o rw is not possible")
            elif after_password:
                # The rest of a password that holds a comma: never repeated.
                raise UsageError(
                    "unknown mount option after oci.password=: a password holding a comma "
                    'goes in double quotes (oci.password="..."), which a shell keeps only '
                    """inside single quotes: -o 'oci.password="..."'"""
                )
            else:
                raise UsageError(
                    f"unknown mount option {key!r}: `blockstore mount --help` lists those -o takes"
                )
            after_password = key == "oci.password"
    if parsed.layer is not None and parsed.blob is not None:
        raise UsageError("-o oci.layer and oci.blob select a layer twice: give one")
    return parsed


def split_options(text: str) -> list[str]:
    """The items of a ``-o`` value, split at its commas as mount(8) splits them: not at
    one between double quotes, so a value (a password) may hold commas (``key="a,b"``)."""
    items, quoted, start = [], False, 0
    for at, char in enumerate(text):
        if char == '"':
            quoted = not quoted
        elif char == "," and not quoted:
            items.append(text[start:at])
            start = at + 1
    return [*items, text[start:]]


def _flag(key: str, value: str) -> bool:
    lowered = value.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise UsageError(f"-o {key}= wants true or false, not {value!r}")


def merge_options(args: argparse.Namespace, oci: OciOptions) -> None:
    """Fill ``args`` from ``-o``; a value given both ways must agree."""
    for f in fields(OciOptions):
        said = getattr(oci, f.name)
        if said is None:
            continue
        flag = getattr(args, f.name)
        # Unset is None (False for --insecure); `in (None, False)` also took --layer 0 as unset.
        if flag is None or flag is False:
            setattr(args, f.name, said)
        elif flag != said:
            raise UsageError(f"--{f.name} and -o oci.{f.name} disagree")
    if oci.username is not None:
        args.username_option = "-o oci.username"  # how an error names the option given
    if args.layer is not None and args.blob is not None:
        raise UsageError("--layer and --blob (or their -o forms) select a layer twice: give one")


PATH_VARIABLES = (
    "REGISTRY_AUTH_FILE",
    "XDG_RUNTIME_DIR",
    "DOCKER_CONFIG",
    "SSL_CERT_FILE",
    "GNUPGHOME",
    "PASSWORD_STORE_DIR",
)
"""The environment's paths the server reads: logins (``credentials.auth_files``), the CA
bundle (``client.system_ca_bundle``), and the keyring of the credential helper it may run
(``docker-credential-pass``'s)."""


def serve_command(args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    """The ``blockstore serve`` command line for a mount, and its environment.

    The user name and password travel in the environment (readable by the
    owner alone), never on a command line that ``ps`` shows to every user. Paths
    are absolute: the server runs in ``/`` (``spawn_detached``).
    """
    argv = [sys.executable, "-m", "blockstore", *(["-v"] * args.verbose), "serve", args.image]
    argv += ["--cache-dir", str(cache_dir_from(args).resolve())]
    if args.layer is not None:
        argv += ["--layer", str(args.layer)]
    if args.blob is not None:
        argv += ["--blob", args.blob]
    for option in ("platform", "cache_size", "timeout"):
        value = getattr(args, option)
        if value is not None:
            argv += [f"--{option.replace('_', '-')}", str(value)]
    if args.ca_file is not None:
        argv += ["--ca-file", os.path.abspath(args.ca_file)]
    for mirror in args.mirror:
        argv += ["--mirror", mirror]
    for option in ("tarindex", "zinfo"):
        path = getattr(args, option)
        if path is not None:
            argv += [f"--{option}", str(Path(path).resolve())]
    if args.metrics is not None:
        argv += ["--metrics", args.metrics]
    argv += [flag for flag in ("--insecure", "--offline") if getattr(args, flag[2:])]
    argv += [flag for flag in PREFETCH_FLAGS if getattr(args, flag[2:].replace("-", "_"))]
    if args.fill_rate:
        argv += ["--fill-rate", str(args.fill_rate)]
    if args.trace_file is not None:
        if is_standard_stream(args.trace_file):
            raise UsageError(
                "mount --trace-file cannot read standard input (-): its server reads the "
                "file once started, from no terminal; `blockstore trace import -` loads "
                "the traces into the cache first"
            )
        argv += ["--trace-file", str(args.trace_file.resolve())]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    for name in PATH_VARIABLES:  # the server runs in /
        if env.get(name):
            env[name] = os.path.abspath(env[name])
    if env.get("PATH"):
        env["PATH"] = search_path(env["PATH"])
    if path := import_path(env.get("PYTHONPATH", "")):
        env["PYTHONPATH"] = path
    if args.username is not None:
        env["BLOCKSTORE_USERNAME"] = args.username
    if args.password is not None:
        env["BLOCKSTORE_PASSWORD"] = args.password
    return argv, env


def search_path(given: str) -> str:
    """``PATH`` for the server, which runs in ``/``: each entry made absolute, the
    empty one too (the working directory, to ``execvp`` and ``shutil.which``), so that
    the credential helper it runs is found where the mount command would find it."""
    return os.pathsep.join(os.path.abspath(entry) for entry in given.split(os.pathsep))


def import_path(given: str) -> str:
    """``PYTHONPATH`` for the server and its supervisor, which run ``python -m`` in ``/``:
    its relative entries made absolute, and first the directory ``python -m blockstore``
    found this command's code in (a checkout never installed), which ``/`` is not."""
    code = str(Path(__file__).resolve().parents[2])
    entries = [os.path.abspath(entry) for entry in given.split(os.pathsep) if entry]
    if sys.path and sys.path[0] and os.path.realpath(sys.path[0]) == code:
        entries.insert(0, code)
    return os.pathsep.join(dict.fromkeys(entries))


def _image_layers(cache_dir: Path, image: str, platform: str | None) -> list[dict]:
    """Every layer (index, digest, size, media type) of the image as the server resolved
    and cached it for ``platform`` (this host's if None), found under that platform as
    the server keeps it: another platform's record names another image's layers, which
    would have a tar layer mounted bare, as an EROFS one is.

    To show what is mounted and cached in ``mounts``, and to tell a tar layer; a cache
    that cannot say yields nothing.
    """
    from blockstore.cache import ChunkStore
    from blockstore.cache.env import looking
    from blockstore.cache.layout import holds_cache
    from blockstore.registry import parse_reference
    from blockstore.registry.platforms import Platform, host_platform

    if not holds_cache(cache_dir):
        return []
    try:
        canonical = str(parse_reference(image))
        asked = str(Platform.parse(platform) if platform else host_platform())
        with looking(), ChunkStore(cache_dir) as store:
            record = store.images.get(canonical, asked)
    except Exception:
        return []
    return record.get("layers", []) if record else []


def describe_layers(image_layers: list[dict], exports: list[str]) -> dict:
    """The record's account of the layers: those mounted, and how many the image has."""
    by_export = {f"layer{layer['index']}": layer for layer in image_layers}
    return {
        "layers": [
            {
                "export": name,
                **{k: by_export[name][k] for k in ("index", "digest", "size")},
                "mediaType": by_export[name].get("mediaType"),
            }
            for name in exports
            if name in by_export
        ],
        "image_layers": len(image_layers),
    }


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


def with_layers(record: MountRecord) -> MountRecord:
    """``record``, its layers looked up again if the mount could not name them: its
    cache could not be read then (damaged, and moved aside by the server since)."""
    info = record.info
    if info.get("layers") or not info.get("cache_dir"):
        return record
    found = _image_layers(Path(info["cache_dir"]), record.image, info.get("platform"))
    exports = [attachment.export for attachment in record.attachments]
    return replace(record, info={**info, **describe_layers(found, exports)})


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


def without_credentials(texts: list[str]) -> list[str]:
    """The ``-o`` values with ``oci.username`` and ``oci.password`` taken out."""
    secret = ("oci.username", "oci.password")
    return [
        ",".join(
            item for item in split_options(text) if item.lstrip().partition("=")[0] not in secret
        )
        for text in texts
    ]


def check_argument_order(args: argparse.Namespace) -> None:
    """``mount DIR IMAGE``: the directory would be taken for a Docker Hub name (``mnt`` is
    ``docker.io/library/mnt``) and the image for a mount point that does not exist."""
    from blockstore.registry import parse_reference

    if not os.path.isdir(args.image) or os.path.exists(args.mountpoint):
        return
    if not _names_more_than_a_word(args.mountpoint):
        return  # ``mount alpine mnt``: an image that happens to be a directory here too
    try:
        parse_reference(args.mountpoint)
    except UsageError:
        return
    raise UsageError(
        f"{args.image} is a directory and {args.mountpoint} an image reference: the image "
        f"comes first (blockstore mount {args.mountpoint} {args.image})"
    )


def _names_more_than_a_word(text: str) -> bool:
    """Whether ``text`` reads as an image rather than a path: it names a tag, a digest or
    a registry host."""
    from blockstore.registry.reference import names_host

    return ":" in text or "@" in text or names_host(text)


def run_mount(args: argparse.Namespace) -> int:
    check_argument_order(args)
    check_image_arguments(args)
    merge_options(args, parse_mount_options(args.options))
    # From here the login lives in args.username/password alone, which go to the server
    # by its environment: nothing that keeps or shows the options can repeat it.
    args.options = without_credentials(args.options)
    check_registry_arguments(args, username_options=USERNAME_OPTIONS)
    check_prefetch_options(args)
    argv, env = serve_command(args)
    tls = mount_tls_arguments(args)
    argv += tls
    cache_dir = cache_dir_from(args).resolve()
    if os.path.isdir(args.mountpoint) and stack.overlaps(args.mountpoint, cache_dir):
        raise MountError(
            f"mountpoint {args.mountpoint} would cover the cache {cache_dir} its server uses, "
            "or lie in it, hiding its files from every other command: choose another "
            "directory, or --cache-dir"
        )

    # ``describe`` runs once the server is ready (minutes later, when a large tar layer is
    # indexed first): the cache's modules it reads with are loaded now, as this version's.
    # Loaded then, after the package was upgraded or downgraded meanwhile, they would be
    # another version's beside this one's, and fail to import.
    importlib.import_module("blockstore.cache")

    def describe(exports: list[str]) -> dict:
        return {
            "cache_dir": str(cache_dir),
            "offline": args.offline,
            "platform": args.platform,
            **describe_layers(_image_layers(cache_dir, args.image, args.platform), exports),
        }

    def warn(message: str) -> None:
        print(f"blockstore: warning: {message}", file=sys.stderr, flush=True)

    try:
        record = stack.mount(
            argv,
            args.mountpoint,
            image=args.image,
            env=env,
            describe=describe,
            warn=warn if args.quiet <= 0 else None,
            tls=bool(tls),
            suid=bool(args.suid),
            dev=bool(args.dev),
            exec=args.exec is not False,
        )
    except MountError as exc:
        if NotCached.said not in str(exc):
            raise
        raise type(exc)(f"{exc}; {how_to_cache(args.image)}") from exc
    ignore_late_signals()
    if args.quiet <= 0:
        say_done(describe_path(record))
    return 0


def how_to_cache(image: str) -> str:
    """What a mount failing on chunks not cached offline tells the user to do: the
    mount cannot fetch them, and reading them online once caches only what is read."""
    return f"`blockstore prefetch {image}`, while the registry answers, caches all of it"


def describe_path(record: MountRecord) -> str:
    """One line saying which way the mount was made, for the user and for bug reports."""
    via = {NBDFUSE: "nbdfuse + file-backed EROFS", KERNEL: "kernel NBD + EROFS"}[record.method]
    n = len(record.attachments)
    layers = "1 layer" if n == 1 else f"{n} layers"
    shape = f"{layers} under a read-only overlayfs" if record.overlay else "1 layer"
    pid = record.server.pid if record.server else "?"
    metrics = f", metrics {record.metrics}" if record.metrics else ""
    return (
        f"mounted {record.image} at {finding.printable(record.mountpoint)} via {via}, {shape}, "
        f"in {record.mount_seconds:.2f}s (server pid {pid}{metrics}, log {record.log})"
    )


def say_done(line: str) -> None:
    """Say a mount or an unmount is made, on a stdout that may be gone (a closed pipe, a
    full disk): what was done stands, so its exit status says so whether or not the
    line could be written. The rest goes nowhere, so no later flush fails either."""
    try:
        print(line, flush=True)
    except OSError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def ignore_late_signals() -> None:
    """The mount (or unmount) is made and recorded: a signal from here on could undo
    nothing, and would only end the command with the signal's status, as if it had
    failed, while the mount stays (or is gone). The interpreter's teardown, a tenth of a
    second, restores default handlers but keeps ignored ones."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)


def run_umount(args: argparse.Namespace) -> int:
    try:
        done = unmount.unmount(args.mountpoint, lazy=args.lazy)
    except MountpointBusy as exc:
        if isinstance(exc, MountBeingUndone) or not _runs_inside(args.mountpoint):
            raise  # not this command's working directory that keeps it
        raise MountpointBusy(
            f"{exc}; this command was run from inside it, as the shell that started it "
            "likely was: cd out of it first"
        ) from exc
    ignore_late_signals()
    if args.quiet <= 0:
        say_done(f"unmounted {finding.printable(done.record.mountpoint)} ({done.record.image})")
        if done.trouble is not None:
            kept = Path(done.record.log).exists()
            where = f"; its log is kept at {done.record.log}" if kept else ""
            print(f"blockstore: {done.trouble}{where}", file=sys.stderr)
    return 0


def _runs_inside(mountpoint: str) -> bool:
    """Whether this command's working directory is ``mountpoint`` or below it: then the
    shell that started it is there too, and ending that shell is no fix for the user."""
    try:
        here = os.getcwd()
    except OSError:  # a working directory removed since
        return False
    there = os.path.realpath(mountpoint)
    return here == there or here.startswith(there.rstrip("/") + "/")


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
            f"`BLOCKSTORE_RUN_DIR={finding.shell_word(run)} blockstore mounts` lists "
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
        table.append(
            (finding.printable(row["mountpoint"]), image, row["served"], via, state, cached)
        )
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    logs = [None, *(row["log"] if _is_file(row["log"]) else None for row in rows)]
    for line, log in zip(table, logs, strict=True):
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())
        if log is not None:
            print(f"  log {finding.printable(log)}")


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
        said = (
            f"{finding.printable(mountpoint)}: `{finding.umount_command(mountpoint)}` cleans it up"
        )
    else:
        return
    print(f"blockstore: {said}", file=sys.stderr)


def _mountpoint(text: str) -> str:
    """A mount point as given; an empty one (an unset shell variable) is a usage error,
    not the working directory, nor a path named by nothing in the messages."""
    if not text:
        raise argparse.ArgumentTypeError("the mount point is empty")
    return text


def _metrics_address(text: str) -> str:
    """Checked here, so a typo fails before any server starts; the server gets the text."""
    parse_metrics_address(text)
    return text


def register(subparsers: argparse._SubParsersAction) -> None:
    mount = subparsers.add_parser(
        "mount",
        help="mount an image read-only at a directory",
        description="Mount an image read-only. All layers by default, stacked with overlayfs "
        "(last layer on top); --layer or --blob mounts one layer alone. Returns once the mount "
        "is ready, leaving its server running in the background.",
    )
    add_image_options(mount, "mount")
    add_tar_index_options(mount, mount_options=True)
    mount.add_argument(
        "mountpoint", metavar="MOUNTPOINT", type=_mountpoint, help="an existing directory"
    )
    add_registry_options(mount)
    add_cache_options(mount)
    add_prefetch_options(mount)
    mount.add_argument(
        "--metrics",
        metavar="HOST:PORT",
        type=_metrics_address,
        default=None,
        help="have the server give Prometheus metrics at http://HOST:PORT/metrics (port 0 "
        "picks a free one, which the line the mount prints names)",
    )
    mount.add_argument(
        "-o",
        dest="options",
        action="append",
        default=[],
        metavar="OPTIONS",
        help="comma-separated: oci.layer=N (or oci=N), oci.blob=DIGEST, oci.platform=OS/ARCH, "
        "oci.username=U, oci.password=P, oci.insecure, oci.tarindex=PATH, oci.zinfo=PATH, ro, "
        "suid and dev (the image's setuid bits and device files honoured; nosuid and nodev, "
        "the default, otherwise), noexec (none of the image's programs run; exec, the "
        "default, otherwise), defaults (these defaults, not mount(8)'s rw,suid,dev)",
    )
    mount.set_defaults(suid=None, dev=None, exec=None)  # set by -o alone
    add_tls_options(mount, offer_verify_peer=False)
    mount.set_defaults(func=run_mount)

    umount = subparsers.add_parser(
        "umount",
        help="undo a mount: file system, FUSE or NBD device, server",
        description="Undo a mount made by blockstore mount, top first: the file system, "
        "each layer's FUSE or NBD device, then its server (5 seconds to stop, then "
        "killed). Its log is removed, or kept and named when something went wrong.",
    )
    umount.add_argument(
        "mountpoint",
        metavar="MOUNTPOINT",
        type=_mountpoint,
        help="where blockstore mount put the image",
    )
    umount.add_argument(
        "-l",
        "--lazy",
        action="store_true",
        help="detach even if busy, and stop its server: what still uses it gets I/O errors",
    )
    umount.set_defaults(func=run_umount)

    listing = subparsers.add_parser(
        "mounts",
        help="list blockstore mounts and their cache state",
        description="List the mounts blockstore made on this machine: image, layers, how "
        "each is attached, its state (ok, mounting, or what broke) and how much of each "
        "layer is cached.",
    )
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(func=run_mounts)
