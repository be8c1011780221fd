"""Damaging a cached chunk or kept record in place, the way a failing disk would."""

from __future__ import annotations

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
