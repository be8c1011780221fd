"""What ``blockstore mount``, ``mounts`` and ``umount`` tell the user, with a real registry."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from test_mount_e2e import (
    BLOCKSTORE,
    assert_same_tree,
    cache_then_stop_registry,
    cli,
    mount,
    one_line,
    umount,
)

from blockstore.errors import MountError

pytestmark = pytest.mark.slow


@pytest.fixture
def dirs(mount_dirs) -> tuple[Path, Path, Path]:
    """A mount point, a cache directory, and the run directory."""
    base, run = mount_dirs
    for name in ("mnt", "cache"):
        (base / name).mkdir()
    return base / "mnt", base / "cache", run


def test_serving_from_the_cache_alone_is_said_on_the_terminal(dirs, fresh_registry, erofs_images):
    """Image cached, registry stopped: the mount succeeds and its stderr carries the server's
    warning, one line without the log's timestamp and logger; with -q, stderr stays empty."""
    mnt, cache, _ = dirs
    ref = cache_then_stop_registry(fresh_registry, erofs_images.small, mnt, cache)
    done = mount(ref, mnt, cache)
    line = one_line(done.stderr)
    assert line.startswith("blockstore: warning: "), line
    assert line.endswith(f"; serving {ref} from the cache alone"), line
    assert " WARNING " not in line
    umount(mnt)

    quiet = cli("-q", "mount", "--insecure", "--cache-dir", str(cache), ref, str(mnt))
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr == ""
    umount(mnt)


def test_a_mount_forgetting_insecure_fails_rather_than_serving_the_cache(
    dirs, pushed_images, erofs_images
):
    """Image cached through --insecure, registry up: a mount without --insecure reaches a
    registry that answers in plain HTTP. That is a setting to fix, not an outage: before,
    the mount served the cache alone and read I/O errors wherever the cache had a gap.
    It exits 5 with the hint to --insecure, leaves nothing mounted, and the same mount
    with --insecure then works."""
    mnt, cache, _ = dirs
    ref = pushed_images.small
    mount(ref, mnt, cache)
    umount(mnt)
    done = cli("mount", "--cache-dir", str(cache), ref, str(mnt))
    assert done.returncode == 5, done.stderr
    assert one_line(done.stderr).endswith(
        "it does not speak TLS (a plain-HTTP registry needs --insecure)"
    ), done.stderr
    assert not os.path.ismount(mnt)
    assert cli("mounts", "--json").stdout.strip() == "[]"
    mount(ref, mnt, cache)
    assert_same_tree(erofs_images.small.tree, mnt)
    umount(mnt)


def test_mounts_says_which_layer_of_the_image_is_served(dirs, pushed_images, erofs_images):
    """``--layer 1`` of the three-layer image is listed as ``layer 1 of 3`` (and in JSON as
    index 1 of 3 layers); the cached share is shown as a percentage."""
    mnt, cache, _ = dirs
    mount(pushed_images.multilayer, mnt, cache, "--layer", "1")
    table = cli("mounts")
    assert table.returncode == 0, table.stderr
    row = next(line for line in table.stdout.splitlines() if line.startswith(str(mnt)))
    assert "  layer 1 of 3  " in row, table.stdout
    assert row.rstrip().endswith("%"), row
    listed = json.loads(cli("mounts", "--json").stdout)
    assert [(m["layer_indexes"], m["image_layers"]) for m in listed] == [([1], 3)]
    umount(mnt)


def test_clean_umount_of_the_real_server_removes_its_log(dirs, pushed_images):
    """``blockstore serve`` stops with status 0 at ``umount``: the mount's log is removed, the
    run directory stays usable, and a second mount and umount work the same."""
    mnt, cache, run = dirs
    for _ in range(2):
        mount(pushed_images.small, mnt, cache)
        log = Path(json.loads(cli("mounts", "--json").stdout)[0]["log"])
        assert log.is_relative_to(run) and log.exists()
        done = cli("umount", str(mnt))
        assert done.returncode == 0 and done.stderr == "", done.stderr
        assert not log.exists()


def test_an_offline_mount_meeting_chunks_not_cached_says_how_to_cache_them(dirs, pushed_images):
    """Tried: the bottom layer of the three-layer image prefetched alone, then the whole
    image mounted ``--offline``, so the kernel's first reads of the other layers meet
    chunks not cached. Must hold: exit 10, one line quoting the server's warning, as the
    README's exit-code table says, and saying what caches the image for offline use
    (``blockstore prefetch IMAGE`` while the registry answers); nothing stays mounted.
    Before, the line ended at the warning and the log's path, saying nothing to do."""
    mnt, cache, _ = dirs
    ref = pushed_images.multilayer
    prefetched = cli("prefetch", "--insecure", "--cache-dir", str(cache), "--layer", "0", ref)
    assert prefetched.returncode == 0, prefetched.stderr
    done = cli("mount", "--offline", "--cache-dir", str(cache), ref, str(mnt))
    assert done.returncode == MountError.exit_code, done.stderr
    line = one_line(done.stderr)
    assert "is not cached, and the cache is offline" in line, line
    assert f"`blockstore prefetch {ref}`, while the registry answers," in line, line
    assert not os.path.ismount(mnt)


def test_a_mount_of_an_image_named_without_a_host_says_it_was_looked_up_on_docker_hub(dirs):
    """Tried: ``mount tools/rootfs:v1`` (the registry host left off) on a machine with no
    way out (a network namespace of its own). Must hold: exit 5, the unreachable Docker
    Hub named, a second line saying such a name is looked up there and how to name
    another registry, as ``inspect`` says, and no server log pointed at for only that.
    Before, the mount said only its first line, with the log that held the second."""
    mnt, cache, run = dirs
    argv = ["mount", "--cache-dir", str(cache), "tools/rootfs:v1", str(mnt)]
    done = subprocess.run(
        ["unshare", "--net", *BLOCKSTORE, *argv], capture_output=True, text=True, timeout=90
    )
    assert done.returncode == 5, done.stderr
    first, second = done.stderr.strip().splitlines()
    assert "cannot reach registry registry-1.docker.io" in first
    assert "server log" not in first
    assert "looked up on Docker Hub; name one in another registry as HOST[:PORT]" in second
    assert not os.path.ismount(mnt)
    assert not list((run / "log").glob("*.log"))
