"""A blob that is a local file: the simplest ``BlobSource``, for tests that need no registry."""

from __future__ import annotations

import os

from blockstore.errors import BlobReadError


class LocalFileSource:
    """A local file read as the blob ``digest``; ``read_range`` is one ``pread``."""

    def __init__(self, path: str | os.PathLike[str], digest: str):
        self._path = os.fspath(path)
        self._digest = digest
        self._fd = os.open(self._path, os.O_RDONLY | os.O_CLOEXEC)
        self._size = os.fstat(self._fd).st_size

    @property
    def digest(self) -> str:
        return self._digest

    @property
    def size(self) -> int:
        return self._size

    def read_range(self, offset: int, length: int) -> bytes:
        length = max(0, min(length, self._size - offset))
        try:
            return os.pread(self._fd, length, offset) if length else b""
        except OSError as exc:
            raise BlobReadError(f"reading {self._path} at {offset}: {exc.strerror}") from exc

    def close(self) -> None:
        os.close(self._fd)
