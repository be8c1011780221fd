"""Chunk indexes: built from verified bytes, attached to the image, read back by anyone."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rig.pushed import push_erofs

from blockstore.attachments import fetch_indexes, subject_of
from blockstore.cache import CHUNK_SIZE
from blockstore.chunkindex import ARTIFACT_TYPE, ChunkIndex, build_index
from blockstore.errors import BlobReadError, IntegrityError, RegistryError
from blockstore.indexed_source import IndexedSource
from blockstore.registry import RegistryClient, RegistryOptions, parse_reference, resolve_image
from blockstore.registry.referrers import fallback_tag


def blockstore(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "blockstore", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )


def chunk_digests(data: bytes) -> list[bytes]:
    return [
        hashlib.sha256(data[i : i + CHUNK_SIZE]).digest() for i in range(0, len(data), CHUNK_SIZE)
    ]


def test_build_index_recuts_pieces_and_refuses_bytes_that_are_not_the_layer():
    """Pieces cut anywhere give the same table; bytes that do not hash to the digest give none."""
    data = bytes(range(256)) * 1000 + b"tail"  # not a whole number of chunks
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    pieces = [data[i : i + 7777] for i in range(0, len(data), 7777)]
    index = build_index(digest, len(data), CHUNK_SIZE, pieces)
    assert [index.expected(i) for i in range(index.chunk_count)] == chunk_digests(data)
    assert index.matches(index.chunk_count - 1, data[-(len(data) % CHUNK_SIZE) :])
    assert not index.matches(0, data[1 : CHUNK_SIZE + 1])
    with pytest.raises(IntegrityError):
        build_index(digest, len(data), CHUNK_SIZE, [data[:-1] + b"X"])


def test_a_table_for_another_layer_or_malformed_is_refused():
    """A table is trusted only for the layer, size and chunk size it names."""
    data = b"a" * (3 * CHUNK_SIZE + 5)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    raw = build_index(digest, len(data), CHUNK_SIZE, [data]).to_bytes()
    again = ChunkIndex.from_bytes(raw, layer_digest=digest, size=len(data), chunk_size=CHUNK_SIZE)
    assert again.to_bytes() == raw
    other = "sha256:" + "0" * 64
    for bad, kwargs in [
        (raw, {"layer_digest": other, "size": len(data)}),
        (raw, {"layer_digest": digest, "size": len(data) + 1}),
        (raw[:-1], {"layer_digest": digest, "size": len(data)}),
        (raw + b"\0" * 32, {"layer_digest": digest, "size": len(data)}),
        (b"garbage" * 20, {"layer_digest": digest, "size": len(data)}),
    ]:
        with pytest.raises(RegistryError):
            ChunkIndex.from_bytes(bad, chunk_size=CHUNK_SIZE, **kwargs)


def test_index_push_is_read_back_by_us_and_by_skopeo(registry, erofs_images, tmp_path):
    """`blockstore index --push` on a registry without the referrers API uses the tag schema:
    skopeo sees an index under sha256-<hex> listing our artifact, and the tables read back
    are the sha256 of each 32 KiB chunk of each layer. Pushing again replaces the artifact."""
    paths = [layer.path for layer in erofs_images.layers]
    image = push_erofs(registry.host, "artifacts/indexed", "v1", paths)
    cache = tmp_path / "cache"
    first = blockstore("index", image, "--push", "--insecure", "--cache-dir", str(cache))
    assert first.returncode == 0, first.stderr
    indexed = re.findall(r": (\d+) chunks? indexed \(from the registry\)", first.stdout)
    assert len(indexed) == len(paths)

    with RegistryClient(registry.host, RegistryOptions(insecure=True)) as client:
        ref = parse_reference(image)
        resolved = resolve_image(client, ref)
        subject = subject_of(resolved, ref.repository)
        tables = fetch_indexes(client, subject, resolved.layers)
        assert set(tables) == {layer.digest for layer in resolved.layers}
        for layer, path in zip(resolved.layers, paths, strict=True):
            table = tables[layer.digest]
            assert [table.expected(i) for i in range(table.chunk_count)] == chunk_digests(
                path.read_bytes()
            )
        # Again, for one layer only: the artifact still holds every layer's table, once.
        again = blockstore(
            "index", image, "--layer", "0", "--push", "--insecure", "--cache-dir", str(cache)
        )
        assert again.returncode == 0, again.stderr
        assert "from the cache" in again.stdout
        assert set(fetch_indexes(client, subject, resolved.layers)) == set(tables)

    if shutil.which("skopeo") is None:
        pytest.skip("skopeo is not installed")
    tag = fallback_tag(subject.digest)
    seen = subprocess.run(
        ["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{registry.host}/"
         f"artifacts/indexed:{tag}"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert seen.returncode == 0, seen.stderr
    listing = json.loads(seen.stdout)
    assert [e["artifactType"] for e in listing["manifests"]] == [ARTIFACT_TYPE]


def test_cache_verify_checks_incomplete_blobs_against_their_kept_index(tmp_path):
    """Chunks of a blob not complete yet, stored with bytes a bad source sent (their own
    checksum is fine, and no digest can judge a partial blob): with a kept chunk index,
    `cache verify` finds the wrong chunk, drops it, keeps the right ones, and exits 6."""
    from blockstore.cache import ChunkStore
    from blockstore.cache.indexes import IndexShelf

    data = bytes(range(256)) * (CHUNK_SIZE // 256) * 6  # 6 chunks
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    cache = tmp_path / "cache"
    with ChunkStore(cache) as store:
        IndexShelf(store).put(build_index(digest, len(data), CHUNK_SIZE, [data]))
        chunks = [data[i * CHUNK_SIZE : (i + 1) * CHUNK_SIZE] for i in range(4)]
        chunks[2] = b"\xff" + chunks[2][1:]
        store.store_chunks(digest, len(data), 0, chunks)
    done = blockstore("cache", "verify", "--cache-dir", str(cache))
    assert done.returncode == IntegrityError.exit_code, done.stdout + done.stderr
    assert f"bad chunk {digest} #2: dropped" in done.stdout
    with ChunkStore(cache) as store:
        record = store.lookup(digest)
        assert store.missing(record.blob_id, range(6)) == [2, 4, 5]
    again = blockstore("cache", "verify", "--cache-dir", str(cache))
    assert again.returncode == 0, again.stdout + again.stderr


class _FlippingSource:
    """The layer's bytes with one byte flipped, counting the bytes asked for."""

    def __init__(self, data: bytes, digest: str, flipped: int):
        wrong = bytearray(data)
        wrong[flipped] ^= 0xFF
        self.data, self.digest, self.size = bytes(wrong), digest, len(data)
        self.asked = 0

    def read_range(self, offset: int, length: int) -> bytes:
        self.asked += length
        return self.data[offset : offset + length]


def test_a_registry_found_at_fault_is_not_judged_again_for_each_failed_read():
    """A registry that keeps corrupting chunk 3, under a true chunk index: each read of it
    fails (EIO, never the wrong bytes), and the first failure streams the layer once to
    judge who lies (the registry: the index stays). Later failures do not stream the whole
    layer again, as a client retrying would otherwise have it done once per retry."""
    data = bytes(range(256)) * (40 * CHUNK_SIZE // 256)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    index = build_index(digest, len(data), CHUNK_SIZE, [data])
    source = _FlippingSource(data, digest, 3 * CHUNK_SIZE + 100)
    checked = IndexedSource(source, index)
    for attempt in range(3):
        with pytest.raises(BlobReadError):
            checked.read_range(3 * CHUNK_SIZE, CHUNK_SIZE)
        if attempt == 0:
            deadline = time.monotonic() + 10
            while checked._judging.locked() or source.asked < len(data):
                assert time.monotonic() < deadline, "the layer was never judged"
                time.sleep(0.01)
            judged = source.asked
    time.sleep(0.2)  # a second judgement, if one were started, would be under way now
    assert not checked._judging.locked() and checked.checking
    assert source.asked - judged == 2 * 2 * CHUNK_SIZE  # two reads, each chunk and refetch


def test_cache_verify_leaves_the_eviction_order_as_it_was(tmp_path, monkeypatch):
    """Tried: two sealed blobs, each with a kept chunk index, stored an hour and half an
    hour ago; then `cache verify`, which reads every chunk of each to hold it to its
    index, then `cache gc` to a cap that keeps one. Must hold: verify leaves each
    blob's last use as it was, so gc evicts the one used longest ago. Before, verify's
    reads counted as uses: both looked used now, and gc evicted the newer."""
    from blockstore.cache import ChunkStore
    from blockstore.cache import recency as recency_mod
    from blockstore.cache.indexes import IndexShelf

    cache = tmp_path / "cache"
    blobs = []
    with ChunkStore(cache) as store:
        for age, fill in ((3600, 1), (1800, 2)):
            data = bytes([fill]) * (4 * CHUNK_SIZE)
            digest = "sha256:" + hashlib.sha256(data).hexdigest()
            then = time.time_ns() // 1000 - age * 1_000_000
            monkeypatch.setattr(recency_mod, "now_tick", lambda then=then: then)
            IndexShelf(store).put(build_index(digest, len(data), CHUNK_SIZE, [data]))
            chunks = [data[i * CHUNK_SIZE : (i + 1) * CHUNK_SIZE] for i in range(4)]
            store.store_chunks(digest, len(data), 0, chunks)
            assert store.seal(digest) is True
            blobs.append(digest)
        monkeypatch.undo()
        before = {info.digest: info.last_use for info in store.blobs()}
    done = blockstore("cache", "verify", "--cache-dir", str(cache))
    assert done.returncode == 0, done.stdout + done.stderr
    with ChunkStore(cache) as store:
        assert {info.digest: info.last_use for info in store.blobs()} == before
    gc = blockstore("cache", "gc", "--cache-dir", str(cache), "--cache-size", "160K")
    assert gc.returncode == 0, gc.stdout + gc.stderr
    with ChunkStore(cache) as store:
        present = {info.digest: info.present for info in store.blobs()}
    assert present.get(blobs[0], 0) < 4
    assert present[blobs[1]] == 4
