"""``blockstore mount`` / ``prefetch`` of ordinary tar images, as a user runs them."""

from __future__ import annotations

import errno
import gzip
import hashlib
import io
import json
import os
import random
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest
import zstandard
from oci_layout import MEDIA_TYPES, compress, make_layout, push_tar_layer, skopeo_copy
from rig.mounts_left import take_down_recorded
from rig.stored_chunks import flip_stored_byte
from test_overlay_layers import extract_in_order, layer_sources, without_dir_counts
from test_shared_index import fetched_from, zstd_frames
from trees import make_tar, populate, snapshot, tar_of

from blockstore.cache import ChunkStore
from blockstore.registry.mediatypes import GZIP
from blockstore.registry.push import push_image
from blockstore.tarlayer.gzindex import GzipIndexer
from blockstore.tarlayer.layerindex import index_compressed_tar
from nbdfront.mount import syscall

pytestmark = pytest.mark.slow
BLOCKSTORE = [sys.executable, "-m", "blockstore"]


def cli(*args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([*BLOCKSTORE, *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done


@pytest.fixture
def run_dir(tmp_path, monkeypatch, kernel_mount):
    """A private run directory for mount records; whatever is left is unmounted."""
    run = Path(tempfile.mkdtemp(prefix="bs-tar-run-"))
    monkeypatch.setenv("BLOCKSTORE_RUN_DIR", str(run))
    yield run
    left = take_down_recorded()
    for point in sorted(syscall.mounted(), key=len, reverse=True):
        if point.startswith(f"{tmp_path}/") or point.startswith(f"{run}/"):
            syscall.umount(point, lazy=True)
    shutil.rmtree(run, ignore_errors=True)
    assert not left


def test_mount_prefetch_and_offline_mount_of_a_three_layer_tar_image(tmp_path, registry, run_dir):
    """``mount`` of a skopeo-copied image of gzip, tar and zstd layers shows the tree
    extraction gives; ``prefetch`` then fills and seals every layer; with the registry
    stopped, ``mount --offline`` shows the same tree."""
    tars = [make_tar(src, tmp_path / f"{src.name}.tar") for src in layer_sources(tmp_path / "src")]
    layers = [(k, t.read_bytes()) for k, t in zip(["gzip", "tar", "zstd"], tars, strict=True)]
    ref = skopeo_copy(make_layout(tmp_path / "layout", "v1", layers), "v1", registry.host, "o/cli")
    reference = tmp_path / "extracted"
    extract_in_order(tars, reference)
    want = without_dir_counts(snapshot(reference, with_mtime=False))
    cache, mnt = tmp_path / "cache", tmp_path / "mnt"
    mnt.mkdir()

    cli("mount", "--insecure", "--cache-dir", str(cache), ref, str(mnt))
    assert without_dir_counts(snapshot(mnt, with_mtime=False)) == want
    cli("umount", str(mnt))
    done = cli("prefetch", "--insecure", "--cache-dir", str(cache), ref)
    assert done.stdout.count("verified and sealed") == 3
    registry.stop()
    try:
        cli("mount", "--offline", "--cache-dir", str(cache), ref, str(mnt))
        assert without_dir_counts(snapshot(mnt, with_mtime=False)) == want
        # Every layer is whole: a compressed one's share is its decompressed tar's,
        # which is what it is read from (its blob's own bytes are not kept).
        (listed,) = json.loads(cli("mounts", "--json").stdout)
        assert listed["cached"] == [1.0, 1.0, 1.0]
        cli("umount", str(mnt))
    finally:
        registry.start()


@pytest.mark.parametrize("opaque", ["mid", "top"])
def test_an_opaque_root_hides_every_layer_below(tmp_path, registry, run_dir, opaque):
    """A layer with ``.wh..wh..opq`` at its root, in the middle of three or on top: the
    mount shows that layer and those above it only, as extraction in order gives
    (overlayfs ignores an opaque root, so the layers below are left out of the stack;
    one layer left alone is stacked over an empty one), and umount leaves nothing
    mounted."""
    trees = {}
    for name, files in (
        ("base", {"etc/hidden": b"from the base\n", "keep-not": b"x\n"}),
        ("mid", {"etc/fresh": b"only this etc\n"}),
        ("top", {"top-file": b"from the top\n"}),
    ):
        if name == opaque:
            files = {**files, ".wh..wh..opq": b""}
        src = tmp_path / "src" / name
        for path, data in files.items():
            (src / path).parent.mkdir(parents=True, exist_ok=True)
            (src / path).write_bytes(data)
        trees[name] = make_tar(src, tmp_path / f"{name}.tar")
    kinds = ["tar", "gzip", "tar"]
    layers = [(k, trees[n].read_bytes()) for k, n in zip(kinds, trees, strict=True)]
    ref = skopeo_copy(make_layout(tmp_path / "layout", "v1", layers), "v1", registry.host, "o/opq")
    reference = tmp_path / "extracted"
    extract_in_order(list(trees.values()), reference)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cli("mount", "--insecure", "--cache-dir", str(tmp_path / "cache"), ref, str(mnt))
    try:
        assert sorted(os.listdir(mnt)) == (["etc", "top-file"] if opaque == "mid" else ["top-file"])
        want = without_dir_counts(snapshot(reference, with_mtime=False))
        assert without_dir_counts(snapshot(mnt, with_mtime=False)) == want
    finally:
        cli("umount", str(mnt))
    assert not [p for p in syscall.mounted() if p.startswith(str(run_dir))]


def root_links_aside(snap: tuple[dict, list]) -> tuple[dict, list]:
    """A snapshot but for the root's link count: a tar layer mounted alone is stacked over
    an empty layer, and overlayfs counts a directory merged from two as one link."""
    entries, links = snap
    root = entries["."]
    return {**entries, ".": (*root[:4], None, *root[5:])}, links


def test_mount_with_local_tarindex_and_zinfo(tmp_path, registry, run_dir):
    """``-o oci.layer=0,oci.tarindex=PATH,oci.zinfo=PATH`` mounts a gzip layer from a
    metadata image and SOCI zinfo given as files, with no index built: the tree is
    the source's, and the cache holds no index record of its own. A file that is not a
    metadata image is refused as a usage error that names it."""
    src = populate(tmp_path / "src")
    tar = make_tar(src, tmp_path / "layer.tar").read_bytes()
    ref = skopeo_copy(
        make_layout(tmp_path / "layout", "v1", [("gzip", tar)]), "v1", registry.host, "o/local"
    )
    blobs = {p.read_bytes()[:2]: p for p in (tmp_path / "layout/blobs/sha256").glob("*")}
    blob = blobs[b"\x1f\x8b"].read_bytes()  # the one gzip blob: the layer
    index = index_compressed_tar(io.BytesIO(blob), GZIP, blob_digest=None, diff_id=None)
    (tmp_path / "layer.meta").write_bytes(index.metadata)
    zinfo, _ = GzipIndexer(io.BytesIO(blob)).finish()
    (tmp_path / "layer.zinfo").write_bytes(zinfo.to_bytes())
    mnt, cache = tmp_path / "mnt", tmp_path / "cache"
    mnt.mkdir()
    options = (
        f"oci.layer=0,oci.tarindex={tmp_path / 'layer.meta'},oci.zinfo={tmp_path / 'layer.zinfo'}"
    )
    # A file that is no metadata image is a usage error naming it, before any mount.
    (tmp_path / "not.meta").write_text("root:x:0:0::/root:/bin/sh\n")
    wrong = options.replace("layer.meta", "not.meta")
    done = subprocess.run(
        [*BLOCKSTORE, "mount", "--insecure", "--cache-dir", str(cache), "-o", wrong, ref, str(mnt)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert f"--tarindex {tmp_path / 'not.meta'}: metadata image: " in done.stderr
    assert not syscall.is_mounted(str(mnt))
    cli("mount", "--insecure", "--cache-dir", str(cache), "-o", options, ref, str(mnt))
    assert root_links_aside(snapshot(mnt)) == root_links_aside(snapshot(src))
    cli("umount", str(mnt))


def test_a_lone_tar_layer_mounts_where_overlayfs_refuses_to_stack_it(
    tmp_path, registry, run_dir, monkeypatch
):
    """A one-layer tar image mounted with the run directory on an overlay stacked on an
    overlay (as in a container run inside another), where the kernel refuses one more
    overlay ("maximum fs stacking depth exceeded"). The layer must still mount, as it
    did before a lone tar layer went under overlayfs: its EROFS at the mount point,
    showing the layer's files, with a warning saying why; ``umount`` leaves nothing."""
    base = Path(tempfile.mkdtemp(prefix="bs-ovl-"))  # short: the server's socket is in it
    try:
        # Each a writable overlay over the one before: ``b`` is stacked two deep.
        for lower, top in (("lower", "a"), ("a", "b")):
            for name in (lower, top, f"{top}-up", f"{top}-work"):
                (base / name).mkdir(exist_ok=True)
            options = f"lowerdir={base}/{lower},upperdir={base}/{top}-up,workdir={base}/{top}-work"
            mount = ["mount", "-t", "overlay", "overlay", "-o", options, f"{base}/{top}"]
            subprocess.run(mount, check=True)  # read-write, as a run directory must be
        monkeypatch.setenv("BLOCKSTORE_RUN_DIR", f"{base}/b/run")
        src = populate(tmp_path / "src")
        tar = make_tar(src, tmp_path / "layer.tar").read_bytes()
        ref = push_tar_layer(registry, "o/deep", "v1", "tar", tar, tmp_path)
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        done = cli("mount", "--insecure", "--cache-dir", str(tmp_path / "cache"), ref, str(mnt))
        assert "overlayfs refused to stack the tar layer" in done.stderr
        assert (mnt / "etc" / "hostname").read_text() == "box\n"
        cli("umount", str(mnt))
        assert not [p for p in syscall.mounted() if p.startswith(f"{base}/b/run/")]
    finally:
        left = take_down_recorded()
        for point in sorted(syscall.mounted(), key=len, reverse=True):
            if point.startswith(f"{base}/"):
                syscall.umount(point, lazy=True)
        shutil.rmtree(base, ignore_errors=True)
    assert not left


def test_mounts_counts_a_compressed_layer_by_the_tar_it_is_read_from(tmp_path, registry, run_dir):
    """Mount a one-span tar.gz image whose index is attached, with no readahead, and read
    one file: that inflates and keeps the whole tar, while the blob's own bytes are
    inflated as they arrive and never kept. ``mounts`` must show the layer whole, as
    the cache holds what it is read from; it showed the blob's share (next to none).
    Asked right after the read, it needs no wait: with no readahead (nor fill) a span is
    stored before the read it was inflated for is answered; only the span pump's
    ``SpanWriter`` stores after it, and the pump runs only with readahead or fill."""
    src = populate(tmp_path / "src")
    tar = make_tar(src, tmp_path / "layer.tar").read_bytes()
    ref = push_tar_layer(registry, "o/counted", "v1", "gzip", tar, tmp_path)
    cli("index", "--push", "--insecure", "--cache-dir", str(tmp_path / "indexer"), ref)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cache = str(tmp_path / "cache")
    cli("mount", "--insecure", "--no-readahead", "--cache-dir", cache, ref, str(mnt))
    assert (mnt / "etc" / "hostname").read_text() == "box\n"
    (listed,) = json.loads(cli("mounts", "--json").stdout)
    assert listed["cached"] == [1.0]
    cli("umount", str(mnt))


def _mounted_whole_as_extracted(tmp_path, registry, name: str, layer_bytes: bytes) -> None:
    """``layer_bytes`` (of ``tmp_path / "layer.tar"``, gzipped) pushed as a tar.gz layer
    and mounted with no readahead: ``mount`` warns of nothing, ``mounts`` shows the
    layer whole (its tar kept from the indexing pass), and every file reads as
    extracted."""
    layer = tmp_path / "layer.tar.gz"
    layer.write_bytes(layer_bytes)
    client = registry.client()
    try:
        push_image(client, f"o/{name}", "v1", [layer], media_type=MEDIA_TYPES["gzip"])
    finally:
        client.close()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cache = str(tmp_path / "cache")
    ref = f"{registry.host}/o/{name}:v1"
    done = cli("mount", "--insecure", "--no-readahead", "--cache-dir", cache, ref, str(mnt))
    try:
        assert "warning" not in done.stderr
        (listed,) = json.loads(cli("mounts", "--json").stdout)
        assert listed["cached"] == [1.0]
        extracted = tmp_path / "extracted"
        extract_in_order([tmp_path / "layer.tar"], extracted)
        want = without_dir_counts(snapshot(extracted, with_mtime=False))
        assert without_dir_counts(snapshot(mnt, with_mtime=False)) == want
    finally:
        cli("umount", str(mnt))


def test_a_gzip_layer_of_two_members_keeps_the_tar_its_pass_made(tmp_path, registry, run_dir):
    """A tar.gz layer of two gzip members back to back (``cat a.gz b.gz``, valid gzip that
    ``gzip -d`` and Docker read whole), mounted with no readahead: every file reads as
    extracted, ``mount`` warns of nothing, and ``mounts`` shows the layer whole, its tar
    kept from the indexing pass. Before, the tar was sized from the gzip trailer, which
    gives the last member's size alone: the pass took the tar for 4 GiB longer, dropped
    all it had stored, and warned that "the gzip trailer said" a size it never said."""
    src = populate(tmp_path / "src")
    tar = make_tar(src, tmp_path / "layer.tar").read_bytes()
    members = gzip.compress(tar[:1_000_000], mtime=0) + gzip.compress(tar[1_000_000:])
    _mounted_whole_as_extracted(tmp_path, registry, "members", members)


def test_a_gzip_layer_ending_in_an_empty_member_keeps_the_tar_its_pass_made(
    tmp_path, registry, run_dir
):
    """A tar.gz layer of two gzip members and then an empty one carrying only an extra
    field, as eStargz ends with its footer, mounted with no readahead: every file reads
    as extracted, ``mount`` warns of nothing, and ``mounts`` shows the layer whole, its
    tar kept from the indexing pass. Before, the trailer's size of 0 (the empty member's)
    was taken for no size at all and the tar was not kept: every span was inflated again
    whenever it was read."""
    src = populate(tmp_path / "src")
    tar = make_tar(src, tmp_path / "layer.tar").read_bytes()
    extra = b"SG" + (22).to_bytes(2, "little") + b"%016x" % 1234 + b"STARGZ"
    head = b"\x1f\x8b\x08\x04" + bytes(5) + b"\xff"  # FEXTRA set
    # The extra field, then one empty final stored block, then a CRC and a size of 0.
    footer = head + len(extra).to_bytes(2, "little") + extra + b"\x01\x00\x00\xff\xff" + bytes(8)
    assert gzip.decompress(footer) == b""
    members = gzip.compress(tar[:1_000_000]) + gzip.compress(tar[1_000_000:]) + footer
    _mounted_whole_as_extracted(tmp_path, registry, "footer", members)


def test_unmountable_layers_are_refused_in_one_line(tmp_path, registry, run_dir):
    """A gzip layer that is not a tar, and one holding a GNU sparse file, make ``mount``
    fail with one line naming the reason (the entry, for the sparse file), no
    traceback, and nothing mounted."""
    (tmp_path / "junk.gz").write_bytes(gzip.compress(b"not a tar at all" * 1000))
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "holes", "wb") as fh:
        fh.seek(10 << 20)
        fh.write(b"x")
    sparse = tmp_path / "sparse.tar.gz"
    subprocess.run(["tar", "--sparse", "-czf", str(sparse), "-C", str(src), "."], check=True)
    client = registry.client()
    try:
        for name in ("junk", "sparse"):
            path = tmp_path / ("junk.gz" if name == "junk" else "sparse.tar.gz")
            push_image(client, "o/bad", name, [path], media_type=MEDIA_TYPES["gzip"])
    finally:
        client.close()
    for name, reason in (("junk", "not a readable tar"), ("sparse", "'./holes': GNU sparse")):
        stderr = _mount_fails(tmp_path, f"{registry.host}/o/bad:{name}")
        assert reason in stderr and "Traceback" not in stderr
        assert len(stderr.strip().splitlines()) == 1


def _mount_fails(tmp_path: Path, ref: str) -> str:
    """``mount`` of ``ref``, which must fail with nothing mounted: its stderr."""
    mnt = tmp_path / "mnt"
    mnt.mkdir(exist_ok=True)
    done = subprocess.run(
        [*BLOCKSTORE, "mount", "--insecure", "--cache-dir", str(tmp_path / "c"), ref, str(mnt)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    assert not syscall.is_mounted(str(mnt))
    return done.stderr


@pytest.mark.parametrize(("key", "value"), [("uid", "1e3"), ("gid", "12abc"), ("size", "5x")])
def test_a_pax_number_that_is_not_one_is_refused_naming_the_entry(
    tmp_path, registry, run_dir, key, value
):
    """A tar layer whose file ``f`` has a PAX uid, gid or size record that is no number
    (GNU tar refuses each as a "malformed extended header", Go's reader, Docker's, as a
    bad header): ``mount`` fails with one line naming the entry, the record and its
    value, and mounts nothing. Before, Python's tarfile took such a uid or gid for 0,
    and the file was mounted as root's; such a size was taken for 0, the file's bytes
    then read as the next header."""
    info = tarfile.TarInfo("f")
    info.size, info.uid, info.gid = 5, 1000, 1000
    info.pax_headers = {key: value}
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        archive.addfile(info, io.BytesIO(b"data\n"))
    ref = push_tar_layer(registry, f"o/pax-{key}", "v1", "tar", buffer.getvalue(), tmp_path)
    stderr = _mount_fails(tmp_path, ref)
    assert f"tar entry 'f': PAX {key} {value!r} is not a number" in stderr
    assert len(stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("kind", ["tar", "gzip"])
def test_gnu_sparse_records_that_are_no_numbers_are_refused_as_damage(
    tmp_path, registry, run_dir, kind
):
    """A tar or gzip layer whose PAX header holds ``GNU.sparse.size=abc``: ``mount`` fails
    with one line saying the tar header at byte 0 has sparse records that do not parse,
    and mounts nothing. Before, the line was Python's own ValueError, ``invalid literal
    for int() with base 10: 'abc'``, naming neither the layer's tar nor where in it."""
    info = tarfile.TarInfo("f")
    info.size = 5
    info.pax_headers = {"GNU.sparse.size": "abc"}
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        archive.addfile(info, io.BytesIO(b"data\n"))
    ref = push_tar_layer(registry, f"o/sparse-{kind}", "v1", kind, buffer.getvalue(), tmp_path)
    stderr = _mount_fails(tmp_path, ref)
    assert "the tar header at byte 0 has GNU sparse records that do not parse" in stderr
    assert "int()" not in stderr and len(stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("kind", ["tar", "gzip"])
def test_a_long_run_of_extended_headers_is_refused_as_damage(tmp_path, registry, run_dir, kind):
    """A tar or gzip layer of 1,000 PAX extended headers in a row before its one file
    (each a ``comment`` record: 1 MB of tar, 2 KB of gzip): ``mount`` fails with one
    line naming the byte of a header in the run, and mounts nothing. Before, Python's
    tarfile read each header within the one before, past Python's recursion limit,
    and the line was ``maximum recursion depth exceeded``."""
    info = tarfile.TarInfo("f")
    info.pax_headers = {"comment": "x"}
    member = info.tobuf(format=tarfile.PAX_FORMAT)
    extended = member[: 2 * tarfile.BLOCKSIZE]  # the extended header and its record
    tar = extended * 1000 + member + bytes(2 * tarfile.BLOCKSIZE)
    ref = push_tar_layer(registry, f"o/pax-run-{kind}", "v1", kind, tar, tmp_path)
    stderr = _mount_fails(tmp_path, ref)
    assert "follows more extended headers in a row than can be read" in stderr
    assert "recursion" not in stderr and len(stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("kind", ["gzip", "zstd"])
def test_a_plain_tar_under_a_compressed_media_type_is_called_so(tmp_path, registry, run_dir, kind):
    """An image whose one layer is a plain tar, its manifest giving it the tar+gzip or
    tar+zstd media type (as image tools have been seen to label an uncompressed layer):
    ``mount`` fails with one line saying the blob is not the gzip or zstd stream its
    media type says, with the bytes it starts with; nothing mounted. Before, the line
    called the blob a corrupt stream ("incorrect header check", or "not a zstd frame
    where one must start"), as if its bytes had been damaged."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "hello").write_text("hello\n")
    tar = make_tar(src, tmp_path / "layer.tar").read_bytes()
    ref = push_tar_layer(registry, f"o/label-{kind}", "tar", "tar", tar, tmp_path)
    client = registry.client()
    try:
        manifest = json.loads(client.get_manifest(f"o/label-{kind}", "tar").raw)
        manifest["layers"][0]["mediaType"] = MEDIA_TYPES[kind]
        raw = json.dumps(manifest).encode()
        client.put_manifest(f"o/label-{kind}", kind, raw, manifest["mediaType"])
    finally:
        client.close()
    stderr = _mount_fails(tmp_path, ref[: -len("tar")] + kind)
    assert f"not a {kind} stream, as the layer's media type says" in stderr
    assert "corrupt" not in stderr and len(stderr.strip().splitlines()) == 1


def _with_its_layer_replaced(registry, tmp_path: Path, tar: bytes, blob: bytes) -> str:
    """A one-layer zstd image of ``tar`` whose layer is then replaced by ``blob`` (push
    refuses a blob that does not decompress); the image's reference."""
    ref = push_tar_layer(registry, "o/replaced", "v1", "zstd", tar, tmp_path)
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    client = registry.client()
    try:
        client.upload_blob("o/replaced", digest, blob)
        manifest = json.loads(client.get_manifest("o/replaced", "v1").raw)
        manifest["layers"][0].update(digest=digest, size=len(blob))
        raw = json.dumps(manifest).encode()
        client.put_manifest("o/replaced", "v1", raw, manifest["mediaType"])
    finally:
        client.close()
    return ref


def _zstd_needing_a_dictionary(tar: bytes) -> bytes:
    """``tar`` compressed with a dictionary trained on its own bytes: each frame header
    names the dictionary's id, which nothing in an image carries."""
    samples = [tar[i : i + 1024] for i in range(0, len(tar), 1024)]
    dictionary = zstandard.train_dictionary(4096, samples)
    return zstandard.ZstdCompressor(dict_data=dictionary).compress(tar)


def _zstd_of_a_2_gib_window(tar: bytes) -> bytes:
    """``tar`` compressed as ``zstd --long=31`` writes a stream: a frame header asking
    for a 2 GiB window, which zstd refuses to decode unless told it may."""
    return subprocess.run(
        ["zstd", "-q", "-c", "--long=31"], input=tar, capture_output=True, check=True
    ).stdout


@pytest.mark.parametrize(
    ("make_blob", "cause"),
    [
        (_zstd_needing_a_dictionary, "needs zstd dictionary"),
        (_zstd_of_a_2_gib_window, "needs a window of 2048 MiB, more than the 128 MiB"),
    ],
)
def test_a_zstd_frame_asking_for_what_cannot_be_given_is_said_so(
    tmp_path, registry, run_dir, make_blob, cause
):
    """Tried: a zstd layer whose frame header names a dictionary (an image carries none),
    and one whose header asks for a 2 GiB window (``zstd --long=31``; zstd decodes
    windows up to 128 MiB unless told otherwise). ``mount`` fails with one line naming
    the layer and what the frame asks for; nothing mounted. Before, the line called the
    layer a corrupt stream ("Dictionary mismatch", "Frame requires too much memory"),
    as if its bytes had been damaged."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "os.py").write_bytes(Path(os.__file__).read_bytes())
    tar = make_tar(src, tmp_path / "layer.tar").read_bytes()
    blob = make_blob(tar)
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    stderr = _mount_fails(tmp_path, _with_its_layer_replaced(registry, tmp_path, tar, blob))
    assert cause in stderr and digest[:19] in stderr
    assert "corrupt" not in stderr and len(stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("trailer", [b"trailing bytes!", b"abc"], ids=["15-bytes", "3-bytes"])
def test_bytes_after_the_last_zstd_frame_are_called_so(tmp_path, registry, run_dir, trailer):
    """Tried: a zstd layer whose stream goes on after its last frame with bytes that start
    no frame (15 of them, and 3: fewer than a frame header), as a copy appended to, or a
    tool padding its output, leaves it. ``zstd -d`` refuses it too. ``mount`` fails with
    one line naming the layer, the byte where the trailing bytes start and that they start
    no frame; nothing mounted. Before, the line said "not a zstd frame where one must
    start", naming no place, or, for 3 bytes, that the stream ended inside a frame header,
    as if it had been cut short."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "hello").write_text("hello\n")
    tar = make_tar(src, tmp_path / "layer.tar").read_bytes()
    frames = compress("zstd", tar)
    ref = _with_its_layer_replaced(registry, tmp_path, tar, frames + trailer)
    stderr = _mount_fails(tmp_path, ref)
    assert f"at byte {len(frames)} the zstd stream goes on with bytes that start no frame" in stderr
    assert len(stderr.strip().splitlines()) == 1


def test_a_file_under_1500_nested_directories_mounts(tmp_path, registry, run_dir):
    """A gzip layer whose one file lies under 1,500 nested directories (``a/a/.../f``,
    3 KB: within PATH_MAX, and ``tar -x`` extracts it): ``mount`` shows the file. Before,
    building the layer's tree recursed once per level, past Python's limit, and the
    mount failed with a RecursionError."""
    name = "a/" * 1500 + "f"
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        info = tarfile.TarInfo(name)
        info.size = 5
        archive.addfile(info, io.BytesIO(b"deep\n"))
    ref = push_tar_layer(registry, "o/deep", "v1", "gzip", buffer.getvalue(), tmp_path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cli("mount", "--insecure", "--cache-dir", str(tmp_path / "cache"), ref, str(mnt))
    try:
        assert (mnt / name).read_bytes() == b"deep\n"
    finally:
        cli("umount", str(mnt))


def test_a_file_under_5000_nested_directories_is_refused_for_its_depth_alone(
    tmp_path, registry, run_dir
):
    """A gzip layer whose one file lies under 5,000 nested directories (``a/a/.../f``, 10 KB,
    past PATH_MAX: ``tar -x`` fails on it) and holds no symlink: ``mount`` fails with
    one line saying the path walks more than 4096 names, and nothing mounted. Before,
    the line said it walked them "through symlinks", sending the user to look for
    symlinks the layer does not have."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        info = tarfile.TarInfo("a/" * 5000 + "f")
        info.size = 5
        archive.addfile(info, io.BytesIO(b"deep\n"))
    ref = push_tar_layer(registry, "o/deeper", "v1", "gzip", buffer.getvalue(), tmp_path)
    stderr = _mount_fails(tmp_path, ref)
    assert "its path walks more than 4096 names" in stderr, stderr
    assert "symlink" not in stderr and len(stderr.strip().splitlines()) == 1, stderr


def _entries_only(path: Path, entries: list[tuple[str, bytes, int, int]]) -> Path:
    """A tar of ``(name, kind, mode, uid)`` entries alone, with no entry for the root or
    any parent directory, as hand-made layers and some image builders write them."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as archive:
        for name, kind, mode, uid in entries:
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.uid, info.gid = kind, mode, uid, uid
            archive.addfile(info, io.BytesIO(b"") if kind == tarfile.REGTYPE else None)
    return path


def test_directories_a_layer_only_implies_keep_the_lower_attributes(tmp_path, registry, run_dir):
    """A layer with ``tmp/x`` and ``home/u/.profile`` but no entry for the root, ``tmp``,
    ``home`` or ``home/u``, over a base where ``tmp`` is 1777 and ``home/u`` 0700 of
    user 1000 with an xattr: ``mount`` shows them as extracting the layers in order
    leaves them (tar keeps the directories it finds), and so for a directory the layer
    makes opaque without an entry of its own; one it whites out and makes again, or
    makes anew, is 0755 of root. Before, overlayfs showed each implied directory's
    0755 of root: /tmp no longer writable by all, a home opened to every user."""
    base = tmp_path / "base"
    for name, mode, owner in (("tmp", 0o1777, 0), ("home/u", 0o700, 1000), ("opt", 0o750, 0)):
        (base / name).mkdir(parents=True)
        os.chmod(base / name, mode)
        os.chown(base / name, owner, owner)
        (base / name / "old").write_text("from the base\n")
    (base / "srv").mkdir(mode=0o700)
    os.setxattr(base / "home/u", "user.kept", b"on the lower home")
    reg, opaque = tarfile.REGTYPE, ".wh..wh..opq"
    upper = _entries_only(
        tmp_path / "upper.tar",
        [
            ("tmp/x", reg, 0o644, 0),
            ("home/u/.profile", reg, 0o600, 1000),
            (f"opt/{opaque}", reg, 0o644, 0),
            ("opt/new", reg, 0o644, 0),
            ("srv/.wh..wh..opq", reg, 0o644, 0),
            (".wh.srv", reg, 0o644, 0),
            ("srv/again", reg, 0o644, 0),
            ("var/new/file", reg, 0o644, 0),
        ],
    )
    tars = [make_tar(base, tmp_path / "base.tar"), upper]
    layers = [("tar", tars[0].read_bytes()), ("gzip", upper.read_bytes())]
    ref = skopeo_copy(make_layout(tmp_path / "layout", "v1", layers), "v1", registry.host, "o/imp")
    reference = tmp_path / "extracted"
    extract_in_order(tars, reference)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cli("mount", "--insecure", "--cache-dir", str(tmp_path / "cache"), ref, str(mnt))
    try:
        want = without_dir_counts(snapshot(reference, with_mtime=False))
        assert without_dir_counts(snapshot(mnt, with_mtime=False)) == want
        assert stat.S_IMODE(os.stat(mnt / "tmp").st_mode) == 0o1777
        assert os.stat(mnt / "home/u").st_uid == 1000
    finally:
        cli("umount", str(mnt))


def test_an_implied_directory_takes_no_attributes_from_outside_the_image(
    tmp_path, registry, run_dir
):
    """A base layer with ``hostdir`` a symlink to a directory of the machine that mounts
    it, under an upper layer holding ``hostdir/sub/x`` alone (``hostdir`` and
    ``hostdir/sub`` implied): the mount shows ``hostdir/sub`` as the layer makes it,
    0755 of root with no xattr, for no layer below has such a directory. Before, the
    search for the lower directory went through the symlink and gave the mount the
    machine's directory's mode, owner and xattrs."""
    host = tmp_path / "host"
    (host / "sub").mkdir(parents=True)
    os.chmod(host / "sub", 0o711)
    os.chown(host / "sub", 4242, 4242)
    os.setxattr(host / "sub", "user.secret", b"of the machine")
    base = tmp_path / "base.tar"
    with tarfile.open(base, "w", format=tarfile.PAX_FORMAT) as archive:
        link = tarfile.TarInfo("hostdir")
        link.type, link.linkname = tarfile.SYMTYPE, str(host)
        archive.addfile(link)
    upper = _entries_only(tmp_path / "upper.tar", [("hostdir/sub/x", tarfile.REGTYPE, 0o644, 0)])
    layers = [("tar", base.read_bytes()), ("gzip", upper.read_bytes())]
    ref = skopeo_copy(make_layout(tmp_path / "layout", "v1", layers), "v1", registry.host, "o/out")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cli("mount", "--insecure", "--cache-dir", str(tmp_path / "cache"), ref, str(mnt))
    try:
        st = os.lstat(mnt / "hostdir/sub")
        assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o755, 0)
        assert "user.secret" not in os.listxattr(mnt / "hostdir/sub")
    finally:
        cli("umount", str(mnt))


def _tar_of_entries(path: Path, entries: list[tuple[str, bytes, str | bytes]]) -> Path:
    """A tar of ``(name, kind, contents or hard-link target)`` entries, in that order."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as archive:
        for name, kind, what in entries:
            info = tarfile.TarInfo(name)
            info.type, info.mtime = kind, 1_700_000_000
            info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
            if kind == tarfile.LNKTYPE:
                info.linkname = str(what)
                archive.addfile(info)
            else:
                data = bytes(what) if kind == tarfile.REGTYPE else b""
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data) if data else None)
    return path


def test_aufs_metadata_in_an_old_docker_layer_is_no_part_of_the_tree(tmp_path, registry, run_dir):
    """A layer as Docker's aufs driver wrote them, over a base: ``.wh..wh.aufs``,
    ``.wh..wh.orph/`` and ``.wh..wh.plnk/`` at its root, a file kept in ``.wh..wh.plnk``
    and two hard links to it in ``usr/bin``. The mount shows what Docker and podman
    extract: no ``.wh..wh.*`` name anywhere, the two links one file with the kept file's
    bytes, as the same layer written without AUFS's files gives. Before, the
    ``.wh..wh.plnk`` directory and its file showed at the image's root, the file with
    a third link."""
    reg, dirtype, link = tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.LNKTYPE
    base = _tar_of_entries(tmp_path / "base.tar", [("usr/bin/sh", reg, b"#!sh\n")])
    aufs = _tar_of_entries(
        tmp_path / "aufs.tar",
        [
            (".wh..wh.aufs", reg, b""),
            (".wh..wh.orph", dirtype, b""),
            (".wh..wh.plnk", dirtype, b""),
            (".wh..wh.plnk/262.1183", reg, b"linked across branches\n"),
            ("usr/bin/a", link, ".wh..wh.plnk/262.1183"),
            ("usr/bin/b", link, ".wh..wh.plnk/262.1183"),
        ],
    )
    plain = _tar_of_entries(
        tmp_path / "plain.tar",
        [("usr/bin/a", reg, b"linked across branches\n"), ("usr/bin/b", link, "usr/bin/a")],
    )
    layers = [("tar", base.read_bytes()), ("gzip", aufs.read_bytes())]
    ref = skopeo_copy(make_layout(tmp_path / "layout", "v1", layers), "v1", registry.host, "o/aufs")
    reference = tmp_path / "extracted"
    extract_in_order([base, plain], reference)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cli("mount", "--insecure", "--cache-dir", str(tmp_path / "cache"), ref, str(mnt))
    try:
        assert sorted(os.listdir(mnt)) == ["usr"]
        want = without_dir_counts(snapshot(reference, with_mtime=False))
        assert without_dir_counts(snapshot(mnt, with_mtime=False)) == want
    finally:
        cli("umount", str(mnt))


def test_a_whiteout_of_a_255_byte_name_hides_it(tmp_path, registry, run_dir):
    """A base layer with a file named by 255 bytes at its root and in ``dir``, and a layer
    over it whiting both out, as Docker and containerd write it: ``.wh.`` before the
    name, 259 bytes in all. The mount shows what extraction in order leaves: neither
    file, ``dir`` empty, ``keep`` kept. Before, the whiteout's name was refused as
    longer than 255 bytes, and the image with it."""
    name = "n" * 255
    reg = tarfile.REGTYPE
    base = _tar_of_entries(
        tmp_path / "base.tar",
        [(name, reg, b"hidden\n"), ("keep", reg, b"kept\n"), (f"dir/{name}", reg, b"hidden\n")],
    )
    upper = _tar_of_entries(
        tmp_path / "upper.tar", [(f".wh.{name}", reg, b""), (f"dir/.wh.{name}", reg, b"")]
    )
    layers = [("tar", base.read_bytes()), ("gzip", upper.read_bytes())]
    ref = skopeo_copy(make_layout(tmp_path / "layout", "v1", layers), "v1", registry.host, "o/whl")
    reference = tmp_path / "extracted"
    extract_in_order([base, upper], reference)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cli("mount", "--insecure", "--cache-dir", str(tmp_path / "cache"), ref, str(mnt))
    try:
        assert sorted(os.listdir(mnt)) == ["dir", "keep"]
        assert os.listdir(mnt / "dir") == []
        want = without_dir_counts(snapshot(reference, with_mtime=False))
        assert without_dir_counts(snapshot(mnt, with_mtime=False)) == want
    finally:
        cli("umount", str(mnt))


def test_a_platform_mounted_after_another_of_the_same_index_is_stacked_as_its_own_layers(
    tmp_path, registry, run_dir
):
    """An index whose linux/amd64 image is one EROFS layer and whose linux/arm64/v8 image
    is one gzip tar layer holding a whiteout, mounted with ``--platform linux/amd64``,
    then with ``--platform linux/arm64`` from the same cache: the second mount shows
    the tar layer as a tar layer is shown, under an overlay that hides its whiteout.
    Before, the mount took the layers of the first platform's record from the cache,
    found no tar layer among them, and mounted the tar layer's EROFS bare: the whiteout
    showed as a character device."""
    src = tmp_path / "amd"
    src.mkdir()
    (src / "amd-file").write_text("amd64\n")
    erofs = tmp_path / "amd.erofs"
    subprocess.run(["mkfs.erofs", str(erofs), str(src)], check=True, capture_output=True)
    arm = _tar_of_entries(
        tmp_path / "arm.tar",
        [("kept", tarfile.REGTYPE, b"arm64\n"), (".wh.gone", tarfile.REGTYPE, b"")],
    )
    gz = tmp_path / "arm.tar.gz"
    gz.write_bytes(gzip.compress(arm.read_bytes(), mtime=0))
    client = registry.client()
    try:
        push_image(client, "o/two-kinds", "v1", [erofs], platform="linux/amd64", add_to_index=True)
        push_image(
            client,
            "o/two-kinds",
            "v1",
            [gz],
            platform="linux/arm64/v8",
            add_to_index=True,
            media_type=MEDIA_TYPES["gzip"],
        )
    finally:
        client.close()
    ref = f"{registry.host}/o/two-kinds:v1"
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cache = ["--insecure", "--cache-dir", str(tmp_path / "cache")]
    cli("mount", *cache, "--platform", "linux/amd64", ref, str(mnt))
    assert os.listdir(mnt) == ["amd-file"]
    cli("umount", str(mnt))
    cli("mount", *cache, "--platform", "linux/arm64", ref, str(mnt))
    try:
        assert os.listdir(mnt) == ["kept"]
        assert syscall.mounted()[str(mnt)][0] == "overlay"
    finally:
        cli("umount", str(mnt))


def test_mounts_cannot_say_how_much_of_a_compressed_layer_with_no_kept_index_is_cached(
    tmp_path,
):
    """A gzip layer mounted with a local index (``--tarindex``) has no index in the
    cache to name the tar it is read from: ``mounts`` must say it cannot tell (None,
    shown "?"), not that nothing of it is cached, while an EROFS layer beside it shows
    its share."""
    from blockstore.cache import ChunkStore
    from blockstore.cli.mount_listing import cached_fractions
    from nbdfront.mount.records import MountRecord

    cache = tmp_path / "cache"
    ChunkStore(cache).close()
    layers = [
        {"index": 0, "digest": "sha256:" + "1" * 64, "size": 10, "mediaType": MEDIA_TYPES["gzip"]},
        {
            "index": 1,
            "digest": "sha256:" + "2" * 64,
            "size": 10,
            "mediaType": "application/vnd.erofs.layer.v1",
        },
    ]
    record = MountRecord(
        "/mnt/x",
        "img",
        "nbdfuse",
        "/state",
        "/log",
        info={"cache_dir": str(cache), "layers": layers},
    )
    assert cached_fractions(record) == [None, 0.0]


def test_cache_ls_names_the_layer_a_tar_was_inflated_from(tmp_path, registry):
    """Tried: a one-layer tar.gz image prefetched, then ``cache ls`` and ``cache ls
    --json``. Must hold: of the two blobs, the tar (whose digest, the diff_id, no
    ``inspect`` lists) is shown as the tar of the layer, by the layer's digest; the
    layer itself is not marked. Before, the tar was one more unknown digest."""
    tar = make_tar(populate(tmp_path / "src"), tmp_path / "layer.tar").read_bytes()
    ref = push_tar_layer(registry, "o/ls", "v1", "gzip", tar, tmp_path)
    cache = str(tmp_path / "cache")
    cli("-q", "prefetch", "--insecure", "--cache-dir", cache, ref)
    (layer,) = json.loads(cli("inspect", "--insecure", "--json", ref).stdout)["layers"]
    tar_digest = "sha256:" + hashlib.sha256(tar).hexdigest()

    rows = {
        row["digest"]: row
        for row in json.loads(cli("cache", "ls", "--json", "--cache-dir", cache).stdout)
    }
    assert rows.keys() == {layer["digest"], tar_digest}
    assert rows[tar_digest]["tar_of"] == layer["digest"]
    assert rows[layer["digest"]]["tar_of"] is None
    lines = cli("cache", "ls", "--cache-dir", cache).stdout.splitlines()
    (tar_line,) = [line for line in lines if line.startswith(tar_digest)]
    assert tar_line.endswith(f"  (the tar of layer {layer['digest'][:19]}...)"), tar_line
    (layer_line,) = [line for line in lines if line.startswith(layer["digest"])]
    assert "the tar of" not in layer_line


def test_cache_rm_of_a_prefetched_tar_gz_image_takes_its_record_and_its_tar(tmp_path, registry):
    """Tried: a one-layer tar.gz image prefetched (the cache then holds its record, kept
    under this host's platform while the record says none, and the tar its pass
    inflated), then ``cache rm IMAGE``, twice. Must hold: the first removes the layer
    and the tar and leaves no blob; the second finds no such image (exit 3); serving it
    offline then says it is not in this cache (exit 9). Before, the record stayed, so
    the second rm said "nothing to remove", the tar stayed, and the image still mounted
    offline from it."""
    tar = make_tar(populate(tmp_path / "src"), tmp_path / "layer.tar").read_bytes()
    ref = push_tar_layer(registry, "o/rm", "v1", "gzip", tar, tmp_path)
    cache = str(tmp_path / "cache")
    cli("-q", "prefetch", "--insecure", "--cache-dir", cache, ref)
    assert len(json.loads(cli("cache", "ls", "--json", "--cache-dir", cache).stdout)) == 2

    removed = cli("cache", "rm", ref, "--cache-dir", cache)
    assert removed.stdout.count("removed sha256:") == 2, removed.stdout
    assert json.loads(cli("cache", "ls", "--json", "--cache-dir", cache).stdout) == []
    again = subprocess.run(
        [*BLOCKSTORE, "cache", "rm", ref, "--cache-dir", cache], capture_output=True, text=True
    )
    assert again.returncode == 3 and "no image" in again.stderr, again.stderr
    serve = subprocess.run(
        [*BLOCKSTORE, "serve", ref, "--offline", "--cache-dir", cache, "--listen", "127.0.0.1:0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert serve.returncode == 9, serve.stderr


def setuid_root_id_tar() -> bytes:
    """A tar of ``id``, setuid root (what a hostile image would hold as a root shell)."""
    path, out = shutil.which("id"), io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        member = tar.gettarinfo(path, "id")
        member.mode, member.uid, member.gid, member.uname, member.gname = 0o4755, 0, 0, "", ""
        with open(path, "rb") as binary:
            tar.addfile(member, binary)
    return out.getvalue()


def test_a_setuid_binary_of_the_image_gives_other_users_nothing(tmp_path, registry, run_dir):
    """Tried: an image holding ``id`` setuid root, mounted where every user may reach it,
    run by user nobody; then mounted again with ``-o suid``. Must hold: nobody's ``id``
    runs as nobody (the mount is nosuid and nodev, as mount(8) makes a user's mounts);
    with ``-o suid`` asked for, as root, it runs as root. Before, every mount honoured
    the image's setuid bits and device files: any local user who could reach the mount
    point ran what the image held as root."""
    if subprocess.run(["runuser", "-u", "nobody", "--", "true"]).returncode != 0:
        pytest.skip("cannot run as user nobody")
    ref = push_tar_layer(registry, "o/setuid", "v1", "gzip", setuid_root_id_tar(), tmp_path)
    base = Path(tempfile.mkdtemp(prefix="bs-setuid-"))
    try:
        base.chmod(0o755)
        mnt = base / "mnt"
        mnt.mkdir()
        cache = ["--insecure", "--cache-dir", str(tmp_path / "cache")]
        for options, euid in ([], "65534"), (["-o", "suid"], "0"):
            cli("mount", *cache, *options, ref, str(mnt))
            try:
                ran = ["runuser", "-u", "nobody", "--", str(mnt / "id"), "-u"]
                assert subprocess.run(ran, capture_output=True, text=True).stdout == f"{euid}\n"
            finally:
                cli("umount", str(mnt))
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_noexec_as_mount8_spells_it_keeps_the_images_programs_from_running(
    tmp_path, registry, run_dir
):
    """Tried: an image holding ``id``, mounted with ``-o ro,nosuid,nodev,noexec`` (what
    mount(8) and fstab lines say), then with ``-o exec``. Must hold: with ``noexec`` the
    mount is made and running its ``id`` is refused (EACCES); with ``exec``, the last
    one given winning, it runs. Before, ``noexec`` and ``exec`` were
    refused as unknown mount options and nothing was mounted."""
    ref = push_tar_layer(registry, "o/noexec", "v1", "gzip", setuid_root_id_tar(), tmp_path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cache = ["--insecure", "--cache-dir", str(tmp_path / "cache")]
    for option, runs in ("ro,nosuid,nodev,noexec", False), ("noexec,exec", True):
        cli("mount", *cache, "-o", option, ref, str(mnt))
        try:
            ran = subprocess.run([str(mnt / "id"), "-u"], capture_output=True, text=True)
            assert ran.stdout == "0\n"
        except PermissionError:
            assert not runs
        else:
            assert runs
        finally:
            cli("umount", str(mnt))


@pytest.mark.parametrize("kind", ["tar", "gzip"])
def test_a_damaged_first_chunk_of_the_tar_costs_only_the_file_it_holds(
    tmp_path, registry, run_dir, kind
):
    """Tried: a layer prefetched (sealed), then the first 4 KiB of its tar damaged in the
    cache, the image mounted offline. Must hold: the tree lists whole and every
    file whose bytes lie elsewhere reads right; only the file in that chunk is EIO.
    Before, the metadata image ended mid-page, so the kernel's 4 KiB page reads of its
    last inodes took in the tar's first bytes: the damaged chunk made the metadata
    unreadable, and the mount failed (an evicted chunk did the same)."""
    far = os.urandom(100_000)
    tar = tar_of({"first": os.urandom(40_000), "far": far})
    ref = push_tar_layer(registry, "o/first-chunk", kind, kind, tar, tmp_path)
    cache, mnt = tmp_path / "cache", tmp_path / "mnt"
    mnt.mkdir()
    cli("prefetch", "--insecure", "--cache-dir", str(cache), ref)
    blob = "sha256:" + hashlib.sha256(tar if kind == "tar" else compress(kind, tar)).hexdigest()
    diff_id = "sha256:" + hashlib.sha256(tar).hexdigest()
    store = ChunkStore(cache)
    try:
        # In the tar's first 4 KiB: the header of "first", in the page the metadata ends in.
        assert flip_stored_byte(store, blob if kind == "tar" else diff_id, 0, 1000)
    finally:
        store.close()

    cli("mount", "--offline", "--cache-dir", str(cache), ref, str(mnt))
    try:
        assert sorted(os.listdir(mnt)) == ["far", "first"]
        assert (mnt / "far").read_bytes() == far
        with pytest.raises(OSError) as failed:
            (mnt / "first").read_bytes()
        assert failed.value.errno == errno.EIO
    finally:
        cli("umount", str(mnt))


def _many_directories(root: Path) -> dict[str, bytes]:
    """A tree whose listing reads its metadata image to the end: 40 directories of 25
    files (8 MiB of random bytes in all) and 25 symlinks each; its files by path."""
    rnd = random.Random(7)
    files = {}
    for d in range(40):
        inner = root / f"d{d:02}" / "inner"
        inner.mkdir(parents=True)
        for f in range(25):
            files[f"d{d:02}/inner/f{f:02}"] = data = rnd.randbytes(rnd.randint(1, 16_000))
            (inner / f"f{f:02}").write_bytes(data)
            (root / f"d{d:02}" / f"s{f:02}").symlink_to(f"inner/f{f:02}")
    return files


@pytest.mark.parametrize("kind", ["gzip", "zstd", "tar"])
def test_a_first_listing_of_a_tar_layer_fetches_none_of_its_blob(
    tmp_path, registry, run_dir, fault_proxy, kind
):
    """Tried: a tar.gz (a tar+zstd of 1 MiB frames, a plain tar) layer of 2,080 entries,
    its index pushed, mounted with ``--no-readahead`` on an empty cache through a
    recording proxy; every entry walked and lstat'ed, then one file read. Must hold: the
    mount and the listing fetch no byte of the layer's blob, so inflate no span; the file
    then reads right. Before, the kernel's readahead of the FUSE file (two windows of 128
    KiB past the last directory block the listing read) reached past the metadata image
    into the tar: its first span (4 MiB of tar, 3 MB of blob) was fetched and inflated
    for a listing, and 96 KiB of a plain tar's blob fetched."""
    src = tmp_path / "src"
    src.mkdir()
    files = _many_directories(src)
    tar = make_tar(src, tmp_path / "layer.tar").read_bytes()
    blob = zstd_frames(tar) if kind == "zstd" else compress(kind, tar)
    (tmp_path / "layer").write_bytes(blob)
    client = registry.client()
    try:
        push_image(client, "o/listing", kind, [tmp_path / "layer"], media_type=MEDIA_TYPES[kind])
    finally:
        client.close()
    ref = f"{registry.host}/o/listing:{kind}"
    cli("index", "--push", "--insecure", "--cache-dir", str(tmp_path / "indexer"), ref)
    proxy = fault_proxy(registry)
    via_proxy = ref.replace(registry.host, proxy.host)
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cache = str(tmp_path / "cache")
    cli("mount", "--insecure", "--no-readahead", "--cache-dir", cache, via_proxy, str(mnt))
    try:
        listed = [
            os.lstat(Path(top) / name) for top, dirs, names in os.walk(mnt) for name in dirs + names
        ]
        assert len(listed) == 40 * 52
        assert fetched_from(proxy, digest, len(blob)) == 0
        assert (mnt / "d39" / "s24").read_bytes() == files["d39/inner/f24"]
        assert 0 < fetched_from(proxy, digest, len(blob)) < len(blob)
    finally:
        cli("umount", str(mnt))
