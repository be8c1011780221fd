"""What a cold open fetches before anyone asks for it, on a thread of its own.

In order, as ``PrefetchSettings`` turn them on: the EROFS start (superblock,
root inode and directory in one request), the directory walk in ``find``'s
order, the replay of an access trace recorded by an earlier mount (its 4 KiB
blocks alone where they can be kept as parts of chunks), and the background
fill of the rest of the layer, which ends in its seal. All of it is best
effort: a reader fetches for itself whatever the warm-up has not brought yet.
The reads themselves, and readahead on them, are the blob's (``blob``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Protocol

from blockstore.errors import BlobReadError
from blockstore.export import Buffer
from blockstore.fetch import FILL, PREFETCH, Fetcher
from blockstore.prefetch import PrefetchSettings, Readahead, Trace, erofs, erofs_tree
from blockstore.prefetch.feed import Pacer, bridge, coalesce, feed

from . import parts
from .integrity import BLOCK, BLOCKS
from .layout import CHUNK_SIZE, chunk_count
from .store import ChunkStore
from .turns import PrefetchTurn
from .walk_reader import WalkReader

log = logging.getLogger(__name__)

FILL_ROUNDS = 3  # passes of the background fill over what is still missing
REPLAY_SPAN = 32 << 20  # trace entries (in bytes of chunks) sorted and merged at a time
PACE_STEP = 0.25  # seconds of a capped fill's bandwidth asked for in one range
WALK_YIELDS_TO = 512 << 10
"""The directory walk ends once a client reads a stream with a readahead window this large."""
BRIDGED_GAP = 4
"""Blocks between two a replayed trace wants that are fetched with them, in one request,
rather than cut it in two: a request costs more than 16 KiB (measured: bench/README.md)."""


class WarmedBlob(Protocol):
    """What the warm-up needs of the blob it warms (``CachedBlob``): the warm-up fetches
    through the blob's own fetchers, so what it brings is what the blob's reads find."""

    @property
    def digest(self) -> str: ...

    @property
    def size(self) -> int: ...

    def known_id(self) -> int | None:
        """The blob's id in the cache, None while the cache holds none of it: what the
        replay and the fill ask the store about."""

    def load(self, indices: Sequence[int]) -> dict[int, Buffer]:
        """Those of the chunks ``indices`` the cache holds now: the directory walk's hits."""

    def read_for_pass(self, offset: int, length: int) -> list[Buffer]:
        """A read that is no client's (not counted, traced or advised): the EROFS start's
        root inode, and the directory walk beside a replay."""

    def plan(self, offset: int, length: int, priority: int) -> None:
        """Queue the range's missing chunks at ``priority``: the EROFS start's span."""

    def no_room(self) -> str | None:
        """Why the disk cannot take the rest of the layer, or None: a fill that would
        only evict is not started."""

    def now_sealed(self) -> None:
        """Told once the fill sealed the blob, so its reads check against the seal."""


class WarmUp:
    """The warm-up of one blob: ``run`` once, on a daemon thread; ``stop`` (the blob's
    own event) ends it at its next step."""

    def __init__(
        self,
        blob: WarmedBlob,
        store: ChunkStore,
        fetcher: Fetcher,
        block_fetcher: Fetcher | None,
        settings: PrefetchSettings,
        readahead: Readahead,
        stop: threading.Event,
    ) -> None:
        """``block_fetcher``: fetches single 4 KiB blocks, kept as parts of chunks, for a
        trace that can be replayed so; ``readahead``: the blob's, to see a bulk reader."""
        self._blob = blob
        self._store = store
        self._digest = blob.digest
        self._size = blob.size
        self._chunks = chunk_count(blob.size)
        self._fetcher = fetcher
        self._block_fetcher = block_fetcher
        self._settings = settings
        self._readahead = readahead
        self._stop = stop

    def wanted(self, trace: Trace | None) -> bool:
        """Whether there is anything to run for these settings and ``trace``."""
        settings = self._settings
        return bool(
            settings.erofs_start or settings.erofs_walk or trace is not None or settings.fill
        )

    def run(self, trace: Trace | None) -> None:
        """The EROFS start; then the directory walk on a thread of its own (it reads as
        demand, in the listing's order, beside what follows); trace replay; background
        fill; as set.

        A trace replayed block by block goes first: it holds the mount's first reads
        (the EROFS start's among them), and the walk, started once the replay's fetches
        are all asked for, then finds each block it needs on its way and hurries it
        along in the listing's order, rather than fetch its chunk whole.
        """
        exact = trace is not None and self._block_fetcher is not None
        try:
            if exact:
                self._replay(trace)  # type: ignore[arg-type]
            elif self._settings.erofs_start:
                self._erofs_start()
            if self._settings.erofs_walk and not self._stop.is_set():
                threading.Thread(
                    target=self._walk_directories, args=(exact,), name="erofs-walk", daemon=True
                ).start()
            if trace is not None and not exact and not self._stop.is_set():
                self._replay(trace)
            if self._settings.fill and not self._stop.is_set():
                self._fill_layer()
        except Exception as exc:  # prefetch is best effort; readers fetch for themselves
            if not self._stop.is_set():
                log.warning("%s: prefetch stopped: %s", self._digest, exc)

    def _erofs_start(self) -> None:
        """Fetch the superblock, then the root inode and directory, in one request."""
        head = bytes(self._fetcher.fetch([0])[0])
        where = erofs.root_inode_offset(head)
        if where is None:
            return
        inode_at = where[0]
        if inode_at + 64 <= len(head):
            inode = head[inode_at : inode_at + 64]
        else:
            inode = b"".join(self._blob.read_for_pass(inode_at, min(64, self._size - inode_at)))
        _, end = erofs.start_span(head, inode, self._size)
        self._blob.plan(0, end, PREFETCH)

    def _walk_directories(self, exact: bool) -> None:
        """Fetch every directory's inode and entries, in ``find``'s order (see
        ``erofs_tree``); a blob that is not EROFS is left alone. ``exact``: beside a trace
        replayed block by block."""
        done = threading.Event()

        def ended() -> bool:
            """The walk ends with the blob; for a client copying the image (nbdcopy), which
            reads every directory anyway: the walk's small requests would only cut into
            its stream; and once the cache is lost (``ChunkStore.lost``): what it fetched
            would not be kept, and the listing it runs ahead of would fetch it again."""
            if (
                self._stop.is_set()
                or self._readahead.longest() >= WALK_YIELDS_TO
                or self._store.lost() is not None
            ):
                done.set()
            return done.is_set()

        read: Callable[[int, int], bytes]
        if exact:
            # Beside a block replay the walk reads as a listing does: blocks from parts, or
            # from the replay's fetches (which it hurries along, in the listing's order).
            def read(offset: int, length: int) -> bytes:
                if ended():
                    raise BlobReadError("the directory walk has ended")
                length = min(length, self._size - offset)
                return b"".join(self._blob.read_for_pass(offset, length))
        else:
            read = WalkReader(self._blob.load, self._fetcher.fetch, self._size, ended)
        try:
            geometry = erofs.geometry(read(0, min(self._size, erofs.HEAD)))
            if geometry is not None:
                count = erofs_tree.walk(geometry, read, done)
                log.debug("%s: walked %d directories", self._digest, count)
        except Exception as exc:  # best effort, as all prefetch
            if not self._stop.is_set():
                log.warning("%s: directory walk stopped: %s", self._digest, exc)

    def _replay(self, trace: Trace) -> None:
        """Prefetch what the trace read, in its order, paced by the prefetch budget: its
        blocks alone where they can be kept as parts of chunks, else their chunks."""
        if self._block_fetcher is not None:
            self._replay_blocks(trace, self._block_fetcher)
            return
        missing = set(self._store.missing(self._blob.known_id(), range(self._chunks)))
        fetcher = self._fetcher
        order = coalesce(trace.in_units_of(CHUNK_SIZE, self._size), REPLAY_SPAN // CHUNK_SIZE)
        order = [i for i in order if i in missing]
        feed(
            order,
            fetcher.prefetch,
            PREFETCH,
            self._stop,
            limit=max(1, fetcher.window.request // CHUNK_SIZE),
            chunk_size=CHUNK_SIZE,
            lost=self._store.lost,
        )

    def _replay_blocks(self, trace: Trace, fetcher: Fetcher) -> None:
        """The trace's blocks the cache lacks (neither its chunk nor a part holds them),
        in runs bridged over small gaps."""
        blocks = trace.in_units_of(BLOCK, self._size)
        blob_id = self._blob.known_id()
        chunks = sorted({b // BLOCKS for b in blocks})
        missing = set(self._store.missing(blob_id, chunks))
        held = {
            index: parts.present(value)
            for index, value in (
                self._store.read_parts(blob_id, sorted(missing)) if blob_id is not None else {}
            ).items()
        }
        order = [
            b
            for b in blocks
            if b // BLOCKS in missing and not held.get(b // BLOCKS, 0) >> (b % BLOCKS) & 1
        ]
        order = bridge(coalesce(order, REPLAY_SPAN // BLOCK), BRIDGED_GAP)
        feed(
            order,
            fetcher.prefetch,
            PREFETCH,
            self._stop,
            limit=max(1, fetcher.window.request // BLOCK),
            chunk_size=BLOCK,
            lost=self._store.lost,
        )

    def _fill_layer(self) -> None:
        """Fetch the rest of the layer at fill priority, under the rate cap, then seal it.

        Resumable: each pass takes only what is missing, so a fill cut short
        (stopped, evicted, a failed range) continues where it stopped.
        """
        if (no_room := self._blob.no_room()) is not None:
            log.warning("%s; not filled, so nothing else is evicted for it", no_room)
            return
        fetcher = self._fetcher
        rate = self._settings.fill_rate
        pacer = Pacer(rate)
        step = fetcher.window.request
        if rate:
            step = min(step, int(rate * PACE_STEP))  # small steps, so the cap is smooth
        limit = max(1, step // CHUNK_SIZE)
        # A fill takes its turn as a prefetch does (``turns``), so a prefetch filling
        # alone is not evicted by it; only this thread waits for it, never a reader.
        with PrefetchTurn(self._store.path, self._stop) as turn:
            for _ in range(FILL_ROUNDS):
                if self._fills_nothing():
                    return
                missing = self._store.missing(self._blob.known_id(), range(self._chunks))
                if not missing:
                    break
                turn.join()
                if not feed(
                    missing,
                    fetcher.prefetch,
                    FILL,
                    self._stop,
                    limit=limit,
                    chunk_size=CHUNK_SIZE,
                    pacer=pacer,
                    lost=self._store.lost,
                ):
                    self._fills_nothing()  # says so, if that is why it stopped
                    return
                while fetcher.in_flight() and not self._stop.wait(0.05):
                    pass
            if self._stop.is_set():
                return
            outcome = self._store.seal(self._digest, self._size)
        if outcome:
            self._blob.now_sealed()
            log.info("%s: filled and sealed", self._digest)
        elif outcome is None:
            missing = len(self._store.missing(self._blob.known_id(), range(self._chunks)))
            log.warning(
                "%s: the fill gave up after %d rounds with %d of %d chunks still missing "
                "(failed to fetch, or not kept: a full disk, a cap too small for the "
                "layer, another process holding the cache's write lock)",
                self._digest,
                FILL_ROUNDS,
                missing,
                self._chunks,
            )

    def _fills_nothing(self) -> bool:
        """Whether the cache keeps nothing a fill fetches (read-only here, or lost as it
        was filled: ``ChunkStore.lost``), saying so if it does: each round would fetch
        the whole layer again."""
        if (why := self._store.read_only_because) is None:
            return False
        log.warning("%s: not filled, as the cache keeps nothing: %s", self._digest, why)
        return True
