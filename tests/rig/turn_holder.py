"""A process that holds a cache's prefetch turn (``blockstore.cache.turns``), as another
prefetch filling that cache would: beside the others, or alone."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

_HOLD = """
import sys
from pathlib import Path
from blockstore.cache.turns import PrefetchTurn
with PrefetchTurn(Path(sys.argv[1])) as turn:
    turn.alone() if sys.argv[2] == "alone" else turn.join()
    print("holding", flush=True)
    sys.stdin.readline()
"""


class TurnHolder:
    """The holding process, for a test to let the turn go at a moment of its choosing."""

    def __init__(self, process: subprocess.Popen):
        self._process = process

    def let_go(self) -> None:
        """End the holder, and its turn with it; at once."""
        self._process.stdin.close()
        self._process.wait(10)


@contextlib.contextmanager
def turn_held(cache_dir: Path, *, alone: bool) -> Iterator[TurnHolder]:
    """Within the block, a process holds ``cache_dir``'s prefetch turn, alone (as a
    prefetch whose layer lost chunks fills its next rounds) or beside others (as one
    filling); after it, the process is gone and the turn free."""
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(cache_dir), "alone" if alone else "beside"],
        cwd=Path(__file__).resolve().parents[2],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "holding"
        yield TurnHolder(holder)
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
