"""Damaging a cached chunk or kept record in place, the way a failing disk would."""

from __future__ import annotations

from pathlib import Path

from blockstore.cache import ChunkStore
from blockstore.cache.layout import DB_CHUNKS, DB_MANIFESTS, chunk_key


def flip_stored_byte(store: ChunkStore, digest: str, index: int, position: int) -> bool:
    """Flip one bit in the stored LMDB value of a chunk (checksum or data); False if absent."""
    record = store.lookup(digest)
    if record is None:
        return False
    key = chunk_key(record.blob_id, index)

    def work(txn) -> bool:
        value = txn.get(key, db=store.dbs[DB_CHUNKS])
        if value is None:
            return False
        raw = bytearray(value)
        raw[position % len(raw)] ^= 0x01
        txn.put(key, bytes(raw), db=store.dbs[DB_CHUNKS])
        return True

    return store.env.write(work)


def flip_kept_byte(store: ChunkStore, name: str, position: int) -> None:
    """Flip one bit of the record kept under ``name`` beside the manifests (a manifest,
    a config, a tar layer's index records); the record must be there."""
    key = name.encode()

    def work(txn) -> None:
        raw = bytearray(txn.get(key, db=store.dbs[DB_MANIFESTS]))
        raw[position % len(raw)] ^= 0x01
        txn.put(key, bytes(raw), db=store.dbs[DB_MANIFESTS])

    store.env.write(work)


def zero_tree_pages(cache_dir: Path) -> int:
    """Zero every B-tree page (branch or leaf) of data.mdb in place, as a failing disk
    might; the meta pages and the chunks' overflow pages stay. Returns how many."""
    path = cache_dir / "data.mdb"
    page = 4096
    zeroed = 0
    with open(path, "r+b") as f:
        for pgno in range(2, path.stat().st_size // page):
            f.seek(pgno * page + 10)
            if int.from_bytes(f.read(2), "little") & 0x3:  # P_BRANCH | P_LEAF
                f.seek(pgno * page)
                f.write(bytes(page))
                zeroed += 1
    return zeroed
