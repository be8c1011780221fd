"""A plain tar layer whose registry served another blob of the same length while it was
indexed (a header walk reads a few ranges, proven only once the layer is sealed)."""

from __future__ import annotations

import hashlib
import subprocess
import sys

from oci_layout import push_tar_layer
from rig.fault_proxy import Fault
from rig.stored_chunks import flip_kept_byte
from trees import files_served, tar_of

from blockstore.cache import ChunkStore
from blockstore.image import open_image
from blockstore.tarlayer.gzindex import DEFAULT_SPAN
from blockstore.tarlayer.layerindex import INDEX_FORMAT

CLI = [sys.executable, "-m", "blockstore"]
RIGHT = b"R" * 100_000


def read_whole_then_seal(reference: str, cache: str, registry) -> bool | None:
    """Read the layer whole through an open export, then seal it (the seal of a layer
    its reads made whole, done here, not in the background): the seal's verdict."""
    image = open_image(reference, cache_dir=cache, options=registry.options())
    try:
        (export,) = image.exports()
        start, size = export.index.tar_start, export.index.tar_size
        b"".join(bytes(b) for b in export.read(start, size))
        digest = export.index.tar_digest
    finally:
        image.close()
    store = ChunkStore(cache)
    try:
        return store.seal(digest)
    finally:
        store.close()


def indexed_from_another_blob(tmp_path, registry, fault_proxy) -> tuple[str, str]:
    """A plain tar layer (``right.txt``) pushed, then opened in an empty cache through a
    proxy that answers its ranges with another tar of the same length (``wrong.txt``):
    the index kept names the other tree. The reference through the proxy, the fault
    cleared, and the cache."""
    right = tar_of({"right.txt": RIGHT})
    wrong = tar_of({"wrong.txt": b"W" * len(RIGHT)})
    assert len(right) == len(wrong)
    ref = push_tar_layer(registry, "o/swapped", "v1", "tar", right, tmp_path)
    digest = "sha256:" + hashlib.sha256(right).hexdigest()
    proxy = fault_proxy(registry)
    reference = ref.replace(registry.host, proxy.host)
    cache = tmp_path / "cache"
    proxy.fault = Fault("replace", path_contains=digest, method="GET", body=wrong)
    image = open_image(reference, cache_dir=cache, options=registry.options())
    try:
        (export,) = image.exports()
        assert list(files_served(export)) == [b"wrong.txt"]
    finally:
        image.close()
    proxy.fault = None
    return reference, str(cache)


def prefetch_until_sealed(reference: str, cache: str) -> None:
    """``prefetch`` until it succeeds: the first finds the cached bytes wrong at the
    seal (exit 6, dropping them), as for any layer; a later one fetches them anew."""
    for _ in range(3):
        done = subprocess.run(
            [*CLI, "prefetch", reference, "--insecure", "--cache-dir", cache],
            capture_output=True,
            text=True,
        )
        if done.returncode == 0:
            return
        assert done.returncode == 6, done.stderr
    raise AssertionError(f"prefetch never succeeded: {done.stderr}")


def assert_offline_tree_is_right(reference: str, cache: str) -> None:
    """Offline, the image shows the layer's own tree: ``right.txt`` with its bytes."""
    image = open_image(reference, cache_dir=cache, offline=True)
    try:
        (export,) = image.exports()
        assert files_served(export) == {b"right.txt": RIGHT}
    finally:
        image.close()


def test_an_index_built_from_another_blob_is_dropped_when_the_layer_is_prefetched(
    tmp_path, registry, fault_proxy
):
    """Tried: the index kept from another blob's bytes (above); then ``prefetch`` until
    it succeeds (the first finds the cached bytes wrong at the seal, as for any layer).
    Must hold: the layer, once sealed, is never served through the other tree's index:
    it is proven against the sealed tar, found wrong, dropped and built again, and the
    image then shows ``right.txt`` with its bytes, offline too. Before, the kept index
    was never judged: once the right bytes were sealed, every open (offline too) showed
    ``wrong.txt``, which the layer does not hold, with ``right.txt``'s bytes."""
    reference, cache = indexed_from_another_blob(tmp_path, registry, fault_proxy)
    prefetch_until_sealed(reference, cache)
    assert_offline_tree_is_right(reference, cache)


def test_an_index_built_from_another_blob_is_proven_at_the_open_after_reads_seal_it(
    tmp_path, registry, fault_proxy, caplog
):
    """Tried: the index kept from another blob's bytes (above); then the layer read
    whole through an open export and sealed, as the reads that complete a layer seal
    it, until sealed (a first seal finds the cached bytes wrong and drops them). Must hold:
    the next open proves the kept index against the sealed tar, finds it is another
    tree's, says so, and serves the index built again: ``right.txt`` with its bytes.
    Before, ``wrong.txt``."""
    reference, cache = indexed_from_another_blob(tmp_path, registry, fault_proxy)
    # Until sealed: a seal (this one, or one the reads made) drops the wrong bytes
    # cached, and a read in a later open fetches them anew.
    assert any(read_whole_then_seal(reference, cache, registry) for _ in range(3))
    image = open_image(reference, cache_dir=cache, options=registry.options())
    try:
        (export,) = image.exports()
        assert files_served(export) == {b"right.txt": RIGHT}
    finally:
        image.close()
    assert "does not describe its tar" in caplog.text


def test_a_damaged_unproven_mark_still_has_the_index_proven(tmp_path, registry, fault_proxy):
    """Tried: the index kept from another blob's bytes (above), then one bit flipped in
    the record marking it unproven, then ``prefetch`` until it succeeds. Must hold: a
    mark that fails its checksum counts as unproven, so the index is proven against the
    sealed tar, dropped and built again: the image shows ``right.txt``, offline too.
    Before, a damaged mark read as absent, that is proven: ``wrong.txt`` for good."""
    reference, cache = indexed_from_another_blob(tmp_path, registry, fault_proxy)
    digest = "sha256:" + hashlib.sha256(tar_of({"right.txt": RIGHT})).hexdigest()
    with ChunkStore(cache) as store:
        flip_kept_byte(store, f"tarlayer/v{INDEX_FORMAT}/span{DEFAULT_SPAN}/{digest}/unproven", 0)
    prefetch_until_sealed(reference, cache)
    assert_offline_tree_is_right(reference, cache)
