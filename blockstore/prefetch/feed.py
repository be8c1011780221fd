"""Feeding long lists of chunks to the fetcher: trace replay and background fill.

Both run on a daemon thread of their own and hand chunks over in order,
as fast as the prefetch budget takes them (so they stay just ahead of the
fetches in flight, never the whole layer in memory) and, for the fill, no
faster than its bandwidth cap. Either stops at the next range once told.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

# prefetch(indices, priority, wait=seconds) -> True once all were handed over
Prefetch = Callable[..., bool]

BUDGET_WAIT = 0.25  # seconds per wait for room, between looks at the stop flag


class Pacer:
    """A token bucket: at most ``rate`` bytes per second on average (0: no cap)."""

    def __init__(self, rate: int, burst: float = 0.25):
        self._rate = rate
        self._capacity = rate * burst
        self._tokens = self._capacity
        self._last = time.monotonic()

    def take(self, nbytes: int, stop: threading.Event) -> bool:
        """Wait until ``nbytes`` may go; False if stopped meanwhile."""
        if not self._rate:
            return not stop.is_set()
        now = time.monotonic()
        self._tokens = min(self._capacity, self._tokens + (now - self._last) * self._rate)
        self._last = now
        self._tokens -= nbytes
        if self._tokens < 0 and stop.wait(-self._tokens / self._rate):
            return False
        return not stop.is_set()


def coalesce(order: Sequence[int], span: int) -> list[int]:
    """A trace's chunk order made fit for few, large requests.

    Each ``span`` consecutive entries are taken together and sorted, so
    chunks that lie side by side go in one request, still roughly in the
    order the trace gives. Nothing is added: every byte fetched was read
    when the trace was recorded.
    """
    out: list[int] = []
    seen: set[int] = set()
    for start in range(0, len(order), span):
        block = sorted(set(order[start : start + span]) - seen)
        out.extend(block)
        seen.update(block)
    return out


def bridge(order: Sequence[int], gap: int) -> list[int]:
    """``order`` with the indices between two neighbours added where at most ``gap`` of
    them lie between: one request for both costs less than a round trip more."""
    out: list[int] = []
    for index in order:
        if out and 0 < index - out[-1] - 1 <= gap:
            out.extend(range(out[-1] + 1, index))
        out.append(index)
    return out


def in_order_runs(indices: Sequence[int], limit: int) -> list[list[int]]:
    """Indices cut into runs of adjacent chunks, keeping their given order."""
    out: list[list[int]] = []
    for index in indices:
        if out and out[-1][-1] + 1 == index and len(out[-1]) < limit:
            out[-1].append(index)
        else:
            out.append([index])
    return out


def feed(
    indices: Sequence[int],
    prefetch: Prefetch,
    priority: int,
    stop: threading.Event,
    *,
    limit: int,
    chunk_size: int,
    pacer: Pacer | None = None,
    lost: Callable[[], str | None],
) -> bool:
    """Queue every index, in order, paced; True when all were handed over, False once
    stopped or ``lost()`` names why the cache keeps nothing (``ChunkStore.lost``): what
    it fetched would be thrown away."""
    for run in in_order_runs(indices, limit):
        if lost() is not None:
            return False
        if pacer is not None and not pacer.take(len(run) * chunk_size, stop):
            return False
        while not prefetch(run, priority, wait=BUDGET_WAIT):
            if stop.is_set():
                return False
    return True
