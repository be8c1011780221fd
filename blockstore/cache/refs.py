"""What an offline mount needs besides chunks: resolved references and raw manifests.

A reference resolved online (for one platform) is remembered as a JSON
record naming its manifest and layers, with the manifests' raw bytes, so
the same reference resolves with no network later. A record that no longer
parses, or says other than its manifest, is reported as a cache error, never
as a traceback.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Protocol, TypeVar

import lmdb

from blockstore.errors import CacheError

from .errors import RECORD_ERRORS
from .layout import DB_BLOBS, DB_MANIFESTS, DB_REFS, BlobRecord

log = logging.getLogger(__name__)
T = TypeVar("T")


class Databases(Protocol):
    """What the records need of the cache's environment (``CacheEnv``). Named here, as
    the environment imports this module (it brings a cache up with
    ``mark_images_pinned_whole``), and this one imports nothing of it."""

    dbs: dict[bytes, lmdb._Database]
    read_only: bool

    def write(self, work: Callable[[lmdb.Transaction], T]) -> T: ...

    def reader(self, db: bytes | None = None) -> AbstractContextManager[lmdb.Transaction]: ...

    def ask(self, question: Callable[[], T], empty: Callable[[], T] | None = None) -> T: ...


def _layer_facts(layer: dict) -> tuple:
    """What a record must say of a layer as its manifest does."""
    return layer["digest"], layer["size"], layer.get("mediaType", "")


def _ref_key(reference: str, platform: str | None) -> bytes:
    return f"{reference}\0{platform or ''}".encode()


def _encode(record: dict) -> bytes:
    return json.dumps(record, sort_keys=True).encode()


def _decode(raw: bytes, what: str) -> dict:
    try:
        record = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CacheError(f"the cached record of {what} is damaged: {exc}") from exc
    if not isinstance(record, dict):
        raise CacheError(f"the cached record of {what} is damaged: not a JSON object")
    return record


def _keys_from(cursor: lmdb.Cursor, prefix: bytes) -> list[bytes]:
    """The keys that start with ``prefix``, copied out of the cursor's transaction (so the
    caller may write under them); their values are not read."""
    keys: list[bytes] = []
    if cursor.set_range(prefix):
        for view in cursor.iternext(values=False):
            key = bytes(view)
            if not key.startswith(prefix):
                break
            keys.append(key)
    return keys


def mark_images_pinned_whole(txn: lmdb.Transaction, dbs: dict[bytes, lmdb._Database]) -> None:
    """Mark each image whose record has no mark, and all of whose layers are pinned, as
    pinned as a whole (``ImageRecords.mark_pinned``), in a cache an older version kept:
    versions before that mark pinned an image's layers and marked nothing, so
    unpinning another image would let eviction take the layers they share. An image
    pinned only through others' pins is taken for pinned too: an unpin then keeps what
    it shares, naming it, rather than let it go."""
    refs = dbs[DB_REFS]
    for key in _keys_from(txn.cursor(db=refs), b""):
        try:
            record = _decode(bytes(txn.get(key, db=refs)), "")
            layers = [layer["digest"] for layer in record["layers"]]
        except (CacheError, KeyError, TypeError):
            continue  # damaged: ``verify`` drops it
        if "pinned" not in record and layers and all(_pinned(txn, dbs, d) for d in layers):
            record["pinned"] = True
            txn.put(key, _encode(record), db=refs)


def _pinned(txn: lmdb.Transaction, dbs: dict[bytes, lmdb._Database], digest: object) -> bool:
    raw = txn.get(digest.encode(), db=dbs[DB_BLOBS]) if isinstance(digest, str) else None
    try:
        return raw is not None and BlobRecord.unpack(raw).pinned
    except RECORD_ERRORS:
        return False


class ImageRecords:
    """References and manifests kept in the cache for offline use."""

    def __init__(self, env: Databases):
        self._env = env

    def put(self, reference: str, platform: str | None, record: dict) -> None:
        """Remember ``record``; the mark that the image is pinned (``mark_pinned``) is
        kept across a resolve that records it anew."""
        key = _ref_key(reference, platform)
        refs = self._env.dbs[DB_REFS]

        def work(txn: lmdb.Transaction) -> None:
            old = txn.get(key, db=refs)
            kept = dict(record)
            try:
                if old is not None and _decode(bytes(old), reference).get("pinned"):
                    kept["pinned"] = True
            except CacheError:
                pass  # a damaged record is replaced whole
            txn.put(key, _encode(kept), db=refs)

        self._env.write(work)

    def get(self, reference: str, platform: str | None) -> dict | None:
        """The record of ``reference`` for ``platform``; ``CacheError`` if it is damaged:
        no longer JSON, or not what the manifest it names says (``_disagreement``)."""
        with self._env.reader(DB_REFS) as txn:
            raw = txn.get(_ref_key(reference, platform))
            raw = bytes(raw) if raw is not None else None
        if raw is None:
            return None
        record = _decode(raw, reference)
        why = self._disagreement(record)
        if why:
            raise CacheError(f"the cached record of {reference} is damaged: {why}")
        return record

    def _disagreement(self, record: dict) -> str | None:
        """Why ``record`` is not what the manifest it names says, kept beside it and
        checked against its digest: its layers' digests, sizes and media types. None
        if it is, or if no such manifest is kept. A record changed on the disk would
        otherwise serve, offline, a blob the image does not have, every read of it EIO."""
        digest = record.get("manifest_digest")
        raw = self.manifest(digest) if isinstance(digest, str) else None
        if raw is None:
            return None
        algorithm, _, encoded = digest.partition(":")
        try:
            matches = hashlib.new(algorithm, raw).hexdigest() == encoded
        except ValueError:
            matches = False
        if not matches:
            return f"its manifest {digest} does not match its digest"
        try:
            listed = [_layer_facts(layer) for layer in json.loads(raw)["layers"]]
            kept = [_layer_facts(layer) for layer in record["layers"]]
        except (ValueError, TypeError, KeyError, RecursionError):
            return f"its layers cannot be compared with those of its manifest {digest}"
        if kept != listed:
            return f"its layers are not those of its manifest {digest}"
        return None

    def all(self) -> list[dict]:
        """Every record that parses; a damaged one is skipped with a warning, so one bad
        record does not stop ``cache ls``, ``rm`` or ``mounts`` (``verify`` drops it)."""
        with self._env.reader(DB_REFS) as txn:
            raws = [(bytes(key), bytes(raw)) for key, raw in txn.cursor()]
        records = []
        for key, raw in raws:
            try:
                records.append(_decode(raw, key.split(b"\0")[0].decode(errors="replace")))
            except CacheError as exc:
                log.warning("%s; skipped (`blockstore cache verify` drops it)", exc)
        return records

    def kept(self) -> list[tuple[str, str]]:
        """The reference and platform each record is kept under, as an open asks for it
        (a record's own ``platform`` is its manifest's, None for a lone manifest)."""
        with self._env.reader(DB_REFS) as txn:
            keys = [bytes(key) for key in txn.cursor().iternext(values=False)]
        names = [key.decode(errors="replace").partition("\0") for key in keys]
        return [(reference, platform) for reference, _, platform in names]

    def mark_pinned(self, reference: str, pinned: bool) -> None:
        """Say in each record of ``reference`` (every platform) whether the image was
        pinned as a whole, so unpinning another image that shares its layers keeps them."""
        refs = self._env.dbs[DB_REFS]
        prefix = _ref_key(reference, None)

        def work(txn: lmdb.Transaction) -> None:
            for key in _keys_from(txn.cursor(db=refs), prefix):
                try:
                    record = _decode(bytes(txn.get(key, db=refs)), reference)
                except CacheError:
                    continue  # damaged: ``verify`` drops it
                record["pinned"] = pinned
                txn.put(key, _encode(record), db=refs)

        self._env.write(work)

    def remove(self, reference: str) -> int:
        """Forget ``reference`` for every platform it was kept for; how many records went.
        (A record's ``platform`` field is the manifest's, None for a lone manifest, while
        its key names the platform it was asked for.)"""
        return self._drop_prefixed(DB_REFS, _ref_key(reference, None), lambda key: False)

    def drop_damaged(self) -> list[str]:
        """Remove the records that no longer parse (left in a read-only cache); the
        references they were for."""
        with self._env.reader(DB_REFS) as txn:
            raws = [(bytes(key), bytes(raw)) for key, raw in txn.cursor()]
        damaged = []
        for key, raw in raws:
            try:
                if self._disagreement(_decode(raw, "")):
                    damaged.append(key)
            except CacheError:
                damaged.append(key)
        if damaged and not self._env.read_only:
            refs = self._env.dbs[DB_REFS]
            self._env.write(lambda txn: [txn.delete(key, db=refs) for key in damaged])
        return [key.split(b"\0")[0].decode(errors="replace") for key in damaged]

    def put_manifest(self, digest: str, raw: bytes) -> None:
        self._env.write(lambda txn: txn.put(digest.encode(), raw, db=self._env.dbs[DB_MANIFESTS]))

    def manifest(self, digest: str) -> bytes | None:
        """The record kept under ``digest``; one found damaged is asked again of the empty
        cache that replaces the damaged one (moved aside on the way), as a chunk is: an
        open reads these first, and would otherwise fail on the damage every time. Where
        it cannot be moved aside, this process goes on without it, as with no record."""

        def question() -> bytes | None:
            with self._env.reader(DB_MANIFESTS) as txn:
                raw = txn.get(digest.encode())
                return bytes(raw) if raw is not None else None

        return self._env.ask(question, lambda: None)

    def manifest_names(self, prefix: str) -> list[str]:
        """The names of the records kept beside the manifests that start with ``prefix``."""
        with self._env.reader(DB_MANIFESTS) as txn:
            keys = _keys_from(txn.cursor(), prefix.encode())
        return [key.decode(errors="replace") for key in keys]

    def drop_manifests(self, prefix: str, keep: Callable[[str], bool]) -> int:
        """Delete the records whose name starts with ``prefix`` unless ``keep(name)``;
        how many went."""
        return self._drop_prefixed(
            DB_MANIFESTS, prefix.encode(), lambda key: keep(key.decode(errors="replace"))
        )

    def _drop_prefixed(self, db_name: bytes, prefix: bytes, keep: Callable[[bytes], bool]) -> int:
        """Delete the keys of ``db_name`` that start with ``prefix`` unless ``keep(key)``,
        in one write; how many went."""
        db = self._env.dbs[db_name]

        def drop(txn: lmdb.Transaction) -> int:
            keys = [key for key in _keys_from(txn.cursor(db=db), prefix) if not keep(key)]
            for key in keys:
                txn.delete(key, db=db)
            return len(keys)

        return self._env.write(drop)
