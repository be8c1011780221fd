"""Per-chunk sha256 digests of a layer, so a cold chunk is checked before the blob is whole.

A layer's own digest can judge only the whole blob, and a lazily mounted
layer may never be read to its end. A chunk index is a table of the sha256
of every 32 KiB chunk of one layer. It travels with the image as an OCI
artifact (``blockstore index --push``), so a chunk fetched from a mirror or
a CDN edge can be checked on arrival, before it is stored or served.

The index is only as good as the bytes it was built from: it is built from
bytes checked against the layer digest, and when a layer becomes complete
under an index, the chunks that matched the table must also hash to the
layer digest, or the index is dropped as lying.

Serialised form (deterministic, little-endian)::

    magic "BSCHIDX1" | u32 chunk size | u64 layer size | 32-byte layer sha256
    | one 32-byte sha256 per chunk, in order
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from blockstore.errors import IntegrityError, RegistryError

ARTIFACT_TYPE = "application/vnd.blockstore.chunk-index.v1"
"""The artifact type of the manifest that carries a chunk index."""
BLOB_MEDIA_TYPE = "application/vnd.blockstore.chunk-index.v1.table"
"""The media type of the one blob of that manifest: the serialised table."""
LAYER_ANNOTATION = "dev.blockstore.layer.digest"
"""Names the layer a table is for, so an artifact can hold the tables of several layers."""

_MAGIC = b"BSCHIDX1"
_HEADER = struct.Struct("<8sIQ32s")
_DIGEST_SIZE = 32


@dataclass(frozen=True)
class ChunkIndex:
    """The sha256 of each chunk of one layer, and the layer it is for."""

    layer_digest: str
    size: int
    chunk_size: int
    table: bytes
    """``chunk_count`` digests of 32 bytes, concatenated."""

    @property
    def chunk_count(self) -> int:
        return -(-self.size // self.chunk_size)

    def expected(self, index: int) -> bytes:
        """The sha256 the chunk at ``index`` must have."""
        start = index * _DIGEST_SIZE
        return self.table[start : start + _DIGEST_SIZE]

    def matches(self, index: int, data: bytes | memoryview) -> bool:
        """Whether ``data`` is exactly chunk ``index`` of the layer."""
        if not 0 <= index < self.chunk_count:
            return False
        want = min(self.chunk_size, self.size - index * self.chunk_size)
        return len(data) == want and hashlib.sha256(data).digest() == self.expected(index)

    def chunk_hex(self, index: int) -> str:
        return self.expected(index).hex()

    def to_bytes(self) -> bytes:
        head = _HEADER.pack(
            _MAGIC, self.chunk_size, self.size, bytes.fromhex(self.layer_digest[7:])
        )
        return head + self.table

    @classmethod
    def from_bytes(cls, raw: bytes, *, layer_digest: str, size: int, chunk_size: int) -> ChunkIndex:
        """Parse and check a table against the layer it must describe.

        Raises ``RegistryError`` for a table that is malformed or for another
        layer, size or chunk size: a table is never trusted for a layer it
        does not name.
        """
        if len(raw) < _HEADER.size:
            raise RegistryError(f"chunk index for {layer_digest}: {len(raw)} bytes is too short")
        magic, got_chunk, got_size, got_digest = _HEADER.unpack_from(raw)
        if magic != _MAGIC:
            raise RegistryError(f"chunk index for {layer_digest}: not a chunk index table")
        if f"sha256:{got_digest.hex()}" != layer_digest:
            raise RegistryError(
                f"chunk index for {layer_digest} describes sha256:{got_digest.hex()} instead"
            )
        # ``size`` is the manifest's, bounded where the manifest is checked.
        if got_chunk != chunk_size or got_size != size:
            raise RegistryError(
                f"chunk index for {layer_digest}: chunks of {got_chunk} bytes over "
                f"{got_size} bytes, expected {chunk_size} over {size}"
            )
        index = cls(layer_digest, size, chunk_size, bytes(raw[_HEADER.size :]))
        if len(index.table) != index.chunk_count * _DIGEST_SIZE:
            raise RegistryError(
                f"chunk index for {layer_digest}: {len(index.table)} bytes of digests, "
                f"expected {index.chunk_count * _DIGEST_SIZE}"
            )
        return index


def build_index(
    layer_digest: str, size: int, chunk_size: int, pieces: Iterable[bytes | memoryview]
) -> ChunkIndex:
    """Hash the chunks of a layer streamed in order, and check the whole against its digest.

    ``pieces`` may be cut anywhere (HTTP reads, cache chunks); they are
    re-cut into ``chunk_size`` chunks here. Raises ``IntegrityError`` if they
    are not exactly the layer: an index is built from verified bytes only.
    """
    if not layer_digest.startswith("sha256:"):
        raise IntegrityError(f"{layer_digest}: a chunk index needs a sha256 layer digest")
    whole = hashlib.sha256()
    table = bytearray()
    pending = bytearray()
    total = 0
    for piece in pieces:
        whole.update(piece)
        total += len(piece)
        pending += piece
        full = len(pending) - len(pending) % chunk_size
        with memoryview(pending) as view:
            for start in range(0, full, chunk_size):
                table += hashlib.sha256(view[start : start + chunk_size]).digest()
        del pending[:full]
    if pending:
        table += hashlib.sha256(pending).digest()
    if total != size or f"sha256:{whole.hexdigest()}" != layer_digest:
        raise IntegrityError(
            f"{layer_digest}: the bytes read for the chunk index ({total} bytes) do not match "
            "the layer digest"
        )
    return ChunkIndex(layer_digest, size, chunk_size, bytes(table))
