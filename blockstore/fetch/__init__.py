"""The fetch engine: chunk misses become streamed, prioritised range reads.

``Fetcher`` (single-flight, leases across processes, streaming arrival)
runs its ranges on a ``Scheduler`` (demand before prefetch before fill)
sized by a ``Window`` (the link's bandwidth-delay product, TCP-like
backoff). ``Flights`` is the in-flight table every fetcher of a blob shares.
Beneath them, ``stream`` cuts any source's answer into whole chunks,
``keeper`` stores what arrives in group commits, and ``forks`` tells what
runs threads to start afresh in a forked child.
"""

from .fetcher import Fetcher, runs
from .flights import Flights
from .scheduler import DEMAND, FILL, PREFETCH, Scheduler
from .window import Window

__all__ = ["DEMAND", "FILL", "PREFETCH", "Fetcher", "Flights", "Scheduler", "Window", "runs"]
