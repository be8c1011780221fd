"""Source trees for mount tests: build them, make EROFS images of them, compare them.

A three-layer stack exercises what overlayfs must get right: the second layer
changes and adds files, the third deletes one with a whiteout (a 0/0
character device) and replaces a directory's content with an opaque
directory (``trusted.overlay.opaque=y``).
"""

from __future__ import annotations

import hashlib
import os
import random
import stat
import subprocess
from pathlib import Path

FIXED_UUID = "6d6f756e-742d-7465-7374-2d6c61796572"


def write_files(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def make_erofs(tree: Path, image: Path) -> Path:
    subprocess.run(
        ["mkfs.erofs", "--quiet", "-T0", "--all-root", "-U", FIXED_UUID, str(image), str(tree)],
        check=True,
    )
    return image


def random_bytes(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def build_small_tree(root: Path, files: int = 60) -> Path:
    """A tree of a few MiB: many small files, a few big ones, a symlink, nested dirs."""
    write_files(
        root,
        {f"d{i % 5}/sub{i % 3}/f{i}.bin": random_bytes(i, 97 * i * i) for i in range(files)},
    )
    write_files(root, {"big/one.bin": random_bytes(1000, 3 << 20), "hello.txt": b"hello\n"})
    os.symlink("../hello.txt", root / "d0" / "link")
    return root


def build_layer_trees(base: Path) -> tuple[list[Path], Path]:
    """Three layer trees (bottom first) and the merged tree the stack must show."""
    layers = [base / f"tree{i}" for i in range(3)]
    merged = base / "merged"
    common = {
        "etc/conf": b"version 1\n",
        "etc/keep": b"kept\n",
        "share/doc/a.txt": b"a\n" * 1000,
        "share/doc/b.txt": b"b\n",
        "bin/tool": random_bytes(1, 300_000),
    }
    write_files(layers[0], common)
    write_files(layers[1], {"etc/conf": b"version 2\n", "share/doc/c.txt": b"added\n"})
    write_files(layers[2], {"opt/new/file": random_bytes(2, 70_000), "var/only": b"only\n"})
    (layers[2] / "share" / "doc").mkdir(parents=True)
    os.mknod(layers[2] / "share" / "doc" / "a.txt", stat.S_IFCHR | 0o600, os.makedev(0, 0))
    # var/ exists below (from layer 1) and is opaque in layer 2: only var/only shows.
    write_files(layers[1], {"var/hidden": b"hidden\n"})
    os.setxattr(layers[2] / "var", "trusted.overlay.opaque", b"y")
    write_files(
        merged,
        {
            **common,
            "etc/conf": b"version 2\n",
            "share/doc/c.txt": b"added\n",
            "opt/new/file": random_bytes(2, 70_000),
            "var/only": b"only\n",
        },
    )
    (merged / "share" / "doc" / "a.txt").unlink()
    return layers, merged


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under ``root``: type, permission bits, and content digest or link target."""
    entries: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                entries[rel] = ("link", os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                entries[rel] = ("dir",)
            elif stat.S_ISREG(st.st_mode):
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                entries[rel] = ("file", stat.S_IMODE(st.st_mode), st.st_size, digest)
            else:
                entries[rel] = ("other", stat.S_IFMT(st.st_mode), st.st_rdev)
    return entries


def assert_same_tree(expected: Path, mounted: Path) -> None:
    """Every file of ``expected`` is in ``mounted`` with the same bytes, and nothing else is."""
    want, got = snapshot(expected), snapshot(mounted)
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    differ = sorted(p for p in set(want) & set(got) if want[p] != got[p])
    assert not (missing or extra or differ), f"missing {missing}, extra {extra}, differ {differ}"
