"""Ordinary image layers (tar, tar+gzip, tar+zstd) mounted lazily as EROFS.

A tar layer is served as one device, ``metadata || uncompressed tar``: the
metadata is an EROFS image written here whose files point at their bytes in
the tar, so the kernel reads file data straight out of the tar.
"""

from __future__ import annotations

from typing import IO

from blockstore.tarlayer.erofs_writer import write_metadata
from blockstore.tarlayer.tarwalk import walk_tar
from blockstore.tarlayer.tree import build_tree


def build_metadata(tar: IO[bytes], tar_size: int) -> bytes:
    """The EROFS metadata image for the uncompressed tar in ``tar``."""
    return write_metadata(build_tree(walk_tar(tar)), tar_size)
