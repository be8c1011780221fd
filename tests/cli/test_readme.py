"""What the README tells a user of the ``blockstore`` command, held against the command."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import pkgutil
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from rig.processes import free_port

import blockstore
import blockstore.cli
import nbdfront
from blockstore.cli import build_parser, main
from blockstore.errors import BlockstoreError

README = Path(__file__).resolve().parents[2] / "README.md"

# What can fail outside the engine's own errors, each caught by ``main`` with a code.
FAILURES_OUTSIDE_THE_ENGINE = [
    KeyboardInterrupt(),
    BrokenPipeError(),
    OSError("a file that cannot be written"),
    MemoryError(),
    RuntimeError("can't start new thread"),
]


def documented_exit_codes() -> set[int]:
    """The codes of the README's exit-code table, a range such as ``10-13`` counting
    for each code in it."""
    lines = README.read_text().splitlines()
    rows = lines[lines.index("| code | cause |") + 2 :]
    codes: set[int] = set()
    for row in rows:
        if not row.startswith("|"):
            break
        first, _, last = row.split("|")[1].strip().partition("-")
        codes.update(range(int(first), int(last or first) + 1))
    return codes


def engine_error_codes() -> set[int]:
    """The exit code of every engine error, with every module that may define one loaded."""
    for package in (blockstore, nbdfront):
        for module in pkgutil.walk_packages(package.__path__, f"{package.__name__}."):
            importlib.import_module(module.name)
    classes, codes = [BlockstoreError], set()
    while classes:
        error = classes.pop()
        codes.add(error.exit_code)
        classes.extend(error.__subclasses__())
    return codes


class _CommandFailingWith:
    """A parsed command line whose command raises ``failure``, as a real command would."""

    def __init__(self, failure: BaseException):
        self.failure = failure

    def parse_args(self, argv: list[str]) -> argparse.Namespace:
        return argparse.Namespace(command="cache", verbose=0, quiet=0, func=self.run)

    def run(self, args: argparse.Namespace) -> int:
        raise self.failure


def code_main_gives(failure: BaseException, monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(blockstore.cli, "build_parser", lambda argv: _CommandFailingWith(failure))
    return main([])


def test_the_exit_code_table_names_every_code_the_command_gives_and_no_other(monkeypatch):
    """Tried: every engine error's exit code, and the code ``main`` gives for each failure
    outside the engine (Ctrl-C, its output closed early as by ``| head``, an OSError, out
    of memory or threads), against the README's exit-code table. Must hold: the table
    has a row for each code given, and each of its rows is a code something gives."""
    given = engine_error_codes() | {
        code_main_gives(failure, monkeypatch) for failure in FAILURES_OUTSIDE_THE_ENGINE
    }
    assert documented_exit_codes() == given


def example_commands() -> list[str]:
    """Each ``blockstore`` command line of the README's examples (a synopsis too), its
    continuation lines joined and its comment dropped."""
    commands: list[str] = []
    continued = False
    for line in README.read_text().splitlines():
        text = line.removeprefix("    ").split("  #")[0].rstrip()
        if continued:
            commands[-1] += " " + text.rstrip("\\").strip()
        elif re.match(r"(sudo \.venv/bin/)?blockstore ", text) and line.startswith("    "):
            commands.append(text.rstrip("\\").split("blockstore ", 1)[1])
        continued = line.startswith("    ") and text.endswith("\\") and bool(commands)
    return commands


def parsers_of(command: str) -> list[argparse.ArgumentParser]:
    """The parsers of the commands a line names: ``cache pin|unpin IMAGE`` names two."""
    words = [word for word in command.split() if word not in ("-v", "-q")]
    found = [build_parser(None)]
    for word in words[:2]:
        choices = [
            action.choices
            for p in found
            for action in p._actions
            if isinstance(action, argparse._SubParsersAction)
        ]
        if not choices:
            break
        found = [choice[name] for choice in choices for name in word.split("|")]
    return found


def test_every_option_an_example_gives_is_one_its_command_takes():
    """Tried: every ``blockstore`` command line of the README's examples and synopses,
    each option in it (``--insecure``, ``-o``, ``--tls-certificates``...). Must hold: the
    command it is given to takes it, so no example is refused as written."""
    commands = example_commands()
    assert len(commands) > 15
    wrong = [
        (parser.prog, option)
        for command in commands
        for parser in parsers_of(command)
        for option in re.findall(r"(?<![\w-])(--?[a-zA-Z][a-z0-9-]*)", command)
        if option not in ("-v", "-q") and option not in parser._option_string_actions
    ]
    assert wrong == []


def example_lines(first: str, last: str) -> list[str]:
    """The README's example lines from the one starting with ``first`` through the next
    starting with ``last``, as a user copies them."""
    lines = [line.removeprefix("    ") for line in README.read_text().splitlines()]
    start = next(i for i, line in enumerate(lines) if line.startswith(first))
    end = next(i for i in range(start, len(lines)) if lines[i].startswith(last))
    return lines[start : end + 1]


def test_the_serve_examples_wait_for_ready_ends_when_the_server_fails(tmp_path: Path):
    """Tried: the README's serve example as written, up to its wait for ``ready``, with
    nothing listening at the registry's address, so the server fails at once. Must hold:
    the wait ends once the server has exited, its error said, rather than waiting for a
    ``ready`` that never comes (as a loop on ``grep`` alone did), and no grep error is
    said while ``serve.out`` is not there yet. (Listening on a free port, not the default
    the example takes, which a test beside this one may hold.)"""
    with socket.socket() as refusing:
        refusing.bind(("127.0.0.1", 0))  # bound, never listening: every connect refused
        address = f"127.0.0.1:{refusing.getsockname()[1]}"
        script = "\n".join(example_lines("blockstore serve 127.0.0.1:5000", "until "))
        # A port of its own: the default one may be another test's at this moment.
        script = script.replace("127.0.0.1:5000", address).replace(
            "--insecure >", "--insecure --listen 127.0.0.1:0 >"
        )
        assert "--listen 127.0.0.1:0" in script
        done = subprocess.run(
            ["bash", "-c", script],
            cwd=tmp_path,
            env=example_environment(tmp_path),
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert f"cannot reach registry {address}" in done.stderr
    assert "serve.out" not in done.stderr


def commands(parser: argparse.ArgumentParser, name: str = "") -> dict[str, argparse.ArgumentParser]:
    """Every command's parser by its name (``mount``, ``cache gc``)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return {
                named: found
                for word, sub in action.choices.items()
                for named, found in commands(sub, f"{name} {word}".strip()).items()
            }
    return {name: parser}


def taking(option: str) -> set[str]:
    return {
        name
        for name, parser in commands(build_parser(None)).items()
        if option in parser._option_string_actions
    }


def named_commands(text: str) -> set[str]:
    return set(re.findall(r"`([a-z ]+)`", text))


def test_the_commands_said_to_take_an_option_are_those_that_take_it():
    """Tried: each README sentence naming the commands that take an option (`serve`,
    `mount`, `prefetch` and `index` take `--timeout`), the one naming those that take a
    cache size, and every switch of the table of prefetch heuristics (of `mount` and
    `serve`). Must hold: the commands named are the very ones whose parser takes it."""
    text = " ".join(README.read_text().split())
    said = {
        option: named_commands(names)
        for names, option in re.findall(
            r"((?:`[a-z ]+`(?:, | and ))+`[a-z ]+`) (?:also )?take `(--[a-z-]+)", text
        )
    }
    assert {"--timeout", "--metrics", "--trace-file"} <= set(said)
    fillers = re.search(r"Only the commands that fill the cache \(([^)]*)\) and `cache gc`", text)
    said["--cache-size"] = named_commands(fillers[1]) | {"cache gc"}
    table = text[text.index("| what | on by default | off with |") :].split("Without a trace")[0]
    said |= {option: {"mount", "serve"} for option in re.findall(r"`(--[a-z-]+)", table)}
    assert len(said) > 8
    assert {option: taking(option) for option in said} == said


# Options the README names of other programs, each with the program that takes it.
OTHER_PROGRAMS_OPTIONS = {
    "--all-root": "mkfs.erofs",
    "--tar": "mkfs.erofs",
    "--connections": "nbdfuse",
    "--readonly": "nbdfuse",
    "--list": "nbdinfo",
    "--check": "ruff format",
    "--minutes": "tests/nbd/nbd_fuzz.py",
}


def test_every_option_the_readme_names_is_one_a_command_takes():
    """Tried: every ``--option`` the README names, in its prose as in its examples. Must
    hold: some command takes it, or it is one of the other programs' options the README
    names (mkfs.erofs's, nbdfuse's...), so no option dropped from the command lingers
    in the manual."""
    named = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", README.read_text()))
    top = build_parser(None)
    taken = {
        option
        for parser in [top, *commands(top).values()]
        for option in parser._option_string_actions
    }
    assert named - taken == set(OTHER_PROGRAMS_OPTIONS)


def take_down_example(shell: subprocess.Popen, workdir: Path) -> None:
    """What an example that failed part way left: its mounts, then its processes (the
    server, nbdfuse), all in the shell's session."""
    for mountpoint in (workdir / "layer0", workdir / "fuse"):
        if os.path.ismount(mountpoint):
            subprocess.run(["umount", "--lazy", str(mountpoint)], check=False)
    with contextlib.suppress(ProcessLookupError):  # the example stopped all it started
        os.killpg(shell.pid, signal.SIGTERM)
    shell.wait(timeout=10)


def example_environment(workdir: Path) -> dict[str, str]:
    """What a README example runs in: this checkout's ``blockstore`` first on PATH, as
    after set-up, and a cache of its own under ``workdir``."""
    return {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "BLOCKSTORE_CACHE_DIR": str(workdir / "cache"),
    }


def readme_shell(first: str, last: str) -> str:
    """The README's example lines from ``first`` through ``last``, as one script."""
    return "\n".join(example_lines(first, last))


@pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/fuse") or shutil.which("nbdfuse") is None,
    reason="mounts by hand: needs root, /dev/fuse and nbdfuse",
)
def test_the_serve_and_nbdfuse_examples_run_as_written(
    registry, pushed_images, erofs_images, tmp_path
):
    """Tried: the README's serve example and its mount of an export by hand with nbdfuse,
    run as written (the nbdfuse steps twice, as a user trying again does), adapted only
    in the image, the address and the mount point. Must hold: each step works: `ready`
    waited for, the export copied whole, the image's tree listed both times, everything
    taken down, the server stopped by the example's own `kill`. Before, nbdfuse's pidfile
    left by the first run was taken for the second's, which mounted before the file was
    attached."""
    serve = readme_shell("blockstore serve 127.0.0.1:5000", "qemu-img convert")
    by_hand = readme_shell("mkdir -p fuse /mnt/layer0", "umount /mnt/layer0")
    stop = readme_shell("kill $SERVE_PID", "kill $SERVE_PID")
    address = f"127.0.0.1:{free_port()}"
    script = "\n".join(["set -e", serve, by_hand, by_hand, stop, "wait $SERVE_PID"])
    script = (
        script.replace("127.0.0.1:5000/tools/rootfs:v1", pushed_images.small)
        .replace("--insecure >", f"--insecure --listen {address} >")
        .replace("127.0.0.1:10809", address)
        .replace("/mnt/layer0", str(tmp_path / "layer0"))
    )
    out = tmp_path / "out"
    with out.open("w") as stdout:
        shell = subprocess.Popen(
            ["bash", "-c", script],
            cwd=tmp_path,
            env=example_environment(tmp_path),
            stdout=stdout,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        assert shell.wait(timeout=120) == 0, out.read_text()
    finally:
        take_down_example(shell, tmp_path)
    listing = sorted(path.name for path in erofs_images.small.tree.iterdir())
    assert out.read_text().split("\n").count(listing[0]) == 2
    assert (tmp_path / "copy.erofs").read_bytes() == erofs_images.small.path.read_bytes()
    assert not os.path.ismount(tmp_path / "layer0") and not os.path.ismount(tmp_path / "fuse")
