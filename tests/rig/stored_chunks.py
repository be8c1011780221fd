"""Damaging a cached chunk in place, the way a failing disk would."""

from __future__ import annotations

from blockstore.cache import ChunkStore
from blockstore.cache.layout import DB_CHUNKS, chunk_key


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
