"""The ``blockstore umount`` lines messages suggest, pasted into a shell as they are
written, for a mount point whose name the shell would split or unquote."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from suggested import own_lines, run_suggested

from blockstore.errors import MountpointBusy
from nbdfront.mount import records, stack, syscall

BLOCKSTORE = [sys.executable, "-m", "blockstore"]
ODD_NAME = "it's a mount"
"""A space and a quote: unquoted, the shell splits the name and waits for the quote's end."""


def suggested_command(message: str) -> str:
    """The command a message names between backticks."""
    command = message.split("`")[1]
    assert "blockstore umount " in command, message
    return command


def assert_undone_by(command: str, mountpoint: Path) -> None:
    done = run_suggested(command)
    assert done.returncode == 0, (command, done.stderr)
    assert not syscall.is_mounted(str(mountpoint))
    assert records.load(str(mountpoint)) is None


def refusal(mountpoint: Path) -> str:
    with pytest.raises(MountpointBusy) as refused:
        stack.check_can_mount(str(mountpoint))
    return str(refused.value)


@pytest.mark.parametrize(
    "case", ["mounted", "record damaged", "unmounted by hand", "another run directory"]
)
def test_each_suggested_umount_runs_as_written_for_an_odd_mount_point(
    mount_dirs, erofs_images, local_server, monkeypatch, case
):
    """Tried: a mount at a directory named ``it's a mount``, then what ``mount`` says there
    when it is mounted, when its record is damaged, when its top was unmounted by hand
    (the record stays), and, for ``umount`` and ``mount``, when the run directory is
    another than the one that mounted it. Must hold: each message's ``blockstore umount``
    line, run by the shell as written, undoes the mount. Before, those lines named the
    path unquoted, which the shell splits at the space and leaves open at the quote."""
    base, run = mount_dirs
    mountpoint = base / ODD_NAME
    mountpoint.mkdir()
    record = stack.mount(
        local_server({"layer0": erofs_images.small.path}), str(mountpoint), image="s"
    )
    if case == "record damaged":
        (Path(record.state_dir) / records.RECORD_NAME).write_text("{")
    elif case == "unmounted by hand":
        syscall.umount(str(mountpoint), lazy=False)
    if case != "another run directory":
        assert_undone_by(suggested_command(refusal(mountpoint)), mountpoint)
        return
    monkeypatch.setenv("BLOCKSTORE_RUN_DIR", str(base / "other-run"))
    told = suggested_command(refusal(mountpoint))
    done = subprocess.run(
        [*BLOCKSTORE, "umount", str(mountpoint)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 10, done.stderr
    assert suggested_command(done.stderr) == told
    assert_undone_by(told, mountpoint)
    monkeypatch.setenv("BLOCKSTORE_RUN_DIR", str(run))
    assert records.saved() == []


@pytest.mark.parametrize("over", ["at the same place", "over the directory above"])
def test_a_mount_hidden_by_another_says_the_umount_that_frees_it(
    mount_dirs, erofs_images, local_server, over
):
    """Tried: a mount at a directory named ``it's a mount``, then a tmpfs of the user's
    mounted over it at the same place, or over the directory above it (named so too);
    then ``mounts`` and ``umount`` of the image. Must hold: each says, in one line, the
    ``umount`` of the tmpfs, which, run by the shell as written, frees the image:
    ``mounts`` lists it ok again and ``umount`` undoes it. Before, both said only
    "unmount that first", leaving the command, and its quoting, to the user."""
    base, _ = mount_dirs
    hider = base / ODD_NAME
    mountpoint = hider if over == "at the same place" else hider / ODD_NAME
    mountpoint.mkdir(parents=True)
    stack.mount(local_server({"layer0": erofs_images.small.path}), str(mountpoint), image="s")
    subprocess.run(["mount", "-t", "tmpfs", "users-own", str(hider)], check=True)
    try:
        listed = blockstore("mounts")
        assert listed.returncode == 0, listed.stderr
        (said,) = own_lines(listed.stderr)
        refused = blockstore("umount", str(mountpoint))
        assert refused.returncode == MountpointBusy.exit_code, refused.stderr
        assert refused.stderr.splitlines() == [said]
        assert said.count("`") == 2, said
        command = said.split("`")[1]
        assert command.startswith("umount "), said
        done = run_suggested(command)
        assert done.returncode == 0, (command, done.stderr)
    finally:
        if "users-own" in {m.source for m in syscall.mounts_at(str(hider))}:
            subprocess.run(["umount", str(hider)], check=True)
    (row,) = json.loads(blockstore("mounts", "--json").stdout)
    assert (row["state"], row["hidden_by"]) == ("ok", None)
    undone = blockstore("umount", str(mountpoint))
    assert undone.returncode == 0, undone.stderr
    assert records.saved() == []


def blockstore(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([*BLOCKSTORE, *argv], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("command", ["umount first", "umount --lazy"])
@pytest.mark.parametrize("user", ["a tmpfs inside it", "a bind mount of it"])
def test_umount_of_a_mount_in_use_by_another_says_what_to_run(
    mount_dirs, erofs_images, local_server, user, command
):
    """Tried: a mount at a directory named ``it's a mount``, then a tmpfs of the user's
    mounted on a directory inside it, or the mount bound at another such directory;
    then ``umount`` of the image, and each command its refusal names, run by the shell as
    written. Must hold: the refusal (exit 13, one line) names the ``umount`` of the
    user's mount and the ``blockstore umount --lazy`` of the image; after the first,
    ``umount`` of the image leaves nothing, and the second leaves nothing by itself.
    Before, they said "unmount that first" and "unmount with --lazy", the commands and
    their quoting left to the user."""
    base, _ = mount_dirs
    mountpoint = base / ODD_NAME
    mountpoint.mkdir()
    stack.mount(local_server({"layer0": erofs_images.small.path}), str(mountpoint), image="s")
    if user == "a tmpfs inside it":
        held = next(p for p in sorted(mountpoint.iterdir()) if p.is_dir() and not p.is_symlink())
        subprocess.run(["mount", "-t", "tmpfs", "users-own", str(held)], check=True)
    else:
        held = base / f"{ODD_NAME}, bound"
        held.mkdir()
        subprocess.run(["mount", "--bind", str(mountpoint), str(held)], check=True)
    try:
        refused = blockstore("umount", str(mountpoint))
        assert refused.returncode == MountpointBusy.exit_code, refused.stderr
        (said,) = refused.stderr.splitlines()
        assert said.count("`") == 4, said
        unmount_user, lazy = said.split("`")[1::2]
        assert unmount_user.startswith("umount "), said
        assert lazy.startswith("blockstore umount --lazy "), said
        done = run_suggested(unmount_user if command == "umount first" else lazy)
        assert done.returncode == 0, (said, done.stderr)
        if command == "umount first":
            undone = blockstore("umount", str(mountpoint))
            assert undone.returncode == 0, undone.stderr
    finally:
        subprocess.run(["umount", "--lazy", str(held)], capture_output=True)
    assert records.saved() == []
    assert not syscall.is_mounted(str(mountpoint))


def test_umount_of_the_users_own_mount_says_the_umount_that_undoes_it(mount_dirs):
    """Tried: ``blockstore umount`` of a tmpfs the user mounted at a directory named
    ``it's a mount``. Must hold: exit 10, one line saying blockstore did not mount it and
    naming the ``umount`` of it, which, run by the shell as written, unmounts it. Before,
    it said "unmount it with umount(8)", the command and its quoting left to the user."""
    base, _ = mount_dirs
    theirs = base / ODD_NAME
    theirs.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "users-own", str(theirs)], check=True)
    try:
        refused = blockstore("umount", str(theirs))
        assert refused.returncode == 10, refused.stderr
        (said,) = refused.stderr.splitlines()
        assert said.count("`") == 2, said
        command = said.split("`")[1]
        assert command.startswith("umount "), said
        done = run_suggested(command)
        assert done.returncode == 0, (said, done.stderr)
        assert not syscall.is_mounted(str(theirs))
    finally:
        subprocess.run(["umount", str(theirs)], capture_output=True)


def test_umount_of_a_mount_whose_layer_a_process_holds_says_the_lazy_umount(
    nbdfuse_only, mount_dirs, erofs_images, local_server
):
    """Tried: a mount at a directory named ``it's a mount``, a process holding its
    layer's FUSE file open, then ``umount`` of the image. Must hold: the refusal (exit 13,
    one line) names the process and the ``blockstore umount --lazy`` of the image, which,
    run by the shell as written, undoes the mount. Before, it said "unmount with
    --lazy", the command and its quoting left to the user."""
    base, _ = mount_dirs
    mountpoint = base / ODD_NAME
    mountpoint.mkdir()
    record = stack.mount(
        local_server({"layer0": erofs_images.small.path}), str(mountpoint), image="s"
    )
    with open(record.attachments[0].device, "rb") as held:
        user = subprocess.Popen(["sleep", "60"], stdin=held)
    try:
        refused = blockstore("umount", str(mountpoint))
        assert refused.returncode == MountpointBusy.exit_code, refused.stderr
        (said,) = refused.stderr.splitlines()
        assert f"pid {user.pid} (sleep)" in said and said.count("`") == 2, said
        command = said.split("`")[1]
        assert command.startswith("blockstore umount --lazy "), said
        done = run_suggested(command)
        assert done.returncode == 0, (said, done.stderr)
    finally:
        user.kill()
        user.wait()
    assert records.saved() == []
    assert not syscall.is_mounted(str(mountpoint))
