"""The registry's rows of the fault matrix, through the chunk cache where it matters.

Each scenario puts the fault proxy (or a stop and a start) between the
engine and the real registry, and ends with every byte right, or with EIO
within the read's timeout: never a wrong byte, never a hang.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from rig.fault_proxy import Fault
from rig.pushed import push_erofs

from blockstore.cache.layout import CHUNK_SIZE
from blockstore.errors import BlobReadError, IntegrityError
from blockstore.image import open_image
from blockstore.registry import RegistryBlob, RegistryClient, RegistryOptions, resolve_image

OPTIONS = RegistryOptions(insecure=True, timeout=3.0, max_attempts=3)


def joined(buffers) -> bytes:
    return b"".join(bytes(b) for b in buffers)


def open_blob(client: RegistryClient, ref: str, repository: str) -> RegistryBlob:
    return RegistryBlob(client, repository, resolve_image(client, ref, None).layers[0])


def test_bytes_altered_before_the_seal_are_caught_at_the_seal_and_dropped(
    fresh_registry, erofs_images, fault_proxy, tmp_path: Path
):
    """Every blob reply has a byte flipped: prefetch fails its digest (integrity), keeps
    nothing, and a prefetch once the network is sound seals it with every byte right."""
    proxy = fault_proxy(fresh_registry)
    ref = push_erofs(proxy.host, "matrix/before", "v1", [erofs_images.small.path])
    expected = erofs_images.small.path.read_bytes()
    image = open_image(ref, cache_dir=tmp_path / "cache", options=OPTIONS)
    try:
        (blob,) = image.exports()
        proxy.fault = Fault("corrupt", method="GET", path_contains="/blobs/", after_bytes=100)
        with pytest.raises(IntegrityError):
            blob.prefetch()
        record = image.store.lookup(blob.digest)
        assert record is None or not record.sealed
        proxy.fault = None
        blob.prefetch()
        assert image.store.lookup(blob.digest).sealed
        assert joined(blob.read(0, len(expected))) == expected
    finally:
        image.close()


def test_bytes_altered_after_the_seal_are_caught_per_chunk(
    fresh_registry, erofs_images, fault_proxy, tmp_path: Path
):
    """A sealed layer whose chunks were evicted is fetched again through a proxy that
    flips a byte: each such chunk fails its sealed checksum (EIO), nothing wrong is
    stored, and once the network is sound the same reads give the right bytes."""
    proxy = fault_proxy(fresh_registry)
    ref = push_erofs(proxy.host, "matrix/after", "v1", [erofs_images.small.path])
    expected = erofs_images.small.path.read_bytes()
    image = open_image(ref, cache_dir=tmp_path / "cache", options=OPTIONS)
    try:
        image.exports()[0].prefetch()
    finally:
        image.close()
    image = open_image(
        ref, cache_dir=tmp_path / "cache", cache_size=4 * CHUNK_SIZE, options=OPTIONS
    )
    try:
        assert image.store.gc()["evicted_chunks"] > 0
        (blob,) = image.exports()
        record = image.store.lookup(blob.digest)
        assert record.sealed
        evicted = image.store.missing(record.blob_id, range(record.chunks))
        assert evicted
        index = evicted[len(evicted) // 2]
        proxy.fault = Fault("corrupt", method="GET", path_contains="/blobs/", after_bytes=100)
        with pytest.raises(BlobReadError) as caught:
            blob.read(index * CHUNK_SIZE, 4096)
        assert caught.value.errno == 5
        assert image.store.missing(record.blob_id, [index]) == [index]
        proxy.fault = None
        start = index * CHUNK_SIZE
        assert joined(blob.read(start, CHUNK_SIZE)) == expected[start : start + CHUNK_SIZE]
    finally:
        image.close()


@pytest.mark.parametrize(
    ("status", "retry_after"), [(500, None), (502, None), (503, None), (503, "1"), (429, "1")]
)
def test_a_short_status_storm_is_ridden_out(
    registry, pushed_images, erofs_images, fault_proxy, status, retry_after
):
    """Two replies of 500/502/503/429, with and without Retry-After, then the registry
    is back: the read gets every byte right."""
    proxy = fault_proxy(registry)
    headers = {"Retry-After": retry_after} if retry_after else {}
    with RegistryClient(proxy.host, OPTIONS) as client:
        blob = open_blob(client, f"{proxy.host}/fixtures/small:v1", "fixtures/small")
        proxy.fault = Fault(
            "status", status=status, headers=headers, times=2, path_contains="/blobs/"
        )
        assert blob.read_range(1000, 50_000) == erofs_images.small.path.read_bytes()[1000:51_000]
    assert proxy.faults_applied == 2


@pytest.mark.parametrize("status", [500, 503, 429])
def test_an_endless_status_storm_ends_in_eio_within_the_timeout(
    registry, pushed_images, fault_proxy, status
):
    """A registry that answers only 500, 503 or 429 (no Retry-After): EIO after the
    bounded attempts, well within the timeout, naming the registry's own error."""
    proxy = fault_proxy(registry)
    with RegistryClient(proxy.host, OPTIONS) as client:
        blob = open_blob(client, f"{proxy.host}/fixtures/small:v1", "fixtures/small")
        proxy.fault = Fault("status", status=status, path_contains="/blobs/")
        started = time.monotonic()
        with pytest.raises(BlobReadError) as caught:
            blob.read_range(0, 4096)
    assert time.monotonic() - started < OPTIONS.timeout
    assert f"HTTP {status}" in str(caught.value) and caught.value.errno == 5
    assert proxy.faults_applied == OPTIONS.max_attempts


def test_reads_resume_after_the_registry_restarts(fresh_registry, erofs_images, tmp_path: Path):
    """The registry goes down while a layer is in use: a read then fails with EIO within
    the timeout; once the same registry is back, the same client reads every byte right
    (its pooled connections to the old process are given up)."""
    ref = push_erofs(fresh_registry.host, "matrix/restart", "v1", [erofs_images.large.path])
    expected = erofs_images.large.path.read_bytes()
    image = open_image(ref, cache_dir=tmp_path / "cache", options=OPTIONS)
    try:
        (blob,) = image.exports()
        assert joined(blob.read(0, 100_000)) == expected[:100_000]
        fresh_registry.stop()
        started = time.monotonic()
        with pytest.raises(BlobReadError):
            blob.read(20 << 20, 100_000)
        assert time.monotonic() - started < OPTIONS.timeout + 0.5
        fresh_registry.start()
        for offset in (20 << 20, 40 << 20, len(expected) - 100_000):
            assert joined(blob.read(offset, 100_000)) == expected[offset : offset + 100_000]
    finally:
        image.close()
