"""What a failed ``blockstore mount`` leaves behind: nothing it made."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from mount_trees import assert_same_tree
from rig.credential_helpers import (
    PassKeyring,
    docker_config_with,
    helper_script,
    why_pass_cannot_run,
)
from rig.processes import free_port
from rig.pushed import push_erofs

from blockstore.errors import AuthError, NotFound, RegistryUnreachable
from blockstore.openers import processes_using
from nbdfront.mount import records

BLOCKSTORE = [sys.executable, "-m", "blockstore"]


def _without_a_cache(home: Path) -> dict[str, str]:
    """An environment whose cache is the default one, in ``home``, not made yet."""
    env = {
        k: v for k, v in os.environ.items() if k not in ("BLOCKSTORE_CACHE_DIR", "XDG_CACHE_HOME")
    }
    return {**env, "HOME": str(home)}


@pytest.fixture
def refused(request, registry, basic_auth_registry, erofs_images) -> tuple[list[str], int]:
    """The image arguments of a mount the registry side refuses, and the exit code."""
    if request.param == "unreachable":
        return [f"127.0.0.1:{free_port()}/a/b:v1", "--insecure"], RegistryUnreachable.exit_code
    if request.param == "unknown image":
        return [f"{registry.host}/no/such:v1", "--insecure"], NotFound.exit_code
    server = basic_auth_registry
    ref = push_erofs(
        server.host, "left/auth", "v1", [erofs_images.small.path], options=server.options()
    )
    login = ["--username", server.username, "--password", "not-the-password"]
    return [ref, "--insecure", *login], AuthError.exit_code


@pytest.mark.parametrize(
    "refused", ["unreachable", "unknown image", "wrong password"], indirect=True
)
def test_a_first_mount_the_registry_refuses_leaves_no_cache(mount_dirs, mountpoint, refused):
    """With no cache yet, a mount that fails at the registry (no such host, no such image,
    a wrong password) exits with that cause's code and leaves no cache directory: before,
    an empty ``~/.cache/blockstore`` (LMDB files and all) stayed, made by the server."""
    base, _ = mount_dirs
    home = base / "home"
    home.mkdir()
    argv, code = refused
    done = subprocess.run(
        [*BLOCKSTORE, "mount", *argv, str(mountpoint)],
        capture_output=True,
        text=True,
        timeout=60,
        env=_without_a_cache(home),
    )
    assert done.returncode == code, done.stderr
    assert list(home.iterdir()) == [], list(home.rglob("*"))


@pytest.mark.parametrize("refused", ["unreachable", "unknown image"], indirect=True)
def test_a_first_mount_that_fails_leaves_no_run_directory(
    mount_dirs, mountpoint, refused, monkeypatch
):
    """Tried: a first mount (its run directory, and that directory's parent, not made
    yet) that the registry side refuses, then ``blockstore mounts``. Must hold: the mount
    exits with the cause's code and leaves nothing of the run directory, nor the parent
    it made for it; ``mounts`` lists none and makes nothing either. Before, the run
    directory stayed with an empty ``mounts/`` and ``log/`` in it."""
    base, run = mount_dirs
    first = run / "parent" / "run"
    monkeypatch.setenv("BLOCKSTORE_RUN_DIR", str(first))
    argv, code = refused
    done = subprocess.run(
        [*BLOCKSTORE, "mount", *argv, "--cache-dir", str(base / "cache"), str(mountpoint)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == code, done.stderr
    assert list(run.iterdir()) == [], list(run.rglob("*"))
    listed = subprocess.run([*BLOCKSTORE, "mounts"], capture_output=True, text=True, timeout=60)
    assert (listed.returncode, listed.stdout.strip()) == (0, "no blockstore mounts"), listed
    assert list(run.iterdir()) == []


def test_a_failed_first_mount_leaves_the_run_directory_another_mount_is_making(
    mount_dirs, mountpoint, monkeypatch
):
    """Tried: a first mount that fails (no registry there) while another mount is being
    made with the same new run directory (this process, holding it as ``mount`` does
    until its record and log are made). Must hold: the failed one removes nothing of
    the run directory, which the other is about to use."""
    base, run = mount_dirs
    first = run / "run"
    monkeypatch.setenv("BLOCKSTORE_RUN_DIR", str(first))
    ref = f"127.0.0.1:{free_port()}/a/b:v1"
    argv = [ref, "--insecure", "--cache-dir", str(base / "cache"), str(mountpoint)]
    with records.run_dirs_made():
        done = subprocess.run(
            [*BLOCKSTORE, "mount", *argv],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == RegistryUnreachable.exit_code, done.stderr
        assert sorted(p.name for p in first.iterdir()) == ["log", "mounts"]


KILLED_WRITING = """
import resource, signal, sys
from blockstore.cli import main
# Past 1 KiB a write kills the process as SIGKILL would: no cleanup runs. The mount's
# first write of more is its check for room in the run directory.
signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
resource.setrlimit(resource.RLIMIT_FSIZE, (1024, resource.RLIM_INFINITY))
sys.exit(main(sys.argv[1:]))
"""


def test_a_mount_killed_checking_for_room_leaves_a_failed_first_mount_no_trace(
    mount_dirs, mountpoint, monkeypatch
):
    """Tried: a first mount (this process, making the run directory as ``mount`` does)
    during which another mount is killed (no cleanup runs) while it writes to check the
    run directory's disk has room; then the first one fails. Must hold: the killed one
    left nothing in ``mounts/``, and the failed one removes the run directory it made.
    Before, the killed one left ``mounts/.room-probe-PID``, and the run directory stayed
    for good."""
    base, run = mount_dirs
    first = run / "run"
    monkeypatch.setenv("BLOCKSTORE_RUN_DIR", str(first))
    ref = f"127.0.0.1:{free_port()}/a/b:v1"
    argv = ["mount", ref, "--insecure", "--cache-dir", str(base / "cache"), str(mountpoint)]
    with pytest.raises(RegistryUnreachable), records.run_dirs_made():
        killed = subprocess.run(
            [sys.executable, "-c", KILLED_WRITING, *argv], capture_output=True, timeout=60
        )
        assert killed.returncode == -signal.SIGXFSZ, killed.stderr
        assert list((first / "mounts").iterdir()) == []
        raise RegistryUnreachable("the first mount fails")
    assert list(run.iterdir()) == [], list(run.rglob("*"))


@pytest.mark.parametrize("command", ["serve", "prefetch"])
def test_a_first_serve_or_prefetch_that_fails_leaves_no_cache(command: str, tmp_path: Path):
    """The same for the other commands that make a cache, with the cache's parents: a
    ``--cache-dir`` whose directories did not exist is gone again, while one the cache
    was made in that existed stays."""
    cache = tmp_path / "made" / "for" / "it"
    where = ["--listen", "127.0.0.1:0"] if command == "serve" else []
    done = subprocess.run(
        [
            *BLOCKSTORE,
            command,
            f"127.0.0.1:{free_port()}/a/b:v1",
            "--insecure",
            *where,
            "--cache-dir",
            str(cache),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == RegistryUnreachable.exit_code, done.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_mount_keeps_no_hold_on_the_directory_it_was_made_from(
    mount_dirs, pushed_images, erofs_images
):
    """``mount`` run in a directory, with paths relative to it: its background processes
    (the server, its supervisor, nbdfuse) run in ``/``, so that directory (a USB stick,
    another mount) can be unmounted while the image stays mounted. Before, each kept it as
    its working directory for as long as the mount stood."""
    base, _ = mount_dirs
    work = base / "work"
    (work / "mnt").mkdir(parents=True)
    done = subprocess.run(
        [*BLOCKSTORE, "mount", pushed_images.small, "mnt", "--insecure", "--cache-dir", "../c"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=work,
    )
    assert done.returncode == 0, done.stderr
    try:
        assert processes_using(str(work)) == []
        assert (base / "c").is_dir()
        assert_same_tree(erofs_images.small.tree, work / "mnt")
    finally:
        subprocess.run([*BLOCKSTORE, "umount", str(work / "mnt")], check=True, timeout=60)


def _python_without_blockstore(where: Path) -> Path:
    """An interpreter with this one's packages but not blockstore's: as one whose code
    is found only in the directory it is run from (``python -m blockstore`` in a
    checkout that was never installed)."""
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(where)], check=True, timeout=60
    )
    python = where / "bin" / "python"
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    theirs = subprocess.run(
        [python, "-c", purelib], capture_output=True, text=True, check=True
    ).stdout.strip()
    ours = [path for path in sys.path if path.endswith(("site-packages", "dist-packages"))]
    (Path(theirs) / "packages.pth").write_text("\n".join(ours) + "\n")
    return python


def test_a_mount_from_a_checkout_serves_with_the_code_it_was_run_with(
    mount_dirs, pushed_images, erofs_images
):
    """``python -m blockstore mount`` in a source tree that is not installed: the server
    and its supervisor run in ``/``, and still find the code the mount command ran, as
    ``python -m`` found it in the working directory. Before, they died at once with
    "No module named" and the mount failed."""
    import blockstore

    base, _ = mount_dirs
    python = _python_without_blockstore(base / "py")
    checkout = Path(blockstore.__file__).resolve().parent.parent
    lost = subprocess.run([python, "-c", "import blockstore"], capture_output=True, cwd="/")
    assert lost.returncode != 0, "the interpreter finds blockstore without the checkout"
    mountpoint = base / "mnt"
    mountpoint.mkdir()
    options = ["--insecure", "--cache-dir", str(base / "c")]
    done = subprocess.run(
        [python, "-m", "blockstore", "mount", pushed_images.small, str(mountpoint), *options],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=checkout,
    )
    assert done.returncode == 0, done.stderr
    try:
        assert_same_tree(erofs_images.small.tree, mountpoint)
    finally:
        subprocess.run([*BLOCKSTORE, "umount", str(mountpoint)], check=True, timeout=60)


@pytest.fixture
def relative_environment(request, basic_auth_registry, tls_registry, test_ca, erofs_images):
    """An image, the options that reach it, and what its access needs in files named by
    an environment variable relative to the working directory, as ``(name, relative
    path, content)``: a login in ``$XDG_RUNTIME_DIR/containers/auth.json``, a CA in
    ``$SSL_CERT_FILE``."""
    if request.param == "XDG_RUNTIME_DIR":
        server = basic_auth_registry
        ref = push_erofs(
            server.host, "rel/xdg", "v1", [erofs_images.small.path], options=server.options()
        )
        login = base64.b64encode(f"{server.username}:{server.password}".encode()).decode()
        auth = json.dumps({"auths": {server.host: {"auth": login}}})
        return ref, ["--insecure"], ("XDG_RUNTIME_DIR", "xdg/containers/auth.json", auth)
    server = tls_registry
    ref = push_erofs(
        server.host, "rel/ca", "v1", [erofs_images.small.path], options=server.options()
    )
    return ref, [], ("SSL_CERT_FILE", "ca.pem", test_ca.cert.read_text())


@pytest.mark.parametrize(
    "relative_environment", ["XDG_RUNTIME_DIR", "SSL_CERT_FILE"], indirect=True
)
def test_a_relative_environment_path_reaches_the_server_absolute(
    mount_dirs, relative_environment, erofs_images
):
    """``$XDG_RUNTIME_DIR`` (where a login is found) and ``$SSL_CERT_FILE`` (the CA that
    vouches for the registry) relative to the directory ``mount`` was run in: the server,
    which runs in ``/``, gets them absolute and reaches the image. Before, it looked for
    them under ``/``, and the mount failed as refused by the registry."""
    base, _ = mount_dirs
    ref, options, (name, relative, content) = relative_environment
    work = base / "work"
    (work / relative).parent.mkdir(parents=True, exist_ok=True)
    (work / relative).write_text(content)
    (work / "mnt").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BLOCKSTORE_CACHE")}
    done = subprocess.run(
        [*BLOCKSTORE, "mount", ref, "mnt", *options, "--cache-dir", str(base / "c")],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=work,
        env={**env, name: relative.split("/")[0] if name == "XDG_RUNTIME_DIR" else relative},
    )
    assert done.returncode == 0, done.stderr
    try:
        assert_same_tree(erofs_images.small.tree, work / "mnt")
    finally:
        subprocess.run([*BLOCKSTORE, "umount", str(work / "mnt")], check=True, timeout=60)


@pytest.fixture
def helper_through_relative_paths(request, basic_auth_registry, erofs_images, mount_dirs):
    """An image of the basic-auth registry, and a working directory whose config.json
    leaves its login to a credential helper found only through paths relative to it: a
    helper script in ``bin`` (``$PATH`` holding ``bin``), or the real
    ``docker-credential-pass`` over a keyring in ``keyring`` (``$GNUPGHOME``,
    ``$PASSWORD_STORE_DIR``). Yields the reference, the directory and the environment."""
    server = basic_auth_registry
    ref = push_erofs(
        server.host, "rel/helper", "v1", [erofs_images.small.path], options=server.options()
    )
    work = Path(tempfile.mkdtemp(prefix="bs-w-"))  # short: gpg-agent's socket is in it
    env = {k: v for k, v in os.environ.items() if not k.startswith("BLOCKSTORE_CACHE")}
    keyring = None
    if request.param == "PATH":
        login = json.dumps({"Username": server.username, "Secret": server.password})
        helper_script(work / "bin", "relative", f"printf '%s' '{login}'")
        env["PATH"] = f"bin{os.pathsep}{env['PATH']}"
        helper = "relative"
    else:
        reason = why_pass_cannot_run()
        if reason:
            pytest.skip(reason)
        keyring = PassKeyring(work / "keyring")
        keyring.store(server.host, server.username, server.password)
        env |= {name: os.path.relpath(path, work) for name, path in keyring.env.items()}
        helper = "pass"
    docker_config_with(work / "docker", {"credHelpers": {server.host: helper}})
    try:
        yield ref, work, {**env, "DOCKER_CONFIG": "docker"}
    finally:
        if keyring is not None:
            keyring.close()
        shutil.rmtree(work, ignore_errors=True)


@pytest.mark.parametrize(
    "helper_through_relative_paths", ["PATH", "GNUPGHOME and PASSWORD_STORE_DIR"], indirect=True
)
def test_a_credential_helper_found_through_relative_paths_gives_the_server_its_login(
    helper_through_relative_paths, erofs_images
):
    """Tried: ``mount`` of an image whose login a credential helper keeps, with the
    helper, or the keyring it reads, found through entries of ``$PATH`` (``bin``) or
    ``$GNUPGHOME``/``$PASSWORD_STORE_DIR`` relative to the working directory, as a
    shell's ``PATH=./bin:$PATH`` has it. Must hold: the server, which runs in ``/``,
    finds the helper and its keyring as the mount command would, and the image mounts
    and reads whole."""
    ref, work, env = helper_through_relative_paths
    (work / "mnt").mkdir()
    done = subprocess.run(
        [*BLOCKSTORE, "mount", ref, "mnt", "--insecure", "--cache-dir", str(work / "c")],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=work,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    try:
        assert_same_tree(erofs_images.small.tree, work / "mnt")
    finally:
        subprocess.run([*BLOCKSTORE, "umount", str(work / "mnt")], check=True, timeout=60)


def test_a_failed_first_command_keeps_a_directory_the_cache_path_reaches_through_dotdot(
    tmp_path: Path,
):
    """``--cache-dir typo/../mine``, where ``mine`` is a directory of the user's and
    ``typo`` does not exist: the cache is made in ``mine``, and a command that then fails
    at the registry leaves ``mine`` where it was. Before, the path, not there as
    written, was taken for one the command made, and ``mine`` was removed."""
    mine = tmp_path / "mine"
    mine.mkdir()
    cache = tmp_path / "typo" / ".." / "mine"
    image = f"127.0.0.1:{free_port()}/a/b:v1"
    done = subprocess.run(
        [*BLOCKSTORE, "prefetch", image, "--insecure", "--cache-dir", str(cache)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == RegistryUnreachable.exit_code, done.stderr
    assert mine.is_dir()
