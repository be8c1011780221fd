"""Real NBD clients reading a real EROFS image from the real registry, through the cache.

Every tool here is what a user would run: libnbd's nbdinfo, nbdcopy and
nbdfuse, qemu-img and qemu-io, fio's nbd engine, and the kernel's EROFS.
"""

from __future__ import annotations

import filecmp
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest


def run(*argv: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=check)


def test_nbdinfo_plain_list_map_and_can(registry_image):
    """nbdinfo sees a read-only export of the image's size with its description;
    --list names it; --map shows one data extent over the whole image; --can
    multi-conn and fua are true (FUA is offered, and kept by doing nothing, so a client
    that sets it on every command stays within the spec) and --can write is false."""
    size = registry_image.image.size
    info = json.loads(run("nbdinfo", "--json", registry_image.uri).stdout)
    (export,) = info["exports"]
    assert export["export-size"] == size
    assert export["is_read_only"] is True and export["can_multi_conn"] is True
    assert export["can_fua"] is True
    assert "layer 0" in export["description"]
    assert export["block_size_preferred"] == 32768
    assert info["protocol"] == "newstyle-fixed"
    plain = run("nbdinfo", registry_image.uri).stdout
    assert f"export-size: {size}" in plain
    host_uri = registry_image.uri.rsplit("/", 1)[0] + "/"
    listing = run("nbdinfo", "--list", host_uri).stdout
    assert 'export="layer0"' in listing
    extents = run("nbdinfo", "--map", registry_image.uri).stdout.split("\n")
    assert re.fullmatch(rf"\s*0\s+{size}\s+0\s+data", extents[0]) and extents[1:] == [""]
    assert run("nbdinfo", "--can", "multi-conn", registry_image.uri, check=False).returncode == 0
    assert run("nbdinfo", "--can", "write", registry_image.uri, check=False).returncode == 2
    unix = json.loads(run("nbdinfo", "--json", registry_image.unix_uri).stdout)
    assert unix["exports"][0]["export-size"] == size


@pytest.mark.parametrize(
    "options", [[], ["--connections=1", "--synchronous"]], ids=["4-connections", "synchronous"]
)
def test_nbdcopy_is_byte_identical(registry_image, tmp_path, options):
    """nbdcopy (four connections by default, or one synchronous one) copies the image
    byte for byte."""
    out = tmp_path / "copy.img"
    run("nbdcopy", *options, registry_image.uri, str(out))
    assert filecmp.cmp(out, registry_image.image.path, shallow=False)


def test_nbdcopy_of_a_large_image_from_a_cold_cache(large_registry_image, tmp_path):
    """Four nbdcopy connections reading a 64 MiB image whose every byte is still in the
    registry (concurrent misses on overlapping chunks) copy it byte for byte."""
    out = tmp_path / "large.img"
    run("nbdcopy", large_registry_image.uri, str(out), timeout=120)
    assert filecmp.cmp(out, large_registry_image.image.path, shallow=False)


def test_qemu_img_convert_and_compare(registry_image, tmp_path):
    """qemu-img converts the export to a raw file identical to the image, and
    qemu-img compare finds the export and the image identical."""
    out = tmp_path / "qemu.img"
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", registry_image.uri, str(out))
    image = registry_image.image.path.read_bytes()
    assert out.read_bytes()[: len(image)] == image
    compare = run(
        "qemu-img",
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        registry_image.uri,
        str(registry_image.image.path),
        check=False,
    )
    assert compare.returncode == 0, compare.stdout + compare.stderr


def test_qemu_io_read_patterns(registry_image):
    """qemu-io's sequential, vectored, asynchronous and unaligned reads all succeed,
    and a hex dump of an unaligned range matches the image."""
    size = registry_image.image.size
    image = registry_image.image.path.read_bytes()
    commands = [
        "read 0 4096",
        "readv 8192 512 512 1024",
        "aio_read 65536 65536",
        "aio_read 1048576 131072",
        "aio_flush",
        f"read {size - 4096} 4096",
        "read -v 1000 64",
    ]
    argv = ["qemu-io", "-r", "-f", "raw"]
    for command in commands:
        argv += ["-c", command]
    result = run(*argv, registry_image.uri)
    assert "error" not in result.stdout.lower() + result.stderr.lower()
    assert len(re.findall(r"^read \d+/\d+ bytes", result.stdout, re.M)) == 6
    dump = bytes.fromhex(
        "".join(re.findall(r"^[0-9a-f]{8}:\s+((?:[0-9a-f]{2} ?)+)", result.stdout, re.M)).replace(
            " ", ""
        )
    )
    assert dump == image[1000:1064]


@pytest.mark.parametrize("iodepth", [1, 16])
def test_fio_random_reads(registry_image, iodepth):
    """fio's nbd engine runs 200 random 4 KiB reads at queue depth 1 and 16 without an
    error, all of them done (a count, not a time: on a loaded machine two seconds held
    fewer reads of first misses)."""
    result = run(
        "fio",
        "--name=randread",
        "--ioengine=nbd",
        f"--uri={registry_image.uri}",
        "--rw=randread",
        "--bs=4k",
        f"--iodepth={iodepth}",
        "--readonly",
        f"--size={registry_image.image.size}",
        "--number_ios=200",
        "--output-format=json",
    )
    job = json.loads(result.stdout[result.stdout.index("{") :])["jobs"][0]
    assert job["error"] == 0 and job["read"]["io_bytes"] == 200 * 4096
    assert job["read"]["total_ios"] == 200


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _trees_equal(left: Path, right: Path) -> None:
    """Same names, same types, same bytes, same symlink targets, recursively."""
    for dirpath, dirnames, filenames in os.walk(left):
        here = Path(dirpath)
        there = right / here.relative_to(left)
        assert sorted(os.listdir(here)) == sorted(os.listdir(there)), here
        for name in filenames + dirnames:
            a, b = here / name, there / name
            if a.is_symlink():
                assert b.is_symlink() and os.readlink(a) == os.readlink(b), a
            elif a.is_file():
                assert b.is_file() and a.read_bytes() == b.read_bytes(), a


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting EROFS needs root")
@pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse")
def test_nbdfuse_and_kernel_erofs_mount(registry_image, tmp_path):
    """nbdfuse turns the export into a file; the kernel mounts it as EROFS and the
    tree it shows equals the source tree, file by file."""
    fuse_dir, mountpoint = tmp_path / "fuse", tmp_path / "mnt"
    fuse_dir.mkdir()
    mountpoint.mkdir()
    image_file = fuse_dir / "image.erofs"
    fuse = subprocess.Popen(
        ["nbdfuse", "-r", str(image_file), registry_image.uri],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    mounted = False
    try:
        _wait_for(lambda: image_file.exists() and image_file.stat().st_size > 0, 10, "nbdfuse")
        assert image_file.stat().st_size == registry_image.image.size
        run("mount", "-t", "erofs", "-o", "ro", str(image_file), str(mountpoint))
        mounted = True
        _trees_equal(registry_image.image.tree, mountpoint)
        _trees_equal(mountpoint, registry_image.image.tree)
    finally:
        if mounted:
            run("umount", str(mountpoint), check=False)
        run("fusermount3", "-u", str(fuse_dir), check=False)
        try:
            fuse.wait(timeout=10)
        except subprocess.TimeoutExpired:
            fuse.kill()
            fuse.wait()
        shutil.rmtree(fuse_dir, ignore_errors=True)
