"""A directory seen read-only, as a cache shipped on a read-only volume or image is."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def read_only_view(directory: Path, at: Path) -> Iterator[Path]:
    """``directory`` bound read-only at ``at`` (a real read-only mount: root only)."""
    if os.geteuid() != 0:
        pytest.skip("a read-only bind mount needs root")
    at.mkdir()
    subprocess.run(["mount", "--bind", str(directory), str(at)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(at)], check=True)
        yield at
    finally:
        subprocess.run(["umount", "-l", str(at)], check=True)


def contents(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` by relative name, to show nothing was changed."""
    return {
        str(path.relative_to(directory)): path.read_bytes()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }
