"""How much to have in flight: a congestion window sized to the link.

Like TCP, the window opens fast while the registry keeps up (each range
that completes adds its size, doubling the window every round trip) and is
halved on a sign of trouble (an error, a 429/503 that outlived its
retries, a timeout). Unlike plain TCP it also knows where to stop: it
measures the link's delivery rate and round trip (time to first byte) and
does not grow past twice their product, the bandwidth-delay product, so a
20 ms link stays full without piling requests onto a fast local one.

From the window follow the two numbers the fetcher uses: the size of one
range request, and how many ranges may be in flight at once. As BBR does,
the estimate is optimistic: the round trip is the least time to first byte
seen lately and the rate the best delivery rate seen lately, so queueing
and a pause of the reader do not talk the window down.
"""

from __future__ import annotations

import threading
import time
from collections import deque

from . import forks

MIN_REQUEST = 256 << 10
MAX_REQUEST = 8 << 20
MIN_WINDOW = 1 << 20
MAX_WINDOW = 64 << 20
FILTER = 8  # samples the max-rate and min-RTT filters remember


class Window:
    """The link's congestion window, shared by all fetches of one blob."""

    def __init__(
        self, *, initial: int = 8 << 20, minimum: int = MIN_WINDOW, maximum: int = MAX_WINDOW
    ):
        self.forget_threads()
        forks.register(self)
        self._minimum = minimum
        self._maximum = maximum
        self._bytes = max(minimum, min(initial, maximum))
        self._rtts: deque[float] = deque(maxlen=FILTER)  # seconds to first byte
        self._rates: deque[float] = deque(maxlen=FILTER)  # bytes per second, all ranges
        self._since = time.monotonic()
        self._delivered = 0
        self.errors = 0

    def forget_threads(self) -> None:
        self._lock = threading.Lock()

    @property
    def bytes(self) -> int:
        """Bytes the link may have in flight now."""
        return self._bytes

    @property
    def request(self) -> int:
        """Size of one range request: a quarter of the window, so several run at once."""
        return max(MIN_REQUEST, min(MAX_REQUEST, self._bytes // 4))

    @property
    def ranges(self) -> int:
        """How many ranges may be in flight at once."""
        return max(1, self._bytes // self.request)

    @property
    def rtt(self) -> float:
        return min(self._rtts, default=0.0)

    @property
    def rate(self) -> float:
        return max(self._rates, default=0.0)

    def bdp(self) -> int:
        """The measured bandwidth-delay product (0 until measured)."""
        return int(self.rate * self.rtt)

    def first_byte(self, seconds: float) -> None:
        """A range's first bytes arrived ``seconds`` after it was asked for."""
        with self._lock:
            self._rtts.append(seconds)

    def delivered(self, nbytes: int) -> None:
        """``nbytes`` arrived; the rate is sampled over windows of at least one round trip."""
        with self._lock:
            self._delivered += nbytes
            now = time.monotonic()
            span = now - self._since
            if span >= max(0.05, self.rtt):
                self._rates.append(self._delivered / span)
                self._since, self._delivered = now, 0

    def completed(self, nbytes: int) -> None:
        """A range completed cleanly: open the window, up to twice the BDP."""
        with self._lock:
            bdp = self.bdp()
            ceiling = self._maximum if not bdp else max(self._minimum, min(self._maximum, 2 * bdp))
            if self._bytes < ceiling:
                self._bytes = min(ceiling, self._bytes + nbytes)

    def failed(self) -> None:
        """An error or timeout: halve the window, as TCP does on loss."""
        with self._lock:
            self.errors += 1
            self._bytes = max(self._minimum, self._bytes // 2)
