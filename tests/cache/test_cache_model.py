"""Random reads, evictions, reopens, stored-byte flips and source faults against a model.

The model is simple: every byte a read returns must be the blob's byte. A
read may fail (EIO) only when something was wrong: the source was faulty or
the cache offline. With a healthy source online, every read must succeed.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from cache_sources import ScriptedSource, make_blob
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from rig.stored_chunks import flip_stored_byte

from blockstore.cache import CHUNK_SIZE, CachedBlob, ChunkStore
from blockstore.errors import BlockstoreError
from blockstore.prefetch import Readahead

BLOBS = [make_blob(11 * CHUNK_SIZE + 321, seed=30), make_blob(7 * CHUNK_SIZE, seed=31)]
CAPS = [4 * CHUNK_SIZE, 12 * CHUNK_SIZE, 1 << 30]


class CacheMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="cache-model-"))
        self.sources = [ScriptedSource(data, digest) for data, digest in BLOBS]
        self.online = True
        self.cap = CAPS[-1]
        self.store = ChunkStore(self.dir, size_cap=self.cap)
        self.blobs = self._open_blobs()

    def _open_blobs(self) -> list[CachedBlob]:
        return [
            CachedBlob(
                self.store,
                digest,
                len(data),
                source if self.online else None,
                readahead=Readahead(maximum=0),
            )
            for (data, digest), source in zip(BLOBS, self.sources, strict=True)
        ]

    def _close_blobs(self) -> None:
        for blob in self.blobs:
            blob.close()

    def _healthy(self, which: int) -> bool:
        return self.online and self.sources[which].fault is None

    @rule(
        which=st.integers(0, 1),
        start=st.floats(0, 1),
        length=st.integers(1, 5 * CHUNK_SIZE),
    )
    def read(self, which: int, start: float, length: int) -> None:
        data = BLOBS[which][0]
        offset = min(int(start * len(data)), len(data) - 1)
        length = min(length, len(data) - offset)
        try:
            got = b"".join(bytes(b) for b in self.blobs[which].read(offset, length))
        except OSError:
            assert not self._healthy(which), "a healthy online read failed"
            return
        assert got == data[offset : offset + length]

    @rule(which=st.integers(0, 1), chunk=st.integers(0, 11), position=st.integers(0, 40000))
    def flip_stored_byte(self, which: int, chunk: int, position: int) -> None:
        flip_stored_byte(self.store, BLOBS[which][1], chunk, position)

    @rule(
        which=st.integers(0, 1),
        fault=st.sampled_from([None, "fail", "unreachable", "short", "corrupt"]),
    )
    def set_fault(self, which: int, fault: str | None) -> None:
        if fault == "corrupt":
            record = self.store.lookup(BLOBS[which][1])
            if record is None or not record.sealed:
                return  # an unsealed blob cannot tell a lying source: only a seal can
        self.sources[which].fault = fault

    @rule(cap=st.sampled_from(CAPS))
    def evict(self, cap: int) -> None:
        """Reopen under another cap and evict down to it."""
        self._close_blobs()
        self.store.close()
        self.cap = cap
        self.store = ChunkStore(self.dir, size_cap=cap)
        self.store.gc()
        self.blobs = self._open_blobs()

    @rule(online=st.booleans())
    def reopen(self, online: bool) -> None:
        self._close_blobs()
        self.store.close()
        self.online = online
        self.store = ChunkStore(self.dir)
        self.blobs = self._open_blobs()

    @precondition(lambda self: self.online)
    @rule(which=st.integers(0, 1))
    def prefetch(self, which: int) -> None:
        try:
            self.blobs[which].prefetch()
        except (OSError, BlockstoreError):  # prefetch keeps the backend's own error
            assert not self._healthy(which) or len(BLOBS[which][0]) > 0.9 * self.cap
            return
        assert self.store.lookup(BLOBS[which][1]).sealed

    @rule()
    def verify(self) -> None:
        self.store.verify()
        again = self.store.verify()
        assert again.ok and not again.repaired_records and not again.orphan_chunks

    @invariant()
    def records_are_consistent(self) -> None:
        for info in self.store.blobs():
            assert 0 <= info.present <= info.chunks

    def teardown(self) -> None:
        try:
            self._close_blobs()
            self.store.close()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


CacheMachine.TestCase.settings = settings(
    max_examples=40,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestCacheMachine = CacheMachine.TestCase
