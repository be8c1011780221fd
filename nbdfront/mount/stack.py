"""Mount, unmount and list: the whole stack from an NBD server to a directory.

``mount`` starts the server, attaches each layer's export (kernel NBD or
nbdfuse), mounts each layer's EROFS, stacks several layers with a read-only
overlayfs (last layer on top, so its whiteouts hide files of the layers
below), and records every step so ``unmount`` can undo them from another
process. A failure at any step undoes the steps before it: a failed mount
leaves nothing behind but its log, and an interrupted one not even that
unless it holds a warning or an error.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shlex
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from blockstore.errors import MountError, MountpointBusy, NotPermitted
from blockstore.logformat import count_trouble, last_trouble
from blockstore.openers import processes_using
from nbdfront.mount import attach, dirattrs, records, syscall
from nbdfront.mount.process import ProcessRef
from nbdfront.mount.records import MountRecord
from nbdfront.mount.server import layer_exports, start_server
from nbdfront.mount.supervisor import STOP_GRACE, ServerExit, read_status
from nbdfront.socketpath import overlong_socket_path

logger = logging.getLogger(__name__)

# Where the server's exit status is written, in the mount's state directory.
SERVER_STATUS = "serve.status"
EMPTY_LOWER = "empty-lower"  # the layer an overlay of one visible layer is given
ATTRIBUTES_LOWER = "dir-attributes"  # the top layer that keeps lower directories' attributes

SERVER_STOP_TIMEOUT = STOP_GRACE + 3.0
"""Seconds ``umount`` waits for the supervisor: the server's grace, then time for the
supervisor to kill it and write how it ended. Past that the supervisor is killed too,
with all it started, and the server is said to have been killed."""

# Called with the export names (bottom layer first) once the server is ready;
# returns what the record's ``info`` should hold.
Describe = Callable[[list[str]], dict]


def check_can_mount(mountpoint: str, *, tls: bool = False) -> str:
    """The attach method to use, after the checks a user can act on; raises otherwise.
    ``tls``: the server will speak TLS (see ``attach.choose_method``)."""
    if os.geteuid() != 0:
        raise NotPermitted("mounting needs root: run it with sudo")
    length, path_max = len(os.fsencode(mountpoint)), os.pathconf("/", "PC_PATH_MAX")
    if length >= path_max:  # said first: a lookup of it fails as if it were not there
        raise MountError(
            f"mountpoint {printable(mountpoint)} is {length} bytes long, longer than the "
            f"{path_max - 1} bytes the kernel takes for a path: choose a shorter one"
        )
    if not os.path.exists(mountpoint):
        raise MountError(
            f"mountpoint {mountpoint} does not exist: make it first "
            f"(mkdir -p {shlex.quote(mountpoint)})"
        )
    if not os.path.isdir(mountpoint):
        raise MountError(f"mountpoint {mountpoint} is not a directory")
    if syscall.is_mounted(mountpoint):
        raise MountpointBusy(_already_mounted(mountpoint))
    run = records.run_dir()
    if overlaps(mountpoint, run):
        raise MountError(
            f"mountpoint {mountpoint} would cover the run directory {run} or lie in it, "
            "where mounts keep their records, sockets and FUSE files: choose another directory"
        )
    _clear_a_record_left_alone(mountpoint)
    return attach.choose_method(tls=tls)


def _clear_a_record_left_alone(mountpoint: str) -> None:
    """Refuse ``mountpoint`` while a mount recorded there is made or stands, in part too;
    clear its record, damaged or not, when nothing of that mount is left (a reboot with
    the run directory kept, a crash), which would otherwise keep the place for good."""
    state_dir = records.state_dir_for(mountpoint)
    if (record := records.load(mountpoint)) is not None:
        if record.mounting:
            assert record.mounter is not None
            raise MountpointBusy(
                f"{mountpoint} is being mounted by blockstore (pid {record.mounter.pid})"
            )
        if not _left_nothing(record):
            raise MountpointBusy(
                f"{mountpoint} has a mount record already; `{umount_command(mountpoint)}` clears it"
            )
        state_dir = Path(record.state_dir)  # an older version's may be named otherwise
        cleared = f"the record of an earlier mount of {record.image}"
    elif records.is_private(state_dir):  # a record that does not parse
        if (standing := _unrecorded(mountpoint)) is not None:
            left = (
                "its server still runs"
                if standing.server is not None
                else "part of that mount is still mounted"
            )
            raise MountpointBusy(
                f"{mountpoint} has a damaged mount record, and {left}; "
                f"`{umount_command(mountpoint)}` clears it"
            )
        cleared = "the damaged record of an earlier mount"
    else:
        return
    with records.writes_named():  # a disk that became read-only since, say
        records.discard(state_dir, record)
    logger.warning(
        "cleared %s at %s, of which nothing was left (its processes ended and nothing of "
        "it mounted: a reboot, or a crash)",
        cleared,
        printable(mountpoint),
    )


def _left_nothing(record: MountRecord) -> bool:
    """Whether nothing of the recorded mount stands, so its record only keeps its place
    (a reboot with the run directory kept, a crash): nothing mounted at its mount point
    or in its state directory, none of its processes alive. A kernel NBD device may stay
    connected with all that gone, which only ``umount`` disconnects."""
    processes = [record.server, *(a.process for a in record.attachments)]
    return (
        not syscall.is_mounted(record.mountpoint)
        and not syscall.submounts(record.state_dir)
        and not any(process is not None and process.alive() for process in processes)
        and _supervisor_of(Path(record.state_dir)) is None
        and all(a.method != attach.KERNEL for a in record.attachments)
    )


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def printable(path: str) -> str:
    """``path`` with control characters written ``\\xNN``, as findmnt writes them: a
    newline in a mount point would break its line in two, and the table with it."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m[0]):02x}", path)


def shell_word(path: str) -> str:
    """``path`` as one word the shell reads back as it is, for a command to copy: quoted
    where it needs it, and a name with control characters as ``$'...\\xNN...'``, which
    stays on one line."""
    if not _CONTROL.search(path):
        return shlex.quote(path)
    escaped = printable(path.replace("\\", "\\\\").replace("'", "\\'"))
    return f"$'{escaped}'"


def umount_command(mountpoint: str, run_dir: str | None = None) -> str:
    """The ``blockstore umount`` that undoes the mount at ``mountpoint``, as one line to
    paste into a shell; ``run_dir``: the run directory that mounted it, when not this
    one's."""
    command = f"blockstore umount {shell_word(mountpoint)}"
    return command if run_dir is None else f"BLOCKSTORE_RUN_DIR={shell_word(run_dir)} {command}"


def overlaps(mountpoint: str, path: str | Path) -> bool:
    """Whether a mount at ``mountpoint`` would cover ``path`` or lie in it: one is the
    other, or a directory the other lies in."""
    here, there = os.path.realpath(mountpoint), os.path.realpath(path)
    return (
        here == there
        or there.startswith(here.rstrip("/") + "/")
        or here.startswith(there.rstrip("/") + "/")
    )


def _already_mounted(mountpoint: str) -> str:
    """What is mounted at ``mountpoint``, and how to free it: one of ours is undone with
    ``blockstore umount`` (given the run directory that mounted it); another file system
    is the user's to unmount, or to keep."""
    record = records.load(mountpoint) or _moved_to(mountpoint)
    if record is not None:
        return (
            f"{mountpoint} is already a mount point: blockstore mounted {record.image} there; "
            f"`{umount_command(mountpoint)}` first"
        )
    if records.is_private(records.state_dir_for(mountpoint)):
        return (
            f"{mountpoint} is already a mount point: blockstore mounted an image there whose "
            f"record is gone or damaged; `{umount_command(mountpoint)}` first"
        )
    if (other := _run_dir_of(mountpoint)) is not None:
        return (
            f"{mountpoint} is already a mount point: blockstore mounted an image there with "
            f"another run directory; `{umount_command(mountpoint, other)}` first"
        )
    top = syscall.mounts_at(mountpoint)
    what = f" ({top[0].fstype} from {top[0].source})" if top else ""
    return (
        f"{mountpoint} is already a mount point{what}: unmount it first, or choose another "
        "directory"
    )


def mount(
    server_argv: list[str],
    mountpoint: str,
    *,
    image: str,
    env: dict[str, str] | None = None,
    describe: Describe | None = None,
    warn: Callable[[str], None] | None = None,
    tls: bool = False,
    suid: bool = False,
    dev: bool = False,
    exec: bool = True,
) -> MountRecord:
    """Start ``server_argv`` (it gets ``--unix SOCK --pidfile PID --ready-fd N`` appended)
    and mount its exports. ``tls``: ``server_argv`` makes it speak TLS. ``suid``,
    ``dev``, ``exec``: honour the image's setuid bits, open its device files, run its
    programs (see ``_flags``).

    ``warn`` is given each warning the server logged before it was ready.
    Returns the saved record once ``mountpoint`` shows the image's tree.
    """
    started_at = time.monotonic()
    mountpoint = os.path.realpath(mountpoint)
    method = check_can_mount(mountpoint, tls=tls)
    state_dir = records.state_dir_for(mountpoint)
    log = records.log_path_for(mountpoint)
    socket = state_dir / "serve.sock"
    record = MountRecord(
        mountpoint=mountpoint,
        image=image,
        method=method,
        state_dir=str(state_dir),
        log=str(log),
        socket=str(socket),
        mounter=ProcessRef.of(os.getpid()),
        suid=suid,
        dev=dev,
        exec=exec,
    )
    # Held (shared) for the whole mount, registry waits included: a failure anywhere in
    # it removes what it made of the run directory, as of the rest. Only that removal
    # takes the lock exclusively, and without waiting: a mount waits at most for the
    # few rmdir calls of one, never for another mount.
    with records.writes_named(), records.run_dirs_made():
        interrupts = _Interrupts()
        created = False
        try:
            # Installed before the record exists: a signal from here on is held until the
            # mount can be undone, never ending the command between two of its steps.
            with interrupts.installed():
                records.check_room(state_dir.parent)
                _check_socket_fits(socket)  # a disk that takes nothing is said first
                try:
                    records.create(record)
                except FileExistsError:
                    raise MountpointBusy(
                        f"{mountpoint} is being mounted by another blockstore process "
                        f"(if none runs, a crashed one left {state_dir}: remove it)"
                    ) from None
                created = True
                with records.failures_for_room(state_dir):
                    _make(record, server_argv, env, describe, warn, interrupts)
                record.mount_seconds = round(time.monotonic() - started_at, 3)
                record.mounter = None
                records.save(record)
        except BaseException as exc:
            if created:
                try:
                    take_down(record, lazy=True)
                except Exception:
                    logger.exception("could not undo the failed mount of %s", mountpoint)
                    record.mounter = None  # not "mounting" for as long as this process lives
                    records.save(record)
                else:
                    if isinstance(exc, KeyboardInterrupt):
                        _drop_untroubled_log(Path(record.log))
                    records.forget(record)
            raise
    return record


def _check_socket_fits(socket: Path) -> None:
    """Refuse a run directory so deep that the server's socket in it cannot be named in a
    Unix socket address: the server would fail to listen only once started, in words
    that leave the user to guess which directory to change."""
    if (why := overlong_socket_path(socket)) is not None:
        raise MountError(
            f"the run directory {records.run_dir()} is too deep for the mount's server "
            f"socket ({why}): set BLOCKSTORE_RUN_DIR to a shorter directory"
        )


def _drop_untroubled_log(log: Path) -> None:
    """A mount undone at the user's word keeps its log only for a warning or an error in
    it, as ``umount`` does: nothing failed, so nothing else is worth a file."""
    if count_trouble(log) == 0:
        log.unlink(missing_ok=True)


def _make(
    record: MountRecord,
    server_argv: list[str],
    env: dict[str, str] | None,
    describe: Describe | None,
    warn: Callable[[str], None] | None,
    interrupts: _Interrupts,
) -> None:
    """Every step of ``mount`` once its record exists, each saved in it as it is made;
    a signal held during a step is raised once the step is recorded."""
    state_dir = Path(record.state_dir)
    socket = state_dir / "serve.sock"

    def spawned(server: ProcessRef) -> None:
        record.server = server
        records.save(record)

    argv = [*server_argv, "--unix", str(socket), "--pidfile", str(state_dir / "serve.pid")]
    server = start_server(
        argv,
        Path(record.log),
        state_dir / SERVER_STATUS,
        env=env,
        spawned=spawned,
        waiting=interrupts.waiting,
    )
    with contextlib.suppress(FileNotFoundError):  # its directory keeps others out meanwhile
        os.chmod(socket, 0o600)
    record.server = server.process
    record.metrics = server.metrics
    records.save(record)
    interrupts.check()
    logger.info("server pid %d ready: %s", server.process.pid, server.exports)
    if warn is not None:
        for warning in server.warnings:
            warn(warning)
    layers = layer_exports(server.exports)
    shown = set(server.warnings)
    for name, uri in layers:
        try:
            attached = attach.attach(uri, name, state_dir, Path(record.log), record.method)
        except MountError as exc:
            # nbdfuse says only that it timed out; the server's log may say why.
            raise MountError(_with_trouble(str(exc), Path(record.log), shown)) from None
        record.attachments.append(attached)
        records.save(record)
        logger.info("attached %s via %s as %s", uri, record.method, attached.device)
        interrupts.check()
    if describe is not None:
        record.info = describe([name for name, _ in layers])
    _mount_layers(record, interrupts.check, shown, alone=not _holds_tar_layer(record.info))
    records.save(record)


def _holds_tar_layer(info: dict) -> bool:
    """Whether the record's layers (as ``describe`` told them) include a tar layer."""
    # Here, not at the top: the registry package loads its HTTP stack, which commands
    # that only look at mounts (``mounts``, ``umount``) must not pay for.
    from blockstore.registry.mediatypes import layer_kind

    return any(layer_kind(layer.get("mediaType") or "") for layer in info.get("layers", []))


class _Interrupts:
    """Ctrl-C, SIGTERM and SIGHUP (a closed terminal) while a mount is made: each undoes it.

    Raised (as KeyboardInterrupt) at once only while the mount waits for its
    server, when all made so far is recorded. During a step (a spawn, an attach,
    a mount(2) that may wait on the registry) a signal is held and raised once
    the step is done and recorded: raised inside it, it would leave what the step
    made where the undo cannot find it. The default of SIGTERM and SIGHUP, ending
    the process at once, would leave the server running and the record half made.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self._held = False
        self._waiting = False

    def _arrived(self, _signum: int, _frame: object) -> None:
        if self._waiting:
            self._waiting = False
            raise KeyboardInterrupt
        self._held = True

    def check(self) -> None:
        """Raise a signal that came during the step just recorded."""
        if self._held:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def waiting(self) -> Iterator[None]:
        """A wait that a signal may break at once."""
        self.check()
        self._waiting = True
        try:
            yield
        finally:
            self._waiting = False

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """The handlers, for the making of one mount (on the main thread: others cannot
        set them). One that came as they were put back is raised after."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {signum: signal.signal(signum, self._arrived) for signum in self.SIGNALS}
        try:
            yield
        finally:
            self._waiting = False  # from here a signal is only held, never raised
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        self.check()


def _mount_layers(
    record: MountRecord, check: Callable[[], None], shown: set[str], *, alone: bool = True
) -> None:
    """EROFS at the mount point for one layer (if ``alone`` lets it); else EROFS per layer
    under an overlay. A tar layer's image marks its whiteouts, opaque and implied
    directories for overlayfs, which alone hides those marks and applies them: even one
    such layer goes under an overlay, or alone where overlayfs refuses it. ``check``
    after each mount is recorded.
    ``shown``: the server's warnings the user has seen already."""
    devices = [a.device for a in record.attachments]
    log = Path(record.log)
    if len(devices) == 1 and alone:
        _mount_erofs(devices[0], record.mountpoint, log, shown, _flags(record))
        record.mounted = True
        record.top_device = syscall.mounts_at(record.mountpoint)[0].device
        return
    for attachment in record.attachments:
        lower = Path(record.state_dir) / f"layer-{attachment.export}"
        lower.mkdir(exist_ok=True)
        _mount_erofs(attachment.device, str(lower), log, shown, _flags(record))
        record.lowers.append(str(lower))
        records.save(record)
        check()
    visible = _visible(record.lowers)
    if len(visible) > 1 and _attribute_layer(visible, Path(record.state_dir) / ATTRIBUTES_LOWER):
        visible.append(str(Path(record.state_dir) / ATTRIBUTES_LOWER))
    if len(visible) == 1:  # overlayfs wants two lower layers at least: an empty one
        empty = Path(record.state_dir) / EMPTY_LOWER
        empty.mkdir(exist_ok=True)
        visible.insert(0, str(empty))
    # overlayfs lists lower directories top first; with no upperdir it is read-only. The
    # names are relative to the state directory, the working directory for the call:
    # the kernel takes a page of mount options at most, which absolute paths would
    # fill at about 40 layers.
    lowerdir = ":".join(os.path.relpath(p, record.state_dir) for p in reversed(visible))
    try:
        with _working_directory(record.state_dir):
            options = f"lowerdir={lowerdir}"
            syscall.mount("overlay", record.mountpoint, "overlay", options, _flags(record))
    except MountError as exc:
        if len(devices) > 1:
            raise
        _mount_lone_layer_bare(record, exc, shown)
        return
    record.mounted = record.overlay = True
    record.top_device = syscall.mounts_at(record.mountpoint)[0].device
    logger.info("overlayfs at %s over %s", record.mountpoint, lowerdir)


def _mount_lone_layer_bare(record: MountRecord, refused: MountError, shown: set[str]) -> None:
    """Mount a lone tar layer's EROFS at the mount point as it is, as blockstore did
    before it stacked one under overlayfs, when overlayfs refuses the stack (not in the
    kernel, or the run directory too deeply stacked already): a mount that shows the
    layer's whiteouts and marks for overlayfs beats none."""
    (lower,) = record.lowers
    syscall.umount(lower)
    record.lowers.clear()
    records.save(record)
    with contextlib.suppress(OSError):
        os.rmdir(lower)
    logger.warning(
        "overlayfs refused to stack the tar layer (%s): mounted as it is, so its "
        "whiteouts show as character devices and its trusted.overlay.* attributes show",
        refused,
    )
    _mount_layers(record, lambda: None, shown, alone=True)


def _attribute_layer(visible: list[str], into: Path) -> bool:
    """``dirattrs.attribute_layer``; one that cannot be made leaves the implied
    directories as overlayfs shows them, with a warning, rather than no mount."""
    try:
        return dirattrs.attribute_layer(visible, into)
    except OSError as exc:
        logger.warning("directories a layer only implies show as 0755 of root: %s", exc)
        return False


@contextlib.contextmanager
def _working_directory(path: str) -> Iterator[None]:
    back = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.chdir(path)
        yield
    finally:
        os.fchdir(back)
        os.close(back)


def _visible(lowers: list[str]) -> list[str]:
    """The layers (bottom first) the merged tree can show: from the top one whose root
    is opaque (``.wh..wh..opq`` at a layer's root) up. overlayfs ignores an opaque root,
    so the layers under it are left out of the stack instead; they stay mounted, as
    the record says, and come down with the rest."""
    start = 0
    for i, lower in enumerate(lowers):
        with contextlib.suppress(OSError):  # no such xattr, or none at all
            if os.getxattr(lower, dirattrs.OPAQUE_XATTR) == b"y":
                start = i
    return lowers[start:]


def _flags(record: MountRecord) -> int:
    """``nosuid`` and ``nodev`` unless asked otherwise, as mount(8) makes a user's
    mounts: the image is whatever its pusher made it, and a setuid-root shell or a
    device file of its own would serve any local user who can reach the mount point.
    ``noexec`` only when asked for, as mount(8) takes it."""
    return (
        (0 if record.suid else syscall.MS_NOSUID)
        | (0 if record.dev else syscall.MS_NODEV)
        | (0 if record.exec else syscall.MS_NOEXEC)
    )


def _mount_erofs(device: str, target: str, log: Path, shown: set[str], flags: int) -> None:
    """``mount -t erofs``; its error says what the server's log holds of the cause (the
    kernel says only EINVAL or EIO: a read the registry failed, bytes that are no EROFS
    image), unless the user was shown it already (``shown``)."""
    try:
        syscall.mount(device, target, "erofs", flags=flags)
    except MountError as exc:
        message = str(exc)
        if "Invalid argument" in message:
            message += " (is the layer an EROFS image?)"
        raise MountError(_with_trouble(message, log, shown)) from None


def _with_trouble(message: str, log: Path, shown: set[str]) -> str:
    """``message`` and the server's last warning in ``log``, with the log's path, unless
    the user was shown that warning already (``shown``)."""
    if (trouble := last_trouble(log)) is not None and trouble not in shown:
        message += f"; the server's last warning: {trouble} (its log: {log})"
    return message


@dataclass
class MountStatus:
    record: MountRecord
    mounted: bool
    server_alive: bool
    attached: bool
    recorded: bool = True
    """False: the record is gone and ``record`` was read back from what the kernel shows
    (``_unrecorded``), which names no image, layers or attach method."""
    hidden_by: str | None = None
    """Where the mount that hides its tree is: over a directory above it, or over it at
    its own mount point (then that); None if none does."""
    record_damaged: bool = False
    """Not recorded because its record does not parse (a crash, an edit), not gone."""

    @property
    def state(self) -> str:
        """``ok``, ``mounting``, or what broke: a user reads it to decide to unmount and
        mount again. A hidden mount is said so first: nothing else can be done to it
        until the mount that hides it is gone."""
        if not self.recorded:
            return "record damaged" if self.record_damaged else "record gone"
        if self.record.mounting:
            return "mounting"
        if not self.mounted:
            return "not mounted"
        if self.hidden_by is not None:
            return "hidden"
        if self.record.server is not None and not self.server_alive:
            return "server dead"
        if not self.attached:
            return "nbdfuse dead"
        return "ok"


def status(record: MountRecord, *, recorded: bool = True) -> MountStatus:
    """How the recorded mount stands, by what the kernel shows: its own top mount at the
    mount point, not merely some mount there (the user's, made in its place or over it)."""
    where = _where_ours_is(record)
    return MountStatus(
        record,
        mounted=where != "absent",
        server_alive=record.server is not None and record.server.alive(),
        attached=all(a.process is None or a.process.alive() for a in record.attachments),
        recorded=recorded,
        hidden_by=_hider(record, where),
        record_damaged=not recorded and (Path(record.state_dir) / records.RECORD_NAME).exists(),
    )


def list_mounts() -> list[MountStatus]:
    """Every mount blockstore made here, those whose record is gone too (``umount``
    undoes them all the same). Only root mounts, and its records are root's alone:
    another user would see none and be told there are none."""
    if os.geteuid() != 0:
        raise NotPermitted("listing mounts needs root: run it with sudo")
    found = [status(_followed(r)) for r in records.saved()]
    known = {st.record.mountpoint for st in found}
    found += [status(r, recorded=False) for r in _unrecorded_mounts(known)]
    return sorted(found, key=lambda st: st.record.mountpoint)


def other_run_dirs() -> dict[str, int]:
    """Run directories other than this one with mounts standing, and how many: ``mounts``
    lists only this one's, so a mount made with another (a ``sudo`` that dropped
    BLOCKSTORE_RUN_DIR) would otherwise look like none."""
    here = os.path.realpath(records.run_dir())
    found: dict[str, set[str]] = {}
    for run, key in _standing_state_dirs():
        if run != here and records.is_private(Path(run, "mounts", key)):
            found.setdefault(run, set()).add(key)
    return {run: len(keys) for run, keys in sorted(found.items())}


def _unrecorded_mounts(known: set[str]) -> list[MountRecord]:
    """The mounts at mount points not in ``known`` whose state directory is there without
    its record (the run directory cleared while they were mounted), as ``_unrecorded``
    reads them back."""
    inside = str(records.run_dir() / "mounts") + "/"
    found = []
    for point in syscall.mounted():
        if point in known or point.startswith(inside):
            continue
        if not records.is_private(records.state_dir_for(point)):
            continue
        if (record := _unrecorded(point)) is not None:
            found.append(record)
    return found


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
    record = records.load(path) or records.load(mountpoint) or _moved_to(path)
    recorded = record is not None
    if record is None:
        record = _unrecorded(path)
    if record is None:
        raise MountError(_not_ours(mountpoint))
    if (now := _followed(record).mountpoint) != record.mountpoint:
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


def _followed(record: MountRecord) -> MountRecord:
    """``record`` at the place its top is mounted now: a directory above its mount point
    renamed or moved takes the mount with it, and the kernel shows it at the new path,
    not the one recorded. Found by the top's device, as ``_is_ours`` knows it."""
    if record.top_device is None or _where_ours_is(record) != "absent":
        return record
    for point in syscall.points_of(record.top_device):
        if any(_is_ours(record, here) for here in syscall.mounts_at(point)[:1]):
            return replace(record, mountpoint=point)
    return record


def _moved_to(path: str) -> MountRecord | None:
    """The recorded mount whose top is mounted at ``path`` now, moved there with a
    directory above it (``_followed``)."""
    return next(
        (moved for r in records.saved() if (moved := _followed(r)).mountpoint == path), None
    )


def _unrecorded(mountpoint: str) -> MountRecord | None:
    """A mount whose record is gone (the run directory cleared while it was mounted)
    though its state directory still holds what it mounted: enough of a record, read
    from mountinfo and from its server's command line, for ``take_down`` to undo
    it, the server included; None if nothing of it is mounted or running."""
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
        server=_supervisor_of(state),
    )
    if not inside and record.server is None and _where_ours_is(record) == "absent":
        return None
    return record


def _supervisor_of(state: Path) -> ProcessRef | None:
    """The live supervisor of the server of the mount whose state directory is ``state``,
    known by the status file its command line names (``start_server``), among this
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


def _not_ours(mountpoint: str) -> str:
    """Why ``umount`` has nothing to undo at ``mountpoint``, and what to do instead: a
    mount made with another run directory (a ``sudo`` that dropped BLOCKSTORE_RUN_DIR)
    is undone with that one, never by umount(8), which would leave its server running."""
    top = syscall.mounts_at(mountpoint)
    if not top and (around := _recorded_around(os.path.realpath(mountpoint))) is not None:
        return (
            f"{printable(mountpoint)} is inside the mount of {around.image} at "
            f"{printable(around.mountpoint)}, not one itself: "
            f"`{umount_command(around.mountpoint)}` undoes that"
        )
    if not top:
        why = "does not exist" if not os.path.lexists(mountpoint) else "has nothing mounted on it"
        return f"{mountpoint} {why}; `blockstore mounts` lists the mounts blockstore made"
    if (other := _run_dir_of(os.path.realpath(mountpoint))) is not None:
        return (
            f"{mountpoint} was mounted by blockstore with another run directory: "
            f"`{umount_command(mountpoint, other)}` undoes it"
        )
    return (
        f"{mountpoint} was not mounted by blockstore with the run directory "
        f"{records.run_dir()}: {top[0].fstype} from {top[0].source} is mounted there; "
        "unmount it with umount(8) if it is yours, or give the BLOCKSTORE_RUN_DIR that "
        "mounted it"
    )


def _recorded_around(path: str) -> MountRecord | None:
    """The recorded mount ``path`` lies in, the innermost: ``umount`` given a directory
    or a file of a mounted image means that mount."""
    around = [r for r in records.saved() if path.startswith(r.mountpoint.rstrip("/") + "/")]
    return max(around, key=lambda r: len(r.mountpoint), default=None)


def _run_dir_of(mountpoint: str) -> str | None:
    """The run directory whose mount at ``mountpoint`` is standing, where that mount's
    record is there."""
    key = records.mount_key(mountpoint)
    return next((run for run, other in _standing_state_dirs() if other == key), None)


def _standing_state_dirs() -> Iterator[tuple[str, str]]:
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


def _where_ours_is(record: MountRecord) -> str:
    """Where the record's top mount is among those at the mount point, whatever the
    record says: ``top``, ``covered`` (another mount is on it there, a bind of it
    too, or another blockstore mount's top that an older record cannot tell from
    its own), or ``absent`` (gone, or never made). A command killed inside mount(2) made it
    unrecorded; a mount the user made there after unmounting ours by hand is not ours."""
    depths = [
        depth
        for depth, here in enumerate(syscall.mounts_at(record.mountpoint))
        if _is_ours(record, here)
    ]
    if not depths:
        return "absent"
    # Ours below another mount there, even one of ours (a bind of it onto itself).
    return "covered" if max(depths) > 0 else "top"


def _is_ours(record: MountRecord, here: syscall.MountedHere) -> bool:
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


def _sweep(record: MountRecord, *, fuse: bool, lazy: bool) -> None:
    """Unmount what is left mounted in the state directory, made by a step the record
    does not list (the command killed inside it): first (``fuse=False``) layers' EROFS,
    then the FUSE files they read; unmounting a FUSE file ends its nbdfuse."""
    table = syscall.mounted()
    for point in syscall.submounts(record.state_dir):
        if table.get(point, ("",))[0].startswith("fuse") == fuse:
            syscall.umount(point, lazy=lazy)


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


def _hider(record: MountRecord, where: str) -> str | None:
    """Where the mount that hides the record's top is (``where``: ``_where_ours_is``):
    over it at its own mount point, or over a directory above it; None if none does."""
    if where == "covered":
        return record.mountpoint
    return syscall.hidden_by(record.mountpoint) if where == "top" else None


def hidden_by_message(mountpoint: str, above: str) -> str:
    """Why the mount at ``mountpoint`` cannot be reached, nor unmounted, while the one at
    ``above`` (over a directory above it, or at the same place) hides it, and what to
    unmount first: one of ours with ``blockstore umount`` (with the run directory that
    mounted it)."""
    hidden = f"{printable(mountpoint)} is hidden by the mount"
    if above == mountpoint:
        top = syscall.mounts_at(above)[0]
        return (
            f"{hidden} at the same place ({top.fstype} from {top.source}), made over it since: "
            "unmount that first"
        )
    if (record := records.load(above)) is not None:
        return (
            f"{hidden} of {record.image} at {printable(above)}, made over a directory above "
            f"it since: `{umount_command(above)}` first"
        )
    if (other := _run_dir_of(above)) is not None:  # never umount(8): its server would run on
        return (
            f"{hidden} at {printable(above)}, made by blockstore with another run directory "
            f"over a directory above it since: `{umount_command(above, other)}` first"
        )
    top = syscall.mounts_at(above)[0]
    return (
        f"{hidden} at {printable(above)} ({top.fstype} from {top.source}), made over a "
        "directory above it since: unmount that first"
    )


def _ours_inside(mountpoint: str) -> list[str]:
    """Our mounts in the tree of the mount at ``mountpoint``, the outermost first, each as
    words naming it and the ``blockstore umount`` that undoes it: a lazy unmount of
    ``mountpoint`` would take them down with it, leaving their servers running for mounts
    no longer there, and a plain one is refused by the kernel. Recorded here, recorded
    no more (``_unrecorded``), or recorded with another run directory; each where its
    top is now (``_followed``)."""
    saved = {(moved := _followed(r)).mountpoint: moved for r in records.saved()}
    found = []
    for point in sorted(syscall.mounted_in_tree(mountpoint), key=len):
        shown = printable(point)
        if point in saved:
            what, command = f"{saved[point].image} at {shown}", umount_command(point)
        elif _unrecorded(point) is not None:
            what = f"an image at {shown} (its record gone or damaged)"
            command = umount_command(point)
        elif (other := _run_dir_of(point)) is not None:
            what = f"an image at {shown} with another run directory"
            command = umount_command(point, other)
        else:
            continue
        found.append(f"blockstore mounted {what}, inside it: `{command}` first")
    return found


def take_down(record: MountRecord, *, lazy: bool) -> ServerExit | None:
    """Undo every step the record lists, top first; raises if the file system is busy.
    The record itself stays, for the caller to drop once done with the mount's log.

    Each step tolerates being undone already, so a half-made mount, a dead
    server or an earlier interrupted ``umount`` all clean up the same way.
    Returns how the server ended, None where it is not known. Bounded: a
    server that does not stop is killed after ``STOP_GRACE`` seconds.
    """
    where = _where_ours_is(record)
    if where == "covered":
        raise MountpointBusy(hidden_by_message(record.mountpoint, record.mountpoint))
    top = where == "top"
    if top and (above := syscall.hidden_by(record.mountpoint)) is not None:
        raise MountpointBusy(hidden_by_message(record.mountpoint, above))
    if top and (inside := _ours_inside(record.mountpoint)):
        raise MountpointBusy(f"{printable(record.mountpoint)} is busy: {inside[0]}")
    if top and not lazy:
        users = syscall.users_of(_mount_points(record))
        if users:
            raise MountpointBusy(
                f"{record.mountpoint} is busy: {', '.join(users)} is mounted over it (a bind "
                "mount or an overlay); unmount that first, or unmount with --lazy, after "
                "which it gets I/O errors"
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
                f"{record.mountpoint} is busy: {', '.join(held)} uses its layers from "
                "outside it; end or unmount that first, or unmount with --lazy, after which "
                "it gets I/O errors"
            )
    if top:
        syscall.umount(record.mountpoint, lazy=lazy)
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
        syscall.umount(lower, lazy=lazy)
    _sweep(record, fuse=False, lazy=lazy)
    for attachment in reversed(record.attachments):
        attach.detach(attachment, lazy=lazy)
    _sweep(record, fuse=True, lazy=lazy)
    server = record.server
    stopped = server is None or server.stop(SERVER_STOP_TIMEOUT, told=told, group=True)
    ended = read_status(Path(record.state_dir) / SERVER_STATUS)
    if ended is None and not stopped:  # the supervisor did not answer: killed, with the server
        ended = ServerExit(128 + signal.SIGKILL, killed_after_grace=True)
    if record.socket:
        Path(record.socket).unlink(missing_ok=True)
    return ended
