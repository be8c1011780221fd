"""``blockstore mount``, ``umount`` and ``mounts``: their command lines, and the
``mount`` and ``umount`` commands themselves.

``mount`` runs ``blockstore serve`` (``mount_options.serve_command``) in the background
and lets the mount stack (nbdfront.mount) attach, mount and stack its exports;
``umount`` undoes that; ``mounts`` is ``mount_listing.run_mounts``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
from pathlib import Path

from blockstore.cli.common import (
    add_cache_options,
    add_image_options,
    add_prefetch_options,
    add_registry_options,
    add_tar_index_options,
    cache_dir_from,
    check_image_arguments,
    check_prefetch_options,
    check_registry_arguments,
    parse_metrics_address,
)
from blockstore.cli.mount_layers import describe_layers, layers_in_cache
from blockstore.cli.mount_listing import run_mounts
from blockstore.cli.mount_options import (
    USERNAME_OPTIONS,
    merge_options,
    parse_mount_options,
    serve_command,
    without_credentials,
)
from blockstore.cli.tls_options import add_tls_options, mount_tls_arguments
from blockstore.errors import MountBeingUndone, MountError, MountpointBusy, NotCached, UsageError
from nbdfront.mount import stack, unmount
from nbdfront.mount.attach import KERNEL, NBDFUSE
from nbdfront.mount.commands import printable, shell_word
from nbdfront.mount.records import MountRecord


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
        f"comes first: `blockstore mount {shell_word(args.mountpoint)} "
        f"{shell_word(args.image)}`"
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
            **describe_layers(layers_in_cache(cache_dir, args.image, args.platform), exports),
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
        f"mounted {record.image} at {printable(record.mountpoint)} via {via}, {shape}, "
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
        say_done(f"unmounted {printable(done.record.mountpoint)} ({done.record.image})")
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
        help="detach even if a process or another file system uses it, and stop its server: "
        "what still uses it gets I/O errors (still refused, to be unmounted first: another "
        "blockstore mount inside it, or a mount that hides it)",
    )
    umount.set_defaults(func=run_umount)

    listing = subparsers.add_parser(
        "mounts",
        help="list blockstore mounts and their cache state",
        description="List the mounts blockstore made with this run directory "
        "(/run/blockstore, or $BLOCKSTORE_RUN_DIR): image, layers, how each is attached, its "
        "state (ok, mounting, or what broke) and how much of each layer is cached. Those made "
        "with another run directory are counted on stderr, with the command that lists them.",
    )
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(func=run_mounts)
