"""The mount stack on its own: nbdfuse, file-backed EROFS, overlayfs, records, umount.

The server here is nbdkit's file plugin over local images, saying it is
ready on the same readiness pipe ``blockstore serve`` uses, so these tests
need no registry;
the end-to-end tests with the real server live in test_mount_e2e.py.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from mount_trees import assert_same_tree
from namespace_holder import HOLDER
from rig.processes import processes_mentioning
from rig.small_disk import small_disk
from rig.waiting import wait_for
from stop_timing import umount_timed
from suggested import own_lines, run_suggested

from blockstore.errors import MountError, MountpointBusy
from nbdfront.mount import attach, listing, records, stack, syscall, unmount
from nbdfront.mount.process import ProcessRef
from nbdfront.mount.server import ServerFailed, previous_log, start_server
from nbdfront.mount.supervisor import STOP_GRACE, ServerExit, read_status

BLOCKSTORE = [sys.executable, "-m", "blockstore"]


def cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    """Run the blockstore command as a separate process, as a user would."""
    return subprocess.run(
        [*BLOCKSTORE, *args], capture_output=True, text=True, timeout=60, **kwargs
    )


def assert_nothing_left(record: records.MountRecord, run: Path) -> None:
    """No mount, no FUSE, no live process, no socket, no record of the mount remain."""
    table = syscall.mounted()
    assert record.mountpoint not in table
    assert not [p for p in table if p.startswith(str(run) + "/")], "a FUSE or layer mount remains"
    assert not processes_mentioning(str(run)), "a server or nbdfuse process remains"
    assert record.socket and not os.path.exists(record.socket)
    assert not os.path.exists(record.state_dir)
    assert records.saved() == []


def _lazy_umount_refused_naming_the_inner(
    outer: Path, inner: Path, inner_record: records.MountRecord, said: str
) -> None:
    """``umount --lazy`` of ``outer`` is refused (exit 13) in the one line ``said``,
    with the image inside still mounted and served."""
    busy = cli("umount", "--lazy", str(outer))
    assert busy.returncode == MountpointBusy.exit_code, busy.stderr
    assert busy.stderr.splitlines() == [f"blockstore: {outer} is busy: {said}"]
    assert syscall.is_mounted(str(inner)) and inner_record.server.alive()


def _undone_inner_first(
    outer: Path,
    records_of: tuple[records.MountRecord, records.MountRecord],
    run: Path,
    undo_inner: Callable[[], subprocess.CompletedProcess],
) -> None:
    """``undo_inner``, then ``umount`` of ``outer``, each exit 0, leave nothing of either."""
    outer_record, inner_record = records_of
    for done in (undo_inner(), cli("umount", str(outer))):
        assert done.returncode == 0, done.stderr
    assert_nothing_left(outer_record, run)
    assert not inner_record.server.alive()


def test_one_layer_mounts_reads_and_unmounts_from_another_process(
    mount_dirs, mountpoint, erofs_images, local_server
):
    """Mount one EROFS layer, compare every file, list and unmount with the CLI in other
    processes: the tree matches, ``mounts`` shows it, and umount leaves nothing behind."""
    small = erofs_images.small
    _, run = mount_dirs
    record = stack.mount(local_server({"layer0": small.path}), str(mountpoint), image="small")
    assert record.method == attach.choose_method() and not record.overlay
    assert syscall.mounted()[str(mountpoint)][0] == "erofs"
    assert_same_tree(small.tree, mountpoint)

    listed = json.loads(cli("mounts", "--json").stdout)
    assert [(m["mountpoint"], m["state"], m["layers"]) for m in listed] == [
        (str(mountpoint), "ok", 1)
    ]

    done = cli("umount", str(mountpoint))
    assert done.returncode == 0, done.stderr
    assert_nothing_left(record, run)


def test_three_layers_stack_with_overlayfs(mount_dirs, mountpoint, erofs_images, local_server):
    """Three layers mount as overlayfs over per-layer EROFS mounts, last layer on top:
    changed files show the upper version, added files show, the whiteout hides a file."""
    layers = erofs_images.layers
    _, run = mount_dirs
    argv = local_server({f"layer{i}": layer.path for i, layer in enumerate(layers)})
    record = stack.mount(argv, str(mountpoint), image="three")
    assert record.overlay and len(record.lowers) == 3
    assert syscall.mounted()[str(mountpoint)][0] == "overlay"
    assert_same_tree(layers[-1].merged_tree, mountpoint)
    unmount.unmount(str(mountpoint))
    assert_nothing_left(record, run)


def test_an_image_of_many_layers_mounts(mount_dirs, mountpoint, erofs_images, local_server):
    """Sixty-one layers (the base, then the next two over and over, the last on top):
    the overlay's options name each layer by its directory. Absolute, those names filled
    the page of options the kernel takes at about forty layers here, and the mount
    failed with a misleading ENOENT for the name cut short, or showed the directory
    that name happened to be."""
    base, *rest = erofs_images.layers
    layers = [base] + rest * 30
    _, run = mount_dirs
    argv = local_server({f"layer{i}": layer.path for i, layer in enumerate(layers)})
    record = stack.mount(argv, str(mountpoint), image="sixty-one")
    assert record.overlay and len(record.lowers) == 61
    assert len(",".join(record.lowers)) > 4096  # as absolute names, over a page
    assert_same_tree(rest[-1].merged_tree, mountpoint)
    unmount.unmount(str(mountpoint))
    assert_nothing_left(record, run)


def test_opaque_directory_hides_the_layers_below(
    mount_dirs, mountpoint, opaque_images, local_server
):
    """A directory marked opaque in the upper layer shows only its own entries."""
    images, merged = opaque_images
    argv = local_server({f"layer{i}": image for i, image in enumerate(images)})
    stack.mount(argv, str(mountpoint), image="opaque")
    assert_same_tree(merged, mountpoint)
    unmount.unmount(str(mountpoint))


def test_one_layer_of_several_mounts_alone(mount_dirs, mountpoint, erofs_images, local_server):
    """A server exporting only the middle layer gives exactly that layer's tree, no overlay."""
    middle = erofs_images.layers[1]
    record = stack.mount(local_server({"layer1": middle.path}), str(mountpoint), image="one")
    assert not record.overlay
    assert_same_tree(middle.tree, mountpoint)
    unmount.unmount(str(mountpoint))


def test_dead_server_is_reported_reads_fail_and_umount_cleans_up(
    mount_dirs, mountpoint, erofs_images, local_server
):
    """Kill the server under a mount: ``mounts`` says so, a read fails at once instead of
    hanging, and ``umount`` still takes everything down."""
    image = erofs_images.small.path
    _, run = mount_dirs
    record = stack.mount(local_server({"layer0": image}), str(mountpoint), image="small")
    assert record.server is not None
    os.kill(record.server.pid, signal.SIGKILL)
    assert record.server.wait(5)
    # The whole server dies, as the real one (one process) does: the stand-in's nbdkit
    # would otherwise linger, serving, while its client is connected.
    exports = str(mount_dirs[0] / "exports")
    for pid in processes_mentioning(exports):
        os.kill(pid, signal.SIGKILL)
    assert wait_for(lambda: not processes_mentioning(exports)), "the server outlived its kill"

    listed = cli("mounts")
    assert "server dead" in listed.stdout
    assert "blockstore umount" in listed.stderr

    some_file = next(erofs_images.small.tree.rglob("*.bin")).relative_to(erofs_images.small.tree)
    started = time.monotonic()
    with pytest.raises(OSError) as failed:
        (mountpoint / some_file).read_bytes()
    # libnbd passes on why the connection is gone (ECONNABORTED, ENOTCONN) where it can.
    gone = (errno.EIO, errno.ESHUTDOWN, errno.ENOTCONN, errno.ECONNABORTED)
    assert failed.value.errno in gone
    assert time.monotonic() - started < 5

    done = cli("umount", str(mountpoint))
    assert done.returncode == 0, done.stderr
    assert f"server dead); its log is kept at {record.log}" in done.stderr
    assert os.path.exists(record.log)
    assert_nothing_left(record, run)


def test_a_record_kept_across_a_reboot_never_signals_a_process_of_this_boot(
    mount_dirs, mountpoint, erofs_images, local_server
):
    """A reboot with the run directory kept (one not on a tmpfs): every process of the mount
    SIGKILLed, each of its mounts lazily unmounted; the record's server and nbdfuse then
    named by pid and start time as live processes of this boot (a service started at boot
    gets much the same pid and start time on every boot), its boot an earlier one. `mounts`
    lists it, `umount` clears it and leaves those processes running. Before, `umount` took
    them for the mount's own and sent them SIGTERM."""
    _, run = mount_dirs
    server = local_server({"layer0": erofs_images.small.path})
    record = stack.mount(server, str(mountpoint), image="small")
    for process in [record.server, *(a.process for a in record.attachments)]:
        os.kill(process.pid, signal.SIGKILL)
        assert process.wait(5)
    for point in sorted(syscall.mounted(), key=len, reverse=True):
        if point == str(mountpoint) or point.startswith(f"{run}/"):
            syscall.umount(point, lazy=True)
    strangers = [subprocess.Popen(["sleep", "60"]) for _ in range(2)]
    try:
        path = Path(record.state_dir) / records.RECORD_NAME
        saved = json.loads(path.read_text())

        def earlier_boot(stranger: subprocess.Popen) -> dict:
            ref = ProcessRef.of(stranger.pid)
            return {"pid": ref.pid, "start_time": ref.start_time, "boot": "an-earlier-boot"}

        saved["server"] = earlier_boot(strangers[0])
        for attachment in saved["attachments"]:
            attachment["process"] = earlier_boot(strangers[1])
        path.write_text(json.dumps(saved))
        assert str(mountpoint) in cli("mounts").stdout
        done = cli("umount", str(mountpoint))
        assert done.returncode == 0, done.stderr
        assert [stranger.poll() for stranger in strangers] == [None, None]
        assert records.saved() == []
    finally:
        for stranger in strangers:
            stranger.kill()
            stranger.wait()


def test_a_record_of_a_mount_of_which_nothing_is_left_does_not_keep_its_place(
    mount_dirs, mountpoint, erofs_images, local_server, caplog
):
    """Tried: a three-layer mount's processes SIGKILLed and each of its mounts lazily
    unmounted, its record kept (a reboot with the run directory not on a tmpfs, or a
    crash that took the mount with it); then a mount at the same place. Must hold: it
    mounts, with a warning that the record of the earlier mount, of which nothing was
    left, was cleared; `umount` then leaves nothing. A record whose server still runs
    (its mounts undone by hand) is still refused, naming `umount`; a second clearing of
    the stale record, by a mount that found it so at the same time, leaves the new
    mount's record whole. Before, every mount
    there was refused ("has a mount record already") until `blockstore umount` was run
    by hand: a mount made at boot failed on each boot after a first without `umount`."""
    _, run = mount_dirs
    argv = local_server({f"layer{i}": layer.path for i, layer in enumerate(erofs_images.layers)})
    record = stack.mount(argv, str(mountpoint), image="three")
    for point in sorted(syscall.mounted(), key=len, reverse=True):
        if point == str(mountpoint) or point.startswith(f"{run}/"):
            syscall.umount(point, lazy=True)
    with pytest.raises(MountpointBusy, match="has a mount record already"):
        stack.mount(argv, str(mountpoint), image="three")
    for process in [record.server, *(a.process for a in record.attachments)]:
        process.signal(signal.SIGKILL)
        assert process.wait(5)
    assert wait_for(lambda: not processes_mentioning(str(run))), "the server outlived its parent"
    # Another mount found it stale and has just made its own state directory in its place.
    stale = records.load(str(mountpoint))
    records.discard(Path(stale.state_dir), stale)
    fresh = replace(stale, image="another", mounter=ProcessRef.of(os.getpid()))
    records.create(fresh)
    # As a mount that found it stale at the same time would:
    records.discard(Path(stale.state_dir), stale)
    assert records.load(str(mountpoint)) == fresh
    records.forget(fresh)
    records.create(stale)
    caplog.set_level(logging.WARNING, logger="nbdfront.mount.stack")
    again = stack.mount(argv, str(mountpoint), image="three again")
    assert [r.getMessage() for r in caplog.records] == [
        f"cleared the record of an earlier mount of three at {mountpoint}, of which nothing "
        "was left (its processes ended and nothing of it mounted: a reboot, or a crash)"
    ]
    assert_same_tree(erofs_images.layers[-1].merged_tree, mountpoint)
    done = cli("umount", str(mountpoint))
    assert done.returncode == 0, done.stderr
    assert_nothing_left(again, run)


def left_alone(mountpoint: str) -> records.MountRecord:
    """The record of a mount at ``mountpoint`` of which nothing is left: no process of it
    ever recorded, nothing of it mounted (a reboot, with the run directory kept)."""
    return records.MountRecord(
        mountpoint=mountpoint,
        image="earlier",
        method=attach.NBDFUSE,
        state_dir=str(records.state_dir_for(mountpoint)),
        log=str(records.log_path_for(mountpoint)),
    )


@pytest.mark.parametrize("disk", ["full", "read-only", "read-only, a record left"])
def test_a_run_directory_that_cannot_be_written_is_named(
    mount_dirs, mountpoint, erofs_images, local_server, tmp_path, monkeypatch, disk
):
    """Tried: a run directory used before (``mounts/`` and ``log/`` in it) on a tmpfs that
    is full, or mounted read-only, also holding the record of an earlier mount at the
    same place of which nothing is left (a reboot), then a mount. Must hold: it fails (a
    MountError, exit 10) in one line naming the run directory, why, and what to do; no
    process is left, nothing is mounted, and the disk holds what it held. Before, a full
    disk gave "[Errno 28] No space left on device" (exit 1), naming no file, so the user
    was left to guess which disk (the cache's, most likely) to free; and a record to
    clear on a read-only disk gave "[Errno 30] Read-only file system" (exit 1)."""
    argv = local_server({"layer0": erofs_images.small.path})
    disk_dir = tmp_path / "disk"
    disk_dir.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "small", str(disk_dir)], check=True)
    try:
        run = disk_dir / "run"
        for path, mode in ((run, 0o755), (run / "mounts", 0o755), (run / "log", 0o700)):
            path.mkdir(mode=mode)
        monkeypatch.setenv("BLOCKSTORE_RUN_DIR", str(run))
        if disk.endswith("a record left"):
            records.create(left_alone(str(mountpoint)))
        if disk == "full":
            subprocess.run(["dd", "if=/dev/zero", f"of={disk_dir}/fill"], capture_output=True)
            why, advice = "No space left on device", "free space on its disk"
        else:
            subprocess.run(["mount", "-o", "remount,ro", str(disk_dir)], check=True)
            why, advice = "Read-only file system", "make its disk writable"
        before = sorted(str(p) for p in disk_dir.rglob("*"))
        with pytest.raises(MountError) as failed:
            stack.mount(argv, str(mountpoint), image="small")
        assert type(failed.value) is MountError
        assert str(failed.value) == (
            f"cannot write in the run directory {run}, where mounts keep their records, "
            f"sockets and logs: {why}; {advice}, or give another as BLOCKSTORE_RUN_DIR"
        )
        assert sorted(str(p) for p in disk_dir.rglob("*")) == before
        assert not syscall.is_mounted(str(mountpoint))
        assert not processes_mentioning(str(run))
    finally:
        subprocess.run(["umount", "-l", str(disk_dir)], check=True)


@contextlib.contextmanager
def _removed_after(directory: Path) -> Iterator[None]:
    try:
        yield
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _fill(disk: Path, leaving: int = 0) -> Path:
    """Fill ``disk`` to the byte (root's reserve too), then free ``leaving`` bytes."""
    fill = disk / f"fill-{leaving}"
    subprocess.run(["dd", "if=/dev/zero", f"of={fill}", "bs=4k"], capture_output=True)
    os.truncate(fill, max(0, fill.stat().st_size - leaving))
    return fill


@pytest.mark.parametrize("when", ["before the mount", "once the record is written"])
def test_a_run_directory_that_is_nearly_full_is_named(
    mount_dirs, mountpoint, erofs_images, local_server, tmp_path, monkeypatch, when
):
    """Tried: the run directory on a small ext4, filled to the byte but for 0 to 4 KiB
    before each mount, or filled to the byte once the mount has written its record, so
    that a later write (the server's pidfile or status, nbdfuse's pidfile) finds no room.
    Must hold: each mount fails in the one line naming the run directory, why and what
    to do; nothing is left mounted or running. Before, the record went in and the mount
    failed later with "the server exited with status 1 before it was ready", its log
    empty, or with "nbdfuse did not attach ... within 15s": neither named the full disk."""
    argv = local_server({"layer0": erofs_images.small.path})
    # Under a short directory: the server's socket in the run directory must fit a Unix
    # socket address, or the mount is refused for that before it writes anything.
    base = Path(tempfile.mkdtemp(prefix="bs-full-"))
    with _removed_after(base), small_disk(base / "disk", "8M") as disk:
        run = disk / "run"
        monkeypatch.setenv("BLOCKSTORE_RUN_DIR", str(run))
        named = (
            f"cannot write in the run directory {run}, where mounts keep their records, "
            "sockets and logs: No space left on device; free space on its disk, or give "
            "another as BLOCKSTORE_RUN_DIR"
        )
        if when == "once the record is written":
            create = records.create
            fills = []

            def create_then_fill(record: records.MountRecord) -> None:
                create(record)
                fills.append(_fill(disk))

            monkeypatch.setattr(records, "create", create_then_fill)
        for left in range(0, 5 << 10, 1 << 10) if when == "before the mount" else [None]:
            shutil.rmtree(run, ignore_errors=True)
            for path, mode in ((run, 0o755), (run / "mounts", 0o755), (run / "log", 0o700)):
                path.mkdir(mode=mode)
            fills = [_fill(disk, left)] if left is not None else []
            with pytest.raises(MountError) as failed:
                stack.mount(argv, str(mountpoint), image="small")
            assert (left, str(failed.value)) == (left, named)
            assert not syscall.is_mounted(str(mountpoint))
            assert not processes_mentioning(str(run))
            for fill in fills:
                fill.unlink()


def test_a_run_directory_filled_as_nbdfuse_starts_is_named_at_once(
    mount_dirs, mountpoint, erofs_images, local_server, monkeypatch
):
    """Tried: the run directory on a small tmpfs (as ``/run`` is), filled to the byte
    just before nbdfuse starts: it makes its pidfile but cannot write its pid in it, and
    serves on. Must hold: the mount fails within a few seconds in the one line naming
    the run directory; nothing is left mounted or running. Before, it waited nbdfuse's
    whole attach timeout (15 s) for a pid that could never come."""
    argv = local_server({"layer0": erofs_images.small.path})
    spawn = attach.spawn_detached
    _, short = mount_dirs  # a socket's path has room for 107 bytes
    disk = short / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "small", str(disk)], check=True)
    try:
        run = disk / "run"
        monkeypatch.setenv("BLOCKSTORE_RUN_DIR", str(run))

        def fill_then_spawn(argv: list[str], *args: object) -> subprocess.Popen:
            _fill(disk)
            return spawn(argv, *args)

        monkeypatch.setattr(attach, "spawn_detached", fill_then_spawn)
        started = time.monotonic()
        with pytest.raises(MountError) as failed:
            stack.mount(argv, str(mountpoint), image="small")
        took = time.monotonic() - started
        assert str(failed.value) == (
            f"cannot write in the run directory {run}, where mounts keep their records, "
            "sockets and logs: No space left on device; free space on its disk, or give "
            "another as BLOCKSTORE_RUN_DIR"
        )
        assert took < 8, took
        assert not syscall.is_mounted(str(mountpoint))
        assert not processes_mentioning(str(run))
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True)


@pytest.mark.parametrize("room", ["some", "none"])
def test_a_run_directory_where_no_file_can_be_unnamed_is_checked_for_room(
    mount_dirs, mountpoint, erofs_images, local_server, monkeypatch, room
):
    """Tried: the run directory on a fuse-overlayfs (over a small tmpfs), which refuses
    files with no name (``O_TMPFILE``: EOPNOTSUPP, as NFS does); a mount and ``umount``,
    then the same with the tmpfs filled to the byte. Must hold: the mount serves the image
    and is undone; on the full disk it fails in the one line naming the run directory:
    where no file can be unnamed, its room is checked by the free space it tells."""
    if shutil.which("fuse-overlayfs") is None:
        pytest.skip("no fuse-overlayfs here")
    argv = local_server({"layer0": erofs_images.small.path})
    _, short = mount_dirs  # a socket's path has room for 107 bytes
    under, disk = short / "under", short / "disk"
    for path in (under, disk):
        path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "small", str(under)], check=True)
    layers = {name: under / name for name in ("lower", "upper", "work")}
    for path in layers.values():
        path.mkdir()
    options = "lowerdir={lower},upperdir={upper},workdir={work}".format(**layers)
    subprocess.run(["fuse-overlayfs", "-o", options, str(disk)], check=True)
    try:
        run = disk / "run"
        monkeypatch.setenv("BLOCKSTORE_RUN_DIR", str(run))
        if room == "some":
            stack.mount(argv, str(mountpoint), image="small")
            assert_same_tree(erofs_images.small.tree, mountpoint)
            unmount.unmount(str(mountpoint))
        else:
            _fill(under)
            with pytest.raises(MountError) as failed:
                stack.mount(argv, str(mountpoint), image="small")
            assert str(failed.value) == (
                f"cannot write in the run directory {run}, where mounts keep their records, "
                "sockets and logs: No space left on device; free space on its disk, or give "
                "another as BLOCKSTORE_RUN_DIR"
            )
        assert not syscall.is_mounted(str(mountpoint))
        assert not processes_mentioning(str(run))
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True)
        subprocess.run(["umount", "-l", str(under)], check=True)


def test_a_mount_whose_run_directory_was_cleared_is_undone_by_umount(
    mount_dirs, mountpoint, erofs_images, local_server
):
    """A three-layer mount's processes SIGKILLed and its run directory cleared with `rm -rf`
    (which leaves the state directory, the FUSE files and layers mounted in it): `umount`
    undoes what is mounted there, says the record was gone, and leaves nothing; the mount
    point then mounts again. Before, `umount` said it was not mounted by blockstore (exit
    10) and `mount` there was refused: the user was left to find the mounts by hand."""
    layers = erofs_images.layers
    _, run = mount_dirs
    argv = local_server({f"layer{i}": layer.path for i, layer in enumerate(layers)})
    record = stack.mount(argv, str(mountpoint), image="three")
    for process in [record.server, *(a.process for a in record.attachments)]:
        os.kill(process.pid, signal.SIGKILL)
        assert process.wait(5)
    # The server and its nbdkit follow the supervisor out (parent-death signals).
    assert wait_for(lambda: not processes_mentioning(str(run))), "the server outlived its parent"
    subprocess.run(["rm", "-rf", str(run)], capture_output=True)
    assert records.saved() == [] and syscall.is_mounted(str(mountpoint))
    done = cli("umount", str(mountpoint))
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == [
        "blockstore: its mount record was gone (the run directory cleared while it was mounted)"
    ]
    assert_nothing_left(record, run)
    again = stack.mount(local_server({"layer0": layers[0].path}), str(mountpoint), image="one")
    assert_same_tree(layers[0].tree, mountpoint)
    unmount.unmount(str(mountpoint))
    assert_nothing_left(again, run)


def test_a_mount_whose_run_directory_was_cleared_while_its_server_runs_is_undone_whole(
    mount_dirs, mountpoint, erofs_images, local_server
):
    """A three-layer mount whose run directory is cleared with `rm -rf` while its server
    and nbdfuse still run (a cleaner of /run, an admin's rm): `umount` undoes the mounts,
    stops the server, says the record was gone, and leaves no process of the mount.
    Before, it unmounted everything and exited 0 with the server left running for ever,
    found by nothing."""
    layers = erofs_images.layers
    _, run = mount_dirs
    argv = local_server({f"layer{i}": layer.path for i, layer in enumerate(layers)})
    record = stack.mount(argv, str(mountpoint), image="three")
    subprocess.run(["rm", "-rf", str(run)], capture_output=True)
    assert records.saved() == [] and record.server.alive()
    done = cli("umount", str(mountpoint))
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == [
        "blockstore: its mount record was gone (the run directory cleared while it was mounted)"
    ]
    assert not record.server.alive()
    assert_nothing_left(record, run)


def test_mounts_names_each_mounts_log_under_its_row(
    mount_dirs, mountpoint, erofs_images, local_server
):
    """Tried: two mounts standing, then ``mounts`` and ``mounts --json``. Must hold: under
    each mount's row, a line naming the log its server writes (``--json``: ``log``),
    the rows as they were (state and how much is cached last); a mount whose log is gone
    has no such line. Before, only ``--json`` named the log: a user whose mount went bad
    had no way to it from the table."""
    image = erofs_images.small.path
    second = mount_dirs[0] / "mnt2"
    second.mkdir()
    made = [
        stack.mount(local_server({"layer0": image}), str(point), image="small")
        for point in (mountpoint, second)
    ]
    try:
        listed = cli("mounts")
        assert listed.returncode == 0, listed.stderr
        lines = listed.stdout.splitlines()
        assert lines[0].split() == ["MOUNTPOINT", "IMAGE", "LAYERS", "VIA", "STATE", "CACHED"]
        by_point = {record.mountpoint: record for record in made}
        rows = lines[1::2]
        assert sorted(row.split()[0] for row in rows) == sorted(by_point)
        for row, log in zip(rows, lines[2::2], strict=True):
            assert row.split()[4] == "ok", row
            assert log == f"  log {by_point[row.split()[0]].log}", lines
        shown = json.loads(cli("mounts", "--json").stdout)
        assert {row["mountpoint"]: row["log"] for row in shown} == {
            point: record.log for point, record in by_point.items()
        }
        os.unlink(made[1].log)
        lines = cli("mounts").stdout.splitlines()
        assert len(lines) == 4 and f"  log {made[0].log}" in lines, lines
        assert f"  log {made[1].log}" not in lines, lines
    finally:
        for point in (mountpoint, second):
            cli("umount", str(point))


def test_clean_umount_removes_the_log_a_failed_stop_keeps_it(
    mount_dirs, mountpoint, erofs_images, local_server
):
    """A server that stops with status 0 at ``umount`` leaves no log behind and umount says
    nothing on stderr; one that logged an error, or stops with status 3, keeps its log,
    and umount says so and where it is (still exit 0: the mount is gone either way)."""
    image = erofs_images.small.path
    _, run = mount_dirs
    record = stack.mount(local_server({"layer0": image}), str(mountpoint), image="small")
    assert os.path.exists(record.log)
    done = cli("umount", str(mountpoint))
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert not os.path.exists(record.log)
    assert_nothing_left(record, run)

    # A clean stop after a warning (an EIO served, a full disk, a layer dropped at its
    # seal: things only the log tells) keeps the log too.
    record = stack.mount(local_server({"layer0": image}), str(mountpoint), image="small")
    with open(record.log, "a") as log:
        log.write("2026-01-01 00:00:00,000 blockstore.cache.seal ERROR sha256:ab: dropped\n")
        log.write("2026-01-01 00:00:00,001 blockstore.export INFO a line that is no trouble\n")
    # mounts says so while the mount lives: the warning need not wait for umount.
    listed = cli("mounts", "--json")
    assert [row["warnings"] for row in json.loads(listed.stdout)] == [1]
    assert "ok, 1 warning in its log" in cli("mounts").stdout
    umount_keeps_the_log(record, run, "the server logged 1 warning or error line")

    argv = local_server({"layer0": image}, stop_status=3)
    record = stack.mount(argv, str(mountpoint), image="small")
    umount_keeps_the_log(record, run, "the server exited with status 3")


def test_a_log_umount_kept_outlives_the_next_mount_at_that_place(
    mount_dirs, mountpoint, erofs_images, local_server
):
    """``umount`` keeps a log that says what went wrong; the next mount at the same place
    (a service restarted, a retry) moves it to ``NAME.previous.log`` instead of emptying
    it, whether it mounts or fails before its server is ready. Before, the next mount
    truncated it: why the last mount went wrong was lost as soon as it was tried again."""
    image = erofs_images.small.path
    _, run = mount_dirs
    for server in (local_server({"layer0": image}), [sys.executable, "-c", "exit(3)"]):
        record = stack.mount(local_server({"layer0": image}), str(mountpoint), image="small")
        with open(record.log, "a") as log:
            log.write("2026-01-01 00:00:00,000 blockstore.cache.seal ERROR sha256:ab: dropped\n")
        umount_keeps_the_log(record, run, "the server logged 1 warning or error line")
        kept = Path(record.log).read_text()
        with contextlib.suppress(ServerFailed):
            unmount.unmount(stack.mount(server, str(mountpoint), image="small").mountpoint)
        log = Path(record.log)
        assert log.with_name(f"{log.stem}.previous.log").read_text() == kept
        assert not log.exists() or "dropped" not in log.read_text()


def test_a_mount_made_as_umount_frees_the_place_keeps_its_log(
    mount_dirs, mountpoint, erofs_images, local_server, monkeypatch
):
    """Tried: a clean ``umount``, and a mount at the same place made the moment the record of
    the one before is dropped (a service restarted: its stop and its start run at once).
    Must hold: the clean mount's log goes, the new mount's log stays, where ``mounts``
    counts its warnings and ``umount`` keeps it. Before, the record went first and the
    log at that path was removed after it: the new mount's, its server writing on into
    a file with no name."""
    _, run = mount_dirs
    argv = local_server({"layer0": erofs_images.small.path})
    stack.mount(argv, str(mountpoint), image="small")
    forget = records.forget
    made: list[records.MountRecord] = []

    def forget_then_mount(record: records.MountRecord) -> None:
        forget(record)
        if not made:
            made.append(stack.mount(argv, str(mountpoint), image="small"))

    monkeypatch.setattr(records, "forget", forget_then_mount)
    assert unmount.unmount(str(mountpoint)).trouble is None
    (second,) = made
    assert os.path.exists(second.log), "umount removed the log of the mount made after it"
    assert not previous_log(Path(second.log)).exists()
    assert unmount.unmount(str(mountpoint)).trouble is None
    assert_nothing_left(second, run)


def test_a_mount_tried_while_umount_finishes_is_refused_and_takes_nothing(
    mount_dirs, mountpoint, erofs_images, local_server, monkeypatch
):
    """Tried: a clean ``umount``, and a mount at the same place tried once every step of the
    one before is undone, before its log and record are dealt with (nothing of it is left
    to see then). Must hold: that mount is refused as busy, naming the unmount, and takes
    nothing; the clean mount's log and record go, and a mount after it is made. Before,
    it cleared the record as one of a crash and went on, its log and state directory
    at the very paths the umount was about to remove."""
    _, run = mount_dirs
    argv = local_server({"layer0": erofs_images.small.path})
    first = stack.mount(argv, str(mountpoint), image="small")
    trouble = unmount._trouble
    refused: list[str] = []

    def trouble_then_mount(before: listing.MountStatus, ended: ServerExit | None) -> str | None:
        with pytest.raises(MountpointBusy, match="being unmounted") as busy:
            stack.mount(argv, str(mountpoint), image="small")
        refused.append(str(busy.value))
        return trouble(before, ended)

    monkeypatch.setattr(unmount, "_trouble", trouble_then_mount)
    assert unmount.unmount(str(mountpoint)).trouble is None
    assert refused
    assert not os.path.exists(first.log)
    assert_nothing_left(first, run)
    monkeypatch.setattr(unmount, "_trouble", trouble)
    second = stack.mount(argv, str(mountpoint), image="small")
    assert unmount.unmount(str(mountpoint)).trouble is None
    assert_nothing_left(second, run)


def umount_keeps_the_log(record: records.MountRecord, run: Path, why: str) -> None:
    """``umount`` (exit 0: the mount is gone either way) says ``why`` and where the log
    is kept, and leaves nothing else."""
    done = cli("umount", record.mountpoint)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == f"blockstore: {why}; its log is kept at {record.log}"
    assert os.path.exists(record.log)
    assert_nothing_left(record, run)


def test_umount_waits_for_a_slow_stop_and_kills_a_stuck_one(
    mount_dirs, mountpoint, erofs_images, local_server
):
    """A server that takes 2 s to stop after SIGTERM is waited for, not killed: its status 0
    is read, so umount reports nothing and removes the log. One that would take 60 s is
    killed once its grace is over: umount returns within a few seconds of that (counted
    from when it told the server to stop), says so, and keeps the log."""
    _, run = mount_dirs
    argv = local_server({"layer0": erofs_images.small.path}, stop_delay=2)
    record = stack.mount(argv, str(mountpoint), image="small")
    done = unmount.unmount(str(mountpoint))
    assert done.trouble is None
    assert not os.path.exists(record.log)
    assert_nothing_left(record, run)

    argv = local_server({"layer0": erofs_images.small.path}, stop_delay=60)
    record = stack.mount(argv, str(mountpoint), image="small")
    timed = umount_timed(mountpoint)
    done = timed.done
    assert done.returncode == 0, done.stderr
    assert timed.took >= STOP_GRACE and timed.since_told < STOP_GRACE + 3, timed
    assert done.stderr.strip() == (
        f"blockstore: the server did not stop within {STOP_GRACE:.0f}s and was killed; "
        f"its log is kept at {record.log}"
    )
    assert_nothing_left(record, run)


def test_umount_of_a_supervisor_that_does_not_answer_takes_its_server_down_before_returning(
    mount_dirs, mountpoint, erofs_images, local_server
):
    """Tried: ``umount`` of a mount whose server's supervisor does not answer (stopped with
    SIGSTOP), so it neither passes the stop on nor writes how the server ended. Must hold:
    once the wait for it is over, the supervisor is killed with all it started, and all
    of it is gone when ``umount`` returns, which says the server was killed and keeps the
    log. Before, only the supervisor was killed: the server (and its nbdkit) died later,
    of their parents' deaths, after ``umount`` had returned, and it said only that the
    server's exit status was unknown."""
    _, run = mount_dirs
    argv = local_server({"layer0": erofs_images.small.path})
    record = stack.mount(argv, str(mountpoint), image="small")
    os.kill(record.server.pid, signal.SIGSTOP)
    done = cli("umount", str(mountpoint))
    assert done.returncode == 0, done.stderr
    assert not processes_mentioning(str(run)), "part of the server outlived umount"
    assert done.stderr.strip() == (
        f"blockstore: the server did not stop within {STOP_GRACE:.0f}s and was killed; "
        f"its log is kept at {record.log}"
    )
    assert_nothing_left(record, run)


def test_an_umount_interrupted_part_way_is_finished_by_the_next(
    mount_dirs, mountpoint, erofs_images, local_server
):
    """Tried: an ``umount`` stopped (Ctrl-C, SIGKILL, or a racing second umount) after it
    had unmounted the image and its layer's FUSE file, whose directory went with it, but
    before it forgot the record. Must hold: the next ``umount`` finishes the job and
    leaves nothing. Before, it failed on the FUSE directory that was no more (ENOENT),
    every time, and the mount point could not be mounted again."""
    _, run = mount_dirs
    argv = local_server({"layer0": erofs_images.small.path})
    record = stack.mount(argv, str(mountpoint), image="small")
    syscall.umount(str(mountpoint))
    for attachment in record.attachments:
        attach.detach(attachment)
    assert not os.path.exists(record.attachments[0].fuse_dir)
    done = cli("umount", str(mountpoint))
    assert done.returncode == 0, done.stderr
    assert_nothing_left(record, run)


def test_what_a_mount_killed_as_it_began_left_does_not_keep_the_mount_point(
    mount_dirs, mountpoint, erofs_images, local_server
):
    """Tried: what a ``mount`` killed as it began leaves: its state directory made but
    empty (before, a signal 0.45 s in, as the directory was made and before the record
    was written, left that: 5 times in 6), and a directory being made by a process now
    dead. Must hold: ``mount`` goes on (the empty directory is taken over, the dead
    process's is removed), and ``umount`` then leaves nothing. Before, every mount was
    refused as "being mounted by another blockstore process", and neither ``mounts``
    nor ``umount`` saw anything to clean up."""
    _, run = mount_dirs
    state = records.state_dir_for(str(mountpoint))
    dead = subprocess.Popen(["true"])
    dead.wait()
    half_made = state.parent / f"{records.NEW_PREFIX}{state.name}-{dead.pid}"
    with records.run_dirs_made():
        state.mkdir(mode=0o700)
        half_made.mkdir(mode=0o700)
        (half_made / records.RECORD_NAME).write_text("")
    record = stack.mount(
        local_server({"layer0": erofs_images.small.path}), str(mountpoint), image="small"
    )
    assert not half_made.exists()
    assert [r.mountpoint for r in records.saved()] == [str(mountpoint)]
    unmount.unmount(str(mountpoint))
    assert_nothing_left(record, run)


@pytest.mark.parametrize("unrecorded", ["the top mount", "the attach"])
def test_a_step_the_killed_mount_made_but_never_recorded_is_undone(
    mount_dirs, mountpoint, erofs_images, local_server, unrecorded
):
    """Tried: a ``mount`` SIGKILLed inside a step, after the kernel made it and before
    the record said so: inside mount(2) of the image (waiting on a slow registry), or
    once nbdfuse had attached the layer. Must hold: ``umount`` undoes what is there all
    the same and leaves nothing. Before, the first case failed on a busy FUSE file
    after stopping the server (the mount then read I/O errors, and ``umount -l`` said
    "unmounted" leaving it mounted); in the second, nbdfuse and its FUSE mount stayed
    while every ``umount`` said "unmounted"."""
    _, run = mount_dirs
    argv = local_server({"layer0": erofs_images.small.path})
    record = stack.mount(argv, str(mountpoint), image="small")
    made = records.load(str(mountpoint))
    made.mounted, made.top_device = False, None
    if unrecorded == "the attach":
        syscall.umount(str(mountpoint))
        made.attachments = []
    records.save(made)
    done = cli("umount", str(mountpoint))
    assert done.returncode == 0, done.stderr
    assert_nothing_left(record, run)


def test_an_overlay_unmounted_by_hand_is_listed_and_its_layers_undone(
    mount_dirs, mountpoint, erofs_images, local_server
):
    """Tried: a three-layer mount whose overlay at the mount point the user unmounts with
    umount(8), leaving its layers' EROFS, FUSE files and server behind. Must hold:
    ``mounts`` lists it as ``not mounted`` and names the ``blockstore umount`` that
    cleans it up, on a line that starts ``blockstore:`` as every other line it writes to
    stderr does (before, that one alone did not); that ``umount`` exits 0, saying the
    mount was not whole, and leaves no layer, FUSE file, process or record of it."""
    _, run = mount_dirs
    layers = erofs_images.layers
    argv = local_server({f"layer{i}": layer.path for i, layer in enumerate(layers)})
    record = stack.mount(argv, str(mountpoint), image="three")
    subprocess.run(["umount", str(mountpoint)], check=True)
    assert len([p for p in syscall.mounted() if p.startswith(f"{run}/")]) == 6
    listed = cli("mounts")
    assert listed.returncode == 0, listed.stderr
    assert "  not mounted  " in listed.stdout.splitlines()[1], listed.stdout
    assert own_lines(listed.stderr) == [
        f"blockstore: {mountpoint}: `blockstore umount {mountpoint}` cleans it up"
    ], listed.stderr
    done = cli("umount", str(mountpoint))
    assert done.returncode == 0, done.stderr
    assert "the mount was not whole (not mounted)" in done.stderr, done.stderr
    assert_nothing_left(record, run)


@pytest.mark.parametrize("users", ["tmpfs", "overlay"])
def test_umount_leaves_alone_what_the_user_mounted_there_since(
    mount_dirs, mountpoint, erofs_images, local_server, tmp_path, users
):
    """Tried: the image unmounted by hand with the system's ``umount``, and a tmpfs of
    the user's mounted at the same place, holding a file; then ``blockstore umount``.
    Must hold: our server, FUSE file and record go; the user's tmpfs and its file
    stay, with a warning that what is mounted there is not ours. Before, the tmpfs was
    unmounted, and its contents lost."""
    _, run = mount_dirs
    argv = local_server({"layer0": erofs_images.small.path})
    record = stack.mount(argv, str(mountpoint), image="small")
    subprocess.run(["umount", str(mountpoint)], check=True)
    if users == "tmpfs":
        subprocess.run(["mount", "-t", "tmpfs", "users-own", str(mountpoint)], check=True)
    else:  # relative lower directories, as this engine gives its own overlays
        for name in ("lo1", "lo2", "up", "work"):
            (tmp_path / name).mkdir()
        options = "lowerdir=lo1:lo2,upperdir=up,workdir=work"
        mount = ["mount", "-t", "overlay", "users-own", "-o", options, str(mountpoint)]
        subprocess.run(mount, check=True, cwd=tmp_path)
    try:
        (mountpoint / "precious").write_text("kept")
        done = cli("umount", str(mountpoint))
        assert done.returncode == 0, done.stderr
        assert "not this mount's: left alone" in done.stderr, done.stderr
        assert syscall.mounts_at(str(mountpoint))[0][1:3] == (users, "users-own")
        assert (mountpoint / "precious").read_text() == "kept"
        assert not processes_mentioning(str(run))
        assert records.saved() == [] and not os.path.exists(record.state_dir)
    finally:
        subprocess.run(["umount", str(mountpoint)], check=False)


@pytest.mark.parametrize("how", ["mounted", "moved", "bound onto itself"])
def test_umount_of_a_mount_covered_at_its_own_place_is_refused_and_changes_nothing(
    mount_dirs, mountpoint, erofs_images, local_server, tmp_path, how
):
    """Tried: a tmpfs of the user's mounted at the image's mount point, over the image,
    or moved there with ``mount --move`` (mountinfo then lists it before ours), or the
    image bound onto itself (the same device twice at one place). Must
    hold: ``umount`` is refused (exit 13) before anything is undone, in one line naming
    the mount over it (before, "another file system"); the server stays,
    and the tmpfs with its file; once the user's mount is gone, ``umount`` leaves
    nothing. Before, the server was stopped, then the FUSE file was found busy, and
    ``umount -l`` left the image mounted under the tmpfs with no record; in the moved
    case the user's tmpfs was unmounted."""
    _, run = mount_dirs
    argv = local_server({"layer0": erofs_images.small.path})
    record = stack.mount(argv, str(mountpoint), image="small")
    if how == "mounted":
        subprocess.run(["mount", "-t", "tmpfs", "users-own", str(mountpoint)], check=True)
    elif how == "bound onto itself":  # the same file system twice at one place
        subprocess.run(["mount", "--bind", str(mountpoint), str(mountpoint)], check=True)
    else:
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "users-own", str(elsewhere)], check=True)
        subprocess.run(["mount", "--move", str(elsewhere), str(mountpoint)], check=True)
    try:
        if how != "bound onto itself":
            (mountpoint / "precious").write_text("kept")
        over = syscall.mounts_at(str(mountpoint))[0]
        for lazy in ([], ["--lazy"]):
            busy = cli("umount", *lazy, str(mountpoint))
            assert busy.returncode == MountpointBusy.exit_code, busy.stderr
            assert busy.stderr.splitlines() == [
                f"blockstore: {mountpoint} is hidden by the mount at the same place "
                f"({over.fstype} from {over.source}), made over it since: "
                f"`umount {mountpoint}` first"
            ]
            assert record.server is not None and record.server.alive()
            assert len(syscall.mounts_at(str(mountpoint))) == 2
            if how != "bound onto itself":
                assert (mountpoint / "precious").read_text() == "kept"
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)
    done = cli("umount", str(mountpoint))
    assert done.returncode == 0, done.stderr
    assert_nothing_left(record, run)


@pytest.mark.parametrize("how", ["mounted over it", "mounted in its place"])
def test_mounts_tells_a_mount_with_another_at_its_place_from_an_ok_one(
    mount_dirs, mountpoint, erofs_images, local_server, how
):
    """Tried: a tmpfs of the user's mounted at the image's mount point, over the image, or
    in its place once the image was unmounted by hand; then ``mounts --json`` and
    ``mounts``. Must hold: over it, the image is ``hidden`` (``hidden_by`` its own mount
    point) and one line names the tmpfs to unmount first; in its place, the image is
    ``not mounted``, with the ``blockstore umount`` that cleans it up, which then says the
    mount was not whole and leaves the tmpfs. Before, both were listed ``ok``: the
    tmpfs at the mount point was taken for the image."""
    argv = local_server({"layer0": erofs_images.small.path})
    stack.mount(argv, str(mountpoint), image="small")
    if how == "mounted in its place":
        subprocess.run(["umount", str(mountpoint)], check=True)
    subprocess.run(["mount", "-t", "tmpfs", "users-own", str(mountpoint)], check=True)
    try:
        listed = cli("mounts", "--json")
        assert listed.returncode == 0, listed.stderr
        (row,) = json.loads(listed.stdout)
        shown = cli("mounts")
        if how == "mounted over it":
            assert (row["state"], row["hidden_by"]) == ("hidden", str(mountpoint))
            assert own_lines(shown.stderr) == [
                f"blockstore: {mountpoint} is hidden by the mount at the same place (tmpfs from "
                f"users-own), made over it since: `umount {mountpoint}` first"
            ]
        else:
            assert (row["state"], row["hidden_by"]) == ("not mounted", None)
            said = f"blockstore: {mountpoint}: `blockstore umount {mountpoint}` cleans it up"
            assert own_lines(shown.stderr) == [said]
            done = cli("umount", str(mountpoint))
            assert done.returncode == 0, done.stderr
            assert "the mount was not whole (not mounted)" in done.stderr, done.stderr
            assert syscall.mounts_at(str(mountpoint))[0].fstype == "tmpfs"
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)
    if how == "mounted over it":
        assert cli("umount", str(mountpoint)).returncode == 0


@pytest.mark.parametrize("over", ["a tmpfs", "another image"])
def test_umount_of_a_mount_hidden_by_one_over_a_directory_above_is_refused_and_changes_nothing(
    mount_dirs, erofs_images, local_server, tmp_path, over
):
    """Tried: an image mounted at ``outer/a``, then ``outer`` itself mounted over: a tmpfs
    of the user's (where ``outer/a`` is no more), or another image whose tree has an
    ``a`` directory; then ``umount`` and ``umount --lazy`` of ``outer/a``. Must hold:
    each is refused (exit 13) naming the mount at ``outer`` that hides it (for an image,
    the ``blockstore umount`` that undoes it) before anything is undone: the server
    stays; once ``outer`` is unmounted, ``umount outer/a`` leaves nothing. Before, each
    said only "umount .../a: No such file or directory" or "Invalid argument" (exit 10)."""
    _, run = mount_dirs
    outer = tmp_path / "outer"
    inner = outer / "a"
    inner.mkdir(parents=True)
    small = erofs_images.small.path
    record = stack.mount(local_server({"layer0": small}), str(inner), image="inner")
    if over == "a tmpfs":
        subprocess.run(["mount", "-t", "tmpfs", "users-own", str(outer)], check=True)
        undo_outer = ["umount", str(outer)]
        named = f"hidden by the mount at {outer} (tmpfs from users-own)"
    else:
        stack.mount(local_server({"layer0": small}), str(outer), image="outer")
        undo_outer = [*BLOCKSTORE, "umount", str(outer)]
        named = f"hidden by the mount of outer at {outer}, made over a directory above it "
        named += f"since: `blockstore umount {outer}` first"
    try:
        for lazy in ([], ["--lazy"]):
            busy = cli("umount", *lazy, str(inner))
            assert busy.returncode == MountpointBusy.exit_code, busy.stderr
            assert f"blockstore: {inner} is {named}" in busy.stderr, busy.stderr
            assert len(busy.stderr.strip().splitlines()) == 1, busy.stderr
            assert record.server is not None and record.server.alive()
            assert syscall.mounts_at(str(inner)) and records.load(str(inner)) is not None
    finally:
        subprocess.run(undo_outer, check=True, capture_output=True)
    done = cli("umount", str(inner))
    assert done.returncode == 0, done.stderr
    assert_nothing_left(record, run)


@pytest.mark.parametrize("over", ["a tmpfs", "an image"])
def test_mounts_lists_a_mount_hidden_by_one_over_a_directory_above_as_hidden(
    mount_dirs, erofs_images, local_server, tmp_path, over
):
    """Tried: an image mounted at ``outer/a``, then ``outer`` mounted over (a tmpfs of the
    user's, or another image), then ``mounts`` and ``mounts --json``. Must hold: the
    hidden image's state is ``hidden`` (``--json``: ``hidden_by`` names ``outer``), and
    one line on stderr names the mount that hides it and how to unmount that first (the
    ``blockstore umount`` of an image of ours), as ``umount`` of it says; the mount over
    it is ``ok``; once that is gone, the image is ``ok`` again. Before, ``mounts`` showed
    it ``ok``, though its tree could not be reached and ``umount`` of it was refused."""
    outer = tmp_path / "outer"
    inner = outer / "a"
    inner.mkdir(parents=True)
    small = erofs_images.small.path
    stack.mount(local_server({"layer0": small}), str(inner), image="inner")
    if over == "a tmpfs":
        subprocess.run(["mount", "-t", "tmpfs", "users-own", str(outer)], check=True)
        undo_outer = ["umount", str(outer)]
        named = f"hidden by the mount at {outer} (tmpfs from users-own), made over a "
        named += f"directory above it since: `umount {outer}` first"
    else:
        stack.mount(local_server({"layer0": small}), str(outer), image="outer")
        undo_outer = [*BLOCKSTORE, "umount", str(outer)]
        named = f"hidden by the mount of outer at {outer}, made over a directory above it "
        named += f"since: `blockstore umount {outer}` first"
    try:
        listed = cli("mounts", "--json")
        assert listed.returncode == 0, listed.stderr
        rows = {row["mountpoint"]: row for row in json.loads(listed.stdout)}
        assert rows[str(inner)]["state"] == "hidden"
        assert rows[str(inner)]["hidden_by"] == str(outer)
        if over == "an image":
            assert (rows[str(outer)]["state"], rows[str(outer)]["hidden_by"]) == ("ok", None)
        shown = cli("mounts")
        assert shown.returncode == 0, shown.stderr
        table = [line for line in shown.stdout.splitlines()[1:] if not line.startswith("  log")]
        assert [line.split()[4] for line in table] == [
            "ok" if point == str(outer) else "hidden" for point in sorted(rows)
        ]
        assert own_lines(shown.stderr) == [f"blockstore: {inner} is {named}"]
    finally:
        subprocess.run(undo_outer, check=True, capture_output=True)
    (row,) = json.loads(cli("mounts", "--json").stdout)
    assert (row["state"], row["hidden_by"]) == ("ok", None)
    assert cli("umount", str(inner)).returncode == 0


def test_a_mount_hidden_by_an_image_of_another_run_directory_names_its_umount(
    mount_dirs, erofs_images, local_server, tmp_path, monkeypatch
):
    """Tried: an image mounted at ``outer/a``, then another image mounted at ``outer``
    with another run directory (a ``sudo`` that dropped BLOCKSTORE_RUN_DIR); then
    ``mounts`` and ``umount`` of ``outer/a``. Must hold: both name the mount at ``outer``
    and the ``BLOCKSTORE_RUN_DIR=... blockstore umount`` that undoes it, which, run as
    written, frees ``outer/a``. Before, they named it as a file system of the user's
    ("erofs from" its FUSE file) to unmount, which would have left its server running."""
    _, run = mount_dirs
    outer = tmp_path / "outer"
    inner = outer / "a"
    inner.mkdir(parents=True)
    small = erofs_images.small.path
    record = stack.mount(local_server({"layer0": small}), str(inner), image="inner")
    other = run / "other"  # short, for its socket's path; cleaned up with ``run``
    monkeypatch.setenv("BLOCKSTORE_RUN_DIR", str(other))
    stack.mount(local_server({"layer0": small}), str(outer), image="outer")
    monkeypatch.setenv("BLOCKSTORE_RUN_DIR", str(run))
    command = f"BLOCKSTORE_RUN_DIR={other} blockstore umount {outer}"
    named = (
        f"{inner} is hidden by the mount at {outer}, made by blockstore with another run "
        f"directory over a directory above it since: `{command}` first"
    )
    said = cli("mounts").stderr.splitlines()  # other tests' run directories too
    assert [line for line in said if line.startswith(f"blockstore: {inner}")] == [
        f"blockstore: {named}"
    ]
    busy = cli("umount", str(inner))
    assert busy.returncode == MountpointBusy.exit_code, busy.stderr
    assert busy.stderr.splitlines() == [f"blockstore: {named}"]
    done = run_suggested(command)
    assert done.returncode == 0, done.stderr
    assert cli("umount", str(inner)).returncode == 0
    assert_nothing_left(record, run)


def test_mounts_help_says_it_lists_this_run_directorys_mounts(
    mount_dirs, mountpoint, erofs_images, local_server, monkeypatch
):
    """Tried: an image mounted with another run directory (a ``sudo`` that dropped
    BLOCKSTORE_RUN_DIR), then ``mounts --json``, ``mounts --help``, and the command
    ``mounts`` gives for the other. Must hold: the image is not listed, one line counts
    it and gives that command, which, run as written, lists it; the help says ``mounts``
    lists the mounts of this run directory and counts the others. Before, the help said
    it listed the mounts blockstore made on this machine."""
    _, run = mount_dirs
    other = run / "other"  # short, for its socket's path; cleaned up with ``run``
    monkeypatch.setenv("BLOCKSTORE_RUN_DIR", str(other))
    record = stack.mount(
        local_server({"layer0": erofs_images.small.path}), str(mountpoint), image="s"
    )
    monkeypatch.setenv("BLOCKSTORE_RUN_DIR", str(run))
    listed = cli("mounts", "--json")
    assert json.loads(listed.stdout) == []
    (counted,) = [line for line in listed.stderr.splitlines() if str(other) in line]
    listing_other = counted.split("`")[1]
    assert listing_other == f"BLOCKSTORE_RUN_DIR={other} blockstore mounts", counted
    assert record.mountpoint in run_suggested(f"{listing_other} --json").stdout
    shown = " ".join(cli("mounts", "--help").stdout.split())
    assert "made with this run directory (/run/blockstore, or $BLOCKSTORE_RUN_DIR)" in shown
    assert "made with another run directory are counted on stderr" in shown
    monkeypatch.setenv("BLOCKSTORE_RUN_DIR", str(other))
    assert cli("umount", record.mountpoint).returncode == 0


def _an_image_inside_another(
    tmp_path: Path, local_server, image: Path
) -> tuple[Path, Path, records.MountRecord, records.MountRecord]:
    """``image`` mounted at ``outer``, and again at ``outer/a``, a directory of its tree:
    the two mount points, then their records."""
    outer = tmp_path / "outer"
    outer.mkdir()
    inner = outer / "a"
    outer_record = stack.mount(local_server({"layer0": image}), str(outer), image="outer")
    inner_record = stack.mount(local_server({"layer0": image}), str(inner), image="inner")
    return outer, inner, outer_record, inner_record


@pytest.mark.parametrize("lazy", [[], ["--lazy"]])
def test_umount_of_a_mount_with_another_image_inside_names_that_one_and_changes_nothing(
    mount_dirs, erofs_images, local_server, tmp_path, lazy
):
    """Tried: an image mounted at ``outer``, another at ``outer/a`` (a directory of the
    first image's tree), then ``umount`` and ``umount --lazy`` of ``outer``. Must hold:
    each is refused (exit 13) before anything is undone, in one line naming the image
    inside and the ``blockstore umount`` that undoes it first; both mounts and servers
    stay, and ``mounts`` lists both ok; once the inner one is undone, ``umount outer``
    leaves nothing. Before, ``--lazy`` detached both: the inner image was then listed as
    "not mounted" while its server ran on, and the plain one named only the path."""
    _, run = mount_dirs
    outer, inner, outer_record, inner_record = _an_image_inside_another(
        tmp_path, local_server, erofs_images.small.path
    )
    busy = cli("umount", *lazy, str(outer))
    assert busy.returncode == MountpointBusy.exit_code, busy.stderr
    assert busy.stderr.splitlines() == [
        f"blockstore: {outer} is busy: blockstore mounted inner at {inner}, inside it: "
        f"`blockstore umount {inner}` first"
    ]
    for record in (outer_record, inner_record):
        assert record.server is not None and record.server.alive()
        assert syscall.is_mounted(record.mountpoint)
    listed = json.loads(cli("mounts", "--json").stdout)
    assert [(row["mountpoint"], row["state"]) for row in listed] == [
        (str(outer), "ok"),
        (str(inner), "ok"),
    ]
    for record in (inner_record, outer_record):
        done = cli("umount", *lazy, record.mountpoint)
        assert done.returncode == 0, done.stderr
    assert_nothing_left(outer_record, run)
    assert_nothing_left(inner_record, run)


def test_umount_lazy_of_a_mount_with_an_unrecorded_image_inside_names_that_one(
    mount_dirs, erofs_images, local_server, tmp_path
):
    """Tried: an image mounted at ``outer``, another at ``outer/a`` whose record was then
    damaged (cut short), then ``umount --lazy`` of ``outer``. Must hold: refused (exit 13)
    before anything is undone, naming the mount inside and the ``blockstore umount`` that
    undoes it first; once that is done, ``umount outer`` leaves nothing. Before, both were
    detached: the inner image's server and FUSE file ran on, and ``mounts`` no longer
    listed it at all (nothing at its mount point named it)."""
    _, run = mount_dirs
    outer, inner, outer_record, inner_record = _an_image_inside_another(
        tmp_path, local_server, erofs_images.small.path
    )
    (Path(inner_record.state_dir) / records.RECORD_NAME).write_text('{"mountpoint": "/mn')
    said = (
        f"blockstore mounted an image at {inner} (its record gone or damaged), inside it: "
        f"`blockstore umount {inner}` first"
    )
    _lazy_umount_refused_naming_the_inner(outer, inner, inner_record, said)
    records_of = (outer_record, inner_record)
    _undone_inner_first(outer, records_of, run, lambda: cli("umount", str(inner)))


def test_umount_lazy_of_a_mount_with_an_image_of_another_run_directory_inside_names_it(
    mount_dirs, erofs_images, local_server, tmp_path, monkeypatch
):
    """Tried: an image mounted at ``outer``, another at ``outer/a`` with another run
    directory (a ``sudo`` that dropped BLOCKSTORE_RUN_DIR), then ``umount --lazy`` of
    ``outer``. Must hold: refused (exit 13) before anything is undone, naming the
    ``BLOCKSTORE_RUN_DIR=... blockstore umount`` that undoes the inner one first; once
    that is run, ``umount outer`` leaves nothing. Before, both were detached, and the
    inner image's server and FUSE file ran on for a mount no longer there."""
    _, run = mount_dirs
    outer = tmp_path / "outer"
    outer.mkdir()
    inner = outer / "a"
    small = erofs_images.small.path
    outer_record = stack.mount(local_server({"layer0": small}), str(outer), image="outer")
    other = run / "other"  # short, for its socket's path; cleaned up with ``run``
    monkeypatch.setenv("BLOCKSTORE_RUN_DIR", str(other))
    inner_record = stack.mount(local_server({"layer0": small}), str(inner), image="inner")
    monkeypatch.setenv("BLOCKSTORE_RUN_DIR", str(run))
    command = f"BLOCKSTORE_RUN_DIR={other} blockstore umount {inner}"
    said = (
        f"blockstore mounted an image at {inner} with another run directory, inside it: "
        f"`{command}` first"
    )
    _lazy_umount_refused_naming_the_inner(outer, inner, inner_record, said)
    records_of = (outer_record, inner_record)
    _undone_inner_first(outer, records_of, run, lambda: run_suggested(command))


def test_umount_lazy_of_a_moved_mount_with_a_moved_image_inside_names_that_one(
    mount_dirs, erofs_images, local_server, tmp_path
):
    """Tried: an image mounted at ``old/outer``, another at ``old/outer/a``, then ``old``
    renamed to ``new`` (both mounts go with it), then ``umount --lazy`` of ``new/outer``.
    Must hold: refused (exit 13) before anything is undone, naming the inner image at its
    new path and the ``blockstore umount`` of that path, which undoes it; then ``umount
    new/outer`` leaves nothing. Before, the inner image, recorded at its old path, was
    not seen: both were detached and its server ran on."""
    _, run = mount_dirs
    outer = tmp_path / "old" / "outer"
    outer.mkdir(parents=True)
    small = erofs_images.small.path
    outer_record = stack.mount(local_server({"layer0": small}), str(outer), image="outer")
    inner_record = stack.mount(local_server({"layer0": small}), str(outer / "a"), image="inner")
    (tmp_path / "old").rename(tmp_path / "new")
    outer, inner = tmp_path / "new" / "outer", tmp_path / "new" / "outer" / "a"
    said = f"blockstore mounted inner at {inner}, inside it: `blockstore umount {inner}` first"
    _lazy_umount_refused_naming_the_inner(outer, inner, inner_record, said)
    records_of = (outer_record, inner_record)
    _undone_inner_first(outer, records_of, run, lambda: cli("umount", str(inner)))


def test_a_stale_record_naming_the_same_device_does_not_hide_the_mount(
    mount_dirs, mountpoint, erofs_images, local_server, tmp_path
):
    """Tried: a record left by a mount the user unmounted by hand, whose top had the
    device number the kernel has since given this mount (anonymous device numbers are
    reused). Must hold: ``umount`` still knows this mount for its own and leaves
    nothing of it. Before, the other record's device made it look foreign: its server
    was stopped and its FUSE file found busy, and the mount was left dead."""
    argv = local_server({"layer0": erofs_images.small.path})
    record = stack.mount(argv, str(mountpoint), image="small")
    gone = tmp_path / "gone"
    gone.mkdir()
    stale = records.MountRecord(
        mountpoint=str(gone),
        image="small",
        method=record.method,
        state_dir=str(records.state_dir_for(str(gone))),
        log=str(records.log_path_for(str(gone))),
        mounted=True,
        top_device=records.load(str(mountpoint)).top_device,
    )
    records.create(stale)
    done = cli("umount", str(mountpoint))
    assert done.returncode == 0, done.stderr
    assert not syscall.is_mounted(str(mountpoint))
    assert not [p for p in syscall.mounted() if p.startswith(record.state_dir + "/")]
    assert not os.path.exists(record.state_dir)
    assert cli("umount", str(gone)).returncode == 0
    assert records.saved() == []


def test_a_layer_the_killed_mount_made_but_never_recorded_is_undone_before_its_fuse_file(
    mount_dirs, mountpoint, erofs_images, local_server
):
    """Tried: a three-layer mount SIGKILLed just after the second layer's EROFS was
    mounted, before it was recorded (simulated: the overlay taken down, the record cut
    back to what it then said). Must hold: ``umount`` unmounts that layer before the
    FUSE file it reads, and leaves nothing. Before, every umount failed on the FUSE
    file as busy, after stopping the server."""
    _, run = mount_dirs
    argv = local_server({f"layer{i}": layer.path for i, layer in enumerate(erofs_images.layers)})
    record = stack.mount(argv, str(mountpoint), image="three")
    syscall.umount(str(mountpoint))
    syscall.umount(record.lowers[2])
    made = records.load(str(mountpoint))
    made.lowers, made.mounted, made.top_device = made.lowers[:1], False, None
    records.save(made)
    done = cli("umount", str(mountpoint))
    assert done.returncode == 0, done.stderr
    assert_nothing_left(record, run)


def test_a_run_directory_reached_through_a_symlink_is_unmounted_cleanly(
    mount_dirs, mountpoint, erofs_images, local_server, monkeypatch
):
    """Tried: a three-layer mount whose run directory is named through a symlink to its
    parent (as /var/run is to /run). Must hold: ``umount`` knows the overlay for its own and
    leaves nothing."""
    _, run = mount_dirs
    link = run.parent / f"{run.name}-link"  # to the run directory's parent
    link.symlink_to(run.parent)
    try:
        monkeypatch.setenv("BLOCKSTORE_RUN_DIR", str(link / run.name))
        argv = local_server(
            {f"layer{i}": layer.path for i, layer in enumerate(erofs_images.layers)}
        )
        record = stack.mount(argv, str(mountpoint), image="three")
        done = cli("umount", str(mountpoint))
        assert done.returncode == 0, done.stderr
        assert "left alone" not in done.stderr
        assert_nothing_left(record, run)
    finally:
        link.unlink()


def test_busy_mountpoint_and_busy_umount(mount_dirs, mountpoint, erofs_images, local_server):
    """Mounting over a mounted directory is refused (exit 13); unmounting while a process
    works inside is refused (exit 13), naming that process, and changes nothing;
    ``--lazy`` then detaches it."""
    image = erofs_images.small.path
    _, run = mount_dirs
    record = stack.mount(local_server({"layer0": image}), str(mountpoint), image="small")
    with pytest.raises(MountpointBusy):
        stack.mount(local_server({"layer0": image}), str(mountpoint), image="again")

    squatter = subprocess.Popen(["sleep", "30"], cwd=mountpoint)
    a_file = next(p for p in mountpoint.rglob("*") if p.is_file() and not p.is_symlink())
    reader = subprocess.Popen(["sh", "-c", 'exec 3<"$0"; exec sleep 30', str(a_file)])
    try:
        busy = cli("umount", str(mountpoint))
        assert busy.returncode == MountpointBusy.exit_code, busy.stderr
        assert len(busy.stderr.strip().splitlines()) == 1
        # The way out it offers says what it costs.
        lazily = f"`blockstore umount --lazy {mountpoint}`"
        assert f"{lazily}, after which what still uses it gets I/O errors" in busy.stderr
        for user in (squatter, reader):  # a working directory, an open file
            assert f"pid {user.pid} (sleep)" in busy.stderr, busy.stderr
        assert syscall.is_mounted(str(mountpoint))
        lazy = cli("umount", "--lazy", str(mountpoint))
        assert lazy.returncode == 0, lazy.stderr
    finally:
        for user in (squatter, reader):
            user.kill()
            user.wait()
    assert_nothing_left(record, run)


def test_umount_of_a_mount_with_another_inside_names_it(
    mount_dirs, mountpoint, erofs_images, local_server
):
    """A tmpfs mounted on a directory inside the image: `umount` is refused (exit 13)
    naming that mount to unmount first, not a process that does not exist; once it is
    gone, `umount` succeeds and leaves nothing."""
    _, run = mount_dirs
    record = stack.mount(
        local_server({"layer0": erofs_images.small.path}), str(mountpoint), image="small"
    )
    inner = next(p for p in sorted(mountpoint.iterdir()) if p.is_dir() and not p.is_symlink())
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(inner)], check=True)
    try:
        busy = cli("umount", str(mountpoint))
        assert busy.returncode == MountpointBusy.exit_code, busy.stderr
        assert f"{inner} mounted inside it: `umount {inner}` first" in busy.stderr, busy.stderr
    finally:
        subprocess.run(["umount", str(inner)], check=False)
    done = cli("umount", str(mountpoint))
    assert done.returncode == 0, done.stderr
    assert_nothing_left(record, run)


@pytest.mark.parametrize("over", ["bind", "overlay"])
def test_umount_of_a_mount_something_else_is_mounted_over_is_refused_and_changes_nothing(
    mount_dirs, mountpoint, erofs_images, local_server, tmp_path, over
):
    """Three layers mounted, then a bind mount of the image, or the user's own writable
    overlay with it as the lower directory (as a container runtime makes): `umount` is
    refused (exit 13) naming that mount, and the image, the bind or overlay over it and
    the server all stay as they were. Before, the top and the layers came down, the
    server was stopped and the refusal came only at the last step: the mount over it
    then read I/O errors. Once it is gone, `umount` leaves nothing."""
    _, run = mount_dirs
    layers = erofs_images.layers
    argv = local_server({f"layer{i}": layer.path for i, layer in enumerate(layers)})
    record = stack.mount(argv, str(mountpoint), image="three")
    user = tmp_path / "user"
    user.mkdir()
    if over == "bind":
        command = ["mount", "--bind", str(mountpoint), str(user)]
    else:
        upper, work = tmp_path / "upper", tmp_path / "work"
        upper.mkdir()
        work.mkdir()
        options = f"lowerdir={mountpoint},upperdir={upper},workdir={work}"
        command = ["mount", "-t", "overlay", "overlay", "-o", options, str(user)]
    subprocess.run(command, check=True)
    try:
        busy = cli("umount", str(mountpoint))
        assert busy.returncode == MountpointBusy.exit_code, busy.stderr
        assert f"{user} is mounted over it" in busy.stderr, busy.stderr
        assert record.server is not None and record.server.alive()
        assert syscall.is_mounted(str(mountpoint)) and records.load(str(mountpoint))
        assert_same_tree(layers[-1].merged_tree, user)
    finally:
        subprocess.run(["umount", str(user)], check=False)
    done = cli("umount", str(mountpoint))
    assert done.returncode == 0, done.stderr
    assert_nothing_left(record, run)


def test_a_mountpoint_whose_name_is_not_utf8_mounts_and_unmounts(
    mount_dirs, erofs_images, local_server, tmp_path
):
    """A directory named with a Latin-1 byte (as an old file system may hold): the mount
    and `umount` work, where the record's key was made with ``str.encode`` and failed
    with a UnicodeEncodeError traceback."""
    _, run = mount_dirs
    mountpoint = tmp_path / os.fsdecode(b"mnt-\xe9")
    mountpoint.mkdir()
    record = stack.mount(
        local_server({"layer0": erofs_images.small.path}), str(mountpoint), image="small"
    )
    assert_same_tree(erofs_images.small.tree, mountpoint)
    done = cli("umount", str(mountpoint), errors="surrogateescape")  # prints the name as is
    assert done.returncode == 0, done.stderr
    assert_nothing_left(record, run)


def test_server_failing_before_ready_passes_on_its_error(mount_dirs, mountpoint, tmp_path):
    """The real server, asked for an image its cache never saw while offline, fails before
    it is ready: the mount fails at once with the server's own error (from the readiness
    pipe, not its log) and its exit code, and leaves no record and no state behind, nor
    a log that would only repeat the error (nor a pointer to one)."""
    failing = [*BLOCKSTORE, "serve", "reg.invalid/none:v1", "--offline"]
    failing += ["--cache-dir", str(tmp_path / "cache")]
    started = time.monotonic()
    with pytest.raises(ServerFailed) as failed:
        stack.mount(failing, str(mountpoint), image="none")
    assert time.monotonic() - started < 15
    assert failed.value.exit_code == 9
    assert "never resolved" in str(failed.value), str(failed.value)
    assert "log" not in str(failed.value)
    assert not records.log_path_for(str(mountpoint)).exists()
    assert records.saved() == []
    assert not records.state_dir_for(str(mountpoint)).exists()


def test_server_dying_silently_is_reported_at_once(mount_dirs, mountpoint):
    """A server killed before it says anything closes the readiness pipe by dying: the mount
    fails within seconds (not at its two-minute timeout) with the exit status, 137."""
    dying = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"]
    started = time.monotonic()
    with pytest.raises(ServerFailed) as failed:
        stack.mount(dying, str(mountpoint), image="none")
    assert time.monotonic() - started < 10
    assert failed.value.exit_code == 128 + signal.SIGKILL
    assert "exited with status 137 before it was ready" in str(failed.value)
    assert records.saved() == []


def test_ready_printed_to_the_log_is_not_ready(mount_dirs):
    """A server that prints the old announcements (``export``, ``ready``) to its log but
    says nothing on the readiness pipe is not taken as ready: the wait times out."""
    _, run = mount_dirs
    talker = [
        sys.executable,
        "-c",
        "import time; print('export  nbd://127.0.0.1:1'); print('ready', flush=True); "
        "time.sleep(60)",
        str(run),  # names this test's processes among those of tests running beside it
    ]
    with pytest.raises(MountError, match="said nothing of its progress for 2s"):
        start_server(talker, run / "talker.log", run / "talker.status", timeout=2)
    assert "ready" in (run / "talker.log").read_text()
    assert not processes_mentioning(str(run))


def test_a_stop_signal_as_the_supervisor_starts_is_passed_on_and_its_outcome_written(mount_dirs):
    """Tried: SIGTERM sent to a mount's supervisor the moment it is spawned, before its
    interpreter could set its handlers (a mount undone as it began). Must hold: the
    server is started and told to stop, the supervisor writes how it ended (the status
    ``start_server`` passes on), and nothing of it is left once ``start_server`` has
    raised. Before, the signal killed the supervisor outright: no status was written,
    so ``umount`` said the server's exit status was unknown and kept the log."""
    _, run = mount_dirs
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)", str(run)]
    status = run / "sleeper.status"
    with pytest.raises(ServerFailed) as failed:
        start_server(
            sleeper,
            run / "sleeper.log",
            status,
            spawned=lambda supervisor: os.kill(supervisor.pid, signal.SIGTERM),
        )
    assert read_status(status) == ServerExit(failed.value.exit_code)
    assert failed.value.exit_code == 128 + signal.SIGTERM
    assert not processes_mentioning(str(run))


WORKER = """
import json, os, sys, time
fd = int(sys.argv[sys.argv.index("--ready-fd") + 1])
for i in range(int(sys.argv[1])):
    os.write(fd, json.dumps({"progress": f"indexing: {i} GiB"}).encode() + b"\\n")
    time.sleep(0.5)
if sys.argv[2] == "ready":
    exports = {"layer0": "nbd+unix:///layer0?socket=/nonexistent"}
    os.write(fd, json.dumps({"ready": True, "exports": exports}).encode() + b"\\n")
    os.close(fd)
time.sleep(60)
"""


def test_a_server_at_work_is_waited_for_past_the_timeout_while_it_says_so(mount_dirs):
    """Tried: a server that takes 6 s to be ready (a large layer's first indexing pass)
    but says how far it has got every 0.5 s, against a 3 s timeout; then one that goes
    quiet. Must hold: the first is waited for and taken as ready; the second times out
    3 s after its last word. Before, any server not ready within the fixed timeout was
    killed, so a large single-frame zstd layer never mounted. (The first wait also
    holds the start of two interpreters, the supervisor's and the server's, which on
    a loaded machine takes a second or more.)"""
    _, run = mount_dirs
    worker = [sys.executable, "-c", WORKER, "12", "ready", str(run)]
    started = start_server(worker, run / "worker.log", run / "worker.status", timeout=3)
    try:
        assert started.exports == {"layer0": "nbd+unix:///layer0?socket=/nonexistent"}
    finally:
        os.killpg(started.process.pid, signal.SIGKILL)
    quiet = [sys.executable, "-c", WORKER, "2", "quiet", str(run)]
    begun = time.monotonic()
    with pytest.raises(MountError, match="said nothing of its progress for 3s"):
        start_server(quiet, run / "quiet.log", run / "quiet.status", timeout=3)
    assert 3.5 < time.monotonic() - begun < 8
    assert not processes_mentioning(str(run))


def test_mountpoint_must_be_an_existing_directory(mount_dirs, local_server):
    """A missing mount point is reported as missing, a file as not a directory: each a
    one-line mount error before any server starts."""
    with pytest.raises(MountError, match="missing does not exist"):
        stack.mount(local_server({}), str(mount_dirs[0] / "missing"), image="x")
    (mount_dirs[0] / "file").write_text("")
    with pytest.raises(MountError, match="file is not a directory"):
        stack.mount(local_server({}), str(mount_dirs[0] / "file"), image="x")


def test_not_root_and_no_fuse_have_their_own_exit_codes(mount_dirs, mountpoint):
    """As an ordinary user, mount, umount and mounts exit 11 (mounts would otherwise find
    no record it may read, and say there are no mounts); as root with no /dev/fuse (a
    private /dev in a mount namespace) and no kernel NBD, mount exits 12; each says why in
    one line."""
    for argv in (["mount", "img", str(mountpoint)], ["umount", str(mountpoint)], ["mounts"]):
        as_nobody = cli(*argv, user=65534, group=65534, extra_groups=[], cwd="/")
        assert as_nobody.returncode == 11, (argv, as_nobody.stderr)
        assert "root" in as_nobody.stderr and len(as_nobody.stderr.strip().splitlines()) == 1

    script = "mount -t tmpfs none /dev && exec " + " ".join(
        [*BLOCKSTORE, "mount", "img", str(mountpoint)]
    )
    no_fuse = subprocess.run(
        [*HOLDER, "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert no_fuse.returncode == 12, no_fuse.stderr
    assert "FUSE" in no_fuse.stderr and len(no_fuse.stderr.strip().splitlines()) == 1


def test_dead_nbdfuse_is_reported_and_umount_cleans_up(
    mount_dirs, nbdfuse_only, mountpoint, erofs_images, local_server
):
    """Kill nbdfuse under a mount: ``mounts`` reports it and ``umount`` still takes down the
    EROFS mount, the dead FUSE mount and the server."""
    image = erofs_images.small.path
    _, run = mount_dirs
    record = stack.mount(local_server({"layer0": image}), str(mountpoint), image="small")
    fuse = record.attachments[0].process
    assert fuse is not None
    os.kill(fuse.pid, signal.SIGKILL)
    assert fuse.wait(5)
    assert "nbdfuse dead" in cli("mounts").stdout
    done = cli("umount", str(mountpoint))
    assert done.returncode == 0, done.stderr
    assert_nothing_left(record, run)


def test_export_that_cannot_be_attached_rolls_back(mount_dirs, nbdfuse_only, mountpoint):
    """A server that announces an export nobody can connect to fails the mount with
    nbdfuse's reason, and the rollback stops the server and leaves no mount or state."""
    _, run = mount_dirs
    announcer = [
        sys.executable,
        "-c",
        "import os, sys, time; from nbdfront.mount import readiness; "
        "uri = 'nbd+unix:///layer0?socket=/nonexistent.sock'; "
        "os.write(int(sys.argv[-1]), readiness.encode_ready({'layer0': uri}, [])); "
        "time.sleep(60)",
    ]
    with pytest.raises(MountError, match="nbdfuse could not attach"):
        stack.mount(announcer, str(mountpoint), image="broken")
    assert not [p for p in syscall.mounted() if p.startswith(f"{run}/")]
    assert not processes_mentioning(str(run))
    assert records.saved() == []


def test_kernel_nbd_path_where_the_driver_is_present(
    mount_dirs, mountpoint, erofs_images, local_server
):
    """Where /dev/nbd* and nbd-client exist, the layer is attached as a kernel block device,
    mounted from it, and the device is free again after umount."""
    if attach.choose_method() != attach.KERNEL:
        pytest.skip("no kernel NBD driver (/dev/nbd*) or no nbd-client here: nbdfuse is used")
    small = erofs_images.small
    record = stack.mount(local_server({"layer0": small.path}), str(mountpoint), image="small")
    device = record.attachments[0].device
    assert device.startswith("/dev/nbd")
    assert syscall.mounted()[str(mountpoint)] == ("erofs", device)
    assert_same_tree(small.tree, mountpoint)
    unmount.unmount(str(mountpoint))
    assert not Path(f"/sys/block/{Path(device).name}/pid").exists()


def start_mount_that_never_gets_ready(mountpoint: Path, run: Path) -> subprocess.Popen:
    """``stack.mount`` in a process of its own, its server spawned and never ready."""
    never_ready = [sys.executable, "-c", "import time; time.sleep(60)"]
    code = (
        "from nbdfront.mount import stack; "
        f"stack.mount({never_ready!r}, {str(mountpoint)!r}, image='')"
    )
    mounting = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not processes_mentioning(f"{run}/mounts/"):
        assert time.monotonic() < deadline, "the server never started"
        time.sleep(0.02)
    return mounting


def wait_for_no_process_mentioning(run: Path) -> None:
    """The supervisor is told to stop before mount exits; on a loaded machine it may
    take a moment to be gone."""
    deadline = time.monotonic() + 5
    while processes_mentioning(str(run)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not processes_mentioning(str(run))


def test_a_signal_during_a_step_is_held_until_the_step_is_recorded(
    mount_dirs, mountpoint, erofs_images, local_server
):
    """SIGTERM as the layer's EROFS mount(2) returns (here held there for a second) does
    not break in before its result is recorded, where the undo would not know of the
    mount: the step ends, is recorded, and only then is the mount undone, leaving
    nothing behind."""
    _, run = mount_dirs
    argv = local_server({"layer0": erofs_images.small.path})
    inside = mount_dirs[0] / "inside"
    code = f"""
import pathlib, time
from nbdfront.mount import stack
real = stack._mount_erofs
def slow(device, target, *context):
    real(device, target, *context)
    pathlib.Path({str(inside)!r}).touch()
    time.sleep(1)  # a mount(2) that has mounted and is about to return
stack._mount_erofs = slow
stack.mount({argv!r}, {str(mountpoint)!r}, image="small")
"""
    mounting = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not inside.exists():
        assert time.monotonic() < deadline and mounting.poll() is None, "never reached the mount"
        time.sleep(0.02)
    mounting.send_signal(signal.SIGTERM)
    _, err = mounting.communicate(timeout=30)
    assert mounting.returncode != 0 and "KeyboardInterrupt" in err
    wait_for_no_process_mentioning(run)
    assert not syscall.is_mounted(str(mountpoint))
    assert records.saved() == []
    assert not records.state_dir_for(str(mountpoint)).exists()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_interrupted_mount_leaves_nothing(mount_dirs, mountpoint, signum):
    """Ctrl-C, SIGTERM or SIGHUP (a closed terminal) while ``mount`` waits for its server:
    the server it started is stopped and no record or state directory is left."""
    _, run = mount_dirs
    mounting = start_mount_that_never_gets_ready(mountpoint, run)
    mounting.send_signal(signum)
    assert mounting.wait(10) != 0
    wait_for_no_process_mentioning(run)
    assert records.saved() == []
    assert not records.state_dir_for(str(mountpoint)).exists()


def test_a_mount_in_progress_is_shown_as_such_and_a_killed_one_is_cleaned_up(
    mount_dirs, mountpoint
):
    """While ``mount`` waits for its server, ``mounts`` shows it as mounting (not as dead),
    and neither ``umount`` nor a second ``mount`` tear it down. Killed with SIGKILL (no
    cleanup can run), it has recorded its server at once: ``umount`` stops that server
    and leaves nothing."""
    _, run = mount_dirs
    mounting = start_mount_that_never_gets_ready(mountpoint, run)
    try:
        deadline = time.monotonic() + 10
        while (shown := listing.list_mounts()[0]).record.server is None:
            assert time.monotonic() < deadline, "the server was never recorded"
            time.sleep(0.02)
        assert shown.state == "mounting"
        with pytest.raises(MountpointBusy, match="still being mounted"):
            unmount.unmount(str(mountpoint))
        with pytest.raises(
            MountpointBusy, match=f"being mounted by blockstore .pid {mounting.pid}"
        ):
            stack.check_can_mount(str(mountpoint))
        table = cli("mounts")
        assert "mounting" in table.stdout and "cleans it up" not in table.stderr
        assert processes_mentioning(f"{run}/mounts/"), "the server was stopped"
        mounting.kill()
        mounting.wait(10)
        (shown,) = listing.list_mounts()
        assert shown.state == "not mounted" and shown.server_alive
        unmount.unmount(str(mountpoint))
        wait_for_no_process_mentioning(run)
        assert records.saved() == []
    finally:
        mounting.kill()


def test_a_mount_at_a_place_being_mounted_says_what_frees_it(mount_dirs):
    """Tried: a mount at a directory named ``it's a mount`` waiting for its server, then
    another mount there, then the first command interrupted. Must hold: the second is
    refused in one line naming the first's pid, saying to interrupt it or let it finish
    and the ``blockstore umount`` of the place, quoted for the shell; once interrupted,
    the place can be mounted. Before, it named the pid alone, nothing to do with it."""
    base, run = mount_dirs
    mountpoint = base / "it's a mount"
    mountpoint.mkdir()
    mounting = start_mount_that_never_gets_ready(mountpoint, run)
    try:
        deadline = time.monotonic() + 10
        while records.load(str(mountpoint)) is None:
            assert time.monotonic() < deadline, "the mount was never recorded"
            time.sleep(0.02)
        with pytest.raises(MountpointBusy) as refused:
            stack.check_can_mount(str(mountpoint))
        said = str(refused.value)
        assert f"(pid {mounting.pid}): interrupt that command, which undoes it" in said, said
        assert shlex.split(said.split("`")[1]) == ["blockstore", "umount", str(mountpoint)]
        mounting.send_signal(signal.SIGINT)
        assert mounting.wait(10) != 0
    finally:
        mounting.kill()
    stack.check_can_mount(str(mountpoint))


def test_a_failed_servers_log_is_dropped_only_when_it_repeats_the_error(tmp_path):
    """Tried: logs of a server that failed before ready, against its error. Must hold:
    one that holds the error alone (as the server prints it, with blank lines) is a
    repeat; one with any other line, even a piece of the error, is not, and is kept."""
    from nbdfront.mount.server import _only_repeats

    error = "registry r.example refused the user name and password"
    log = tmp_path / "serve.log"
    cases = {
        f"blockstore: {error}\n": True,
        f"\nblockstore: {error}\n\n": True,
        "": True,
        f"blockstore: {error}\nblockstore: warning: the cache was moved aside\n": False,
        f"blockstore: {error}\nrefused\n": False,
        "Traceback (most recent call last):\n": False,
    }
    for text, repeats in cases.items():
        log.write_text(text)
        assert _only_repeats(log, error) is repeats, text
    assert _only_repeats(tmp_path / "absent.log", error) is False
