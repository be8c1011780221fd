"""Turn an NBD export into something the kernel can mount.

Two paths, chosen by what the machine has: the kernel NBD client
(``nbd-client`` onto a free ``/dev/nbdN``) gives a real block device; without
it, ``nbdfuse`` presents the export as one read-only file on a FUSE mount, and
EROFS mounts that file directly. Each attachment is described by a small
JSON-able record so another process can detach it later.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
import urllib.parse
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from blockstore.errors import MissingDependency, MountError
from nbdfront.mount import syscall
from nbdfront.mount.process import ProcessRef, log_tail, spawn_detached

NBDFUSE = "nbdfuse"
KERNEL = "kernel"

ATTACH_TIMEOUT = 15.0
EMPTY_PIDFILE_GRACE = 2.0
"""Seconds nbdfuse's pidfile may stay empty: nbdfuse writes its pid right after making
the file, and says nothing when that write fails (a full disk) but serves on, so a file
empty for longer is a pid that will never come."""
KERNEL_BLOCK_SIZE = 512
"""The logical block size ``nbd-client`` gives a kernel NBD device. A file system's
blocks cannot be smaller than its device's: a tar layer's EROFS metadata has 512-byte
blocks (the alignment of tar data), which the kernel refuses to mount from a device of
4096-byte blocks; an EROFS image of 4096-byte blocks mounts from either."""
FUSE_CONNECTIONS = 1
"""NBD connections nbdfuse opens for one export. Its default is four when the
server offers multi-conn; the kernel's reads through FUSE come at low depth,
and spread over four connections each one wakes a different server thread.
One connection, on which nbdfuse still keeps several reads in flight, ran
the mount stack (``find`` and every file read) about a fifth faster, against
this server and against ``nbdkit file`` alike."""


@dataclass
class Attachment:
    """One export made mountable: ``device`` is the file or block device to mount."""

    export: str
    uri: str
    method: str
    device: str
    fuse_dir: str | None = None
    process: ProcessRef | None = None

    def to_record(self) -> dict:
        record = asdict(self)
        record["process"] = self.process.to_record() if self.process else None
        return record

    @classmethod
    def from_record(cls, record: dict) -> Attachment:
        process = record.get("process")
        data = known_fields(cls, record)  # a newer version's record may say more
        return cls(**{**data, "process": ProcessRef.from_record(process) if process else None})


def known_fields(kind: type, record: dict) -> dict:
    """``record`` (read back from JSON) without the keys the dataclass ``kind`` has no
    field for: what a newer version wrote is left out, not a TypeError."""
    names = {f.name for f in fields(kind)}
    return {key: value for key, value in record.items() if key in names}


def kernel_nbd_devices() -> list[str]:
    """The kernel NBD devices this machine has (none when the driver is absent)."""
    return sorted(
        (str(p) for p in Path("/dev").glob("nbd*") if p.name[3:].isdigit()),
        key=lambda d: int(d[len("/dev/nbd") :]),
    )


def choose_method(*, tls: bool = False) -> str:
    """Kernel NBD where the driver and ``nbd-client`` exist, else nbdfuse; nbdfuse for a
    server speaking TLS (``tls``), which the kernel's client is not attached to here."""
    if not tls and kernel_nbd_devices() and shutil.which("nbd-client"):
        return KERNEL
    if not os.path.exists("/dev/fuse"):
        raise MissingDependency(
            "no FUSE: /dev/fuse is missing and there is no kernel NBD driver "
            "(load the fuse or nbd module)"
        )
    if not shutil.which("nbdfuse"):
        raise MissingDependency("nbdfuse is not installed (Debian package libnbd-bin)")
    return NBDFUSE


def attach(uri: str, export: str, workdir: Path, log_path: Path, method: str) -> Attachment:
    """Attach ``uri`` (an NBD URI) by ``method``; ``workdir`` holds what it needs."""
    if method == KERNEL:
        return _attach_kernel(uri, export, log_path)
    return _attach_nbdfuse(uri, export, workdir, log_path)


def detach(attachment: Attachment, *, lazy: bool = False, of: str | None = None) -> None:
    """Undo ``attach``; safe to call again, and when the process is already gone. ``of``:
    the mount point of the blockstore mount it serves, named in a refusal to paste."""
    if attachment.method == KERNEL:
        subprocess.run(
            ["nbd-client", "-d", attachment.device],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            check=False,
        )
        return
    assert attachment.fuse_dir is not None
    # Unmounting the FUSE file system is what makes nbdfuse exit cleanly. After a lazy
    # unmount of a busy stack it would wait for the last user, or for a read the server
    # may never answer: it is stopped instead, and killed soon (it keeps no state).
    syscall.umount(attachment.fuse_dir, lazy=lazy, of=of)
    if attachment.process is not None and not attachment.process.wait(0.5 if lazy else 5.0):
        attachment.process.stop(1.0 if lazy else 5.0)
    remove_empty_dir(attachment.fuse_dir)


def _attach_nbdfuse(uri: str, export: str, workdir: Path, log_path: Path) -> Attachment:
    fuse_dir = workdir / f"fuse-{export or 'default'}"
    fuse_dir.mkdir(parents=True, exist_ok=True)
    pidfile = workdir / f"nbdfuse-{export or 'default'}.pid"
    pidfile.unlink(missing_ok=True)
    device = fuse_dir / (export or "default")
    proc = spawn_detached(
        [
            *(NBDFUSE, "--readonly", "--connections", str(FUSE_CONNECTIONS)),
            *("--pidfile", str(pidfile), str(device), uri),
        ],
        log_path,
    )
    try:
        _wait_for_pidfile(proc, pidfile, uri, log_path)
        process = ProcessRef.of(proc.pid)
        if process is None:
            raise MountError(f"nbdfuse exited right after attaching {uri}; see {log_path}")
    except BaseException:
        # Until it is recorded, nbdfuse and its FUSE mount are ours to take down.
        proc.kill()
        proc.wait()
        syscall.umount(str(fuse_dir), lazy=True)
        remove_empty_dir(str(fuse_dir))
        raise
    pidfile.unlink()
    return Attachment(export, uri, NBDFUSE, str(device), str(fuse_dir), process)


def _wait_for_pidfile(proc: subprocess.Popen, pidfile: Path, uri: str, log_path: Path) -> None:
    """nbdfuse writes its pidfile once the FUSE file is ready to serve."""
    started = time.monotonic()
    empty_since: float | None = None
    while not (written := _pidfile_text(pidfile)):
        if proc.poll() is not None:
            raise MountError(
                f"nbdfuse could not attach {uri} (exit {proc.returncode}): "
                + (log_tail(log_path, 1) or f"see {log_path}")
            )
        now = time.monotonic()
        if written == "":
            empty_since = now if empty_since is None else empty_since
            if now - empty_since > EMPTY_PIDFILE_GRACE:
                raise MountError(f"nbdfuse attached {uri} but could not write its pidfile")
        if now - started > ATTACH_TIMEOUT:
            raise MountError(f"nbdfuse did not attach {uri} within {ATTACH_TIMEOUT:.0f}s")
        time.sleep(0.01)


def _pidfile_text(pidfile: Path) -> str | None:
    """What the pidfile holds, stripped; None while it is not made yet."""
    try:
        return pidfile.read_text().strip()
    except FileNotFoundError:
        return None


def _attach_kernel(uri: str, export: str, log_path: Path) -> Attachment:
    parsed = urllib.parse.urlsplit(uri)
    name = urllib.parse.unquote(parsed.path.lstrip("/"))
    if parsed.scheme == "nbd+unix":
        socket = urllib.parse.parse_qs(parsed.query).get("socket", [""])[0]
        where = ["-unix", socket]
    elif parsed.scheme == "nbd":
        where = [parsed.hostname or "localhost", str(parsed.port or 10809)]
    else:
        raise MountError(f"the kernel NBD client cannot connect to {uri}")
    options = ["-name", name, "-readonly", "-block-size", str(KERNEL_BLOCK_SIZE)]
    for device in kernel_nbd_devices():
        if Path(f"/sys/block/{Path(device).name}/pid").exists():
            continue  # in use
        with open(log_path, "ab") as log:
            done = subprocess.run(
                ["nbd-client", *where, device, *options],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                check=False,
            )
        if done.returncode == 0:
            return Attachment(export, uri, KERNEL, device)
    raise MountError(f"no free kernel NBD device could attach {uri}; see {log_path}")


def remove_empty_dir(path: str) -> None:
    """Remove a directory we made, if it is still there and empty."""
    with contextlib.suppress(FileNotFoundError):
        os.rmdir(path)
