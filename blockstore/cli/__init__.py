"""The ``blockstore`` command: one subcommand per module, one error mapping.

Each command module exposes ``register(subparsers)``, which adds its
subcommands and sets ``func`` on them; ``func(args) -> int`` is the exit
code. Only the module of the command being run is imported (``--help``
imports them all), so a command starts without loading every library the
others use. Every ``BlockstoreError`` becomes one line on stderr and its own
exit code, so scripts can tell causes apart.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import importlib
import logging
import os
import shlex
import sys
from importlib import metadata

from blockstore.cli.parser import OneLineParser
from blockstore.errors import (
    AuthError,
    BlobReadError,
    BlockstoreError,
    NotPermitted,
    OutOfResources,
    RegistryError,
    RegistryUnreachable,
    unavailable,
)
from blockstore.logformat import setup_logging
from blockstore.throttledlog import flush_all

COMMANDS = {
    "inspect": "registry_cmds",
    "push": "registry_cmds",
    "cache": "cache_cmds",
    "trace": "trace_cmds",
    "prefetch": "image_cmds",
    "serve": "serve_cmds",
    "mount": "mount_cmds",
    "umount": "mount_cmds",
    "mounts": "mount_cmds",
    "demo": "demo_cmds",
    "index": "index_cmds",
}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser, with only the module of the command named in ``argv`` loaded."""
    parser = OneLineParser(
        prog="blockstore",
        description="Mount filesystem images stored in OCI registries, lazily, "
        "through a persistent integrity-checked chunk cache.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="say more")
    parser.add_argument("-q", "--quiet", action="count", default=0, help="say less")
    parser.add_argument(
        "--version", action="version", version=f"blockstore {metadata.version('blockstore')}"
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    named = [word for word in argv or () if not word.startswith("-")][:1]
    modules = {COMMANDS[word] for word in named if word in COMMANDS} or set(COMMANDS.values())
    for module_name in sorted(modules, key=list(COMMANDS.values()).index):
        importlib.import_module(f"blockstore.cli.{module_name}").register(subparsers)
    return parser


def exit_code(exc: BlockstoreError) -> int:
    """``exc``'s code, or, for a read that could not be served because the registry could
    not be reached or refused the login, or the process was out of threads, that
    cause's: the registry went away, and a script should see it as it would had the
    registry been away from the start. A registry or token issuer that answered only 429
    or 5xx, its retries spent, is away too, as an open takes it (``unavailable``),
    whether it said so at the open or under a read: an outage is no "not found", no
    refused login and no fault of the cache. Any other refusal under a read (storage
    the registry redirected to refusing its URL, a reply of another range refused here)
    is the registry's answer, as at the open: not bytes not cached while offline."""
    if isinstance(exc, BlobReadError):
        refusal: RegistryError | None = None
        cause = exc.__cause__
        while cause is not None:
            if isinstance(cause, RegistryUnreachable | AuthError | OutOfResources):
                return cause.exit_code
            if unavailable(cause):
                return RegistryUnreachable.exit_code
            if refusal is None and isinstance(cause, RegistryError):
                refusal = cause
            cause = cause.__cause__
        if refusal is not None:
            return refusal.exit_code
    if unavailable(exc):
        return RegistryUnreachable.exit_code
    return exc.exit_code


def docker_hub_hint(exc: BlockstoreError, argv: list[str]) -> str:
    """A second line for Docker Hub unreachable when no argument named it: an image
    written without a host (``tools/rootfs:v1``) is looked up there, as docker does,
    which a user of a local registry who left the host off does not expect. Told by
    the exit code, since ``mount`` hears it from its server as a failed start; not by
    that server, whose log would then say more than the error and be kept for it."""
    from blockstore.registry.reference import DOCKER_HUB

    if exit_code(exc) != RegistryUnreachable.exit_code or DOCKER_HUB not in str(exc):
        return ""
    if any("docker.io" in word or word.startswith("--ready-fd") for word in argv):
        return ""
    return (
        "\nblockstore: an image named without a registry host is looked up on Docker Hub; "
        "name one in another registry as HOST[:PORT]/NAME:TAG"
    )


def as_root_hint(exc: BlockstoreError, argv: list[str]) -> str:
    """Where a user is refused for not being root, the command to run instead, by its
    path: sudo resets PATH (Debian's ``secure_path``), so ``sudo blockstore`` is not found.
    Its arguments are left as ``...``, so no password given among them is repeated."""
    if not isinstance(exc, NotPermitted) or os.geteuid() == 0:
        return ""
    named = next((i for i, word in enumerate(argv) if not word.startswith("-")), None)
    if named is None:
        return ""
    rest = " ..." if argv[named + 1 :] else ""
    command = shlex.join([*_program(), argv[named]]) + rest
    return f"; sudo resets PATH, so name the command by its path: sudo {command}"


def _program() -> list[str]:
    """This program as a path root can run: the console script, or ``python -m``."""
    path = os.path.abspath(sys.argv[0])
    if os.path.basename(path) == "__main__.py":
        return [sys.executable, "-m", "blockstore"]
    return [path]


def _say_last(error: str) -> None:
    """A command's final error, its last line: the counts of warnings held back are said
    before it, not after it at exit."""
    flush_all()
    print(f"blockstore: {error}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Run the command ``argv`` names, its exit code returned; without ``argv``, the
    process's own command, which ends the process itself where the interpreter's
    teardown is not safe (``_leave_if_cache_in_use``)."""
    code = _run(sys.argv[1:] if argv is None else argv)
    if argv is None:
        _leave_if_cache_in_use(code)
    return code


def _leave_if_cache_in_use(code: int) -> None:
    """End the process with ``code`` now, as its exit would end it, where a thread may
    still be inside LMDB or go on with a close (``in_use_at_exit``: writes a stop left
    behind a stopped process's write lock): the interpreter's teardown would run beside
    it, and a thread it starts then crashes the process (SIGSEGV in place of the exit
    code), as can one it ends from within. The exit functions run first, and the
    output is flushed, as at any exit; no thread is waited for, as any that would
    write to the cache waits for the same lock."""
    env = sys.modules.get("blockstore.cache.env")  # not loaded: no cache was opened
    if env is None or not env.in_use_at_exit():
        return
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)


def _run(argv: list[str]) -> int:
    try:
        args = build_parser(argv).parse_args(argv)
        setup_logging(args.verbose - args.quiet, daemon=args.command == "serve")
        return int(args.func(args) or 0)
    except BlockstoreError as exc:
        hint = docker_hub_hint(exc, argv) or as_root_hint(exc, argv)
        _say_last(f"{exc}{hint}")
        return exit_code(exc)
    except KeyboardInterrupt:
        _say_last("interrupted")
        return 130
    except BrokenPipeError:
        return 141
    except OSError as exc:
        # A file the user named that cannot be read or written, a port in use:
        # the system's own words say it best, in one line.
        _say_last(str(exc))
        return 1
    except MemoryError:
        _say_last("out of memory (a limit on this process, or the machine's)")
        return OutOfResources.exit_code
    except RuntimeError as exc:
        if "can't start new thread" not in str(exc):
            raise  # a bug: its traceback is what to report
        _say_last(
            f"out of threads ({exc}): a limit on this process's threads or memory, or the machine's"
        )
        return OutOfResources.exit_code
    finally:
        logging.shutdown()


if __name__ == "__main__":
    sys.exit(main())
