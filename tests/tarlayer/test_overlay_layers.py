"""Tar layers stacked with overlayfs give what extracting them in layer order gives."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
from test_kernel_mount import image_of
from trees import make_tar, snapshot

from nbdfront.mount import syscall as mount_syscall


def layer_sources(root: Path) -> list[Path]:
    """Three layers: a base; one with whiteouts and an opaque directory; one deleting a
    directory and bringing a deleted file back."""
    base, mid, top = (root / n for n in ("base", "mid", "top"))
    for d in ("etc", "usr/bin", "var/cache/apt", "opt/old"):
        (base / d).mkdir(parents=True)
    (base / "etc/shadow").write_text("root:*:1::::::\n")
    (base / "etc/passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    (base / "usr/bin/tool").write_text("#!/bin/sh\necho old\n")
    os.chmod(base / "usr/bin/tool", 0o755)
    (base / "var/cache/apt/pkgcache.bin").write_bytes(os.urandom(70_000))
    (base / "var/cache/keep-me-not").write_text("hidden by the opaque dir above\n")
    (base / "opt/old/x").write_text("x\n")
    os.link(base / "etc/passwd", base / "etc/passwd-hardlink")

    for d in ("etc", "usr/bin", "var/cache", "opt/old"):
        (mid / d).mkdir(parents=True)
    (mid / "etc/.wh.shadow").write_text("")
    (mid / "var/cache/.wh..wh..opq").write_text("")
    (mid / "var/cache/fresh").write_text("only file left in var/cache\n")
    os.symlink("/opt/new/tool", mid / "usr/bin/tool")
    (mid / "opt/old/y").write_text("y\n")
    os.setxattr(mid / "opt/old/y", "user.layer", b"mid")

    for d in ("etc", "opt"):
        (top / d).mkdir(parents=True)
    (top / "opt/.wh.old").write_text("")
    (top / "etc/shadow").write_text("root:!:2::::::\n")
    os.chmod(top / "etc/shadow", 0o600)
    return [base, mid, top]


def _remove(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def _is_real_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def extract_in_order(tars: list[Path], dest: Path) -> None:
    """The reference: apply each layer as the OCI spec says, with plain ``tar -x``. An
    entry replaces a lower path of the other kind (directory or not), as ``tar -x``
    alone does not when the lower one is a directory that is not empty."""
    dest.mkdir()
    for tar in tars:
        with tarfile.open(tar) as archive:
            members = [(Path(os.path.normpath(m.name)), m.isdir()) for m in archive.getmembers()]
        for path, is_dir in members:
            if path.name == ".wh..wh..opq":
                parent = dest / path.parent
                if parent.is_symlink() or (parent.exists() and not parent.is_dir()):
                    parent.unlink()  # this layer's directory takes its place
                lower = [p for p in parent.iterdir()] if _is_real_dir(parent) else []
                for p in lower:  # this layer's own entries are extracted afterwards
                    _remove(p)
            elif path.name.startswith(".wh."):
                victim = dest / path.parent / path.name[4:]
                if os.path.lexists(victim):
                    _remove(victim)
            elif (
                str(path) != "."
                and os.path.lexists(dest / path)
                and is_dir != _is_real_dir(dest / path)
            ):
                _remove(dest / path)  # an entry of the other kind takes its place
        subprocess.run(
            [
                "tar",
                "--xattrs",
                "--xattrs-include=*",
                "--numeric-owner",
                "-xpf",
                str(tar),
                "-C",
                str(dest),
                "--exclude=.wh.*",
                "--exclude=*/.wh.*",
            ],
            check=True,
        )


def same_layer_whiteouts(path: Path) -> Path:
    """A fourth layer, in an order no directory walk gives: a whiteout then the same
    directory made again (explicitly, and implied by a file under it), and paths this
    layer writes before whiting them out, which a whiteout must leave alone (it acts
    on the layers below only)."""
    entries = [
        ("usr/.wh.bin", tarfile.REGTYPE, b""),
        ("usr/bin", tarfile.DIRTYPE, None),
        ("usr/bin/new", tarfile.REGTYPE, b"the only file left in usr/bin\n"),
        ("var/.wh.cache", tarfile.REGTYPE, b""),
        ("var/cache/again", tarfile.REGTYPE, b"var/cache made again, implied\n"),
        ("etc/motd", tarfile.REGTYPE, b"written before its whiteout\n"),
        ("etc/.wh.motd", tarfile.REGTYPE, b""),
        ("opt/keep", tarfile.DIRTYPE, None),
        ("opt/keep/k", tarfile.REGTYPE, b"k\n"),
        ("opt/.wh.keep", tarfile.REGTYPE, b""),
    ]
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as archive:
        for name, kind, data in entries:
            info = tarfile.TarInfo(name)
            info.type, info.mtime = kind, 1_700_000_000
            info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
            info.size = len(data) if data is not None else 0
            archive.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def without_dir_counts(snap: tuple[dict, list]) -> tuple[dict, list]:
    """Directory link counts and mtimes differ between overlayfs and a real directory."""
    entries, links = snap
    out = {}
    for path, attrs in entries.items():
        mode = int(attrs[0], 8)
        if mode & 0o170000 == 0o040000:
            attrs = (*attrs[:3], None, None, *attrs[5:])
        out[path] = attrs
    return out, links


@pytest.mark.parametrize("base_as", ["tar", "mkfs.erofs"])
def test_three_layers_with_whiteouts_and_an_opaque_dir(tmp_path, kernel_mount, base_as):
    """Base, a layer with a whiteout, an opaque directory, a file turned symlink and an
    xattr, a layer deleting a directory and restoring a deleted file, and a layer with
    whiteouts of its own paths and of directories it makes again: each mounted
    from ``metadata || tar`` (or the base from a mkfs.erofs image: mixed stacks) and
    stacked read-only with overlayfs shows exactly the tree that extracting the four
    tars in order (whiteouts applied) leaves: paths, types, modes, owners, contents,
    symlinks, xattrs and hard links."""
    tars = [make_tar(src, tmp_path / f"{src.name}.tar") for src in layer_sources(tmp_path / "src")]
    tars.append(same_layer_whiteouts(tmp_path / "last.tar"))
    lowers = []
    for i, tar in enumerate(tars):
        if i == 0 and base_as == "mkfs.erofs":
            image = tmp_path / "base.erofs"
            subprocess.run(
                ["mkfs.erofs", str(image), str(tmp_path / "src/base")],
                check=True,
                capture_output=True,
            )
        else:
            image = image_of(tar, tmp_path / f"layer{i}.img")
        lowers.append(kernel_mount(image))
    merged = tmp_path / "merged"
    merged.mkdir()
    lowerdir = ":".join(str(p) for p in reversed(lowers))
    mount_syscall.mount("overlay", str(merged), "overlay", f"lowerdir={lowerdir}")
    try:
        reference = tmp_path / "extracted"
        extract_in_order(tars, reference)
        assert not (merged / "etc/passwd-hardlink").is_symlink()
        got = without_dir_counts(snapshot(merged, with_mtime=False))
        want = without_dir_counts(snapshot(reference, with_mtime=False))
        assert sorted(got[0]) == sorted(want[0])
        assert got == want
        assert os.listdir(merged / "var/cache") == ["again"]
        assert os.listdir(merged / "usr/bin") == ["new"]
        assert (merged / "etc/motd").read_bytes() == b"written before its whiteout\n"
        assert os.listdir(merged / "opt") == ["keep"]
    finally:
        mount_syscall.umount(str(merged), lazy=True)


def _tar_of(path: Path, entries: list[tuple[str, dict[str, str]]]) -> Path:
    """A PAX tar of directories (names ending in ``/``) and empty files."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as archive:
        for name, pax in entries:
            info = tarfile.TarInfo(name.rstrip("/"))
            info.type = tarfile.DIRTYPE if name.endswith("/") else tarfile.REGTYPE
            info.mode, info.pax_headers = (0o755 if info.isdir() else 0o644), pax
            archive.addfile(info)
    return path


def test_an_opaque_xattr_a_tar_carries_hides_nothing_below(tmp_path, kernel_mount):
    """Tried: a base layer of ``d/lower`` and ``e/lower``; above it a layer whose ``d``
    carries ``trusted.overlay.opaque=y`` as a PAX record (``SCHILY.xattr``) and whose
    ``e`` holds a real ``.wh..wh..opq``, each with a file ``upper``; the two mounted
    by the kernel and stacked with overlayfs. Must hold: ``d`` lists ``lower`` and
    ``upper``, as containerd extracts it (it drops such xattrs from a layer); ``e``
    lists ``upper`` alone. Before, the record reached the image and ``d/lower`` was
    hidden."""
    opaque = {"SCHILY.xattr.trusted.overlay.opaque": "y"}
    base = _tar_of(
        tmp_path / "base.tar", [("d/", {}), ("d/lower", {}), ("e/", {}), ("e/lower", {})]
    )
    top = _tar_of(
        tmp_path / "top.tar",
        [("d/", opaque), ("d/upper", {}), ("e/", {}), ("e/.wh..wh..opq", {}), ("e/upper", {})],
    )
    lowers = [kernel_mount(image_of(tar, tmp_path / f"{tar.stem}.img")) for tar in (top, base)]
    merged = tmp_path / "merged"
    merged.mkdir()
    lowerdir = ":".join(str(p) for p in lowers)
    mount_syscall.mount("overlay", str(merged), "overlay", f"lowerdir={lowerdir}")
    try:
        assert sorted(os.listdir(merged / "d")) == ["lower", "upper"]
        assert os.listdir(merged / "e") == ["upper"]
    finally:
        mount_syscall.umount(str(merged), lazy=True)
