"""Paths and commands a message gives a user to read and paste into a shell.

A leaf: the mount stack's lowest module (``syscall``) names the command that
gets past its refusal, and the modules above it name theirs, all made here.
"""

from __future__ import annotations

import re
import shlex

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


def umount_command(mountpoint: str, run_dir: str | None = None, *, lazy: bool = False) -> str:
    """The ``blockstore umount`` (``--lazy``) that undoes the mount at ``mountpoint``, as
    one line to paste into a shell; ``run_dir``: the run directory that mounted it, when
    not this one's."""
    command = f"blockstore umount {'--lazy ' if lazy else ''}{shell_word(mountpoint)}"
    return command if run_dir is None else f"BLOCKSTORE_RUN_DIR={shell_word(run_dir)} {command}"


def plain_umount(points: list[str]) -> str:
    """The umount(8) of file systems not blockstore's, as one line to paste into a shell,
    the deepest first: one holding another inside it would be refused as busy."""
    return "umount" + "".join(
        f" {shell_word(point)}" for point in sorted(points, key=len, reverse=True)
    )
