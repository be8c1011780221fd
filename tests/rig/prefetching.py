"""The ``blockstore`` command as the prefetch tests run it, and what they read back."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def blockstore(*args: str, **kw: Any) -> subprocess.CompletedProcess:
    """``blockstore ARGS`` to its end (two minutes at most), its output captured."""
    kw.setdefault("timeout", 120)
    return subprocess.run(
        [sys.executable, "-m", "blockstore", *args], capture_output=True, text=True, **kw
    )


def start_prefetch(reference: str, cache: Path) -> subprocess.Popen:
    """``blockstore prefetch`` of ``reference`` into ``cache``, started, not waited for."""
    argv = ["prefetch", reference, "--insecure", "--cache-dir", str(cache)]
    return subprocess.Popen(
        [sys.executable, "-m", "blockstore", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def first_blob(cache: Path, field: str) -> Any:
    """``field`` of the first blob ``cache ls --json`` lists (None: no cache, no blob)."""
    if not cache.exists():
        return None
    listing = blockstore("cache", "ls", "--json", "--cache-dir", str(cache))
    blobs = json.loads(listing.stdout or "[]")
    return blobs[0][field] if blobs else None


def cached_bytes(cache: Path) -> int:
    return first_blob(cache, "cached_bytes") or 0


def bytes_asked(requests: Iterable[Any]) -> int:
    """The bytes the ``Range`` headers of the proxy's ``requests`` asked for."""
    total = 0
    for request in requests:
        if m := re.fullmatch(r"bytes=(\d+)-(\d+)", request.headers.get("Range", "")):
            total += int(m[2]) - int(m[1]) + 1
    return total
