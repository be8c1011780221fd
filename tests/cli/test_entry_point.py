"""The ``blockstore`` command as it starts: what Ctrl-C does before ``main`` runs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Sends this process SIGINT when the command's modules start to load, as a Ctrl-C typed
# while Python is still starting the command would: a real signal, at a moment the test
# chooses rather than one a timer may miss.
SITECUSTOMIZE = """
import os, signal, sys

def _interrupt_at_import(event, args):
    if event == "import" and args[0] == "blockstore.cli.common":
        os.kill(os.getpid(), signal.SIGINT)

sys.addaudithook(_interrupt_at_import)
"""


def _console_script() -> list[str]:
    """What the installed ``blockstore`` script runs: pip's wrapper of the entry point
    pyproject.toml names (read there, so a stale install does not hide a change)."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, function = scripts["blockstore"].partition(":")
    return ["-c", f"import sys; from {module} import {function}; sys.exit({function}())"]


@pytest.mark.parametrize("entry", ["console script", "python -m blockstore"])
def test_ctrl_c_while_the_command_starts_exits_130_without_a_traceback(entry: str, tmp_path: Path):
    """A Ctrl-C during start-up (Python loading the command's modules, before ``main``)
    printed a KeyboardInterrupt traceback and ended by the signal; it is the one line and
    exit code 130 that an interrupt anywhere later gives."""
    (tmp_path / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    start = _console_script() if entry == "console script" else ["-m", "blockstore"]
    done = subprocess.run(
        [sys.executable, *start, "cache", "ls", "--cache-dir", str(tmp_path / "cache")],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    assert "Traceback" not in done.stderr, done.stderr
    assert done.stderr == "blockstore: interrupted\n"
    assert done.returncode == 130
    assert not (tmp_path / "cache").exists()


def test_an_ignored_sigint_stays_ignored(tmp_path: Path):
    """A command started with SIGINT ignored (``nohup``, a background job of a script)
    keeps ignoring it while it starts: the quiet handler is for a signal that would
    otherwise interrupt."""
    (tmp_path / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    done = subprocess.run(
        [sys.executable, *_console_script(), "cache", "ls", "--cache-dir", str(tmp_path / "c")],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    assert done.returncode == 8, done.stderr
    assert "no cache at" in done.stderr
