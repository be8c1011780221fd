"""Readahead: sequential streams found by where reads fall, each with its own window.

Two ``cat``s of different files through one mount arrive interleaved on
the same connections; each is a stream of its own, found because its reads
land just after its previous ones, not by the connection they came on.

A stream starts when a read continues the previous one exactly (it starts
at or before where that one ended and goes past it): its first window is
asked for just past the read. From then on, as the kernel does with its
readahead marker, the next window (twice as large, up to a ceiling that
follows the link) is asked for only when a read covers the first byte of
the latest one: the reader has reached what was fetched for it. Reads that
merely land near a stream, or inside what it fetched, ask for nothing, so
random reads (a mount reading scattered small files) never grow a window
and never fetch more than they touch; a client with many reads in flight
(nbdcopy) sends them out of order, but it reads every byte, so it still
crosses each marker. When there are too many streams, a lone read that
never became a stream is forgotten first, so random reads do not push real
streams out.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

DEFAULT_STREAMS = 8
FIRST_WINDOW_READS = 4
"""A new stream's first window is this many of its reads, up to twice ``initial``: a
small file read in two small reads is not worth a large window, as in the kernel."""


@dataclass
class Stream:
    next: int  # where a read that continues the stream starts (or before)
    window: int = 0  # size of the latest window asked for; 0: none yet
    ahead: int = 0  # end of what was asked for
    marker: int = -1  # a read covering this byte asks for the next window

    def continued_by(self, offset: int, end: int) -> bool:
        return offset <= self.next < end

    def holds(self, offset: int) -> bool:
        """Inside what the stream read or asked for: keeps it alive, asks nothing."""
        return self.window > 0 and self.marker - self.window <= offset < self.ahead


class Readahead:
    """Per-stream sequential detection; ``maximum=0`` turns readahead off.

    ``ceiling``, when given, caps every window at what the link can use
    now (it shrinks under errors); ``maximum`` is the hard cap.
    """

    def __init__(
        self,
        initial: int = 128 << 10,
        maximum: int = 32 << 20,
        *,
        streams: int = DEFAULT_STREAMS,
        ceiling: Callable[[], int] | None = None,
    ):
        self._initial = initial
        self._maximum = maximum
        self._max_streams = streams
        self._ceiling = ceiling
        self._streams: OrderedDict[int, Stream] = OrderedDict()
        self._ids = 0
        self._lock = threading.Lock()

    def limit_to(self, ceiling: Callable[[], int]) -> None:
        """Cap the windows by the link's current window from now on."""
        self._ceiling = ceiling

    def longest(self) -> int:
        """The largest window of any stream: how much of a bulk reader this client is."""
        with self._lock:
            return max((s.window for s in self._streams.values()), default=0)

    def _cap(self) -> int:
        cap = self._maximum
        if self._ceiling is not None:
            cap = min(cap, max(self._initial, self._ceiling()))
        return cap

    def _forget_one(self) -> None:
        """Drop the least recently used read that never became a stream, else the least
        recently used stream: random reads must not push real streams out."""
        for key, stream in self._streams.items():
            if not stream.window:
                del self._streams[key]
                return
        self._streams.popitem(last=False)

    def _ask(self, stream: Stream, start: int, window: int, size: int) -> tuple[int, int] | None:
        """Ask for ``window`` bytes from ``start``; its first byte is the next marker."""
        start = max(start, stream.ahead)
        stop = min(size, start + window)
        stream.window = window
        stream.marker = start
        stream.ahead = max(stream.ahead, stop)
        return (start, stop - start) if stop > start else None

    def advise(self, offset: int, length: int, size: int) -> tuple[int, int] | None:
        """Note a read; return a range (offset, length) worth fetching now, if any."""
        if not self._maximum:
            return None
        end = offset + length
        with self._lock:
            continued = held = None
            for key, stream in self._streams.items():
                if stream.window and offset <= stream.marker < end:
                    self._streams.move_to_end(key)
                    stream.next = max(stream.next, end)
                    window = min(stream.window * 2, self._cap())
                    return self._ask(stream, stream.ahead, window, size)
                if continued is None and stream.continued_by(offset, end):
                    continued = key
                elif held is None and stream.holds(offset):
                    held = key
            key = continued if continued is not None else held
            if key is None:
                self._ids += 1
                self._streams[self._ids] = Stream(next=end)
                while len(self._streams) > self._max_streams:
                    self._forget_one()
                return None
            self._streams.move_to_end(key)
            stream = self._streams[key]
            stream.window = min(stream.window, self._cap())  # the link may have shrunk
            if key == held:
                return None
            stream.next = end
            if stream.window:
                return None  # inside its window, short of the marker
            first = min(2 * self._initial, FIRST_WINDOW_READS * (end - offset), self._cap())
            return self._ask(stream, end, first, size)
