"""Fixtures for tests that mount for real: skip where they cannot, clean up always.

Every mounting test gets a private run directory (so its mount records are
its own) and, on teardown, whatever it left is undone even when the test
failed: recorded mounts are unmounted lazily, stray mounts under its
directories are detached, and processes started for it are killed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import pytest
from mount_trees import build_opaque_stack
from rig.images import build_erofs
from rig.mounts_left import take_down_recorded
from rig.processes import processes_mentioning

from blockstore.errors import MountError
from nbdfront.mount import attach, syscall

NBDKIT_SERVE = Path(__file__).parent / "nbdkit_serve.py"


def why_mounting_cannot_run() -> str | None:
    if os.geteuid() != 0:
        return "mount tests need root"
    if not os.path.exists("/dev/fuse"):
        return "mount tests need /dev/fuse"
    for tool in ("nbdfuse", "mkfs.erofs", "nbdkit"):
        if shutil.which(tool) is None:
            return f"mount tests need {tool}"
    with open("/proc/filesystems") as f:
        kinds = f.read().split()
    for kind in ("erofs", "fuse", "overlay"):
        if kind not in kinds:
            return f"this kernel has no {kind} file system"
    return None


CLEANUP_PASSES = 3
"""Times stray mounts are detached: one hidden by another over a directory above it (a
test that failed half way) can be reached only once that one is gone."""


def undo_everything(*roots: Path) -> None:
    """Last-resort cleanup: recorded mounts (the innermost first: a mount with another
    inside is refused), then any mount and process under ``roots``."""
    for mountpoint, exc in take_down_recorded():
        print(f"cleanup: {mountpoint}: {exc}", file=sys.stderr)
    for root in roots:
        prefix = str(root).rstrip("/") + "/"
        for _ in range(CLEANUP_PASSES):
            for point in sorted(syscall.mounted(), key=len, reverse=True):
                if point.startswith(prefix):
                    with contextlib.suppress(MountError):
                        syscall.umount(point, lazy=True)
        for pid in processes_mentioning(str(root)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def mount_dirs(tmp_path, monkeypatch):
    """Root and FUSE, or skip; a short private run dir (Unix socket paths are short)."""
    reason = why_mounting_cannot_run()
    if reason:
        pytest.skip(reason)
    run = Path(tempfile.mkdtemp(prefix="bs-run-"))
    monkeypatch.setenv("BLOCKSTORE_RUN_DIR", str(run))
    try:
        yield tmp_path, run
    finally:
        undo_everything(run, tmp_path)
        shutil.rmtree(run, ignore_errors=True)


@pytest.fixture
def nbdfuse_only(mount_dirs) -> None:
    """For tests of the nbdfuse path itself: skip where the kernel NBD client is used."""
    if attach.choose_method() != attach.NBDFUSE:
        pytest.skip("this machine attaches with the kernel NBD client, not nbdfuse")


@pytest.fixture
def mountpoint(mount_dirs) -> Path:
    path = mount_dirs[0] / "mnt"
    path.mkdir()
    return path


@pytest.fixture(scope="session")
def opaque_images(tmp_path_factory):
    """Two EROFS layer images (bottom first) whose top layer has an opaque directory,
    and the merged tree they must show."""
    if os.geteuid() != 0:
        pytest.skip("an opaque directory needs root (trusted.* xattrs)")
    base = tmp_path_factory.mktemp("opaque")
    trees, merged = build_opaque_stack(base)
    return [
        build_erofs(tree, base / f"layer{i}.erofs").path for i, tree in enumerate(trees)
    ], merged


@pytest.fixture
def local_server(mount_dirs):
    """Makes the command of a server for local images (export name -> image file).

    It is nbdkit's file plugin, saying it is ready on the same readiness pipe
    ``blockstore serve`` uses, so the mount stack is tested without a registry. Stopped,
    it exits with ``stop_status`` after ``stop_delay`` seconds.
    """
    counter = iter(range(1000))

    def server_argv(
        images: dict[str, Path], stop_status: int = 0, stop_delay: float = 0.0
    ) -> list[str]:
        directory = mount_dirs[0] / f"exports{next(counter)}"
        directory.mkdir()
        for name, image in images.items():
            shutil.copyfile(image, directory / name)
        return [
            sys.executable,
            str(NBDKIT_SERVE),
            str(directory),
            "--stop-status",
            str(stop_status),
            "--stop-delay",
            str(stop_delay),
        ]

    return server_argv
