"""What ``blockstore push`` checks of a tar layer before uploading it: that a mount could
read it. A layer the mount refuses (cut short, a damaged header, an entry an image
cannot hold) would otherwise be found out only by each mount of the image."""

from __future__ import annotations

import gzip
import io
import os
from pathlib import Path
from typing import IO

from blockstore.errors import IntegrityError, UsageError
from blockstore.registry.mediatypes import GZIP, TAR, ZSTD, layer_kind
from blockstore.registry.push import unreadable_layer
from blockstore.tarlayer.zstdframes import read_frames

KEPT = 1 << 20
"""Bytes a ``ForwardReader`` keeps behind its furthest read: the tar walk seeks back a
block or two (to the end marker), never further."""


class ForwardReader(io.RawIOBase):
    """A decompressed stream made seekable for the tar walk: forward seeks read through,
    backward ones reach into the last ``KEPT`` bytes read. A gzip or zstd file's own
    backward seek would decompress it again from its start."""

    def __init__(self, stream: IO[bytes]):
        self._stream = stream
        self._kept = bytearray()  # the bytes up to self._pulled
        self._pulled = 0
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        target = {os.SEEK_SET: offset, os.SEEK_CUR: self._pos + offset}.get(whence)
        if target is None or target < self._pulled - len(self._kept):
            raise OSError(f"cannot seek to {offset} (whence {whence}) in a decompressed stream")
        self._pos = target
        return target

    def readinto(self, buffer) -> int:  # type: ignore[no-untyped-def]
        while self._pulled <= self._pos:  # read through to the position
            chunk = self._stream.read(KEPT // 4)
            if not chunk:
                return 0
            self._kept += chunk
            self._pulled += len(chunk)
            del self._kept[: max(0, len(self._kept) - KEPT)]
        start = len(self._kept) - (self._pulled - self._pos)
        data = self._kept[start : start + len(buffer)]
        buffer[: len(data)] = data
        self._pos += len(data)
        return len(data)


def check_tar_layer(path: Path, media_type: str) -> None:
    """Walk the tar of a tar layer file (plain, gzip or zstd) and build its tree as the
    mount does; a ``UsageError`` naming the file and the entry if the mount would refuse
    it (``..`` in a path, a name over 255 bytes, a hard link to no file written earlier
    are found only building the tree). Other layers pass."""
    from blockstore.tarlayer.tarwalk import walk_tar
    from blockstore.tarlayer.tree import TarLayerError, build_tree

    kind = layer_kind(media_type)
    if kind is None:
        return
    try:
        raw = path.open("rb")
    except OSError as exc:
        raise unreadable_layer(path, exc) from None
    try:
        with raw:
            if kind == TAR:
                stream: IO[bytes] = raw
            elif kind == GZIP:
                stream = ForwardReader(gzip.GzipFile(fileobj=raw))
            else:
                assert kind == ZSTD
                stream = ForwardReader(read_frames(raw))
            build_tree(walk_tar(stream))
    except TarLayerError as exc:
        raise UsageError(f"cannot push {path}: {exc}") from None
    except (OSError, EOFError, IntegrityError) as exc:
        raise UsageError(f"cannot push {path} as {media_type}: {exc}") from None
