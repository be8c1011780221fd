"""A small real file system (ext4 on a loop device), for caches that fill their disk."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def small_disk(at: Path, size: str) -> Iterator[Path]:
    """An ext4 file system of ``size`` mounted at ``at`` (root, a loop device)."""
    if os.geteuid() != 0 or shutil.which("mkfs.ext4") is None:
        pytest.skip("a loop-mounted ext4 needs root and mkfs.ext4")
    image = at.with_suffix(".ext4")
    subprocess.run(["truncate", "-s", size, str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    at.mkdir()
    subprocess.run(["mount", "-o", "loop", str(image), str(at)], check=True)
    try:
        yield at
    finally:
        subprocess.run(["umount", "-l", str(at)], check=True)


def fail_read_only(at: Path) -> None:
    """Make the ext4 ``small_disk`` mounted at ``at`` go read-only as ext4 does on an
    error under ``errors=remount-ro`` (a failing disk): every write then fails with
    EROFS, while ``statvfs`` and ``access(2)`` still call the file system writable."""
    device = subprocess.run(
        ["findmnt", "-no", "SOURCE", str(at)], capture_output=True, text=True, check=True
    ).stdout.strip()
    trigger = Path("/sys/fs/ext4") / Path(device).name / "trigger_fs_error"
    if not trigger.exists():
        pytest.skip("this kernel's ext4 cannot be made to fail on demand")
    subprocess.run(["mount", "-o", "remount,errors=remount-ro", str(at)], check=True)
    trigger.write_text("made to fail by a test\n")
