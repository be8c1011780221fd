"""A process at its thread limit, played in this process."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator


@contextlib.contextmanager
def no_threads_for(target_name: str) -> Iterator[None]:
    """Threads whose target is named ``target_name`` fail to start, as in a process at
    its thread limit (``RuntimeError: can't start new thread``), until the block ends."""
    real_start = threading.Thread.start

    def start(thread: threading.Thread) -> None:
        target = getattr(thread, "_target", None)
        if getattr(target, "__name__", "") == target_name:
            raise RuntimeError("can't start new thread")
        real_start(thread)

    threading.Thread.start = start  # type: ignore[method-assign]
    try:
        yield
    finally:
        threading.Thread.start = real_start  # type: ignore[method-assign]
