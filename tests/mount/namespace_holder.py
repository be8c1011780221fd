"""Run a command in a mount namespace of its own, as ``unshare -m`` does.

The namespace holds its private copy of every mount there is, as a shell or a
container made then would, and ``umount`` refuses a mount such a namespace holds.
So that it holds no other test's mounts (refused while it lives), it unmounts
there, before anything else, every EROFS, overlay and FUSE mount outside the
KEEP directories. With ``--bind SOURCE TARGET`` it binds SOURCE at TARGET and
unmounts its copy at SOURCE, as a container given a mount as a volume holds it.
Usage: namespace_holder.py [--keep KEEP]... [--bind SOURCE TARGET] COMMAND...
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
from pathlib import Path

from nbdfront.mount import syscall

HOLDER = [sys.executable, str(Path(__file__).resolve())]
"""The command line that runs this, for a test to put its own arguments after."""

CLONE_NEWNS = 0x00020000
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18

_libc = ctypes.CDLL(None, use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        raise OSError(ctypes.get_errno(), f"{what}: {os.strerror(ctypes.get_errno())}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--keep", action="append", default=[])
    parser.add_argument("--bind", nargs=2, metavar=("SOURCE", "TARGET"))
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    _check(_libc.unshare(CLONE_NEWNS), "unshare")
    _check(_libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "make / private")
    keep = tuple(os.path.realpath(path).rstrip("/") + "/" for path in args.keep)
    _drop_others(keep)
    if args.bind:
        source, target = args.bind
        _check(_libc.mount(os.fsencode(source), os.fsencode(target), None, MS_BIND, None), "bind")
        syscall.umount(source, lazy=True)
    os.execvp(args.command[0], args.command)


def _drop_others(keep: tuple[str, ...]) -> None:
    """Unmount here every mount point outside ``keep`` with an EROFS, overlay or FUSE
    mount in its stack, whatever is mounted over it (another test's tmpfs moved onto its
    image): each lazy unmount takes the top of a stack, so a stack goes down in turns."""
    for _ in range(16):  # stacks are a few mounts high; a point that stays is left
        points = {
            m.point
            for m in syscall._mounts()
            if m.fstype in ("erofs", "overlay", "fuse") and not m.point.startswith(keep)
        }
        if not points:
            return
        for point in sorted(points, reverse=True):  # the deepest first
            syscall.umount(point, lazy=True)


if __name__ == "__main__":
    main()
