"""Gzip spans across members' seams, inflated by libdeflate member after member."""

from __future__ import annotations

import gzip
import io
import random
import subprocess
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blockstore.errors import IntegrityError
from blockstore.tarlayer import gzindex
from blockstore.tarlayer.gzindex import WINDOW, Checkpoint, GzipIndexer, Zinfo

SPAN = 16 << 10

pytestmark = pytest.mark.skipif(gzindex.inflate_span is None, reason="no libdeflate here")


@dataclass(frozen=True)
class Member:
    size: int
    kind: str  # what its bytes are like: words (back-references), noise (stored blocks), zeros
    level: int
    strategy: int
    extra: bytes | None
    name: bytes | None
    comment: bytes | None
    header_crc: bool

    def payload(self, seed: int) -> bytes:
        rng = random.Random(seed)
        if self.kind == "noise":
            return rng.randbytes(self.size)
        if self.kind == "zeros":
            return bytes(self.size)
        words = [rng.randbytes(rng.randint(1, 12)) for _ in range(50)]
        out = bytearray()
        while len(out) < self.size:
            out += rng.choice(words)
        return bytes(out[: self.size])

    def header(self) -> bytes:
        flags = (
            (4 if self.extra is not None else 0)
            | (8 if self.name is not None else 0)
            | (16 if self.comment is not None else 0)
            | (2 if self.header_crc else 0)
        )
        head = b"\x1f\x8b\x08" + bytes([flags]) + bytes(4) + b"\x00\x03"
        if self.extra is not None:
            head += len(self.extra).to_bytes(2, "little") + self.extra
        for text in (self.name, self.comment):
            if text is not None:
                head += text + b"\0"
        if self.header_crc:
            head += (zlib.crc32(head) & 0xFFFF).to_bytes(2, "little")
        return head


text = st.binary(max_size=20).map(lambda b: b.replace(b"\0", b"x"))
members = st.builds(
    Member,
    size=st.one_of(st.just(0), st.integers(1, 300), st.integers(300, 3 * SPAN)),
    kind=st.sampled_from(["words", "noise", "zeros"]),
    level=st.sampled_from([0, 1, 6, 9]),
    strategy=st.sampled_from([zlib.Z_DEFAULT_STRATEGY, zlib.Z_FIXED, zlib.Z_HUFFMAN_ONLY]),
    extra=st.none() | st.binary(max_size=40),
    name=st.none() | text,
    comment=st.none() | text,
    header_crc=st.booleans(),
)


@dataclass(frozen=True)
class Layer:
    blob: bytes
    tar: bytes
    bodies: list[tuple[int, int]]  # each member's deflate data: (compressed, uncompressed)
    trailers: list[int]  # where each member's 8-byte trailer starts


def build(layout: list[Member], seed: int, zeros: int) -> Layer:
    blob, tar = bytearray(), bytearray()
    bodies, trailers = [], []
    for i, member in enumerate(layout):
        payload = member.payload(seed + i)
        blob += member.header()
        bodies.append((len(blob), len(tar)))
        deflate = zlib.compressobj(member.level, zlib.DEFLATED, -15, 8, member.strategy)
        blob += deflate.compress(payload) + deflate.flush()
        trailers.append(len(blob))
        blob += zlib.crc32(payload).to_bytes(4, "little") + len(payload).to_bytes(4, "little")
        tar += payload
    return Layer(bytes(blob) + bytes(zeros), bytes(tar), bodies, trailers)


def zinfo_with_seams(layer: Layer, seams: set[int]) -> tuple[Zinfo, int]:
    """The indexing pass's checkpoints, and one at the start of each member in ``seams``
    (as a zinfo from another tool may have them)."""
    zinfo, size = GzipIndexer(io.BytesIO(layer.blob), span=SPAN).finish()
    points = {p.compressed: p for p in zinfo.checkpoints}
    for i in seams:
        comp, out = layer.bodies[i]
        window = layer.tar[max(0, out - WINDOW) : out]
        points.setdefault(comp, Checkpoint(comp, out, 0, bytes(WINDOW - len(window)) + window))
    return Zinfo(SPAN, tuple(points[c] for c in sorted(points))), size


def spans(blob: bytes, zinfo: Zinfo, size: int) -> list[bytes | bytearray | memoryview]:
    """Every span of ``blob``, each read on its own."""
    points = zinfo.checkpoints
    ends = [p.uncompressed for p in points[1:]] + [size]
    return [
        gzindex.read_span(lambda o, n: blob[o : o + n], len(blob), zinfo, i, end - p.uncompressed)
        for i, (p, end) in enumerate(zip(points, ends, strict=True))
    ]


def outcome(blob: bytes, zinfo: Zinfo, index: int, length: int) -> bytes | str:
    """Span ``index``'s bytes, or the IntegrityError it is refused with."""
    try:
        return bytes(
            gzindex.read_span(lambda o, n: blob[o : o + n], len(blob), zinfo, index, length)
        )
    except IntegrityError as exc:
        return f"refused: {exc}"


@contextmanager
def zlib_alone() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gzindex, "inflate_span", None)
        yield


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    layout=st.lists(members, min_size=1, max_size=12).filter(lambda m: any(x.size for x in m)),
    seed=st.integers(0, 1 << 16),
    zeros=st.sampled_from([0, 0, 1, 7, 700]),
    seams=st.sets(st.integers(0, 11)),
)
def test_spans_across_member_seams_inflate_by_libdeflate_as_zlib_and_gzip_do(
    layout, seed, zeros, seams
):
    """Tried: random layers of gzip members (empty ones, ones over a span, stored,
    fixed and dynamic blocks, headers with an extra field, name, comment and header CRC,
    zeros after the last), with checkpoints a span apart and others exactly at members'
    starts. Must hold: every span, those crossing members' seams too, is inflated by
    libdeflate (never falling back to zlib) to exactly the bytes zlib resumes to, and
    the spans together are what ``gzip -dc`` makes of the whole blob."""
    layer = build(layout, seed, zeros)
    zinfo, size = zinfo_with_seams(layer, {i for i in seams if i < len(layout)})
    fast = spans(layer.blob, zinfo, size)
    with zlib_alone():
        slow = spans(layer.blob, zinfo, size)
    gunzip = subprocess.run(["gzip", "-dc"], input=layer.blob, capture_output=True, check=True)
    assert [i for i, made in enumerate(fast) if not isinstance(made, memoryview)] == []
    assert [bytes(s) for s in fast] == [bytes(s) for s in slow]
    assert b"".join(fast) == gunzip.stdout == layer.tar


def damaged(layer: Layer, how: str, member: int) -> bytes:
    """``layer``'s blob with ``member`` damaged ``how``."""
    blob = bytearray(layer.blob)
    trailer = layer.trailers[member]
    if how == "crc":
        blob[trailer] ^= 0x01
    elif how == "isize":
        blob[trailer + 4] ^= 0x01
    elif how == "header crc":
        blob[layer.bodies[member][0] - 1] ^= 0x01
    elif how == "cut inside":
        del blob[trailer - 3 : trailer]
    else:
        del blob[trailer - 3 :]
    return bytes(blob)


@pytest.mark.parametrize("how", ["crc", "isize", "header crc", "cut inside", "cut at the end"])
def test_a_damaged_member_in_a_span_is_refused_as_zlib_refuses_it(how):
    """Tried: a layer of forty 4 KiB gzip members with 16 KiB spans, each member in turn
    damaged (its CRC, its size, its header CRC, three bytes of it cut, or the blob cut
    inside it). Must hold: every span reads as zlib alone reads it, the same bytes or
    the same IntegrityError: a member wholly inside a span is refused on a bad trailer
    or header, and a span's first member, begun before it, is not (zlib cannot check
    its trailer either; the span's recorded sha256 does)."""
    layout = [Member(4096, "words", 6, zlib.Z_DEFAULT_STRATEGY, None, b"f", None, True)] * 40
    layer = build(layout, 7, 0)
    zinfo, size = GzipIndexer(io.BytesIO(layer.blob), span=SPAN).finish()
    points = zinfo.checkpoints
    ends = [p.uncompressed for p in points[1:]] + [size]
    refused = 0
    for member in range(len(layout)):
        blob = damaged(layer, how, member)
        for i, (point, end) in enumerate(zip(points, ends, strict=True)):
            fast = outcome(blob, zinfo, i, end - point.uncompressed)
            with zlib_alone():
                slow = outcome(blob, zinfo, i, end - point.uncompressed)
            assert fast == slow, (member, i)
            refused += isinstance(fast, str)
    assert refused, "no span was refused: the damage tried nothing"


def test_a_span_of_thousands_of_members_inflates_by_zlib_in_time_linear_in_its_bytes():
    """Tried: one 16 MiB span of 4,096 gzip members (4 KiB of incompressible bytes
    each), read by zlib alone (as without libdeflate, or where libdeflate refuses a
    span), and the layer's size found from it (``inflated_size``, as for a zinfo given
    by the user). Must hold: the bytes are right and each takes under a second of CPU
    (about 0.08 s here); before, every member's end copied the rest of the span's
    compressed bytes, twice: 7.5 and 8.3 s."""
    tar = random.Random(5).randbytes(16 << 20)
    blob = b"".join(
        gzip.compress(tar[at : at + 4096], 1, mtime=0) for at in range(0, len(tar), 4096)
    )
    zinfo, size = GzipIndexer(io.BytesIO(blob), span=32 << 20).finish()
    assert len(zinfo.checkpoints) == 1

    def read(offset: int, length: int) -> bytes:
        return blob[offset : offset + length]

    with zlib_alone():
        started = time.process_time()
        made = gzindex.read_span(read, len(blob), zinfo, 0, size)
        read_seconds = time.process_time() - started
        started = time.process_time()
        whole = gzindex.inflated_size(read, len(blob), zinfo)
        size_seconds = time.process_time() - started
    assert isinstance(made, bytearray) and made == tar and whole == len(tar)
    assert read_seconds < 1.0 and size_seconds < 1.0, (read_seconds, size_seconds)
