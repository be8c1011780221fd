"""A chunk index at work: cold chunks checked on arrival, a lying index found out,
and traces that travel through the registry to an empty cache."""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys
import time
from dataclasses import replace

import pytest
from rig.fault_proxy import Fault
from rig.pushed import push_erofs
from rig.registry_server import RegistryServer

from blockstore.attachments import (
    TRACE_ARTIFACT_TYPE,
    TRACE_MEDIA_TYPE,
    fetch_indexes,
    fetch_traces,
    push_indexes,
    subject_of,
)
from blockstore.cache import CHUNK_SIZE
from blockstore.cache.indexes import IndexShelf
from blockstore.cache.traces import TraceShelf
from blockstore.chunkindex import BLOB_MEDIA_TYPE as CHUNK_TABLE
from blockstore.chunkindex import LAYER_ANNOTATION, ChunkIndex, build_index
from blockstore.errors import BlobReadError
from blockstore.image import open_image
from blockstore.prefetch.settings import MOUNT, PrefetchSettings
from blockstore.registry import RegistryClient, RegistryOptions, parse_reference, resolve_image
from blockstore.registry.digests import digest_of
from blockstore.registry.manifests import fetch_manifest
from blockstore.registry.mediatypes import OCI_INDEX, OCI_MANIFEST
from blockstore.registry.referrers import fallback_tag, push_artifact

QUIET = PrefetchSettings(readahead=False)
CHUNK_INDEX = "application/vnd.blockstore.chunk-index.v1"
BAD_CHUNK = 3


def blockstore(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "blockstore", *args], capture_output=True, text=True, timeout=120
    )


def read_whole(blob, size: int) -> bytes:
    return b"".join(bytes(b) for b in blob.read(0, size))


def attach_lying_index(registry_host: str, ref: str, data: bytes) -> ChunkIndex:
    """Attach to ``ref`` a chunk index of ``data`` that is wrong about chunk BAD_CHUNK."""
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    table = bytearray(build_index(digest, len(data), CHUNK_SIZE, [data]).table)
    table[BAD_CHUNK * 32] ^= 0x01
    lying = ChunkIndex(digest, len(data), CHUNK_SIZE, bytes(table))
    with RegistryClient(registry_host, RegistryOptions(insecure=True)) as client:
        parsed = parse_reference(ref)
        push_indexes(client, subject_of(resolve_image(client, parsed), parsed.repository), [lying])
    return lying


def wait_until_dropped(shelf: IndexShelf, lying: ChunkIndex) -> None:
    """Until the lying table is dropped, as the check of the chunk it lies about does
    on a thread of its own once the chunk's bytes are judged."""
    deadline = time.monotonic() + 20
    while shelf.get(lying.layer_digest, lying.size) is not None:
        assert time.monotonic() < deadline, "the lying index was not dropped"
        time.sleep(0.05)


@pytest.fixture
def indexed_image(registry, erofs_images, request, tmp_path) -> tuple[str, bytes]:
    """A one-layer image (27 chunks) with its chunk index attached; its reference and bytes."""
    path = erofs_images.layers[0].path
    image = push_erofs(registry.host, f"artifacts/{request.node.name[:40].lower()}", "v1", [path])
    cache = str(tmp_path / "index-cache")
    done = blockstore("index", image, "--push", "--insecure", "--cache-dir", cache)
    assert done.returncode == 0, done.stderr
    return image, path.read_bytes()


def test_a_corrupting_pull_through_mirror_never_gets_a_wrong_byte_served(
    registry, indexed_image, fault_proxy, tmp_path, caplog
):
    """A real pull-through cache whose upstream link flips a byte of chunk 3: with the
    chunk index, the altered chunk is caught on arrival, fetched again from the upstream,
    and every byte served is right; the log names the offset and both digests."""
    image, expected = indexed_image
    link = fault_proxy(registry)
    link.fault = Fault("corrupt", method="GET", path_contains="/blobs/",
                       after_bytes=BAD_CHUNK * CHUNK_SIZE + 100)  # fmt: skip
    mirror = RegistryServer(tmp_path / "mirror", proxy_remote=link.url)
    mirror.start()
    try:
        options = RegistryOptions(insecure=True, mirrors=[mirror.host], timeout=10)
        caplog.set_level(logging.WARNING)
        opened = open_image(image, cache_dir=tmp_path / "cache", options=options, prefetch=QUIET)
        try:
            assert opened.chunk_indexes, "the attached index was not found"
            (blob,) = opened.exports()
            assert read_whole(blob, len(expected)) == expected
        finally:
            opened.close()
    finally:
        mirror.stop()
    assert link.faults_applied >= 1, "the mirror never fetched through the corrupting link"
    wanted = hashlib.sha256(expected[BAD_CHUNK * CHUNK_SIZE : (BAD_CHUNK + 1) * CHUNK_SIZE])
    said = "\n".join(r.getMessage() for r in caplog.records)
    assert f"offset {BAD_CHUNK * CHUNK_SIZE}" in said and wanted.hexdigest() in said


def test_without_an_index_the_same_mirror_is_caught_only_at_the_seal(
    registry, erofs_images, fault_proxy, tmp_path
):
    """The same corrupting mirror, no index: the first read of chunk 3 gets the mirror's
    bytes (nothing can tell yet); the seal catches the layer, fetches it again from the
    upstream, and the sealed layer is right."""
    path = erofs_images.layers[0].path
    expected = path.read_bytes()
    image = push_erofs(registry.host, "artifacts/unindexed", "v1", [path])
    link = fault_proxy(registry)
    link.fault = Fault("corrupt", method="GET", path_contains="/blobs/",
                       after_bytes=BAD_CHUNK * CHUNK_SIZE + 100)  # fmt: skip
    mirror = RegistryServer(tmp_path / "mirror", proxy_remote=link.url)
    mirror.start()
    try:
        options = RegistryOptions(insecure=True, mirrors=[mirror.host], timeout=10)
        opened = open_image(image, cache_dir=tmp_path / "cache", options=options, prefetch=QUIET)
        try:
            (blob,) = opened.exports()
            first = read_whole(blob, len(expected))
            assert first != expected, "the mirror's link did not alter the bytes"
            blob.prefetch()
            assert opened.store.lookup(blob.digest).sealed
            assert read_whole(blob, len(expected)) == expected
        finally:
            opened.close()
    finally:
        mirror.stop()


def test_an_index_that_lies_about_one_chunk_gives_eio_then_is_dropped(
    registry, erofs_images, tmp_path, caplog
):
    """An index whose table is wrong for chunk 3: reading chunk 3 fails with EIO (never
    other bytes); the layer, streamed whole in the background, matches its digest, so the
    index is dropped, reported, forgotten by the cache, and chunk 3 then reads right."""
    path = erofs_images.layers[0].path
    expected = path.read_bytes()
    ref = push_erofs(registry.host, "artifacts/lying", "v1", [path])
    attach_lying_index(registry.host, ref, expected)
    caplog.set_level(logging.WARNING)
    opened = open_image(ref, cache_dir=tmp_path / "cache", options=RegistryOptions(insecure=True),
                        prefetch=QUIET)  # fmt: skip
    try:
        (blob,) = opened.exports()
        layer = opened.resolved.layers[0]
        assert blob.read(0, CHUNK_SIZE)  # chunk 0 matches even a lying table
        with pytest.raises(BlobReadError):
            blob.read(BAD_CHUNK * CHUNK_SIZE, CHUNK_SIZE)
        deadline = time.monotonic() + 20
        shelf = IndexShelf(opened.store)
        while shelf.get(layer.digest, layer.size) is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert shelf.get(layer.digest, layer.size) is None, "the lying index was not dropped"
        assert "index is dropped" in "\n".join(r.getMessage() for r in caplog.records)
        got = b"".join(bytes(b) for b in blob.read(BAD_CHUNK * CHUNK_SIZE, CHUNK_SIZE))
        assert got == expected[BAD_CHUNK * CHUNK_SIZE : (BAD_CHUNK + 1) * CHUNK_SIZE]
    finally:
        opened.close()


def test_a_lying_index_dropped_is_not_taken_again_by_the_next_open(
    registry, erofs_images, tmp_path, caplog
):
    """Tried: an index that lies about chunk 3, found out and dropped by one open (chunk 3
    failed with EIO and was never stored); then a second open of the same cache, online,
    reading chunk 3; then a true index attached, and a third open. Must hold: the second
    open does not take the same table from the registry again, says why, and reads chunk 3
    right; the third takes the new table. Before, every open took the lie again, so each
    failed chunk 3 with EIO and streamed the whole layer once more to judge it."""
    path = erofs_images.layers[0].path
    expected = path.read_bytes()
    ref = push_erofs(registry.host, "artifacts/lied-once", "v1", [path])
    lying = attach_lying_index(registry.host, ref, expected)
    bad = slice(BAD_CHUNK * CHUNK_SIZE, (BAD_CHUNK + 1) * CHUNK_SIZE)
    options = RegistryOptions(insecure=True)

    def opened():
        return open_image(ref, cache_dir=tmp_path / "cache", options=options, prefetch=QUIET)

    first = opened()
    try:
        (blob,) = first.exports()
        with pytest.raises(BlobReadError):
            blob.read(bad.start, CHUNK_SIZE)
        wait_until_dropped(IndexShelf(first.store), lying)
    finally:
        first.close()
    caplog.set_level(logging.WARNING)
    second = opened()
    try:
        (blob,) = second.exports()
        assert b"".join(bytes(b) for b in blob.read(bad.start, CHUNK_SIZE)) == expected[bad]
        assert IndexShelf(second.store).get(lying.layer_digest, lying.size) is None
    finally:
        second.close()
    assert "found here to disagree" in "\n".join(r.getMessage() for r in caplog.records)

    time.sleep(1.1)  # artifacts are dated to the second: the true one is the newest
    true = build_index(lying.layer_digest, len(expected), CHUNK_SIZE, [expected])
    with RegistryClient(registry.host, options) as client:
        parsed = parse_reference(ref)
        push_indexes(client, subject_of(resolve_image(client, parsed), parsed.repository), [true])
    third = opened()
    try:
        assert IndexShelf(third.store).get(true.layer_digest, true.size) == true
    finally:
        third.close()


def test_an_artifact_dated_years_ahead_does_not_shadow_those_pushed_since(
    registry, erofs_images, tmp_path, fault_proxy
):
    """Tried: a chunk-index artifact dated 2099 (a pusher's clock set wrong, or a hostile
    one) whose table is garbage, and the image's true index pushed after it; a registry
    whose referrers API lists both. Must hold: an open takes the true index, checking
    the layer's chunks with it; before, the one dated 2099 was the newest, and every
    index pushed until then was passed over for it."""
    path = erofs_images.layers[0].path
    expected = path.read_bytes()
    ref = push_erofs(registry.host, "artifacts/dated-ahead", "v1", [path])
    digest = "sha256:" + hashlib.sha256(expected).hexdigest()
    true = build_index(digest, len(expected), CHUNK_SIZE, [expected])
    listed = []
    with RegistryClient(registry.host, RegistryOptions(insecure=True)) as client:
        parsed = parse_reference(ref)
        subject = subject_of(resolve_image(client, parsed), parsed.repository)
        for data, created in ((b"garbage", "2099-01-01T00:00:00Z"), (true.to_bytes(), None)):
            blob = (data, CHUNK_TABLE, {LAYER_ANNOTATION: digest})
            pushed = push_artifact(client, subject, CHUNK_INDEX, [blob], created=created)
            raw = fetch_manifest(client, subject.repository, pushed)[0]
            notes = json.loads(raw)["annotations"]
            listed.append({"mediaType": OCI_MANIFEST, "digest": pushed, "size": len(raw),
                           "artifactType": CHUNK_INDEX, "annotations": notes})  # fmt: skip
    proxy = fault_proxy(registry)
    api = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": listed}
    proxy.fault = Fault.document(api, OCI_INDEX, path_contains="/referrers/")
    opened = open_image(ref.replace(registry.host, proxy.host), cache_dir=tmp_path / "cache",
                        options=RegistryOptions(insecure=True), prefetch=QUIET)  # fmt: skip
    try:
        assert opened.chunk_indexes == {digest: true}
    finally:
        opened.close()


def test_a_table_built_here_is_not_replaced_by_an_attached_one_that_differs(
    registry, erofs_images, tmp_path, caplog
):
    """Tried: `blockstore index` (no push) builds a layer's table in a cache from its
    verified bytes; then an index lying about chunk 3 is attached, and the image opened
    with that cache, online, reads chunk 3. Must hold: the open keeps and checks with the
    table built here, says the attached one differs and is not used, and chunk 3 reads
    right at once; before, the open put the attached table over the one built here, and
    chunk 3 failed with EIO until the whole layer had been streamed to judge it."""
    path = erofs_images.layers[0].path
    expected = path.read_bytes()
    ref = push_erofs(registry.host, "artifacts/built-here", "v1", [path])
    cache = tmp_path / "cache"
    done = blockstore("index", ref, "--insecure", "--cache-dir", str(cache))
    assert done.returncode == 0, done.stderr
    lying = attach_lying_index(registry.host, ref, expected)
    caplog.set_level(logging.WARNING)
    opened = open_image(ref, cache_dir=cache, options=RegistryOptions(insecure=True),
                        prefetch=QUIET)  # fmt: skip
    try:
        (blob,) = opened.exports()
        bad = slice(BAD_CHUNK * CHUNK_SIZE, (BAD_CHUNK + 1) * CHUNK_SIZE)
        assert b"".join(bytes(b) for b in blob.read(bad.start, CHUNK_SIZE)) == expected[bad]
        kept = IndexShelf(opened.store).get(lying.layer_digest, lying.size)
        assert kept is not None and kept.matches(BAD_CHUNK, expected[bad])
    finally:
        opened.close()
    assert "differs from the one built here" in "\n".join(r.getMessage() for r in caplog.records)


def test_index_push_builds_the_table_instead_of_pushing_the_attached_one_again(
    registry, erofs_images, tmp_path
):
    """Tried: an image whose attached chunk index lies about chunk 3, then `index --push`
    with an empty cache; then a lie attached again, and `index --push` with the cache
    holding the table it built. Must hold: the table is built from the layer's bytes
    (streamed, checked against its digest), the second time taken from the cache where
    it was built, and the one attached each time is the sha256 of each chunk; before,
    the open kept the attached table in the cache, and `index` took it as its own
    ("indexed (from the cache)") and attached the lie again."""
    path = erofs_images.layers[0].path
    expected = path.read_bytes()
    ref = push_erofs(registry.host, "artifacts/relaid", "v1", [path])
    for origin in ("registry", "cache"):
        time.sleep(1.1)  # artifacts are dated to the second: each is newer than the last
        lying = attach_lying_index(registry.host, ref, expected)
        time.sleep(1.1)
        done = blockstore("index", ref, "--push", "--insecure", "--cache-dir", str(tmp_path))
        assert done.returncode == 0, done.stderr
        assert f"indexed (from the {origin})" in done.stdout
        true = build_index(lying.layer_digest, len(expected), CHUNK_SIZE, [expected])
        with RegistryClient(registry.host, RegistryOptions(insecure=True)) as client:
            parsed = parse_reference(ref)
            image = resolve_image(client, parsed)
            subject = subject_of(image, parsed.repository)
            attached = fetch_indexes(client, subject, image.layers)
        assert attached[lying.layer_digest].table == true.table


def test_a_trace_pushed_from_one_cache_is_replayed_in_an_empty_one(
    registry, erofs_images, tmp_path
):
    """Reads recorded by a mount in one cache directory, attached with `trace push`, are
    found by a cold open with an empty cache and prefetched there before any read: the
    blocks read, kept as parts of their chunks, and served from there with no fetch."""
    path = erofs_images.layers[0].path
    expected = path.read_bytes()
    ref = push_erofs(registry.host, "artifacts/traced", "v1", [path])
    options = RegistryOptions(insecure=True)
    wanted = [5, 9, 17]
    first = open_image(ref, cache_dir=tmp_path / "a", options=options, prefetch=MOUNT)
    try:
        (blob,) = first.exports()
        for index in wanted:
            blob.read(index * CHUNK_SIZE, 4096)
    finally:
        first.close()  # keeps the trace recorded so far
    pushed = blockstore("trace", "push", ref, "--insecure", "--cache-dir", str(tmp_path / "a"))
    assert pushed.returncode == 0, pushed.stderr

    # The directory walk off: it would fetch the directories this trace never read.
    replaying = replace(MOUNT, erofs_walk=False)
    second = open_image(ref, cache_dir=tmp_path / "b", options=options, prefetch=replaying)
    try:
        digest = second.resolved.layers[0].digest
        trace = TraceShelf(second.store).get(digest)
        assert trace is not None and set(wanted) <= set(trace.in_units_of(CHUNK_SIZE))
        (blob,) = second.exports()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            record = second.store.lookup(digest)
            if record is not None and len(second.store.read_parts(record.blob_id, wanted)) == 3:
                break
            time.sleep(0.05)
        record = second.store.lookup(digest)
        assert record is not None and len(second.store.read_parts(record.blob_id, wanted)) == 3
        fetched = second.store.stats()["bytes_fetched"]
        assert fetched == 3 * 4096  # the blocks read, not their chunks
        got = blob.read(wanted[1] * CHUNK_SIZE, 4096)
        assert b"".join(bytes(b) for b in got) == expected[9 * CHUNK_SIZE : 9 * CHUNK_SIZE + 4096]
        assert second.store.stats()["bytes_fetched"] == fetched  # served from the part
    finally:
        second.close()


@pytest.mark.parametrize("recorded", ["1e400", "NaN", "-1e20"])
def test_an_attached_trace_recorded_at_no_time_is_refused_as_not_a_trace(
    registry, erofs_images, tmp_path, caplog, recorded
):
    """Tried: a trace attached to an image whose recording time is JSON infinity (1e400),
    NaN, or 10**20 seconds before the epoch; a cold open with an empty cache, then
    `trace ls` and `trace ls --json`. Must hold: the open says the attached traces are
    ignored and keeps none; `trace ls` exits 0 and its JSON is strict JSON. Before, the
    trace was kept, and `trace ls` died with an OverflowError (ValueError for NaN) and
    `--json` printed Infinity."""
    path = erofs_images.layers[0].path
    ref = push_erofs(registry.host, f"artifacts/dated-{recorded.lower()}", "v1", [path])
    digest = "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    trace = {"version": 2, "digest": digest, "unit": 4096, "recorded": "R", "events": [[0, 0, 2]]}
    document = json.dumps({"kind": "blockstore-traces", "traces": [trace]})
    document = document.replace('"R"', recorded).encode()  # a number json.dumps cannot write
    with RegistryClient(registry.host, RegistryOptions(insecure=True)) as client:
        parsed = parse_reference(ref)
        subject = subject_of(resolve_image(client, parsed), parsed.repository)
        push_artifact(client, subject, TRACE_ARTIFACT_TYPE, [(document, TRACE_MEDIA_TYPE, {})])
    caplog.set_level(logging.WARNING)
    cache = tmp_path / "cache"
    opened = open_image(ref, cache_dir=cache, options=RegistryOptions(insecure=True),
                        prefetch=MOUNT)  # fmt: skip
    try:
        assert TraceShelf(opened.store).get(digest) is None
    finally:
        opened.close()
    assert "ignored" in "\n".join(r.getMessage() for r in caplog.records)
    listed = blockstore("trace", "ls", "--cache-dir", str(cache))
    assert listed.returncode == 0, listed.stderr
    as_json = blockstore("trace", "ls", "--json", "--cache-dir", str(cache))
    assert as_json.returncode == 0, as_json.stderr
    json.loads(as_json.stdout, parse_constant=lambda word: pytest.fail(f"{word} in JSON"))


def attach_unreadable(registry_host: str, ref: str, artifact_type: str) -> None:
    """Attach to ``ref``, under the referrers tag, an artifact listed as ``artifact_type``
    whose manifest says another type: one no reader takes."""
    with RegistryClient(registry_host, RegistryOptions(insecure=True)) as client:
        parsed = parse_reference(ref)
        subject = subject_of(resolve_image(client, parsed), parsed.repository)
        pushed = push_artifact(client, subject, artifact_type, [(b"{}", "text/plain", {})])
        manifest = json.loads(fetch_manifest(client, subject.repository, pushed)[0])
        manifest["artifactType"] = "application/vnd.example.other"
        raw = json.dumps(manifest).encode()
        client.put_manifest(subject.repository, digest_of(raw), raw, OCI_MANIFEST)
        tag = fallback_tag(subject.digest)
        listing = json.loads(fetch_manifest(client, subject.repository, tag)[0])
        for entry in listing["manifests"]:
            if entry["digest"] == pushed:
                entry.update(digest=digest_of(raw), size=len(raw))
        client.put_manifest(subject.repository, tag, json.dumps(listing).encode(), OCI_INDEX)


@pytest.mark.parametrize("command", ["index", "trace"])
def test_an_unreadable_attached_artifact_does_not_stop_its_replacement(
    registry, erofs_images, tmp_path, command
):
    """Tried: the chunk-index (or traces) artifact attached to an image is one no reader
    takes (its manifest names another type than its listing), then `index --push` (or
    `trace push` from a cache that recorded a mount's reads). Must hold: the command
    exits 0, warning that the attached artifact is left out, and the artifact it
    attaches in its place is read back; before, it failed (exit 3) reading the artifact
    it was to replace, so nothing could ever replace it."""
    path = erofs_images.layers[0].path
    ref = push_erofs(registry.host, f"artifacts/unreadable-{command}", "v1", [path])
    cache = tmp_path / "cache"
    options = RegistryOptions(insecure=True)
    if command == "trace":
        opened = open_image(ref, cache_dir=cache, options=options, prefetch=MOUNT)
        try:
            (blob,) = opened.exports()
            blob.read(5 * CHUNK_SIZE, 4096)
        finally:
            opened.close()  # keeps the trace recorded so far
        attach_unreadable(registry.host, ref, TRACE_ARTIFACT_TYPE)
        done = blockstore("trace", "push", ref, "--insecure", "--cache-dir", str(cache))
    else:
        attach_unreadable(registry.host, ref, CHUNK_INDEX)
        done = blockstore("index", ref, "--push", "--insecure", "--cache-dir", str(cache))
    assert done.returncode == 0, done.stderr
    assert "attached now is left out, as it cannot be read" in done.stderr
    with RegistryClient(registry.host, options) as client:
        parsed = parse_reference(ref)
        image = resolve_image(client, parsed)
        subject = subject_of(image, parsed.repository)
        if command == "trace":
            (trace,) = fetch_traces(client, subject, image.layers)
            assert 5 in trace.in_units_of(CHUNK_SIZE)
        else:
            assert set(fetch_indexes(client, subject, image.layers)) == {image.layers[0].digest}


def test_traces_from_two_machines_merge_into_one_artifact(registry, erofs_images, tmp_path):
    """Two caches push traces of one image in turn: the artifact then holds the union of
    their blocks, each at its earliest time of use, and only one artifact of that type."""
    path = erofs_images.layers[0].path
    ref = push_erofs(registry.host, "artifacts/merged", "v1", [path])
    options = RegistryOptions(insecure=True)
    # Each machine records its own trace (no replay, so none takes the other's).
    record_only = PrefetchSettings(readahead=False, trace_period=30.0)
    for cache, chunks in (("m1", [1, 2]), ("m2", [2, 7])):
        opened = open_image(ref, cache_dir=tmp_path / cache, options=options, prefetch=record_only)
        try:
            (blob,) = opened.exports()
            for index in chunks:
                blob.read(index * CHUNK_SIZE, 512)
        finally:
            opened.close()
        done = blockstore("trace", "push", ref, "--insecure", "--cache-dir", str(tmp_path / cache))
        assert done.returncode == 0, done.stderr
    fresh = open_image(ref, cache_dir=tmp_path / "m3", options=options, prefetch=MOUNT)
    try:
        trace = TraceShelf(fresh.store).get(fresh.resolved.layers[0].digest)
    finally:
        fresh.close()
    assert trace is not None and set(trace.in_units_of(CHUNK_SIZE)) >= {1, 2, 7}
    times = [ms for ms, _, _ in trace.events]
    assert times == sorted(times)


def test_a_lying_index_is_judged_by_a_layer_cached_before_it(registry, erofs_images, tmp_path):
    """A layer prefetched and sealed before any index existed, then an index that lies
    about chunk 3 is attached: the chunks were never checked by it, so `prefetch` checks
    the table against the sealed layer, drops the index and says so; `cache verify` does
    the same for a lying index kept in the cache (exit 6)."""
    path = erofs_images.layers[0].path
    expected = path.read_bytes()
    ref = push_erofs(registry.host, "artifacts/sealed-first", "v1", [path])
    cache = str(tmp_path / "cache")
    first = blockstore("prefetch", ref, "--insecure", "--cache-dir", cache)
    assert first.returncode == 0, first.stderr
    digest = "sha256:" + hashlib.sha256(expected).hexdigest()
    lying = attach_lying_index(registry.host, ref, expected)
    again = blockstore("prefetch", ref, "--insecure", "--cache-dir", cache)
    assert again.returncode == 0, again.stderr
    assert "disagrees with layer 0 at 1 chunk(s): dropped" in again.stderr

    from blockstore.cache import ChunkStore

    with ChunkStore(tmp_path / "cache") as store:
        shelf = IndexShelf(store)
        assert shelf.get(digest, len(expected)) is None
        shelf.put(lying)
    verify = blockstore("cache", "verify", "--cache-dir", cache)
    assert verify.returncode == 6, verify.stdout + verify.stderr
    assert f"the chunk index of {digest} disagrees with the sealed layer at chunk(s) 3" in (
        verify.stdout
    )
    assert blockstore("cache", "verify", "--cache-dir", cache).returncode == 0


@pytest.mark.parametrize(
    "entries",
    [
        [{"digest": "sha256:" + "1" * 64, "artifactType": CHUNK_INDEX, "annotations": "x"}],
        [
            {
                "digest": "sha256:" + d * 64,
                "artifactType": CHUNK_INDEX,
                "annotations": {"org.opencontainers.image.created": created},
            }
            for d, created in (("2", 1), ("3", "x"))
        ],
        [{"digest": "sha256:" + "4" * 64, "artifactType": 7, "annotations": ["a", "b"]}],
    ],
    ids=["annotations-a-string", "created-a-number", "types-of-every-kind"],
)
def test_a_malformed_referrers_listing_costs_a_warning_never_the_open(
    registry, erofs_images, fault_proxy, tmp_path, entries
):
    """A registry answering the referrers API with descriptors whose annotations are no
    map of strings, whose creation times are numbers beside strings, or whose artifact
    type is a number: the image opens and reads right, as with no artifacts (it used to
    end in a TypeError or an AttributeError with a traceback)."""
    path = erofs_images.layers[0].path
    link = fault_proxy(registry)
    image = push_erofs(link.host, "artifacts/malformed", "v1", [path])
    listing = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": entries,
    }
    link.fault = Fault.document(
        listing, "application/vnd.oci.image.index.v1+json", path_contains="/referrers/"
    )
    options = RegistryOptions(insecure=True, timeout=10)
    opened = open_image(image, cache_dir=tmp_path / "cache", options=options, prefetch=QUIET)
    try:
        (blob,) = opened.exports()
        assert read_whole(blob, blob.size) == path.read_bytes()
    finally:
        opened.close()
    assert link.faults_applied >= 1


def test_index_push_of_one_layer_leaves_out_another_s_table_found_to_lie(
    registry, erofs_images, tmp_path
):
    """Tried: a two-layer image whose attached chunk index lies about the second layer's
    chunk 3, found out and dropped by an open that read it; then ``index --push --layer
    0`` from that cache, which rebuilds the first layer's table and carries the others
    over. Must hold: the artifact it attaches holds the first layer's table and not the
    second's lie. Before, the lie was carried over unchecked and published again as
    part of the user's own push."""
    first, second = erofs_images.small.path, erofs_images.layers[0].path
    data = second.read_bytes()
    ref = push_erofs(registry.host, "artifacts/carried", "v1", [first, second])
    lying = attach_lying_index(registry.host, ref, data)
    cache = tmp_path / "cache"
    options = RegistryOptions(insecure=True)
    image = open_image(ref, cache_dir=cache, options=options, prefetch=QUIET)
    try:
        _, blob = image.exports()
        with pytest.raises(BlobReadError):
            blob.read(BAD_CHUNK * CHUNK_SIZE, CHUNK_SIZE)
        wait_until_dropped(IndexShelf(image.store), lying)
    finally:
        image.close()
    time.sleep(1.1)  # artifacts are dated to the second: the one pushed now is the newest
    done = blockstore(
        "index", "--push", "--layer", "0", "--insecure", "--cache-dir", str(cache), ref
    )
    assert done.returncode == 0, done.stderr
    assert "found it to disagree with the layer" in done.stderr
    with RegistryClient(registry.host, options) as client:
        parsed = parse_reference(ref)
        resolved = resolve_image(client, parsed)
        attached = fetch_indexes(client, subject_of(resolved, parsed.repository), resolved.layers)
    assert set(attached) == {resolved.layers[0].digest}
