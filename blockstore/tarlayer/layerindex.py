"""Index a tar layer: its EROFS metadata, and for compressed layers its restart points.

A plain tar is indexed by walking its headers with range reads: no file data
is fetched. A gzip or zstd layer is read once, start to end: the tar walker
reads the decompressed stream while the checkpoints (or frame starts) are
recorded and both digests are computed; the index is kept only if the blob's
digest and the tar's diff_id match, so it is built from verified bytes only.

``SpanIndex`` then turns any uncompressed offset into a span that can be
decompressed on its own, and checks each decompressed span against the
sha256 the verified pass recorded for it, so no later fetch can make it
serve a wrong byte.
"""

from __future__ import annotations

import bisect
import hashlib
import logging
import mmap
import struct
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import IO, NoReturn

from blockstore.errors import BlockstoreError, IntegrityError
from blockstore.progress import Progress
from blockstore.registry.mediatypes import GZIP, ZSTD
from blockstore.tarlayer.erofs_reader import tar_start
from blockstore.tarlayer.erofs_writer import write_metadata
from blockstore.tarlayer.gzindex import DEFAULT_SPAN, GzipIndexer, Zinfo, read_span, span_range
from blockstore.tarlayer.tarwalk import (
    END_LOOKED_AT,
    BoundedTarInfo,
    RangeFile,
    WindowedReads,
    check_end,
    entry_of,
    members_of,
    walk_tar,
)
from blockstore.tarlayer.tree import DamagedTar, build_tree
from blockstore.tarlayer.zstdframes import ZstdIndexer, decode_frames, stream_frames

INDEX_FORMAT = 10  # bump when the metadata image or the span index changes shape or meaning
_KIND_CODES = {GZIP: 1, ZSTD: 2}
_MAGIC = b"BSSPANS\x01"
_HEAD = struct.Struct("<8sBQQQI")  # magic, kind, span, compressed, uncompressed, count
_POINT = struct.Struct("<QQ32s")  # compressed offset, uncompressed offset, sha256 of the span

log = logging.getLogger(__name__)

ReadRange = Callable[[int, int], bytes]
# A zstd span larger than this (one frame for the whole layer, as ``zstd FILE``
# writes) is decompressed as a stream into a file, not whole in memory.
LARGE_SPAN = 64 << 20


@dataclass(frozen=True)
class SpanIndex:
    """Restart points into a compressed tar, with each span's verified sha256."""

    kind: str
    span: int
    compressed_size: int
    uncompressed_size: int
    points: tuple[tuple[int, int], ...]  # (compressed, uncompressed) offsets
    digests: tuple[bytes, ...] | None  # None: a zinfo from elsewhere, spans unchecked
    zinfo: Zinfo | None = None  # gzip: the windows to resume from

    @cached_property
    def starts(self) -> list[int]:
        return [u for _, u in self.points]

    def span_of(self, offset: int) -> int:
        return bisect.bisect_right(self.starts, offset) - 1

    def bounds(self, index: int) -> tuple[int, int]:
        start = self.points[index][1]
        end = self.points[index + 1][1] if index + 1 < len(self.points) else self.uncompressed_size
        return start, end

    def compressed_bounds(self, index: int) -> tuple[int, int]:
        """The compressed bytes span ``index`` is made from (gzip: with the bytes that
        hold its first and last bits), exactly those ``decompress`` reads."""
        if self.kind == GZIP:
            assert self.zinfo is not None
            return span_range(self.zinfo, index, self.compressed_size)
        if index + 1 == len(self.points):
            return self.points[index][0], self.compressed_size
        return self.points[index][0], self.points[index + 1][0]

    def decompress(
        self, index: int, read_compressed: ReadRange, scratch: Path | None = None
    ) -> bytes | bytearray | memoryview | mmap.mmap:
        """The uncompressed bytes of span ``index``, checked against the verified pass.
        A zstd span over ``LARGE_SPAN`` is decompressed into an unlinked file in the
        ``scratch`` directory and mapped, so that neither its compressed nor its
        uncompressed bytes are ever all in memory."""
        start, end = self.bounds(index)
        if self.kind == ZSTD and end - start > LARGE_SPAN and scratch is not None:
            try:
                return self._decompress_into_file(index, read_compressed, scratch)
            except OSError as exc:
                if isinstance(exc, BlockstoreError):
                    raise  # the compressed bytes could not be had: the same in memory
                # No room beside the cache (a full disk): a read served from memory is
                # better than none.
                log.warning(
                    "%s span %d: no room to decompress it beside the cache (%s): "
                    "decompressing it in memory",
                    self.kind,
                    index,
                    exc.strerror or exc,
                )
        data: bytes | bytearray | memoryview
        if self.kind == GZIP:
            assert self.zinfo is not None
            data = read_span(read_compressed, self.compressed_size, self.zinfo, index, end - start)
        else:
            comp, comp_end = self.compressed_bounds(index)
            data = decode_frames(read_compressed(comp, comp_end - comp))
        if len(data) != end - start or (
            self.digests is not None and hashlib.sha256(data).digest() != self.digests[index]
        ):
            self._mismatch(index)
        return data

    def _decompress_into_file(
        self, index: int, read_compressed: ReadRange, scratch: Path
    ) -> mmap.mmap:
        start, end = self.bounds(index)
        comp, comp_end = self.compressed_bounds(index)
        digest = hashlib.sha256()
        made = 0
        with tempfile.TemporaryFile(dir=scratch, prefix="span-") as file:
            for piece in stream_frames(read_compressed, comp, comp_end):
                made += len(piece)
                if made > end - start:
                    self._mismatch(index)
                digest.update(piece)
                file.write(piece)
            if made != end - start or (
                self.digests is not None and digest.digest() != self.digests[index]
            ):
                self._mismatch(index)
            file.flush()
            return mmap.mmap(file.fileno(), made, access=mmap.ACCESS_READ)

    def _mismatch(self, index: int) -> NoReturn:
        start, end = self.bounds(index)
        raise IntegrityError(
            f"{self.kind} span {index} (bytes {start}-{end} of the tar) does not match"
            " the digest recorded when the layer was indexed"
        )

    def to_bytes(self) -> bytes:
        return b"".join(self.parts())

    def table(self) -> bytes:
        """The span index without the zinfo that follows it (a gzip layer's)."""
        return b"".join(self._table_parts())

    def parts(self) -> list[bytes]:
        """The span index's bytes in pieces, the zinfo's windows among them uncopied."""
        return self._table_parts() + (self.zinfo.parts() if self.zinfo is not None else [])

    def _table_parts(self) -> list[bytes]:
        assert self.digests is not None, "only an index built here is stored"
        parts = [
            _HEAD.pack(
                _MAGIC,
                _KIND_CODES[self.kind],
                self.span,
                self.compressed_size,
                self.uncompressed_size,
                len(self.points),
            )
        ]
        parts += [_POINT.pack(c, u, d) for (c, u), d in zip(self.points, self.digests, strict=True)]
        return parts

    @classmethod
    def from_bytes(cls, data: bytes) -> SpanIndex:
        if len(data) < _HEAD.size:
            raise IntegrityError("span index: truncated")
        magic, code, span, csize, usize, count = _HEAD.unpack_from(data, 0)
        kinds = {v: k for k, v in _KIND_CODES.items()}
        if magic != _MAGIC or code not in kinds:
            raise IntegrityError("span index: not this format or version")
        pos = _HEAD.size
        if len(data) < pos + count * _POINT.size or count == 0:
            raise IntegrityError("span index: truncated")
        points, digests = [], []
        for _ in range(count):
            c, u, d = _POINT.unpack_from(data, pos)
            points.append((c, u))
            digests.append(d)
            pos += _POINT.size
        # A view: the zinfo, its windows, is most of the record, and is copied out once.
        zinfo = Zinfo.from_bytes(memoryview(data)[pos:]) if kinds[code] == GZIP else None
        if zinfo is None and pos != len(data):
            raise IntegrityError("span index: trailing bytes")
        if zinfo is not None and [(p.compressed, p.uncompressed) for p in zinfo.checkpoints] != (
            points
        ):
            raise IntegrityError("span index: checkpoints disagree")
        if points != sorted(points) or points[-1][1] > usize:
            raise IntegrityError("span index: points out of order")
        return cls(kinds[code], span, csize, usize, tuple(points), tuple(digests), zinfo)


@dataclass(frozen=True)
class TarIndex:
    """What serving a tar layer needs: the metadata image and, if compressed, the spans."""

    metadata: bytes
    tar_size: int
    spans: SpanIndex | None
    tar_digest: str  # sha256 of the uncompressed tar (the diff_id): its cache key

    @property
    def tar_start(self) -> int:
        """Where the tar starts on the device: where the image's device slot puts it."""
        return tar_start(self.metadata)


class DiffIdMismatch(IntegrityError):
    """The image config names another tar than the layer's: the config is wrong, not the
    layer's bytes (which may have checked out against the blob digest)."""


def check_diff_id(tar_digest: str, diff_id: str | None, blob_digest: str | None = None) -> None:
    """The tar a layer is read from (an uncompressed layer's is the blob itself) must
    be the one the image config names (``diff_id``; None: the config names none):
    a config that says otherwise describes another layer. One naming the compressed
    blob itself is a pusher's known mistake, said as such."""
    if diff_id is None or diff_id == tar_digest:
        return
    said = f"the tar's diff_id is {tar_digest}, expected {diff_id}: not indexed"
    if diff_id == blob_digest:
        said += (
            "; the image config gives the compressed blob's own digest where the "
            "uncompressed tar's belongs (rootfs.diff_ids): the tool that pushed the image "
            "wrote its config wrong, so push it again with one that writes the tar's digest"
        )
    raise DiffIdMismatch(said)


def index_plain_tar(read_range: ReadRange, size: int, blob_digest: str) -> TarIndex:
    """Index an uncompressed tar blob by reading its headers, and small files between them
    in the same requests (``WindowedReads``): not one round trip per header."""
    tree = build_tree(walk_tar(RangeFile(WindowedReads(read_range, size).read, size)))
    return TarIndex(write_metadata(tree, size), size, None, blob_digest)


def _check(what: str, expected: str | None, actual: str) -> None:
    if expected is not None and expected != actual:
        raise IntegrityError(f"{what} is {actual}, expected {expected}: not indexed")


def _counted(sink: Callable[[bytes], None] | None, progress: Progress) -> Callable[[bytes], None]:
    """``sink``, saying how much of the tar it was given (a one-frame zstd layer of many
    GiB is read in a moment, then inflated for minutes)."""
    made = 0

    def counted(piece: bytes) -> None:
        nonlocal made
        made += len(piece)
        progress.reached(made)
        if sink is not None:
            sink(piece)

    return counted


def index_compressed_tar(
    source: IO[bytes],
    kind: str,
    *,
    blob_digest: str | None,
    diff_id: str | None,
    span: int = DEFAULT_SPAN,
    sink: Callable[[bytes], None] | None = None,
) -> TarIndex:
    """Read a gzip or zstd layer once; index it if both digests match. ``sink`` is
    given the uncompressed tar, in order, as the pass makes it."""
    indexer: GzipIndexer | ZstdIndexer
    indexer = GzipIndexer(source, span) if kind == GZIP else ZstdIndexer(source, span)
    indexer.sink = _counted(sink, Progress(f"{blob_digest or kind}: tar made to index it", None))
    try:
        with tarfile.open(
            fileobj=indexer,
            mode="r|",
            encoding="utf-8",
            errors="surrogateescape",
            tarinfo=BoundedTarInfo,
        ) as archive:
            tree = build_tree(entry_of(member) for member in members_of(archive))
            end = archive.offset
    except tarfile.TarError as exc:
        if not indexer.made_nothing():
            raise DamagedTar(f"not a readable tar stream: {exc}") from exc
        tree = build_tree([])  # no tar at all: an empty layer, as Docker and containerd take it
    else:
        indexer.make_to(end + END_LOOKED_AT)
        check_end(end, indexer.made_at(end, END_LOOKED_AT))
    if isinstance(indexer, GzipIndexer):
        zinfo, size = indexer.finish()
        points = tuple((c.compressed, c.uncompressed) for c in zinfo.checkpoints)
    else:
        zinfo, size = None, indexer.finish()
        points = tuple(indexer.points)
    _check("the blob's digest", blob_digest, "sha256:" + indexer.blob_sha256.hexdigest())
    tar_digest = "sha256:" + indexer.tar_sha256.hexdigest()
    check_diff_id(tar_digest, diff_id, blob_digest)
    spans = SpanIndex(
        kind,
        span,
        indexer.compressed_size,
        size,
        points,
        tuple(indexer.span_digests),
        zinfo,
    )
    return TarIndex(write_metadata(tree, size), size, spans, tar_digest)
