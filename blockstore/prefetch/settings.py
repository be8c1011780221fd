"""Which prefetch heuristics run, each one a setting that can be turned off.

The library's defaults are the quiet ones (readahead alone, as a reader of
a blob expects); ``MOUNT`` is what ``mount`` and ``serve`` start with, and
their ``--no-*`` options take pieces away.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PrefetchSettings:
    readahead: bool = True
    """Per-stream sequential readahead."""
    page_in: bool = True
    """Just after an export's first hit, read the blob's cached chunks from the cache
    file into memory ahead of the client, unless they are there (``cache.pagein``)."""
    erofs_start: bool = False
    """At open, fetch the superblock, root inode and root directory in one request."""
    erofs_walk: bool = False
    """Then fetch every directory's inode and entries, in ``find``'s order, several at
    once (beside a trace replayed chunk by chunk: a listing gets its directories in its
    own order; a trace replayed block by block holds those reads already)."""
    trace_period: float = 0.0
    """Seconds of a cold open's first reads recorded as its layer's trace; 0: none."""
    trace_replay: bool = False
    """On a cold open, replay the layer's kept trace as prefetch."""
    trace_blocks: bool = True
    """Replay a trace's 4 KiB blocks alone, kept as parts of chunks, not their whole
    chunks (where nothing checks whole chunks only: a sealed blob, a chunk index)."""
    fill: bool = False
    """After open, fetch the rest of the layer at low priority and seal it."""
    fill_rate: int = 0
    """Bytes per second the fill may take; 0: no cap."""
    leases: bool = True
    """Lease ranges across processes sharing the cache, so none fetch a chunk twice."""
    lease_wait: float | None = None
    """Seconds a fetch waits for another process's lease on its range before fetching
    the range itself (that process may be stuck on a slower registry, or stopped);
    None: as long as that process lives. The image sets its registry timeout."""


MOUNT = PrefetchSettings(erofs_start=True, erofs_walk=True, trace_period=30.0, trace_replay=True)
