"""What a mount leaves where others can see it: owner-only sockets and run directories, and
a registry login that reaches no command line, record, mount table or log."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from mount_trees import assert_same_tree
from rig.processes import processes_mentioning
from rig.pushed import push_erofs

from blockstore.errors import AuthError, MountError, UsageError
from nbdfront.mount import listing, records, stack, unmount

BLOCKSTORE = [sys.executable, "-m", "blockstore"]


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*BLOCKSTORE, *args], capture_output=True, text=True, timeout=90, env=env)


def mode(path: str | Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_sockets_records_and_logs_are_owner_only(
    mount_dirs, mountpoint, erofs_images, local_server, monkeypatch
):
    """While mounted: the server's Unix socket is 0600 in a 0700 mount directory, the log
    0600 in a 0700 log directory (also one an older version left open to all); the run
    directory and ``mounts/`` are 0755, all ours. Nothing of it is writable by another
    user."""
    _, run = mount_dirs
    run.chmod(0o700)
    run_dir = run / "blockstore"
    monkeypatch.setenv("BLOCKSTORE_RUN_DIR", str(run_dir))  # made by the mount, not the test
    (run_dir / "log").mkdir(parents=True)  # as an older version left it: readable by all
    (run_dir / "log").chmod(0o755)
    record = stack.mount(
        local_server({"layer0": erofs_images.small.path}), str(mountpoint), image="small"
    )
    assert stat.S_ISSOCK(os.stat(record.socket).st_mode)
    expected = {
        record.socket: 0o600,
        record.state_dir: 0o700,
        record.log: 0o600,
        run_dir / "log": 0o700,
        run_dir / "mounts": 0o755,
        run_dir: 0o755,
    }
    assert {str(path): mode(path) for path in expected} == {
        str(path): m for path, m in expected.items()
    }
    for path in expected:
        assert os.stat(path).st_uid == os.geteuid()
    for path in run_dir.rglob("*"):
        assert not os.lstat(path).st_mode & 0o002, f"{path} is world-writable"
    unmount.unmount(str(mountpoint))


def test_a_run_directory_others_can_write_is_refused(mount_dirs, mountpoint, local_server):
    """A run directory writable by other users (where one could plant a record for
    ``umount`` to act on, or a socket) is refused before any server starts; a record in a
    mount directory that others can write is not believed by ``umount`` or ``mounts``."""
    _, run = mount_dirs
    run.chmod(0o777)
    with pytest.raises(MountError, match="can be written by another user"):
        stack.mount(local_server({}), str(mountpoint), image="x")
    assert not processes_mentioning(str(run))

    run.chmod(0o755)
    planted = records.state_dir_for(str(mountpoint))
    planted.mkdir(parents=True)
    fake = records.MountRecord(str(mountpoint), "fake", "nbdfuse", str(planted), "/dev/null")
    (planted / records.RECORD_NAME).write_text(fake.to_json())
    planted.chmod(0o777)
    assert records.load(str(mountpoint)) is None
    assert records.saved() == []
    planted.chmod(0o700)
    assert records.load(str(mountpoint)) == fake  # the same record, where only we can write


@pytest.mark.parametrize("where", ["run", "mounts"])
def test_records_under_a_directory_others_can_write_are_refused(
    mount_dirs, mountpoint, erofs_images, local_server, where
):
    """Tried: a mount made, then its run directory (or ``mounts/`` in it) made writable by
    all, then ``mounts`` and ``umount``. Must hold: both refuse in one line naming the
    directory (exit 10), as ``mount`` refuses such a directory, and the mount stays up;
    with the mode put back, ``umount`` undoes it. Before, both believed the records
    there, and ``umount`` signalled the processes they named."""
    _, run = mount_dirs
    stack.mount(local_server({"layer0": erofs_images.small.path}), str(mountpoint), image="small")
    opened = run if where == "run" else run / "mounts"
    opened.chmod(0o777)
    try:
        for argv in (["mounts"], ["umount", str(mountpoint)]):
            done = cli(*argv)
            assert done.returncode == MountError.exit_code, done.stderr
            assert done.stderr.splitlines() == [
                f"blockstore: {opened} can be written by another user, so no mount record "
                f"in it is believed: make it writable by its owner alone (chmod go-w {opened})"
            ]
        assert os.path.ismount(mountpoint)
    finally:
        opened.chmod(0o755)
    done = cli("umount", str(mountpoint))
    assert done.returncode == 0, done.stderr
    assert not os.path.ismount(mountpoint)


def test_a_relative_run_directory_is_refused(monkeypatch, mountpoint):
    """A relative BLOCKSTORE_RUN_DIR would put a mount's record where only a command run
    from the same directory finds it (umount elsewhere: 'not mounted by blockstore'):
    refused as a usage error."""
    with monkeypatch.context() as patched:  # the fixtures clean up in the real run dir
        patched.setenv("BLOCKSTORE_RUN_DIR", "run")
        with pytest.raises(UsageError, match="must be an absolute path, not 'run'"):
            stack.check_can_mount(str(mountpoint))
        with pytest.raises(UsageError, match="must be an absolute path"):
            listing.list_mounts()


def test_a_run_directory_that_is_a_file_is_one_line(mount_dirs, mountpoint, tmp_path):
    """Tried: BLOCKSTORE_RUN_DIR naming a file, with ``mount``, ``mounts`` and ``umount``.
    Must hold: one line each saying the run directory is not one (exit 10), the file
    untouched. Before, ``mount`` said "[Errno 20] Not a directory: FILE/mounts/..." (exit
    1) and ``mounts`` said there were none."""
    planted = tmp_path / "run-file"
    planted.write_text("mine\n")
    env = {**os.environ, "BLOCKSTORE_RUN_DIR": str(planted)}
    for argv in (
        ["mount", "127.0.0.1:9/a/b:v1", str(mountpoint)],
        ["mounts"],
        ["umount", str(mountpoint)],
    ):
        done = cli(*argv, env=env)
        assert done.returncode == MountError.exit_code, done.stderr
        assert done.stderr == (
            f"blockstore: the run directory {planted} is not a directory: remove it, or "
            "give another as BLOCKSTORE_RUN_DIR\n"
        )
    assert planted.read_text() == "mine\n"


def everything_readable(pids: list[int], *roots: Path) -> dict[str, bytes]:
    """Every place a secret could land: the command lines of ``pids``, the mount table, and
    every file under ``roots`` (the run directory with its records and logs, the cache)."""
    seen = {"/proc/self/mountinfo": Path("/proc/self/mountinfo").read_bytes()}
    for pid in pids:
        seen[f"/proc/{pid}/cmdline"] = Path(f"/proc/{pid}/cmdline").read_bytes()
    for root in roots:
        for path in root.rglob("*"):
            if path.is_file():
                seen[str(path)] = path.read_bytes()
    return seen


def test_login_given_with_o_is_on_no_command_line_record_mount_table_or_log(
    mount_dirs, basic_auth_registry, erofs_images
):
    """Mount from a basic-auth registry with erofs-utils' spellings (``-o oci.username=,
    oci.password=,oci.insecure,oci=0``) and ``-v``, and read through it: the password is
    on no command line of the processes the mount started (server, supervisor, nbdfuse),
    nor the user name; the password is not in /proc/self/mountinfo, the mount record, the
    log, the cache, or any output. A mount with a wrong password fails with the
    authentication exit code and does not repeat it."""
    base, run = mount_dirs
    mnt, cache = base / "mnt", base / "cache"
    mnt.mkdir()
    server = basic_auth_registry
    ref = push_erofs(
        server.host, "auth/secret", "v1", [erofs_images.small.path], options=server.options()
    )
    secret = server.password.encode()
    options = f"oci.username={server.username},oci.password={server.password},oci.insecure,oci=0"

    done = cli("-v", "mount", "--cache-dir", str(cache), "-o", options, ref, str(mnt))
    assert done.returncode == 0, done.stderr
    assert_same_tree(erofs_images.small.tree, mnt)
    listed = cli("mounts", "--json")
    record = records.load(str(mnt))
    started = processes_mentioning(str(run))
    cmdlines = {pid: Path(f"/proc/{pid}/cmdline").read_bytes() for pid in started}
    assert b"nbdfront.mount.supervisor" in cmdlines[record.server.pid], cmdlines
    assert any(b"\0serve\0" in line for line in cmdlines.values()), cmdlines
    assert any(line.startswith(b"nbdfuse") for line in cmdlines.values()), cmdlines
    assert [line for line in cmdlines.values() if server.username.encode() in line] == []

    seen = everything_readable(started, run, cache)
    assert seen[record.log], "the -v log is empty: there was nothing to search"
    seen["output"] = (done.stdout + done.stderr + listed.stdout).encode()
    assert [where for where, text in seen.items() if secret in text] == []
    done = cli("umount", str(mnt))
    assert done.returncode == 0, done.stderr

    wrong = "Wr0ng-pw-" + "x" * 8
    bad = f"oci.username={server.username},oci.password={wrong},oci.insecure"
    failed = cli("-v", "mount", "--cache-dir", str(base / "cache2"), "-o", bad, ref, str(mnt))
    assert failed.returncode == AuthError.exit_code, failed.stderr
    assert wrong not in failed.stdout + failed.stderr
    seen = everything_readable([], run, base / "cache2")
    # Its log held the error alone (already searched, in the output): it is not kept.
    assert not list(run.glob("log/*.log"))
    assert [where for where, text in seen.items() if wrong.encode() in text] == []
