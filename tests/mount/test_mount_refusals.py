"""What ``blockstore mount`` refuses by itself, before it starts anything in the background."""

from __future__ import annotations

import fcntl
import os
import shlex
import subprocess
import sys

import pytest
from rig.processes import processes_mentioning

from blockstore.errors import UsageError

BLOCKSTORE = [sys.executable, "-m", "blockstore"]
LOGIN_VARIABLES = ("BLOCKSTORE_USERNAME", "BLOCKSTORE_PASSWORD")


@pytest.mark.parametrize(
    "argv",
    [
        ["--platform", "amd64", "127.0.0.1:5000/a/b:v1"],
        ["--blob", "sha256:1234", "127.0.0.1:5000/a/b:v1"],
        ["127.0.0.1:5000/Upper/Case:v1"],
        ["127.0.0.1:5000/a/b:-bad-tag"],
    ],
)
def test_bad_arguments_fail_in_one_line_with_nothing_spawned(mount_dirs, mountpoint, argv):
    """A bad platform, a malformed --blob digest and invalid references each fail with one
    line and exit 2 from the mount command itself: no server log is mentioned or written,
    no state is made, no process started."""
    _, run = mount_dirs
    done = subprocess.run(
        [*BLOCKSTORE, "mount", *argv, str(mountpoint)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == UsageError.exit_code, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "server log" not in lines[0], done.stderr
    assert not list(run.iterdir()), "a log or state directory was made"
    assert not processes_mentioning(str(run))


@pytest.mark.parametrize(
    "argv",
    [
        ["--mirror", "https://mirroruser:s3cretpw@127.0.0.1:5000"],
        ["-o", "oci.password=s3cretpw"],
        ["--password", "s3cretpw"],
    ],
)
def test_credentials_given_wrong_fail_before_the_server_starts(mount_dirs, mountpoint, argv):
    """A mirror with ``user:password@`` in its address (which would land on the server's
    command line, shown by ``ps``), and a password with no user name (which would be
    dropped without a word), each fail with exit 2 and one line from mount itself: the line
    says what to do instead and does not repeat the password; nothing is spawned."""
    _, run = mount_dirs
    done = subprocess.run(
        [*BLOCKSTORE, "mount", "127.0.0.1:5000/a/b:v1", str(mountpoint), *argv],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if k not in LOGIN_VARIABLES},
    )
    assert done.returncode == UsageError.exit_code, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "s3cretpw" not in lines[0], done.stderr
    assert "auth files" in lines[0] or "--username" in lines[0], done.stderr
    assert not list(run.iterdir()), "a log or state directory was made"
    # Only this run's: other tests on this machine may use the same password meanwhile.
    assert not processes_mentioning(str(run))


def test_the_mount_point_given_before_the_image_says_which_comes_first(mount_dirs, mountpoint):
    """Tried: ``mount DIR IMAGE``, the two arguments swapped. Must hold: exit 2, one line
    showing the command the right way round, nothing spawned. Before, the directory was
    taken for a Docker Hub name and the image for a mount point that does not exist
    (exit 10, "mountpoint .../127.0.0.1:5000/a/b:v1 does not exist")."""
    _, run = mount_dirs
    image = "127.0.0.1:5000/a/b:v1"
    done = subprocess.run(
        [*BLOCKSTORE, "mount", str(mountpoint), image], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == UsageError.exit_code, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert f"the image comes first: `blockstore mount {image} {mountpoint}`" in lines[0]
    assert not list(run.iterdir()), "a log or state directory was made"


def test_the_mount_given_the_right_way_round_is_quoted_for_the_shell(mount_dirs):
    """Tried: ``mount DIR IMAGE``, the two arguments swapped, the directory named
    ``it's a mount``. Must hold: the command the refusal gives, read by the shell, is
    ``blockstore mount IMAGE DIR``, the directory one word. Before, it named the
    directory unquoted, which the shell splits at the space and leaves open at the
    quote."""
    base, _ = mount_dirs
    directory = base / "it's a mount"
    directory.mkdir()
    image = "127.0.0.1:5000/a/b:v1"
    done = subprocess.run(
        [*BLOCKSTORE, "mount", str(directory), image], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == UsageError.exit_code, done.stderr
    assert done.stderr.count("`") == 2, done.stderr
    command = done.stderr.split("`")[1]
    assert shlex.split(command) == ["blockstore", "mount", image, str(directory)], command


def test_an_image_named_as_a_directory_here_is_not_taken_for_swapped_arguments(
    mount_dirs, tmp_path
):
    """Tried: ``mount alpine mnt`` where a directory ``alpine`` exists and ``mnt`` does
    not. Must hold: the refusal is about the missing mount point (exit 10), not a claim
    that the arguments are swapped. Before, it said "mnt an image reference: the image
    comes first (blockstore mount mnt alpine)"."""
    (tmp_path / "alpine").mkdir()
    done = subprocess.run(
        [*BLOCKSTORE, "mount", "alpine", "mnt"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert done.returncode == 10, done.stderr
    assert "comes first" not in done.stderr and "mnt" in done.stderr, done.stderr


def test_umount_of_what_blockstore_did_not_mount_says_where_to_look(
    mount_dirs, mountpoint, local_server, erofs_images
):
    """Tried: ``umount`` of an empty directory, of a path that does not exist, of a tmpfs
    the user mounted, and of an image blockstore mounted with another run directory (a
    ``sudo`` that dropped BLOCKSTORE_RUN_DIR). Must hold: exit 10, one line each saying
    what is (or is not) there and what to do, the image's being the command that undoes
    it; the tmpfs and the image stay mounted. Before, all four said only "... was not
    mounted by blockstore"."""
    from nbdfront.mount import stack, syscall, unmount

    base, run = mount_dirs
    theirs, image = base / "theirs", base / "image"
    theirs.mkdir()
    image.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "mine", str(theirs)], check=True)
    stack.mount(local_server({"layer0": erofs_images.small.path}), str(image), image="small")
    other = {**os.environ, "BLOCKSTORE_RUN_DIR": str(base / "other-run")}
    try:
        expected = {
            mountpoint: "has nothing mounted on it; `blockstore mounts` lists the mounts",
            base / "nosuch": "does not exist; `blockstore mounts` lists the mounts",
            theirs: f"was not mounted by blockstore with the run directory {base}/other-run: "
            f"tmpfs from mine is mounted there; `umount {theirs}` unmounts it if it is yours",
            image: "was mounted by blockstore with another run directory: "
            f"`BLOCKSTORE_RUN_DIR={run} blockstore umount {image}` undoes it",
        }
        for path, said in expected.items():
            done = subprocess.run(
                [*BLOCKSTORE, "umount", str(path)],
                capture_output=True,
                text=True,
                timeout=60,
                env=other,
            )
            assert done.returncode == 10, done.stderr
            assert done.stderr.count("\n") == 1, done.stderr
            assert done.stderr.startswith(f"blockstore: {path} {said}"), done.stderr
        assert syscall.is_mounted(str(theirs)) and syscall.is_mounted(str(image))
    finally:
        syscall.umount(str(theirs), lazy=True)
    unmount.unmount(str(image))


@pytest.mark.parametrize("where", ["layered", "run directory under a mounts directory"])
def test_umount_with_another_run_directory_names_it_for_every_image(
    mount_dirs, local_server, opaque_images, erofs_images, monkeypatch, where
):
    """Tried: ``umount`` with a run directory other than the one that mounted the image
    there, for an image of two layers (an overlay at the mount point, whose source names
    no file of the run directory) and for one layer mounted with a run directory whose
    own path holds ``/mounts/``. Must hold: exit 10, the line names the
    ``BLOCKSTORE_RUN_DIR=... blockstore umount`` that undoes it; the image stays
    mounted. Before, both were told to use umount(8) "if it is yours", which would
    leave the server and nbdfuse running."""
    from nbdfront.mount import stack, syscall, unmount

    base, run = mount_dirs
    if where == "layered":
        images = {f"layer{i}": path for i, path in enumerate(opaque_images[0])}
    else:
        run = run / "mounts" / "r"
        monkeypatch.setenv("BLOCKSTORE_RUN_DIR", str(run))
        images = {"layer0": erofs_images.small.path}
    image = base / "image"
    image.mkdir()
    stack.mount(local_server(images), str(image), image="img")
    other = {**os.environ, "BLOCKSTORE_RUN_DIR": str(base / "other-run")}
    try:
        done = subprocess.run(
            [*BLOCKSTORE, "umount", str(image)],
            capture_output=True,
            text=True,
            timeout=60,
            env=other,
        )
        assert done.returncode == 10, done.stderr
        assert done.stderr == (
            f"blockstore: {image} was mounted by blockstore with another run directory: "
            f"`BLOCKSTORE_RUN_DIR={run} blockstore umount {image}` undoes it\n"
        )
        assert syscall.is_mounted(str(image))
    finally:
        unmount.unmount(str(image))


def test_mounts_with_another_run_directory_names_the_one_that_lists_them(
    mount_dirs, local_server, opaque_images, erofs_images
):
    """Tried: ``mounts`` (and ``mounts --json``) with a run directory other than the one
    that mounted an image of two layers and an image of one (a ``sudo`` that dropped
    BLOCKSTORE_RUN_DIR). Must hold: exit 0 and, on stderr, one line naming that run
    directory, the count of its mounts (2, not one per FUSE file or layer) and the
    ``BLOCKSTORE_RUN_DIR=... blockstore mounts`` that lists them; stdout stays the
    table (here, none) or JSON. Before, it said "no blockstore mounts" and nothing
    more, while both stood."""
    import json

    from nbdfront.mount import stack, unmount

    base, run = mount_dirs
    layered, single = base / "layered", base / "single"
    layered.mkdir()
    single.mkdir()
    images = {f"layer{i}": path for i, path in enumerate(opaque_images[0])}
    stack.mount(local_server(images), str(layered), image="img")
    stack.mount(local_server({"layer0": erofs_images.small.path}), str(single), image="small")
    other = {**os.environ, "BLOCKSTORE_RUN_DIR": str(base / "other-run")}
    said = (
        f"blockstore: 2 mounts made with another run directory, {run}, not listed here: "
        f"`BLOCKSTORE_RUN_DIR={run} blockstore mounts` lists them\n"
    )
    try:
        for json_flag in ([], ["--json"]):
            done = subprocess.run(
                [*BLOCKSTORE, "mounts", *json_flag],
                capture_output=True,
                text=True,
                timeout=60,
                env=other,
            )
            assert done.returncode == 0, done.stderr
            assert said in done.stderr, done.stderr
            if json_flag:
                assert json.loads(done.stdout) == []
            else:
                assert done.stdout == "no blockstore mounts\n"
    finally:
        unmount.unmount(str(layered))
        unmount.unmount(str(single))


def test_mount_where_blockstore_mounted_with_another_run_directory_names_it(
    mount_dirs, local_server, opaque_images, monkeypatch
):
    """Tried: ``mount`` at a place where blockstore mounted an image of two layers with
    another run directory (a ``sudo`` that dropped BLOCKSTORE_RUN_DIR). Must hold: the
    refusal names the ``BLOCKSTORE_RUN_DIR=... blockstore umount`` that frees the
    place, and the image stays mounted. Before, it was named as another file system
    ("overlay from overlay") to unmount, which umount(8) does leaving the server and
    nbdfuse running."""
    from blockstore.errors import MountpointBusy
    from nbdfront.mount import stack, syscall, unmount

    base, run = mount_dirs
    image = base / "image"
    image.mkdir()
    images = {f"layer{i}": path for i, path in enumerate(opaque_images[0])}
    stack.mount(local_server(images), str(image), image="img")
    try:
        monkeypatch.setenv("BLOCKSTORE_RUN_DIR", str(base / "other-run"))
        with pytest.raises(MountpointBusy) as refused:
            stack.check_can_mount(str(image))
        assert str(refused.value) == (
            f"{image} is already a mount point: blockstore mounted an image there with "
            f"another run directory; `BLOCKSTORE_RUN_DIR={run} blockstore umount {image}` "
            "first"
        )
        assert syscall.is_mounted(str(image))
    finally:
        monkeypatch.setenv("BLOCKSTORE_RUN_DIR", str(run))
        unmount.unmount(str(image))


@pytest.mark.parametrize(
    "where",
    [
        "the run directory",
        "inside the run directory",
        "the cache",
        "over the cache",
        "inside the cache",
    ],
)
def test_a_mount_point_that_would_hide_the_run_directory_or_the_cache_is_refused(
    mount_dirs, mountpoint, where
):
    """A mount point that is the run directory, lies in it, covers the cache directory the
    server would use or lies in it is refused (exit 10), saying which, with nothing
    spawned or made. Before, a mount inside the run directory failed with a bare
    "[Errno 2] ... record.tmp" (exit 1), and one over the cache succeeded, the cache
    then hidden from every other command while the server served from its open files;
    one inside the cache (its ``leases``) hid the files other processes coordinate by."""
    base, run = mount_dirs
    cache = base / "cache"
    target = {
        "the run directory": run,
        "inside the run directory": run / "mounts",
        "the cache": cache,
        "over the cache": mountpoint,
        "inside the cache": cache / "leases",
    }[where]
    if where == "over the cache":
        cache = mountpoint / "sub" / "cache"
    target.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [*BLOCKSTORE, "mount", "127.0.0.1:5000/a/b:v1", str(target), "--cache-dir", str(cache)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 10, done.stderr
    (line,) = done.stderr.splitlines()
    named = "the run directory" if "run" in where else f"the cache {cache}"
    assert named in line and "choose another directory" in line, line
    assert not processes_mentioning(str(run))
    assert not any((run / "mounts").glob("*")) and not (run / "log").exists()


@pytest.mark.parametrize("command", ["mount", "umount"])
def test_an_empty_mount_point_is_a_usage_error(mount_dirs, command):
    """``blockstore mount IMAGE "$DIR"`` with DIR unset: exit 2, one line saying the mount
    point is empty, nothing spawned. Before, ``umount`` said " does not exist" (exit 10)
    of a nameless path, and ``mount`` mounted the image over the working directory."""
    _, run = mount_dirs
    image = ["127.0.0.1:5000/a/b:v1"] if command == "mount" else []
    done = subprocess.run(
        [*BLOCKSTORE, command, *image, ""], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == UsageError.exit_code, done.stderr
    (line,) = done.stderr.splitlines()
    assert f"blockstore {command}: error: argument MOUNTPOINT: the mount point is empty" in line
    assert not processes_mentioning(str(run))


@pytest.mark.parametrize("under", ["run", "parent/run"])
def test_a_run_directory_under_a_dangling_link_is_refused_in_one_line(
    mount_dirs, mountpoint, monkeypatch, under
):
    """Tried: ``BLOCKSTORE_RUN_DIR`` inside a symbolic link to nothing, directly and one
    directory deeper. Must hold: ``mount`` says in one line that the link is in the way
    (exit 10), and makes nothing. Before, it said only "[Errno 17] File exists"; and
    once a failed mount removed the run directory it made, the run directory was made
    again and again, for ever, as if another mount kept removing it."""
    from blockstore.errors import MountError

    base, run = mount_dirs
    (run / "link").symlink_to(base / "nothing-here")
    monkeypatch.setenv("BLOCKSTORE_RUN_DIR", str(run / "link" / under))
    done = subprocess.run(
        [*BLOCKSTORE, "mount", "127.0.0.1:5000/a/b:v1", str(mountpoint)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == MountError.exit_code, done.stderr
    assert done.stderr == (
        f"blockstore: {run / 'link'} is not a directory, so the run directory cannot be made "
        "in it: give another as BLOCKSTORE_RUN_DIR\n"
    )
    assert [p.name for p in run.iterdir()] == ["link"]
    assert not (base / "nothing-here").exists()


def test_a_mount_point_longer_than_the_kernel_takes_says_so(mount_dirs, tmp_path):
    """Tried: ``mount IMAGE .`` run in a directory whose absolute path is over 4,300 bytes
    (made and entered a step at a time, as a shell's ``cd`` gets there), longer than the
    4,095 bytes the kernel takes for a path. Must hold: exit 10 and one line saying the
    mount point is longer than the kernel takes and to choose a shorter one; nothing
    spawned or made. Before, it said the mount point "does not exist"."""
    _, run = mount_dirs
    steps = ["d" * 250] * 17
    where = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    for step in steps:
        os.mkdir(step, dir_fd=where)
        inner = os.open(step, os.O_RDONLY | os.O_DIRECTORY, dir_fd=where)
        os.close(where)
        where = inner
    os.close(where)

    def enter() -> None:
        os.chdir(tmp_path)
        for step in steps:
            os.chdir(step)

    done = subprocess.run(
        [*BLOCKSTORE, "mount", "127.0.0.1:5000/a/b:v1", "."],
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=enter,
    )
    long_path = "/".join([str(tmp_path), *steps])
    assert done.returncode == 10, done.stderr
    assert done.stderr == (
        f"blockstore: mountpoint {long_path} is {len(long_path)} bytes long, longer than the "
        "4095 bytes the kernel takes for a path: choose a shorter one\n"
    )
    assert not list(run.iterdir()), "a log or state directory was made"
    assert not processes_mentioning(str(run))


def test_a_mount_point_that_does_not_exist_is_refused_saying_to_make_it(mount_dirs):
    """Tried: ``mount IMAGE DIR`` where DIR does not exist, as a first mount at a new
    place is typed. Must hold: exit 10, one line naming DIR and the ``mkdir -p`` that
    makes it; nothing spawned. Before, it said only "mountpoint DIR does not exist"."""
    base, run = mount_dirs
    missing = base / "new place"
    done = subprocess.run(
        [*BLOCKSTORE, "mount", "127.0.0.1:5000/a/b:v1", str(missing)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 10, done.stderr
    assert done.stderr == (
        f"blockstore: mountpoint {missing} does not exist: make it first (mkdir -p '{missing}')\n"
    )
    assert not processes_mentioning(str(run))


def test_umount_run_from_inside_the_mount_says_to_step_out_of_it(
    mount_dirs, mountpoint, local_server, erofs_images
):
    """Tried: ``blockstore umount .`` typed in a shell whose working directory is the
    mount. Must hold: exit 13, one line naming that shell as what uses it and saying to
    cd out of the mount first; the image stays mounted. Before, it said only to end the
    process, the user's own shell, or to unmount with --lazy."""
    from nbdfront.mount import stack, syscall, unmount

    stack.mount(local_server({"layer0": erofs_images.small.path}), str(mountpoint), image="small")
    shell, said = _umount_typed_inside(mountpoint)
    assert shell.returncode == 13, said
    assert said == (
        f"blockstore: {mountpoint} is busy: a process still uses it (pid {shell.pid} (sh)) "
        f"(end it, or `blockstore umount --lazy {mountpoint}`, after which what still uses "
        "it gets I/O errors); "
        "this command was run from inside it, as the shell that started it likely was: "
        "cd out of it first\n"
    )
    assert syscall.is_mounted(str(mountpoint))
    unmount.unmount(str(mountpoint))


def _umount_typed_inside(mountpoint: os.PathLike) -> tuple[subprocess.Popen, str]:
    """``blockstore umount .`` run by a shell whose working directory is the mount, as a
    user types it there: the shell, and what the command said."""
    shell = subprocess.Popen(
        ["sh", "-c", '"$@" umount . 2>&1; exit $?', "sh", *BLOCKSTORE],
        stdout=subprocess.PIPE,
        text=True,
        cwd=mountpoint,
    )
    said, _ = shell.communicate(timeout=60)
    return shell, said


def test_umount_from_inside_a_mount_another_process_is_undoing_says_only_that(
    mount_dirs, mountpoint, local_server, erofs_images
):
    """Tried: ``blockstore umount .`` typed in a shell inside the mount while another
    blockstore process holds the mount's state directory (an ``umount --lazy`` of it
    under way, played by holding its flock). Must hold: exit 13 saying another process
    is unmounting it, and no word of cd-ing out, which is not what keeps it. Before, the
    line told the user to cd out of the mount first, as if their shell were the cause."""
    from nbdfront.mount import records, stack, unmount

    record = stack.mount(
        local_server({"layer0": erofs_images.small.path}), str(mountpoint), image="small"
    )
    held = os.open(record.state_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(held, fcntl.LOCK_EX)
        shell, said = _umount_typed_inside(mountpoint)
    finally:
        os.close(held)
    assert shell.returncode == 13, said
    assert "by another blockstore process" in said
    assert "cd out" not in said, said
    assert records.load(str(mountpoint)) is not None
    unmount.unmount(str(mountpoint))


def test_a_run_directory_too_deep_for_the_servers_socket_is_refused_saying_so(
    mount_dirs, mountpoint
):
    """Tried: ``mount`` with a ``$BLOCKSTORE_RUN_DIR`` of over 80 bytes, deeper than the
    mount's server socket under it can be named in a Unix socket address (107 bytes).
    Must hold: exit 10, one line naming the run directory and saying to set a shorter
    one; nothing spawned, nothing left in it. Before, the server started and failed to
    listen, and mount exited 1 with "AF_UNIX path too long" alone."""
    base, _ = mount_dirs
    deep = base / ("r" * 80)
    done = subprocess.run(
        [*BLOCKSTORE, "mount", "127.0.0.1:5000/a/b:v1", str(mountpoint)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "BLOCKSTORE_RUN_DIR": str(deep)},
    )
    assert done.returncode == 10, done.stderr
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"blockstore: the run directory {deep} is too deep for"), line
    assert line.endswith(": set BLOCKSTORE_RUN_DIR to a shorter directory"), line
    assert not processes_mentioning(str(deep))
    assert not deep.exists() or not any(deep.rglob("*"))
