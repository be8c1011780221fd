"""Running a command line a message suggests, as the user would paste it into a shell."""

from __future__ import annotations

import subprocess
import sys


def run_suggested(command: str) -> subprocess.CompletedProcess:
    """``command`` (a ``blockstore ...`` line a message gave) run by bash, with
    ``blockstore`` this interpreter's module: its quoting is what is tested."""
    return subprocess.run(
        ["bash", "-c", f'blockstore() {{ {sys.executable} -m blockstore "$@"; }}; {command}'],
        capture_output=True,
        text=True,
        timeout=60,
    )
