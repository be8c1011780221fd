"""Where things are in an LMDB file, so a test can damage exactly one kind of thing.

Follows the page layout of lmdb's mdb.c (64-bit): every page starts with a
16-byte header (page number, pad, flags at byte 10, then lower and upper
bounds, or for an overflow page its page count at byte 12); a leaf page's
nodes are found through the u16 offsets after the header, each node being
data size (4 bytes), flags and key size (2 bytes each), then the key.
"""

from __future__ import annotations

import struct
from pathlib import Path

PAGE = 4096
P_BRANCH, P_LEAF, P_OVERFLOW, P_META = 0x01, 0x02, 0x04, 0x08
CHUNK_KEY_SIZE = 16


def regions(data_mdb: Path) -> dict[str, list[tuple[int, int]]]:
    """Byte ranges of the file by kind: ``tree`` (branch and leaf pages), ``keys`` (the
    keys of chunk records in leaf pages), ``values`` (overflow pages: chunk values),
    ``records`` (small values kept in leaf pages: blob records, counters, meta)."""
    raw = data_mdb.read_bytes()
    out: dict[str, list[tuple[int, int]]] = {"tree": [], "keys": [], "values": [], "records": []}
    pgno = 2
    pages = len(raw) // PAGE
    while pgno < pages:
        base = pgno * PAGE
        flags = struct.unpack_from("<H", raw, base + 10)[0]
        if flags & P_OVERFLOW:
            count = struct.unpack_from("<I", raw, base + 12)[0]
            if 0 < count <= pages - pgno:
                out["values"].append((base + 16, base + count * PAGE))
                pgno += count
                continue
        elif flags & (P_BRANCH | P_LEAF) and not flags & P_META:
            out["tree"].append((base, base + PAGE))
            if flags & P_LEAF:
                lower = struct.unpack_from("<H", raw, base + 12)[0]
                for i in range(max(0, (lower - 16) // 2)):
                    node = struct.unpack_from("<H", raw, base + 16 + 2 * i)[0]
                    if not 16 <= node <= PAGE - 8:
                        continue
                    lo, hi, nflags, ksize = struct.unpack_from("<HHHH", raw, base + node)
                    start = base + node + 8
                    if ksize == CHUNK_KEY_SIZE:
                        out["keys"].append((start, start + CHUNK_KEY_SIZE))
                    size = lo | hi << 16
                    if nflags == 0 and size > 0 and node + 8 + ksize + size <= PAGE:
                        out["records"].append((start + ksize, start + ksize + size))
        pgno += 1
    return out
