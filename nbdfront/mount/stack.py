"""Mount: the whole stack from an NBD server to a directory.

``mount`` starts the server, attaches each layer's export (kernel NBD or
nbdfuse), mounts each layer's EROFS, stacks several layers with a read-only
overlayfs (last layer on top, so its whiteouts hide files of the layers
below), and records every step so ``unmount`` can undo them from another
process. A failure at any step undoes the steps before it (``unmount.take_down``):
a failed mount leaves nothing behind but its log, and an interrupted one not
even that unless it holds a warning or an error.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from blockstore.errors import MountError, MountpointBusy, NotPermitted
from blockstore.logformat import count_trouble, last_trouble
from nbdfront.mount import attach, dirattrs, records, syscall
from nbdfront.mount.commands import printable, umount_command
from nbdfront.mount.finding import (
    ATTRIBUTES_LOWER,
    EMPTY_LOWER,
    SERVER_STATUS,
    moved_to,
    run_dir_of,
    supervisor_of,
    unrecorded,
)
from nbdfront.mount.process import ProcessRef
from nbdfront.mount.records import MountRecord
from nbdfront.mount.server import layer_exports, start_server
from nbdfront.mount.unmount import take_down
from nbdfront.socketpath import overlong_socket_path

logger = logging.getLogger(__name__)


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
                f"{mountpoint} is being mounted by blockstore (pid {record.mounter.pid}): "
                "interrupt that command, which undoes it, or let it finish and "
                f"`{umount_command(mountpoint)}`"
            )
        if not _left_nothing(record):
            raise MountpointBusy(
                f"{mountpoint} has a mount record already; `{umount_command(mountpoint)}` clears it"
            )
        state_dir = Path(record.state_dir)  # an older version's may be named otherwise
        cleared = f"the record of an earlier mount of {record.image}"
    elif records.is_private(state_dir):  # a record that does not parse
        if (standing := unrecorded(mountpoint)) is not None:
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
        and supervisor_of(Path(record.state_dir)) is None
        and all(a.method != attach.KERNEL for a in record.attachments)
    )


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
    record = records.load(mountpoint) or moved_to(mountpoint)
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
    if (other := run_dir_of(mountpoint)) is not None:
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
