"""Where a mount's state lives, so ``umount`` and ``mounts`` work from any process.

Each mount owns one directory under the run directory (``/run/blockstore``,
or ``$BLOCKSTORE_RUN_DIR``): the server's socket, the FUSE mount points, the
per-layer EROFS mount points, and ``record.json``, which says what to undo and
in which order. Logs go beside it, under ``log/``: a clean ``umount`` (server
stopped with status 0) removes its log, any trouble keeps it to be read after
cleaning up. /run is a tmpfs: a reboot, which also drops every mount, drops
the records with them.

A record tells ``umount`` which processes to signal and what to unmount, so
only its owner may write where it lives: the run directory and ``mounts/``
are 0755, each mount's directory (its socket, its record) and ``log/`` are
0700. A directory that another user can write, or that is not ours, is
refused when mounting, and a record in one is not believed; a run directory
or ``mounts/`` that another user can write fails ``mounts`` and ``umount``
too, since anything in it could have been planted.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from blockstore.errors import MountBeingUndone, MountError, UsageError
from blockstore.wholefile import replace_whole
from nbdfront.mount import syscall
from nbdfront.mount.attach import Attachment, known_fields
from nbdfront.mount.process import ProcessRef

RECORD_NAME = "record.json"
NEW_PREFIX = "+new-"
"""State directories being made carry this prefix (and the maker's pid) until renamed:
a ``+`` is in no mount key, so no mount point's own directory can begin with it."""


def run_dir() -> Path:
    """Where mounts are recorded: absolute, or a record made in one directory would not
    be found from another."""
    path = Path(os.environ.get("BLOCKSTORE_RUN_DIR") or "/run/blockstore")
    if not path.is_absolute():
        raise UsageError(f"BLOCKSTORE_RUN_DIR must be an absolute path, not {str(path)!r}")
    if path.exists() and not path.is_dir():
        raise MountError(
            f"the run directory {path} is not a directory: remove it, or give another as "
            "BLOCKSTORE_RUN_DIR"
        )
    return path


@contextlib.contextmanager
def run_dirs_made() -> Iterator[None]:
    """Make (or check) the run directory, ``mounts/`` and ``log/`` for a mount being made
    inside this block; if the block fails, remove those of them (and of the run
    directory's parents) it made that are still empty, so a failed first mount leaves
    no trace.

    A shared flock on the run directory is held meanwhile: the removal takes it
    exclusively, without waiting, so it never pulls a directory from under another
    mount being made (that one holds it shared until it is made or undone)."""
    run = run_dir()
    made: list[Path] = []
    fd = _held_run_dir(run, made)
    try:
        for path, mode in ((run / "mounts", 0o755), (run / "log", 0o700)):
            if make_private_dir(path, mode, exist_ok=True):
                made.append(path)
        os.chmod(run / "log", 0o700)  # ours: an older version made it readable by all
        yield
    except BaseException:
        _remove_if_alone(fd, made)
        raise
    finally:
        os.close(fd)


_CANNOT_WRITE = {
    errno.ENOSPC: "free space on its disk",
    errno.EDQUOT: "free space on its disk",
    errno.EROFS: "make its disk writable",
}


@contextlib.contextmanager
def writes_named() -> Iterator[None]:
    """A write in the run directory that finds its disk full or read-only, as a
    MountError naming the run directory: the system's words alone ("No space left on
    device", with no file) leave the user to guess which disk to free, the cache's most
    likely."""
    try:
        yield
    except OSError as exc:
        run = run_dir()
        where = str(run) if exc.filename is None else os.fsdecode(exc.filename)  # a write()
        if exc.errno not in _CANNOT_WRITE or not f"{where}/".startswith(f"{run}/"):
            raise
        raise MountError(
            f"cannot write in the run directory {run}, where mounts keep their records, "
            f"sockets and logs: {exc.strerror}; {_CANNOT_WRITE[exc.errno]}, or give another "
            "as BLOCKSTORE_RUN_DIR"
        ) from None


ROOM = 64 << 10
"""Bytes a mount wants free on the run directory's disk: what it and the processes it
starts write there (its record, their pidfiles, the server's exit status, a directory or
two per layer), with room to spare. The processes fail in words of their own that name
no disk ("the server exited with status 1", its log empty; nbdfuse not attached in
time), so a mount checks first, and again when a step fails."""


def check_room(directory: Path) -> None:
    """Raise the OSError (a full disk, over quota, read-only) that a write of ``ROOM``
    bytes in ``directory`` meets; ``writes_named`` says it naming the run directory.
    The bytes go to a file with no name (``O_TMPFILE``): a mount killed while writing
    them leaves nothing that would keep a failed first mount from removing the run
    directory."""
    try:
        fd = os.open(directory, os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno != errno.EOPNOTSUPP:
            raise
        _check_free_space(directory)
        return
    try:
        with open(fd, "wb", closefd=False) as probe:
            probe.write(bytes(ROOM))
    finally:
        os.close(fd)


def _check_free_space(directory: Path) -> None:
    """``check_room`` on a file system with no files without a name (NFS, most FUSE ones):
    its free space and read-only flag as it tells them, so a quota goes unseen there."""
    disk = os.statvfs(directory)
    if disk.f_flag & os.ST_RDONLY:
        code = errno.EROFS
    elif disk.f_bavail * disk.f_frsize < ROOM:
        code = errno.ENOSPC
    else:
        return
    raise OSError(code, os.strerror(code), os.fspath(directory))


@contextlib.contextmanager
def failures_for_room(directory: Path) -> Iterator[None]:
    """A step of a mount that fails while ``directory`` has no ``ROOM`` left, as that
    failure: its disk filled up after the mount began (``check_room``)."""
    try:
        yield
    except MountError:
        check_room(directory)
        raise


RUN_DIR_TRIES = 10
"""Times the run directory is made again when a failed mount removed it meanwhile."""


def _held_run_dir(run: Path, made: list[Path]) -> int:
    """The run directory, made with its parents if missing (each noted in ``made``),
    open and flocked shared; made again if a failed mount removed it meanwhile."""
    for _ in range(RUN_DIR_TRIES):
        try:
            for path in reversed(run.parents):
                if not path.is_dir() and _make_dir(path) and path not in made:
                    made.append(path)
            if make_private_dir(run, 0o755, exist_ok=True) and run not in made:
                made.append(run)
            fd = os.open(run, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:  # removed by a failed mount as it was made
            continue
        fcntl.flock(fd, fcntl.LOCK_SH)
        with contextlib.suppress(OSError):
            if os.path.samestat(os.fstat(fd), os.stat(run)):
                return fd
        os.close(fd)
    raise MountError(f"the run directory {run} was removed each time it was made")


def _make_dir(path: Path) -> bool:
    """Make ``path``; whether it was made here (False: another process made it)."""
    try:
        path.mkdir()
        return True
    except FileExistsError:
        if path.is_dir():
            return False
        raise MountError(
            f"{path} is not a directory, so the run directory cannot be made in it: "
            "give another as BLOCKSTORE_RUN_DIR"
        ) from None


def _remove_if_alone(fd: int, made: list[Path]) -> None:
    """Remove the directories in ``made`` (made in that order) that are empty, unless
    another mount holds the run directory (``fd``)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return
    for path in reversed(made):
        try:
            path.rmdir()
        except OSError:  # not empty: a log kept to be read, another's record
            return


def make_private_dir(path: Path, mode: int, *, exist_ok: bool = False) -> bool:
    """Make ``path`` with exactly ``mode`` (the umask aside), or check the one there is ours
    and writable by nobody else; raises FileExistsError for an existing one unless
    ``exist_ok``. Whether it was made now."""
    try:
        path.mkdir(mode=mode)
        os.chmod(path, mode)
        return True
    except FileExistsError:
        if not exist_ok:
            raise
    if not is_private(path):
        raise MountError(
            f"{path} is not a directory of this user's that only it can write: "
            "give a run directory that is (BLOCKSTORE_RUN_DIR)"
        )
    return False


def is_private(path: Path) -> bool:
    """A directory of ours (not a link to one) that no other user can write."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o022


def mount_key(mountpoint: str) -> str:
    """A file name for a mount point: readable, and unique thanks to a short hash.

    Short (at most 31 characters), because the server's socket path goes through it and
    a Unix socket's path has 107 bytes at most."""
    readable = re.sub(r"[^A-Za-z0-9_.-]+", "-", mountpoint).strip("-")[-20:] or "root"
    return f"{readable}-{hashlib.sha256(os.fsencode(mountpoint)).hexdigest()[:10]}"


def state_dir_for(mountpoint: str) -> Path:
    return run_dir() / "mounts" / mount_key(mountpoint)


def log_path_for(mountpoint: str) -> Path:
    return run_dir() / "log" / f"{mount_key(mountpoint)}.log"


@dataclass
class MountRecord:
    """Everything a mount left behind, in the order ``umount`` must undo it.

    ``lowers`` are the per-layer EROFS mount points under an overlay (bottom
    first); empty when the only layer is mounted at ``mountpoint`` itself.
    ``mounted`` says the top mount at ``mountpoint`` was made (and so is ours);
    ``top_device`` is its device (major:minor), by which ``umount`` knows it.
    ``info`` belongs to the command that made the mount (image, layers,
    cache directory) and is shown back by ``mounts``. ``mounter`` is the
    ``mount`` command while it is still at work (None once the mount is made):
    a record whose mounter lives is a mount in progress, not a dead one.
    """

    mountpoint: str
    image: str
    method: str
    state_dir: str
    log: str
    server: ProcessRef | None = None
    mounter: ProcessRef | None = None
    socket: str | None = None
    attachments: list[Attachment] = field(default_factory=list)
    lowers: list[str] = field(default_factory=list)
    overlay: bool = False
    mounted: bool = False
    top_device: str | None = None
    mount_seconds: float | None = None
    metrics: str | None = None  # the server's metrics URL (``mount --metrics``)
    suid: bool = False  # the image's setuid bits honoured (``-o suid``)
    dev: bool = False  # the image's device files opened (``-o dev``)
    exec: bool = True  # the image's programs run (unless ``-o noexec``)
    info: dict = field(default_factory=dict)

    @property
    def mounting(self) -> bool:
        """The ``mount`` command that made the record is still at work."""
        return self.mounter is not None and self.mounter.alive()

    def to_json(self) -> str:
        data = dict(self.__dict__)
        data["server"] = self.server.to_record() if self.server else None
        data["mounter"] = self.mounter.to_record() if self.mounter else None
        data["attachments"] = [a.to_record() for a in self.attachments]
        return json.dumps(data, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> MountRecord:
        """The record in ``text``; fields this version does not know (a newer version's
        record) are left out, so its mount is still listed and undone."""
        data = known_fields(cls, json.loads(text))
        data["server"] = ProcessRef.from_record(data["server"]) if data.get("server") else None
        data["mounter"] = ProcessRef.from_record(data["mounter"]) if data.get("mounter") else None
        data["attachments"] = [Attachment.from_record(a) for a in data.get("attachments", [])]
        return cls(**data)


def create(record: MountRecord) -> None:
    """Make the record's state directory with the record in it, or raise
    FileExistsError if the mount point has one: of two mounts racing for it, one goes
    on. The directory is made and written under a name of its own, then renamed into
    place, so a state directory is never without its record, whatever moment the
    command is killed at; a half-made one left by a killed command is removed here."""
    state_dir = Path(record.state_dir)
    for left in state_dir.parent.glob(f"{NEW_PREFIX}*"):
        pid = left.name.rpartition("-")[2]
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            shutil.rmtree(left, ignore_errors=True)
    new = state_dir.parent / f"{NEW_PREFIX}{state_dir.name}-{os.getpid()}"
    shutil.rmtree(new, ignore_errors=True)  # this process's own, from an earlier try
    make_private_dir(new, 0o700)  # owner-only: it will hold the server's socket
    try:
        (new / RECORD_NAME).write_text(record.to_json())
        try:
            os.rename(new, state_dir)  # fails if the state directory holds anything
        except OSError as exc:
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR):
                raise FileExistsError(exc.errno, exc.strerror, str(state_dir)) from None
            raise
    finally:
        shutil.rmtree(new, ignore_errors=True)


def discard(state_dir: Path, record: MountRecord | None) -> None:
    """Remove ``state_dir``, left by a mount of which nothing is left, if it still holds
    ``record`` (None: one that does not parse): of two mounts that found it so at once,
    one removes it, and the other must not remove the state directory the first has
    made since. Moved aside under an exclusive flock of the directory, which the other
    cannot take meanwhile, then removed. Raises MountBeingUndone while another process
    holds that flock: it removes the directory, or ``umount`` finishes with it
    (``held_for_undoing``)."""
    try:
        fd = os.open(state_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        _lock_against_others(fd, state_dir)
        if os.path.samestat(os.fstat(fd), os.lstat(state_dir)) and (
            _read(state_dir / RECORD_NAME) == record
        ):
            aside = state_dir.parent / f"{NEW_PREFIX}stale-{state_dir.name}-{os.getpid()}"
            os.rename(state_dir, aside)
            shutil.rmtree(aside, ignore_errors=True)
    except FileNotFoundError:
        return  # another process has removed it
    finally:
        os.close(fd)


@contextlib.contextmanager
def held_for_undoing(state_dir: Path) -> Iterator[None]:
    """Hold ``state_dir`` (its exclusive flock) while its mount is undone, its log and
    record dealt with: once its steps are undone nothing of it is left to see, and a
    mount at the same place would otherwise clear its record as one of a crash and
    begin at the very paths the undoing is about to remove (``discard``)."""
    try:
        fd = os.open(state_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        yield
        return
    try:
        _lock_against_others(fd, state_dir)
        yield
    finally:
        os.close(fd)


def _lock_against_others(fd: int, state_dir: Path) -> None:
    """The exclusive flock of the state directory open as ``fd``, or MountBeingUndone."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise MountBeingUndone(
            f"the mount whose state is in {state_dir} is being unmounted, or its record "
            "cleared, by another blockstore process: try again once it is done"
        ) from None


def save(record: MountRecord) -> None:
    """Write the record atomically: a reader sees the old one or the new one."""
    replace_whole(Path(record.state_dir) / RECORD_NAME, record.to_json().encode(), ".tmp")


def _believable(run: Path) -> None:
    """Refuse a run directory, or its ``mounts/``, that a user other than this one (or
    root) could write: anything there could have been planted or swapped, records
    naming processes for ``umount`` to signal included. ``mount`` refuses to use such a
    directory; reading records from it is refused the same way, not passed over, so
    that ``mounts`` does not say there are none while mounts are up."""
    for path in (run, run / "mounts"):
        try:
            st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            continue
        if st.st_mode & 0o022 or st.st_uid not in (os.geteuid(), 0):
            raise MountError(
                f"{path} can be written by another user, so no mount record in it is "
                f"believed: make it writable by its owner alone (chmod go-w {path})"
            )


def load(mountpoint: str) -> MountRecord | None:
    """The record of ``mountpoint``; None if there is none, or none to be believed."""
    _believable(run_dir())
    state_dir = state_dir_for(mountpoint)
    if is_private(state_dir) and (record := _read(state_dir / RECORD_NAME)) is not None:
        return record
    # Made by a version that named the directory otherwise.
    return next((record for record in saved() if record.mountpoint == mountpoint), None)


def saved() -> list[MountRecord]:
    """Every mount recorded on this machine, sorted by mount point."""
    found = []
    run = run_dir()
    _believable(run)
    for path in sorted((run / "mounts").glob(f"*/{RECORD_NAME}")):
        if path.parent.name.startswith(NEW_PREFIX) or not is_private(path.parent):
            continue
        if (record := _read(path)) is not None:
            found.append(record)
    return sorted(found, key=lambda r: r.mountpoint)


def _read(path: Path) -> MountRecord | None:
    """The record at ``path``; None if it is gone (torn down right now) or damaged (cut
    short by a crash, edited by hand): records are written whole and renamed into place,
    so one that does not parse is not being written, and its mount is undone as one
    whose record is gone."""
    try:
        return MountRecord.from_json(path.read_text())
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None


def forget(record: MountRecord) -> None:
    """Drop the record and its state directory, unless something is still mounted in it."""
    inside = record.state_dir.rstrip("/") + "/"
    if any(point.startswith(inside) for point in syscall.mounted()):
        return
    shutil.rmtree(record.state_dir, ignore_errors=True)
