"""The ``blockstore`` command: one subcommand per module, one error mapping.

Each command module exposes ``register(subparsers)``, which adds its
subcommands and sets ``func`` on them; ``func(args) -> int`` is the exit
code. Every ``BlockstoreError`` becomes one line on stderr and its own
exit code, so scripts can tell causes apart.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from blockstore.cli.common import setup_logging
from blockstore.errors import BlockstoreError

COMMAND_MODULES = (
    "blockstore.cli.registry_cmds",
    "blockstore.cli.cache_cmds",
    "blockstore.cli.serve_cmds",
    "blockstore.cli.mount_cmds",
    "blockstore.cli.image_cmds",
    "blockstore.cli.demo_cmds",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="blockstore",
        description="Mount filesystem images stored in OCI registries, lazily, "
        "through a persistent integrity-checked chunk cache.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="say more")
    parser.add_argument("-q", "--quiet", action="count", default=0, help="say less")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose - args.quiet)
    try:
        return int(args.func(args) or 0)
    except BlockstoreError as exc:
        print(f"blockstore: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("blockstore: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 141
    finally:
        logging.shutdown()


if __name__ == "__main__":
    sys.exit(main())
