"""Fixtures for tar-layer tests: mounts of ``metadata || tar`` files, undone always."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from nbdfront.mount import syscall as mount_syscall


def why_kernel_cannot_mount() -> str | None:
    if os.geteuid() != 0:
        return "kernel mounts need root"
    with open("/proc/filesystems") as fh:
        if "erofs" not in fh.read().split():
            return "this kernel has no erofs"
    return None


@pytest.fixture
def kernel_mount(tmp_path: Path) -> Iterator[Callable[[Path], Path]]:
    """Mount an image file read-only (file-backed, no loop device); unmounted at teardown."""
    reason = why_kernel_cannot_mount()
    if reason:
        pytest.skip(reason)
    mounted: list[Path] = []

    def mount(image: Path, fstype: str = "erofs", options: str = "") -> Path:
        target = tmp_path / f"mnt{len(mounted)}"
        target.mkdir()
        mount_syscall.mount(str(image), str(target), fstype, options)
        mounted.append(target)
        return target

    yield mount
    for target in reversed(mounted):
        mount_syscall.umount(str(target), lazy=True)
