"""The one log format of every blockstore process, and what reading it back may learn.

``setup_logging`` gives a command its logging: this format where the log is
kept (``serve``, whose log a mount keeps in a file), and one line a message,
as the commands' own, where a person reads it.

A mount's server logs to a file that ``umount`` removes when all went well.
Whether something went wrong is partly in the server's exit status and
partly only in its log: a read that failed with EIO, a disk that filled up,
a layer dropped at its seal. ``count_trouble`` finds those lines, by the
format written here and nowhere else.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
_WORD = re.compile(r"[^\s#\"']+")
"""A run of the characters a URL's path and query are made of: a query ends at its end."""
_URL_USER = re.compile(r"((?<![A-Za-z0-9+.-])[0-9+.-]*[A-Za-z][A-Za-z0-9+.-]*://)[^\s/?#@\"']*@")
"""A URL's user part, ``user:password@``. The scheme is tried from the start of its run
of letters alone, so a long word is read once, not once from each letter."""
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


def without_url_secrets(text: str) -> str:
    """``text`` with the query and the user part of each URL in it replaced by ``***``:
    a storage URL a registry redirects to is signed in its query, and the signature
    grants the blob to whoever reads it until it expires."""
    hidden = _WORD.sub(lambda word: _without_query(word.group()), text)
    return _URL_USER.sub(r"\1***@", hidden)


def _without_query(word: str) -> str:
    """``word`` with its query replaced by ``***``: what follows the first ``?`` that a
    path (a ``/`` since the ``?`` before) leads to, as ``/v2/app/blobs/D?X-Amz-..``.
    Read once from its start: every log line passes here, long words too."""
    start = 0
    while (mark := word.find("?", start)) != -1:
        if "/" in word[start:mark] and mark + 1 < len(word):
            return f"{word[:mark]}?***"
        start = mark + 1
    return word


class _NoUrlSecrets(logging.Filter):
    """Hides the secrets of URLs in every record a handler writes: urllib3's debug line
    of each request names its URL whole, a signed storage URL's signature with it."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):
            return True  # left to the handler, which reports a record it cannot format
        hidden = without_url_secrets(message)
        if hidden != message:
            record.msg, record.args = hidden, None
        return True


class _ToAPerson(logging.Formatter):
    """``blockstore: warning: ...``, as the commands' own messages read."""

    def format(self, record: logging.LogRecord) -> str:
        line = f"blockstore: {record.levelname.lower()}: {record.getMessage()}"
        return f"{line}\n{self.formatException(record.exc_info)}" if record.exc_info else line


def setup_logging(verbosity: int, *, daemon: bool) -> None:
    """-q: errors only; default: warnings; -v: info; -vv: debug.

    A ``daemon`` (``serve``, whose log a mount keeps in a file) logs timestamps and
    logger names; a command a person waits on says its warnings as its other
    messages, unless -v asks for the detail.
    """
    level = {-1: logging.ERROR, 0: logging.WARNING, 1: logging.INFO}.get(
        max(-1, min(verbosity, 2)), logging.DEBUG
    )
    handler = logging.StreamHandler()
    handler.addFilter(_NoUrlSecrets())
    to_a_person = not daemon and level >= logging.WARNING
    handler.setFormatter(_ToAPerson() if to_a_person else logging.Formatter(LOG_FORMAT))
    logging.basicConfig(level=level, handlers=[handler])
