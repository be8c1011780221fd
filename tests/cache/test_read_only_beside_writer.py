"""A cache read without LMDB's lock (read-only here) while a writer appears through
another path: pages the reader looks at may be reused under it, so nothing it hands
out may be bytes checked in place and read later."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from cache_sources import make_blob
from rig.read_only import read_only_view

from blockstore.cache import CHUNK_SIZE, CachedBlob, ChunkStore

# Drops the blob, then stores other bytes over several commits: LMDB, seeing no
# reader in its table, reuses the pages the dropped chunks were on.
CHURN = """
import random, sys
from blockstore.cache import ChunkStore, CHUNK_SIZE
with ChunkStore(sys.argv[1]) as store:
    assert store.remove(sys.argv[2])
    for n in range(12):
        other = random.Random(n).randbytes(8 * CHUNK_SIZE)
        store.store_chunks(f"sha256:{n:064x}", len(other), 0,
                           [other[i:i + CHUNK_SIZE] for i in range(0, len(other), CHUNK_SIZE)])
"""


def test_a_held_hit_stays_the_checked_bytes_when_a_writer_reuses_its_pages(tmp_path: Path):
    """A hit of a read-only cache, held as the server holds it while it sends, is still
    the checked bytes after a writer elsewhere drops the blob and reuses its pages.
    Before, the views pointed into the map and showed the writer's new bytes: the
    server would have sent them, checked an instant before, wrong."""
    cache = tmp_path / "cache"
    data, digest = make_blob(4 * CHUNK_SIZE, seed=7)
    with ChunkStore(cache) as store:
        chunks = [data[i : i + CHUNK_SIZE] for i in range(0, len(data), CHUNK_SIZE)]
        store.store_chunks(digest, len(data), 0, chunks)
    with read_only_view(cache, tmp_path / "ro") as ro, ChunkStore(ro) as store:
        assert store.read_only
        blob = CachedBlob(store, digest, len(data), None)
        held = blob.hold_cached(0, len(data))
        assert held is not None
        views, release = held
        try:
            churn = [sys.executable, "-c", CHURN, str(cache), digest]
            subprocess.run(churn, check=True, timeout=60)
            assert b"".join(bytes(v) for v in views) == data
        finally:
            release()
