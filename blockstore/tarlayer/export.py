"""A tar layer served as one device: ``EROFS metadata || zeros || uncompressed tar``.

The kernel mounts that range as EROFS in flat-device mode: the metadata at
the start, and every file's chunk index pointing into the tar after it, where
the metadata's device slot puts it (``erofs_writer.GAP`` past its end, or
right at it in an erofs-utils image).

- Plain tar: the tar part is the blob's own cached chunks.
- gzip/zstd: the tar part is a blob of its own in the cache, keyed by the
  diff_id (the sha256 of the uncompressed tar, so sealing it checks exactly
  that), whose chunks come from ``DecompressedTar``: a miss decompresses the
  whole span around it once, keeps it, and serves every chunk of that span
  from it; each span is checked against the digest the indexing pass saw.
- The metadata image and the span index live in the cache too
  (``indexcache``): a damaged one is rebuilt.
"""

from __future__ import annotations

import atexit
import logging
import mmap
import tempfile
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import IO, TYPE_CHECKING, Protocol

from blockstore import erofs_format
from blockstore.cache import CHUNK_SIZE
from blockstore.errors import BlobReadError, BlockstoreError, CacheError, IntegrityError
from blockstore.export import Buffer
from blockstore.progress import Progress
from blockstore.tarlayer import layerindex
from blockstore.tarlayer.erofs_reader import tar_start
from blockstore.tarlayer.layerindex import ReadRange, SpanIndex
from blockstore.throttledlog import ThrottledLog

if TYPE_CHECKING:
    from blockstore.cache import ChunkStore

log = logging.getLogger(__name__)

_unkept = ThrottledLog(
    log,
    "%d more inflated pieces in the %.0f s after those logged were served but not kept, "
    "not logged one by one",
)
"""A cache that takes no writes (a full disk, a file size limit) fails every span's store."""
atexit.register(_unkept.flush)

SPANS_KEPT = 10
"""Decompressed spans kept in memory: a span's chunks are asked for one by one, and the
spans waiting for ``SpanWriter`` are served from here."""
FAILED_SPAN_QUIET = 5.0  # seconds a failed large span fails its readers at once
KEEP_STEP = 8 << 20  # a multiple of CHUNK_SIZE


class RangeReader(Protocol):
    """What the tar part is read through: an ``Export`` (a cached blob) answers it."""

    @property
    def size(self) -> int: ...

    def read(self, offset: int, length: int) -> Sequence[Buffer]: ...

    def read_cached(self, offset: int, length: int) -> Sequence[Buffer] | None: ...

    def cache(self, offset: int, length: int) -> None: ...


class TarLayerExport:
    """``metadata || zeros || tar`` (padded to 512 bytes) as one read-only byte range: the
    tar where the metadata image's device slot puts it, the zeros between served here."""

    def __init__(
        self,
        metadata: bytes,
        tar: RangeReader,
        tar_size: int,
        *,
        name: str = "",
        description: str = "",
    ):
        self._meta = memoryview(metadata)
        self._tar = tar
        self._tar_size = tar_size
        self._tar_start = tar_start(metadata)
        self._name = name
        self._description = description
        self._size = self._tar_start + erofs_format.align(tar_size, erofs_format.BLOCK_SIZE)

    @property
    def name(self) -> str:
        return self._name

    @property
    def description(self) -> str:
        return self._description

    @property
    def size(self) -> int:
        return self._size

    def _split(self, offset: int, length: int) -> tuple[list[Buffer], tuple[int, int], int]:
        """(metadata buffers and the gap's zeros, tar range, zero padding bytes) of one
        request."""
        meta_len, start = len(self._meta), self._tar_start
        end = offset + length
        head = [self._meta[offset : min(end, meta_len)]] if offset < meta_len else []
        if (gap := min(end, start) - max(offset, meta_len)) > 0:
            head.append(bytes(gap))
        t0 = max(offset, start) - start
        t1 = min(end - start, self._tar_size) if end > start else 0
        pad = end - start - max(t1, t0) if end > start + self._tar_size else 0
        return head, (t0, max(0, t1 - t0)), pad

    def read(self, offset: int, length: int) -> list[Buffer]:
        head, (t0, tn), pad = self._split(offset, length)
        out = head + (list(self._tar.read(t0, tn)) if tn else [])
        if pad:
            out.append(bytes(pad))
        return out

    def read_cached(self, offset: int, length: int) -> list[Buffer] | None:
        head, (t0, tn), pad = self._split(offset, length)
        tail: Sequence[Buffer] = []
        if tn:
            got = self._tar.read_cached(t0, tn)
            if got is None:
                return None
            tail = got
        return head + list(tail) + ([bytes(pad)] if pad else [])

    def cache(self, offset: int, length: int) -> None:
        _, (t0, tn), _ = self._split(offset, length)
        if tn:
            self._tar.cache(t0, tn)


class DecompressedTar:
    """The uncompressed tar of a gzip/zstd blob as a ``BlobSource``, span by span."""

    def __init__(
        self,
        spans: SpanIndex,
        read_compressed: ReadRange,
        digest: str,
        keep: Callable[[int, Buffer], None] | None = None,
        scratch: Path | None = None,
        unkept: Callable[[int], str | None] | None = None,
    ):
        """``keep(offset, data)`` is given each span decompressed, to cache all of it;
        ``scratch``: where a span too large for memory is decompressed to;
        ``unkept(length)``: why a span of ``length`` bytes is not to be kept, or None."""
        self.spans = spans
        self._scratch = scratch
        self._keep = keep
        self._unkept = unkept
        self._said_unkept = False
        self._read_compressed = read_compressed
        self._digest = digest
        self._kept: OrderedDict[int, Buffer] = OrderedDict()
        self._lock = threading.Lock()
        self._span_locks: dict[int, threading.Lock] = {}
        self.decompressions: Counter[int] = Counter()  # span index -> times decompressed
        self._failed: dict[int, tuple[float, str]] = {}  # span -> (when, why) it last failed

    @property
    def digest(self) -> str:
        return self._digest

    @property
    def size(self) -> int:
        return self.spans.uncompressed_size

    def span(self, index: int) -> Buffer:
        """Span ``index`` decompressed (once, however many threads ask for it at once),
        checked, and handed to ``keep``."""
        with self._lock:
            data = self._kept.get(index)
            if data is not None:
                self._kept.move_to_end(index)
                return data
            span_lock = self._span_locks.setdefault(index, threading.Lock())
        with span_lock:  # one decompression per span, however many readers wait on it
            with self._lock:
                data = self._kept.get(index)
                failed = self._failed.get(index)
            if data is None:
                if failed is not None and time.monotonic() - failed[0] < FAILED_SPAN_QUIET:
                    # Readers of one file come by the dozen: one failure of a span of the
                    # whole layer each would fetch and inflate it again each time.
                    raise BlobReadError(f"{self._digest}: {failed[1]} (a moment ago)")
                try:
                    data = self.spans.decompress(index, self._read_compressed, self._scratch)
                except (IntegrityError, OSError) as exc:
                    failure = exc if isinstance(exc, BlockstoreError) else exc.strerror or exc
                    start, end = self.spans.bounds(index)
                    if end - start > layerindex.LARGE_SPAN:  # a small one is cheap to redo
                        with self._lock:
                            self._failed[index] = (time.monotonic(), str(failure))
                    if isinstance(exc, BlobReadError):
                        raise
                    raise BlobReadError(f"{self._digest}: {failure}") from exc
                with self._lock:
                    self._failed.pop(index, None)
                self.decompressions[index] += 1
                if self._keep is not None and self._keeps(index):
                    for offset, piece in _steps(self.spans.bounds(index)[0], data):
                        self._keep(offset, piece)
            with self._lock:
                self._kept[index] = data
                self._kept.move_to_end(index)
                while len(self._kept) > SPANS_KEPT:
                    self._kept.popitem(last=False)
        return data

    def _keeps(self, index: int) -> bool:
        """Whether span ``index`` is to be kept: one larger than the cache's cap, stored,
        would evict the rest of the cache, then its own first chunks. Its readers are
        served from it all the same; the first such span says so."""
        start, end = self.spans.bounds(index)
        why = self._unkept(end - start) if self._unkept is not None else None
        if why is not None and not self._said_unkept:
            self._said_unkept = True
            log.warning("%s: %s; served as read, not kept in the cache", self._digest, why)
        return why is None

    def read_range(self, offset: int, length: int) -> bytes:
        end = min(offset + length, self.size)
        parts = []
        pos = offset
        while pos < end:
            index = self.spans.span_of(pos)
            start, stop = self.spans.bounds(index)
            data = memoryview(self.span(index))
            parts.append(data[pos - start : min(stop, end) - start])
            pos = min(stop, end)
        return b"".join(parts)


def _steps(offset: int, data: Buffer) -> Iterator[tuple[int, Buffer]]:
    """``data`` at ``offset`` in pieces of at most ``KEEP_STEP`` that end on chunk
    boundaries: each piece is one commit, and LMDB holds a commit's pages in memory."""
    if len(data) <= KEEP_STEP:
        yield offset, data
        return
    view = memoryview(data)
    end = offset + len(data)
    at = offset
    while at < end:
        stop = min(end, (at // KEEP_STEP + 1) * KEEP_STEP)
        yield at, view[at - offset : stop - offset]
        at = stop


class SpanFiller:
    """Stores every chunk of each decompressed span in the cache, the edges included.

    Spans start and end where the compressor's blocks do, rarely on a chunk
    boundary: the chunk a span shares with its neighbour waits here, in
    pieces (at most two per span, each under a chunk), until the neighbour is
    decompressed too, and is then stored whole. So a layer whose every span
    went through here is whole in the cache, ready to be sealed; and a later
    miss anywhere in a decompressed span is a cache hit, not another
    decompression.
    """

    def __init__(self, store: ChunkStore, digest: str, size: int):
        self._store = store
        self._digest = digest
        self._size = size
        self._pieces: dict[int, dict[int, bytes]] = {}  # chunk -> {offset in it: bytes}
        self._lock = threading.Lock()

    def __call__(self, offset: int, data: Buffer) -> None:
        self.put(self.runs(offset, data))

    def runs(self, offset: int, data: Buffer) -> list[tuple[int, Sequence[Buffer]]]:
        """The runs of whole chunks ``data`` at ``offset`` completes, to be ``put``: its
        own, and any chunk its edges finish with pieces kept from a neighbour."""
        out: list[tuple[int, Sequence[Buffer]]] = []
        size = self._size
        end = offset + len(data)
        whole_from = min(-(-offset // CHUNK_SIZE) * CHUNK_SIZE, end)
        whole_to = end if end == size else max(whole_from, end // CHUNK_SIZE * CHUNK_SIZE)
        view = memoryview(data)
        if whole_to > whole_from:
            chunks = [
                view[pos - offset : min(pos + CHUNK_SIZE, whole_to) - offset]
                for pos in range(whole_from, whole_to, CHUNK_SIZE)
            ]
            out.append((whole_from // CHUNK_SIZE, chunks))
        if offset < whole_from:
            out += self._piece(offset, bytes(view[: whole_from - offset]))
        if whole_to < end:
            out += self._piece(whole_to, bytes(view[whole_to - offset :]))
        return out

    def _piece(self, offset: int, data: bytes) -> list[tuple[int, Sequence[Buffer]]]:
        """Keep a piece of a chunk; the chunk as a run once its pieces cover it."""
        index = offset // CHUNK_SIZE
        base = index * CHUNK_SIZE
        length = min(CHUNK_SIZE, self._size - base)
        with self._lock:
            pieces = self._pieces.setdefault(index, {})
            pieces[offset - base] = data
            if sum(len(p) for p in pieces.values()) < length:
                return []
            del self._pieces[index]
        chunk = b"".join(pieces[at] for at in sorted(pieces))
        # A span's bytes are checked: its pieces tile the chunk.
        return [(index, [chunk])] if len(chunk) == length else []

    def put(self, runs: Sequence[tuple[int, Sequence[Buffer]]]) -> None:
        """Store ``runs`` in one commit."""
        if not runs:
            return
        try:
            self._store.store_runs(self._digest, self._size, runs)
        except (CacheError, IntegrityError) as exc:  # costs only the caching
            _unkept.warning(
                "%s: inflated bytes served but not kept in the cache: %s", self._digest, exc
            )


class SpanWriter:
    """Stores the spans handed to it on a thread of its own, all that wait in one commit.

    The threads that inflate spans then never wait for the cache's one
    writer, and a commit (an fsync) covers several spans. At most
    ``WAITING`` spans wait; more makes the inflating thread wait. A span
    handed here is kept by ``DecompressedTar`` until stored (it holds
    ``SPANS_KEPT`` of them), so readers are served from it meanwhile.
    """

    WAITING = 4

    def __init__(self, fill: SpanFiller):
        self._fill = fill
        self._waiting: deque[tuple[int, Buffer]] = deque()
        self._busy = False
        self._closed = False
        self._changed = threading.Condition()
        threading.Thread(target=self._run, name="span-store", daemon=True).start()

    def __call__(self, offset: int, data: Buffer) -> None:
        with self._changed:
            while len(self._waiting) >= self.WAITING and not self._closed:
                self._changed.wait()
            if not self._closed:
                self._waiting.append((offset, data))
                self._changed.notify_all()

    def flush(self) -> None:
        """Wait until every span handed over is stored."""
        with self._changed:
            while (self._waiting or self._busy) and not self._closed:
                self._changed.wait()

    def close(self) -> None:
        """Stop; spans still waiting are not stored (they cost only the caching)."""
        with self._changed:
            self._closed = True
            self._waiting.clear()
            self._changed.notify_all()

    def _run(self) -> None:
        while True:
            with self._changed:
                while not self._waiting and not self._closed:
                    self._changed.wait()
                if self._closed:
                    return
                taken = list(self._waiting)
                self._waiting.clear()
                self._busy = True
                self._changed.notify_all()
            try:
                runs = [run for offset, data in taken for run in self._fill.runs(offset, data)]
                self._fill.put(runs)
            finally:
                with self._changed:
                    self._busy = False
                    self._changed.notify_all()


ISIZE_MODULUS = 1 << 32
"""A gzip trailer gives the uncompressed size modulo this."""


class PassFill:
    """The tar an indexing pass makes, stored as the pass goes: the pass doubles as the fill.

    Its pieces are gathered into batches of whole chunks and stored on a
    thread of their own, so LMDB commits while the pass inflates on. It needs
    the tar's digest and its size from the gzip trailer before the pass: a tar
    of 4 GiB or more has the trailer's size plus a multiple of 4 GiB, so the
    size grows by 4 GiB each time the pass makes more than it (and comes back to
    what the pass made, for a stream of several members, whose trailer gives the
    last member's size alone). What it stored counts only if the pass then checks
    both digests and ends at that size (``finish``), and is removed otherwise, so
    nothing unverified stays.
    """

    BATCH = 4 << 20
    AHEAD = 2  # batches waiting for the writer before the pass waits for it

    def __init__(self, store: ChunkStore, digest: str, size: int):
        self._store = store
        self._digest = digest
        self._size = size
        self._fill = SpanFiller(store, digest, size)
        self._pieces: list[bytes] = []
        self._gathered = 0
        self._offset = 0  # of the first gathered byte in the tar
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="tar-keep")
        self._pending: deque[Future[None]] = deque()
        self._overflow = False
        self._grown = False  # the trailer's size proved short: the cap was checked on it

    def __call__(self, piece: bytes) -> None:
        if self._overflow:
            return
        end = self._offset + self._gathered + len(piece)
        if end > self._size:
            self._grow(end)
            if self._overflow:
                return
        if (
            self._grown
            and (why := self._store.over_cap(self._digest, end, passed=True)) is not None
        ):
            # The size the cap was asked about was the trailer's, of the last member alone:
            # kept on, the tar would evict the rest of the cache, then its own first chunks.
            log.warning("%s; not kept from its indexing pass, so nothing else is evicted", why)
            self._overflow = True  # finish() removes what was stored
            return
        self._pieces.append(piece)
        self._gathered += len(piece)
        if self._gathered >= self.BATCH:
            self._flush(whole_chunks=True)

    def _flush(self, *, whole_chunks: bool) -> None:
        data = b"".join(self._pieces)
        length = len(data) // CHUNK_SIZE * CHUNK_SIZE if whole_chunks else len(data)
        rest = data[length:]
        self._pieces = [rest] if rest else []
        self._gathered = len(rest)
        while len(self._pending) >= self.AHEAD:
            self._pending.popleft().result()
        batch = memoryview(data)[:length]
        self._pending.append(self._writer.submit(self._fill, self._offset, batch))
        self._offset += length

    def _grow(self, end: int) -> None:
        """The pass made more than the trailer said: the tar is ``ISIZE_MODULUS`` bytes
        longer per wrap, as far as ``end`` needs."""
        size = self._size + -(-(end - self._size) // ISIZE_MODULUS) * ISIZE_MODULUS
        if self._resize(size):
            self._grown = True

    def _resize(self, size: int) -> bool:
        """Make the tar ``size`` bytes long, once the batches handed to the writer are
        stored at the old size; False if the store refused, and then nothing more is
        kept (``finish`` removes what was)."""
        self._wait_stored()
        try:
            self._store.resize(self._digest, size)
        except CacheError as exc:
            log.warning("%s: the tar is not kept from its indexing pass: %s", self._digest, exc)
            self._overflow = True
            return False
        self._size = size
        self._fill = SpanFiller(self._store, self._digest, size)
        return True

    def _wait_stored(self) -> None:
        for pending in self._pending:
            pending.result()
        self._pending.clear()

    def finish(self, verified_size: int | None) -> bool:
        """Store the rest if the pass checked both digests and made ``verified_size``
        bytes (None: it failed); else remove what was stored. True if the tar is kept."""
        if verified_size is not None and not self._overflow and verified_size < self._size:
            # Less than ``_grow`` took it for: a stream of several members, whose trailer
            # gave the last one's size alone. What is stored lies within what the pass
            # made (whole chunks, from its start), so the tar is that long.
            self._resize(verified_size)
        whole = not self._overflow and verified_size == self._size
        if whole and self._gathered:
            self._flush(whole_chunks=False)
        self._wait_stored()
        self._writer.shutdown()
        whole = whole and self._offset == self._size
        if not whole:
            self._store.remove(self._digest)
            if verified_size is not None and not self._overflow:
                log.warning(
                    "%s: the tar is not kept from its indexing pass: it made %d bytes, "
                    "the gzip trailer said %d",
                    self._digest,
                    verified_size,
                    self._size,
                )
        return whole


class SpooledPassFill:
    """The tar an indexing pass makes, kept when the tar's size is not known before the
    pass (zstd names none up front, or only its first frame's): spooled to an unlinked
    file beside the cache, and stored from it once the pass has checked both digests.
    The pass then doubles as the fill, as ``PassFill`` makes it for gzip, and no read
    has to decompress the layer again. What fails to be spooled or stored leaves the
    layer to be read span by span, as without it."""

    def __init__(self, store: ChunkStore, digest: str, scratch: Path):
        self._store = store
        self._digest = digest
        # Open across the pass: closed by ``finish``.
        self._file: IO[bytes] | None = tempfile.TemporaryFile(dir=scratch, prefix="tar-")  # noqa: SIM115
        self._size = 0

    def __call__(self, piece: bytes) -> None:
        if self._file is None:
            return
        if (
            why := self._store.over_cap(self._digest, self._size + len(piece), passed=True)
        ) is not None:
            # Spooled on, a tar the cap will not keep would only fill the disk.
            self._give_up(f"{why}; so nothing else is evicted for it")
            return
        try:
            self._file.write(piece)
        except OSError as exc:
            self._give_up(f"spooling it failed: {exc.strerror}")
            return
        self._size += len(piece)

    def finish(self, verified_size: int | None) -> bool:
        """Store the spooled tar if the pass checked both digests and made
        ``verified_size`` bytes (None: it failed). True if the tar is kept."""
        file = self._file
        if file is None or verified_size != self._size or not self._size:
            self._give_up(None)
            return False
        if (why := self._store.cannot_keep_whole(self._digest, self._size)) is not None:
            self._give_up(f"{why}; so nothing else is evicted for it")
            return False
        try:
            file.flush()
            # Not closed: the views handed to the store may outlive this call.
            data = mmap.mmap(file.fileno(), self._size, access=mmap.ACCESS_READ)
            fill = SpanFiller(self._store, self._digest, self._size)
            progress = Progress(
                f"{self._digest}: storing the tar its indexing pass made", self._size
            )
            for offset, piece in _steps(0, data):
                fill(offset, piece)
                progress.reached(offset + len(piece))
        except (OSError, CacheError) as exc:
            self._store.remove(self._digest)
            self._give_up(f"storing it failed: {exc}")
            return False
        finally:
            file.close()
            self._file = None
        return True

    def _give_up(self, why: str | None) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if why is not None:
            log.warning("%s: the tar is not kept from its indexing pass: %s", self._digest, why)
