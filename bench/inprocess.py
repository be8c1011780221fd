"""The chunk cache in this process, with no NBD and no network between.

The cache is filled from the image file, then the image is read whole,
sequentially, in 4 KiB, 128 KiB and 1 MiB reads, every byte served from
LMDB with its checksum checked, through ``read`` and through ``read_cached``
(the server's hit path), on an export with a source so readahead runs as
it does when serving. This is the upper bound the NBD figures of a warm
cache are measured against.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from bench.images import Image
from bench.workloads import MiB
from blockstore.cache import CachedBlob, ChunkStore
from blockstore.errors import BlobReadError

READ_SIZES = (4 << 10, 128 << 10, 1 << 20)


class FileBlob:
    """The image file as a blob source (digest known): the cache's only way in here."""

    def __init__(self, image: Image):
        self.digest = image.digest
        self.size = image.size
        self._fd = os.open(image.path, os.O_RDONLY | os.O_CLOEXEC)

    def read_range(self, offset: int, length: int) -> bytes:
        length = max(0, min(length, self.size - offset))
        try:
            return os.pread(self._fd, length, offset)
        except OSError as exc:
            raise BlobReadError(f"reading the image at {offset}: {exc.strerror}") from exc

    def close(self) -> None:
        os.close(self._fd)


def random_blob(work: Path, size_mib: int) -> Image:
    """``size_mib`` MiB of random bytes in ``work``, as an image with its digest."""
    path = work / "blob.bin"
    digest = hashlib.sha256()
    with path.open("wb") as out:
        for _ in range(size_mib):
            piece = os.urandom(1 << 20)
            digest.update(piece)
            out.write(piece)
    size = size_mib << 20
    return Image("random", path, work, f"sha256:{digest.hexdigest()}", size, "random")


@contextlib.contextmanager
def warm_random_blob(work: Path, size_mib: int) -> Iterator[tuple[Image, ChunkStore]]:
    """A random blob prefetched into a cache of its own in ``work``: every read of it
    then a checked hit. The side scripts' subject, against peers serving the file."""
    image = random_blob(work, size_mib)
    source = FileBlob(image)
    store = ChunkStore(work / "cache", size_cap=4 * image.size)
    try:
        CachedBlob(store, image.digest, image.size, source).prefetch()
        yield image, store
    finally:
        store.close()
        source.close()


def read_rate(read: Callable[[int, int], object], size: int, read_size: int, seconds: float):
    """MiB/s of whole sequential passes over the blob, for at least ``seconds``."""
    done = 0
    started = time.perf_counter()
    while True:
        for offset in range(0, size, read_size):
            read(offset, min(read_size, size - offset))
        done += size
        elapsed = time.perf_counter() - started
        if elapsed >= seconds:
            return done / elapsed / MiB


def measure(image: Image, cache_dir: Path, seconds: float) -> Iterator[tuple[str, dict]]:
    """(workload name, figures) for the fill and each read method and size."""
    source = FileBlob(image)
    store = ChunkStore(cache_dir, size_cap=4 * image.size)
    try:
        filling = CachedBlob(store, image.digest, image.size, source)
        started = time.perf_counter()
        filling.prefetch()
        fill = time.perf_counter() - started
        filling.close()
        yield "fill", {"MiB/s": image.size / fill / MiB}
        warm = CachedBlob(store, image.digest, image.size, source)
        for method in (warm.read, warm.read_cached):
            for read_size in READ_SIZES:
                rate = read_rate(method, image.size, read_size, seconds)
                name = f"{method.__name__.replace('_', '-')}-{read_size >> 10}k"
                yield name, {"MiB/s": rate, "reads/s": rate * MiB / read_size}
        warm.close()
    finally:
        store.close()
        source.close()
