"""Opening image layers of each tar kind through the cache: kinds, reuse, offline, local indexes."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import subprocess
import sys
import tarfile

import pytest
from rig.local_source import LocalFileSource
from rig.stored_chunks import flip_kept_byte
from trees import make_tar, populate

from blockstore.cache import CachedBlob, ChunkStore
from blockstore.errors import IntegrityError, NotCached, UsageError
from blockstore.registry.mediatypes import GZIP, TAR, ZSTD, layer_kind
from blockstore.tarlayer.gzindex import GzipIndexer
from blockstore.tarlayer.indexcache import _DIGEST, IndexCache
from blockstore.tarlayer.layerindex import INDEX_FORMAT
from blockstore.tarlayer.layers import open_tar_layer

SPAN = 1 << 20


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def blobs(tmp_path_factory):
    """The same real tree as a plain, a gzip and a (multi-frame) zstd layer blob."""
    tmp = tmp_path_factory.mktemp("layers")
    tar = make_tar(populate(tmp / "src"), tmp / "layer.tar").read_bytes()
    pieces = [tar[i : i + SPAN] for i in range(0, len(tar), SPAN)]
    zst = b"".join(
        subprocess.run(["zstd", "-q", "-c"], input=p, capture_output=True, check=True).stdout
        for p in pieces
    )
    out = {TAR: tar, GZIP: gzip.compress(tar, mtime=0), ZSTD: zst}
    paths = {}
    for kind, data in out.items():
        paths[kind] = tmp / f"layer.{kind}"
        paths[kind].write_bytes(data)
    return tar, paths


opened: list[CachedBlob] = []


@pytest.fixture(autouse=True)
def close_blobs():
    """The blobs the tests open are theirs to close, as an image closes its own."""
    yield
    while opened:
        opened.pop().close()


def open_layer(store, path, kind, tar, *, online=True, **kw):
    data = path.read_bytes()
    source = LocalFileSource(path, sha(data)) if online else None
    blob = CachedBlob(store, sha(data), len(data), source)
    layer = open_tar_layer(
        store, blob, kind, online=online, diff_id=lambda: sha(tar), span=SPAN, **kw
    )
    opened.append(blob)
    return layer


def whole(export) -> bytes:
    return b"".join(bytes(b) for b in export.read(0, export.size))


def test_layer_kinds_from_media_types():
    """OCI and Docker tar media types map to their kind; EROFS and others are served as is."""
    assert layer_kind("application/vnd.oci.image.layer.v1.tar+gzip") == GZIP
    assert layer_kind("application/vnd.docker.image.rootfs.diff.tar.gzip") == GZIP
    assert layer_kind("application/vnd.oci.image.layer.v1.tar+zstd") == ZSTD
    assert layer_kind("application/vnd.oci.image.layer.v1.tar") == TAR
    assert layer_kind("application/vnd.erofs.layer.v1") is None


@pytest.mark.parametrize("kind", [TAR, GZIP, ZSTD])
def test_each_kind_serves_metadata_and_tar_then_reopens_offline(blobs, tmp_path, kind):
    """A layer of each kind serves ``metadata || tar``; after prefetch (which seals the
    tar part against its digest), the layer reopens with no source at all, its index
    from the cache, and serves the same bytes."""
    tar, paths = blobs
    with ChunkStore(tmp_path / "cache") as store:
        layer = open_layer(store, paths[kind], kind, tar)
        first = whole(layer)
        assert first[layer.index.tar_start :][: len(tar)] == tar
        layer.prefetch()
        sealed = {b.digest: b.sealed for b in store.blobs()}
        assert sealed[sha(tar)] is True
        layer.close()
    with ChunkStore(tmp_path / "cache") as store:
        again = open_layer(store, paths[kind], kind, tar, online=False)
        assert whole(again) == first
        again.close()


@pytest.mark.parametrize("kind", [TAR, GZIP])
def test_a_config_diff_id_that_is_not_the_tar_s_builds_no_index(blobs, tmp_path, kind):
    """The image config names the diff_id of another tar: opening the layer fails with
    an IntegrityError naming the diff_id, for a plain tar (whose diff_id must be its own
    digest) as for a compressed one, and nothing is served."""
    tar, paths = blobs
    data = paths[kind].read_bytes()
    with ChunkStore(tmp_path / "cache") as store:
        blob = CachedBlob(store, sha(data), len(data), LocalFileSource(paths[kind], sha(data)))
        opened.append(blob)
        with pytest.raises(IntegrityError, match=r"the tar's diff_id is sha256:\w+, expected "):
            open_tar_layer(
                store, blob, kind, online=True, diff_id=lambda: sha(tar + b"x"), span=SPAN
            )


def test_offline_layer_never_indexed_fails_clearly(blobs, tmp_path):
    tar, paths = blobs
    with ChunkStore(tmp_path / "cache") as store, pytest.raises(NotCached, match="never indexed"):
        open_layer(store, paths[GZIP], GZIP, tar, online=False)


def test_local_tarindex_and_zinfo_are_used_instead_of_a_pass(blobs, tmp_path):
    """``oci.tarindex`` and ``oci.zinfo`` files (a metadata image and a SOCI zinfo) are
    served as given: same bytes as the index built here, and no indexing pass."""
    tar, paths = blobs
    with ChunkStore(tmp_path / "built") as store:
        built = open_layer(store, paths[GZIP], GZIP, tar)
        expected = whole(built)
        (tmp_path / "meta.erofs").write_bytes(built.index.metadata)
        built.close()
    zinfo, _ = GzipIndexer(io.BytesIO(paths[GZIP].read_bytes()), span=SPAN).finish()
    (tmp_path / "layer.zinfo").write_bytes(zinfo.to_bytes())
    with ChunkStore(tmp_path / "local") as store:
        local = open_layer(
            store,
            paths[GZIP],
            GZIP,
            tar,
            tarindex=tmp_path / "meta.erofs",
            zinfo=tmp_path / "layer.zinfo",
        )
        assert whole(local) == expected
        assert (
            store.images.manifest(
                f"tarlayer/v{INDEX_FORMAT}/span{SPAN}/{sha(paths[GZIP].read_bytes())}/meta"
            )
            is None
        )
        local.close()


def _damage_kept_metadata(store, digest: str) -> None:
    """Flip one bit of the metadata image the cache kept for blob ``digest``."""
    flip_kept_byte(store, f"tarlayer/v{INDEX_FORMAT}/span{SPAN}/{digest}/meta", 40)


def test_a_damaged_kept_index_offline_is_called_damaged_then_built_again_online(blobs, tmp_path):
    """Tried: a gzip layer indexed, its blob then dropped from the cache (so it is not
    whole here), its kept metadata image changed by a byte on the disk, then an offline
    open and an online one. Must hold: offline, NotCached saying the kept index is
    damaged (not that the layer was never indexed); online, the index is built again
    and the layer reads the same bytes."""
    tar, paths = blobs
    digest = sha(paths[GZIP].read_bytes())
    with ChunkStore(tmp_path / "cache") as store:
        built = open_layer(store, paths[GZIP], GZIP, tar)
        expected = whole(built)
        built.close()
        opened.pop().close()
        store.remove(digest)
        _damage_kept_metadata(store, digest)
        with pytest.raises(NotCached, match="the index this cache kept of this tar layer is "):
            open_layer(store, paths[GZIP], GZIP, tar, online=False)
        again = open_layer(store, paths[GZIP], GZIP, tar)
        assert whole(again) == expected
        again.close()


@pytest.mark.parametrize("kind", [TAR, GZIP])
def test_offline_a_sealed_layer_s_damaged_index_is_built_again_from_the_cache(
    blobs, tmp_path, kind
):
    """Tried: a layer prefetched (its blob whole and sealed here), its kept metadata
    image then changed by a byte on the disk, then an offline open with no source at
    all. Must hold: the index is built again from the sealed blob in the cache, and
    the layer serves the same bytes as before; before, the open failed with NotCached
    although every byte it needed was here."""
    tar, paths = blobs
    digest = sha(paths[kind].read_bytes())
    with ChunkStore(tmp_path / "cache") as store:
        layer = open_layer(store, paths[kind], kind, tar)
        expected = whole(layer)
        layer.prefetch()
        # A gzip layer's prefetch seals the tar it serves; its blob, whole after the
        # indexing pass, is sealed when a background check gets to it: sealed here.
        opened[-1].prefetch()
        layer.close()
        assert {b.digest: b.sealed for b in store.blobs()}[digest] is True
        _damage_kept_metadata(store, digest)
        again = open_layer(store, paths[kind], kind, tar, online=False)
        assert whole(again) == expected
        again.close()
        assert IndexCache(store).load(digest, SPAN, kind != TAR) is not None


@pytest.mark.parametrize("kind", [TAR, GZIP])
def test_a_local_tarindex_of_another_tar_is_refused(blobs, tmp_path, kind):
    """Tried: ``oci.tarindex`` naming the index of a tar layer with one more file
    (another layer's); for a gzip layer, with the layer's own ``oci.zinfo``. Must hold:
    a usage error naming the file and both sizes, before anything is served (for gzip
    the tar's size is what the zinfo's last span inflates to); before, it was taken,
    and a file read past its own end into the next header's bytes (wrong bytes), the
    rest EIO; for gzip, the other layer's tree was shown over this layer's bytes."""
    tar, paths = blobs
    bigger = io.BytesIO()
    with (
        tarfile.open(fileobj=io.BytesIO(tar)) as source,
        tarfile.open(fileobj=bigger, mode="w", format=tarfile.PAX_FORMAT) as out,
    ):
        for member in source:
            out.addfile(member, source.extractfile(member) if member.isfile() else None)
        extra = tarfile.TarInfo("extra")
        extra.size = 90000
        out.addfile(extra, io.BytesIO(bytes(90000)))
    (tmp_path / "other.tar").write_bytes(bigger.getvalue())
    with ChunkStore(tmp_path / "built") as store:
        other = open_layer(store, tmp_path / "other.tar", TAR, bigger.getvalue())
        (tmp_path / "other.meta").write_bytes(other.index.metadata)
        other.close()
    own = None
    if kind == GZIP:
        zinfo, _ = GzipIndexer(io.BytesIO(paths[GZIP].read_bytes()), span=SPAN).finish()
        own = tmp_path / "layer.zinfo"
        own.write_bytes(zinfo.to_bytes())
    with ChunkStore(tmp_path / "local") as store, pytest.raises(UsageError) as refused:
        open_layer(store, paths[kind], kind, tar, tarindex=tmp_path / "other.meta", zinfo=own)
    assert f"--tarindex {tmp_path / 'other.meta'}: it describes a tar of " in str(refused.value)
    assert f"but this layer's tar is {len(tar)} bytes" in str(refused.value)


def test_a_local_tarindex_for_a_layer_that_takes_none_says_which_do(blobs, tmp_path):
    """Tried: ``oci.tarindex`` for a zstd layer, and for a gzip layer without its zinfo.
    Must hold: a usage error saying which layers take it, or that gzip needs its zinfo
    too, naming the options as every check of them does, ``--tarindex (oci.tarindex)``
    and ``--zinfo (oci.zinfo)``: ``serve`` has no ``-o``, and a message naming only
    ``oci.zinfo`` named nothing it takes. Before, both said "needs oci.zinfo (gzip
    layers only)", which for zstd read as if a zinfo would do; then each named only
    the ``-o`` spellings."""
    tar, paths = blobs
    (tmp_path / "meta.erofs").write_bytes(b"")
    with ChunkStore(tmp_path / "cache") as store:
        with pytest.raises(
            UsageError,
            match=r"^--tarindex \(oci\.tarindex\) is taken for plain tar and gzip layers only; ",
        ):
            open_layer(store, paths[ZSTD], ZSTD, tar, tarindex=tmp_path / "meta.erofs")
        with pytest.raises(UsageError, match=r"gzip layer needs --zinfo \(oci\.zinfo\) too"):
            open_layer(store, paths[GZIP], GZIP, tar, tarindex=tmp_path / "meta.erofs")


def test_a_local_zinfo_that_is_not_one_is_a_usage_error_naming_it(blobs, tmp_path):
    """Tried: ``oci.zinfo`` naming 5000 bytes of garbage, beside the layer's own tar
    index. Must hold: a usage error naming the file (before, an integrity error, exit
    6, that named no file)."""
    tar, paths = blobs
    with ChunkStore(tmp_path / "built") as store:
        built = open_layer(store, paths[GZIP], GZIP, tar)
        (tmp_path / "meta.erofs").write_bytes(built.index.metadata)
        built.close()
    (tmp_path / "bad.zinfo").write_bytes(bytes(range(256)) * 19 + bytes(136))
    with ChunkStore(tmp_path / "local") as store, pytest.raises(UsageError) as refused:
        open_layer(
            store,
            paths[GZIP],
            GZIP,
            tar,
            tarindex=tmp_path / "meta.erofs",
            zinfo=tmp_path / "bad.zinfo",
        )
    assert f"--zinfo {tmp_path / 'bad.zinfo'}: not a zinfo of this layer" in str(refused.value)


def test_an_index_kept_by_an_older_index_format_is_built_again_and_dropped(blobs, tmp_path):
    """Tried: a cache holding an index of this layer kept by an older index format
    (an older engine's, under its own rules: here a metadata image with a byte
    changed). Must hold: it is never served; the layer is indexed anew, serves the
    same bytes as a cache that never saw the old one, and the old records are gone,
    while a newer format's record (a newer version sharing the cache) stays."""
    tar, paths = blobs
    digest = sha(paths[GZIP].read_bytes())
    with ChunkStore(tmp_path / "fresh") as store:
        fresh = open_layer(store, paths[GZIP], GZIP, tar)
        expected, metadata = whole(fresh), fresh.index.metadata
        fresh.close()
    older = f"tarlayer/v{INDEX_FORMAT - 1}/span{SPAN}/{digest}/"
    newer = f"tarlayer/v{INDEX_FORMAT + 1}/span{SPAN}/{digest}/"
    stale = bytearray(metadata)
    stale[1024 + 8] ^= 0xFF
    head = len(tar).to_bytes(8, "little") + sha(tar).encode().ljust(_DIGEST, b"\0")
    with ChunkStore(tmp_path / "upgraded") as store:
        for part, data in (("meta", head + bytes(stale)), ("origin", IndexCache.PROVEN)):
            store.images.put_manifest(older + part, hashlib.sha256(data).digest() + data)
        store.images.put_manifest(newer + "meta", b"a newer version's, sharing the cache")
        layer = open_layer(store, paths[GZIP], GZIP, tar)
        assert layer.index.metadata == metadata
        assert whole(layer) == expected
        layer.close()
        assert store.images.manifest(older + "meta") is None
        assert store.images.manifest(older + "origin") is None
        assert store.images.manifest(newer + "meta") is not None


def test_a_whole_tar_is_not_asked_after_chunk_by_chunk(blobs, tmp_path, monkeypatch):
    """Tried: a gzip layer whose tar its indexing pass kept whole, opened again and
    filled (as a mount's background fill does). Must hold: the fill asks the cache no
    chunk-by-chunk question; it finds the tar whole from its record. Before, it asked
    after every chunk in one read (393,216 of them for a 12 GiB tar, seconds), and a
    server stopped meanwhile was killed for taking too long."""
    tar, paths = blobs
    with ChunkStore(tmp_path / "cache") as store:
        first = open_layer(store, paths[GZIP], GZIP, tar)
        expected = whole(first)
        first.close()

        def asked(*args, **kwargs):
            raise AssertionError("asked which chunks are missing of a whole tar")

        monkeypatch.setattr(store, "missing", asked)
        again = open_layer(store, paths[GZIP], GZIP, tar)
        again.prefetch()
        assert whole(again) == expected
        again.close()


@pytest.mark.parametrize("part", ["meta", "unproven"])
def test_verify_finds_a_damaged_kept_index_record_and_heals_it(blobs, tmp_path, part):
    """Tried: a plain tar layer indexed (its index unproven: a header walk read only a
    few ranges), then one bit flipped in its kept metadata image, or in the mark saying
    it is unproven; then ``cache verify`` twice, and an open. Must hold: the first
    verify names the record and exits 6; the second finds nothing (exit 0), the damaged
    index having been dropped or the mark set back to unproven; the layer then reads
    the same bytes. Before, verify said ok and left the record as it was."""
    tar, paths = blobs
    digest = sha(paths[TAR].read_bytes())
    name = f"tarlayer/v{INDEX_FORMAT}/span{SPAN}/{digest}/{part}"
    cache = tmp_path / "cache"
    with ChunkStore(cache) as store:
        layer = open_layer(store, paths[TAR], TAR, tar)
        expected = whole(layer)
        layer.close()
        opened.pop().close()
        assert IndexCache(store).unproven(digest, SPAN)
        flip_kept_byte(store, name, 40 if part == "meta" else 0)
    verify = [sys.executable, "-m", "blockstore", "cache", "verify", "--cache-dir", str(cache)]
    first = subprocess.run(verify, capture_output=True, text=True)
    assert first.returncode == 6, first.stdout + first.stderr
    assert f"the cached record of {name} is damaged" in first.stdout
    second = subprocess.run(verify, capture_output=True, text=True)
    assert second.returncode == 0, second.stdout + second.stderr
    with ChunkStore(cache) as store:
        kept = IndexCache(store)
        assert kept.unproven(digest, SPAN)
        assert (kept.load(digest, SPAN, False) is None) == (part == "meta")
        again = open_layer(store, paths[TAR], TAR, tar)
        assert whole(again) == expected
        again.close()


@pytest.mark.parametrize("kind", [GZIP, ZSTD])
def test_a_tar_larger_than_the_cap_is_not_kept_from_the_pass(tmp_path, kind, caplog):
    """Tried: a 1 MiB layer prefetched (sealed) under a 4 MiB cap, then a gzip or zstd
    layer of a few KiB whose tar is 12 MiB opened (indexed here), then 64 KiB read from
    the middle of its tar. Must hold: the pass keeps none of the tar, saying it is
    larger than the cap, so the first layer is still whole once the layer is open; the
    read is right (its span inflated). Before, the pass stored the whole tar, which
    evicted the first layer, then the tar's own first chunks."""
    small = os.urandom(1 << 20)
    small_digest = sha(small)
    (tmp_path / "small").write_bytes(small)
    tree = io.BytesIO()
    with tarfile.open(fileobj=tree, mode="w") as out:
        for i in range(12):
            entry = tarfile.TarInfo(f"f{i}")
            entry.size = 1 << 20
            out.addfile(entry, io.BytesIO(bytes([i]) * entry.size))
    tar = tree.getvalue()
    blob = (
        gzip.compress(tar, mtime=0)
        if kind == GZIP
        else b"".join(
            subprocess.run(
                ["zstd", "-q", "-c"], input=tar[i : i + SPAN], capture_output=True, check=True
            ).stdout
            for i in range(0, len(tar), SPAN)
        )
    )
    (tmp_path / "layer").write_bytes(blob)
    with ChunkStore(tmp_path / "cache", size_cap=4 << 20) as store:
        first = CachedBlob(
            store, small_digest, len(small), LocalFileSource(tmp_path / "small", small_digest)
        )
        opened.append(first)
        first.prefetch()
        layer = open_layer(store, tmp_path / "layer", kind, tar)
        kept = store.lookup(sha(tar))
        assert kept is None or kept.present == 0
        assert store.lookup(small_digest).present == store.lookup(small_digest).chunks
        middle = layer.index.tar_start + len(tar) // 2
        expected = tar[len(tar) // 2 :][: 1 << 16]
        assert b"".join(bytes(b) for b in layer.read(middle, 1 << 16)) == expected
        layer.close()
    assert "not kept from its indexing pass" in caplog.text
    assert "is larger than the 3.6 MiB eviction keeps the cache to under its 4.0 MiB cap" in (
        caplog.text
    )
