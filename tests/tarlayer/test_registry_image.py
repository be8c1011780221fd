"""An ordinary OCI image (gzip, plain and zstd tar layers) from a registry, mounted lazily."""

from __future__ import annotations

import contextlib
import io
import json
import os
import struct
import subprocess
import sys
import tarfile
import time
from dataclasses import replace
from pathlib import Path

import pytest
from oci_layout import MEDIA_TYPES, compress, make_layout, push_tar_layer, skopeo_copy
from rig.fault_proxy import Fault
from test_overlay_layers import extract_in_order, layer_sources, without_dir_counts
from trees import make_tar, snapshot

from blockstore.cache import ChunkStore
from blockstore.cache.traces import TraceShelf
from blockstore.image import open_image
from blockstore.prefetch import Trace
from blockstore.prefetch.settings import MOUNT
from blockstore.tarlayer.erofs_reader import read_metadata
from blockstore.tarlayer.layers import TarLayer
from nbdfront.mount import attach
from nbdfront.mount import syscall as mount_syscall
from nbdfront.server import NBDServer


class Stack:
    """Serve an image's exports over NBD, attach them with nbdfuse, mount and stack them."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.undo: list = []

    def mount(self, exports: list, tag: str) -> Path:
        sock = self.tmp / f"{tag}.sock"
        server = NBDServer({e.name: e for e in exports}, unix=str(sock))
        server.start()
        self.undo.append(server.shutdown)
        lowers = []
        for e in exports:
            uri = f"nbd+unix:///{e.name}?socket={sock}"
            att = attach.attach(
                uri, e.name, self.tmp / f"{tag}-att", self.tmp / "fuse.log", "nbdfuse"
            )
            self.undo.append(lambda att=att: attach.detach(att, lazy=True))
            target = self.tmp / f"{tag}-{e.name}"
            target.mkdir()
            mount_syscall.mount(att.device, str(target), "erofs")
            self.undo.append(lambda t=target: mount_syscall.umount(str(t), lazy=True))
            lowers.append(target)
        merged = self.tmp / f"{tag}-merged"
        merged.mkdir()
        lowerdir = ":".join(str(p) for p in reversed(lowers))
        mount_syscall.mount("overlay", str(merged), "overlay", f"lowerdir={lowerdir}")
        self.undo.append(lambda: mount_syscall.umount(str(merged), lazy=True))
        return merged

    def close(self) -> None:
        for step in reversed(self.undo):
            step()
        self.undo.clear()


@pytest.fixture
def stack(tmp_path, kernel_mount):
    s = Stack(tmp_path)
    yield s
    s.close()


def test_skopeo_copied_image_mounts_like_extraction_and_again_offline(tmp_path, registry, stack):
    """A three-layer OCI image (gzip, plain tar and zstd layers; whiteouts, an opaque
    directory) written as an OCI layout and copied into the registry with skopeo: opened
    by reference, each layer served as ``metadata || tar``, stacked with overlayfs, it
    shows the tree that extracting the tars in order gives. Reopened offline from the
    same cache, with the registry stopped, it shows the same tree."""
    tars = [make_tar(src, tmp_path / f"{src.name}.tar") for src in layer_sources(tmp_path / "src")]
    layout = make_layout(
        tmp_path / "layout",
        "v1",
        [(kind, tar.read_bytes()) for kind, tar in zip(["gzip", "tar", "zstd"], tars, strict=True)],
    )
    ref = skopeo_copy(layout, "v1", registry.host, "ordinary/stack")
    reference = tmp_path / "extracted"
    extract_in_order(tars, reference)
    want = without_dir_counts(snapshot(reference, with_mtime=False))
    cache = tmp_path / "cache"

    image = open_image(ref, cache_dir=cache, options=registry.options())
    try:
        exports = image.exports()
        assert all(isinstance(e, TarLayer) for e in exports)
        merged = stack.mount(exports, "online")
        assert without_dir_counts(snapshot(merged, with_mtime=False)) == want
    finally:
        stack.close()
        image.close()

    registry.stop()
    try:
        image = open_image(ref, cache_dir=cache, offline=True)
        try:
            merged = stack.mount(image.exports(), "offline")
            assert without_dir_counts(snapshot(merged, with_mtime=False)) == want
        finally:
            stack.close()
            image.close()
    finally:
        registry.start()


def test_skopeo_copies_each_layer_as_the_layout_holds_it(tmp_path, registry):
    """Tried: a layout of a gzip, a plain tar and a zstd layer copied into the registry
    as the tests here copy images. Must hold: each layer keeps its media type and bytes;
    before, skopeo gzipped the plain tar on the way, so every test of a "plain tar" layer
    in a copied image served a gzip one."""
    layers = [
        (kind, make_tar(src, tmp_path / f"{kind}.tar").read_bytes())
        for kind, src in zip(["gzip", "tar", "zstd"], layer_sources(tmp_path / "src"), strict=True)
    ]
    ref = skopeo_copy(make_layout(tmp_path / "layout", "v1", layers), "v1", registry.host, "o/kept")
    raw = subprocess.run(
        ["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{ref}"],
        capture_output=True,
        check=True,
    ).stdout
    pushed = [(d["mediaType"], d["size"]) for d in json.loads(raw)["layers"]]
    assert pushed == [(MEDIA_TYPES[kind], len(compress(kind, tar))) for kind, tar in layers]


@pytest.mark.parametrize("kind", ["gzip", "zstd"])
def test_pushed_compressed_layer_has_the_diff_id_its_index_checks(tmp_path, registry, kind):
    """``push_image`` of a tar.gz / tar.zst file with its tar media type writes the
    uncompressed tar's digest as diff_id, so opening the image indexes the layer
    (which checks the diff_id) and serves ``metadata || tar``."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "hello").write_text("hello\n")
    tar = make_tar(src, tmp_path / "layer.tar").read_bytes()
    ref = push_tar_layer(registry, "o/pushed", kind, kind, tar, tmp_path)
    image = open_image(ref, cache_dir=tmp_path / "c", options=registry.options())
    try:
        (export,) = image.exports()
        data = b"".join(bytes(b) for b in export.read(0, export.size))
        assert data[export.index.tar_start :][: len(tar)] == tar
    finally:
        image.close()


@pytest.mark.parametrize("kind", ["tar", "gzip", "zstd"])
def test_an_empty_layer_is_an_empty_directory(tmp_path, registry, kind):
    """A layer of no tar bytes at all (a 0-byte blob, or one that decompresses to
    nothing), which Docker and containerd take for an empty layer: opened, it is an
    empty root directory, served whole. Before, it was refused as damaged ("not a
    readable tar stream: empty file", exit 6), and so was the image."""
    ref = push_tar_layer(registry, f"o/empty-{kind}", kind, kind, b"", tmp_path)
    image = open_image(ref, cache_dir=tmp_path / "c", options=registry.options())
    try:
        (export,) = image.exports()
        assert export.index.tar_size == 0
        data = b"".join(bytes(b) for b in export.read(0, export.size))
        assert read_metadata(data).root.children == {}
    finally:
        image.close()


@contextlib.contextmanager
def mounted_as_extracted(tmp_path, registry, stack, tars: list[Path], repository: str):
    """``tars`` as an image of a plain tar layer then gzip ones, copied into the registry
    with skopeo, mounted, and checked to show what extracting them in order gives
    (contents, modes, owners, links, xattrs); the merged tree."""
    layers = [("tar", tars[0].read_bytes())] + [("gzip", tar.read_bytes()) for tar in tars[1:]]
    ref = skopeo_copy(
        make_layout(tmp_path / "layout", "v1", layers), "v1", registry.host, repository
    )
    reference = tmp_path / "extracted"
    extract_in_order(tars, reference)
    image = open_image(ref, cache_dir=tmp_path / "cache", options=registry.options())
    try:
        merged = stack.mount(image.exports(), repository.replace("/", "-"))
        got = without_dir_counts(snapshot(merged, with_mtime=False))
        assert got == without_dir_counts(snapshot(reference, with_mtime=False))
        yield merged
    finally:
        stack.close()
        image.close()


def test_a_bsdtar_layer_has_the_xattrs_tar_extracts(tmp_path, registry, stack):
    """bsdtar (libarchive) writes each xattr twice in PAX: ``SCHILY.xattr`` raw, and
    ``LIBARCHIVE.xattr`` in base64 without its ``=`` padding. A gzip layer it wrote, of
    files with a capability (20 bytes) and xattrs of 1, 2 and 0 bytes, mounted from the
    registry, shows the xattrs ``tar -x`` gives; before, a value whose length is no
    multiple of 3 was refused ("bad xattr"), and the image with it."""
    src = tmp_path / "src"
    src.mkdir()
    cap = struct.pack("<IIIII", 0x02000001, 1 << 10, 0, 0, 0)
    values = {"cap": ("security.capability", cap), "one": ("user.one", b"\xff")}
    values |= {"two": ("user.two", b"\x00\x01"), "none": ("user.none", b"")}
    for name, (xattr, value) in values.items():
        (src / name).write_text(name)
        os.setxattr(src / name, xattr, value)
    tar = tmp_path / "layer.tar"
    subprocess.run(
        ["bsdtar", "--format", "pax", "--xattrs", "--numeric-owner", "-cf", tar, "-C", src, "."],
        check=True,
    )
    base = tmp_path / "base"
    base.mkdir()
    (base / "base-file").write_text("under the bsdtar layer\n")
    tars = [make_tar(base, tmp_path / "base.tar"), tar]
    with mounted_as_extracted(tmp_path, registry, stack, tars, "o/bsdtar") as merged:
        assert os.getxattr(merged / "cap", "security.capability") == cap


def test_a_layer_writing_through_its_own_symlink_shows_what_tar_extracts(tmp_path, registry, stack):
    """A gzip layer with ``lib -> usr/lib``, then ``lib/extra.so`` and a hard link to it
    (a file list archived as given), over a base with ``usr/lib/libc.so``: extracting
    the layers in order writes through the symlink, so ``lib`` stays a symlink and
    ``usr/lib`` holds all three; the mount shows the same. Before, the layer was
    refused ("'lib' is not a directory"), and the image with it."""
    base = tmp_path / "base"
    (base / "usr/lib").mkdir(parents=True)
    (base / "usr/lib/libc.so").write_text("libc\n")
    upper = tmp_path / "upper.tar"
    with tarfile.open(upper, "w", format=tarfile.PAX_FORMAT) as archive:
        link = tarfile.TarInfo("lib")
        link.type, link.linkname = tarfile.SYMTYPE, "usr/lib"
        archive.addfile(link)
        extra = tarfile.TarInfo("lib/extra.so")
        extra.size = 6
        archive.addfile(extra, io.BytesIO(b"extra\n"))
        hard = tarfile.TarInfo("lib/extra.so.1")
        hard.type, hard.linkname = tarfile.LNKTYPE, "lib/extra.so"
        archive.addfile(hard)
    tars = [make_tar(base, tmp_path / "base.tar"), upper]
    with mounted_as_extracted(tmp_path, registry, stack, tars, "o/sl") as merged:
        assert os.readlink(merged / "lib") == "usr/lib"
        assert sorted(os.listdir(merged / "usr/lib")) == ["extra.so", "extra.so.1", "libc.so"]


def test_a_zstd_layers_indexing_pass_leaves_its_tar_in_the_cache(tmp_path, registry):
    """A zstd layer written as a stream (``tar | zstd``: no size in its frame header),
    opened with its index built here: the pass that indexed it also leaves its tar whole
    in the cache, so reading it all afterwards decompresses and fetches nothing more.
    Before, the first read decompressed the one frame again, the whole layer, in memory."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(30):
        (src / f"file-{i:02}").write_bytes(os.urandom(30_000) + bytes(50_000))
    tar = make_tar(src, tmp_path / "layer.tar").read_bytes()
    ref = push_tar_layer(registry, "o/zstd-stream", "zstd", "zstd", tar, tmp_path)
    image = open_image(ref, cache_dir=tmp_path / "c", options=registry.options())
    try:
        (export,) = image.exports()
        store = image.store
        tar_record = store.lookup(export.index.tar_digest)
        assert tar_record is not None and tar_record.present == tar_record.chunks
        fetched = store.stats()["bytes_fetched"]
        data = b"".join(bytes(b) for b in export.read(0, export.size))
        assert data[export.index.tar_start :][: len(tar)] == tar
        assert store.stats()["bytes_fetched"] == fetched
    finally:
        image.close()


@pytest.mark.parametrize("kind", ["tar", "gzip"])
def test_a_tar_layers_trace_holds_the_mounts_reads_not_the_indexing_pass(tmp_path, registry, kind):
    """Open a tar layer with a mount's settings (its index built here: a walk over every
    header, or a whole pass over the gzip blob), read one file, close. The trace kept
    for the blob must name only that file's blocks (plain tar), or nothing at all
    (gzip: its blob is read by the layer's own passes, never by the mount). A trace
    of the indexing pass, pushed and replayed elsewhere, fetched the whole layer."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(40):
        (src / f"filler-{i:02}").write_bytes(bytes([i]) * 20_000)
    wanted = b"the one file read " * 1000
    (src / "wanted").write_bytes(wanted)
    tar = make_tar(src, tmp_path / "layer.tar").read_bytes()
    ref = push_tar_layer(registry, "o/traced", kind, kind, tar, tmp_path)
    image = open_image(ref, cache_dir=tmp_path / "c", options=registry.options(), prefetch=MOUNT)
    try:
        (export,) = image.exports()
        (layer_digest,) = [layer.digest for layer in image.resolved.layers]
        at = tar.index(wanted)
        start = export.index.tar_start + at
        assert b"".join(bytes(b) for b in export.read(start, len(wanted))) == wanted
    finally:
        image.close()
    store = ChunkStore(tmp_path / "c")
    try:
        trace = TraceShelf(store).get(layer_digest)
    finally:
        store.close()
    if kind == "gzip":
        assert trace is None
        return
    assert trace is not None and trace.events
    for _, first, count in trace.events:
        # Every block the trace names overlaps the file read.
        assert first * trace.unit < at + len(wanted) and (first + count) * trace.unit > at


@pytest.mark.parametrize("kind", ["tar", "gzip"])
def test_opening_a_tar_layer_with_its_index_fetches_nothing_of_it(tmp_path, registry, kind):
    """Open a tar layer whose index is attached, with a mount's settings but no
    readahead (which would start inflating a gzip layer at its first read), and read
    the head of its metadata image, what a mount reads first: nothing of the layer's
    blob may be fetched. The EROFS start used to fetch the blob's head at open,
    looking for an EROFS superblock in a tar or a gzip stream."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "hello").write_bytes(b"hello\n" * 10_000)
    tar = make_tar(src, tmp_path / "layer.tar").read_bytes()
    ref = push_tar_layer(registry, "o/head", kind, kind, tar, tmp_path)
    indexer = [sys.executable, "-m", "blockstore", "index", "--push", "--insecure", ref]
    subprocess.run([*indexer, "--cache-dir", str(tmp_path / "i")], check=True, timeout=60)
    settings = replace(MOUNT, readahead=False)
    image = open_image(ref, cache_dir=tmp_path / "c", options=registry.options(), prefetch=settings)
    try:
        (export,) = image.exports()
        head = export.index.metadata[:4096]
        assert b"".join(bytes(b) for b in export.read(0, len(head))) == head
        time.sleep(0.5)  # the EROFS start ran on a thread of its own
        stats = image.store.stats()
    finally:
        image.close()
    assert (stats["requests_fetched"], stats["bytes_fetched"]) == (0, 0)


def test_trace_push_publishes_no_trace_of_a_compressed_layer(tmp_path, registry):
    """A cache that holds a trace of a gzip layer (an earlier version recorded its
    indexing pass there, the whole blob) must not publish it: ``trace push`` says
    there is no trace to push (exit 3) and attaches nothing, so no machine replays
    the whole layer before its mount."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "hello").write_bytes(b"hello\n" * 10_000)
    tar = make_tar(src, tmp_path / "layer.tar").read_bytes()
    ref = push_tar_layer(registry, "o/stale", "v1", "gzip", tar, tmp_path)
    cache = tmp_path / "c"
    image = open_image(ref, cache_dir=cache, options=registry.options())
    try:
        (digest,) = [layer.digest for layer in image.resolved.layers]
        TraceShelf(image.store).put(Trace(digest, 4096, time.time(), [(0, 0, 4)]))
    finally:
        image.close()
    argv = [sys.executable, "-m", "blockstore", "trace", "push", ref, "--insecure"]
    pushed = subprocess.run([*argv, "--cache-dir", str(cache)], capture_output=True, text=True)
    assert pushed.returncode == 3, pushed.stderr
    assert f"no trace kept for {ref}" in pushed.stderr


def test_inflating_spans_from_cached_blob_bytes_is_not_counted_as_served(tmp_path, registry):
    """Mount a gzip layer, its index built here (which keeps the blob's bytes), drop
    its decompressed tar from the cache, open it again and read one file: the spans
    inflate from the blob's cached bytes. Only the file's bytes may count as served;
    the blob's bytes, read by the layer itself, counted as a client's reads."""
    src = tmp_path / "src"
    src.mkdir()
    wanted = b"read me " * 1000
    (src / "wanted").write_bytes(wanted)
    (src / "noise").write_bytes(os.urandom(300_000))
    tar = make_tar(src, tmp_path / "layer.tar").read_bytes()
    ref = push_tar_layer(registry, "o/served", "v1", "gzip", tar, tmp_path)
    settings = replace(MOUNT, readahead=False)

    def open_and_read() -> tuple[str, int]:
        image = open_image(
            ref,
            cache_dir=tmp_path / "c",
            options=registry.options(),
            prefetch=settings,
        )
        try:
            (export,) = image.exports()
            before = image.store.stats()["bytes_served"]
            start = export.index.tar_start + tar.index(wanted)
            assert b"".join(bytes(b) for b in export.read(start, len(wanted))) == wanted
            image.store.flush()
            return export.index.tar_digest, image.store.stats()["bytes_served"] - before
        finally:
            image.close()

    tar_digest, _ = open_and_read()
    store = ChunkStore(tmp_path / "c")
    try:
        assert store.remove(tar_digest)
    finally:
        store.close()
    _, served = open_and_read()
    assert served == len(wanted)


def test_a_config_naming_another_tar_is_refused_with_the_index_kept_too(tmp_path, registry):
    """One gzip blob in two images: the first's config names the blob's tar, the
    second's another tar. The first image, opened first, indexes the layer and keeps
    the index and its config. The second, opened in the same cache, is refused all the
    same (an IntegrityError naming the diff_id), as it is in an empty cache, rather than
    served by the index the first image left."""
    import json

    from blockstore.errors import IntegrityError
    from blockstore.registry.digests import digest_of
    from blockstore.registry.mediatypes import OCI_CONFIG, OCI_MANIFEST

    src = tmp_path / "src"
    src.mkdir()
    (src / "hello").write_text("hello\n")
    tar = make_tar(src, tmp_path / "layer.tar").read_bytes()
    good = push_tar_layer(registry, "o/diffid", "good", "gzip", tar, tmp_path)
    client = registry.client()
    try:
        manifest = json.loads(client.get_manifest("o/diffid", "good").raw)
        kept_config = manifest["config"]["digest"]
        config = json.dumps(
            {"architecture": "amd64", "os": "linux", "config": {},
             "rootfs": {"type": "layers", "diff_ids": ["sha256:" + "1" * 64]}}
        ).encode()  # fmt: skip
        client.upload_blob("o/diffid", digest_of(config), config)
        manifest["config"] = {
            "mediaType": OCI_CONFIG, "digest": digest_of(config), "size": len(config)
        }  # fmt: skip
        client.put_manifest("o/diffid", "bad", json.dumps(manifest).encode(), OCI_MANIFEST)
    finally:
        client.close()
    cache = tmp_path / "cache"
    image = open_image(good, cache_dir=cache, options=registry.options())
    try:
        (export,) = image.exports()
        assert export.index.tar_digest == digest_of(tar)
        assert image.store.images.manifest(kept_config) is not None
    finally:
        image.close()

    image = open_image(good[: -len("good")] + "bad", cache_dir=cache, options=registry.options())
    try:
        with pytest.raises(IntegrityError, match=r"diff_id is sha256:.*, expected sha256:1111"):
            image.exports()
    finally:
        image.close()


def test_a_layer_that_is_no_tar_is_refused_naming_the_layer(tmp_path, registry):
    """A tar+gzip layer whose gzip stream holds no tar: opening it fails with the tar
    reader's complaint, prefixed with the image, the layer's index, digest and kind, so
    that a user of a many-layer image knows which layer is broken."""
    import json

    from blockstore.errors import BlockstoreError

    ref = push_tar_layer(registry, "o/notar", "v1", "gzip", b"no tar here\n" * 100, tmp_path)
    image = open_image(ref, cache_dir=tmp_path / "cache", options=registry.options())
    try:
        digest = json.loads(image.resolved.manifests[image.resolved.manifest_digest])["layers"][0][
            "digest"
        ]
        with pytest.raises(BlockstoreError) as info:
            image.exports()
        assert str(info.value).startswith(f"{ref} layer 0 ({digest}, gzip): "), info.value
    finally:
        image.close()


@pytest.mark.parametrize("kind", ["gzip", "tar"])
def test_a_pass_over_bytes_spoilt_on_the_way_is_read_again_not_kept(
    tmp_path, registry, fault_proxy, kind
):
    """The first read of the layer's blob comes through a link that spoils a byte (in the
    gzip stream's middle; in a plain tar's first header), so the indexing pass (the
    whole gzip stream, or the tar's headers) fails on it. The bytes it cached were
    never judged by the blob's digest: they are dropped and the layer read once more,
    so the open succeeds and serves the tar. Kept, they made every later open of the
    image fail the same way."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(200):
        (src / f"file{i:03}.txt").write_text(f"line {i} of a text file\n" * (40 + i))
    tar = make_tar(src, tmp_path / "layer.tar").read_bytes()
    good = push_tar_layer(registry, f"o/spoilt-{kind}", "v1", kind, tar, tmp_path)
    proxy = fault_proxy(registry)
    ref = good.replace(registry.host, proxy.host, 1)
    image = open_image(ref, cache_dir=tmp_path / "cache", options=registry.options())
    try:
        layer_digest = image.resolved.layers[0].digest
        proxy.fault = Fault(
            "corrupt",
            path_contains=f"/blobs/{layer_digest}",
            method="GET",
            times=1,
            after_bytes=148 if kind == "tar" else None,  # the first header's checksum
        )
        (export,) = image.exports()
        data = b"".join(bytes(b) for b in export.read(0, export.size))
        assert data[export.index.tar_start :][: len(tar)] == tar
        assert proxy.faults_applied == 1
    finally:
        image.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_a_gzip_layer_whose_index_finds_the_disk_full_still_opens(tmp_path, registry, monkeypatch):
    """The disk under the cache (a 24 MiB tmpfs) is filled up the moment the layer's new
    index is to be kept, as a pass that inflated a large tar onto a small disk leaves
    it: the layer still opens and serves every byte of its tar (the index kept after
    making room, or served unkept), as an EROFS layer on that disk would be."""
    from blockstore.cache.refs import ImageRecords

    src = tmp_path / "src"
    src.mkdir()
    for i in range(50):
        (src / f"file{i:02}.txt").write_text(f"{i} some text\n" * 2000)
    tar = make_tar(src, tmp_path / "layer.tar").read_bytes()
    ref = push_tar_layer(registry, "o/fulldisk", "v1", "gzip", tar, tmp_path)
    disk = tmp_path / "small"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(disk)], check=True)
    put = ImageRecords.put_manifest

    def put_on_a_full_disk(records, key: str, raw: bytes) -> None:
        if key.startswith("tarlayer/") and not (disk / "filler").exists():
            with open(disk / "filler", "wb", buffering=0) as filler, contextlib.suppress(OSError):
                while True:
                    filler.write(bytes(1 << 16))
        put(records, key, raw)

    monkeypatch.setattr(ImageRecords, "put_manifest", put_on_a_full_disk)
    try:
        image = open_image(ref, cache_dir=disk / "cache", options=registry.options())
        try:
            (export,) = image.exports()
            start = export.index.tar_start
            assert b"".join(bytes(b) for b in export.read(start, len(tar))) == tar
            assert (disk / "filler").exists()
        finally:
            image.close()
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_layer_refused_for_what_it_holds_is_not_read_again(tmp_path, registry, fault_proxy):
    """A gzip layer with an entry the image cannot hold (a path through '..', its header's
    checksum intact): the open is refused, and no byte of the blob is asked for twice:
    it is not dropped and read again as bytes spoilt on the way are, for the same
    bytes would be refused the same way."""
    import io
    import tarfile

    from blockstore.errors import BlockstoreError

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as archive:
        # The refused entry first, 4 MiB after it: the pass stops well before the end.
        for name, payload in (("a/../../outside", b"x" * 100), ("big", os.urandom(4 << 20))):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    good = push_tar_layer(registry, "o/refused", "v1", "gzip", buffer.getvalue(), tmp_path)
    proxy = fault_proxy(registry)
    image = open_image(
        good.replace(registry.host, proxy.host, 1),
        cache_dir=tmp_path / "cache",
        options=registry.options(),
    )
    try:
        digest = image.resolved.layers[0].digest
        with pytest.raises(BlockstoreError, match=r"'\.\.' in a path is not allowed"):
            image.exports()
        asked = 0
        for r in proxy.requests:
            if r.method == "GET" and digest in r.path:
                first, last = r.headers["Range"].removeprefix("bytes=").split("-")
                asked += int(last) - int(first) + 1
        assert asked <= image.resolved.layers[0].size
    finally:
        image.close()
