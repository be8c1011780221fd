"""Many readers of the same missing chunks while the real registry fails half its reads."""

from __future__ import annotations

import random
import threading
import time

import pytest
from rig.fault_proxy import Fault

from blockstore.cache import CHUNK_SIZE, CachedBlob, ChunkStore
from blockstore.errors import BlobReadError
from blockstore.prefetch import Readahead

READERS = 16
READS_EACH = 30


def fail_every_other_get(proxy, fault: Fault) -> None:
    """Give ``fault`` to every other blob GET the proxy sees, the rest forwarded intact."""
    lock = threading.Lock()
    seen = [0]

    def take_fault(method: str, path: str) -> Fault | None:
        if method != "GET" or "/blobs/" not in path:
            return None
        with lock:
            seen[0] += 1
            return fault if seen[0] % 2 else None

    proxy.take_fault = take_fault


@pytest.mark.parametrize(
    "fault",
    [
        Fault("cut", after_bytes=40_000),
        Fault("reset", after_bytes=40_000),
        Fault("status", status=500),
    ],
    ids=["cut-mid-body", "reset-mid-body", "500"],
)
def test_readers_sharing_flights_of_a_registry_failing_half_its_reads(
    pushed_blob, registry, fault_proxy, cache_dir, fault
):
    """Tried: 16 threads reading the same 4 MiB blob at once, 30 random reads each (so
    most chunks are wanted by several readers while one flight fetches them), through a
    registry whose every other blob GET is cut or reset 40 kB into its body, or answered
    500. Must hold: every read returns the blob's bytes or raises ``BlobReadError``, none
    waits past the read timeout; once the registry is sound the whole blob reads right,
    and `verify` finds every stored chunk sound: a failed flight poisons neither its
    waiters nor the next reads of its chunks."""
    proxy = fault_proxy(registry)
    fail_every_other_get(proxy, fault)
    data = pushed_blob.data
    slowest: list[float] = []
    wrong: list[tuple[int, int]] = []
    with ChunkStore(cache_dir) as store:
        blob = CachedBlob(
            store,
            pushed_blob.digest,
            len(data),
            pushed_blob.source(proxy.host),
            readahead=Readahead(0),
        )
        start = threading.Barrier(READERS)

        def reader(seed: int) -> None:
            rng = random.Random(seed)
            start.wait()
            for _ in range(READS_EACH):
                offset = rng.randrange(len(data) // CHUNK_SIZE) * CHUNK_SIZE + rng.randrange(5000)
                length = min(rng.randrange(1, 200_000), len(data) - offset)
                began = time.monotonic()
                try:
                    got = b"".join(bytes(b) for b in blob.read(offset, length))
                except BlobReadError:
                    pass
                else:
                    if got != data[offset : offset + length]:
                        wrong.append((offset, length))
                slowest.append(time.monotonic() - began)

        threads = [threading.Thread(target=reader, args=(seed,)) for seed in range(READERS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert not any(thread.is_alive() for thread in threads), "a reader hangs"
        assert not wrong and len(slowest) == READERS * READS_EACH
        assert max(slowest) < 30, max(slowest)

        proxy.take_fault = lambda method, path: None
        assert b"".join(bytes(b) for b in blob.read(0, len(data))) == data
        blob.close()
        report = store.verify()
        assert report.ok and report.chunks_checked == len(data) // CHUNK_SIZE, report
