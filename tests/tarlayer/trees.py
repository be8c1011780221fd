"""Real source trees, tars made from them with GNU tar, and a file-by-file view of a tree
(or of what a layer's export serves).

``snapshot`` is what "the same tree" means in these tests: for every path, its
type, permission bits, owner, mtime, link count, contents (or symlink target,
or device numbers) and xattrs, plus which paths are hard links of each other.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import struct
import subprocess
import tarfile
from pathlib import Path

from blockstore.tarlayer.erofs_reader import read_metadata

TAR_FLAGS = ["--format=posix", "--xattrs", "--xattrs-include=*", "--numeric-owner"]


def tar_of(files: dict[str, bytes]) -> bytes:
    """A GNU tar of regular files (name: contents, mtime 1), for a layer whose bytes a test
    chooses one by one."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1
            archive.addfile(info, io.BytesIO(data))
    return out.getvalue()


def files_served(export) -> dict[bytes, bytes]:
    """Each file a tar layer's index names at its root, with the bytes the export serves
    for it."""
    root = read_metadata(export.index.metadata).root
    return {
        name: b"".join(
            bytes(b) for b in export.read(export.index.tar_start + node.data_offset, node.size)
        )
        for name, node in root.children.items()
    }


def make_tar(src: Path, out: Path, *extra: str) -> Path:
    """Archive ``src``'s contents (``./...`` names) with GNU tar, as image layers are made."""
    subprocess.run(["tar", *TAR_FLAGS, *extra, "-cf", str(out), "-C", str(src), "."], check=True)
    return out


def _file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _xattrs(path: str) -> dict[str, bytes]:
    names = os.listxattr(path, follow_symlinks=False)
    return {n: os.getxattr(path, n, follow_symlinks=False) for n in sorted(names)}


def snapshot(root: Path, *, with_mtime: bool = True) -> tuple[dict, list]:
    """(path -> attributes, sorted groups of hard-linked paths) of a tree."""
    entries: dict[str, tuple] = {}
    by_inode: dict[tuple[int, int], list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        names = [*dirnames, *filenames]
        for name in [".", *names] if dirpath == str(root) else names:
            full = os.path.normpath(os.path.join(dirpath, name))
            rel = os.path.relpath(full, root)
            st = os.lstat(full)
            kind = stat.S_IFMT(st.st_mode)
            if kind == stat.S_IFREG:
                content: object = _file_digest(full)
                by_inode.setdefault((st.st_dev, st.st_ino), []).append(rel)
            elif kind == stat.S_IFLNK:
                content = os.readlink(full)
            elif kind in (stat.S_IFCHR, stat.S_IFBLK):
                content = (os.major(st.st_rdev), os.minor(st.st_rdev))
            else:
                content = None
            entries[rel] = (
                oct(st.st_mode),
                st.st_uid,
                st.st_gid,
                st.st_mtime_ns if with_mtime and kind != stat.S_IFLNK else None,
                st.st_nlink,
                st.st_size if kind != stat.S_IFDIR else None,
                content,
                _xattrs(full),
            )
    links = sorted(sorted(paths) for paths in by_inode.values() if len(paths) > 1)
    return entries, links


def populate(root: Path) -> Path:
    """A tree with what image layers hold: modes, owners, links, xattrs, odd sizes and names."""
    root.mkdir(parents=True)
    (root / "etc").mkdir()
    (root / "etc" / "hostname").write_text("box\n")
    (root / "etc" / "shadow").write_text("root:*:19000::::::\n")
    os.chmod(root / "etc" / "shadow", 0o640)
    os.chown(root / "etc" / "shadow", 0, 42)
    (root / "empty-file").write_bytes(b"")
    (root / "empty-dir").mkdir()
    big = root / "usr" / "lib" / "big.bin"
    big.parent.mkdir(parents=True)
    big.write_bytes(os.urandom(3 * 1024 * 1024 + 123))
    (root / "usr" / "lib" / "exact-block").write_bytes(b"b" * 512)
    (root / "usr" / "bin").mkdir()
    tool = root / "usr" / "bin" / "tool"
    tool.write_bytes(b"#!/bin/sh\necho tool\n")
    os.chmod(tool, 0o4755)
    os.link(tool, root / "usr" / "bin" / "tool-alias")
    os.link(tool, root / "usr" / "lib" / "tool-third-name")
    (root / "tmp").mkdir()
    os.chmod(root / "tmp", 0o1777)
    home = root / "home" / "user"
    home.mkdir(parents=True)
    (home / "notes").write_text("owned by a user\n")
    os.chown(home / "notes", 1000, 1000)
    os.chown(home, 1000, 1000)
    (home / "far-owner").write_text("ids beyond 16 bits\n")
    os.chown(home / "far-owner", 70000, 80000)
    os.symlink("../etc/hostname", root / "usr" / "hostname-link")
    os.symlink("t" * 300, root / "usr" / "long-link")  # inline, but not after every inode
    os.symlink("/" + "x/" * 600 + "end", root / "usr" / "longer-link")  # needs its own blocks
    os.symlink("dangling-target", root / "dangling")
    many = root / "many"
    many.mkdir()
    for i in range(300):  # directory blocks beyond the first
        (many / f"entry-{i:04d}-{'n' * (i % 40)}").write_text(str(i))
    (root / ("long-name-" + "z" * 240)).write_text("long name\n")
    (root / "unicode-é-日本").write_text("names are bytes\n")
    (root / "-sorts-before-dot").write_text("dash\n")
    os.setxattr(root / "etc" / "hostname", "user.origin", b"tar test")
    os.setxattr(root / "etc" / "hostname", "trusted.flag", b"\x00\x01binary\xff")
    # cap_net_bind_service, effective: a vfs_cap_data v2 record
    cap = struct.pack("<IIIII", 0x02000001, 1 << 10, 0, 0, 0)
    os.setxattr(root / "usr" / "bin" / "tool", "security.capability", cap)
    os.setxattr(root / "empty-dir", "user.dir-attr", b"on a directory")
    os.mkfifo(root / "fifo")
    os.mknod(root / "null-like", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(root / "disk-like", stat.S_IFBLK | 0o660, os.makedev(259, 300))
    return root
