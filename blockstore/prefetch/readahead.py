"""Readahead: sequential streams found by where reads fall, each with its own window.

Two ``cat``s of different files through one mount arrive interleaved on
the same connections; each is a stream of its own, found because its reads
land just after its previous ones, not by the connection they came on.
Each stream's window doubles while it stays sequential, up to a ceiling
that follows the link (the fetch window), like the kernel's readahead; a
read that belongs to no stream starts a new small one, so one stream's
random reads never reset another's window. When there are too many, a
lone read that never became a stream is forgotten first, so random reads do
not push real streams out.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

DEFAULT_STREAMS = 8
REORDER = 2 << 20
"""How far before or after its expected place a read may land and still extend a
stream: a client with many reads in flight (nbdcopy has 64) sends them out of order."""


@dataclass
class Stream:
    next: int  # where the next sequential read is expected
    window: int
    ahead: int  # end of what was already asked for
    hits: int = 0


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
        reorder: int = REORDER,
    ):
        self._initial = initial
        self._maximum = maximum
        self._max_streams = streams
        self._ceiling = ceiling
        self._reorder = reorder
        self._streams: OrderedDict[int, Stream] = OrderedDict()
        self._ids = 0
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self._maximum > 0

    def limit_to(self, ceiling: Callable[[], int]) -> None:
        """Cap the windows by the link's current window from now on."""
        self._ceiling = ceiling

    def windows(self) -> list[int]:
        """Each stream's window, most recently used last (for tests and stats)."""
        with self._lock:
            return [s.window for s in self._streams.values()]

    def _cap(self) -> int:
        cap = self._maximum
        if self._ceiling is not None:
            cap = min(cap, max(self._initial, self._ceiling()))
        return cap

    def _find(self, offset: int) -> tuple[int, Stream] | None:
        for key, stream in self._streams.items():
            # Reads a little out of order (several requests in flight) still count.
            slack = max(stream.window, self._reorder)
            if stream.next - slack <= offset <= stream.next + slack:
                return key, stream
        return None

    def _forget_one(self) -> None:
        """Drop the least recently used read that never became a stream, else the least
        recently used stream: random reads must not push real streams out."""
        for key, stream in self._streams.items():
            if not stream.hits:
                del self._streams[key]
                return
        self._streams.popitem(last=False)

    def advise(self, offset: int, length: int, size: int) -> tuple[int, int] | None:
        """Note a read; return a range (offset, length) worth fetching now, if any."""
        if not self._maximum:
            return None
        end = offset + length
        with self._lock:
            found = self._find(offset)
            if found is None:
                self._ids += 1
                self._streams[self._ids] = Stream(next=end, window=self._initial, ahead=end)
                while len(self._streams) > self._max_streams:
                    self._forget_one()
                return None
            key, stream = found
            self._streams.move_to_end(key)
            stream.next = max(stream.next, end)
            stream.hits += 1
            stream.window = min(stream.window, self._cap())  # the link may have shrunk
            if stream.ahead - stream.next > stream.window // 2:
                return None  # still well ahead of the reader
            stream.window = min(stream.window * 2, self._cap())
            start = max(stream.ahead, stream.next)
            stop = min(size, stream.next + stream.window)
            stream.ahead = max(stream.ahead, stop)
            return (start, stop - start) if stop > start else None
