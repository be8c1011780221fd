"""Access traces: which chunks a mount touched first, in order, to replay later.

A cold open with no trace records one: each chunk the first time it is
read, with the milliseconds since open, over the first ``period``
seconds. A later cold open of the same layer (evicted since, or on another
machine after ``blockstore trace import``) replays it as prefetch, in the
recorded order, so the chunks are there before the reader asks.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

TRACE_VERSION = 1


@dataclass
class Trace:
    """One layer's recorded accesses: ``events`` are (milliseconds, chunk index)."""

    digest: str
    chunk_size: int
    recorded: float  # seconds since the epoch
    events: list[tuple[int, int]] = field(default_factory=list)

    def to_record(self) -> dict:
        return {
            "version": TRACE_VERSION,
            "digest": self.digest,
            "chunk_size": self.chunk_size,
            "recorded": self.recorded,
            "events": [list(event) for event in self.events],
        }

    @classmethod
    def from_record(cls, record: dict) -> Trace:
        """Raises ``ValueError`` on anything that is not a trace of this format."""
        try:
            if record["version"] != TRACE_VERSION:
                raise ValueError(f"trace format {record['version']} is not {TRACE_VERSION}")
            digest = record["digest"]
            if not isinstance(digest, str) or not digest.startswith("sha256:"):
                raise ValueError(f"not a layer digest: {digest!r}")
            events = [(int(ms), int(index)) for ms, index in record["events"]]
            if any(ms < 0 or index < 0 for ms, index in events):
                raise ValueError("negative time or chunk index")
            return cls(digest, int(record["chunk_size"]), float(record["recorded"]), events)
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a trace record: {exc}") from None

    def order(self) -> list[int]:
        """Chunk indices in first-touch order, each once."""
        return list(dict.fromkeys(index for _, index in self.events))


class TraceRecorder:
    """Notes first touches of chunks for ``period`` seconds after open, then stops.

    ``save`` is called once with the trace when the period ends (noticed
    at the next read) or at close, whichever comes first.
    """

    def __init__(self, digest: str, chunk_size: int, period: float, save: Callable[[Trace], None]):
        self._trace = Trace(digest, chunk_size, time.time())
        self._chunk_size = chunk_size
        self._start = time.monotonic()
        self._period = period
        self._save = save
        self._seen: set[int] = set()
        self._lock = threading.Lock()
        self._done = False

    def note(self, offset: int, length: int) -> bool:
        """Record a read; False once the period is over (the trace is then saved)."""
        if self._done:
            return False
        ms = int((time.monotonic() - self._start) * 1000)
        if ms > self._period * 1000:
            self.finish()
            return False
        first, last = offset // self._chunk_size, (offset + length - 1) // self._chunk_size
        with self._lock:
            for index in range(first, last + 1):
                if index not in self._seen:
                    self._seen.add(index)
                    self._trace.events.append((ms, index))
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
    chunks, each at its earliest time of use, in that order."""
    first = traces[0]
    earliest: dict[int, int] = {}
    for trace in traces:
        if trace.digest != first.digest or trace.chunk_size != first.chunk_size:
            raise ValueError("only traces of one layer, in one chunk size, merge")
        for ms, index in trace.events:
            if ms < earliest.get(index, ms + 1):
                earliest[index] = ms
    events = sorted(((ms, index) for index, ms in earliest.items()), key=lambda e: e)
    return Trace(first.digest, first.chunk_size, max(t.recorded for t in traces), events)
