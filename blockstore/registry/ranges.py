"""HTTP byte ranges of a blob: the request header, the reply check, the 200 fallback.

Pure functions, no I/O: the blob reader composes them, the tests drive them
with every odd input hypothesis finds.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from blockstore.errors import BlobReadError

_CONTENT_RANGE = re.compile(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*", re.IGNORECASE)


def clamp_range(offset: int, length: int, size: int) -> tuple[int, int] | None:
    """The inclusive ``(first, last)`` byte span to ask for, or None when nothing is left.

    Lengths are clamped to the blob size known from the manifest, so a
    request never reaches past the end (the CNCF registry's 416 carries a
    bogus Content-Length that breaks keep-alive).
    """
    if offset < 0 or length < 0:
        raise ValueError(f"negative offset or length: {offset}, {length}")
    end = min(offset + length, size)
    if offset >= end:
        return None
    return offset, end - 1


def range_header(first: int, last: int) -> str:
    """The ``Range`` header value for the inclusive span ``first..last``."""
    return f"bytes={first}-{last}"


def parse_content_range(value: str) -> tuple[int, int, int | None]:
    """``bytes a-b/total`` -> ``(a, b, total or None)``; raise ``ValueError`` if malformed."""
    match = _CONTENT_RANGE.fullmatch(value)
    if not match:
        raise ValueError(f"malformed Content-Range {value!r}")
    first, last = int(match[1]), int(match[2])
    total = None if match[3] == "*" else int(match[3])
    if last < first or (total is not None and last >= total):
        raise ValueError(f"inconsistent Content-Range {value!r}")
    return first, last, total


def check_partial_reply(content_range: str | None, first: int, last: int, size: int) -> int:
    """The last byte of the span asked for that a 206 holds; refused if its Content-Range
    does not start with the span, or is of another blob size. One that runs further is
    taken (a server that ignores the range's end sends the rest of the blob): the reader
    stops after the span. One that ends early (a CDN that caps the ranges it serves)
    holds the span up to where it ends: the reader asks for the rest."""
    if content_range is None:
        raise BlobReadError(f"206 reply without Content-Range for bytes {first}-{last}")
    try:
        got_first, got_last, total = parse_content_range(content_range)
    except ValueError as exc:
        raise BlobReadError(str(exc)) from None
    if got_first != first or total not in (None, size):
        raise BlobReadError(
            f"asked for bytes {first}-{last} of {size}, the registry sent {content_range!r}"
        )
    return min(got_last, last)


DECODED_ENCODINGS = frozenset({"", "identity", "gzip", "x-gzip", "deflate"})
"""The Content-Encodings the HTTP library undoes as it reads (identity is asked for):
a body in any other would be taken for the blob's own bytes."""


def check_blob_reply(
    status: int, headers: Mapping[str, str], first: int, last: int, size: int
) -> int:
    """Refuse a reply to a range read of a blob that cannot hold bytes ``first..last``
    as its body says, before a byte of it is taken: one in an encoding nothing here
    undoes; a 206 in any encoding (a range of a coded body), of several ranges
    (``multipart/byteranges``, whose part headers would be served as data) or of
    another span (``check_partial_reply``); a 200 whose length is not the blob's (the
    rest of the blob from another offset, taken for the whole of it), or is, coded. The
    last byte of the span the reply holds."""
    encoding = headers.get("Content-Encoding", "").strip().lower()
    if encoding not in DECODED_ENCODINGS:
        raise BlobReadError(
            f"the registry sent bytes {first}-{last} in Content-Encoding {encoding!r}, "
            "which is not undone here (identity was asked for)"
        )
    if status == 206:
        if encoding not in ("", "identity"):
            # A range is of the body as coded: the coding undone from the range's first
            # byte (one of a gzip stream, say) gives other bytes than the span's.
            raise BlobReadError(
                f"the registry sent bytes {first}-{last} as a range of a body in "
                f"Content-Encoding {encoding!r}, which no range can be decoded from"
            )
        if headers.get("Content-Type", "").strip().lower().startswith("multipart/"):
            raise BlobReadError(
                f"asked for bytes {first}-{last}, the registry sent several ranges "
                "(multipart/byteranges)"
            )
        return check_partial_reply(headers.get("Content-Range"), first, last, size)
    length = headers.get("Content-Length")
    plain = encoding in ("", "identity")  # else the length is the encoded body's
    if length is not None and plain and length.strip() != str(size):
        raise BlobReadError(
            f"asked for bytes {first}-{last}, the registry answered 200 with "
            f"{length.strip()} bytes, where the whole blob is {size}"
        )
    if length is not None and not plain and length.strip() == str(size):
        # As many coded bytes as the blob has: the blob itself under a coding's label
        # (storage keeping a gzip layer so), which undoing would turn into other bytes.
        raise BlobReadError(
            f"asked for bytes {first}-{last}, the registry answered 200 with the blob's "
            f"{size} bytes in Content-Encoding {encoding!r}: the blob under that label, "
            "not coded by it"
        )
    return last


def slice_stream(chunks: Iterable[bytes], first: int, last: int) -> bytes:
    """Bytes ``first..last`` of a stream, holding only those bytes in memory.

    For a server that ignores Range and sends the whole blob: chunks before
    ``first`` are dropped as they arrive, and reading stops after ``last``.
    Raises ``BlobReadError`` when the stream ends early.
    """
    want = last - first + 1
    parts: list[bytes] = []
    got = 0
    position = 0
    for chunk in chunks:
        chunk_end = position + len(chunk)
        if chunk_end > first:
            piece = chunk[max(0, first - position) : min(len(chunk), first + want - position)]
            parts.append(piece)
            got += len(piece)
            if got == want:
                break
        position = chunk_end
    if got != want:
        raise BlobReadError(f"stream ended after {position} bytes, before byte {last} was sent")
    return b"".join(parts)
