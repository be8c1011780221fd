"""Mounting while the package's files are replaced by another version's (an upgrade or a
downgrade of a checkout, or of the installed package, while a command runs)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from rig.fault_proxy import Fault
from rig.waiting import wait_for

import blockstore

PREVIOUS_RELEASE = "e9fb639"
"""The release before this one: its cache modules are laid out otherwise."""

REPO = Path(blockstore.__file__).resolve().parents[1]


def release_files(commit: str, paths: str, into: Path) -> None:
    """The files under ``paths`` (space-separated) at ``commit`` of this repository,
    written into ``into``; skips where that history is not here (a shallow clone, an
    unpacked release)."""
    done = subprocess.run(
        ["git", "-C", str(REPO), "archive", commit, *paths.split()],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"release {commit} is not in this checkout's history")
    into.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=done.stdout, check=True)


def copy_of_code(into: Path) -> Path:
    """This version's packages, in a directory of their own that a test may replace."""
    for package in ("blockstore", "nbdfront"):
        shutil.copytree(REPO / package, into / package, ignore=shutil.ignore_patterns("*.pyc"))
    return into


def test_mount_finishes_when_the_package_is_replaced_while_it_waits(
    mount_dirs, mountpoint, pushed_images, registry, fault_proxy
):
    """``mount`` waits for its server (minutes, when a large tar layer is indexed first);
    the package replaced by the previous release meanwhile, it then loaded that release's
    cache modules beside its own to describe the mount, failed to import a name they lack,
    and undid the mount with a traceback. It loads them before it starts the server."""
    base, _ = mount_dirs
    code = copy_of_code(base / "code")
    old = base / "old"
    release_files(PREVIOUS_RELEASE, "blockstore/cache", old)
    proxy = fault_proxy(registry)
    proxy.fault = Fault("delay", path_contains="/manifests/", seconds=1.5, times=1)
    image = pushed_images.small.replace(registry.host, proxy.host)
    cache = ["--cache-dir", str(base / "cache")]
    mount = subprocess.Popen(
        [sys.executable, "-m", "blockstore", "mount", "--insecure", image, str(mountpoint), *cache],
        cwd=code,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert wait_for(lambda: any("/manifests/" in r.path for r in proxy.requests))
    shutil.rmtree(code / "blockstore" / "cache")
    shutil.copytree(old / "blockstore" / "cache", code / "blockstore" / "cache")
    _, err = mount.communicate(timeout=30)
    assert mount.returncode == 0, err
    assert "Traceback" not in err
    assert any(mountpoint.iterdir())
    done = subprocess.run(
        [sys.executable, "-m", "blockstore", "umount", str(mountpoint)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr


def blockstore_cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "blockstore", *args],
        capture_output=True,
        text=True,
        timeout=60,
        **kw,
    )


def test_umount_names_a_previous_release_mount_running_inside(
    mount_dirs, pushed_images, monkeypatch
):
    """The previous release ran a mount's server and nbdfuse in the directory ``mount``
    was run in: run inside another mount, they keep that one busy. ``umount`` of it names
    the mount to unmount first; before, it asked to end the processes, which would have
    broken that mount."""
    base, _ = mount_dirs
    release_files(PREVIOUS_RELEASE, "blockstore nbdfront", base / "old")
    outer, inner = base / "outer", base / "inner"
    outer.mkdir()
    inner.mkdir()
    cache = ["--cache-dir", str(base / "cache"), "--insecure"]
    assert blockstore_cli("mount", pushed_images.small, str(outer), *cache).returncode == 0
    monkeypatch.setenv("PYTHONPATH", str(base / "old"))
    # A cache of its own: the previous release refuses this version's, a newer format.
    old_cache = ["--cache-dir", str(base / "old-cache"), "--insecure"]
    done = blockstore_cli("mount", pushed_images.small, str(inner), *old_cache, cwd=outer)
    assert done.returncode == 0, done.stderr
    monkeypatch.delenv("PYTHONPATH")
    refused = blockstore_cli("umount", str(outer))
    assert refused.returncode != 0
    assert f"`blockstore umount {inner}` first" in refused.stderr
    assert blockstore_cli("umount", str(inner)).returncode == 0
    assert blockstore_cli("umount", str(outer)).returncode == 0
