"""Content digests as the OCI specs write them (``algorithm:hex``), in one place for
the client, which checks each source's bytes, and the manifest code above it."""

from __future__ import annotations

import hashlib
import json

from blockstore.errors import IntegrityError

ALGORITHMS = ("sha256", "sha512")
"""The digest algorithms the image spec registers: the only ones checked, or trusted."""


def digest_of(data: bytes, algorithm: str = "sha256") -> str:
    if algorithm not in ALGORITHMS:
        raise IntegrityError(f"unsupported digest algorithm {algorithm!r}")
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


def check_digest(data: bytes, digest: str, subject: str) -> None:
    """Raise ``IntegrityError`` unless ``data`` hashes to ``digest``; a digest of another
    algorithm than ``ALGORITHMS`` cannot be checked, so it is refused, naming ``subject``."""
    algorithm = digest.partition(":")[0]
    if algorithm not in ALGORITHMS:
        raise IntegrityError(  # repr: a registry's header text reaches no terminal as is
            f"{subject} is named by a {algorithm[:20]!r} digest, an algorithm no check is "
            f"had for here ({', '.join(ALGORITHMS)}): refused"
        )
    computed = digest_of(data, algorithm)
    if computed != digest:
        raise IntegrityError(f"{subject} hashes to {computed}, not {digest}: refused")


def check_size(data: bytes, size: int, subject: str) -> None:
    """Raise ``IntegrityError`` unless ``data`` is ``size`` bytes, as its descriptor says:
    the image spec has content of another size not trusted, whatever its digest."""
    if len(data) != size:
        raise IntegrityError(f"{subject} is {len(data)} bytes, its descriptor says {size}: refused")


def canonical_json(document: dict) -> bytes:
    """The bytes a manifest, index or config is pushed as: sorted keys, no spaces, so
    the same document always has the same digest."""
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
