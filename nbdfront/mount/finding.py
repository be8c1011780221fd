"""What stands of a mount, found from the kernel's mount table and the processes
running, whatever its record says or if it has none.

A mount's record says what was made; the kernel says what still stands. These
find a record's top mount among those at its mount point (``where_ours_is``),
follow it when a directory above it moved (``followed``), read back a mount
whose record is gone (``unrecorded``), find a mount made with another run
directory (``run_dir_of``) or the supervisor of a server whose record is gone
(``supervisor_of``), and say what hides a mount or lies inside it; they write
paths and commands for a user to read and paste (made in ``commands``). The
names of the state directory's files they look for, which ``stack`` gives those
it makes, are here too (``SERVER_STATUS``, ``EMPTY_LOWER``, ``ATTRIBUTES_LOWER``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

from nbdfront.mount import records, syscall
from nbdfront.mount.commands import plain_umount, printable, umount_command
from nbdfront.mount.process import ProcessRef
from nbdfront.mount.records import MountRecord

# Where the server's exit status is written, in the mount's state directory.
SERVER_STATUS = "serve.status"
EMPTY_LOWER = "empty-lower"  # the layer an overlay of one visible layer is given
ATTRIBUTES_LOWER = "dir-attributes"  # the top layer that keeps lower directories' attributes


def followed(record: MountRecord) -> MountRecord:
    """``record`` at the place its top is mounted now: a directory above its mount point
    renamed or moved takes the mount with it, and the kernel shows it at the new path,
    not the one recorded. Found by the top's device, as ``is_ours`` knows it."""
    if record.top_device is None or where_ours_is(record) != "absent":
        return record
    for point in syscall.points_of(record.top_device):
        if any(is_ours(record, here) for here in syscall.mounts_at(point)[:1]):
            return replace(record, mountpoint=point)
    return record


def moved_to(path: str) -> MountRecord | None:
    """The recorded mount whose top is mounted at ``path`` now, moved there with a
    directory above it (``followed``)."""
    return next((moved for r in records.saved() if (moved := followed(r)).mountpoint == path), None)


def unrecorded(mountpoint: str) -> MountRecord | None:
    """A mount whose record is gone (the run directory cleared while it was mounted)
    though its state directory still holds what it mounted: enough of a record, read
    from mountinfo and from its server's command line, for ``unmount.take_down`` to
    undo it, the server included; None if nothing of it is mounted or running."""
    state = records.state_dir_for(mountpoint)
    if not records.is_private(state):
        return None
    inside = syscall.submounts(str(state))
    table = syscall.mounted()
    record = MountRecord(
        mountpoint=mountpoint,
        image="image unknown",
        method="",
        state_dir=str(state),
        log=str(records.log_path_for(mountpoint)),
        lowers=[point for point in reversed(inside) if table[point][0] == "erofs"],
        mounted=True,
        server=supervisor_of(state),
    )
    if not inside and record.server is None and where_ours_is(record) == "absent":
        return None
    return record


def supervisor_of(state: Path) -> ProcessRef | None:
    """The live supervisor of the server of the mount whose state directory is ``state``,
    known by the status file its command line names (``server.start_server``), among this
    user's processes: with the record gone, nothing else names it, and left running it
    would serve nothing and hold its cache for ever."""
    wanted = [b"-m", b"nbdfront.mount.supervisor", os.fsencode(state / SERVER_STATUS)]
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if entry.stat().st_uid != os.geteuid():
                continue
            argv = Path(entry.path, "cmdline").read_bytes().split(b"\0")
        except OSError:  # gone meanwhile
            continue
        if argv[1:4] == wanted:
            return ProcessRef.of(int(entry.name))
    return None


def recorded_around(path: str) -> MountRecord | None:
    """The recorded mount ``path`` lies in, the innermost: ``umount`` given a directory
    or a file of a mounted image means that mount."""
    around = [r for r in records.saved() if path.startswith(r.mountpoint.rstrip("/") + "/")]
    return max(around, key=lambda r: len(r.mountpoint), default=None)


def run_dir_of(mountpoint: str) -> str | None:
    """The run directory whose mount at ``mountpoint`` is standing, where that mount's
    record is there."""
    key = records.mount_key(mountpoint)
    return next((run for run, other in standing_state_dirs() if other == key), None)


def standing_state_dirs() -> Iterator[tuple[str, str]]:
    """(run directory, mount key) of each state directory ``RUN/mounts/KEY/`` holding a
    record that a standing mount lies in (its FUSE files, its layers' EROFS): how a mount
    made with another run directory is found, as an overlay at the mount point names
    none of it. Every ``/mounts/`` of a path is tried: a run directory's own path may
    hold one."""
    for point, (_, source) in syscall.mounted().items():
        for path in (point, source):
            at = path.find("/mounts/")
            while at >= 0:
                run = path[:at]
                key = path[at + len("/mounts/") :].split("/", 1)[0]
                if key and os.path.isfile(os.path.join(run, "mounts", key, records.RECORD_NAME)):
                    yield run, key
                at = path.find("/mounts/", at + 1)


def where_ours_is(record: MountRecord) -> str:
    """Where the record's top mount is among those at the mount point, whatever the
    record says: ``top``, ``covered`` (another mount is on it there, a bind of it
    too, or another blockstore mount's top that an older record cannot tell from
    its own), or ``absent`` (gone, or never made). A command killed inside mount(2) made it
    unrecorded; a mount the user made there after unmounting ours by hand is not ours."""
    depths = [
        depth
        for depth, here in enumerate(syscall.mounts_at(record.mountpoint))
        if is_ours(record, here)
    ]
    if not depths:
        return "absent"
    # Ours below another mount there, even one of ours (a bind of it onto itself).
    return "covered" if max(depths) > 0 else "top"


def is_ours(record: MountRecord, here: syscall.MountedHere) -> bool:
    """Whether ``here`` is the record's top mount: a layer's EROFS on one of the
    record's devices (or a file in its state directory), or an overlay of exactly the
    record's layer directories, named relative to the state directory as this engine
    names them (or, as older versions did, by their paths; with the empty layer or the
    one that keeps directories' attributes, ``dirattrs``); and on the recorded device,
    once one is (an EROFS or a tmpfs made there since may get the same anonymous
    device number, so the device alone does not tell)."""
    if record.top_device is not None and here.device != record.top_device:
        return False
    state = record.state_dir.rstrip("/")
    inside = (state + "/", os.path.realpath(state) + "/")
    if here.fstype == "erofs":
        devices = {a.device for a in record.attachments}
        return here.source in devices or here.source.startswith(inside)
    if here.fstype == "overlay" and record.lowers and here.lowers:
        named = {os.path.relpath(lower, state) for lower in record.lowers}
        named |= {EMPTY_LOWER, ATTRIBUTES_LOWER}
        return all(
            lower in named if not os.path.isabs(lower) else lower.startswith(inside)
            for lower in here.lowers
        )
    return False


def hider(record: MountRecord, where: str) -> str | None:
    """Where the mount that hides the record's top is (``where``: ``where_ours_is``):
    over it at its own mount point, or over a directory above it; None if none does."""
    if where == "covered":
        return record.mountpoint
    return syscall.hidden_by(record.mountpoint) if where == "top" else None


def hidden_by_message(mountpoint: str, above: str) -> str:
    """Why the mount at ``mountpoint`` cannot be reached, nor unmounted, while the one at
    ``above`` (over a directory above it, or at the same place) hides it, and what to
    unmount first: one of ours with ``blockstore umount`` (with the run directory that
    mounted it), any other with ``umount``."""
    hidden = f"{printable(mountpoint)} is hidden by the mount"
    if above == mountpoint:
        top = syscall.mounts_at(above)[0]
        return (
            f"{hidden} at the same place ({top.fstype} from {top.source}), made over it since: "
            f"`{plain_umount([above])}` first"
        )
    if (record := records.load(above)) is not None:
        return (
            f"{hidden} of {record.image} at {printable(above)}, made over a directory above "
            f"it since: `{umount_command(above)}` first"
        )
    if (other := run_dir_of(above)) is not None:  # never umount(8): its server would run on
        return (
            f"{hidden} at {printable(above)}, made by blockstore with another run directory "
            f"over a directory above it since: `{umount_command(above, other)}` first"
        )
    top = syscall.mounts_at(above)[0]
    return (
        f"{hidden} at {printable(above)} ({top.fstype} from {top.source}), made over a "
        f"directory above it since: `{plain_umount([above])}` first"
    )


def ours_inside(mountpoint: str) -> list[str]:
    """Our mounts in the tree of the mount at ``mountpoint``, the outermost first, each as
    words naming it and the ``blockstore umount`` that undoes it: a lazy unmount of
    ``mountpoint`` would take them down with it, leaving their servers running for mounts
    no longer there, and a plain one is refused by the kernel. Recorded here, recorded
    no more (``unrecorded``), or recorded with another run directory; each where its
    top is now (``followed``)."""
    saved = {(moved := followed(r)).mountpoint: moved for r in records.saved()}
    found = []
    for point in sorted(syscall.mounted_in_tree(mountpoint), key=len):
        shown = printable(point)
        if point in saved:
            what, command = f"{saved[point].image} at {shown}", umount_command(point)
        elif unrecorded(point) is not None:
            what = f"an image at {shown} (its record gone or damaged)"
            command = umount_command(point)
        elif (other := run_dir_of(point)) is not None:
            what = f"an image at {shown} with another run directory"
            command = umount_command(point, other)
        else:
            continue
        found.append(f"blockstore mounted {what}, inside it: `{command}` first")
    return found
