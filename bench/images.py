"""The image under test: an EROFS image of a real tree, built here and pushed.

The tree is real files of this machine (Python's library, ``/usr/share/doc``,
more of ``/usr`` if a larger image is asked for), copied in a fixed order
until the image reaches about the chosen size, so a run's mount-and-use
workload meets the mix of small and large files a user's image has. Images
are built reproducibly (``-T0 --all-root``, a fixed UUID).
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from bench.processes import BenchError

SOURCES = [*sorted(glob.glob("/usr/lib/python3*")), "/usr/share/doc", "/usr/share", "/usr/lib"]
FIXED_UUID = "6e0c1a52-5a2b-4f3e-9d1c-0b10c5b0a7e1"
REPOSITORY = "bench/tree"
COMPRESSIONS = {"none": [], "lz4hc": ["-zlz4hc"]}
FIRST_GUESS = {"none": 1.0, "lz4hc": 1.8}
"""Tree bytes per image byte to try first (lz4hc is slow: each trial build counts)."""


@dataclass(frozen=True)
class Image:
    """One built and pushed image: where its bytes are, locally and in the registry."""

    name: str
    path: Path
    tree: Path
    digest: str
    size: int
    tag: str

    def reference(self, registry_host: str) -> str:
        return f"{registry_host}/{REPOSITORY}:{self.tag}"

    def describe(self) -> dict:
        files = sum(len(names) for _, _, names in os.walk(self.tree))
        regular = [
            info.st_size
            for path in self.tree.rglob("*")
            if stat.S_ISREG((info := path.lstat()).st_mode)
        ]
        return {
            "name": self.name,
            "compression": self.name,
            "size": self.size,
            "digest": self.digest,
            "files": files,
            "regular files": len(regular),
            "file bytes": sum(regular),
        }

    def blob_url(self, registry_host: str) -> str:
        return f"http://{registry_host}/v2/{REPOSITORY}/blobs/{self.digest}"


def copy_tree(out: Path, budget: int) -> int:
    """Copy regular files from ``SOURCES`` into ``out`` until ``budget`` bytes; the total."""
    total = 0
    seen: set[str] = set()
    for source in SOURCES:
        for dirpath, dirnames, filenames in os.walk(source):
            dirnames.sort()
            if dirpath in seen:
                continue
            seen.add(dirpath)
            for name in sorted(filenames):
                path = os.path.join(dirpath, name)
                if total >= budget or not os.path.isfile(path) or os.path.islink(path):
                    continue
                target = out / os.path.relpath(path, "/")
                if target.exists():
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    shutil.copyfile(path, target)
                except OSError:
                    continue
                total += target.stat().st_size
            if total >= budget:
                return total
    return total


def mkfs(tree: Path, out: Path, compression: str) -> None:
    done = subprocess.run(
        ["mkfs.erofs", "--quiet", "-T0", "--all-root", "-U", FIXED_UUID]
        + COMPRESSIONS[compression]
        + [str(out), str(tree)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise BenchError(f"mkfs.erofs failed: {done.stderr.strip()}")


def build(workdir: Path, size: int, compression: str) -> tuple[Path, Path]:
    """An image within about 15% of ``size`` bytes (a compressed tree is sized by trial)."""
    tree, image = workdir / f"tree-{compression}", workdir / f"{compression}.erofs"
    budget = int(size * FIRST_GUESS[compression])
    for _ in range(3):
        shutil.rmtree(tree, ignore_errors=True)
        copied = copy_tree(tree, budget)
        mkfs(tree, image, compression)
        built = image.stat().st_size
        if abs(built - size) <= size * 0.15 or copied < budget:
            break
        budget = int(budget * size / built)
    return image, tree


def push(image: Path, reference: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "blockstore", "-q", "push", str(image), reference, "--insecure"],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise BenchError(f"blockstore push failed: {done.stderr.strip()}")


def prepare(workdir: Path, size: int, compression: str, registry_host: str) -> Image:
    path, tree = build(workdir, size, compression)
    with path.open("rb") as file:
        digest = "sha256:" + hashlib.file_digest(file, "sha256").hexdigest()
    image = Image(compression, path, tree, digest, path.stat().st_size, compression)
    push(path, image.reference(registry_host))
    return image
