"""Files replaced whole: a reader sees the old content or the new, never a part.

The new content is written beside the file and renamed over it, the one
step a reader can observe; a write that fails leaves nothing beside it.
The file beside it is made new under a name no one can guess, never opened
through a link: in a directory others may write (a pidfile in /tmp), a link
put there beforehand would have the write land on the file it points to.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_PLAIN_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def replace_whole(path: Path, data: bytes, suffix: str) -> None:
    """``data`` at ``path``, written first to its name plus ``suffix`` and a random
    part; raises the ``OSError`` of a write or rename that fails, with nothing left
    beside ``path``."""
    partial = path.with_name(f"{path.name}{suffix}-{secrets.token_hex(8)}")
    try:
        fd = os.open(partial, _NEW_FILE, 0o666)  # the umask decides, as for open()
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        partial.replace(path)
    except OSError:
        partial.unlink(missing_ok=True)
        raise


def read_plain_file(path: Path, limit: int) -> bytes:
    """The first ``limit`` bytes of the regular file at ``path``; ``OSError`` for a link,
    a FIFO or a device put in its place (in a directory others may write), opened
    without following or waiting on it."""
    fd = os.open(path, _PLAIN_FILE)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path} is not a regular file")
        return os.read(fd, limit)
    finally:
        os.close(fd)
