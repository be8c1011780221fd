"""Range requests and replies (pure functions): clamping, Content-Range, the 200 fallback."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blockstore.errors import BlobReadError
from blockstore.registry.ranges import (
    check_partial_reply,
    clamp_range,
    parse_content_range,
    range_header,
    slice_stream,
)

sizes = st.integers(0, 1 << 40)


@given(offset=sizes, length=sizes, size=sizes)
def test_clamp_never_reaches_past_the_end(offset, length, size):
    """The span asked for lies inside the blob, and is empty exactly when nothing is left."""
    span = clamp_range(offset, length, size)
    if offset >= size or length == 0:
        assert span is None
    else:
        first, last = span
        assert first == offset
        assert last == min(offset + length, size) - 1
        assert range_header(first, last) == f"bytes={first}-{last}"


def test_clamp_refuses_negative_values():
    """A negative offset or length is a caller's bug, not an empty read."""
    with pytest.raises(ValueError):
        clamp_range(-1, 10, 100)


@given(first=sizes, width=sizes, extra=sizes, star=st.booleans())
def test_content_range_round_trips(first, width, extra, star):
    """What a registry sends for a span parses back to the span and the total."""
    last = first + width
    total = None if star else last + 1 + extra
    value = f"bytes {first}-{last}/{'*' if star else total}"
    assert parse_content_range(value) == (first, last, total)


@pytest.mark.parametrize(
    "value",
    ["", "bytes", "bytes 5-4/10", "bytes 0-10/10", "items 0-1/2", "bytes -1-2/3", "bytes 1-2"],
)
def test_malformed_content_range(value):
    """Reversed, past-the-end or garbled spans are refused."""
    with pytest.raises(ValueError):
        parse_content_range(value)


@given(st.text(max_size=40))
def test_any_content_range_text_parses_or_raises_value_error(value):
    """No header value makes the parser fail otherwise."""
    try:
        first, last, total = parse_content_range(value)
    except ValueError:
        return
    assert first <= last and (total is None or last < total)


@given(
    size=st.integers(1, 1 << 30),
    data=st.data(),
)
def test_partial_reply_must_be_the_span_asked_for(size, data):
    """A 206 is accepted only for a range that starts with the span asked for, of a blob
    of this size: running further (a server that ignores the range's end), or ending
    early (a CDN that caps ranges), when it holds the span up to where it ends."""
    first = data.draw(st.integers(0, size - 1))
    last = data.draw(st.integers(first, size - 1))
    check_partial_reply(f"bytes {first}-{last}/{size}", first, last, size)
    check_partial_reply(f"bytes {first}-{last}/*", first, last, size)
    check_partial_reply(f"bytes {first}-{size - 1}/{size}", first, last, size)
    got_first = data.draw(st.integers(0, size - 1))
    got_last = data.draw(st.integers(got_first, size - 1))
    got_total = data.draw(st.sampled_from([size, size + 1]))
    reply = f"bytes {got_first}-{got_last}/{got_total}"
    if got_first == first and got_total == size:
        assert check_partial_reply(reply, first, last, size) == min(got_last, last)
    else:
        with pytest.raises(BlobReadError):
            check_partial_reply(reply, first, last, size)
    with pytest.raises(BlobReadError):
        check_partial_reply(None, first, last, size)


@st.composite
def chunked(draw):
    """Bytes, cut into chunks at random places, and an inclusive span of them."""
    blob = draw(st.binary(min_size=1, max_size=2000))
    cuts = sorted(draw(st.lists(st.integers(0, len(blob)), max_size=12)))
    edges = [0, *cuts, len(blob)]
    chunks = [blob[a:b] for a, b in itertools.pairwise(edges)]
    first = draw(st.integers(0, len(blob) - 1))
    last = draw(st.integers(first, len(blob) - 1))
    return blob, chunks, first, last


@given(chunked())
def test_slice_stream_returns_exactly_the_span(case):
    """However a 200 body is chunked, the slice is the span's bytes, nothing more."""
    blob, chunks, first, last = case
    assert slice_stream(iter(chunks), first, last) == blob[first : last + 1]


@given(chunked())
def test_slice_stream_stops_reading_after_the_span(case):
    """The stream is not read further than the chunk holding the span's last byte."""
    _, chunks, first, last = case
    consumed = 0

    def counting():
        nonlocal consumed
        for chunk in chunks:
            consumed += len(chunk)
            yield chunk

    slice_stream(counting(), first, last)
    assert consumed <= max(last + 1, 0) + max((len(c) for c in chunks), default=0)


@given(chunked())
def test_slice_stream_of_a_short_body_is_an_error(case):
    """A body that ends before the span does is a BlobReadError, not short data."""
    blob, _, first, last = case
    short = blob[:last]
    with pytest.raises(BlobReadError):
        slice_stream(iter([short]), first, last)
