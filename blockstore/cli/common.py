"""Options shared by several commands, and where their defaults come from."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import ipaddress
import logging
import math
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from blockstore import erofs_format
from blockstore.errors import (
    BlockstoreError,
    CredentialHelperError,
    RegistryUnreachable,
    UsageError,
)
from blockstore.wholefile import replace_whole

if TYPE_CHECKING:
    from blockstore.cache import ChunkStore
    from blockstore.cache.env import CacheEnv
    from blockstore.image import OpenImage
    from blockstore.prefetch.settings import PrefetchSettings
    from blockstore.prefetch.trace import Trace
    from blockstore.registry.options import RegistryOptions

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """``$BLOCKSTORE_CACHE_DIR``, else ``$XDG_CACHE_HOME/blockstore``, else ~/.cache/blockstore.

    A relative ``$XDG_CACHE_HOME`` is ignored, as the XDG Base Directory spec asks:
    taken, each working directory would get a cache of its own."""
    explicit = os.environ.get("BLOCKSTORE_CACHE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "blockstore"


def add_cache_options(parser: argparse.ArgumentParser, *, size: bool = True) -> None:
    """``--cache-dir``, and ``--cache-size`` where ``size``: a cap given is kept by the
    cache, so only commands that fill or evict take it, never one that only looks."""
    parser.add_argument(
        "--cache-dir",
        type=_cache_dir,
        default=None,
        help="cache directory (default: $BLOCKSTORE_CACHE_DIR, $XDG_CACHE_HOME/blockstore "
        "or ~/.cache/blockstore)",
    )
    if not size:
        parser.set_defaults(cache_size=None)
        return
    parser.add_argument(
        "--cache-size",
        type=parse_cache_size,
        default=None,
        help="size cap of the cache, e.g. 20G or 500M; the cache keeps it for later "
        "commands and servers (default: the one it keeps, else 10G)",
    )


def _cache_dir(text: str) -> Path:
    """A directory named: an empty name would be the current directory, silently."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty name is no cache directory")
    return Path(text)


def cache_dir_from(args: argparse.Namespace) -> Path:
    return args.cache_dir if args.cache_dir is not None else default_cache_dir()


MAX_SIZE = 1 << 60
"""An exabyte: more than any disk, and still fits the cache's 64-bit fields."""


def parse_size(text: str) -> int:
    """Parse ``10G``, ``512M``, ``4096``, ``1.5T`` (powers of 1024) into bytes."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1] if t and t[-1] in units else ""
    number = t[: len(t) - len(unit)]
    try:
        value = float(number)
    except ValueError:
        value = math.nan
    if math.isnan(value):
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 10G, 512M)")
    if value < 0:
        raise argparse.ArgumentTypeError(f"a size cannot be negative: {text!r}")
    if not math.isfinite(value) or value * units[unit] > MAX_SIZE:
        raise argparse.ArgumentTypeError(f"size {text!r} is too large (at most 1E)")
    if 0 < value * units[unit] < 1:  # as 0 it would be no cap at all (--fill-rate)
        raise argparse.ArgumentTypeError(f"size {text!r} is less than one byte")
    return int(value * units[unit])


def parse_cache_size(text: str) -> int:
    """A cache cap: a size that holds at least one chunk, or nothing could be cached."""
    # Here, not at the top: the cache package loads the whole read path, which
    # commands that never open a cache (mounts, umount, push) need not pay for.
    from blockstore.cache.layout import CHUNK_SIZE

    size = parse_size(text)
    if size < CHUNK_SIZE:
        raise argparse.ArgumentTypeError(
            f"a cache of {text} cannot hold one {CHUNK_SIZE // 1024} KiB chunk; "
            "give at least 32K (and a few G to keep whole images)"
        )
    return size


EXAMPLE_METRICS_PORT = 9109
"""The port a bad ``--metrics`` address is shown with: any free one serves."""


def parse_listen(text: str) -> tuple[str, int]:
    """An NBD listening address: ``HOST:PORT``, ``[V6]:PORT`` or a bare ``PORT``
    (on 127.0.0.1)."""
    return _parse_address(text, 10809)


def parse_metrics_address(text: str) -> tuple[str, int]:
    """A metrics address, as ``parse_listen``; a bad one is shown a metrics example,
    not the NBD port."""
    return _parse_address(text, EXAMPLE_METRICS_PORT)


def _parse_address(text: str, example: int) -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT`` or a bare ``PORT`` (on 127.0.0.1).

    Anything else is a usage error here, before a warning about the address
    or a resolver error could be printed about it.
    """
    usage = f"not HOST:PORT: {text!r} (try 127.0.0.1:{example}, [::1]:{example} or {example})"
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep or not _is_ip(host, 6):
            raise argparse.ArgumentTypeError(usage)
    elif ":" in text:
        host, _, port = text.partition(":")
        if ":" in port:
            raise argparse.ArgumentTypeError(f"{usage}; put an IPv6 address in brackets")
        numeric = host.replace(".", "").isdigit()  # then it must be an IPv4 address
        if not (_is_ip(host, 4) or (not numeric and _HOSTNAME.fullmatch(host))):
            raise argparse.ArgumentTypeError(usage)
    else:
        host, port = "127.0.0.1", text
    if not (port.isascii() and port.isdigit()) or int(port) > 65535:
        raise argparse.ArgumentTypeError(usage)
    return host, int(port)


_HOSTNAME = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?"
)


def _is_ip(text: str, version: int) -> bool:
    try:
        return ipaddress.ip_address(text).version == version
    except ValueError:
        return False


DEFAULT_READ_TIMEOUT = 30.0
"""Seconds a read may wait on the registry: long enough for a slow link to deliver a
few MiB and retry once, short enough that a reader (a kernel, a VM) is not left hanging."""
MAX_READ_TIMEOUT = 24 * 3600.0


def parse_timeout(text: str) -> float:
    """A positive number of seconds, up to a day."""
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < seconds <= MAX_READ_TIMEOUT:
        raise argparse.ArgumentTypeError(
            f"a timeout is more than 0 and at most {MAX_READ_TIMEOUT:g} seconds, not {text!r}"
        )
    return seconds


LAYER_MAGIC = (
    (erofs_format.SUPER_OFFSET, erofs_format.SUPER_MAGIC.to_bytes(4, "little")),
    (257, b"ustar"),  # a tar header
    (0, b"\x1f\x8b"),  # gzip
    (0, b"\x28\xb5\x2f\xfd"),  # zstd
)
"""What a layer file ``push`` takes starts with, at its offset."""


def image_argument(text: str) -> str:
    """An image reference, as given. A local layer file named instead (an image built
    here, not pushed yet) is refused saying so."""
    if is_local_layer_file(text):
        raise argparse.ArgumentTypeError(
            f"{text} is a local file, and IMAGE names an image in a registry: push the file "
            f"first (blockstore push {text} HOST[:PORT]/NAME:TAG), then name that"
        )
    return text


def is_local_layer_file(text: str) -> bool:
    """Whether ``text``, given as an image reference, names a local layer file instead:
    as a reference it is a Docker Hub name (or none at all), which would fail only at the
    registry, saying nothing of the file. A file holding no layer (``myapp``, a program
    built beside the image ``myapp``) is no reason to misread a reference."""
    from blockstore.registry import parse_reference
    from blockstore.registry.reference import DOCKER_HUB

    if not os.path.isfile(text):
        return False
    try:
        reference = parse_reference(text)
    except UsageError:
        return True  # no reference at all (./image.erofs): the file is what was meant
    return reference.registry == DOCKER_HUB and _is_layer_file(text)


def _is_layer_file(path: str) -> bool:
    """``path`` starts as a layer file does (``LAYER_MAGIC``), or as an empty tar (zero
    blocks) or a zstd stream that opens with a skippable frame (``pzstd``'s) do."""
    try:
        with open(path, "rb") as f:
            head = f.read(1028)
    except OSError:
        return False
    from blockstore.tarlayer.zstdframes import is_skippable_frame  # here only: start-up time

    empty_tar = len(head) >= 1024 and not any(head[:1024])
    return (
        is_skippable_frame(head)
        or empty_tar
        or any(head[at : at + len(magic)] == magic for at, magic in LAYER_MAGIC)
    )


def _timed_out(serves: bool) -> str:
    """What a read past ``--timeout`` ends in: a client's read answered EIO where the
    command serves (those that can serve offline), else the command itself fails."""
    if serves:
        return "it fails with EIO"
    return f"the command fails (exit {RegistryUnreachable.exit_code})"


def add_image_options(parser: argparse.ArgumentParser, verb: str, *, offline: bool = True) -> None:
    """The image argument, which layer(s), and --offline, for commands that open an image."""
    parser.add_argument(
        "image", type=image_argument, metavar="IMAGE", help="image reference, e.g. host:5000/app:v1"
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--layer",
        type=int,
        default=None,
        metavar="N",
        help=f"{verb} only layer N (0 is the bottom, -1 the top)",
    )
    which.add_argument(
        "--blob",
        type=blob_digest,
        default=None,
        metavar="DIGEST",
        help=f"{verb} only the layer with this digest",
    )
    parser.add_argument(
        "--timeout",
        type=parse_timeout,
        default=DEFAULT_READ_TIMEOUT,
        metavar="SECONDS",
        help="how long one read from the registry may take, retries included, before "
        f"{_timed_out(offline)} (default: {DEFAULT_READ_TIMEOUT:g})",
    )
    if offline:
        parser.add_argument(
            "--offline",
            action="store_true",
            help="never use the network: resolve and read from the cache only",
        )


def blob_digest(text: str) -> str:
    """A layer's digest (``sha256:HEX`` or the bare hex), refused as usage before the
    registry is asked, whose being out of reach would otherwise be said instead."""
    from blockstore.registry.reference import normalize_digest

    try:
        return normalize_digest(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_tar_index_options(parser: argparse.ArgumentParser, *, mount_options: bool) -> None:
    """erofs-utils' local indexes for a tar layer, instead of building one; their ``-o``
    spellings are named where the command takes ``-o`` (``mount_options``)."""

    def also(option: str) -> str:
        return f" (also -o {option}=PATH)" if mount_options else ""

    parser.add_argument(
        "--tarindex",
        type=Path,
        default=None,
        metavar="PATH",
        help="a tar layer's EROFS metadata image (mkfs.erofs --tar=i) to use, "
        f"not one built here{also('oci.tarindex')}",
    )
    parser.add_argument(
        "--zinfo",
        type=Path,
        default=None,
        metavar="PATH",
        help=f"gzip checkpoints (SOCI zinfo) for that layer{also('oci.zinfo')}",
    )


def check_tar_index_options(args: argparse.Namespace) -> None:
    """What can be told wrong of ``--tarindex``/``--zinfo`` without the image: checked
    before the registry is asked, as any usage error is."""
    if args.tarindex is None and args.zinfo is not None:
        raise UsageError("--zinfo (oci.zinfo) needs --tarindex (oci.tarindex) too")
    for option, path in (("--tarindex", args.tarindex), ("--zinfo", args.zinfo)):
        if path is not None and not path.is_file():
            what = "not a regular file" if path.exists() else "no such file"
            raise UsageError(f"{option} {path}: {what}")


def tar_indexes_from(args: argparse.Namespace, layers: list) -> dict[int, tuple[Path, Path | None]]:
    """``--tarindex``/``--zinfo`` (``check_tar_index_options``) for the one layer
    selected: layer index -> paths."""
    if args.tarindex is None:
        return {}
    if len(layers) != 1:
        raise UsageError("--tarindex (oci.tarindex) is for one layer: select it with --layer")
    from blockstore.registry.mediatypes import layer_kind  # only here: start-up time

    if layer_kind(layers[0].media_type) is None:
        raise UsageError(
            f"--tarindex (oci.tarindex) is for tar layers; layer {layers[0].index} is "
            f"{layers[0].media_type}"
        )
    return {
        layers[0].index: (args.tarindex.resolve(), args.zinfo.resolve() if args.zinfo else None)
    }


def add_registry_options(parser: argparse.ArgumentParser, *, mirrors: bool = True) -> None:
    """Options of every command that talks to a registry; ``--mirror`` where ``mirrors``,
    for commands that read (a write goes to the registry itself)."""
    parser.add_argument(
        "--platform", default=None, help="os/arch[/variant] (default: this host's platform)"
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="use plain HTTP, for a registry without TLS (an HTTPS registry with a "
        "self-signed certificate wants --ca-file instead)",
    )
    parser.add_argument(
        "--ca-file",
        type=parse_ca_file,
        default=None,
        metavar="FILE",
        help="PEM CA certificates to trust besides the system's, to verify the registry with",
    )
    parser.add_argument("--username", default=None, help="registry user name")
    parser.add_argument(
        "--password",
        default=None,
        help="registry password (prefer $BLOCKSTORE_PASSWORD, or a podman or docker login, "
        "which no process listing shows)",
    )
    if not mirrors:
        parser.set_defaults(mirror=[])
        return
    parser.add_argument(
        "--mirror",
        action="append",
        default=[],
        metavar="HOST[:PORT]",
        help="a mirror registry tried before the upstream (repeatable, in order)",
    )


def parse_ca_file(text: str) -> str:
    """A file of PEM CA certificates, loaded once here: a wrong file is a usage error
    that names it, not a TLS failure at the first connection. A missing one is left to
    the registry client, which refuses it as usage too (and checks a command line it
    only passes on, as ``mount`` does to its server, where it is used)."""
    import ssl  # only here: start-up time of commands that never talk to a registry

    if not os.path.lexists(text):
        return text
    try:
        ssl.create_default_context(cafile=text)
    except ssl.SSLError:
        raise argparse.ArgumentTypeError(
            f"{text} is not a PEM CA bundle (no certificate could be read from it)"
        ) from None
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot read {text}: {exc.strerror or exc}") from None
    return text


PREFETCH_FLAGS = (
    "--fill",
    "--no-readahead",
    "--no-page-in",
    "--no-erofs-start",
    "--no-erofs-walk",
    "--no-trace",
)
"""The prefetch switches, passed on as given from ``mount`` to its server."""


def add_prefetch_options(parser: argparse.ArgumentParser) -> None:
    """Prefetch heuristics of ``serve`` and ``mount``: each on by default but the fill."""
    group = parser.add_argument_group("prefetch")
    group.add_argument(
        "--fill",
        action="store_true",
        help="fetch the rest of each layer in the background, at low priority, and seal it",
    )
    group.add_argument(
        "--fill-rate",
        type=parse_size,
        default=0,
        metavar="SIZE",
        help="bandwidth cap of --fill per layer, bytes per second, e.g. 20M (default: none)",
    )
    group.add_argument("--no-readahead", action="store_true", help="no sequential readahead")
    group.add_argument(
        "--no-page-in",
        action="store_true",
        help="do not read a warm layer's chunks from the cache file ahead of the first reader",
    )
    group.add_argument(
        "--no-erofs-start",
        action="store_true",
        help="do not fetch the EROFS superblock and root directory at open",
    )
    group.add_argument(
        "--no-erofs-walk",
        action="store_true",
        help="do not fetch the EROFS directory tree ahead of the first listing",
    )
    group.add_argument(
        "--no-trace", action="store_true", help="neither record nor replay access traces"
    )
    group.add_argument(
        "--trace-file",
        type=Path,
        default=None,
        metavar="FILE",
        help="first load the traces of FILE (from 'blockstore trace export'; - for "
        "standard input, with serve) into the cache",
    )


STANDARD_STREAM = Path("-")
"""A file named ``-``: standard input or output, as for most Unix tools."""


def is_standard_stream(path: Path) -> bool:
    """Whether ``path`` is ``-``, standard input or output, not a file of that name."""
    return path == STANDARD_STREAM


def read_trace_file(path: Path) -> list[Trace]:
    """The traces a ``trace export`` file (or standard input, ``-``) holds, read before any
    cache is opened, so a file that cannot be used changes nothing: a usage error if it
    is not one."""
    from blockstore.prefetch.trace import MAX_DOCUMENT_BYTES, traces_from_document

    try:
        if is_standard_stream(path):
            raw = sys.stdin.buffer.read(MAX_DOCUMENT_BYTES + 1)
        else:
            with path.open("rb") as file:
                raw = file.read(MAX_DOCUMENT_BYTES + 1)
        if len(raw) > MAX_DOCUMENT_BYTES:
            raise ValueError(f"longer than {MAX_DOCUMENT_BYTES >> 20} MiB: not a traces document")
        return traces_from_document(raw)
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise UsageError(f"{path}: {exc}") from None


def keep_traces(store: ChunkStore, traces: list[Trace]) -> int:
    """Put ``traces`` (from ``read_trace_file``) in ``store``; how many."""
    from blockstore.cache.traces import TraceShelf

    shelf = TraceShelf(store)
    for trace in traces:
        shelf.put(trace)
    return len(traces)


def check_prefetch_options(args: argparse.Namespace) -> None:
    """``--fill-rate`` caps the fill alone: given without ``--fill`` it would cap nothing,
    and the user who asked for a slow fill would have none, and no word of it."""
    if args.fill_rate and not args.fill:
        raise UsageError("--fill-rate caps --fill, which is not given: add --fill, or drop it")


def prefetch_settings_from(args: argparse.Namespace) -> PrefetchSettings:
    from blockstore.prefetch.settings import MOUNT, PrefetchSettings

    return PrefetchSettings(
        readahead=not args.no_readahead,
        page_in=not args.no_page_in,
        erofs_start=not args.no_erofs_start,
        erofs_walk=not args.no_erofs_walk,
        trace_period=0.0 if args.no_trace else MOUNT.trace_period,
        trace_replay=not args.no_trace,
        fill=args.fill,
        fill_rate=args.fill_rate,
    )


def registry_options_from_args(args: argparse.Namespace) -> RegistryOptions:
    """The ``RegistryOptions`` of the shared registry command-line options."""
    # Imported here: the registry package loads requests, which commands that
    # never talk to a registry (mounts, umount, cache) should not pay for.
    from blockstore.registry.options import RegistryOptions

    _check_password_given(args)

    return RegistryOptions(
        insecure=args.insecure,
        ca_file=args.ca_file,
        username=args.username,
        password=args.password,
        mirrors=list(args.mirror),
        timeout=getattr(args, "timeout", DEFAULT_READ_TIMEOUT),
    )


def _check_password_given(args: argparse.Namespace) -> None:
    """A user name given (``--username`` or mount's ``-o oci.username``, else
    ``$BLOCKSTORE_USERNAME``) with no password anywhere would be dropped for anonymous
    access, and the registry's refusal would not say the password was what lacked."""
    if args.username is not None:
        username, named_by = args.username, getattr(args, "username_option", "--username")
    else:
        username, named_by = os.environ.get("BLOCKSTORE_USERNAME"), "$BLOCKSTORE_USERNAME"
    if not username:
        return
    if args.password is not None:
        return
    if os.environ.get("BLOCKSTORE_PASSWORD") is not None:
        return
    from blockstore.registry.credentials import credentials_for
    from blockstore.registry.reference import parse_reference

    image = getattr(args, "image", None)
    ref = parse_reference(image) if image is not None else None
    if ref is not None and credentials_for(
        ref.registry, ref.repository, username=username, use_environment=False
    ):
        return  # the podman or docker login of that user for the registry is used
    raise UsageError(
        f"{named_by} was given without a password: give --password, or "
        "$BLOCKSTORE_PASSWORD, or log in with podman or docker (auth.json, config.json) "
        f"and leave out {named_by}"
    )


def check_image_arguments(args: argparse.Namespace) -> None:
    """Check the reference, platform and digest as opening the image would, and
    normalise them: a mistake is then a one-line usage error (exit 2) before anything
    is spawned (mount's server) or bound (serve's addresses, where one in use would be
    said instead of the mistake)."""
    from blockstore.registry import normalize_digest, parse_reference
    from blockstore.registry.platforms import Platform

    parse_reference(args.image)
    if args.platform is not None:
        args.platform = str(Platform.parse(args.platform))
    if args.blob is not None:
        args.blob = normalize_digest(args.blob)


def check_registry_arguments(
    args: argparse.Namespace, *, username_options: str = "--username"
) -> None:
    """Check the mirrors and the login as opening the image would, before anything is
    spawned or bound (see ``check_image_arguments``). For mount, a mirror's address with
    a password in it would otherwise reach the server's command line, which ``ps`` shows
    to every user. ``username_options``: the ways the command takes a user name."""
    from blockstore.registry.credentials import given_login

    registry_options_from_args(args)
    given_login(args.username, args.password, username_options=username_options)


def open_image_from_args(
    args: argparse.Namespace,
    *,
    needs_registry: bool = False,
    serves: bool = False,
    tar_indexes: bool = False,
    **kw: Any,
) -> OpenImage:
    """The image the shared options name, through the cache they name.

    ``needs_registry``: the command writes to the registry or reads what only
    it has, so the cached fallback of an unreachable registry is refused.
    ``serves``: the command serves the image, and says so when it serves it from
    the cache alone; any other command that falls back says so itself, or fails
    saying why (``image.unreachable``).
    ``tar_indexes``: the command takes ``--tarindex``/``--zinfo``, checked against the
    image's layers as part of the open, so a wrong one undoes a cache made for it.
    ``kw`` go to ``open_image`` (``offline``, ``prefetch``, ``replace_older``: the
    command fills the cache, so an older version's may be replaced).
    """
    # Imported here, as registry_options_from_args explains.
    from blockstore.cache.write_access import check_enterable
    from blockstore.image import open_image

    cache_dir = cache_dir_from(args)
    check_enterable(cache_dir)  # else one it cannot reach would pass for one to make
    made = _missing_dirs(cache_dir)
    try:
        image = open_image(
            args.image,
            cache_dir=cache_dir,
            cache_size=args.cache_size,
            platform=args.platform,
            options=registry_options_from_args(args),
            reading=(getattr(args, "layer", None), getattr(args, "blob", None)),
            **kw,
        )
        if tar_indexes:
            try:
                image.tar_indexes = tar_indexes_from(args, image.select(args.layer, args.blob))
            except BaseException:
                image.close()
                raise
    except BaseException:
        _remove_new_cache(made)
        raise
    if serves and image.store.read_only and image.client is not None:
        filling = image.prefetch.fill
        # A fill would fetch every layer whole, keep none of it, and try again; readahead,
        # a trace replay and the EROFS start and walk would fetch what a read then fetches
        # again, having found it nowhere.
        image.prefetch = dataclasses.replace(
            image.prefetch,
            fill=False,
            readahead=False,
            trace_replay=False,
            erofs_start=False,
            erofs_walk=False,
        )
        skipped = "; --fill is skipped, having nowhere to keep the layers" if filling else ""
        if image.store.env.lost is not None:  # said already: it serves nothing from it
            if filling:
                log.warning("the cache at %s keeps nothing%s", image.store.path, skipped)
        else:
            log.warning(
                "the cache at %s is read-only here: what it holds is served from it, the "
                "rest fetched and served, never kept%s",
                image.store.path,
                skipped,
            )
    if serves and image.unreachable is not None:
        log.warning(
            "%s; serving %s from the cache alone", image.unreachable, image.resolved.reference
        )
    if needs_registry and image.client is None:
        image.close()
        if isinstance(image.unreachable, CredentialHelperError):
            raise image.unreachable  # the login is missing, not the registry
        why = str(image.unreachable or "the registry cannot be reached")
        reference = image.resolved.reference
        raise RegistryUnreachable(why if reference in why else f"{reference}: {why}")
    return image


@contextlib.contextmanager
def cache_opened_first(args: argparse.Namespace) -> Iterator[None]:
    """Within the block, the cache of an offline open (``args.offline``) is open already,
    opened before anything else is done: one this version does not open (another
    format, damage it cannot read past offline) fails the command as the image's open
    would, but before an address is bound or a line said. The image's open shares it."""
    env = _open_offline_cache(args) if args.offline else None
    try:
        yield
    finally:
        if env is not None:
            env.close()


def _open_offline_cache(args: argparse.Namespace) -> CacheEnv | None:
    """The cache the arguments name, opened as an offline open opens it; None where there
    is none, which the image's open then says."""
    # Imported here, as registry_options_from_args explains.
    from blockstore.cache.env import CacheEnv
    from blockstore.cache.layout import holds_cache
    from blockstore.cache.write_access import check_enterable

    path = cache_dir_from(args)
    check_enterable(path)  # else one it cannot reach would pass for none
    return CacheEnv.open(path, offline=True) if holds_cache(path) else None


def _missing_dirs(path: Path) -> list[Path]:
    """``path`` and those of its parents that do not exist yet, deepest first: what
    opening a cache at ``path`` makes."""
    missing = []
    # As the kernel will find it: ``typo/../mine`` is ``mine``, which may be the user's.
    path = Path(os.path.realpath(path))
    while not os.path.lexists(path) and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


def _remove_new_cache(made: list[Path]) -> None:
    """Undo the cache a command made and then failed to use (the registry unreachable,
    the image unknown, the login refused): a first command that fails leaves nothing
    behind. Kept if anything but LMDB's two files is in it, or another process has it
    open (``remove_if_unused``)."""
    from blockstore.cache.in_use import remove_if_unused

    if not made or not made[0].is_dir() or not remove_if_unused(made[0]):
        return
    for directory in made:
        try:
            directory.rmdir()
        except OSError:
            return


def say(args: argparse.Namespace, line: str) -> None:
    """A progress or success line on stdout, which ``-q`` silences for every command, as
    for ``mount``: errors and warnings (on stderr) stay, and so does what was asked to be
    shown (a listing, ``--json``)."""
    if args.quiet <= 0:
        print(line)


def write_whole(path: Path, data: bytes, suffix: str = ".partial") -> None:
    """``data`` at ``path``, never half written: written beside it and renamed over it.
    If that fails (no such directory, ``path`` a directory), nothing is left beside it,
    and the error names ``path``, the file the user gave, not the one beside it."""
    if not path.name:  # ``.``, ``/`` or an empty name: a directory, and nothing beside it
        raise BlockstoreError(f"cannot write {path}: Is a directory")
    try:
        replace_whole(path, data, suffix)
    except OSError as exc:
        raise BlockstoreError(f"cannot write {path}: {exc.strerror or exc}") from exc
