"""Reaching into a cache the way a failing disk would, and running the real CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from blockstore.cache import ChunkStore
from blockstore.cache.integrity import stored_length
from blockstore.cache.layout import DB_BLOBS, DB_CHUNKS, BlobRecord, chunk_key

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("cache_worker.py")


def evict_chunk(store: ChunkStore, digest: str, index: int) -> bool:
    """Drop one stored chunk as eviction does (counts kept right); False if absent."""

    def work(txn) -> bool:
        record = BlobRecord.unpack(txn.get(digest.encode(), db=store.dbs[DB_BLOBS]))
        key = chunk_key(record.blob_id, index)
        value = txn.get(key, db=store.dbs[DB_CHUNKS])
        if value is None:
            return False
        store.delete_chunk(txn, key, record, stored_length(value))
        txn.put(digest.encode(), record.pack(), db=store.dbs[DB_BLOBS])
        return True

    return store.env.write(work)


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run the real ``blockstore`` command."""
    return subprocess.run(
        [sys.executable, "-m", "blockstore", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def misfile_chunk(store: ChunkStore, source: tuple[str, int], target: tuple[str, int]) -> None:
    """Put the stored value of chunk ``source`` (digest, index) under the key of ``target``,
    as a flipped bit in a B-tree key would: the value is whole, its key is another's."""

    def key_of(txn, digest: str, index: int) -> bytes:
        record = BlobRecord.unpack(txn.get(digest.encode(), db=store.dbs[DB_BLOBS]))
        return chunk_key(record.blob_id, index)

    def work(txn) -> None:
        value = bytes(txn.get(key_of(txn, *source), db=store.dbs[DB_CHUNKS]))
        txn.put(key_of(txn, *target), value, db=store.dbs[DB_CHUNKS])

    store.env.write(work)


def lockless_user(cache_dir: Path) -> subprocess.Popen:
    """A process with the cache open as an older version has it: LMDB's own files,
    mapped, and no lock of this version's."""
    script = (
        "import lmdb, sys, time\n"
        "env = lmdb.open(sys.argv[1], max_dbs=16, map_size=1 << 30)\n"
        "with env.begin() as txn: txn.stat()\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    user = subprocess.Popen(
        [sys.executable, "-c", script, str(cache_dir)], stdout=subprocess.PIPE, text=True
    )
    assert user.stdout is not None and user.stdout.readline().strip() == "ready"
    return user
