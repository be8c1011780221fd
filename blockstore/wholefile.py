"""Files replaced whole: a reader sees the old content or the new, never a part.

The new content is written beside the file and renamed over it, the one
step a reader can observe; a write that fails leaves nothing beside it.
"""

from __future__ import annotations

from pathlib import Path


def replace_whole(path: Path, data: bytes, suffix: str) -> None:
    """``data`` at ``path``, written first to its name plus ``suffix``; raises the
    ``OSError`` of a write or rename that fails, with nothing left beside ``path``."""
    partial = path.with_name(path.name + suffix)
    try:
        partial.write_bytes(data)
        partial.replace(path)
    except OSError:
        partial.unlink(missing_ok=True)
        raise
