"""``umount`` given a mount whose layers are used from outside it, or a path inside a mount."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from mount_trees import assert_same_tree
from namespace_holder import HOLDER
from rig.processes import processes_mentioning
from rig.waiting import wait_for
from suggested import run_suggested

from blockstore.errors import MountpointBusy
from nbdfront.mount import listing, records, stack, syscall, unmount

BLOCKSTORE = [sys.executable, "-m", "blockstore"]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*BLOCKSTORE, *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("holder", ["a process", "a loop device"])
def test_a_layer_used_from_outside_is_refused_before_anything_is_undone(
    nbdfuse_only, mount_dirs, mountpoint, erofs_images, local_server, holder
):
    """A process with a layer's FUSE file open, or ``mount -t erofs FUSEFILE DIR`` by hand
    (mount(8) puts a loop device over the file): ``umount`` is refused as busy (exit 13),
    naming the process or the loop device and where it is mounted, and the mount stays
    whole; once that is gone, ``umount`` undoes it all. Before, the top was unmounted, then
    the FUSE file refused ("a process still uses it", even for a loop device), leaving a
    mount neither whole nor undone, which the next ``umount`` called not whole."""
    base, _ = mount_dirs
    image = erofs_images.small
    record = stack.mount(local_server({"layer0": image.path}), str(mountpoint), image="small")
    (attachment,) = record.attachments
    if holder == "a process":
        with open(attachment.device, "rb") as held:
            user = subprocess.Popen(["sleep", "60"], stdin=held)
        named, release = f"pid {user.pid} (sleep)", lambda: (user.kill(), user.wait())
    else:
        other = base / "other"
        other.mkdir()
        subprocess.run(
            ["mount", "-t", "erofs", "-o", "ro", attachment.device, str(other)], check=True
        )
        named, release = f"(mounted at {other})", lambda: syscall.umount(str(other))
    try:
        done = cli("umount", str(mountpoint))
        assert done.returncode == MountpointBusy.exit_code, done.stderr
        assert named in done.stderr and "uses its layers" in done.stderr, done.stderr
        assert listing.status(records.load(str(mountpoint))).state == "ok"
        assert_same_tree(image.tree, mountpoint)
    finally:
        release()
    done = cli("umount", str(mountpoint))
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert not Path(record.state_dir).exists() and records.saved() == []


@pytest.mark.parametrize("held", ["its copy of the mount", "a bind of the mount point"])
def test_a_mount_held_in_another_mount_namespace_is_refused_before_anything_is_undone(
    mount_dirs, mountpoint, pushed_images, erofs_images, held
):
    """Tried: the three-layer image mounted, then a process in a mount namespace made while
    it stands (as ``unshare -m`` makes one), holding its private copy of the mount, or a
    bind of the mount point elsewhere in it, as a container given the image as a volume.
    Must hold: ``umount`` is refused as busy (exit 13) before anything is undone, naming
    the process and where its namespace has the image; the mount stays whole, and once
    that process ends ``umount`` leaves nothing. Before, the top was unmounted here and the
    server stopped (the other namespace reading I/O errors), then the FUSE file it still
    held was refused as used by a process not named: a mount neither whole nor undone."""
    base, run = mount_dirs
    cache = base / "cache"
    done = cli(
        "mount", "--insecure", "--cache-dir", str(cache), pushed_images.multilayer, str(mountpoint)
    )
    assert done.returncode == 0, done.stderr
    holder = [*HOLDER, "--keep", str(base), "--keep", str(run)]
    shown = mountpoint
    if held == "a bind of the mount point":
        shown = base / "volume"
        shown.mkdir()
        holder += ["--bind", str(mountpoint), str(shown)]
    user = subprocess.Popen([*holder, "sleep", "600"])
    try:
        comm = Path(f"/proc/{user.pid}/comm")
        assert wait_for(lambda: comm.read_text().strip() == "sleep"), "never made its namespace"
        done = cli("umount", str(mountpoint))
        assert done.returncode == MountpointBusy.exit_code, done.stderr
        named = f"pid {user.pid} (sleep) in another mount namespace (mounted there at {shown})"
        assert named in done.stderr, done.stderr
        assert listing.status(records.load(str(mountpoint))).state == "ok"
        assert_same_tree(erofs_images.layers[-1].merged_tree, mountpoint)
    finally:
        user.kill()
        user.wait()
    done = cli("umount", str(mountpoint))
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert records.saved() == [] and not processes_mentioning(str(run))


def test_umount_of_a_path_inside_a_mount_names_the_mount(
    mount_dirs, mountpoint, erofs_images, local_server
):
    """``umount MNT/dir`` (a directory of the mounted image, given by mistake or by a
    shell's completion) fails (exit 10) saying it is inside the mount at MNT and how to
    undo that, and undoes nothing. Before, it said the path had nothing mounted on it and
    pointed at ``mounts``."""
    image = erofs_images.small
    record = stack.mount(local_server({"layer0": image.path}), str(mountpoint), image="small")
    inner = next(path for path in mountpoint.iterdir() if path.is_dir())
    done = cli("umount", str(inner))
    assert done.returncode == 10, done.stderr
    assert done.stderr == (
        f"blockstore: {inner} is inside the mount of small at {mountpoint}, not one itself: "
        f"`blockstore umount {mountpoint}` undoes that\n"
    )
    assert listing.status(records.load(str(mountpoint))).state == "ok"
    unmount.unmount(str(mountpoint))
    assert records.saved() == [] and not Path(record.state_dir).exists()


def test_the_umount_named_for_a_path_inside_an_odd_mount_point_is_one_the_shell_runs(
    mount_dirs, erofs_images, local_server
):
    """The same for a mount point whose name holds a space and a newline: the message
    keeps to one line, and the ``blockstore umount`` it names, run by the shell as
    written, undoes the mount. Before, the newline broke the message in two and the
    space split the path the command named."""
    base, _ = mount_dirs
    mountpoint = base / "two\nlines here"
    mountpoint.mkdir()
    stack.mount(local_server({"layer0": erofs_images.small.path}), str(mountpoint), image="s")
    inner = next(path for path in mountpoint.iterdir() if path.is_dir())
    done = cli("umount", str(inner))
    assert done.returncode == 10, done.stderr
    (line,) = done.stderr.splitlines()
    command = line.split("`")[1]
    assert command.startswith("blockstore umount "), line
    undone = run_suggested(command)
    assert undone.returncode == 0, undone.stderr
    assert records.saved() == []
