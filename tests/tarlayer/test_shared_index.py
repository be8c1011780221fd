"""A tar layer's index shared through the registry: pushed, taken by a new machine, judged."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import subprocess
import sys
import tarfile
import time
from dataclasses import replace
from pathlib import Path

import pytest
from oci_layout import MEDIA_TYPES, compress
from rig.fault_proxy import Fault
from rig.stored_chunks import flip_kept_byte
from rig.waiting import wait_for
from trees import make_tar

from blockstore.attachments import fetch_tar_index, subject_of
from blockstore.cache import ChunkStore
from blockstore.errors import BlobReadError, IntegrityError
from blockstore.image import open_image
from blockstore.prefetch import PrefetchSettings
from blockstore.registry.mediatypes import GZIP
from blockstore.registry.push import push_image
from blockstore.registry.referrers import list_referrers, push_artifact
from blockstore.tarlayer.erofs_reader import read_metadata
from blockstore.tarlayer.erofs_writer import write_metadata
from blockstore.tarlayer.gzindex import DEFAULT_SPAN
from blockstore.tarlayer.indexcache import IndexCache
from blockstore.tarlayer.layerindex import INDEX_FORMAT, index_compressed_tar, index_plain_tar
from blockstore.tarlayer.shared import (
    ARTIFACT_TYPE,
    FORMAT_ANNOTATION,
    METADATA_MEDIA_TYPE,
    index_blobs,
)
from blockstore.tarlayer.tarwalk import walk_tar
from blockstore.tarlayer.tree import build_tree

BLOCKSTORE = [sys.executable, "-m", "blockstore"]


def gzip_image(
    tmp: Path, registry_host: str, client, name: str, files: dict[str, bytes], kind: str = "gzip"
):
    """Push a one-layer tar.gz (or ``kind``) image of ``files``; (reference, tar, blob)."""
    src = tmp / f"{name}-src"
    src.mkdir()
    for path, data in files.items():
        (src / path).write_bytes(data)
    tar = make_tar(src, tmp / f"{name}.tar").read_bytes()
    blob = tmp / f"{name}.{kind}"
    blob.write_bytes(zstd_frames(tar) if kind == "zstd" else compress(kind, tar))
    push_image(client, "shared/img", name, [blob], media_type=MEDIA_TYPES[kind])
    return f"{registry_host}/shared/img:{name}", tar, blob.read_bytes()


def zstd_frames(tar: bytes, frame: int = 1 << 20) -> bytes:
    """The tar as many zstd frames (as pzstd and zstd:chunked write), so it has spans."""
    return b"".join(compress("zstd", tar[i : i + frame]) for i in range(0, len(tar), frame))


def attach_index(registry, reference: str, blobs, cache_dir: Path) -> None:
    """Attach tar-index artifact ``blobs`` to the image, as ``index --push`` would."""
    image = open_image(reference, cache_dir=cache_dir, options=registry.options())
    try:
        subject = subject_of(image.resolved, image.repository)
        push_artifact(image.client, subject, ARTIFACT_TYPE, blobs)
    finally:
        image.close()


def fetched_from(proxy, digest: str, size: int) -> int:
    """Bytes of the blob ``digest`` that clients asked the proxy for (ranges, or whole)."""
    total = 0
    for request in proxy.requests:
        if request.method != "GET" or not request.path.endswith(digest):
            continue
        ranged = {k.lower(): v for k, v in request.headers.items()}.get("range")
        if ranged is None:
            total += size
            continue
        first, _, last = ranged.removeprefix("bytes=").partition("-")
        total += min(int(last or size - 1), size - 1) - int(first) + 1
    return total


def read_file(export, name: str) -> bytes:
    """A file's bytes read through the export, as the kernel would find them."""
    node = read_metadata(export.index.metadata).lookup([name.encode()])
    offset = export.index.tar_start + node.data_offset
    return b"".join(bytes(b) for b in export.read(offset, node.size))


@pytest.mark.parametrize("kind", ["gzip", "zstd", "tar"])
def test_new_machine_mounts_from_the_shared_index_then_again_offline(
    tmp_path, registry, fault_proxy, caplog, kind
):
    """``index --push`` on one machine attaches the layer's index (tar.gz, tar+zstd of
    many frames, or plain tar). A second machine (an empty cache) opening the image
    through a recording proxy takes that index, checked, instead of reading the blob
    (gzip, zstd) or walking its headers (tar): reading one small file fetches far less
    than the blob (at most two spans, when its chunk crosses a span's end, of five), the
    bytes are the source file's, and no warning is logged. Reopened offline, the same
    cache serves the same file."""
    files = {f"big{i}.bin": os.urandom(4 << 20) for i in range(5)}
    files |= {f"note{i}.txt": f"note {i}\n".encode() * 50 for i in range(20)}
    client = registry.client()
    try:
        ref, _, blob = gzip_image(tmp_path, registry.host, client, kind, files, kind)
    finally:
        client.close()
    done = subprocess.run(
        [*BLOCKSTORE, "index", "--push", "--insecure", "--cache-dir", str(tmp_path / "a"), ref],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert "tar index attached to" in done.stdout
    if kind != "tar":  # indexing read the blob whole: the chunk table reuses it
        assert "(from the registry)" not in done.stdout, "the blob was fetched twice"

    proxy = fault_proxy(registry)
    via_proxy = ref.replace(registry.host, proxy.host)
    layer_digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    caplog.set_level(logging.INFO)
    lazy = PrefetchSettings(readahead=False)  # no span readahead: one read is measured
    image = open_image(
        via_proxy, cache_dir=tmp_path / "b", options=registry.options(), prefetch=lazy
    )
    try:
        (export,) = image.exports()
        assert read_file(export, "note7.txt") == files["note7.txt"]
        shared_metadata = export.index.metadata
    finally:
        image.close()
    local = (
        index_plain_tar(lambda o, n: blob[o : o + n], len(blob), layer_digest)
        if kind == "tar"
        else index_compressed_tar(io.BytesIO(blob), kind, blob_digest=None, diff_id=None)
    )
    assert shared_metadata == local.metadata  # the very image a local build gives
    fetched = fetched_from(proxy, layer_digest, len(blob))
    assert 0 < fetched < len(blob) // 2, (fetched, len(blob))
    assert "using the index attached to the image" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]

    seen = len(proxy.requests)
    offline = open_image(via_proxy, cache_dir=tmp_path / "b", offline=True)
    try:
        (export,) = offline.exports()
        assert read_file(export, "note7.txt") == files["note7.txt"]
    finally:
        offline.close()
    assert len(proxy.requests) == seen, "an offline open sent requests"


def test_the_shared_index_blobs_are_fetched_at_once(tmp_path, registry, fault_proxy):
    """A new machine takes a tar.gz layer's shared index (three blobs: metadata image,
    span table, checkpoints) before it can serve. Tried: each blob GET held back 0.6 s
    by the proxy. Must hold: the three are asked for together (all reach the proxy
    within the 0.6 s none can be answered in, where one after another each would wait
    for the one before; measured there, not by how long a loaded machine took), each
    checked, and the index built from them is the one pushed."""
    files = {f"file{i}.bin": os.urandom(1 << 20) for i in range(3)}
    client = registry.client()
    try:
        ref, _, blob = gzip_image(tmp_path, registry.host, client, "at-once", files)
    finally:
        client.close()
    index = index_compressed_tar(io.BytesIO(blob), GZIP, blob_digest=None, diff_id=None)
    layer_digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    blobs = index_blobs(index, layer_digest)
    assert len(blobs) == 3
    attach_index(registry, ref, blobs, tmp_path / "a")

    proxy = fault_proxy(registry)
    image = open_image(
        ref.replace(registry.host, proxy.host), cache_dir=tmp_path / "b", options=registry.options()
    )
    try:
        subject = subject_of(image.resolved, image.repository)
        referrers = list_referrers(image.client, subject)
        proxy.fault = Fault("delay", path_contains="/blobs/", method="GET", seconds=0.6)
        asked = len(proxy.requests)
        got = fetch_tar_index(image.client, subject, image.resolved.layers[0], referrers)
    finally:
        image.close()
    assert [(data, kind) for data, kind, _ in got] == [(data, kind) for data, kind, _ in blobs]
    assert proxy.faults_applied == 3
    went_out = [r.arrived for r in proxy.requests[asked:] if "/blobs/" in r.path]
    assert max(went_out) - min(went_out) < 0.6, "the blobs were asked for one after another"


def _hostile(case: str, tar: bytes, blob: bytes, other_tar: bytes, other_blob: bytes, digest):
    """The artifact blobs of a shared index damaged in one way, for the layer ``digest``."""
    own = index_compressed_tar(io.BytesIO(blob), GZIP, blob_digest=None, diff_id=None)
    other = index_compressed_tar(io.BytesIO(other_blob), GZIP, blob_digest=None, diff_id=None)
    blobs = index_blobs(own, digest)
    if case == "flipped superblock":
        meta, media, notes = blobs[0]
        damaged = bytearray(meta)
        damaged[1024] ^= 0xFF
        blobs[0] = (bytes(damaged), media, notes)
    elif case == "another tar's index":
        blobs = index_blobs(other, digest)
    elif case == "files beyond the tar":
        # The other (larger) tar's tree, claiming this tar's size: it binds to this
        # layer in every way but its chunk addresses.
        tree = build_tree(walk_tar(io.BytesIO(other_tar)))
        meta, media, notes = blobs[0]
        blobs[0] = (write_metadata(tree, len(tar)), media, notes)
    elif case == "another blob's spans":
        blobs[1:] = index_blobs(other, digest)[1:]
    elif case == "an older index format":
        # Written by rules since changed (an engine before INDEX_FORMAT 2 left out the
        # annotation): rebuilt, as one kept in the cache under the old format would be.
        meta, media, notes = blobs[0]
        blobs[0] = (meta, media, {k: v for k, v in notes.items() if k != FORMAT_ANNOTATION})
    return blobs


@pytest.mark.parametrize(
    "case",
    [
        "flipped superblock",
        "another tar's index",
        "files beyond the tar",
        "another blob's spans",
        "an older index format",
    ],
)
def test_damaged_or_hostile_shared_index_is_refused_and_built_instead(
    tmp_path, registry, caplog, case
):
    """A tar-index artifact whose blobs are damaged or describe something else than the
    layer (a flipped superblock byte, the index of another tar, a tree whose files point
    past this tar, span tables of another blob) or written by an older index format
    is refused with a warning that says so;
    the layer is indexed from its own bytes instead, and serves the right file."""
    files = {f"f{i}.txt": f"file {i} ".encode() * 300 for i in range(30)}
    more = {**files, "extra.bin": os.urandom(256 << 10)}
    client = registry.client()
    try:
        tag = case.replace(" ", "-").replace("'", "")
        ref, tar, blob = gzip_image(tmp_path, registry.host, client, tag, files)
        _, other_tar, other_blob = gzip_image(tmp_path, registry.host, client, tag + "o", more)
    finally:
        client.close()
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    blobs = _hostile(case, tar, blob, other_tar, other_blob, digest)
    attach_index(registry, ref, blobs, tmp_path / "push")
    caplog.set_level(logging.WARNING)
    image = open_image(ref, cache_dir=tmp_path / "new", options=registry.options())
    try:
        (export,) = image.exports()
        assert read_file(export, "f3.txt") == files["f3.txt"]
        with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
            names = {m.name.removeprefix("./") for m in archive if m.isfile()}
        assert set(read_metadata(export.index.metadata).root.children) == {
            n.encode() for n in names
        }
    finally:
        image.close()
    assert "shared tar index refused" in caplog.text
    assert "building the index from the layer itself" in caplog.text


def test_index_that_lies_about_the_tree_is_caught_when_the_tar_is_sealed(
    tmp_path, registry, caplog
):
    """An attached index that passes every structural check but describes the tree
    otherwise (one file given the setuid bit) is used at first; when ``prefetch`` seals
    the tar against the diff_id, the metadata rebuilt from the verified tar differs, so
    prefetch fails naming the index and the index is dropped: the next open of the same
    cache builds the true one from the layer, even though the registry still offers the
    lying one. An honest attached index is proven by the same prefetch and kept."""
    files = {f"f{i}.txt": f"file {i} ".encode() * 300 for i in range(30)}
    client = registry.client()
    try:
        ref, tar, blob = gzip_image(tmp_path, registry.host, client, "liar", files)
        other = {**files, "honest.txt": b"honest\n"}
        honest_ref, _, honest_blob = gzip_image(tmp_path, registry.host, client, "honest", other)
    finally:
        client.close()
    own = index_compressed_tar(io.BytesIO(blob), GZIP, blob_digest=None, diff_id=None)
    honest = index_compressed_tar(io.BytesIO(honest_blob), GZIP, blob_digest=None, diff_id=None)
    tree = build_tree(walk_tar(io.BytesIO(tar)))
    tree.root.children[b"f3.txt"].mode |= 0o4000
    lie = write_metadata(tree, len(tar))
    for reference, index, data, metadata in (
        (ref, own, blob, lie),
        (honest_ref, honest, honest_blob, None),
    ):
        blobs = index_blobs(index, "sha256:" + hashlib.sha256(data).hexdigest())
        if metadata is not None:
            blobs[0] = (metadata, blobs[0][1], blobs[0][2])
        attach_index(registry, reference, blobs, tmp_path / "push")

    caplog.set_level(logging.INFO)
    cache = tmp_path / "new"
    image = open_image(honest_ref, cache_dir=cache, options=registry.options())
    try:
        (export,) = image.exports()
        export.prefetch()
    finally:
        image.close()
    assert "proven against the tar" in caplog.text

    image = open_image(ref, cache_dir=cache, options=registry.options())
    try:
        (export,) = image.exports()
        assert export.index.metadata != own.metadata  # the lie is served until the seal
        with pytest.raises(IntegrityError, match="does not describe this layer's tar"):
            export.prefetch()
    finally:
        image.close()
    image = open_image(ref, cache_dir=cache, options=registry.options())
    try:
        (export,) = image.exports()
        assert export.index.metadata == own.metadata
        assert read_file(export, "f3.txt") == files["f3.txt"]
    finally:
        image.close()


def test_indexing_one_layer_keeps_the_other_layers_shared_index(tmp_path, registry, caplog):
    """``index --push --layer N`` on a two-layer tar.gz image, one layer at a time: the
    artifact then holds both layers' indexes, so a new machine (an empty cache) takes
    both from the registry and reads neither blob through to index it."""
    client = registry.client()
    try:
        layers = []
        for i in range(2):
            src = tmp_path / f"src{i}"
            src.mkdir()
            (src / f"layer{i}.txt").write_text(f"layer {i}\n")
            path = tmp_path / f"layer{i}.tar.gz"
            path.write_bytes(compress("gzip", make_tar(src, tmp_path / f"l{i}.tar").read_bytes()))
            layers.append(path)
        push_image(client, "shared/two", "v1", layers, media_type=MEDIA_TYPES["gzip"])
    finally:
        client.close()
    ref = f"{registry.host}/shared/two:v1"

    def cache(layer: str) -> list[str]:
        return ["--cache-dir", str(tmp_path / f"a{layer}")]

    for layer in ("0", "1"):
        done = subprocess.run(
            [*BLOCKSTORE, "index", "--push", "--insecure", "--layer", layer, *cache(layer), ref],
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stderr
    caplog.set_level(logging.INFO)
    image = open_image(ref, cache_dir=tmp_path / "new", options=registry.options())
    try:
        bottom, top = image.exports()
        assert read_file(bottom, "layer0.txt") == b"layer 0\n"
        assert read_file(top, "layer1.txt") == b"layer 1\n"
    finally:
        image.close()
    assert caplog.text.count("using the index attached to the image") == 2
    assert "reading the gzip layer once" not in caplog.text


@pytest.mark.parametrize("kind", ["gzip", "tar"])
def test_index_push_never_publishes_a_shared_index_it_has_not_proven(
    tmp_path, registry, caplog, kind
):
    """Tried: an attached index that passes every check at open but lies about the tree
    (one file given the setuid bit), taken by an open with span readahead off (so never
    proven), then ``index --push`` from that cache. Must hold: the command proves the
    kept index against the tar before publishing it, finds the lie (a warning naming
    it), and attaches the index built from the layer itself; before, it attached the
    lie again as its own, having read no byte of the tar."""
    files = {f"f{i}.txt": f"file {i} ".encode() * 300 for i in range(30)}
    client = registry.client()
    try:
        ref, tar, blob = gzip_image(tmp_path, registry.host, client, f"relay-{kind}", files, kind)
    finally:
        client.close()
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    if kind == "tar":
        own = index_plain_tar(lambda at, size: blob[at : at + size], len(blob), digest)
    else:
        own = index_compressed_tar(io.BytesIO(blob), GZIP, blob_digest=None, diff_id=None)
    tree = build_tree(walk_tar(io.BytesIO(tar)))
    tree.root.children[b"f3.txt"].mode |= 0o4000
    blobs = index_blobs(own, digest)
    blobs[0] = (write_metadata(tree, len(tar)), blobs[0][1], blobs[0][2])
    attach_index(registry, ref, blobs, tmp_path / "push")
    cache = tmp_path / "mounted"
    lazy = PrefetchSettings(readahead=False)
    image = open_image(ref, cache_dir=cache, options=registry.options(), prefetch=lazy)
    try:
        (export,) = image.exports()
        assert export.index.metadata == blobs[0][0]  # taken, unproven
    finally:
        image.close()

    said = _index_push(registry, ref, cache)
    assert "does not describe this layer's tar" in said
    assert _attached_metadata(registry, ref, tmp_path / "new") == own.metadata


def _index_push(registry, ref: str, cache: Path) -> str:
    """``index --push`` of ``ref`` from ``cache``, a second after what was attached
    before (artifacts are dated to the second: the one pushed now is the newest); what
    it said on stderr."""
    time.sleep(1.1)
    done = subprocess.run(
        [*BLOCKSTORE, "index", "--push", "--insecure", "--cache-dir", str(cache), ref],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    return done.stderr


def _attached_metadata(registry, ref: str, cache: Path) -> bytes:
    """The metadata image of the tar index attached to ``ref``'s first layer now."""
    image = open_image(ref, cache_dir=cache, options=registry.options())
    try:
        subject = subject_of(image.resolved, image.repository)
        referrers = list_referrers(image.client, subject)
        attached = fetch_tar_index(image.client, subject, image.resolved.layers[0], referrers)
    finally:
        image.close()
    return {media: data for data, media, _ in attached}[METADATA_MEDIA_TYPE]


def _setuid_in_header(tar: bytes, name: str) -> bytes:
    """``tar`` with ``name``'s header giving it the setuid bit, its checksum made right
    again: the same size, every header sound, one file's mode a lie."""
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        at = archive.getmember(name).offset_data - 512
    header = bytearray(tar[at : at + 512])
    mode = int(header[100:107], 8) | 0o4000
    header[100:108] = b"%07o\0" % mode
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    return tar[:at] + bytes(header) + tar[at + 512 :]


def test_index_push_proves_a_plain_tar_index_built_from_headers_not_yet_checked(
    tmp_path, registry, fault_proxy, caplog
):
    """Tried: a plain tar layer opened through a link that serves another tar of the same
    size (one file's header given the setuid bit, its checksum right), with readahead
    off, so the index is built from the lying headers and left unproven; then, the link
    honest again, ``index --push`` from that cache. Must hold: the command proves the
    kept index against the tar (the blob's digest) before publishing it, and attaches
    the index of the real tar; before, it published the lie, built from headers no
    digest had checked."""
    files = {f"f{i}.txt": f"file {i} ".encode() * 300 for i in range(30)}
    client = registry.client()
    try:
        ref, tar, blob = gzip_image(tmp_path, registry.host, client, "unproven", files, "tar")
    finally:
        client.close()
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    own = index_plain_tar(lambda at, size: blob[at : at + size], len(blob), digest)
    proxy = fault_proxy(registry)
    proxy.fault = Fault(
        "replace", path_contains=f"/blobs/{digest}", body=_setuid_in_header(tar, "./f3.txt")
    )
    cache = tmp_path / "cache"
    lazy = PrefetchSettings(readahead=False)
    via_proxy = ref.replace(registry.host, proxy.host, 1)
    image = open_image(via_proxy, cache_dir=cache, options=registry.options(), prefetch=lazy)
    try:
        (export,) = image.exports()
        assert export.index.metadata != own.metadata  # built from the lie
    finally:
        image.close()
    assert proxy.faults_applied >= 1
    with ChunkStore(cache) as store:
        assert IndexCache(store).unproven(digest, DEFAULT_SPAN)
    proxy.fault = None

    _index_push(registry, ref, cache)
    assert _attached_metadata(registry, ref, tmp_path / "new") == own.metadata


@pytest.mark.parametrize("lie", ["a span's digest", "the tree"])
@pytest.mark.parametrize("kind", ["gzip", "zstd"])
def test_fill_catches_a_lying_shared_index_when_it_seals_the_layer(
    tmp_path, registry, caplog, kind, lie
):
    """An attached index that passes every check at open but lies (one span's recorded
    sha256 is not that of its bytes, or the tree gives a file the setuid bit) is caught
    by ``--fill`` alone, with nothing else read: the fill decompresses the layer, seals
    it and logs an error naming the index, which is dropped and refused, so the next
    open of that cache builds the true index from the layer although the registry still
    offers the lie. No wrong byte is served meanwhile: the lying span reads as EIO."""
    files = {f"big{i}.bin": os.urandom(3 << 20) for i in range(3)}
    files |= {f"f{i}.txt": f"file {i} ".encode() * 300 for i in range(10)}
    client = registry.client()
    try:
        ref, tar, blob = gzip_image(tmp_path, registry.host, client, "lies", files, kind)
    finally:
        client.close()
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    own = index_compressed_tar(io.BytesIO(blob), kind, blob_digest=None, diff_id=None)
    spans = own.spans
    assert spans is not None and spans.digests is not None and len(spans.points) >= 2
    index = own
    if lie == "the tree":
        tree = build_tree(walk_tar(io.BytesIO(tar)))
        tree.root.children[b"f3.txt"].mode |= 0o4000
        index = replace(own, metadata=write_metadata(tree, len(tar)))
    else:
        digests = list(spans.digests)
        digests[1] = hashlib.sha256(b"not this span").digest()
        index = replace(own, spans=replace(spans, digests=tuple(digests)))
    attach_index(registry, ref, index_blobs(index, digest), tmp_path / "push")
    in_span_1 = next(
        name
        for name in files
        if spans.span_of(read_metadata(own.metadata).lookup([name.encode()]).data_offset) == 1
    )

    caplog.set_level(logging.INFO)
    cache = tmp_path / "new"
    fill = PrefetchSettings(fill=True)
    image = open_image(ref, cache_dir=cache, options=registry.options(), prefetch=fill)
    try:
        (export,) = image.exports()
        origin = IndexCache(image.store)
        assert wait_for(
            lambda: origin.origin(digest, DEFAULT_SPAN) == IndexCache.REFUSED, timeout=30
        )
        if lie == "a span's digest":
            with pytest.raises(BlobReadError):
                read_file(export, in_span_1)
    finally:
        image.close()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("does not describe this layer's tar" in e for e in errors), errors

    caplog.clear()
    image = open_image(ref, cache_dir=cache, options=registry.options())
    try:
        (export,) = image.exports()
        assert export.index.metadata == own.metadata
        assert read_file(export, in_span_1) == files[in_span_1]
        assert read_file(export, "f3.txt") == files["f3.txt"]
    finally:
        image.close()
    assert "using the index attached to the image" not in caplog.text


def test_a_damaged_origin_mark_still_has_the_shared_index_proven(tmp_path, registry):
    """Tried: an attached index that lies about the tree (one file given the setuid
    bit) taken by an open, then one bit flipped in the record saying it came from the
    registry, then an open and ``prefetch``. Must hold: a mark that fails its checksum
    counts as from the registry, so the seal proves the index, finds the lie and drops
    it; the next open builds the true one. Before, a damaged mark read as absent, that
    is built here: the lie was never judged, and kept for good."""
    files = {f"f{i}.txt": f"file {i} ".encode() * 300 for i in range(30)}
    client = registry.client()
    try:
        ref, tar, blob = gzip_image(tmp_path, registry.host, client, "liar", files)
    finally:
        client.close()
    own = index_compressed_tar(io.BytesIO(blob), GZIP, blob_digest=None, diff_id=None)
    tree = build_tree(walk_tar(io.BytesIO(tar)))
    tree.root.children[b"f3.txt"].mode |= 0o4000
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    blobs = index_blobs(own, digest)
    blobs[0] = (write_metadata(tree, len(tar)), blobs[0][1], blobs[0][2])
    attach_index(registry, ref, blobs, tmp_path / "push")

    cache = tmp_path / "new"
    image = open_image(ref, cache_dir=cache, options=registry.options())
    try:
        (export,) = image.exports()
        assert export.index.metadata != own.metadata  # the lie is served until the seal
        flip_kept_byte(
            image.store, f"tarlayer/v{INDEX_FORMAT}/span{DEFAULT_SPAN}/{digest}/origin", 3
        )
    finally:
        image.close()
    image = open_image(ref, cache_dir=cache, options=registry.options())
    try:
        (export,) = image.exports()
        with pytest.raises(IntegrityError, match="does not describe this layer's tar"):
            export.prefetch()
    finally:
        image.close()
    image = open_image(ref, cache_dir=cache, options=registry.options())
    try:
        (export,) = image.exports()
        assert export.index.metadata == own.metadata
    finally:
        image.close()


def test_a_tar_index_too_large_to_share_is_left_out_not_a_usage_error(
    tmp_path, registry, monkeypatch, capsys, caplog
):
    """Tried: ``index --push`` of a tar.gz image whose tar index (metadata image and zinfo)
    is larger than an artifact blob may be (here the limit is made 4 KiB; a gzip tar of
    about 8 GiB has a zinfo over the real 64 MiB). Must hold: exit 0, the chunk index
    attached, the tar index left out with one warning naming the layer and the sizes
    (a new machine then builds that index itself, as without ``--push``). Before, exit
    2, as for a usage error, after the chunk index was attached."""
    from blockstore import attachments
    from blockstore.cli import main
    from blockstore.registry import referrers

    files = {f"f{i}.bin": os.urandom(64 << 10) for i in range(8)}
    client = registry.client()
    try:
        ref, _, blob = gzip_image(tmp_path, registry.host, client, "large", files, "gzip")
    finally:
        client.close()
    monkeypatch.setattr(referrers, "MAX_ARTIFACT_BLOB", 4096)
    monkeypatch.setattr(attachments, "MAX_ARTIFACT_BLOB", 4096)
    code = main(["index", "--push", "--insecure", "--cache-dir", str(tmp_path / "c"), ref])
    said = capsys.readouterr()
    assert code == 0, said.err
    assert "chunk index attached to" in said.out
    assert "tar index attached" not in said.out
    layer = "sha256:" + hashlib.sha256(blob).hexdigest()
    (warning,) = [r.getMessage() for r in caplog.records if "not attached" in r.getMessage()]
    assert layer in warning and "4.0 KiB" in warning, warning
