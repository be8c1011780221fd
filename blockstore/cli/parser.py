"""The command line's parser: a usage error is one line, said by the command that got it.

argparse prints the whole usage block (a dozen lines for ``mount``) before the
line that says what is wrong, and leaves arguments a subcommand did not know
to the top-level parser, which reports them without naming the subcommand.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import NoReturn

CACHE_SIZE_HINT = (
    "only the commands that fill the cache (mount, serve, prefetch, index) and cache gc "
    "take a cap, so one that only looks never changes the cap the cache keeps"
)

VERBOSITY_FLAGS = frozenset({"-v", "-q", "-vv", "-qq", "--verbose", "--quiet"})


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line; its subparsers are of its class."""

    def error(self, message: str) -> NoReturn:
        """``PROG: error: MESSAGE (usage: PROG --help)``, exit 2."""
        self.exit(
            2, f"{self.prog}: error: {message}{self._hint(message)} (usage: {self.prog} --help)\n"
        )

    def parse_known_args(
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        """Arguments this parser (and its subcommands) did not take are its error, so the
        innermost command reports them, under its own name."""
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras

    def _hint(self, message: str) -> str:
        """Why an option commonly given to the wrong command is not taken here."""
        if not message.startswith("unrecognized arguments"):
            return ""
        words = set(message.split())
        command = self.prog.removeprefix("blockstore ")
        if "--cache-size" in words:
            return f"; {command} takes no --cache-size: {CACHE_SIZE_HINT}"
        if "--mirror" in words:
            return (
                f"; {command} takes no --mirror: mirrors serve reads, a write goes to the registry"
            )
        if words & VERBOSITY_FLAGS and command != self.prog:
            return "; -v and -q go before the command (blockstore -v COMMAND ...)"
        return ""
