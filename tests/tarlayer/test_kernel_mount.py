"""The kernel mounts ``metadata || tar`` as one file and sees the tree the tar was made from."""

from __future__ import annotations

import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import IO

import pytest
from trees import make_tar, populate, snapshot

from blockstore.tarlayer.erofs_reader import read_metadata, tar_start
from blockstore.tarlayer.erofs_writer import write_metadata
from blockstore.tarlayer.tarwalk import walk_tar
from blockstore.tarlayer.tree import build_tree
from nbdfront.mount import attach


def build_metadata(tar: IO[bytes], tar_size: int) -> bytes:
    """The EROFS metadata image for the uncompressed tar in ``tar``."""
    return write_metadata(build_tree(walk_tar(tar)), tar_size)


def image_of(tar: Path, out: Path) -> Path:
    """Write ``metadata || zeros || tar`` for one tar file, as the export serves it."""
    with open(tar, "rb") as fh:
        meta = build_metadata(fh, tar.stat().st_size)
    read_metadata(meta)
    out.write_bytes(meta + bytes(tar_start(meta) - len(meta)) + tar.read_bytes())
    return out


def test_kernel_sees_the_source_tree_file_by_file(tmp_path, kernel_mount):
    """A GNU tar (PAX xattrs) of a tree with setuid and sticky modes, users beyond 16
    bits, three hard-link names, short, long and very long symlinks, devices, a fifo,
    empty and multi-MiB files and a 300-entry directory is mounted by the kernel with
    no device= option: every path has the same type, mode, owner, mtime, link count,
    size, contents or target, and xattrs, and the same paths are hard links."""
    src = populate(tmp_path / "src")
    tar = make_tar(src, tmp_path / "layer.tar")
    mnt = kernel_mount(image_of(tar, tmp_path / "layer.img"))
    assert snapshot(mnt) == snapshot(src)


def test_a_tar_layer_mounts_from_a_device_with_the_kernel_nbd_block_size(tmp_path, kernel_mount):
    """A tar layer's ``metadata || tar`` on a block device whose logical blocks are the
    size a kernel NBD attach gives ``nbd-client`` (a loop device stands in for the NBD
    device, whose driver a machine may lack) mounts, and shows the tree the tar was made
    from. Before, kernel NBD devices had 4096-byte blocks and the kernel refused the
    tar layer's 512-byte EROFS blocks on them ("failed to set erofs blksize"): where
    kernel NBD is the default, no tar layer mounted."""
    if shutil.which("losetup") is None:
        pytest.skip("no losetup")
    src = populate(tmp_path / "src")
    image = image_of(make_tar(src, tmp_path / "layer.tar"), tmp_path / "layer.img")
    block = str(attach.KERNEL_BLOCK_SIZE)
    losetup = ["losetup", "--find", "--show", "--read-only", "--sector-size", block]
    device = subprocess.run([*losetup, image], capture_output=True, text=True, check=True)
    try:
        mnt = kernel_mount(Path(device.stdout.strip()))
        assert snapshot(mnt) == snapshot(src)
    finally:
        # Detached once the mount is undone, at teardown.
        subprocess.run(["losetup", "--detach", device.stdout.strip()], check=True)


def test_tar_without_root_entry_or_parents(tmp_path, kernel_mount):
    """A tar that names ``a/b/c`` but not ``a`` or ``a/b`` (as hand-made layers do) mounts
    with those directories present, and the file readable."""
    src = tmp_path / "src"
    (src / "a" / "b").mkdir(parents=True)
    (src / "a" / "b" / "c").write_bytes(b"deep\n")
    tar = tmp_path / "layer.tar"
    import subprocess

    subprocess.run(["tar", "-cf", str(tar), "-C", str(src), "--no-recursion", "a/b/c"], check=True)
    mnt = kernel_mount(image_of(tar, tmp_path / "layer.img"))
    assert (mnt / "a" / "b" / "c").read_bytes() == b"deep\n"
    assert (mnt / "a" / "b").is_dir()


def test_file_beyond_4_gib_reads_back_at_both_ends(tmp_path, kernel_mount):
    """A 5 GiB member (a header written by tarfile, its data a hole in a sparse file,
    a marker at its last bytes) needs an extended inode and a chunk larger than 4 GiB:
    the kernel reports its size and reads the marker at the end and zeros before it."""
    size = 5 << 30
    marker = b"the last bytes of a 5 GiB file"
    info = tarfile.TarInfo("huge.bin")
    info.size = size
    header = info.tobuf(format=tarfile.PAX_FORMAT)
    tar = tmp_path / "layer.tar"
    with open(tar, "wb") as fh:
        fh.write(header)
        fh.seek(len(header) + size - len(marker))
        fh.write(marker)
        fh.write(bytes(-size % 512 + 1024))  # padding, then the end-of-archive blocks
    tar_size = tar.stat().st_size
    with open(tar, "rb") as fh:
        meta = build_metadata(fh, tar_size)
    image = tmp_path / "layer.img"
    start = tar_start(meta)
    with open(image, "wb") as out:
        out.write(meta)
        out.seek(start)
        with open(tar, "rb") as fh:
            out.write(fh.read(len(header)))
        out.seek(start + tar_size - len(marker) - (-size % 512) - 1024)
        out.write(marker)
        out.truncate(start + tar_size)
    mnt = kernel_mount(image)
    huge = mnt / "huge.bin"
    assert huge.stat().st_size == size
    with open(huge, "rb") as fh:
        fh.seek(size - len(marker))
        assert fh.read() == marker
        fh.seek(size // 2)
        assert fh.read(4096) == bytes(4096)
