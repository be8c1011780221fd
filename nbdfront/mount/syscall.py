"""mount(2) and umount2(2), called directly, and what the kernel has mounted.

Why not mount(8): given a regular file, util-linux sets up a loop device in
front of it. EROFS can mount a file itself (file-backed mounts), and a loop
device over a FUSE file is the slow, deadlock-prone stack nbdfuse warns
against. The syscall also gives the errno, which becomes the user's error.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import time
from pathlib import Path
from typing import NamedTuple

from blockstore.errors import MissingDependency, MountError, MountpointBusy, NotPermitted
from blockstore.openers import processes_using
from nbdfront.mount.commands import printable, umount_command

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MNT_DETACH = 2
BUSY_PATIENCE = 1.0
BUSY_RETRY = 0.05

_libc = ctypes.CDLL(None, use_errno=True)


def _fail(what: str, err: int) -> MountError:
    """The error class a user can act on, for an errno of mount or umount."""
    message = f"{what}: {os.strerror(err)}"
    if err == errno.EBUSY:
        return MountpointBusy(message)
    if err in (errno.EPERM, errno.EACCES):
        return NotPermitted(message)
    if err == errno.ENODEV:
        return MissingDependency(f"{what}: the kernel has no such filesystem type")
    return MountError(message)


def mount(source: str, target: str, fstype: str, options: str = "", flags: int = 0) -> None:
    """Mount ``source`` read-only at ``target`` as ``fstype`` with ``options`` and
    ``flags`` (``MS_NOSUID``, ``MS_NODEV``, ``MS_NOEXEC``) beside ``MS_RDONLY``."""
    rc = _libc.mount(
        os.fsencode(source),
        os.fsencode(target),
        fstype.encode(),
        ctypes.c_ulong(MS_RDONLY | flags),
        options.encode() if options else None,
    )
    if rc != 0:
        raise _fail(f"mount -t {fstype} {source} {target}", ctypes.get_errno())


def umount(target: str, *, lazy: bool = False, of: str | None = None) -> None:
    """Unmount ``target``; ``lazy`` detaches it now and frees it when unused. ``of``:
    the mount point of the blockstore mount ``target`` is part of, whose lazy
    ``blockstore umount`` a refusal gives to paste.

    A busy file system is tried again for ``BUSY_PATIENCE`` seconds before it is
    called busy: a process just ending (a ``cat`` at its last read) still holds
    it for a moment, and so may the kernel, releasing what was stacked on it and
    unmounted just before (a layer's EROFS on its FUSE file).
    """
    deadline = time.monotonic() + BUSY_PATIENCE
    while _libc.umount2(os.fsencode(target), MNT_DETACH if lazy else 0) != 0:
        err = ctypes.get_errno()
        if err in (errno.EINVAL, errno.ENOENT) and not is_mounted(target):
            return  # not mounted (any more), or its directory is gone with it: undone
        if err != errno.EBUSY:
            raise _fail(f"umount {target}", err)
        inside = submounts(target)
        if inside:
            raise MountpointBusy(
                f"{target} is busy: {', '.join(inside)} mounted inside it; unmount that first"
            )
        if time.monotonic() >= deadline:
            who = processes_using(target)
            named = f" ({', '.join(who)})" if who else ""
            lazily = "unmount with --lazy" if of is None else f"`{umount_command(of, lazy=True)}`"
            raise MountpointBusy(
                f"{printable(target)} is busy: a process still uses it{named} (end it, or "
                f"{lazily}, after which what still uses it gets I/O errors)"
            )
        time.sleep(BUSY_RETRY)


_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as ``\\NNN`` octal; only those
    are undone, so other characters (UTF-8 names included) come through as they are."""
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m[1], 8)), field)


class _Mount(NamedTuple):
    point: str
    device: str  # major:minor
    fstype: str
    source: str
    options: str  # the file system's own (overlayfs: its directories)
    mount_id: str
    parent_id: str  # the mount this one is mounted on
    propagation: tuple[str, ...]  # ``shared:N``, ``master:N``: the peer groups it is tied to


def _mounts(mountinfo: str = "/proc/self/mountinfo") -> list[_Mount]:
    """Every mount of ``mountinfo`` (this process's, or another's), in its order."""
    found = []
    with open(mountinfo, encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, tail = left.split(), right.split()
            options = tail[2] if len(tail) > 2 else ""
            found.append(
                _Mount(
                    _unescape(fields[4]),
                    fields[2],
                    tail[0],
                    _unescape(tail[1]),
                    options,
                    fields[0],
                    fields[1],
                    tuple(fields[6:]),
                )
            )
    return found


def mounted() -> dict[str, tuple[str, str]]:
    """Mount point -> (filesystem type, source), from /proc/self/mountinfo."""
    return {m.point: (m.fstype, m.source) for m in _mounts()}


def users_of(mountpoints: list[str]) -> list[str]:
    """Other mounts that keep the file systems at ``mountpoints`` in use: a bind mount of
    one of them (or of a directory inside), or an overlay whose layers or upper
    directory lie in one. Unmounting ``mountpoints`` succeeds all the same (the kernel
    keeps a file system alive while any mount of it remains), so these must be found
    first: stopping the server under them would turn their reads into I/O errors."""
    ours = {_resolved(p) for p in mountpoints}
    inside = tuple(p.rstrip("/") + "/" for p in ours)
    mounts = _mounts()
    devices = {m.device for m in mounts if m.point in ours}
    return [
        m.point
        for m in mounts
        # Not ours, nor mounted inside ours (submounts() names those).
        if not (m.point in ours or m.point.startswith(inside))
        and (
            m.device in devices
            or (m.fstype == "overlay" and _overlay_uses(m.options, ours, inside))
        )
    ]


def _resolved(mountpoint: str) -> str:
    """``mountpoint`` as mountinfo names it, its directories' symlinks resolved, but not
    looked up itself: the file system mounted there is asked nothing, not even its root's
    attributes, which a FUSE file system whose daemon is stopped never gives."""
    head, name = os.path.split(mountpoint.rstrip("/"))
    return os.path.join(os.path.realpath(head), name) if name else "/"


def _overlay_uses(options: str, ours: set[str], inside: tuple[str, ...]) -> bool:
    dirs = _overlay_dirs(options, ("lowerdir", "upperdir", "workdir", "lowerdir+", "datadir+"))
    return any(path in ours or path.startswith(inside) for path in dirs)


def _overlay_dirs(options: str, keys: tuple[str, ...]) -> list[str]:
    """The directories an overlay's ``options`` name under ``keys``, as they were given."""
    dirs = []
    for option in options.split(","):
        key, _, value = option.partition("=")
        if key in keys:
            dirs += _unescape(value).split(":")
    return dirs


def held_in_other_namespaces(mountpoints: list[str]) -> list[str]:
    """A process of each other mount namespace that holds a mount of the file systems at
    ``mountpoints``, with where it is mounted there: a namespace made while they stood
    (``unshare -m``, a container) has its own copy of them, or a bind of one, which no
    unmount here takes away unless it propagates there (a peer or a slave of ours).
    Unmounted here, they would live on there on a server stopped, their reads failing."""
    table = {m.point: m for m in _mounts()}
    ours = [table[point] for p in mountpoints if (point := _resolved(p)) in table]
    rank: dict[str, int] = {}  # the first of ``mountpoints`` is named first: the top
    for m in ours:
        rank.setdefault(m.device, len(rank))
    # An unmount here propagates to the peers and the slaves of a shared mount of ours.
    groups = {
        tag[len("shared:") :] for m in ours for tag in m.propagation if tag.startswith("shared:")
    }
    tied = {f"{kind}:{group}" for kind in ("shared", "master") for group in groups}
    seen = {_namespace("self")}
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            namespace = _namespace(entry.name)
            if namespace in seen:
                continue
            there = sorted(
                (
                    m
                    for m in _mounts(f"{entry.path}/mountinfo")
                    if m.device in rank and not tied.intersection(m.propagation)
                ),
                key=lambda m: rank[m.device],
            )
            command = Path(entry.path, "comm").read_text(errors="replace").strip()
        except OSError:  # gone meanwhile
            continue
        seen.add(namespace)
        if there:
            where = f"mounted there at {there[0].point}"
            found.append(f"pid {entry.name} ({command}) in another mount namespace ({where})")
    return found


def _namespace(pid: str) -> tuple[int, int]:
    st = os.stat(f"/proc/{pid}/ns/mnt")
    return st.st_dev, st.st_ino


def loops_over(path: str) -> list[str]:
    """The loop devices whose backing file lies inside ``path``, each with where it is
    mounted: mount(8), given a regular file such as a layer's FUSE file, sets one up in
    front of it, and no process then holds the file for ``processes_using`` to find."""
    inside = os.path.realpath(path).rstrip("/") + "/"
    points: dict[str, list[str]] = {}
    for m in _mounts():
        points.setdefault(m.source, []).append(m.point)
    found = []
    for backing in sorted(Path("/sys/block").glob("loop*/loop/backing_file")):
        try:
            target = backing.read_text().rstrip("\n")
        except OSError:  # detached meanwhile
            continue
        if target.startswith(inside):
            device = f"/dev/{backing.parent.parent.name}"
            where = points.get(device)
            found.append(f"{device} (mounted at {', '.join(where)})" if where else device)
    return found


class MountedHere(NamedTuple):
    """One file system mounted at a path."""

    device: str  # major:minor: the file system's own, the same for each of its mounts
    fstype: str
    source: str
    lowers: list[str]  # an overlay's lower directories as given (relative stay relative)


def mounts_at(path: str) -> list[MountedHere]:
    """The file systems mounted at ``path``, the one on top (the one a lookup sees)
    first. The order of mountinfo's lines is not it (a moved mount keeps its place):
    a mount at the same point as another is on top of the one that is its parent."""
    point = os.path.realpath(path)
    return [
        MountedHere(m.device, m.fstype, m.source, _overlay_dirs(m.options, ("lowerdir",)))
        for m in _top_first([m for m in _mounts() if m.point == point])
    ]


def _top_first(here: list[_Mount]) -> list[_Mount]:
    """The mounts ``here``, all at one point, the one on top first."""
    above = {m.parent_id: m for m in here}
    ordered: list[_Mount] = []
    ids = {m.mount_id for m in here}
    bottom = next((m for m in here if m.parent_id not in ids), None)
    while bottom is not None and len(ordered) < len(here):
        ordered.append(bottom)
        bottom = above.get(bottom.mount_id)
    return ordered[::-1]


def hidden_by(point: str) -> str | None:
    """The mount point of a mount over a directory above ``point`` (as mountinfo writes
    it) that hides the mount on top at ``point``: mounted there after it, so a lookup of
    ``point`` goes through its tree instead, and umount2(2) of ``point`` finds no mount
    there (EINVAL) or no such path (ENOENT). None if nothing hides it."""
    everything = _mounts()
    here = _top_first([m for m in everything if m.point == point])
    if not here:
        return None
    by_id = {m.mount_id: m for m in everything}
    reached: set[str] = set()  # the mounts a lookup of ``point`` must pass through
    mount: _Mount | None = here[0]
    while mount is not None and mount.mount_id not in reached:
        reached.add(mount.mount_id)
        mount = by_id.get(mount.parent_id)
    for above in reversed(Path(point).parents):
        at = _top_first([m for m in everything if m.point == str(above)])
        if at and at[0].mount_id not in reached:
            return str(above)
    return None


def mounted_in_tree(point: str) -> list[str]:
    """The mount points of the mounts in the tree of the mount on top at ``point`` (as
    mountinfo writes it), not that one itself: those a lazy unmount of it takes down
    with it. By the mounts each is mounted on, not by path: a mount that one over a
    directory above it hides has a path inside ``point`` but is not in its tree."""
    everything = _mounts()
    here = _top_first([m for m in everything if m.point == point])
    if not here:
        return []
    by_id = {m.mount_id: m for m in everything}
    found = []
    for m in everything:
        parent, seen = by_id.get(m.parent_id), {m.mount_id}
        while parent is not None and parent.mount_id not in seen:
            if parent.mount_id == here[0].mount_id:
                found.append(m.point)
                break
            seen.add(parent.mount_id)
            parent = by_id.get(parent.parent_id)
    return found


def points_of(device: str) -> list[str]:
    """Where the file system with ``device`` (major:minor) is mounted."""
    return [m.point for m in _mounts() if m.device == device]


def is_mounted(path: str) -> bool:
    return os.path.realpath(path) in mounted()


def submounts(path: str) -> list[str]:
    """The mount points inside ``path`` (not ``path`` itself), deepest first."""
    root = os.path.realpath(path).rstrip("/") + "/"
    return sorted((p for p in mounted() if p.startswith(root)), key=len, reverse=True)
