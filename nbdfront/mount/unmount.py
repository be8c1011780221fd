"""Taking a mount down, step by step, top first, from any process: what
``blockstore umount`` does, and what a failed ``mount`` does to undo itself."""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from blockstore.errors import MountError, MountpointBusy, NotPermitted
from blockstore.logformat import count_trouble
from blockstore.openers import processes_using
from nbdfront.mount import attach, records, syscall
from nbdfront.mount.commands import plain_umount, printable, umount_command
from nbdfront.mount.finding import (
    SERVER_STATUS,
    followed,
    hidden_by_message,
    moved_to,
    ours_inside,
    recorded_around,
    run_dir_of,
    unrecorded,
    where_ours_is,
)
from nbdfront.mount.listing import MountStatus, status
from nbdfront.mount.records import MountRecord
from nbdfront.mount.supervisor import STOP_GRACE, ServerExit, read_status

logger = logging.getLogger(__name__)


SERVER_STOP_TIMEOUT = STOP_GRACE + 3.0
"""Seconds ``umount`` waits for the supervisor: the server's grace, then time for the
supervisor to kill it and write how it ended. Past that the supervisor is killed too,
with all it started, and the server is said to have been killed."""


@dataclass
class Unmounted:
    """What ``unmount`` undid, and why its log was kept (None: all went well, log removed)."""

    record: MountRecord
    trouble: str | None


def unmount(mountpoint: str, *, lazy: bool = False) -> Unmounted:
    """Undo the mount recorded for ``mountpoint``; ``lazy`` detaches a busy one.

    The log is removed when the mount was whole until now, its server
    exited with status 0 and logged no warning or error; otherwise it is
    kept, to read what went wrong.
    """
    if os.geteuid() != 0:
        raise NotPermitted("unmounting needs root: run it with sudo")
    path = os.path.realpath(mountpoint)
    record = records.load(path) or records.load(mountpoint) or moved_to(path)
    recorded = record is not None
    if record is None:
        record = unrecorded(path)
    if record is None:
        raise MountError(_not_ours(mountpoint))
    if (now := followed(record).mountpoint) != record.mountpoint:
        raise MountError(
            f"{printable(record.mountpoint)} is where blockstore mounted {record.image}, which "
            f"is now at {printable(now)} (a directory above it renamed or moved): "
            f"`{umount_command(now)}` undoes it"
        )
    before = status(record, recorded=recorded)
    if before.state == "mounting":
        assert record.mounter is not None
        raise MountpointBusy(
            f"{record.mountpoint} is still being mounted (pid {record.mounter.pid}): "
            "let it finish, or interrupt that command, which undoes it"
        )
    with records.held_for_undoing(Path(record.state_dir)):
        ended = take_down(record, lazy=lazy)
        trouble = _trouble(before, ended)
        if trouble is None:
            Path(record.log).unlink(missing_ok=True)
        # The record goes last: until then it keeps the mount point from another mount,
        # whose log would be at the same path as this one's.
        records.forget(record)
    return Unmounted(record, trouble)


def _trouble(before: MountStatus, ended: ServerExit | None) -> str | None:
    """Why the log of the mount that stood as ``before``, its server ended as ``ended``, is
    kept; None if all went well."""
    if before.record_damaged:
        return "its mount record was damaged (it does not parse)"
    if not before.recorded:
        return "its mount record was gone (the run directory cleared while it was mounted)"
    if before.state != "ok":
        return f"the mount was not whole ({before.state})"
    if ended is None:
        return "the server's exit status is unknown"
    if ended.killed_after_grace:
        return f"the server did not stop within {STOP_GRACE:.0f}s and was killed"
    if ended.status != 0:
        return f"the server exited with status {ended.status}"
    if logged := count_trouble(Path(before.record.log)):
        return f"the server logged {logged} warning or error line{'s' if logged > 1 else ''}"
    return None


def _not_ours(mountpoint: str) -> str:
    """Why ``umount`` has nothing to undo at ``mountpoint``, and what to do instead: a
    mount made with another run directory (a ``sudo`` that dropped BLOCKSTORE_RUN_DIR)
    is undone with that one, never by umount(8), which would leave its server running."""
    top = syscall.mounts_at(mountpoint)
    if not top and (around := recorded_around(os.path.realpath(mountpoint))) is not None:
        return (
            f"{printable(mountpoint)} is inside the mount of {around.image} at "
            f"{printable(around.mountpoint)}, not one itself: "
            f"`{umount_command(around.mountpoint)}` undoes that"
        )
    if not top:
        why = "does not exist" if not os.path.lexists(mountpoint) else "has nothing mounted on it"
        return f"{mountpoint} {why}; `blockstore mounts` lists the mounts blockstore made"
    if (other := run_dir_of(os.path.realpath(mountpoint))) is not None:
        return (
            f"{mountpoint} was mounted by blockstore with another run directory: "
            f"`{umount_command(mountpoint, other)}` undoes it"
        )
    return (
        f"{mountpoint} was not mounted by blockstore with the run directory "
        f"{records.run_dir()}: {top[0].fstype} from {top[0].source} is mounted there; "
        f"`{plain_umount([mountpoint])}` unmounts it if it is yours, or give the "
        "BLOCKSTORE_RUN_DIR that mounted it"
    )


def take_down(record: MountRecord, *, lazy: bool) -> ServerExit | None:
    """Undo every step the record lists, top first; raises if the file system is busy.
    The record itself stays, for the caller to drop once done with the mount's log.

    Each step tolerates being undone already, so a half-made mount, a dead
    server or an earlier interrupted ``umount`` all clean up the same way.
    Returns how the server ended, None where it is not known. Bounded: a
    server that does not stop is killed after ``STOP_GRACE`` seconds.
    """
    where = where_ours_is(record)
    if where == "covered":
        raise MountpointBusy(hidden_by_message(record.mountpoint, record.mountpoint))
    top = where == "top"
    if top and (above := syscall.hidden_by(record.mountpoint)) is not None:
        raise MountpointBusy(hidden_by_message(record.mountpoint, above))
    if top and (inside := ours_inside(record.mountpoint)):
        raise MountpointBusy(f"{printable(record.mountpoint)} is busy: {inside[0]}")
    if top and not lazy:
        if inside := syscall.mounted_in_tree(record.mountpoint):
            raise MountpointBusy(
                f"{printable(record.mountpoint)} is busy: {', '.join(map(printable, inside))} "
                f"mounted inside it: `{plain_umount(inside)}` first, or "
                f"`{umount_command(record.mountpoint, lazy=True)}`, which takes that down with it"
            )
        if users := syscall.users_of(_mount_points(record)):
            raise MountpointBusy(
                f"{printable(record.mountpoint)} is busy: {', '.join(map(printable, users))} "
                f"is mounted over it (a bind mount or an overlay): `{plain_umount(users)}` "
                f"first, or `{umount_command(record.mountpoint, lazy=True)}`, after which it "
                "gets I/O errors"
            )
        if others := _mounts_run_inside(record):
            raise MountpointBusy(
                f"{printable(record.mountpoint)} is busy: the mount at "
                f"{printable(others[0].mountpoint)} runs its processes in it (an earlier "
                "version ran them where `mount` was run); "
                f"`{umount_command(others[0].mountpoint)}` first, or unmount "
                "with --lazy"
            )
        if held := _still_held_inside(record):
            raise MountpointBusy(
                f"{printable(record.mountpoint)} is busy: {', '.join(held)} uses its layers "
                f"from outside it; end or unmount that first, or "
                f"`{umount_command(record.mountpoint, lazy=True)}`, after which it gets I/O errors"
            )
    if top:
        syscall.umount(record.mountpoint, lazy=lazy, of=record.mountpoint)
    elif record.mounted and syscall.is_mounted(record.mountpoint):
        logger.warning(
            "%s: what is mounted there now is not this mount's: left alone", record.mountpoint
        )
    # The tree is out of reach now, but reads may be in flight (a lazy unmount's users,
    # the kernel's readahead) that a server stuck on its registry never answers: its stop
    # grace starts now and runs while the layers come down, rather than after them.
    told = record.server is not None and record.server.alive()
    if told:
        record.server.signal(signal.SIGTERM)
    for lower in reversed(record.lowers):
        syscall.umount(lower, lazy=lazy, of=record.mountpoint)
    _sweep(record, fuse=False, lazy=lazy)
    for attachment in reversed(record.attachments):
        attach.detach(attachment, lazy=lazy, of=record.mountpoint)
    _sweep(record, fuse=True, lazy=lazy)
    server = record.server
    stopped = server is None or server.stop(SERVER_STOP_TIMEOUT, told=told, group=True)
    ended = read_status(Path(record.state_dir) / SERVER_STATUS)
    if ended is None and not stopped:  # the supervisor did not answer: killed, with the server
        ended = ServerExit(128 + signal.SIGKILL, killed_after_grace=True)
    if record.socket:
        Path(record.socket).unlink(missing_ok=True)
    return ended


def _sweep(record: MountRecord, *, fuse: bool, lazy: bool) -> None:
    """Unmount what is left mounted in the state directory, made by a step the record
    does not list (the command killed inside it): first (``fuse=False``) layers' EROFS,
    then the FUSE files they read; unmounting a FUSE file ends its nbdfuse."""
    table = syscall.mounted()
    for point in syscall.submounts(record.state_dir):
        if table.get(point, ("",))[0].startswith("fuse") == fuse:
            syscall.umount(point, lazy=lazy, of=record.mountpoint)


def _held_inside(record: MountRecord) -> list[str]:
    """What uses the mount's layers through its state directory (a process with a
    layer's FUSE file or EROFS directory open, a loop device over a FUSE file) or from
    another mount namespace (its copy of the mount, a container's bind of it), which
    the unmount of the top cannot see: found after it, the top would be gone and the
    rest refused, a mount neither whole nor undone."""
    return (
        syscall.loops_over(record.state_dir)
        + processes_using(record.state_dir)
        + syscall.held_in_other_namespaces(_mount_points(record))
    )


def _still_held_inside(record: MountRecord) -> list[str]:
    """``_held_inside``, asked again for ``BUSY_PATIENCE`` while it finds something, as
    ``syscall.umount`` waits on a busy file system: a process just ending still holds
    the layers for a moment, and a mount namespace just made holds copies of every mount
    until it drops those it does not want."""
    deadline = time.monotonic() + syscall.BUSY_PATIENCE
    while (held := _held_inside(record)) and time.monotonic() < deadline:
        time.sleep(syscall.BUSY_RETRY)
    return held


def _mount_points(record: MountRecord) -> list[str]:
    """Where the record's file systems are mounted: the top, each layer, each FUSE file."""
    return [
        record.mountpoint,
        *record.lowers,
        *(a.fuse_dir for a in record.attachments if a.fuse_dir),
    ]


def _mounts_run_inside(record: MountRecord) -> list[MountRecord]:
    """The other recorded mounts whose server or attachment has its working directory in
    ``record``'s mounted tree: an earlier version ran them in the directory ``mount`` was
    run in. Named, the user unmounts that mount first, rather than ending its processes.
    By device, not path: a directory the tree was mounted over later does not count."""
    try:
        device = os.stat(record.mountpoint).st_dev
    except OSError:
        return []
    found = []
    for other in records.saved():
        refs = [other.server, *(a.process for a in other.attachments)]
        if other.mountpoint != record.mountpoint and any(
            ref is not None and ref.alive() and _cwd_device(ref.pid) == device for ref in refs
        ):
            found.append(other)
    return found


def _cwd_device(pid: int) -> int | None:
    """The device of ``pid``'s working directory; None if it cannot be read."""
    try:
        return os.stat(f"/proc/{pid}/cwd").st_dev
    except OSError:
        return None
