"""A process that takes a cache's write lock and stops while holding it, as Ctrl-Z on
a prefetch in the middle of a write leaves one."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

_HOLD = """
import os, signal, sys
from pathlib import Path
from blockstore.cache import ChunkStore
store = ChunkStore(Path(sys.argv[1]))
txn = store.env.env.begin(write=True)
print("holding", flush=True)
os.kill(os.getpid(), signal.SIGSTOP)
"""


@contextlib.contextmanager
def stopped_writer(cache_dir: Path) -> Iterator[subprocess.Popen]:
    """Within the block, a stopped process holds ``cache_dir``'s write lock; after it,
    the process is gone and the lock free."""
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(cache_dir)],
        cwd=Path(__file__).resolve().parents[2],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "holding"
        yield holder
    finally:
        holder.send_signal(signal.SIGCONT)
        holder.kill()
        holder.wait()
