"""Readahead per stream and the link window, on access patterns drawn by hypothesis."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rig.waiting import wait_for

from blockstore.fetch import Window
from blockstore.fetch.window import MAX_WINDOW, MIN_WINDOW
from blockstore.prefetch import Readahead

MiB = 1 << 20
SIZE = 1 << 40
READ = 64 << 10


def sequential_steps(policy: Readahead, start: int, reads: int) -> list[tuple[int, int] | None]:
    return [policy.advise(start + i * READ, READ, SIZE) for i in range(reads)]


@settings(max_examples=60, deadline=None)
@given(
    streams=st.integers(2, 6),
    rounds=st.integers(40, 60),
    order=st.randoms(use_true_random=False),
    random_reads=st.lists(st.integers(0, 1 << 12), max_size=20, unique=True),
)
def test_each_interleaved_stream_grows_its_own_window(streams, rounds, order, random_reads):
    """Several sequential readers far apart read in an interleaved, shuffled order, with
    random reads of other places mixed in (fewer streams than the policy keeps): every
    stream's window doubles up to the maximum and stays there; each range asked for
    starts at or past its reader and never overlaps the stream's earlier ones; random
    reads ask for nothing and do not hold any stream back."""
    maximum = 4 * MiB
    policy = Readahead(initial=128 << 10, maximum=maximum, streams=streams + 4)
    bases = [(i + 2) * (1 << 32) for i in range(streams)]
    position = dict.fromkeys(range(streams), 0)
    asked_end = dict.fromkeys(range(streams), 0)
    events = [("s", s) for s in range(streams) for _ in range(rounds)]
    events += [("r", r) for r in random_reads]
    order.shuffle(events)
    for kind, value in events:
        if kind == "r":
            assert policy.advise(value * MiB + (1 << 31), READ, SIZE) is None
            continue
        offset = bases[value] + position[value] * READ
        position[value] += 1
        ahead = policy.advise(offset, READ, SIZE)
        if ahead is not None:
            start, length = ahead
            assert start >= max(asked_end[value], offset + READ)
            assert 0 < length <= maximum
            asked_end[value] = start + length
    for stream in range(streams):
        # Past the doubling rounds, each stream asked far enough ahead of its reader.
        reader = bases[stream] + position[stream] * READ
        assert asked_end[stream] - reader >= maximum // 2


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 4095), st.integers(1, 8)), min_size=1, max_size=300),
    st.integers(0, 40),
)
def test_scattered_reads_ask_for_nothing_however_close(reads, stream_blocks):
    """A mount reading scattered small files: reads land anywhere in a 16 MiB region,
    near each other, inside and around what a sequential reader had asked for, but none
    continues an earlier one (starts at or before its end and goes past it). They ask
    for nothing: only a stream asks, and only its own next window."""
    block = 4096
    policy = Readahead(initial=32 << 10, maximum=4 * MiB)
    ends: list[int] = []
    asked: list[tuple[int, int]] = []
    for i in range(stream_blocks):  # a sequential reader first, at the region's start
        if (ahead := policy.advise(i * block, block, SIZE)) is not None:
            asked.append(ahead)
    marker = asked[-1][0] if asked else -1  # reaching it is the stream's reader going on
    ends.append(stream_blocks * block)
    for first, blocks in reads:
        offset, end = first * block, (first + blocks) * block
        if any(offset <= e < end for e in ends) or offset <= marker < end:
            continue
        ends.append(end)
        assert policy.advise(offset, end - offset, SIZE) is None


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 200))
def test_a_jump_starts_a_new_small_stream(jump):
    """A read far from every stream asks for nothing and starts small: the next
    sequential read after it asks for twice the initial window, no more."""
    policy = Readahead(initial=128 << 10, maximum=8 * MiB)
    sequential_steps(policy, 0, 40)
    far = (1 << 34) + jump * READ
    assert policy.advise(far, READ, SIZE) is None
    ahead = policy.advise(far + READ, READ, SIZE)
    assert ahead is not None and ahead[0] + ahead[1] - (far + 2 * READ) <= 256 << 10


def test_readahead_follows_the_link_window():
    """Windows are capped by the link's window, and shrink with it after errors."""
    window = Window(initial=8 * MiB)
    policy = Readahead(initial=128 << 10, maximum=64 * MiB, ceiling=lambda: window.bytes)
    sequential_steps(policy, 0, 200)
    assert policy.longest() == 8 * MiB
    window.failed()
    window.failed()
    sequential_steps(policy, 200 * READ, 5)
    assert policy.longest() == 2 * MiB


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("done"), st.integers(1, 16 * MiB)),
            st.tuples(st.just("fail"), st.just(0)),
            st.tuples(st.just("sample"), st.integers(1, 1000)),
        ),
        max_size=60,
    )
)
def test_window_grows_on_success_and_halves_on_errors(events):
    """Whatever the sequence of completed ranges, errors and link samples: the window
    stays within its bounds, a clean completion never shrinks it nor takes it past twice
    the measured bandwidth-delay product, and an error halves it (down to the minimum)."""
    window = Window(initial=4 * MiB)
    for kind, value in events:
        before = window.bytes
        if kind == "done":
            window.completed(value)
            bdp = window.bdp()
            assert window.bytes >= before
            if bdp:
                assert window.bytes <= max(before, MIN_WINDOW, 2 * bdp)
        elif kind == "fail":
            window.failed()
            assert window.bytes == max(MIN_WINDOW, before // 2)
        else:
            window.first_byte(value / 1000 / 50)  # 0.02 ms .. 20 ms
            window.delivered(value * 1000)
        assert MIN_WINDOW <= window.bytes <= MAX_WINDOW
        assert window.request * window.ranges <= max(window.bytes, window.request)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 500), max_size=200), st.integers(1, 64))
def test_coalesced_replay_keeps_every_traced_chunk_once(order, span):
    """A trace order made into few requests fetches exactly the traced chunks, each
    once, every ``span`` entries' worth in ascending order (so neighbours share a
    request), and a chunk first touched in a later span never comes before an earlier
    span's chunks."""
    from blockstore.prefetch.feed import coalesce

    out = coalesce(order, span)
    assert sorted(out) == sorted(set(order))
    first_span = {}
    for position, index in enumerate(order):
        first_span.setdefault(index, position // span)
    spans = [first_span[index] for index in out]
    assert spans == sorted(spans)
    for a, b in itertools.pairwise(out):
        assert first_span[a] < first_span[b] or a < b


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 500), max_size=200, unique=True).map(sorted), st.integers(0, 8))
def test_bridging_adds_only_small_gaps(order, gap):
    """Bridged, a sorted replay order keeps every block and adds exactly the blocks of
    the gaps of at most ``gap`` between neighbours, so it goes out in fewer requests."""
    from blockstore.prefetch.feed import bridge

    out = bridge(order, gap)
    expected = set(order)
    for a, b in itertools.pairwise(order):
        if b - a - 1 <= gap:
            expected.update(range(a + 1, b))
    assert out == sorted(expected)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(1, 300 << 10)), max_size=40))
def test_a_trace_records_each_block_once_in_first_touch_order(reads):
    """Tried: reads of any offset and length (overlapping, repeated). Must hold: the
    trace names every 4 KiB block read, once, in the order of first touch, as runs; it
    survives its record form; and seen in 32 KiB chunks it names the chunks read."""
    from blockstore.prefetch.trace import Trace, TraceRecorder

    kept: list[Trace] = []
    recorder = TraceRecorder("sha256:" + "e" * 64, 60.0, kept.append)
    expected: list[int] = []
    for offset, length in reads:
        assert recorder.note(offset, length)
        for block in range(offset // 4096, (offset + length - 1) // 4096 + 1):
            if block not in expected:
                expected.append(block)
    recorder.finish()
    if not reads:
        assert kept == []
        return
    [trace] = kept
    again = Trace.from_record(trace.to_record())
    assert again.order() == trace.order() == expected
    chunks = list(dict.fromkeys(b // 8 for b in expected))
    assert again.in_units_of(32768) == chunks


class _HandClock:
    """The ``time`` a module sees, moved only by the test: a loaded machine's sleeps
    may run past a short period, and its reads then land outside it."""

    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return 1.7e9 + self.now


def test_a_trace_period_runs_from_the_first_read_not_from_open(monkeypatch):
    """Tried: a recorder opened, then its first read past its whole period (as when a
    tar layer's index is built in between), on a clock moved by hand. Must hold: that
    read is recorded at 0 ms, the next one at its own delay, and the period ends a
    period after the first read, the trace then saved (on a thread of its own)."""
    from blockstore.prefetch import trace as trace_module
    from blockstore.prefetch.trace import Trace, TraceRecorder

    clock = _HandClock()
    monkeypatch.setattr(trace_module, "time", clock)
    kept: list[Trace] = []
    recorder = TraceRecorder("sha256:" + "f" * 64, 0.2, kept.append)
    clock.now += 0.25
    assert recorder.note(0, 4096)
    clock.now += 0.0625
    assert recorder.note(8192, 4096)
    clock.now += 0.25
    assert not recorder.note(16384, 4096)
    assert wait_for(lambda: kept)
    [trace] = kept
    (first_ms, _, _), (second_ms, _, _) = trace.events
    assert first_ms == 0 and second_ms == 62
    assert trace.order() == [0, 2]


def test_a_trace_of_the_first_format_is_read_as_whole_chunks():
    """A trace written by a version that recorded 32 KiB chunks is still imported: its
    chunks stand for all their blocks."""
    from blockstore.prefetch.trace import Trace

    old = {"version": 1, "digest": "sha256:" + "f" * 64, "chunk_size": 32768,
           "recorded": 1.0, "events": [[0, 3], [5, 1]]}  # fmt: skip
    trace = Trace.from_record(old)
    assert trace.in_units_of(32768) == [3, 1]
    assert trace.in_units_of(4096) == [*range(24, 32), *range(8, 16)]


def test_a_trace_naming_more_than_a_bound_is_refused_and_a_replay_stops_at_the_layer():
    """Tried: a trace record whose one run names 2**40 blocks (a hostile file or
    artifact), and a trace of a run past a small layer's end. Must hold: the first is
    refused as not a trace, at once, without listing its blocks; the second lists only
    the layer's own blocks."""
    from blockstore.prefetch.trace import Trace

    huge = {"version": 2, "digest": "sha256:" + "f" * 64, "unit": 4096,
            "recorded": 1.0, "events": [[0, 0, 1 << 40]]}  # fmt: skip
    with pytest.raises(ValueError, match="GiB of reads"):
        Trace.from_record(huge)
    trace = Trace("sha256:" + "f" * 64, 4096, 1.0, [(0, 3, 1 << 20)])
    assert trace.in_units_of(4096, 10 * 4096 + 1) == list(range(3, 11))
    assert trace.in_units_of(32768, 10 * 4096 + 1) == [0, 1]


@pytest.mark.parametrize("ms", [10**400, 1e400, 25 * 3600 * 1000])
def test_a_trace_with_a_time_no_mount_gives_is_refused_as_not_a_trace(ms):
    """Tried: a trace record whose time of use is astronomically large, infinite (JSON
    1e400), or more than a day. Must hold: a ValueError saying it is not a trace (what
    import and the artifact readers report and skip), never an OverflowError later."""
    from blockstore.prefetch.trace import Trace

    record = {"version": 2, "digest": "sha256:" + "f" * 64, "unit": 4096,
              "recorded": 1.0, "events": [[ms, 0, 1]]}  # fmt: skip
    with pytest.raises(ValueError):
        Trace.from_record(record)


def test_traces_that_together_name_too_much_do_not_merge():
    """Tried: traces of one layer, each within the bound, that together name more than
    one trace may. Must hold: merging refuses at once, without listing their blocks."""
    from blockstore.prefetch.trace import MAX_TRACE_BYTES, Trace, merge_traces

    run = MAX_TRACE_BYTES // 4096
    traces = [Trace("sha256:" + "f" * 64, 4096, 1.0, [(0, n * run, run)]) for n in range(3)]
    with pytest.raises(ValueError, match="together"):
        merge_traces(traces)
