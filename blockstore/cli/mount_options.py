"""What ``blockstore mount``'s options say, and the ``blockstore serve`` command line
they become.

``-o`` also takes the option spelling of erofs-utils' ``mount.erofs -t erofs.nbd``
(``oci.layer=N``, ``oci.blob=``, ``oci.platform=``, ``oci.username=``,
``oci.password=``, ``oci.insecure``, ``oci.tarindex=``, ``oci.zinfo=``, the older
``oci=N``), so its users need not relearn them; a value given both ways must agree.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass, fields
from pathlib import Path

from blockstore.cli.common import PREFETCH_FLAGS, cache_dir_from, is_standard_stream
from blockstore.errors import UsageError

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
    # Imported where needed: the registry loads requests, which `mounts` need not.
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


def without_credentials(texts: list[str]) -> list[str]:
    """The ``-o`` values with ``oci.username`` and ``oci.password`` taken out."""
    secret = ("oci.username", "oci.password")
    return [
        ",".join(
            item for item in split_options(text) if item.lstrip().partition("=")[0] not in secret
        )
        for text in texts
    ]
