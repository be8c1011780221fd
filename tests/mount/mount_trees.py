"""Trees for mount tests: compare a mounted tree with its source, build an opaque-dir stack.

The shared fixture images (``erofs_images``) cover changed, added and
whited-out files; an opaque directory (``trusted.overlay.opaque=y``, which
hides everything below it) is built here, as two small layers.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path


def build_opaque_stack(base: Path) -> tuple[list[Path], Path]:
    """Two layer trees (bottom first) whose top makes ``var/`` opaque, and the merged tree."""
    files = {
        "tree0/var/hidden": b"hidden by the opaque directory above\n",
        "tree0/etc/kept": b"kept\n",
        "tree1/var/only": b"the only file under var\n",
        "merged/etc/kept": b"kept\n",
        "merged/var/only": b"the only file under var\n",
    }
    for rel, data in files.items():
        (base / rel).parent.mkdir(parents=True, exist_ok=True)
        (base / rel).write_bytes(data)
    os.setxattr(base / "tree1" / "var", "trusted.overlay.opaque", b"y")
    return [base / "tree0", base / "tree1"], base / "merged"


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
