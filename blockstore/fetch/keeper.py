"""Storing what arrives with group commits, off the threads that receive it.

Every write transaction costs an fsync. Chunks that arrive while one
commit runs are stored together by the next, in one transaction however
scattered they are, so a lone chunk is stored at once (its reader waits
one commit) and a fast stream, or many small ranges at once (a trace
replayed), is stored in large batches: the link, not the disk, sets the
pace.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from blockstore.export import Buffer

from . import forks

IDLE_EXIT = 30.0  # seconds without work after which the thread ends (it restarts on demand)


def adjacent_runs(items: list[tuple[int, Buffer]]) -> list[tuple[int, list[Buffer]]]:
    """(index, chunk) pairs as runs of consecutive indices, in index order."""
    out: list[tuple[int, list[Buffer]]] = []
    for index, chunk in sorted(items, key=lambda item: item[0]):
        if out and out[-1][0] + len(out[-1][1]) == index:
            out[-1][1].append(chunk)
        elif out and out[-1][0] + len(out[-1][1]) > index:
            continue  # the same chunk twice: the first one is kept
        else:
            out.append((index, [chunk]))
    return out


class Keeper:
    """Calls ``store(runs)`` with the runs of what was put meanwhile, on a daemon thread."""

    def __init__(self, store: Callable[[list[tuple[int, list[Buffer]]]], None]):
        self._store = store
        self.forget_threads()
        forks.register(self)

    def forget_threads(self) -> None:
        self._cond = threading.Condition()
        self._queued: list[tuple[int, Buffer]] = []
        self._busy = False
        self._thread: threading.Thread | None = None

    def put(self, index: int, chunk: Buffer) -> None:
        with self._cond:
            self._queued.append((index, chunk))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="store", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._cond.wait_for(lambda: self._queued, IDLE_EXIT):
                    self._thread = None
                    return
                items, self._queued = self._queued, []
                self._busy = True
            try:
                self._store(adjacent_runs(items))
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def drain(self, timeout: float) -> bool:
        """Wait up to ``timeout`` until everything put is stored."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._queued and not self._busy, timeout)
