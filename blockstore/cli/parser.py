"""The command line's parser: a usage error is one line, said by the command that got it.

argparse prints the whole usage block (a dozen lines for ``mount``) before the
line that says what is wrong, and leaves arguments a subcommand did not know
to the top-level parser, which reports them without naming the subcommand.
"""

from __future__ import annotations

import argparse
import sys
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
        self._words = list(sys.argv[1:] if args is None else args)
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras

    def _hint(self, message: str) -> str:
        """Why an option commonly given to the wrong command is not taken here."""
        wrong_place = ("unrecognized arguments", "argument COMMAND", "argument ACTION")
        if message.startswith(wrong_place) and (misplaced := self._misplaced()):
            return misplaced
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

    def _misplaced(self) -> str:
        """An option given before the command it belongs to (``blockstore --insecure mount``):
        argparse takes it for this parser's, or its value for the command."""
        words = getattr(self, "_words", [])
        commands = _commands_named(self, words)
        if not commands:
            return ""
        for word in words[: commands[0][1]]:
            option = word.split("=", 1)[0]
            if not option.startswith("-") or option in self._option_string_actions:
                continue
            # The innermost command that takes it: ``cache ls``, not ``cache``.
            for parser, _ in reversed(commands):
                if option in parser._option_string_actions:
                    return f"; {option} goes after the command: {parser.prog} {option} ..."
        return ""


def _commands_named(
    parser: argparse.ArgumentParser, words: list[str]
) -> list[tuple[argparse.ArgumentParser, int]]:
    """The command ``words`` name under ``parser``, and its action (``cache ls``), each
    with where it is named."""
    named: list[tuple[argparse.ArgumentParser, int]] = []
    start = 0
    while True:
        choices = next(
            (a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)), {}
        )
        at = next((i for i in range(start, len(words)) if words[i] in choices), None)
        if at is None:
            return named
        parser = choices[words[at]]
        named.append((parser, at))
        start = at + 1
