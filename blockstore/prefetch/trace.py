"""Access traces: which blocks a mount read first, in order, to replay later.

A cold open with no trace records one: each 4 KiB block the first time it
is read, with the milliseconds since open, over the first ``period``
seconds. A later cold open of the same layer (evicted since, or on another
machine after ``blockstore trace import``) replays it as prefetch, in the
recorded order, so the blocks are there before the reader asks; where the
cache can keep parts of chunks, only those blocks are fetched.

Events are runs: ``(milliseconds, first unit, count)``. Format 1 had one
32 KiB chunk per event (``(milliseconds, chunk)``) and is still read.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

TRACE_VERSION = 2
READ_VERSIONS = (1, 2)
UNIT = 4096
"""What a trace records: the 4 KiB blocks a reader reads (a page, an EROFS block)."""
MAX_TRACE_BYTES = 4 << 30
"""The most one trace may name. Traces come from files and registries, and a replay
lists their blocks one by one: a run of a trillion blocks would take the memory."""
MAX_TRACE_MS = 24 * 3600 * 1000
"""The latest time of use a trace may give (a day after open)."""
LATEST_RECORDED = 253402300799.0
"""The latest recording time a trace may give (the end of the year 9999, in seconds since
the epoch): ``trace ls`` shows it as a date, which a larger one, or infinity, has not."""
LAYER_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
"""What a trace's digest must be: it is the trace's key in the cache (which takes at most
511 bytes) and is printed by ``trace ls`` (where control characters would reach the
terminal)."""


@dataclass
class Trace:
    """One layer's recorded accesses: ``events`` are (milliseconds, first, count) runs of
    ``unit``-byte blocks, each block in the trace once."""

    digest: str
    unit: int
    recorded: float  # seconds since the epoch
    events: list[tuple[int, int, int]] = field(default_factory=list)

    def to_record(self) -> dict:
        return {
            "version": TRACE_VERSION,
            "digest": self.digest,
            "unit": self.unit,
            "recorded": self.recorded,
            "events": [list(event) for event in self.events],
        }

    @classmethod
    def from_record(cls, record: dict) -> Trace:
        """Raises ``ValueError`` on anything that is not a trace of a format read here."""
        try:
            version = record["version"]
            if version not in READ_VERSIONS:
                raise ValueError(f"trace format {version} is not one of {READ_VERSIONS}")
            digest = record["digest"]
            if not isinstance(digest, str) or not LAYER_DIGEST.fullmatch(digest):
                raise ValueError(f"not a layer digest: {digest!r}")
            if version == 1:
                unit = int(record["chunk_size"])
                events = [(int(ms), int(index), 1) for ms, index in record["events"]]
            else:
                unit = int(record["unit"])
                events = [(int(ms), int(first), int(n)) for ms, first, n in record["events"]]
            if unit <= 0 or unit % UNIT:
                raise ValueError(f"a trace unit of {unit} bytes")
            if any(ms < 0 or first < 0 or count <= 0 for ms, first, count in events):
                raise ValueError("negative time or block, or an empty run")
            if any(ms > MAX_TRACE_MS for ms, _, _ in events):
                raise ValueError("a time of use more than a day after open")
            if sum(count for _, _, count in events) * unit > MAX_TRACE_BYTES:
                raise ValueError(f"it names more than {MAX_TRACE_BYTES >> 30} GiB of reads")
            recorded = float(record["recorded"])
            if not 0 <= recorded <= LATEST_RECORDED:  # NaN fails this too
                raise ValueError(f"a recording time of {recorded} seconds since the epoch")
            return cls(digest, unit, recorded, events)
        except (KeyError, TypeError, OverflowError) as exc:  # OverflowError: int(1e400)
            raise ValueError(f"not a trace record: {exc}") from None

    def order(self) -> list[int]:
        """Units in first-touch order, each once."""
        return self.in_units_of(self.unit)

    def in_units_of(self, size: int, end: int | None = None) -> list[int]:
        """The ``size``-byte units (chunks, blocks) the trace touches, in first-touch order;
        with ``end``, only those before that byte (the layer's size)."""
        unit = self.unit
        seen: dict[int, None] = {}
        for _, first, count in self.events:
            stop = ((first + count) * unit - 1) // size + 1
            if end is not None:
                stop = min(stop, -(-end // size))
            seen.update(dict.fromkeys(range(first * unit // size, stop)))
        return list(seen)

    @property
    def span_ms(self) -> int:
        """Milliseconds from open to the last recorded read."""
        return max((ms for ms, _, _ in self.events), default=0)


class TraceRecorder:
    """Notes first touches of blocks for ``period`` seconds from the first read, then
    stops. From the first read, not from open: a tar layer's index may be built in
    between, by reads that are not the mount's.

    ``save`` is called once with the trace when the period ends (noticed
    at the next read) or at close, whichever comes first. A period ended at
    a read is saved on a thread of its own: the read may be a cache hit
    still holding its read transaction, on which a write (a commit, an
    fsync) must never wait, and may deadlock behind a map resize.
    """

    def __init__(self, digest: str, period: float, save: Callable[[Trace], None]):
        self._trace = Trace(digest, UNIT, time.time())
        self._start: float | None = None
        self._period = period
        self._save = save
        self._seen = bytearray()
        self._lock = threading.Lock()
        self._done = False

    def note(self, offset: int, length: int) -> bool:
        """Record a read; False once the period is over (the trace is then saved)."""
        if self._done:
            return False
        now = time.monotonic()
        if self._start is None:
            self._start = now
        ms = int((now - self._start) * 1000)
        if ms > self._period * 1000:
            # Not a daemon: a server exiting now still keeps the trace.
            threading.Thread(target=self.finish, name="trace-save").start()
            return False
        first, end = offset // UNIT, (offset + length - 1) // UNIT + 1
        with self._lock:
            seen = self._seen
            if len(seen) < end:
                seen.extend(bytes(end - len(seen)))
            elif seen.find(0, first, end) < 0:
                return True  # all seen: the usual case once a reader rereads
            events = self._trace.events
            run = -1
            for block in range(first, end):
                if seen[block]:
                    run = -1
                    continue
                seen[block] = 1
                if run >= 0:
                    events[run] = (ms, events[run][1], events[run][2] + 1)
                else:
                    events.append((ms, block, 1))
                    run = len(events) - 1
        return True

    def finish(self) -> None:
        """Hand the trace to ``save`` (once); an empty trace is not kept."""
        with self._lock:
            if self._done:
                return
            self._done = True
        if self._trace.events:
            self._save(self._trace)


TRACES_KIND = "blockstore-traces"
"""The ``kind`` of a traces document: what ``trace export`` writes and artifacts carry."""
MAX_DOCUMENT_BYTES = 256 << 20
"""The longest traces document read from a file: a trace of ``MAX_TRACE_BYTES`` in scattered
blocks takes some 25 MiB of JSON. A longer file is no export (a disk image named by
mistake, ``/dev/zero``), and reading it whole would take the memory first."""


def traces_document(traces: list[Trace]) -> bytes:
    """Several layers' traces as one JSON document."""
    document = {"kind": TRACES_KIND, "traces": [t.to_record() for t in traces]}
    return json.dumps(document, separators=(",", ":")).encode() + b"\n"


def traces_from_document(raw: bytes) -> list[Trace]:
    """The traces of a document; raises ``ValueError`` on anything else."""
    try:
        try:
            document = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):  # their words name no file kind
            raise ValueError("not a traces document (not JSON text)") from None
        if not isinstance(document, dict) or document.get("kind") != TRACES_KIND:
            raise ValueError("not a traces document written by 'blockstore trace export'")
        return [Trace.from_record(record) for record in document["traces"]]
    except (KeyError, TypeError, RecursionError, UnicodeDecodeError) as exc:
        raise ValueError(f"not a traces document: {exc!r}") from None


def merge_traces(traces: list[Trace]) -> Trace:
    """Traces of one layer recorded on several machines, as one: the union of their
    blocks, each at its earliest time of use, in that order. Raises ``ValueError`` if
    together they name more than one trace may (``MAX_TRACE_BYTES``)."""
    first = traces[0]
    if any(trace.digest != first.digest for trace in traces):
        raise ValueError("only traces of one layer merge")
    named = sum(count * trace.unit for trace in traces for _, _, count in trace.events)
    if named > MAX_TRACE_BYTES:
        raise ValueError(f"together they name more than {MAX_TRACE_BYTES >> 30} GiB of reads")
    earliest: dict[int, int] = {}
    for trace in traces:
        scale = trace.unit // UNIT  # a whole number: every unit read is a multiple of UNIT
        for ms, start, count in trace.events:
            for index in range(start * scale, (start + count) * scale):
                if ms < earliest.get(index, ms + 1):
                    earliest[index] = ms
    events: list[tuple[int, int, int]] = []
    for index, ms in sorted(earliest.items(), key=lambda item: (item[1], item[0])):
        last = events[-1] if events else None
        if last is not None and last[0] == ms and last[1] + last[2] == index:
            events[-1] = (ms, last[1], last[2] + 1)
        else:
            events.append((ms, index, 1))
    return Trace(first.digest, UNIT, max(t.recorded for t in traces), events)
