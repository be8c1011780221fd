"""Memory a server freed goes back to the system now and then.

A server of compressed layers inflates spans of several MiB into buffers it
frees soon after, again and again, on many threads. glibc keeps such blocks
in its heap arenas, one per thread, once its mmap threshold has risen past
their size (each large block freed raises it), and what a fragmented arena
frees in its middle stays the process's: a tar.gz server driven by
``bench/soak.py`` held 265 MiB of anonymous memory after 20 cycles and crept
on by about 1 MiB a cycle. Mapping every large block on its own instead (a
fixed mmap threshold) kept it at 125 MiB, flat, but inflated spans 1.7x
slower, each new mapping faulting its pages in. ``malloc_trim`` gives back
the free pages of every arena, in place, at a cost paid once a period.
"""

from __future__ import annotations

import ctypes
import threading
import time

PERIOD = 5.0
"""Seconds between trims: a trim walks every arena, holding each one's lock briefly."""


def _malloc_trim() -> ctypes._CFuncPtr | None:
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # a C library without it (not glibc)
        return None
    trim.argtypes = (ctypes.c_size_t,)
    return trim


_starting = threading.Lock()
_trimmer: threading.Thread | None = None


def give_back_freed_memory(period: float = PERIOD) -> bool:
    """Trim the heap every ``period`` seconds on a daemon thread, for as long as the
    process lives (started once a process, however often asked). False where the C
    library cannot trim."""
    global _trimmer
    trim = _malloc_trim()
    if trim is None:
        return False

    def run() -> None:
        while True:
            time.sleep(period)
            trim(0)

    with _starting:
        if _trimmer is None:
            _trimmer = threading.Thread(target=run, name="heap-trim", daemon=True)
            _trimmer.start()
    return True
