"""End to end: a real registry, ``blockstore mount`` as a user runs it, a real kernel mount.

Each test runs the CLI in its own processes (mount, mounts, umount), reads the
mounted tree through the kernel, and compares every file with the tree the
image was built from.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mount_trees import assert_same_tree
from rig.fault_proxy import Fault
from rig.processes import free_port, processes_mentioning
from rig.pushed import push_erofs
from rig.read_only import contents, read_only_view

from blockstore.errors import ImageNotCached, MountpointBusy, RegistryError, RegistryUnreachable
from nbdfront.mount import attach, records, syscall

pytestmark = pytest.mark.slow

BLOCKSTORE = [sys.executable, "-m", "blockstore"]


def cli(*args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run([*BLOCKSTORE, *args], capture_output=True, text=True, timeout=timeout)


def mount(ref: str, mountpoint: Path, cache: Path, *extra: str) -> subprocess.CompletedProcess:
    """``blockstore mount`` that must succeed; its output names the path taken."""
    done = cli("mount", "--insecure", "--cache-dir", str(cache), *extra, ref, str(mountpoint))
    assert done.returncode == 0, done.stderr
    via = "nbdfuse" if attach.choose_method() == attach.NBDFUSE else "kernel NBD"
    assert f"mounted {ref} at {mountpoint} via {via}" in done.stdout
    return done


def umount(mountpoint: Path) -> None:
    done = cli("umount", str(mountpoint))
    assert done.returncode == 0, done.stderr


def assert_nothing_left(mountpoint: Path, run: Path) -> None:
    """No mount, no FUSE, no server or nbdfuse process, no socket, no record."""
    table = syscall.mounted()
    assert str(mountpoint) not in table
    assert not [p for p in table if p.startswith(f"{run}/")]
    assert not processes_mentioning(str(run))
    assert not list(run.glob("**/*.sock"))
    assert records.saved() == []


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.fixture
def dirs(mount_dirs):
    """Two mount points and a cache directory of the test's own."""
    base, run = mount_dirs
    for name in ("mnt", "mnt2", "cache"):
        (base / name).mkdir()
    return base / "mnt", base / "mnt2", base / "cache", run


def test_mount_compare_every_file_umount_leaves_nothing(dirs, pushed_images, erofs_images):
    """Mount a one-layer image from the registry, compare every file with its source tree,
    list it, read the server's metrics, unmount it: afterwards no mount, FUSE, process or
    socket is left."""
    mnt, _, cache, run = dirs
    metrics_port = free_port()
    started = time.monotonic()
    mount(pushed_images.small, mnt, cache, "--metrics", f"127.0.0.1:{metrics_port}")
    print(f"mount of the small image took {time.monotonic() - started:.2f}s")
    assert_same_tree(erofs_images.small.tree, mnt)
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as reply:
        metrics = reply.read().decode()
    assert "blockstore_nbd_open_connections" in metrics

    listed = json.loads(cli("mounts", "--json").stdout)
    assert [(m["mountpoint"], m["image"], m["state"]) for m in listed] == [
        (str(mnt), pushed_images.small, "ok")
    ]
    assert listed[0]["cached"] and listed[0]["cached"][0] > 0

    umount(mnt)
    assert_nothing_left(mnt, run)


def test_three_layer_image_whole_and_one_layer_alone(dirs, pushed_images, erofs_images):
    """The three-layer image shows the merged tree (changes, additions, a whiteout);
    ``--layer 1``, ``-o oci.layer=0`` and ``-o oci.blob=DIGEST`` each show exactly that
    layer's own tree."""
    mnt, _, cache, run = dirs
    layers = erofs_images.layers
    done = mount(pushed_images.multilayer, mnt, cache)
    assert "3 layers under a read-only overlayfs" in done.stdout
    assert_same_tree(layers[-1].merged_tree, mnt)
    umount(mnt)

    mount(pushed_images.multilayer, mnt, cache, "--layer", "1")
    assert_same_tree(layers[1].tree, mnt)
    umount(mnt)

    mount(pushed_images.multilayer, mnt, cache, "-o", "oci.layer=0")
    assert_same_tree(layers[0].tree, mnt)
    umount(mnt)

    # Alone, the top layer shows its whiteout as what it is on disk: a 0/0 character device.
    mount(pushed_images.multilayer, mnt, cache, "-o", f"oci.blob={layers[2].digest}")
    assert_same_tree(layers[2].tree, mnt)
    umount(mnt)
    assert_nothing_left(mnt, run)


def test_an_image_mounts_offline_from_a_read_only_cache(dirs, pushed_images, erofs_images):
    """The three-layer image prefetched, its cache bound read-only (as a pre-warmed cache
    shipped on a read-only volume): `mount --offline` shows the merged tree, `mounts`
    lists it as ok and fully cached, `umount` leaves nothing, and not a byte of the cache
    changed. Before, the server could not open the cache: the mount failed with exit 8."""
    mnt, _, cache, run = dirs
    ref = pushed_images.multilayer
    assert cli("prefetch", ref, "--insecure", "--cache-dir", str(cache)).returncode == 0
    before = contents(cache)
    with read_only_view(cache, cache.with_name("ro")) as ro:
        mount(ref, mnt, ro, "--offline")
        assert_same_tree(erofs_images.layers[-1].merged_tree, mnt)
        (listed,) = json.loads(cli("mounts", "--json").stdout)
        assert listed["state"] == "ok" and listed["cached"] == [1.0, 1.0, 1.0], listed
        umount(mnt)
    assert_nothing_left(mnt, run)
    assert contents(cache) == before


def cache_then_stop_registry(registry, image, mnt: Path, cache: Path) -> str:
    """Push ``image``, mount it and read every file (so all of it is cached), unmount, and
    stop the registry process; return the reference."""
    ref = push_erofs(registry.host, "offline/small", "v1", [image.path])
    mount(ref, mnt, cache)
    assert_same_tree(image.tree, mnt)
    umount(mnt)
    registry.stop()
    return ref


def test_remount_with_the_registry_process_stopped(dirs, fresh_registry, erofs_images):
    """Mount and read everything, unmount, stop the registry: a second mount (same reference,
    no --offline) resolves from the cache and shows every file again."""
    mnt, _, cache, run = dirs
    ref = cache_then_stop_registry(fresh_registry, erofs_images.small, mnt, cache)
    started = time.monotonic()
    mount(ref, mnt, cache)
    print(f"offline re-mount took {time.monotonic() - started:.2f}s")
    assert_same_tree(erofs_images.small.tree, mnt)
    umount(mnt)
    assert_nothing_left(mnt, run)


def test_offline_flag_never_connects(dirs, fresh_registry, erofs_images):
    """With the image cached and the registry gone, ``--offline`` mounts and reads everything
    while a listener on the registry's port sees no connection at all; with nothing cached,
    ``--offline`` fails in one line."""
    mnt, _, cache, run = dirs
    ref = cache_then_stop_registry(fresh_registry, erofs_images.small, mnt, cache)
    host, port = fresh_registry.host.rsplit(":", 1)
    with socket.create_server((host, int(port))) as listener:
        listener.setblocking(False)
        mount(ref, mnt, cache, "--offline")
        assert_same_tree(erofs_images.small.tree, mnt)
        umount(mnt)
        with pytest.raises(BlockingIOError):
            listener.accept()

        other_cache = cache.parent / "empty-cache"
        failed = cli("mount", "--offline", "--cache-dir", str(other_cache), ref, str(mnt))
        assert failed.returncode == ImageNotCached.exit_code, failed.stderr
        one_line(failed.stderr)
        with pytest.raises(BlockingIOError):
            listener.accept()
    assert_nothing_left(mnt, run)


def test_partly_cached_image_offline(dirs, pushed_images, erofs_images):
    """Read a few files online, unmount, mount ``--offline``: those files read back right,
    files never read fail with EIO within a second each, the log names the layer and the
    offset, and the mount stays up."""
    mnt, _, cache, run = dirs
    tree = erofs_images.large.tree
    read_online = ["small/dir00/file0000.bin", "small/dir01/file0001.bin", "medium0.bin"]
    never_read = ["big.bin", "medium7.bin", "medium5.bin"]
    mount(pushed_images.large, mnt, cache)
    for rel in read_online:
        assert (mnt / rel).read_bytes() == (tree / rel).read_bytes()
    umount(mnt)

    mount(pushed_images.large, mnt, cache, "--offline")
    for rel in read_online:
        assert (mnt / rel).read_bytes() == (tree / rel).read_bytes()
    failures = 0
    for rel in never_read:
        started = time.monotonic()
        try:
            (mnt / rel).read_bytes()
        except OSError as exc:
            assert exc.errno == errno.EIO
            assert time.monotonic() - started < 1.0, f"{rel} took too long to fail"
            failures += 1
    assert failures >= 2, "files never read were cached: readahead went too far"
    assert (mnt / read_online[0]).read_bytes() == (tree / read_online[0]).read_bytes()
    assert [m["state"] for m in json.loads(cli("mounts", "--json").stdout)] == ["ok"]
    log = Path(records.load(str(mnt)).log).read_text()
    assert any(
        erofs_images.large.digest in line and "offset" in line and "not cached" in line
        for line in log.splitlines()
    ), log
    umount(mnt)
    assert_nothing_left(mnt, run)


def test_two_images_at_once_share_one_cache(dirs, pushed_images, erofs_images):
    """Two images mounted at once from one cache directory both show their trees, both are
    listed, and each unmounts on its own."""
    mnt, mnt2, cache, run = dirs
    mount(pushed_images.small, mnt, cache)
    mount(pushed_images.multilayer, mnt2, cache)
    assert_same_tree(erofs_images.small.tree, mnt)
    assert_same_tree(erofs_images.layers[-1].merged_tree, mnt2)
    listed = json.loads(cli("mounts", "--json").stdout)
    assert sorted(m["mountpoint"] for m in listed) == sorted([str(mnt), str(mnt2)])
    assert {m["state"] for m in listed} == {"ok"}

    busy = cli("mount", "--insecure", "--cache-dir", str(cache), pushed_images.small, str(mnt))
    assert busy.returncode == MountpointBusy.exit_code
    one_line(busy.stderr)

    umount(mnt)
    assert_same_tree(erofs_images.layers[-1].merged_tree, mnt2)
    umount(mnt2)
    assert_nothing_left(mnt, run)


def test_errors_a_user_can_act_on(dirs, pushed_images):
    """No such layer and an unreachable registry with nothing cached each fail in one line
    with their own exit code, leaving nothing mounted or running."""
    mnt, _, cache, run = dirs
    no_layer = cli(
        "mount",
        "--insecure",
        "--cache-dir",
        str(cache),
        "--layer",
        "7",
        pushed_images.small,
        str(mnt),
    )
    assert no_layer.returncode == RegistryError.exit_code, no_layer.stderr
    assert "7" in one_line(no_layer.stderr)

    dead_port = free_port()
    unreachable = cli(
        "mount",
        "--insecure",
        "--cache-dir",
        str(cache),
        f"127.0.0.1:{dead_port}/nothing/here:latest",
        str(mnt),
    )
    assert unreachable.returncode == RegistryUnreachable.exit_code, unreachable.stderr
    one_line(unreachable.stderr)
    assert_nothing_left(mnt, run)
    assert not os.listdir(mnt)


def test_two_mounts_racing_for_one_mountpoint(dirs, pushed_images, erofs_images):
    """Two ``blockstore mount`` processes started together at one mount point: one mounts,
    the other says the mount point is busy (exit 13), and the winner's mount is whole."""
    mnt, _, cache, run = dirs
    argv = [*BLOCKSTORE, "mount", "--insecure", "--cache-dir", str(cache)]
    racers = [
        subprocess.Popen(
            [*argv, pushed_images.small, str(mnt)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outcomes = []
    for racer in racers:
        _, stderr = racer.communicate(timeout=60)
        outcomes.append((racer.returncode, stderr))
    outcomes.sort()
    assert [code for code, _ in outcomes] == [0, MountpointBusy.exit_code], outcomes
    one_line(outcomes[1][1])
    assert_same_tree(erofs_images.small.tree, mnt)
    umount(mnt)
    assert_nothing_left(mnt, run)


def test_a_layer_that_is_no_erofs_image_is_named_with_its_media_type(dirs, registry, tmp_path):
    """A layer of random bytes pushed as application/octet-stream (`serve` exports any
    blob as it is: a raw disk image, say): `mount` warns that its media type is neither
    EROFS nor a tar, then fails at `mount -t erofs` saying the layer may not be EROFS,
    and leaves nothing mounted or running."""
    mnt, _, cache, run = dirs
    blob = tmp_path / "random.bin"
    blob.write_bytes(os.urandom(256 << 10))
    ref = push_erofs(
        registry.host, "mount/octets", "v1", [blob], media_type="application/octet-stream"
    )
    done = cli("mount", "--insecure", "--cache-dir", str(cache), ref, str(mnt))
    assert done.returncode != 0
    assert "has media type application/octet-stream, neither EROFS nor a tar" in done.stderr
    assert "is the layer an EROFS image?" in done.stderr, done.stderr
    assert done.stderr.count("neither EROFS nor a tar") == 1, done.stderr
    assert_nothing_left(mnt, run)


def test_a_mount_failing_on_a_registry_read_says_why(
    dirs, registry, erofs_images, fault_proxy, tmp_path
):
    """The registry cuts every ranged read of the layer short: the kernel's mount gets
    only EIO, and `mount` fails saying so together with the server's own last warning
    (the short body) and where its log is, and leaves nothing behind."""
    mnt, _, cache, run = dirs
    proxy = fault_proxy(registry)
    ref = push_erofs(proxy.host, "mount/cut", "v1", [erofs_images.small.path])
    proxy.fault = Fault("truncate", path_contains="/blobs/", method="GET", after_bytes=100)
    done = cli("mount", "--insecure", "--timeout", "3", "--cache-dir", str(cache), ref, str(mnt))
    assert done.returncode != 0
    error = done.stderr.strip().splitlines()[-1]
    assert "Input/output error" in error and "the server's last warning:" in error, error
    assert "(its log: " in error
    assert_nothing_left(mnt, run)


def test_a_mount_whose_record_a_newer_version_wrote_is_listed_and_undone(
    dirs, pushed_images, erofs_images
):
    """Tried: a mount whose record (and attachment records) carry fields this version
    does not know, as a newer version's would. Must hold: `mounts` lists it and
    `umount` undoes it, leaving nothing. Before, `mounts` hid the live mount ("no
    blockstore mounts") and `umount` died with a TypeError."""
    mnt, _, cache, run = dirs
    mount(pushed_images.small, mnt, cache)
    path = records.state_dir_for(str(mnt)) / records.RECORD_NAME
    data = json.loads(path.read_text())
    data["made_by_a_newer_version"] = {"options": ["x"]}
    for attachment in data["attachments"]:
        attachment["queue_depth"] = 4
    path.write_text(json.dumps(data))
    listed = json.loads(cli("mounts", "--json").stdout)
    assert [m["mountpoint"] for m in listed] == [str(mnt)]
    umount(mnt)
    assert_nothing_left(mnt, run)


def _mount_waiting_on_the_registry(
    mnt: Path, cache: Path, registry, pushed_images, fault_proxy
) -> subprocess.Popen:
    """``mount`` of the small image through a proxy that holds its manifest for 30 s,
    returned once its server has asked for it: the mount is waiting on the registry."""
    proxy = fault_proxy(registry)
    proxy.fault = Fault("delay", path_contains="/manifests/", seconds=30)
    ref = pushed_images.small.replace(registry.host, proxy.host, 1)
    argv = [*BLOCKSTORE, "mount", "--insecure", "--cache-dir", str(cache), ref, str(mnt)]
    mounting = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 15
    while proxy.faults_applied == 0:
        if time.monotonic() > deadline:
            mounting.kill()
            raise AssertionError("the server never asked for the manifest")
        time.sleep(0.02)
    return mounting


def test_ctrl_c_while_the_server_opens_the_image_leaves_no_log(
    dirs, registry, pushed_images, fault_proxy
):
    """Tried: Ctrl-C while `mount` waits for its server, which waits on a slow registry.
    Must hold: exit 130 saying it was interrupted, and nothing left, not even the
    server's log, which holds nothing the user asked to keep, nor the directories made
    for it. Before, every interrupted mount left an empty log in the run directory."""
    mnt, _, cache, run = dirs
    mounting = _mount_waiting_on_the_registry(mnt, cache, registry, pushed_images, fault_proxy)
    try:
        mounting.send_signal(signal.SIGINT)
        _, stderr = mounting.communicate(timeout=15)
    finally:
        mounting.kill()
    assert mounting.returncode == 130, stderr
    assert one_line(stderr) == "blockstore: interrupted"
    assert_nothing_left(mnt, run)
    assert list(run.iterdir()) == [], "a log, or the directories made for the mount"


def test_a_mount_whose_parent_directory_is_renamed_is_found_at_its_new_path(
    dirs, pushed_images, erofs_images
):
    """Tried: the directory holding a mount point renamed while the image is mounted (`mv
    images images.old`), then `mounts`, `umount` of the path recorded, and of the new one.
    Must hold: `mounts` lists the mount at its new path, ok; `umount` of the old path
    fails (exit 10) naming the new one and undoes nothing, the tree still whole; `umount`
    of the new path leaves nothing. Before, `mounts` called it not mounted and named the
    `umount` of the old path, which stopped its server, then failed on its FUSE file still
    in use, the tree at the new path reading I/O errors; and `umount` of the new path said
    blockstore had not mounted it, to be unmounted with umount(8)."""
    mnt, _, cache, run = dirs
    old = mnt.parent / "images" / "rootfs"
    old.mkdir(parents=True)
    mount(pushed_images.small, old, cache)
    (mnt.parent / "images").rename(mnt.parent / "images.old")
    new = mnt.parent / "images.old" / "rootfs"
    listed = json.loads(cli("mounts", "--json").stdout)
    assert [(m["mountpoint"], m["state"]) for m in listed] == [(str(new), "ok")]
    done = cli("umount", str(old))
    assert done.returncode == 10, done.stderr
    assert f"now at {new}" in one_line(done.stderr), done.stderr
    assert f"`blockstore umount {new}` undoes it" in done.stderr
    assert_same_tree(erofs_images.small.tree, new)
    umount(new)
    assert_nothing_left(new, run)


def test_umount_of_a_mount_whose_nbdfuse_is_stopped_ends_and_leaves_nothing(
    dirs, nbdfuse_only, pushed_images
):
    """Tried: a mount's nbdfuse stopped (SIGSTOP, as a frozen cgroup or a debugger leaves
    it), then `umount`. Must hold: `umount` ends within seconds (exit 0), nbdfuse killed
    once it has not exited after its FUSE file was unmounted, and nothing left. Before,
    `umount` hung for ever before it undid anything: resolving the path of the layer's
    FUSE file asked its file system for the attributes of its root, which only nbdfuse
    answers."""
    mnt, _, cache, run = dirs
    mount(pushed_images.small, mnt, cache)
    (attachment,) = records.load(str(mnt)).attachments
    os.kill(attachment.process.pid, signal.SIGSTOP)
    started = time.monotonic()
    done = cli("umount", str(mnt), timeout=45)
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - started < 30
    assert_nothing_left(mnt, run)


def test_a_supervisor_killed_before_ready_fails_the_mount_with_the_servers_status(
    dirs, registry, pushed_images, fault_proxy
):
    """Tried: SIGKILL to the mount's supervisor (which takes its server with it) while
    `mount` waits for the server, which waits on a slow registry. Must hold: the mount
    fails at once with the status a shell gives a process killed by SIGKILL, 137, as
    for a server killed itself, and leaves nothing. Before, it said "the server exited
    with status -9" and exited 247, a status no signal and no error of ours gives."""
    mnt, _, cache, run = dirs
    mounting = _mount_waiting_on_the_registry(mnt, cache, registry, pushed_images, fault_proxy)
    try:
        (supervisor,) = processes_mentioning(f"nbdfront.mount.supervisor {run}/")
        os.kill(supervisor, signal.SIGKILL)
        _, stderr = mounting.communicate(timeout=15)
    finally:
        mounting.kill()
    assert mounting.returncode == 128 + signal.SIGKILL, stderr
    assert "the server exited with status 137 before it was ready" in one_line(stderr)
    assert_nothing_left(mnt, run)


def interrupt_after_its_first_line(argv: list[str]) -> tuple[str, int]:
    """Run ``argv``; from its first line on stdout, SIGINT it every 10 ms until it exits.
    Returns that line and its exit status."""
    running = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        said = running.stdout.readline()
        while running.poll() is None:
            running.send_signal(signal.SIGINT)
            time.sleep(0.01)
    finally:
        running.kill()
        running.wait()
        running.stdout.close()
    return said, running.returncode


def test_ctrl_c_once_the_mount_is_made_leaves_it_made_and_says_so(dirs, pushed_images):
    """Tried: Ctrl-C, again and again, from the moment `mount` prints that the image is
    mounted until it exits, and the same with `umount`. Must hold: exit 0 with the mount
    made (then undone), as each line said. Before, each command died of the signal in
    the tenth of a second after its line (status 130, with no word): the mount it had
    just reported stayed, the unmount it had just reported was done."""
    mnt, _, cache, run = dirs
    argv = [*BLOCKSTORE, "mount", "--insecure", "--cache-dir", str(cache)]
    said, status = interrupt_after_its_first_line([*argv, pushed_images.small, str(mnt)])
    assert said.startswith(f"mounted {pushed_images.small} at {mnt}"), said
    assert status == 0
    assert records.load(str(mnt)) is not None and syscall.is_mounted(str(mnt))
    said, status = interrupt_after_its_first_line([*BLOCKSTORE, "umount", str(mnt)])
    assert said.startswith(f"unmounted {mnt}"), said
    assert status == 0
    assert_nothing_left(mnt, run)


def test_a_mount_point_in_use_says_what_is_there_and_what_to_do(dirs, pushed_images):
    """Tried: mounting where blockstore mounted an image already, and where another file
    system is mounted. Must hold: exit 13, one line naming what is there and how to free
    the place. Before, both said only "... is already a mount point"."""
    mnt, mnt2, cache, run = dirs
    mount(pushed_images.small, mnt, cache)
    subprocess.run(["mount", "-t", "tmpfs", "mine", str(mnt2)], check=True)
    try:
        argv = ["mount", "--insecure", "--cache-dir", str(cache), pushed_images.small]
        again = cli(*argv, str(mnt))
        assert again.returncode == MountpointBusy.exit_code
        assert one_line(again.stderr) == (
            f"blockstore: {mnt} is already a mount point: blockstore mounted "
            f"{pushed_images.small} there; `blockstore umount {mnt}` first"
        )
        other = cli(*argv, str(mnt2))
        assert other.returncode == MountpointBusy.exit_code
        assert one_line(other.stderr) == (
            f"blockstore: {mnt2} is already a mount point (tmpfs from mine): "
            "unmount it first, or choose another directory"
        )
    finally:
        syscall.umount(str(mnt2), lazy=True)
    umount(mnt)
    assert_nothing_left(mnt, run)


def test_a_mount_and_umount_whose_stdout_is_gone_still_exit_0(
    mount_dirs, mountpoint, pushed_images
):
    """Tried: ``mount`` with its stdout on a full disk (``/dev/full``), then ``umount`` with
    its stdout a pipe already closed. Must hold: each exits 0, as what it did stands: the
    mount is made (and listed), then undone. Before, the line saying so failed to be
    written and the command exited 1 (no space left) and 141 (broken pipe), so a script
    that checks the status took a standing mount for a failed one."""
    base, run = mount_dirs
    argv = [*BLOCKSTORE, "mount", "--insecure", "--cache-dir", str(base / "cache")]
    with open("/dev/full", "w") as full:
        done = subprocess.run(
            [*argv, pushed_images.small, str(mountpoint)],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=90,
        )
    assert done.returncode == 0, done.stderr
    assert records.load(str(mountpoint)) is not None
    reader, writer = os.pipe()
    os.close(reader)
    try:
        done = subprocess.run(
            [*BLOCKSTORE, "umount", str(mountpoint)],
            stdout=writer,
            stderr=subprocess.PIPE,
            text=True,
            timeout=90,
        )
    finally:
        os.close(writer)
    assert done.returncode == 0, done.stderr
    assert_nothing_left(mountpoint, run)
