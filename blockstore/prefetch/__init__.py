"""Prefetch policies: what to fetch before a reader asks for it.

Each is a piece the cache consults, not a branch inside it, and each can
be turned off (``PrefetchSettings``): per-stream ``Readahead``, the EROFS
start (``erofs``) and directory walk (``erofs_tree``), access traces
recorded and replayed (``trace``), and the background fill (``feed``).
Hints leave the read path through a ``HintQueue``.
"""

from .hints import HintQueue
from .readahead import Readahead
from .settings import PrefetchSettings
from .trace import Trace, TraceRecorder

__all__ = ["HintQueue", "PrefetchSettings", "Readahead", "Trace", "TraceRecorder"]
