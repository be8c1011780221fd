"""A plain tar layer whose chunks are all cached but whose blob was never sealed: its
reads all hit, so no fetch completes it, and yet it must be sealed and its index proven."""

from __future__ import annotations

import hashlib

from oci_layout import push_tar_layer
from rig.waiting import wait_for
from trees import files_served, tar_of

from blockstore.cache import CHUNK_SIZE, ChunkStore
from blockstore.image import open_image
from blockstore.tarlayer.gzindex import DEFAULT_SPAN
from blockstore.tarlayer.indexcache import IndexCache

FILES = {f"f{i}.bin".encode(): bytes([65 + i]) * (9_000 + 1_000 * i) for i in range(8)}


def test_a_plain_tar_layer_cached_whole_but_unsealed_is_sealed_and_its_index_proven(
    tmp_path, registry
):
    """Tried: a ~100 KiB plain tar layer pushed; its blob stored whole in the cache and
    never sealed (as a process leaves it that closed its store, or stopped, before the
    background seal its last fetch started); the image opened (the index built from
    the cached bytes, unproven), every file read twice. Must hold: the layer is sealed
    in the background while it is open, though no read fetches, and the next open
    proves the index against the sealed tar. Before, it stayed whole and unsealed for
    good (only ``prefetch`` sealed it), its index never proven."""
    tar = tar_of({name.decode(): data for name, data in FILES.items()})  # ~100 KiB
    digest = "sha256:" + hashlib.sha256(tar).hexdigest()
    reference = push_tar_layer(registry, "o/whole-unsealed", "v1", "tar", tar, tmp_path)
    cache = tmp_path / "cache"
    with ChunkStore(cache) as store:
        chunks = [tar[at : at + CHUNK_SIZE] for at in range(0, len(tar), CHUNK_SIZE)]
        store.store_chunks(digest, len(tar), 0, chunks)
        assert not store.lookup(digest).sealed
    image = open_image(reference, cache_dir=cache, options=registry.options())
    try:
        (export,) = image.exports()
        for _ in range(2):
            assert files_served(export) == FILES
        assert wait_for(lambda: image.store.lookup(digest).sealed, timeout=60.0)
    finally:
        image.close()
    image = open_image(reference, cache_dir=cache, options=registry.options())
    try:
        (export,) = image.exports()
        assert files_served(export) == FILES
        assert not IndexCache(image.store).unproven(digest, DEFAULT_SPAN)
    finally:
        image.close()
