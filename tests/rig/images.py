"""EROFS fixture images built with the real ``mkfs.erofs`` from trees of known content.

Trees are pseudo-random but seeded, and images are built reproducibly
(``-T0 --all-root`` and a fixed UUID), so the same code gives the same
digests on every run and machine.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

FIXED_UUID = "6e0c1a52-5a2b-4f3e-9d1c-0b10c5b0a7e1"
MiB = 1 << 20


@dataclass
class ErofsImage:
    path: Path
    """The image file."""
    tree: Path
    """The directory it was built from."""
    digest: str
    size: int
    merged_tree: Path | None = None
    """For a layer: what the stack of layers up to and including this one shows."""


@dataclass
class ErofsImages:
    small: ErofsImage
    large: ErofsImage
    layers: list[ErofsImage]
    """Base; then files changed and added; then one deleted with a whiteout."""


def build_erofs(tree: Path, out: Path) -> ErofsImage:
    """``mkfs.erofs`` a tree into a reproducible, uncompressed image."""
    subprocess.run(
        ["mkfs.erofs", "--quiet", "-T0", "--all-root", "-U", FIXED_UUID, str(out), str(tree)],
        check=True,
        capture_output=True,
    )
    with out.open("rb") as file:
        digest = "sha256:" + hashlib.file_digest(file, "sha256").hexdigest()
    return ErofsImage(out, tree, digest, out.stat().st_size)


def write_random_files(
    root: Path, rng: random.Random, count: int, max_size: int, dirs: int = 8
) -> None:
    """``count`` files of random size up to ``max_size`` spread over ``dirs`` directories."""
    for i in range(count):
        directory = root / f"dir{i % dirs:02d}"
        directory.mkdir(parents=True, exist_ok=True)
        (directory / f"file{i:04d}.bin").write_bytes(rng.randbytes(rng.randint(0, max_size)))


def make_small_tree(root: Path) -> None:
    """A few MiB in a few hundred files, with text, an empty file, a symlink, a deep path."""
    rng = random.Random(1)
    root.mkdir(parents=True)
    write_random_files(root, rng, count=300, max_size=24 << 10)
    (root / "hello.txt").write_text("hello from the small image\n")
    (root / "empty").write_bytes(b"")
    (root / "link-to-hello").symlink_to("hello.txt")
    deep = root / "a" / "b" / "c" / "d"
    deep.mkdir(parents=True)
    (deep / "deep.txt").write_text("deep\n")


def make_large_tree(root: Path) -> None:
    """At least 64 MiB: one big file (for long sequential reads) and a spread of others."""
    rng = random.Random(2)
    root.mkdir(parents=True)
    (root / "big.bin").write_bytes(rng.randbytes(56 * MiB))
    for i in range(8):
        (root / f"medium{i}.bin").write_bytes(rng.randbytes(MiB))
    write_random_files(root / "small", rng, count=64, max_size=16 << 10)


def make_layer_trees(root: Path) -> list[Path]:
    """Three overlay layers: a base, changes and additions, a deletion (whiteout)."""
    rng = random.Random(3)
    base, changes, deletion = root / "layer0", root / "layer1", root / "layer2"
    for path, text in {
        "etc/os-release": "NAME=base\n",
        "data/keep.txt": "kept from the base layer\n",
        "data/change.txt": "version 1 from the base layer\n",
        "data/gone.txt": "deleted by the top layer\n",
    }.items():
        _write(base / path, text)
    write_random_files(base / "lib", rng, count=40, max_size=32 << 10, dirs=4)
    (base / "bin").mkdir()
    (base / "bin" / "tool").write_bytes(rng.randbytes(300 << 10))
    for path, text in {
        "data/change.txt": "version 2 from layer 1\n",
        "data/added.txt": "added by layer 1\n",
        "newdir/file.txt": "a new directory from layer 1\n",
    }.items():
        _write(changes / path, text)
    _write(deletion / "data/late.txt", "added by layer 2\n")
    # overlayfs whiteout: a character device 0/0 hides the lower file.
    os.mknod(deletion / "data/gone.txt", stat.S_IFCHR | 0o600, os.makedev(0, 0))
    return [base, changes, deletion]


def merge_trees(layers: list[Path], out: Path) -> None:
    """What overlayfs shows for ``layers`` (bottom first): upper files win, whiteouts delete."""
    out.mkdir(parents=True)
    for layer in layers:
        for dirpath, dirnames, filenames in os.walk(layer):
            relative = Path(dirpath).relative_to(layer)
            for name in dirnames:
                (out / relative / name).mkdir(exist_ok=True)
            for name in filenames:
                source, target = Path(dirpath) / name, out / relative / name
                if _is_whiteout(source):
                    target.unlink(missing_ok=True)
                else:
                    shutil.copy2(source, target, follow_symlinks=False)


def build_images(workdir: Path) -> ErofsImages:
    trees, out = workdir / "trees", workdir / "images"
    out.mkdir(parents=True)
    make_small_tree(trees / "small")
    make_large_tree(trees / "large")
    layer_trees = make_layer_trees(trees / "layers")
    layers = []
    for i, tree in enumerate(layer_trees):
        image = build_erofs(tree, out / f"layer{i}.erofs")
        image.merged_tree = trees / f"merged{i}"
        merge_trees(layer_trees[: i + 1], image.merged_tree)
        layers.append(image)
    return ErofsImages(
        small=build_erofs(trees / "small", out / "small.erofs"),
        large=build_erofs(trees / "large", out / "large.erofs"),
        layers=layers,
    )


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _is_whiteout(path: Path) -> bool:
    info = path.lstat()
    return stat.S_ISCHR(info.st_mode) and info.st_rdev == 0
