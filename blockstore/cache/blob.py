"""One blob read through the cache: the ``Export`` the NBD frontend serves.

The hit path is one read transaction per call: each chunk's bytes are
checked against their checksum (``integrity``) on the LMDB buffer itself and
copied out once (only the part asked for). No lock is held while fetching, so a hit never
waits behind another request's miss. Misses go through the ``Fetcher``
(single-flight, coalesced, parallel); chunks of a sealed blob are checked
against the sealed checksums before they are served (here, as they
arrive) and again by the store in the transaction that stores them. What a
cold open fetches before it is asked is the warm-up's (``warmup``).
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import functools
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence

from blockstore.errors import BlobReadError, CacheError, IntegrityError, NotCached
from blockstore.export import Buffer
from blockstore.fetch import PREFETCH, Fetcher, Flights
from blockstore.fetch.fetcher import READER_STORE_WAIT, STOP_WAIT
from blockstore.prefetch import (
    HintQueue,
    PrefetchSettings,
    Readahead,
    Trace,
    TraceRecorder,
)
from blockstore.source import BlobSource
from blockstore.throttledlog import ThrottledLog

from . import integrity, parts
from .errors import CacheDamaged, ChunkIntegrityError, DiskFull
from .holds import BlobHold
from .integrity import BLOCK, BLOCKS, checked_chunks, checked_part
from .layout import CHUNK_SIZE, BlobRecord, chunk_count, chunk_length
from .leases import RangeLeases, UnitLeases
from .pagein import PageIn
from .store import ChunkStore
from .traces import TraceShelf
from .turns import PrefetchTurn
from .warmup import WarmUp

log = logging.getLogger(__name__)

_unkept = ThrottledLog(
    log,
    "%d more fetches in the %.0f s after those logged were served but not kept, "
    "not logged one by one",
)
"""A cache that takes no writes (a full disk, a file size limit) fails every store."""
atexit.register(_unkept.flush)

_IN_CHUNK = CHUNK_SIZE - 1  # an offset's place within its chunk, as a mask
PREFETCH_STEP = 32 << 20  # bytes asked of the fetcher at a time by prefetch()
SEAL_ROUNDS = 3  # prefetch's fetch-and-seal passes: sealing drops chunks that fail their check
REPLAY_QUIET_AT_MOST = 120.0
"""Seconds readahead waits at most for a replayed trace, however long the trace says it
lasted (it may come from elsewhere)."""


class CachedBlob:
    """A blob served from the chunk cache, filled from ``source`` on a miss.

    ``source=None`` is offline: a miss raises ``NotCached`` at once.
    """

    def __init__(
        self,
        store: ChunkStore,
        digest: str,
        size: int,
        source: BlobSource | None,
        *,
        name: str = "",
        description: str = "",
        readahead: Readahead | None = None,
        settings: PrefetchSettings | None = None,
        upstream: BlobSource | None = None,
        seal_when_whole: bool = True,
    ) -> None:
        """``upstream``: the same blob from its source of truth alone (past any mirror),
        fetched from once more when what ``source`` sent fails the digest.
        ``seal_when_whole``: seal in the background as soon as a fetch completes the
        blob, or at once if it is whole and unsealed already; off for a blob whose owner
        seals it at a better time (``TarLayer``)."""
        self._store = store
        # Served from the cache alone, an evicted chunk could not come back: held from
        # eviction (by any process) while served. Taken before the record is read; none
        # in a read-only cache, where this process makes no file.
        held = source is None and not store.read_only
        self._hold = BlobHold.take(store.path, digest) if held else None
        self._seal_when_whole = seal_when_whole
        self._upstream = upstream
        self._digest = digest
        self._size = size
        self._name = name
        self._description = description or digest
        self._chunks = chunk_count(size)
        self._seed = integrity.blob_seed(digest)
        record = store.lookup(digest)
        if record is not None and record.size != size:
            self._drop_other_size(record, size)  # or refuse ``size``, if it is proven wrong
            record = None
        self._blob_id = record.blob_id if record is not None else None
        self._sums = store.sealed_sums(digest) if record is not None and record.sealed else None
        # Whole in the cache as far as this export knows: readahead has nothing to do.
        # A miss clears it (chunks may be evicted).
        self._whole = record is not None and record.present == record.chunks
        if self._whole and not record.sealed and seal_when_whole and not store.read_only:
            # No fetch will complete it now: its seal was lost (the process that completed
            # it stopped, or closed its store, first), so it is started here.
            store.seal_later(digest)
        self._settings = settings if settings is not None else PrefetchSettings()
        self._readahead = readahead if readahead is not None else Readahead()
        if not self._settings.readahead:
            self._readahead = Readahead(maximum=0)
        self._fetcher: Fetcher | None = None
        self._block_fetcher: Fetcher | None = None
        """Fetches a replayed trace's blocks alone, kept as parts of chunks (``parts``)."""
        self._quiet_until = 0.0
        """Readahead waits until then (monotonic): a replayed trace is doing its work."""
        self._hints: HintQueue | None = None
        self._recorder: TraceRecorder | None = None
        self._stop = threading.Event()
        self._filling_whole = False  # a prefetch runs (``_filling``)
        self._no_room_left = threading.Event()
        # A read-only cache is read through copies: a walk would copy every chunk.
        self._page_in_due = self._settings.page_in and record is not None and not store.read_only
        self._page_in: PageIn | None = None
        self._page_in_lock = threading.Lock()
        if source is not None:
            self._start_fetching(source)

    def _drop_other_size(self, record: BlobRecord, size: int) -> None:
        """The blob is cached under another size than ``size``. Sealed, its size was
        proven with its digest: ``size`` is wrong, refused. Not sealed, the cached part
        was stored under a size some registry gave and nothing has proven: it is
        dropped, so that one wrong answer does not shut this layer out for good."""
        if record.sealed:
            raise IntegrityError(
                f"{self._digest} is {record.size} bytes (checked against its digest in the "
                f"cache), but {size} are given: refused"
            )
        log.warning(
            "%s was cached as %d bytes, never proven, and %d are given now: "
            "dropping what was cached",
            self._digest,
            record.size,
            size,
        )
        self._store.remove(self._digest)

    # --- Export ----------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._name

    @property
    def description(self) -> str:
        return self._description

    @property
    def size(self) -> int:
        return self._size

    @property
    def digest(self) -> str:
        return self._digest

    def read(self, offset: int, length: int) -> list[Buffer]:
        """The bytes at ``offset``; raises ``BlobReadError`` (EIO), never returns wrong bytes."""
        try:
            return self._read(offset, length)
        except CacheError as exc:  # e.g. the store was closed under a late reader
            raise BlobReadError(f"{self._digest}: {exc}") from exc

    def read_for_pass(self, offset: int, length: int) -> list[Buffer]:
        """``read`` for a pass of the engine's own over the blob (indexing a tar layer,
        proving its index, inflating its spans; the warm-up's reads, ``warmup``): not a
        client's read, so neither counted as served, nor kept in the trace (a replay
        elsewhere would fetch the whole pass), nor taken by readahead as a hint."""
        try:
            return self._read(offset, length, client=False)
        except CacheError as exc:
            raise BlobReadError(f"{self._digest}: {exc}") from exc

    def read_cached(self, offset: int, length: int) -> list[Buffer] | None:
        """The bytes at ``offset`` if every chunk is cached and checks out, else None.

        Never fetches, never writes, never waits on another request: a
        server may call it on the thread that parsed the request and hand
        only the None cases to ``read``, which then counts, drops and
        fetches as usual. A served hit is counted and advised like a read.
        A blob not known to be stored yet is left to ``read`` to look up.
        """
        return self._copy_cached(offset, length, client=True)

    def read_cached_for_pass(
        self, offset: int, length: int, *, touch: bool = True
    ) -> list[Buffer] | None:
        """``read_cached`` for a pass of the engine's own (see ``read_for_pass``);
        ``touch=False`` for a check that is no use of the blob (``cache verify``): the
        chunks keep their place in the eviction order."""
        return self._copy_cached(offset, length, client=False, touch=touch)

    def _copy_cached(
        self, offset: int, length: int, *, client: bool, touch: bool = True
    ) -> list[Buffer] | None:
        held = self.hold_cached(offset, length, client=client, touch=touch)
        if held is None:
            return None
        views, release = held
        try:
            return [view.tobytes() for view in views]
        finally:
            release()

    def hold_cached(
        self, offset: int, length: int, client: bool = True, touch: bool = True
    ) -> tuple[list[memoryview], Callable[[], None]] | None:
        """``read_cached`` without the copy: views into the cache, checked, valid until
        ``release()``, which the caller must call once, soon: before it waits on
        anything but the client taking those views, and that for a few tens of
        milliseconds at most (it ends a read transaction, which holds a reader slot
        and defers renewals and map growth, and so every reader queued behind them).
        A server sends the views straight from the cache with it. ``client=False``:
        the engine's own read, not counted, traced or advised (``read_for_pass``);
        ``touch=False``: not a use of the blob either (``read_cached_for_pass``)."""
        end = offset + length
        blob_id = self._blob_id
        if blob_id is None or length <= 0 or offset < 0 or end > self._size:
            return None
        first = offset // CHUNK_SIZE
        last = (end - 1) // CHUNK_SIZE
        size = self._size
        seed = self._seed
        store = self._store
        try:
            values, txn = store.read_chunks(blob_id, first, last)
        except CacheError:
            return None
        out: list[memoryview] = []
        try:
            for value in values:  # not ``None in``: comparing a view with None costs an error
                if value is None:
                    store.end_read(txn)
                    return None  # a partial miss hashes nothing: read will do it again
            if not (offset | end) & _IN_CHUNK:  # whole chunks, none the blob's short end
                checked = checked_chunks(values, seed, first)
                if checked is None:
                    store.end_read(txn)
                    return None
                out = checked
            else:
                base = first * CHUNK_SIZE
                for index, value in enumerate(values, first):
                    span = size - base if size - base < CHUNK_SIZE else CHUNK_SIZE
                    lo = offset - base if base < offset else 0
                    hi = end - base if end - base < span else span
                    part = checked_part(value, seed, index, span, lo, hi)
                    if part is None:
                        store.end_read(txn)
                        return None
                    out.append(part)
                    base += CHUNK_SIZE
            if touch:
                store.touch((blob_id, first, last))
            if client:
                if self._page_in_due:
                    self._start_page_in(blob_id)
                store.served((last - first + 1, 0, length))
                if self._recorder is not None or (self._hints is not None and not self._whole):
                    self._heed(offset, length, 0)
        except BaseException:
            store.end_read(txn)
            raise
        return out, functools.partial(store.end_read, txn)

    def _read(self, offset: int, length: int, *, client: bool = True) -> list[Buffer]:
        """``read``; ``client=False``: the engine's own read (the directory walk, a pass),
        not counted, traced or advised."""
        if length <= 0:
            return []
        if offset < 0 or offset + length > self._size:
            raise BlobReadError(
                f"read {offset}+{length} beyond the end of {self._digest}", errno.EINVAL
            )
        end = offset + length
        first = offset // CHUNK_SIZE
        last = (end - 1) // CHUNK_SIZE
        missing = list(range(first, last + 1))
        out: list[Buffer | None] = [None] * len(missing)
        bad: list[int] = []
        try:
            blob_id = self.known_id()
            if blob_id is not None:
                out, missing, bad = self._look_up(blob_id, offset, end)
                if missing and (renewed := self._renewed_id(blob_id)) is not None:
                    out, missing, bad = self._look_up(renewed, offset, end)
        except CacheDamaged:
            if self._fetcher is None:
                raise
            # Moved aside; the store goes on with an empty cache: all of it is a miss.
        if missing:
            missing = self._from_parts(out, first, offset, end, missing)
        table = self._store.flights(self._digest).blocks_if_any if missing else None
        if table is not None:  # some export of this blob replays blocks
            missing = self._join_block_fetches(table, out, first, offset, end, missing)
        misses = len(missing) + len(bad)
        if misses:
            self._whole = False
            self._fill_misses(out, first, offset, end, missing, bad)
        if client:
            self._served(offset, length, last - first + 1 - misses, misses)
        return out  # type: ignore[return-value]

    def _look_up(
        self, blob_id: int, offset: int, end: int
    ) -> tuple[list[Buffer | None], list[int], list[int]]:
        """The hit loop: one read transaction over the chunks of ``offset..end``.

        The 4 KiB blocks of each stored chunk that the read covers are
        checked against their checksums on the LMDB buffer and the wanted
        part copied out; the others are None in the output and listed as
        missing or bad. The chunks are touched for recency.
        """
        first = offset // CHUNK_SIZE
        last = (end - 1) // CHUNK_SIZE
        out: list[Buffer | None] = []
        missing: list[int] = []
        bad: list[int] = []
        seed = self._seed
        size = self._size
        values, txn = self._store.read_chunks(blob_id, first, last)
        try:
            for index, value in enumerate(values, first):
                base = index * CHUNK_SIZE
                length = min(CHUNK_SIZE, size - base)
                lo = offset - base if base < offset else 0
                hi = end - base if end - base < length else length
                if value is None:
                    missing.append(index)
                    out.append(None)
                elif (part := checked_part(value, seed, index, length, lo, hi)) is None:
                    bad.append(index)
                    out.append(None)
                else:
                    out.append(part.tobytes())
        finally:
            self._store.end_read(txn)
        self._store.touch((blob_id, first, last))
        return out, missing, bad

    def _from_parts(
        self, out: list[Buffer | None], first: int, offset: int, end: int, missing: list[int]
    ) -> list[int]:
        """Fill what the stored parts of missing chunks hold, checked; the chunks still
        missing. A part that lacks a block asked for, or fails its check, leaves its
        chunk to be fetched whole (which replaces the part)."""
        blob_id = self._blob_id
        found = self._store.read_parts(blob_id, missing) if blob_id is not None else {}
        if not found:
            return missing
        still = []
        for index in missing:
            value = found.get(index)
            base = index * CHUNK_SIZE
            length = chunk_length(self._size, index)
            lo, hi = max(offset - base, 0), min(end - base, length)
            part = None
            if value is not None:
                part = parts.checked_slice(value, self._seed, index, length, lo, hi)
            if part is None:
                still.append(index)
            else:
                out[index - first] = part
                self._store.touch((blob_id, index, index))  # type: ignore[arg-type]
        return still

    def _join_block_fetches(
        self,
        table: Flights,
        out: list[Buffer | None],
        first: int,
        offset: int,
        end: int,
        missing: list[int],
    ) -> list[int]:
        """Before a missing chunk is fetched whole, wait for the replay's fetches of its
        blocks, so no byte is on its way twice; a read whose blocks all came so is
        answered from them, and from what the parts hold. The chunks still missing."""
        wanted = {i: parts.blocks_of(max(offset, i * CHUNK_SIZE), min(end, (i + 1) * CHUNK_SIZE))
                  for i in missing}  # fmt: skip
        pending = table.on_their_way(
            b for i in missing for b in range(i * BLOCKS, (i + 1) * BLOCKS)
        )
        if not pending:
            return missing
        got: dict[int, Buffer] = table.join(pending)  # what failed, the read fetches itself
        got.update(self._load_blocks([b for i in missing for b in wanted[i] if b not in got]))
        still = []
        for index in missing:
            blocks = wanted[index]
            if not all(b in got for b in blocks):
                still.append(index)
                continue
            data = b"".join(got[b] for b in blocks)
            skip = max(offset, index * CHUNK_SIZE) - blocks[0] * BLOCK
            take = min(end, (index + 1) * CHUNK_SIZE) - max(offset, index * CHUNK_SIZE)
            out[index - first] = data[skip : skip + take]
        return still

    def _served(self, offset: int, length: int, hits: int, misses: int) -> None:
        """Count a read and tell readahead of it, whether it hit or fetched."""
        self._store.served((hits, misses, length))
        if self._recorder is not None or (self._hints is not None and not self._whole):
            self._heed(offset, length, misses)

    def _heed(self, offset: int, length: int, misses: int) -> None:
        """Tell the trace recorder and readahead of a read, hit or fetched."""
        if self._recorder is not None:
            self._note(offset, length)
        if self._hints is not None and not self._whole:
            self._advise(offset, length, misses)

    def cache(self, offset: int, length: int) -> None:
        """A client's CACHE: queue the range as prefetch and return at once (not on a
        read-only cache, which would drop what it fetched)."""
        if self._hints is None or length <= 0 or self._whole or self._store.read_only:
            return
        self._hints.submit(max(0, offset), min(self._size, offset + length) - offset, PREFETCH)

    # --- whole-blob operations ---------------------------------------------------

    def prefetch(self, progress: Callable[[int], None] | None = None) -> None:
        """Fetch every missing chunk, check the whole blob and seal it.

        Resumable: only missing chunks are fetched. ``progress`` is called
        with byte increments (first with what was already cached), so it
        fits ``tqdm.update``. Raises ``IntegrityError`` if the blob does not
        match its digest (it is then dropped), ``CacheError`` if it cannot
        be kept whole under the size cap, ``DiskFull`` as soon as the disk has no
        room for the rest (its fetches cancelled), ``CacheDamaged`` as soon as the cache
        is found damaged and cannot be moved aside (nothing more would be kept),
        ``BlobReadError`` once the blob is closed (a wait for its turn ends with it).
        """
        if (over := self.over_cap()) is not None:
            raise CacheError(f"{over}; raise --cache-size or pin it")
        if (no_room := self.no_room()) is not None:
            raise DiskFull(f"{no_room}; nothing was fetched or evicted")
        reported = 0

        def report(nbytes: int) -> None:
            nonlocal reported
            nbytes = min(nbytes, self._size - reported)
            if nbytes > 0 and progress is not None:
                progress(nbytes)
            reported += nbytes

        # Sealing drops chunks that fail their checksum; another round fetches them.
        with PrefetchTurn(self._store.path, self._stop) as turn, self._filling():
            alone = False
            for _ in range(SEAL_ROUNDS):
                missing = self._store.missing_by_digest(self._digest, range(self._chunks))
                report(self._size - sum(chunk_length(self._size, i) for i in missing))
                if missing and self._fetcher is None:
                    raise NotCached(f"{self._digest} is not fully cached and {NotCached.said}")
                if missing:
                    turn.join()
                try:
                    self._fetch_all(missing, report)
                except BlobReadError:
                    if not self._no_room_left.is_set():
                        raise
                    outcome = None  # cancelled for want of room: said below
                    break
                outcome = self._store.seal(self._digest, self._size)
                if outcome is False and self._upstream is not None and self._fetcher is not None:
                    log.warning("%s failed its digest; fetching it from the upstream", self._digest)
                    self._fetcher.close()
                    self._fetcher = self._new_fetcher(self._upstream)
                    self._upstream = None
                    continue
                failed = self._store.unstored(self._digest)
                if outcome is not None or not self._another_round(failed):
                    # Stores that failed for good (a read-only disk, a full disk with no
                    # room for the rest): said below. A full disk may have room next
                    # round, once eviction under the cap ran.
                    break
                if not alone:
                    # Parts went as it was filled: evicted, most likely, for the layer of
                    # another prefetch. The next rounds are filled alone (``turns``).
                    turn.alone()
                    # Only an order: where it cannot be written, the rounds below fill
                    # all the same, and a store of theirs that fails is said.
                    with contextlib.suppress(CacheError):
                        self._store.renew(self._digest)
                    alone = True
        if outcome is False:
            raise IntegrityError(f"{self._digest}: the fetched bytes do not match the digest")
        if outcome is None:
            if self._no_room_left.is_set() and (why := self.no_room()) is not None:
                raise DiskFull(
                    f"{self._digest} could not be kept whole in the cache: the disk holding "
                    f"it filled as it was fetched; it {why.removeprefix(self._digest + ' ')}"
                )
            if (why := self._store.unstored(self._digest)) is not None:
                raise CacheError(
                    f"{self._digest} could not be kept whole in the cache: storing it "
                    f"failed ({why})"
                )
            raise CacheError(
                f"{self._digest} could not be kept whole in the cache: parts of it went as "
                "it was filled (evicted under the cap, --cache-size, or beside pinned "
                "layers; removed by `cache rm` in another process; or not stored, on a "
                "full disk or while another process held the cache's write lock)"
            )
        self.now_sealed()

    def now_sealed(self) -> None:
        """The blob was sealed by this process (``prefetch``, or the warm-up's fill): fetches
        are checked against its sums from now on, and readahead has nothing left to do."""
        self._sums = self._store.sealed_sums(self._digest)
        self._whole = True

    def over_cap(self) -> str | None:
        """Why the layer cannot be kept whole under the cache's size cap, or None
        (``ChunkStore.over_cap``)."""
        return self._store.over_cap(self._digest, self._size)

    def no_room(self) -> str | None:
        """Why the disk holding the cache cannot take the rest of the layer, or None
        (``ChunkStore.no_room``)."""
        return self._store.no_room(self._digest, self._size)

    @contextlib.contextmanager
    def _filling(self) -> Iterator[None]:
        """While a prefetch fills the blob: a store failing on a full disk may end it
        (``_no_room_for_the_rest``), which no reader's store may."""
        self._filling_whole = True
        try:
            yield
        finally:
            self._filling_whole = False

    def _another_round(self, failed: CacheError | None) -> bool:
        """Whether another round may keep what this one did not: never once the disk has
        no room for the rest (``_no_room_for_the_rest``); after a store that failed with
        ``failed``, only on a full disk where the rest still fits (eviction under the cap
        freed room)."""
        if self._no_room_left.is_set():
            return False
        return failed is None or (isinstance(failed, DiskFull) and self.no_room() is None)

    def _no_room_for_the_rest(self) -> None:
        """After a store of a prefetch: once the disk has no room for the rest of the blob
        (``no_room``, the rule that refuses a layer before a byte of it is fetched), its
        fetches are cancelled. A store on a full disk would fail, or evict the blob's own
        chunks to make room (the only ones left to evict): every byte more would be
        thrown away, and each round would fetch the rest again."""
        if not self._filling_whole or self._no_room_left.is_set() or self._fetcher is None:
            return
        if self.no_room() is None:
            return
        self._no_room_left.set()
        self._fetcher.cancel()

    def _fetch_all(self, missing: list[int], report: Callable[[int], None]) -> None:
        """Fetch in steps, so memory stays flat however much is asked for."""
        step = PREFETCH_STEP // CHUNK_SIZE
        for start in range(0, len(missing), step):
            self._going_on()
            batch = missing[start : start + step]
            self._fetcher.fetch(batch)  # type: ignore[union-attr]
            report(sum(chunk_length(self._size, i) for i in batch))
        self._going_on()

    def _going_on(self) -> None:
        """Raise ``CacheDamaged`` once the cache is found damaged and cannot be moved aside:
        nothing fetched would be kept, and each round would fetch the blob whole again;
        ``BlobReadError`` once the blob is closed (its turn's wait ended with it)."""
        if (lost := self._store.lost()) is not None:
            raise CacheDamaged(lost)
        if self._stop.is_set():
            raise BlobReadError(f"{self._digest}: the prefetch was stopped: the blob is closed")

    def close(self) -> None:
        """Stop prefetching and cancel fetches in flight; keep the trace recorded so far."""
        self._stop.set()
        with self._page_in_lock:
            self._page_in_due = False
            page_in = self._page_in
        if page_in is not None:
            page_in.stop()
        if self._hold is not None:
            self._hold.release()
        recorder = self._recorder
        if recorder is not None:
            recorder.finish()
        if self._hints is not None:
            self._hints.stop()
        self.cancel()
        until = time.monotonic() + STOP_WAIT
        for fetcher in self._fetchers():
            fetcher.wait_stopped(until)

    def cancel(self) -> None:
        """``close``'s part that waits for nothing: fail the fetches in flight now (the
        cache stays open), every fetcher before any is waited for, so no waiting reader
        turns to another."""
        self._stop.set()
        for fetcher in self._fetchers():
            fetcher.cancel()

    def _fetchers(self) -> list[Fetcher]:
        return [f for f in (self._fetcher, self._block_fetcher) if f is not None]

    def _start_page_in(self, blob_id: int) -> None:
        """On the first hit a client makes: page the blob's cached chunks in from the
        cache file ahead of it (``pagein``), once."""
        with self._page_in_lock:  # two first hits at once, or one racing ``close``
            if not self._page_in_due or self._stop.is_set():
                return
            self._page_in_due = False
            page_in = PageIn(self._store, blob_id, self._chunks, self._description)
            try:
                page_in.start()
            except RuntimeError as exc:  # no thread to be had: the hit is served all the same
                log.debug("no page-in of %s: %s", self._description, exc)
                return
            self._page_in = page_in

    # --- misses ----------------------------------------------------------------

    def known_id(self) -> int | None:
        """The blob's id in the cache, None while it holds none of it; looked up again
        while unknown, as another reader (or process) may have stored the blob since."""
        if self._blob_id is None:
            record = self._store.lookup(self._digest)
            self._blob_id = record.blob_id if record is not None else None
        return self._blob_id

    def _renewed_id(self, blob_id: int) -> int | None:
        """On a miss: the blob's new id if its record was made anew since this export
        took ``blob_id`` (``cache rm``, then a prefetch, in another process), else None.
        The old id names nothing any more: every read of it would miss."""
        record = self._store.lookup(self._digest)
        if record is None or record.blob_id == blob_id or record.size != self._size:
            return None
        self._blob_id = record.blob_id
        self._sums = self._store.sealed_sums(self._digest) if record.sealed else None
        return record.blob_id

    def _fill_misses(
        self,
        out: list[Buffer | None],
        first: int,
        offset: int,
        end: int,
        missing: list[int],
        bad: list[int],
    ) -> None:
        if bad:
            # Counted where dropped, so a chunk found bad twice at once counts once.
            dropped = self._store.drop_chunks(self._digest, bad)
            self._store.counters.add(checksum_failures=dropped)
            log.warning("%s: %d cached chunk(s) failed their checksum", self._digest, len(bad))
        wanted = sorted(missing + bad)
        if self._fetcher is None:
            what = "failed its checksum" if bad else "is not cached"
            raise NotCached(
                f"{self._digest}: chunk {wanted[0]} (offset {wanted[0] * CHUNK_SIZE}) {what}, "
                f"and {NotCached.said}"
            )
        try:
            got = self._fetcher.fetch(
                wanted, self._ahead_of_miss(offset, end - offset), READER_STORE_WAIT
            )
        except OSError:
            raise
        except Exception as exc:  # an export fails with EIO, whatever the backend raised
            raise BlobReadError(f"{self._digest}: fetching failed: {exc}") from exc
        for index in wanted:
            data = got[index]
            base = index * CHUNK_SIZE
            lo = max(offset - base, 0)
            hi = min(end - base, len(data))
            out[index - first] = data if lo == 0 and hi == len(data) else data[lo:hi]

    def _arrived(self, index: int, chunk: memoryview) -> Buffer:
        """Check a freshly fetched chunk against the sealed checksums, if there are any.

        This check is for the readers: it runs before they are woken, so
        they get EIO rather than wrong bytes. What is stored is checked by
        the store itself (a seal may commit between here and there).
        """
        self._store.counters.add(bytes_fetched=len(chunk))
        if self._sums is None or integrity.fits_sealed(self._sums, self._seed, index, chunk):
            return chunk
        self._store.counters.add(checksum_failures=1)
        upstream = self._upstream
        if upstream is not None:
            # A mirror may have sent them: the upstream, the source of truth, is asked.
            log.warning(
                "%s: chunk %d as fetched does not match the sealed blob; fetching it "
                "again from the upstream",
                self._digest, index,
            )  # fmt: skip
            again = upstream.read_range(index * CHUNK_SIZE, chunk_length(self._size, index))
            if integrity.fits_sealed(self._sums, self._seed, index, memoryview(again)):
                return again
        raise ChunkIntegrityError(
            f"{self._digest}: the source sent chunk {index} with bytes that do not "
            "match the sealed blob"
        )

    def seal_when_complete(self) -> None:
        """From now on seal the blob as soon as it is whole (at once if it is), as
        ``seal_when_whole`` does: for an owner that meant to seal it and cannot."""
        self._seal_when_whole = True
        record = self._store.lookup(self._digest)
        if record is not None and record.present == record.chunks:
            self._now_whole(record)

    def _requesting(self) -> None:
        """A range request is about to go out: count it, and pick up a seal made since."""
        self._store.counters.add(requests_fetched=1)
        if self._sums is None:
            # Another process may have sealed the blob since we opened it.
            record = self._store.lookup(self._digest)
            if record is not None and record.sealed:
                self._sums = self._store.sealed_sums(self._digest)

    def _keep(self, runs: list[tuple[int, list[Buffer]]]) -> None:
        """Store runs of checked chunks; a cache that cannot take them costs only the caching.

        Chunks the store refuses (the blob was sealed meanwhile, and they do
        not match) were counted by the store and are not kept.
        """
        if self._store.read_only:
            return  # said once, when the image was opened
        try:
            record = self._store.store_runs(self._digest, self._size, runs)
        except (CacheError, ChunkIntegrityError) as exc:
            self._say_unkept(exc)
            self._no_room_for_the_rest()
            return
        self._blob_id = record.blob_id
        if record.present == record.chunks:
            self._now_whole(record)
        else:
            self._no_room_for_the_rest()

    def _say_unkept(self, exc: Exception) -> None:
        """Say that a store failed, unless the cache turned read-only meanwhile: that
        was said once, by the cache, and a store racing it is refused for it."""
        if not self._store.read_only:
            _unkept.warning("%s: serving uncached bytes: %s", self._digest, exc)

    def _now_whole(self, record: BlobRecord) -> None:
        """Every chunk is in: readahead has nothing left to do, and the blob is sealed in
        the background unless its owner seals it (``seal_when_whole``)."""
        self._whole = True
        if not record.sealed and self._seal_when_whole:
            self._store.seal_later(self._digest)

    def load(self, indices: Sequence[int]) -> dict[int, Buffer]:
        """Those of ``indices`` the cache holds now (stored by another process meanwhile)."""
        blob_id = self.known_id()
        if blob_id is None or not indices:
            return {}
        first, last = min(indices), max(indices)
        end = min(self._size, (last + 1) * CHUNK_SIZE)
        try:
            out, _, _ = self._look_up(blob_id, first * CHUNK_SIZE, end)
        except CacheDamaged:
            return {}  # moved aside for an empty cache, or lost (``CacheEnv.lost``)
        wanted = set(indices)
        return {
            first + i: data
            for i, data in enumerate(out)
            if data is not None and first + i in wanted
        }

    # --- prefetch --------------------------------------------------------------

    def _start_fetching(self, source: BlobSource) -> None:
        """The fetcher; the hint queue and trace recorder that a client's reads feed; and
        the warm-up a cold open starts on a daemon thread (``warmup``)."""
        settings = self._settings
        fetcher = self._fetcher = self._new_fetcher(source)
        self._hints = HintQueue(self.plan)
        trace = None
        if settings.trace_replay and not self._whole:
            try:
                trace = TraceShelf(self._store).get(self._digest)
            except CacheError as exc:
                log.warning("%s", exc)
        self._readahead.limit_to(lambda: fetcher.window.bytes)
        if self._whole:
            return
        if trace is None and settings.trace_period > 0:
            self._recorder = TraceRecorder(self._digest, settings.trace_period, self._save_trace)
        if trace is not None:
            # The trace knows what will be read for as long as it was recorded; readahead
            # would fetch past what it read, and whole chunks where it read parts.
            quiet = min(trace.span_ms / 1000, REPLAY_QUIET_AT_MOST)
            self._quiet_until = time.monotonic() + quiet
            if self._keeps_parts(source, trace):
                self._block_fetcher = self._new_block_fetcher(source)
        warm_up = WarmUp(
            self, self._store, fetcher, self._block_fetcher, settings, self._readahead, self._stop
        )
        if warm_up.wanted(trace):
            threading.Thread(
                target=warm_up.run, args=(trace,), name="prefetch-start", daemon=True
            ).start()

    def _keeps_parts(self, source: BlobSource, trace: Trace) -> bool:
        """Whether a replay may fetch the trace's blocks alone: not where the bytes are
        checked whole (a sealed blob's chunks, a chunk index's), nor for a trace that
        knows only whole chunks."""
        return (
            self._settings.trace_blocks
            and trace.unit < CHUNK_SIZE
            and self._sums is None
            and not getattr(source, "checks_whole_chunks", False)
        )

    def _new_block_fetcher(self, source: BlobSource) -> Fetcher:
        """A fetcher of single 4 KiB blocks, for a trace replay: what it fetches is kept as
        parts of chunks. Its in-flight table is its own (its indices count blocks) but
        shares the chunks' lock, so neither fetches bytes the other is fetching: it
        claims no block of a chunk on its way, a chunk fetch waits for the blocks on
        theirs (``_load_chunks``), and so does a read (``_join_block_fetches``)."""
        chunks = self._store.flights(self._digest)
        return Fetcher(
            source,
            BLOCK,
            self._block_arrived,
            self._keep_blocks,
            self._load_blocks,
            flights=chunks.blocks(),
            brought_by_others=lambda block: block // BLOCKS in chunks.pending,
            leases=self._leases(1),
            lease_wait=self._settings.lease_wait,
            on_request=self._requesting,
            lock_wait=self._store.write_lock_wait,
            keeps_nothing=self._lost,
        )

    def _block_arrived(self, index: int, block: memoryview) -> Buffer:
        """Blocks can be checked only against a chunk's sums: none once the blob is sealed
        (by another process, meanwhile), so they are refused then."""
        if self._sums is not None:
            raise ChunkIntegrityError(f"{self._digest} was sealed: its chunks are fetched whole")
        self._store.counters.add(bytes_fetched=len(block))
        return block

    def _keep_blocks(self, runs: list[tuple[int, list[Buffer]]]) -> None:
        """Store fetched blocks as parts of their chunks (whole chunks once complete)."""
        by_chunk: dict[int, dict[int, Buffer]] = {}
        for first, blocks in runs:
            for block, data in enumerate(blocks, first):
                by_chunk.setdefault(block // BLOCKS, {})[block % BLOCKS] = data
        if self._store.read_only:
            return
        try:
            record = self._store.store_parts(self._digest, self._size, by_chunk)
        except CacheError as exc:
            self._say_unkept(exc)
            return
        if record is not None:
            self._blob_id = record.blob_id
            if record.present == record.chunks:
                self._now_whole(record)

    def _load_chunks(self, indices: Sequence[int]) -> dict[int, Buffer]:
        """``load``, for the chunk fetcher: once the blocks of those chunks that a replay
        is fetching have come, so that no byte is asked for twice at once. (The replay in
        turn claims no block of a chunk on its way: ``brought_by_others``.)"""
        table = self._store.flights(self._digest).blocks_if_any
        if table is not None:  # some export of this blob has replayed blocks
            pending = table.on_their_way(
                b for i in indices for b in range(i * BLOCKS, (i + 1) * BLOCKS)
            )
            if pending:
                table.join(pending)  # hurried along, as demand
                # Stored in a moment, as a rule; a cache that takes no writes (a stopped
                # process holds its lock) costs the chunk a fetch, not the reader a wait.
                table.wait_settled(pending, READER_STORE_WAIT)
        return self.load(indices)

    def _load_blocks(self, indices: Sequence[int]) -> dict[int, Buffer]:
        """Those of the blocks ``indices`` the cache holds now, whole chunks or parts."""
        blob_id = self.known_id()
        if blob_id is None or not indices:
            return {}
        chunks = sorted({block // BLOCKS for block in indices})
        whole = self.load(chunks)
        held = self._store.read_parts(blob_id, [i for i in chunks if i not in whole])
        out: dict[int, Buffer] = {}
        for block in indices:
            index, at = divmod(block, BLOCKS)
            length = chunk_length(self._size, index)
            lo = at * BLOCK
            hi = min(lo + BLOCK, length)
            if index in whole:
                out[block] = memoryview(whole[index])[lo:hi]
            elif index in held:
                piece = parts.checked_slice(held[index], self._seed, index, length, lo, hi)
                if piece is not None:
                    out[block] = piece
        return out

    def _new_fetcher(self, source: BlobSource) -> Fetcher:
        """A fetcher of ``source`` sharing this blob's flights (and leases, if set)."""
        flights = self._store.flights(self._digest)
        return Fetcher(
            source,
            CHUNK_SIZE,
            self._arrived,
            self._keep,
            self._load_chunks,
            flights=flights,
            leases=self._leases(BLOCKS),
            lease_wait=self._settings.lease_wait,
            on_request=self._requesting,
            lock_wait=self._store.write_lock_wait,
            keeps_nothing=self._lost,
        )

    def _lost(self) -> bool:
        """Whether the cache is lost (``ChunkStore.lost``): nothing fetched is kept."""
        return self._store.lost() is not None

    def _leases(self, blocks: int) -> UnitLeases | None:
        """The blob's cross-process leases, in units of ``blocks`` 4 KiB blocks."""
        if not self._settings.leases or self._store.read_only:
            return None  # nothing fetched is kept, so nothing is worth sharing
        flights = self._store.flights(self._digest)
        with flights.lock:
            if flights.leases is None:
                try:
                    flights.leases = RangeLeases(self._store.path, self._digest)
                except OSError as exc:
                    # Out of inodes or descriptors, or not ours to write: the leases only
                    # keep processes from fetching the same bytes twice.
                    log.warning(
                        "%s: no leases between processes (%s): processes sharing this cache "
                        "may fetch the same bytes twice",
                        self._digest,
                        exc.strerror or exc,
                    )
                    return None
            return flights.leases.in_units_of(blocks)

    def _save_trace(self, trace: Trace) -> None:
        if self._store.read_only:
            return
        try:
            TraceShelf(self._store).put(trace)
        except CacheError as exc:
            log.warning("%s: access trace not kept: %s", self._digest, exc)

    def _note(self, offset: int, length: int) -> None:
        """Record a read in the trace, hit or miss; once the period is over, stop looking."""
        recorder = self._recorder
        if recorder is not None and not recorder.note(offset, length):
            self._recorder = None

    def _advise(self, offset: int, length: int, misses: int) -> None:
        """After a read: queue the readahead it calls for (a read that missed was
        advised before its fetch, see ``_ahead_of_miss``)."""
        if misses or self._no_readahead():
            return
        ahead = self._readahead.advise(offset, length, self._size)
        if ahead is not None:
            self._hints.submit(*ahead, PREFETCH)  # type: ignore[union-attr]

    def _no_readahead(self) -> bool:
        """Whether reading ahead does no good now: a replayed trace holds the reads to
        come (its quiet time), or the cache is lost (``ChunkStore.lost``): what came
        ahead would not be kept, and each read would fetch it again."""
        return time.monotonic() < self._quiet_until or self._lost()

    def _ahead_of_miss(self, offset: int, length: int) -> list[int]:
        """Readahead for a read that missed: chunks to fetch with it, in its requests.

        A sequential reader that outruns the prefetch (or many reads of one
        stream at once, as nbdcopy sends them) then asks for few large
        ranges instead of many small ones, as the kernel's synchronous
        readahead does.
        """
        if self._no_readahead():
            return []
        ahead = self._readahead.advise(offset, length, self._size)
        if ahead is None:
            return []
        start, count = ahead
        indices = range(start // CHUNK_SIZE, (start + count - 1) // CHUNK_SIZE + 1)
        return self._store.missing(self.known_id(), indices)

    def plan(self, offset: int, length: int, priority: int) -> None:
        """A hint, off the read path: queue the range's missing chunks."""
        end = min(self._size, offset + length)
        if end <= offset or self._fetcher is None:
            return
        indices = range(offset // CHUNK_SIZE, (end - 1) // CHUNK_SIZE + 1)
        missing = self._store.missing(self.known_id(), indices)
        if missing:
            self._fetcher.prefetch(missing, priority)
