"""Which processes use a path, found as fuser finds them (``/proc``), for messages that
name what to stop: a busy mount's users, or the processes that have a cache's files
open without taking its lock (an older version's)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence


def processes_using(path: str, most: int = 5) -> list[str]:
    """ "pid N (command)" of up to ``most`` processes with their working or root directory,
    an open file or a mapped file inside ``path``, as fuser would find them: what a
    busy mount's user is asked to end."""
    root = os.path.realpath(path).rstrip("/")
    inside = root + "/"

    def matches(target: str) -> bool:
        return target == root or target.startswith(inside)

    return _processes(matches, most, by_directory=True)


def processes_with_open(files: Sequence[str], most: int = 5) -> list[str]:
    """ "pid N (command)" of up to ``most`` processes with one of ``files`` open or
    mapped (not merely a file beside them, nor a working directory there)."""
    wanted = {os.path.realpath(name) for name in files}
    return _processes(wanted.__contains__, most, by_directory=False)


def _processes(matches: Callable[[str], bool], most: int, *, by_directory: bool) -> list[str]:
    found: list[str] = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        if _uses(entry.path, matches, by_directory):
            try:
                with open(f"{entry.path}/comm", encoding="utf-8", errors="replace") as f:
                    command = f.read().strip()
            except OSError:
                continue
            found.append(f"pid {entry.name} ({command})")
            if len(found) == most:
                break
    return found


def _uses(proc: str, matches: Callable[[str], bool], by_directory: bool) -> bool:
    def names(link: str) -> bool:
        try:
            return matches(os.readlink(link))
        except OSError:
            return False

    if by_directory and any(names(f"{proc}/{link}") for link in ("cwd", "root", "exe")):
        return True
    try:
        if any(names(fd.path) for fd in os.scandir(f"{proc}/fd")):
            return True
        with open(f"{proc}/maps", encoding="utf-8", errors="surrogateescape") as f:
            # The path is the sixth field, after five without spaces.
            for line in f:
                fields = line.rstrip("\n").split(None, 5)
                if len(fields) > 5 and matches(fields[5]):
                    return True
            return False
    except OSError:  # gone, or not ours to look at
        return False
