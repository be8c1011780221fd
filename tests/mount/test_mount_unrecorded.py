"""``blockstore mounts`` and ``umount`` for a mount whose record is gone."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from mount_trees import assert_same_tree
from rig.processes import processes_mentioning
from rig.waiting import wait_for
from suggested import own_lines, run_suggested

from blockstore.errors import MountpointBusy
from nbdfront.mount import records, stack, syscall

BLOCKSTORE = [sys.executable, "-m", "blockstore"]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*BLOCKSTORE, *args], capture_output=True, text=True, timeout=60)


def test_a_mount_whose_record_is_gone_is_listed_as_such(
    mount_dirs, mountpoint, erofs_images, local_server
):
    """A three-layer mount whose run directory was cleared (``rm -rf``: the record goes,
    the state directory with its mounts stays) while its server runs: ``mounts`` lists it
    as ``record gone`` with what it cannot know shown as ``?`` (``--json``: ``recorded``
    false, the server's pid), and says ``umount`` cleans it up, as ``umount`` then does.
    Before, ``mounts`` said there were no blockstore mounts while one stood, its server
    running, which only ``umount`` of the right path could find."""
    _, run = mount_dirs
    layers = erofs_images.layers
    argv = local_server({f"layer{i}": layer.path for i, layer in enumerate(layers)})
    record = stack.mount(argv, str(mountpoint), image="three")
    subprocess.run(["rm", "-rf", str(run)], capture_output=True)
    assert records.saved() == []

    listed = cli("mounts")
    assert listed.returncode == 0, listed.stderr
    header, row = listed.stdout.splitlines()
    assert header.split()[:2] == ["MOUNTPOINT", "IMAGE"]
    assert row.split() == [str(mountpoint), "?", "?", "?", "record", "gone", "?"]
    said = f"blockstore: {mountpoint}: `blockstore umount {mountpoint}` cleans it up"
    assert own_lines(listed.stderr) == [said]
    (shown,) = json.loads(cli("mounts", "--json").stdout)
    assert shown["recorded"] is False and shown["state"] == "record gone"
    assert shown["image"] is None and shown["server_pid"] == record.server.pid

    assert cli("umount", str(mountpoint)).returncode == 0
    assert not record.server.alive()
    assert cli("mounts").stdout == "no blockstore mounts\n"
    assert json.loads(cli("mounts", "--json").stdout) == []
    assert not Path(record.state_dir).exists()


def test_a_damaged_record_is_undone_as_a_mount_without_one(
    mount_dirs, mountpoint, erofs_images, local_server
):
    """A record that does not parse (cut short by a crash, edited by hand): ``mounts``
    lists its mount as ``record damaged``, ``mount`` there again is refused naming
    ``umount`` (exit 13), and ``umount`` undoes it, server included, saying the record was
    damaged. Before, ``mounts`` said there were no mounts, and ``mount`` and ``umount``
    each died with a JSONDecodeError traceback (exit 1), leaving the mount for good."""
    record = stack.mount(
        local_server({"layer0": erofs_images.small.path}), str(mountpoint), image="small"
    )
    (Path(record.state_dir) / records.RECORD_NAME).write_text('{"mountpoint": "/mn')

    listed = cli("mounts")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines()[1].split()[-3:] == ["record", "damaged", "?"]
    again = cli("mount", "127.0.0.1:5000/a/b:v1", str(mountpoint))
    assert again.returncode == 13, again.stderr
    assert "whose record is gone or damaged; `blockstore umount" in again.stderr
    done = cli("umount", str(mountpoint))
    assert done.returncode == 0, done.stderr
    assert done.stderr.startswith("blockstore: its mount record was damaged (it does not parse)")
    assert not record.server.alive()
    assert cli("mounts").stdout == "no blockstore mounts\n"
    assert not Path(record.state_dir).exists()


def test_mounts_tells_a_damaged_record_from_a_gone_one(
    mount_dirs, mountpoint, erofs_images, local_server
):
    """Tried: a mount whose record no longer parses (cut short by a crash), then ``mounts``
    and ``mounts --json``. Must hold: its state is ``record damaged`` (``--json``:
    ``recorded`` false), with the ``blockstore umount`` that cleans it up, as ``umount``
    then says the record was damaged. Before, it was listed ``record gone``, as if the
    run directory had been cleared, sending the user to look for who removed it."""
    record = stack.mount(
        local_server({"layer0": erofs_images.small.path}), str(mountpoint), image="small"
    )
    (Path(record.state_dir) / records.RECORD_NAME).write_text('{"mountpoint": "/mn')
    listed = cli("mounts")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines()[1].split()[-3:] == ["record", "damaged", "?"]
    said = f"blockstore: {mountpoint}: `blockstore umount {mountpoint}` cleans it up"
    assert own_lines(listed.stderr) == [said]
    (shown,) = json.loads(cli("mounts", "--json").stdout)
    assert (shown["state"], shown["recorded"]) == ("record damaged", False)
    done = cli("umount", str(mountpoint))
    assert done.returncode == 0, done.stderr
    assert done.stderr.startswith("blockstore: its mount record was damaged (it does not parse)")


def test_a_damaged_record_of_a_mount_of_which_nothing_is_left_does_not_keep_its_place(
    mount_dirs, mountpoint, erofs_images, local_server, caplog
):
    """Tried: a mount's record damaged (cut short), each of its mounts lazily unmounted;
    then a mount at the same place while its server still runs, and again once every
    process of it is SIGKILLed (as a crash or a reboot leaves it). Must hold: while the
    server runs, the mount is refused (exit 13) naming the `blockstore umount` that
    clears it; with nothing left, it mounts, with a warning that the damaged record was
    cleared, and `umount` then leaves nothing. Before, each was refused as "being
    mounted by another blockstore process" though none ran, while `mounts` listed
    nothing and `umount` said nothing was mounted there: only removing the state
    directory by hand let the place be mounted again."""
    _, run = mount_dirs
    argv = local_server({"layer0": erofs_images.small.path})
    record = stack.mount(argv, str(mountpoint), image="small")
    (Path(record.state_dir) / records.RECORD_NAME).write_text('{"mountpoint": "/mn')
    for point in sorted(syscall.mounted(), key=len, reverse=True):
        if point == str(mountpoint) or point.startswith(f"{run}/"):
            syscall.umount(point, lazy=True)
    with pytest.raises(MountpointBusy) as refused:
        stack.mount(argv, str(mountpoint), image="small")
    assert str(refused.value) == (
        f"{mountpoint} has a damaged mount record, and its server still runs; "
        f"`blockstore umount {mountpoint}` clears it"
    )
    for process in [record.server, *(a.process for a in record.attachments)]:
        process.signal(signal.SIGKILL)
        assert process.wait(5)
    assert wait_for(lambda: not processes_mentioning(str(run))), "the server outlived its parent"
    caplog.set_level(logging.WARNING, logger="nbdfront.mount.stack")
    again = stack.mount(argv, str(mountpoint), image="small again")
    assert [r.getMessage() for r in caplog.records] == [
        f"cleared the damaged record of an earlier mount at {mountpoint}, of which nothing "
        "was left (its processes ended and nothing of it mounted: a reboot, or a crash)"
    ]
    assert_same_tree(erofs_images.small.tree, mountpoint)
    done = cli("umount", str(mountpoint))
    assert done.returncode == 0, done.stderr
    assert records.saved() == [] and not Path(again.state_dir).exists()
    assert not processes_mentioning(str(run))


def test_a_damaged_record_of_a_mount_whose_processes_ended_says_what_still_stands(
    mount_dirs, mountpoint, erofs_images, local_server
):
    """Tried: a mount's record damaged (cut short), its top unmounted by hand and every
    process of it SIGKILLed, the mount of its FUSE file left in its state directory;
    then a mount at the same place. Must hold: refused (exit 13), saying that part of
    the earlier mount is still mounted, not that its server runs, and naming the
    `blockstore umount` that clears it, which then leaves nothing mounted or running.
    Before, it said the earlier mount's server still ran, though none did."""
    _, run = mount_dirs
    argv = local_server({"layer0": erofs_images.small.path})
    record = stack.mount(argv, str(mountpoint), image="small")
    (Path(record.state_dir) / records.RECORD_NAME).write_text('{"mountpoint": "/mn')
    syscall.umount(str(mountpoint))
    for process in [record.server, *(a.process for a in record.attachments)]:
        process.signal(signal.SIGKILL)
        assert process.wait(5)
    assert wait_for(lambda: not processes_mentioning(str(run))), "the server outlived its parent"
    assert syscall.submounts(record.state_dir)
    with pytest.raises(MountpointBusy) as refused:
        stack.mount(argv, str(mountpoint), image="small")
    assert str(refused.value) == (
        f"{mountpoint} has a damaged mount record, and part of that mount is still "
        f"mounted; `blockstore umount {mountpoint}` clears it"
    )
    done = cli("umount", str(mountpoint))
    assert done.returncode == 0, done.stderr
    assert not syscall.submounts(str(run)) and not processes_mentioning(str(run))


def test_a_mount_point_with_a_newline_keeps_to_one_line(mount_dirs, erofs_images, local_server):
    """A mount point whose name holds a newline or a tab: ``mounts`` shows it on one row
    and ``umount`` on one line, the characters written ``\\x0a``, ``\\x09`` as findmnt
    writes them (``--json`` keeps the name as it is). Before, the newline broke the row
    and the table in two."""
    base, _ = mount_dirs
    mountpoint = base / "two\nlines\there"
    mountpoint.mkdir()
    stack.mount(local_server({"layer0": erofs_images.small.path}), str(mountpoint), image="s")
    shown = str(mountpoint).replace("\n", "\\x0a").replace("\t", "\\x09")
    listed = cli("mounts")
    header, row, log = listed.stdout.splitlines()
    assert row.startswith(f"{shown}  s ") and header.index("IMAGE") == len(shown) + 2, row
    assert log.startswith("  log ") and "\n" not in log, log
    (listed_json,) = json.loads(cli("mounts", "--json").stdout)
    assert listed_json["mountpoint"] == str(mountpoint)
    done = cli("umount", str(mountpoint))
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"unmounted {shown} (s)\n"


def test_the_umount_mounts_suggests_for_an_odd_name_is_one_the_shell_runs(
    mount_dirs, erofs_images, local_server
):
    """A mount point whose name holds a newline and a space, its record gone: the
    ``blockstore umount`` that ``mounts`` names for it, run by the shell as written,
    undoes it. Before, it read ``umount .../two\\x0alines here``, which names no path
    (and, split at the space, two)."""
    base, run = mount_dirs
    mountpoint = base / "two\nlines here"
    mountpoint.mkdir()
    stack.mount(local_server({"layer0": erofs_images.small.path}), str(mountpoint), image="s")
    subprocess.run(["rm", "-rf", str(run)], capture_output=True)

    listed = cli("mounts")
    (line,) = own_lines(listed.stderr)
    command = line.split("`")[1]
    assert command.startswith("blockstore umount "), line
    done = run_suggested(command)
    assert done.returncode == 0, done.stderr
    assert cli("mounts").stdout == "no blockstore mounts\n"
