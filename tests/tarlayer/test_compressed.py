"""Gzip checkpoints (SOCI zinfo v2) and zstd frame starts: one verified pass, random access."""

from __future__ import annotations

import gzip
import hashlib
import io
import itertools
import os
import random
import struct
import subprocess
import tarfile
import tracemalloc
from pathlib import Path

import pytest
import zstandard
from trees import make_tar

from blockstore.cache import CHUNK_SIZE, ChunkStore
from blockstore.errors import BlobReadError, IntegrityError
from blockstore.registry.mediatypes import GZIP, ZSTD
from blockstore.tarlayer import export as tar_export
from blockstore.tarlayer import gzindex, layerindex, zstdframes
from blockstore.tarlayer.erofs_reader import read_metadata
from blockstore.tarlayer.export import DecompressedTar
from blockstore.tarlayer.gzindex import POINT_SIZE, WINDOW, GzipIndexer, Zinfo
from blockstore.tarlayer.indexcache import IndexCache
from blockstore.tarlayer.layerindex import SpanIndex, index_compressed_tar
from blockstore.tarlayer.shared import index_blobs
from blockstore.tarlayer.tree import TarLayerError
from blockstore.tarlayer.zstdframes import decode_frames, stream_frames

SPAN = 256 << 10


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def layer_tar(tmp_path_factory) -> bytes:
    """A ~6 MiB tar of a real tree: compressible text and incompressible data mixed."""
    root = tmp_path_factory.mktemp("tree")
    src = root / "src"
    src.mkdir()
    (src / "random.bin").write_bytes(os.urandom(2 << 20))
    text = Path(os.__file__).read_bytes()
    for i in range(40):
        (src / f"text{i}.py").write_bytes(text[i * 1000 :] * 3)
    (src / "empty").write_bytes(b"")
    return make_tar(src, root / "layer.tar").read_bytes()


def compress(cmd: list[str], data: bytes) -> bytes:
    return subprocess.run(cmd, input=data, capture_output=True, check=True).stdout


def all_spans(spans: SpanIndex, blob: bytes) -> bytes:
    return b"".join(
        spans.decompress(i, lambda o, n: blob[o : o + n]) for i in range(len(spans.points))
    )


def test_gzip_one_pass_checks_both_digests_and_every_span_reads_back(layer_tar):
    """``gzip`` output indexed in one pass: checkpoints at least a span apart, each span
    decompressed from its checkpoint alone equals those bytes of the tar, and the tar
    walked in the same pass gives a metadata image the checker accepts."""
    blob = compress(["gzip", "-6", "-c"], layer_tar)
    index = index_compressed_tar(
        io.BytesIO(blob), GZIP, blob_digest=sha(blob), diff_id=sha(layer_tar), span=SPAN
    )
    spans = index.spans
    starts = spans.starts
    assert len(starts) > 10 and starts[0] == 0
    assert all(b - a > SPAN for a, b in itertools.pairwise(starts))
    assert index.tar_size == len(layer_tar) == spans.uncompressed_size
    for i in (0, len(starts) // 2, len(starts) - 1):
        lo, hi = spans.bounds(i)
        assert spans.decompress(i, lambda o, n: blob[o : o + n]) == layer_tar[lo:hi]
    assert all_spans(spans, blob) == layer_tar
    tree = read_metadata(index.metadata)
    f = tree.lookup([b"random.bin"])
    with tarfile.open(fileobj=io.BytesIO(layer_tar)) as archive:
        want = archive.extractfile("./random.bin").read()
    assert layer_tar[f.data_offset : f.data_offset + f.size] == want


def test_zinfo_bytes_are_soci_v2(layer_tar):
    """The zinfo file is a 12-byte header (u32 count, u64 span, little-endian) and per
    checkpoint u64 compressed offset, u64 uncompressed offset, u8 bits and a 32 KiB
    window, packed; the first checkpoint is just past the 10-byte gzip header; each
    window holds the 32 KiB of tar before its checkpoint."""
    blob = compress(["gzip", "-n", "-c"], layer_tar)
    indexer = GzipIndexer(io.BytesIO(blob), span=SPAN)
    zinfo, _ = indexer.finish()
    raw = zinfo.to_bytes()
    count = int.from_bytes(raw[0:4], "little")
    assert int.from_bytes(raw[4:12], "little") == SPAN
    assert len(raw) == 12 + count * (8 + 8 + 1 + 32768) and POINT_SIZE == 32785
    assert (int.from_bytes(raw[12:20], "little"), int.from_bytes(raw[20:28], "little")) == (10, 0)
    second = 12 + POINT_SIZE
    out = int.from_bytes(raw[second + 8 : second + 16], "little")
    assert raw[second + 16] < 8
    assert raw[second + 17 : second + 17 + WINDOW] == layer_tar[out - WINDOW : out]
    assert Zinfo.from_bytes(raw) == zinfo


def test_concatenated_gzip_members_and_trailing_zeros(layer_tar):
    """Two gzip members back to back (as pigz and stargz write) and zero padding after
    them: every span reads back, the one across the members' seam too, and the whole
    size is found from the last span alone (as for a zinfo given by the user)."""
    half = len(layer_tar) // 2
    blob = (
        compress(["gzip", "-c"], layer_tar[:half])
        + compress(["gzip", "-1", "-c"], layer_tar[half:])
        + b"\0" * 1000
    )
    index = index_compressed_tar(
        io.BytesIO(blob), GZIP, blob_digest=sha(blob), diff_id=sha(layer_tar), span=SPAN
    )
    assert half not in index.spans.starts  # no checkpoint for a member's start alone
    assert all_spans(index.spans, blob) == layer_tar
    zinfo = Zinfo.from_bytes(index.spans.zinfo.to_bytes())
    read = lambda o, n: blob[o : o + n]  # noqa: E731
    assert gzindex.inflated_size(read, len(blob), zinfo) == len(layer_tar)


@pytest.mark.parametrize("libdeflate", [True, False])
def test_a_gzip_member_per_file_costs_no_checkpoint_per_file(layer_tar, libdeflate, monkeypatch):
    """Tried: a gzip stream of one member per 4 KiB of tar (as eStargz writes one per
    file), indexed with 256 KiB spans, read through libdeflate and through zlib alone.
    Must hold: checkpoints stay a span apart, so the index is no larger than for one
    member; every span, each across dozens of members' seams, reads back right, and so
    does the whole size from the last span. Before, every member started a checkpoint
    with its 32 KiB window: here 1,500 of them, an index eight times the tar."""
    if not libdeflate:
        monkeypatch.setattr(gzindex, "inflate_span", None)
    piece = 4096
    blob = b"".join(
        gzip.compress(layer_tar[at : at + piece], mtime=0) for at in range(0, len(layer_tar), piece)
    )
    index = index_compressed_tar(
        io.BytesIO(blob), GZIP, blob_digest=sha(blob), diff_id=sha(layer_tar), span=SPAN
    )
    points = index.spans.zinfo.checkpoints
    assert len(points) <= len(layer_tar) // SPAN + 1, len(points)
    assert all_spans(index.spans, blob) == layer_tar
    read = lambda o, n: blob[o : o + n]  # noqa: E731
    assert gzindex.inflated_size(read, len(blob), index.spans.zinfo) == len(layer_tar)


def test_zstd_many_frames_give_restart_points_one_frame_gives_one(layer_tar):
    """A stream of 1 MiB zstd frames with a skippable frame among them gets a restart
    point per span's worth of frames; a single-frame stream gets one restart point (the
    whole tar is one span). Both read back exactly."""
    pieces = [layer_tar[i : i + (1 << 20)] for i in range(0, len(layer_tar), 1 << 20)]
    frames = [compress(["zstd", "-q", "-c"], p) for p in pieces]
    skippable = b"\x5e\x2a\x4d\x18" + (5).to_bytes(4, "little") + b"toc!!"
    many = frames[0] + skippable + b"".join(frames[1:])
    index = index_compressed_tar(
        io.BytesIO(many), ZSTD, blob_digest=sha(many), diff_id=sha(layer_tar), span=SPAN
    )
    assert index.spans.starts == [i << 20 for i in range(len(pieces))]
    assert all_spans(index.spans, many) == layer_tar
    one = compress(["zstd", "-q", "-c"], layer_tar)
    single = index_compressed_tar(io.BytesIO(one), ZSTD, blob_digest=sha(one), diff_id=None)
    assert single.spans.starts == [0] and all_spans(single.spans, one) == layer_tar
    assert SpanIndex.from_bytes(index.spans.to_bytes()) == index.spans


@pytest.mark.parametrize("kind", [GZIP, ZSTD])
def test_wrong_digest_or_diff_id_builds_no_index(layer_tar, kind):
    """A blob whose digest, or whose tar's diff_id, is not the expected one gives an
    IntegrityError naming which, and no index."""
    blob = compress(["gzip" if kind == GZIP else "zstd", "-q", "-c"], layer_tar)
    with pytest.raises(IntegrityError, match="blob's digest"):
        index_compressed_tar(io.BytesIO(blob), kind, blob_digest=sha(b"x"), diff_id=None)
    with pytest.raises(IntegrityError, match="diff_id"):
        index_compressed_tar(
            io.BytesIO(blob), kind, blob_digest=sha(blob), diff_id=sha(layer_tar + b"x")
        )


@pytest.mark.parametrize("kind", [GZIP, ZSTD])
def test_corrupt_compressed_stream_is_caught_in_the_pass(layer_tar, kind):
    """A byte flipped in the middle of the compressed stream, or the stream cut short,
    fails the indexing pass with IntegrityError (the format's own check or a decode
    error) or, where the damage reads as a broken tar header, TarLayerError: never an
    index."""
    blob = compress(["gzip" if kind == GZIP else "zstd", "-q", "-c"], layer_tar)
    bad = bytearray(blob)
    bad[len(bad) // 2] ^= 0x55
    for broken in (bytes(bad), blob[: len(blob) * 2 // 3]):
        with pytest.raises((IntegrityError, TarLayerError)):
            index_compressed_tar(io.BytesIO(broken), kind, blob_digest=None, diff_id=None)


def test_a_tar_padded_with_zeros_is_never_taken_for_damaged():
    """A tar whose end marker lies just before a long run of zeros (a padded archive):
    the piece of output that tarfile's read-ahead reaches into is a whole inflate step,
    and the piece holding the end marker must still be kept to be looked at. Each
    padding in steps of 512 bytes around where that once went wrong indexes."""
    rng = random.Random(1)
    noise = rng.randbytes(40000)
    for zeros in range(120992, 125088, 512):
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as archive:
            info = tarfile.TarInfo("f")
            info.size = len(noise) + zeros
            archive.addfile(info, io.BytesIO(noise + bytes(zeros)))
        blob = gzip.compress(out.getvalue() + bytes(1 << 20), compresslevel=6, mtime=0)
        index = index_compressed_tar(io.BytesIO(blob), GZIP, blob_digest=None, diff_id=None)
        assert index.tar_size == len(out.getvalue()) + (1 << 20), zeros


@pytest.mark.parametrize("kind", [GZIP, ZSTD])
def test_a_lone_zero_block_inside_a_compressed_layer_is_refused(layer_tar, kind):
    """A zero block spliced before a member in the middle of a 6 MiB tar, then compressed
    whole (every digest matches): refused, naming the byte; before, the streaming pass
    took it for the end and the layer lost every entry after it with no word."""
    with tarfile.open(fileobj=io.BytesIO(layer_tar)) as archive:
        members = archive.getmembers()
    header = members[len(members) // 2].offset
    raw = layer_tar[:header] + bytes(512) + layer_tar[header:]
    blob = compress(["gzip" if kind == GZIP else "zstd", "-q", "-c"], raw)
    with pytest.raises(TarLayerError, match=f"a lone zero block at byte {header} is followed"):
        index_compressed_tar(io.BytesIO(blob), kind, blob_digest=sha(blob), diff_id=None)


def header_claiming(size: int, kind: bytes = tarfile.REGTYPE, name: str = "f") -> bytes:
    """A tar header of ``kind`` whose size field claims ``size`` bytes (base-256, as
    GNU tar writes sizes past 8 GiB), its checksum right."""
    info = tarfile.TarInfo(name)
    info.type = kind
    header = bytearray(info.tobuf(tarfile.USTAR_FORMAT))
    header[124:136] = b"\x80" + size.to_bytes(11, "big")
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", [GZIP, ZSTD])
def test_an_entry_claiming_more_than_the_stream_holds_is_refused_at_once(kind):
    """Tried: a compressed layer whose one header claims 2^40 bytes of data (1 TiB, within
    what a tar layer may hold: more is refused as out of range). Must hold: refused in
    one clear error (exit 6 for a command); before, the streaming pass skipped the
    claimed bytes a block at a time past the end of the stream, spinning a core for
    good (its plain-tar twin was refused at once)."""
    raw = header_claiming(1 << 40) + b"data".ljust(512, b"\0") + bytes(1024)
    blob = compress(["gzip" if kind == GZIP else "zstd", "-q", "-c"], raw)
    with pytest.raises(TarLayerError, match="claims more bytes than the stream holds"):
        index_compressed_tar(io.BytesIO(blob), kind, blob_digest=sha(blob), diff_id=None)


@pytest.mark.parametrize("kind", [GZIP, ZSTD])
def test_a_damaged_tar_header_inside_a_compressed_layer_is_refused(layer_tar, kind):
    """A member header in the middle of a 6 MiB tar with its checksum overwritten, then
    compressed whole (so every digest matches): the streaming pass does not take the
    header for the end of the archive; it refuses the layer, naming the byte."""
    with tarfile.open(fileobj=io.BytesIO(layer_tar)) as archive:
        members = archive.getmembers()
    header = members[len(members) // 2].offset
    raw = bytearray(layer_tar)
    raw[header + 148 : header + 156] = b"0000000\0"
    blob = compress(["gzip" if kind == GZIP else "zstd", "-q", "-c"], bytes(raw))
    with pytest.raises(TarLayerError, match=f"tar header at byte {header} is damaged"):
        index_compressed_tar(io.BytesIO(blob), kind, blob_digest=sha(blob), diff_id=None)


@pytest.mark.parametrize("kind", [GZIP, ZSTD])
def test_span_from_bytes_fetched_wrong_later_is_refused(layer_tar, kind):
    """After a verified pass, a span decompressed from compressed bytes that differ (a
    registry or mirror serving other bytes) fails with IntegrityError: the span digest
    recorded in the pass is checked, so no wrong byte is served."""
    if kind == GZIP:
        blob = compress(["gzip", "-c"], layer_tar)
    else:
        blob = b"".join(
            compress(["zstd", "-q", "-c"], layer_tar[i : i + SPAN])
            for i in range(0, len(layer_tar), SPAN)
        )
    index = index_compressed_tar(
        io.BytesIO(blob), kind, blob_digest=sha(blob), diff_id=None, span=SPAN
    )
    target = len(index.spans.points) // 2
    comp = index.spans.points[target][0]
    bad = bytearray(blob)
    for k in range(200, 4000, 97):  # many flips: some decode, wrongly, without an error
        bad[comp + k] ^= 0x01
    with pytest.raises(IntegrityError):
        index.spans.decompress(target, lambda o, n: bytes(bad[o : o + n]))


def test_a_zstd_span_too_large_for_memory_is_decompressed_as_a_stream(tmp_path, monkeypatch):
    """A zstd layer of one frame is one span, the whole tar. Over ``LARGE_SPAN`` (made
    1 MiB here, for a 12 MiB tar) it is decompressed into a file in the scratch directory,
    reading at most ``STREAM_READ`` compressed bytes at a time: the bytes are the tar's,
    and this process never holds more than a small part of the span. Handed on to be
    kept, it goes in pieces of at most ``KEEP_STEP``, each ending on a chunk boundary.
    Compressed bytes that differ from the indexed ones fail the span's digest."""
    monkeypatch.setattr(layerindex, "LARGE_SPAN", 1 << 20)
    monkeypatch.setattr(zstdframes, "STREAM_READ", 256 << 10)
    monkeypatch.setattr(tar_export, "KEEP_STEP", 1 << 20)
    src = tmp_path / "src"
    src.mkdir()
    for i in range(12):
        (src / f"part-{i:02}").write_bytes(os.urandom(1 << 19) + bytes([i]) * (1 << 19))
    layer_tar = make_tar(src, tmp_path / "layer.tar").read_bytes()
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    blob = compress(["zstd", "-q", "-c"], layer_tar)
    index = index_compressed_tar(io.BytesIO(blob), ZSTD, blob_digest=sha(blob), diff_id=None)
    assert len(index.spans.points) == 1 and len(layer_tar) > 12 << 20
    asked: list[int] = []

    def read(offset: int, length: int) -> bytes:
        asked.append(length)
        return blob[offset : offset + length]

    kept: list[tuple[int, int]] = []
    tar = DecompressedTar(
        index.spans, read, sha(layer_tar), lambda o, d: kept.append((o, len(d))), scratch
    )
    tracemalloc.start()
    try:
        span = tar.span(0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert bytes(span) == layer_tar
    assert peak < len(layer_tar) // 8 and max(asked) <= 256 << 10, peak
    assert sum(n for _, n in kept) == len(layer_tar) and max(n for _, n in kept) <= 1 << 20
    assert all((o + n) % CHUNK_SIZE == 0 for o, n in kept[:-1])
    assert list(scratch.iterdir()) == []  # the file is unlinked from the start
    bad = bytearray(blob)
    for k in range(4000, len(bad) - 4000, 997):  # many flips: some decode, wrongly
        bad[k] ^= 0x01
    with pytest.raises(IntegrityError):
        index.spans.decompress(0, lambda o, n: bytes(bad[o : o + n]), scratch)


def test_a_zstd_layer_that_inflates_a_thousandfold_is_indexed_in_little_memory():
    """A zstd layer holding 4 MiB of random bytes, then a file of 128 MiB of zeros, is
    4 MiB: runs of RLE blocks make 32,768 bytes of each 4. Indexing it, or
    decompressing it as a stream, the process holds a few MiB at most. Before, each
    decompress call was given up to 128 KiB (first fixed, then learnt from the call
    before, which the random bytes made large) and made up to gigabytes at once: a
    small layer (a disk image, a preallocated file) could exhaust the server's memory."""
    zstd = zstandard.ZstdCompressor().compressobj()
    parts = []
    for name, size, data in (("random", 4 << 20, os.urandom), ("zeros", 128 << 20, bytes)):
        info = tarfile.TarInfo(name)
        info.size = size
        parts.append(zstd.compress(info.tobuf(tarfile.PAX_FORMAT)))
        parts += [zstd.compress(data(1 << 20)) for _ in range(size >> 20)]
    parts += [zstd.compress(bytes(2 * tarfile.RECORDSIZE)), zstd.flush()]
    blob = b"".join(parts)
    assert len(blob) < 5 << 20
    tracemalloc.start()
    try:
        index = index_compressed_tar(io.BytesIO(blob), ZSTD, blob_digest=sha(blob), diff_id=None)
        largest = max(len(p) for p in stream_frames(lambda o, n: blob[o : o + n], 0, len(blob)))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert index.tar_size > 132 << 20 and largest <= 128 << 10 and peak < 16 << 20


def test_a_large_skippable_frame_is_stepped_over_in_little_memory(tmp_path, layer_tar):
    """Tried: a zstd layer whose tar follows a skippable frame of 64 MiB (where zstd:chunked
    keeps its table of contents and tar-split, which grow with the layer's files),
    indexed. Must hold: the frame is stepped over holding a few MiB at most, and the
    tar is read right. Before, its bytes were gathered in memory, each MiB read copying
    all those before it: 200 MiB took 49 s and 635 MiB of memory, a gigabyte a
    quarter of an hour."""
    skipped = 64 << 20
    path = tmp_path / "layer.zst"
    with path.open("wb") as blob:
        blob.write(struct.pack("<II", 0x184D2A5E, skipped))
        blob.seek(skipped, os.SEEK_CUR)  # a sparse file: the test holds none of it
        blob.write(compress(["zstd", "-q", "-c"], layer_tar))
    with path.open("rb") as blob:
        digest = "sha256:" + hashlib.file_digest(blob, "sha256").hexdigest()
    tracemalloc.start()
    try:
        with path.open("rb") as blob:
            index = index_compressed_tar(blob, ZSTD, blob_digest=digest, diff_id=sha(layer_tar))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert index.spans.starts == [0] and index.spans.points[0][0] == 8 + skipped
    assert index.tar_size == len(layer_tar) and peak < 16 << 20


@pytest.fixture(scope="module")
def many_windows_blob() -> bytes:
    """A gzip'd 32 MiB tar of compressible random words: indexed with checkpoints every
    ``SMALL_SPAN``, over 800 windows (26 MiB), as a 3 GiB layer has at the default span."""
    rnd = random.Random(7)
    words = [rnd.randbytes(rnd.randrange(2, 12)) for _ in range(4096)]
    tar_bytes = io.BytesIO()
    with tarfile.open(fileobj=tar_bytes, mode="w") as tar:
        for i in range(8):
            data = b"".join(rnd.choices(words, k=(4 << 20) // 6))[: 4 << 20]
            info = tarfile.TarInfo(f"part-{i}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return gzip.compress(tar_bytes.getvalue(), 1)


SMALL_SPAN = 16 << 10


def test_a_gzip_index_is_kept_and_shared_holding_its_windows_at_most_twice(
    tmp_path, many_windows_blob
):
    """A gzip layer of over 800 windows (26 MiB) indexed, then kept in the cache and
    made into the blobs that share it: the process never holds more than the windows
    and the one record they are written into, plus a few MiB. Before, the zinfo was
    joined into bytes, then into the span index, then copied again behind its checksum
    (and once more to share it): three times the windows at once."""
    blob = many_windows_blob
    with ChunkStore(tmp_path / "cache") as store:
        tracemalloc.start()
        try:
            index = index_compressed_tar(
                io.BytesIO(blob), GZIP, blob_digest=sha(blob), diff_id=None, span=SMALL_SPAN
            )
            IndexCache(store).save(sha(blob), SMALL_SPAN, index)
            shared = index_blobs(index, sha(blob))
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        kept = IndexCache(store).load(sha(blob), SMALL_SPAN, compressed=True)
    windows = len(index.spans.points) * WINDOW
    assert windows > 24 << 20
    assert peak < 2 * windows + (8 << 20), (peak, windows)
    assert kept is not None and kept.spans.to_bytes() == index.spans.to_bytes()
    table, zinfo = shared[1][0], shared[2][0]
    assert table + zinfo == index.spans.to_bytes()
    assert Zinfo.from_bytes(zinfo) == index.spans.zinfo


def test_a_kept_gzip_index_is_loaded_holding_its_windows_at_most_twice(tmp_path, many_windows_blob):
    """A gzip layer of over 800 windows (26 MiB) indexed and kept in the cache, then
    loaded from it: the process holds at most the record read and the windows taken out
    of it, plus a few MiB, and the index loaded is the one kept. Before, the zinfo was
    first sliced out of the record whole, then each window out of that: three times the
    windows at once, on every open of the layer."""
    blob = many_windows_blob
    index = index_compressed_tar(
        io.BytesIO(blob), GZIP, blob_digest=sha(blob), diff_id=None, span=SMALL_SPAN
    )
    with ChunkStore(tmp_path / "cache") as store:
        IndexCache(store).save(sha(blob), SMALL_SPAN, index)
        tracemalloc.start()
        try:
            kept = IndexCache(store).load(sha(blob), SMALL_SPAN, compressed=True)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    windows = len(index.spans.points) * WINDOW
    assert windows > 24 << 20
    assert peak < 2 * windows + (8 << 20), (peak, windows)
    assert kept is not None and kept.spans == index.spans
    assert all(type(c.window) is bytes for c in kept.spans.zinfo.checkpoints)


def test_malformed_index_files_are_refused():
    """Truncated or reordered zinfo and span indexes give IntegrityError."""
    with pytest.raises(IntegrityError):
        Zinfo.from_bytes(b"\x01\x00\x00\x00" + bytes(8) + bytes(100))
    with pytest.raises(IntegrityError):
        SpanIndex.from_bytes(b"BSSPANS\x01" + bytes(10))


def test_decode_frames_refuses_a_cut_frame():
    frame = subprocess.run(["zstd", "-q", "-c"], input=b"abc" * 1000, capture_output=True).stdout
    assert decode_frames(frame + frame) == b"abc" * 2000
    with pytest.raises(IntegrityError):
        decode_frames(frame[:-3])


@pytest.mark.skipif(gzindex.inflate_span is None, reason="no libdeflate on this system")
@pytest.mark.parametrize("level", ["-1", "-6", "-9", "two-members"])
def test_libdeflate_inflates_every_span_as_zlib_does(layer_tar, level, monkeypatch):
    """Each span handed to libdeflate as a stream of its own (the window as a stored
    block, its blocks shifted to a byte, an empty final block where the next span
    starts) inflates to exactly the bytes zlib resumes to from the checkpoint: at every
    compression level, for the last span, and across two gzip members."""
    if level == "two-members":
        half = len(layer_tar) // 3
        blob = compress(["gzip", "-c"], layer_tar[:half]) + compress(
            ["gzip", "-9", "-c"], layer_tar[half:]
        )
    else:
        blob = compress(["gzip", level, "-c"], layer_tar)
    zinfo, size = GzipIndexer(io.BytesIO(blob), span=SPAN).finish()
    points = zinfo.checkpoints
    assert {p.bits for p in points} - {0}, "some span must start inside a byte"

    def read(o: int, n: int) -> bytes:
        return blob[o : o + n]

    for i, point in enumerate(points):
        end = points[i + 1].uncompressed if i + 1 < len(points) else size
        length = end - point.uncompressed
        fast = gzindex.read_span(read, len(blob), zinfo, i, length)
        assert isinstance(fast, memoryview), f"span {i} fell back to zlib"
        with monkeypatch.context() as m:
            m.setattr(gzindex, "inflate_span", None)
            slow = gzindex.read_span(read, len(blob), zinfo, i, length)
        assert fast == slow == layer_tar[point.uncompressed : end]


def test_a_large_zstd_span_with_no_room_beside_the_cache_is_decompressed_in_memory(
    tmp_path, monkeypatch, caplog
):
    """The scratch directory full (a 1 MiB tmpfs, for a 6 MiB span over ``LARGE_SPAN``):
    the span is decompressed in memory, as before streaming, with a warning, and its
    bytes are right. Before, the write's ENOSPC escaped as a bare OSError: the span
    pump's thread died and every read of the layer failed."""
    monkeypatch.setattr(layerindex, "LARGE_SPAN", 1 << 20)
    src = tmp_path / "src"
    src.mkdir()
    (src / "random").write_bytes(os.urandom(3 << 20))
    (src / "zeros").write_bytes(bytes(3 << 20))
    tar = make_tar(src, tmp_path / "layer.tar").read_bytes()
    blob = compress(["zstd", "-q", "-c"], tar)
    index = index_compressed_tar(io.BytesIO(blob), ZSTD, blob_digest=sha(blob), diff_id=None)
    full = tmp_path / "full"
    full.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", str(full)], check=True)
    try:
        data = index.spans.decompress(0, lambda o, n: blob[o : o + n], full)
        assert bytes(data) == tar
        assert "no room to decompress it beside the cache" in caplog.text
        assert list(full.iterdir()) == []
    finally:
        subprocess.run(["umount", str(full)], check=True)


def test_a_large_span_that_failed_fails_its_next_readers_at_once(tmp_path, monkeypatch):
    """A one-frame zstd layer (one span over ``LARGE_SPAN``) whose compressed bytes come
    back wrong: the first read fails its digest, with EIO; the reads right after it
    (a mount's readers of one file come by the dozen) fail at once, naming the same
    cause, instead of each fetching and inflating the whole layer again (0.7 s each,
    ten minutes for a tree walk). After ``FAILED_SPAN_QUIET`` it is tried again (the
    quiet is cut short for that, rather than slept out: a loaded machine that paused
    the refused reads for longer than a short quiet would have them tried again)."""
    monkeypatch.setattr(layerindex, "LARGE_SPAN", 1 << 20)
    src = tmp_path / "src"
    src.mkdir()
    (src / "random").write_bytes(os.urandom(3 << 20))
    tar = make_tar(src, tmp_path / "layer.tar").read_bytes()
    blob = compress(["zstd", "-q", "-c"], tar)
    index = index_compressed_tar(io.BytesIO(blob), ZSTD, blob_digest=sha(blob), diff_id=None)
    bad = bytearray(blob)
    for k in range(4000, len(bad) - 4000, 997):
        bad[k] ^= 0x01
    fetched: list[int] = []

    def read(offset: int, length: int) -> bytes:
        fetched.append(length)
        return bytes(bad[offset : offset + length])

    decompressed = DecompressedTar(index.spans, read, sha(tar), None, tmp_path)
    with pytest.raises(BlobReadError):
        decompressed.read_range(0, 4096)
    asked = sum(fetched)
    for _ in range(20):
        with pytest.raises(BlobReadError, match="a moment ago"):
            decompressed.read_range(4096, 4096)
    assert sum(fetched) == asked
    monkeypatch.setattr(tar_export, "FAILED_SPAN_QUIET", 0.0)
    bad[:] = blob  # the source serves the right bytes again
    assert decompressed.read_range(0, 4096) == tar[:4096]
