"""The EROFS directory walk: every directory of a real image, no file's data, find's order."""

from __future__ import annotations

import hashlib
import os
import subprocess
import threading
import time

from fetch_sources import PieceSource
from hypothesis import given, settings
from hypothesis import strategies as st
from rig.images import FIXED_UUID
from rig.small_disk import small_disk
from rig.stored_chunks import zero_tree_pages
from rig.waiting import wait_for

from blockstore.cache import CHUNK_SIZE, CachedBlob, ChunkStore
from blockstore.prefetch import PrefetchSettings, erofs, erofs_tree


def build_tree(root) -> int:
    """Nested directories, one large enough for several blocks, one owned by a uid that
    needs an extended inode, files in most; the number of directories, root included."""
    count = 1
    for top in range(6):
        for sub in range(4):
            path = root / f"d{top}" / f"s{sub}" / "deep"
            path.mkdir(parents=True)
            (path / "file.txt").write_bytes(os.urandom(5000))
            count += 1 if sub else 2  # d{top} once, and s{sub} and deep below
            count += 1
    big = root / "big"
    big.mkdir()
    count += 1
    for i in range(600):  # ~600 entries: several directory blocks, not inline
        (big / f"entry-with-a-long-name-{i:04d}").mkdir()
        count += 1
    for i in range(8):  # file data in chunks of their own, which the walk leaves alone
        (root / f"d{i % 6}" / f"large{i}.bin").write_bytes(os.urandom(200_000))
    owned = root / "owned"
    owned.mkdir()
    os.chown(owned, 70000, 70000)
    count += 1
    return count


def make_image(tmp_path):
    tree = tmp_path / "tree"
    tree.mkdir()
    directories = build_tree(tree)
    image = tmp_path / "walk.erofs"
    subprocess.run(
        ["mkfs.erofs", "--quiet", "-T0", "-U", FIXED_UUID, str(image), str(tree)],
        check=True,
        capture_output=True,
    )
    return image.read_bytes(), directories


def test_walk_reads_every_directory_and_no_file_data(tmp_path):
    """A real image (a multi-block directory, an extended inode, deep paths): the walk
    visits as many directories as the tree has, and as ``find -type d`` lists, with one
    worker or several; each read is an inode or directory entries, never a file's data."""
    data, directories = make_image(tmp_path)
    geometry = erofs.geometry(data)
    assert geometry is not None
    reads: list[tuple[int, int]] = []

    def read(offset: int, length: int) -> bytes:
        reads.append((offset, length))
        return data[offset : offset + length]

    assert erofs_tree.walk(geometry, read, threading.Event(), workers=4) == directories
    assert all(length not in (5000, 200_000) for _, length in reads)
    assert max(length for _, length in reads) >= 2 * geometry.block  # the big directory

    inodes: list[int] = []

    def read_noting_inodes(offset: int, length: int) -> bytes:
        if length == erofs_tree.INODE_READ:
            inodes.append(offset)
        return data[offset : offset + length]

    erofs_tree.walk(geometry, read_noting_inodes, threading.Event(), workers=1)
    listed = subprocess.run(
        ["find", str(tmp_path / "tree"), "-type", "d"], capture_output=True, text=True, check=True
    ).stdout.split()
    assert len(inodes) == len(listed) == directories


def test_a_stopped_walk_ends_at_once_and_a_non_erofs_blob_has_no_geometry(tmp_path):
    data, _ = make_image(tmp_path)
    stop = threading.Event()
    stop.set()
    assert erofs_tree.walk(erofs.geometry(data), lambda o, n: data[o : o + n], stop) == 0
    assert erofs.geometry(bytes(8192)) is None
    assert erofs_tree.walk(erofs.geometry(data), lambda o, n: b"", threading.Event()) == 1


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=4096), st.binary(min_size=32, max_size=64), st.sampled_from([512, 4096]))
def test_garbage_directories_and_inodes_never_raise(block_bytes, inode, block):
    """Whatever the bytes, parsing gives a list or None, never an exception: the walk
    reads images from a registry before anything has checked them."""
    assert isinstance(erofs_tree.subdirectories(block_bytes, block), list)
    ranges = erofs_tree.directory_ranges(inode, 4096, block)
    assert ranges is None or all(length >= 0 for _, length in ranges)


def test_an_open_export_walks_the_tree_before_any_read(tmp_path, cache_dir):
    """With the walk on, a cold export fetches every directory's chunks on its own; the
    chunks of a file's data that no directory shares stay unfetched."""
    data, _ = make_image(tmp_path)
    source = PieceSource(data, "sha256:" + __import__("hashlib").sha256(data).hexdigest())
    geometry = erofs.geometry(data)
    wanted: set[int] = set()

    def read(offset: int, length: int) -> bytes:
        wanted.update(range(offset // CHUNK_SIZE, (offset + max(length, 1) - 1) // CHUNK_SIZE + 1))
        return data[offset : offset + length]

    erofs_tree.walk(geometry, read, threading.Event())
    settings_on = PrefetchSettings(readahead=False, erofs_start=True, erofs_walk=True)
    with ChunkStore(cache_dir) as store:
        blob = CachedBlob(store, source.digest, source.size, source, settings=settings_on)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            record = store.lookup(source.digest)
            if record and not store.missing(record.blob_id, sorted(wanted)):
                break
            time.sleep(0.02)
        blob.close()
        record = store.lookup(source.digest)
        assert store.missing(record.blob_id, sorted(wanted)) == []
        assert record.present < -(-len(data) // CHUNK_SIZE)
        assert store.stats()["bytes_served"] == 0


def wide_image(tmp_path) -> bytes:
    """An image of 100 directories of 200 empty files with long names each: their entries
    fill some 40 chunks for the walk to read."""
    tree = tmp_path / "wide"
    for top in range(100):
        directory = tree / f"directory-{top:03d}"
        directory.mkdir(parents=True)
        for name in range(200):
            (directory / f"a-file-with-a-name-long-enough-to-fill-blocks-{name:04d}").touch()
    image = tmp_path / "wide.erofs"
    subprocess.run(
        ["mkfs.erofs", "--quiet", "-T0", "-U", FIXED_UUID, str(image), str(tree)],
        check=True,
        capture_output=True,
    )
    return image.read_bytes()


def test_a_walk_whose_cache_is_lost_ends_at_once(tmp_path):
    """Tried: a cold image of 100 directories of 200 files each, opened with the walk on,
    from a source taking a fifth of a second a request, its cache a mount point (so a
    damaged cache cannot be moved aside); once the walk has fetched its first chunks,
    the cache's B-tree pages are zeroed and a read finds the damage. Must hold: the read is right;
    the walk ends within a few seconds, asking the source for no more than one chunk
    for each of its workers. Before, it walked on and fetched every directory's chunks
    for a cache that kept none of them, which the listing it ran ahead of then fetched
    again."""
    data = wide_image(tmp_path)
    source = PieceSource(data, "sha256:" + hashlib.sha256(data).hexdigest(), first_byte=0.2)
    walk_only = PrefetchSettings(readahead=False, erofs_walk=True)
    with small_disk(tmp_path / "volume", "64M") as cache_dir, ChunkStore(cache_dir) as store:
        blob = CachedBlob(store, source.digest, source.size, source, settings=walk_only)
        try:
            assert wait_for(lambda: store.lookup(source.digest) is not None, 10)
            walking = [t for t in threading.enumerate() if t.name == "erofs-walk"]
            assert walking
            assert zero_tree_pages(cache_dir) > 0
            assert b"".join(blob.read(len(data) - 100, 100)) == data[-100:]
            assert store.lost() is not None
            asked = len(source.requests)
            assert wait_for(lambda: not any(t.is_alive() for t in walking), 5)
            assert len(source.requests) - asked <= erofs_tree.WORKERS, (source.requests, asked)
        finally:
            blob.close()
