"""The one log format of every blockstore process, and what reading it back may learn.

A mount's server logs to a file that ``umount`` removes when all went well.
Whether something went wrong is partly in the server's exit status and
partly only in its log: a read that failed with EIO, a disk that filled up,
a layer dropped at its seal. ``count_trouble`` finds those lines, by the
format written here and nowhere else.
"""

from __future__ import annotations

import re
from pathlib import Path

LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
_TROUBLE = re.compile(
    rb"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} \S+ (?:WARNING|ERROR|CRITICAL) ", re.MULTILINE
)


def count_trouble(log: Path) -> int:
    """How many warnings and errors ``log`` holds (0 if it is gone)."""
    try:
        return len(_TROUBLE.findall(log.read_bytes()))
    except FileNotFoundError:
        return 0


def last_trouble(log: Path) -> str | None:
    """The message of the last warning or error in ``log`` (None if none, or no log)."""
    try:
        text = log.read_bytes()
    except FileNotFoundError:
        return None
    ends = [match.end() for match in _TROUBLE.finditer(text)]
    if not ends:
        return None
    line = text[ends[-1] :].split(b"\n", 1)[0]
    return line.decode(errors="replace").strip() or None
