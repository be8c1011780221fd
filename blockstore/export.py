"""The interface the NBD frontend reads through.

An ``Export`` is one blob seen as a read-only byte range. The frontend knows
nothing else of the engine: it asks for ranges and sends the buffers back.

An export may also have ``hold_cached(offset, length) -> Held | None``: the
hit of ``read_cached`` as views into its cache, with no copy, valid until the
``release`` that comes with them is called (once, soon: the caller waits on
nothing meanwhile but, briefly, the client taking them). A server that sends a
reply at once sends it from them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

Buffer = bytes | memoryview
Held = tuple[list[memoryview], Callable[[], None]]
"""Views of a hit, and the call that ends their validity (see ``hold_cached``)."""


class Export(Protocol):
    """A named, read-only byte range served to NBD clients."""

    @property
    def name(self) -> str:
        """The NBD export name (``""`` is the default export)."""

    @property
    def description(self) -> str:
        """A human description (image reference, layer, digest)."""

    @property
    def size(self) -> int:
        """Length in bytes."""

    def read(self, offset: int, length: int) -> Sequence[Buffer]:
        """Return buffers whose concatenation is exactly ``length`` bytes.

        The caller has checked ``offset + length <= size``. A failure raises
        ``OSError`` (``BlobReadError``, errno EIO): never short or wrong data.
        """

    def read_cached(self, offset: int, length: int) -> Sequence[Buffer] | None:
        """The bytes of ``read`` if they can be had at once, else None.

        Never touches the network and never waits on a fetch, so a server
        may answer hits on the thread that parsed the request and hand only
        the rest to ``read`` on a thread that may wait. None says nothing
        about errors: ``read`` reports them.
        """

    def cache(self, offset: int, length: int) -> None:
        """A hint: bring this range into the cache now, if it is not there."""
