"""A whole run with a password registry, then every trace of it searched for the password.

A registry with htpasswd basic auth and a password made for this test (so
no other process on the machine can hold it) serves an image. The run
mounts it with the password given each way a user can (``-o oci.password=``,
``--password``, ``BLOCKSTORE_PASSWORD``), reads every file, prefetches,
unmounts, and makes errors on purpose with ``-v``. Then every file it left
or held while mounted (run directory, mount records, logs, the cache's
bytes, the home and XDG directories it could write to), every output,
``/proc/self/mountinfo`` and the command line of every process on the
machine while mounted are searched for the password.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from rig.credential_helpers import (
    PassKeyring,
    docker_config_with,
    helper_script,
    why_pass_cannot_run,
)
from rig.pushed import push_erofs
from rig.registry_server import RegistryServer, TokenAuth
from rig.token_issuer import TokenIssuer

from nbdfront.mount import syscall

USER = "carol"
JWT = re.compile(rb"eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.")
BLOCKSTORE = [sys.executable, "-m", "blockstore"]

pytestmark = pytest.mark.slow


def why_mounting_cannot_run() -> str | None:
    if os.geteuid() != 0:
        return "mounting needs root"
    if not os.path.exists("/dev/fuse"):
        return "mounting needs /dev/fuse"
    if shutil.which("nbdfuse") is None:
        return "mounting needs nbdfuse"
    return None


@dataclass
class Evidence:
    """Everything a run wrote or showed, by where it was seen."""

    seen: dict[str, bytes] = field(default_factory=dict)

    def add(self, where: str, content: str | bytes) -> None:
        data = content.encode() if isinstance(content, str) else content
        self.seen[where] = self.seen.get(where, b"") + data

    def files_under(self, root: Path, skip: Path) -> None:
        """Every regular file under ``root`` as it is now (raw bytes, the cache's too),
        except the mounted tree at ``skip``: the image's own files."""
        for directory, subdirectories, names in os.walk(root):
            subdirectories[:] = [d for d in subdirectories if Path(directory, d) != skip]
            for name in sorted(names + subdirectories):
                path = Path(directory, name)
                self.add(f"names under {root}", f"{path}\n")
                with contextlib.suppress(OSError):
                    if path.is_file() and not path.is_symlink():
                        self.add(str(path), path.read_bytes())

    def processes(self) -> None:
        """The command line and name of every process on the machine."""
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit():
                with contextlib.suppress(OSError):
                    self.add(f"/proc/{proc.name}/cmdline", (proc / "cmdline").read_bytes())
                    self.add(f"/proc/{proc.name}/comm", (proc / "comm").read_bytes())

    def mount_table(self) -> None:
        self.add("/proc/self/mountinfo", Path("/proc/self/mountinfo").read_bytes())

    def places_holding(self, secret: str) -> list[str]:
        needle = secret.encode()
        return sorted(where for where, data in self.seen.items() if needle in data)

    def places_with_a_bearer_token(self) -> list[str]:
        """Where a JSON web token (the issuer's bearer tokens) shows: header.payload."""
        return sorted(where for where, data in self.seen.items() if JWT.search(data))


@dataclass
class Run:
    """A sandbox for one run: its own run, cache, home and XDG directories."""

    base: Path
    run_dir: Path
    registry: RegistryServer
    password: str
    reference: str
    tree: Path
    evidence: Evidence

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        for name in ("BLOCKSTORE_USERNAME", "BLOCKSTORE_PASSWORD", "REGISTRY_AUTH_FILE"):
            env.pop(name, None)
        env.update(
            BLOCKSTORE_RUN_DIR=str(self.run_dir),
            BLOCKSTORE_CACHE_DIR=str(self.base / "cache"),
            HOME=str(self.base / "home"),
            XDG_CACHE_HOME=str(self.base / "xdg-cache"),
            XDG_CONFIG_HOME=str(self.base / "xdg-config"),
            XDG_RUNTIME_DIR=str(self.base / "xdg-runtime"),
            DOCKER_CONFIG=str(self.base / "docker"),
        )
        return env

    def blockstore(self, *args: str, expect: int = 0, **env: str) -> subprocess.CompletedProcess:
        """Run the CLI; its outputs become evidence; its exit code must be ``expect``."""
        done = subprocess.run(
            [*BLOCKSTORE, *args],
            capture_output=True,
            text=True,
            timeout=120,
            env={**self.env, **env},
        )
        label = " ".join(a if self.password not in a else "<password>" for a in args)
        self.evidence.add(f"stdout of blockstore {label}", done.stdout)
        self.evidence.add(f"stderr of blockstore {label}", done.stderr)
        assert done.returncode == expect, (label, done.returncode, done.stderr)
        return done

    def everything_on_disk(self) -> None:
        for root in (self.run_dir, self.base):
            self.evidence.files_under(root, skip=self.base / "mnt")


@pytest.fixture
def password_registry(request, tmp_path) -> Iterator[tuple[RegistryServer, str]]:
    """A registry whose only user has a password no one else has: htpasswd basic auth,
    or (parameter ``"token"``) token auth with the test issuer; (parameter ``"commas"``)
    basic auth with a password holding commas."""
    password = f"pw-{secrets.token_hex(12)}"
    if getattr(request, "param", "basic") == "commas":
        password = f"pw,{secrets.token_hex(6)},{secrets.token_hex(6)}"
    if getattr(request, "param", "basic") == "token":
        ca = request.getfixturevalue("test_ca")
        cert, key = ca.issue(f"issuer-{secrets.token_hex(4)}", server=False)
        issuer = TokenIssuer(cert, key, users={USER: password})
        issuer.start()
        request.addfinalizer(issuer.stop)
        auth = {"token": TokenAuth(issuer.realm, issuer.service, issuer.name, ca.cert)}
    else:
        htpasswd = tmp_path / "htpasswd"
        htpasswd.write_bytes(
            subprocess.run(
                ["htpasswd", "-Bbn", USER, password], check=True, capture_output=True
            ).stdout
        )
        auth = {"htpasswd": htpasswd}
    server = RegistryServer(tmp_path / "registry", username=USER, password=password, **auth)
    server.start()
    try:
        yield server, password
    finally:
        server.stop()


@pytest.fixture
def run(password_registry, erofs_images, tmp_path) -> Iterator[Run]:
    reason = why_mounting_cannot_run()
    if reason:
        pytest.skip(reason)
    registry, password = password_registry
    reference = push_erofs(
        registry.host, "private/image", "v1", [erofs_images.small.path], options=registry.options()
    )
    base = tmp_path / "sandbox"
    base.mkdir()
    run_dir = Path(tempfile.mkdtemp(prefix="bs-sec-"))  # short: Unix socket paths
    sandbox = Run(base, run_dir, registry, password, reference, erofs_images.small.tree, Evidence())
    try:
        yield sandbox
    finally:
        _undo_mounts(sandbox)
        shutil.rmtree(run_dir, ignore_errors=True)


def _undo_mounts(run: Run) -> None:
    """Whatever a failed run left: mounts under the sandbox, then its processes."""
    roots = (str(run.base) + "/", str(run.run_dir) + "/")
    for point in sorted(syscall.mounted(), key=len, reverse=True):
        if point.startswith(roots):
            subprocess.run(["umount", "-l", point], capture_output=True)
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            with contextlib.suppress(OSError):
                cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
                if any(root.rstrip("/") in cmdline for root in roots):
                    os.kill(int(proc.name), signal.SIGKILL)


def _read_tree(mountpoint: Path, tree: Path) -> int:
    """Read every file through the mount and compare it with the source tree."""
    count = 0
    for source in tree.rglob("*"):
        if source.is_file() and not source.is_symlink():
            mounted = mountpoint / source.relative_to(tree)
            assert mounted.read_bytes() == source.read_bytes(), mounted
            count += 1
    return count


def _ways(password: str) -> dict[str, tuple[list[str], list[str], dict[str, str]]]:
    """Each way to give the password: mount's arguments, prefetch's, and the environment."""
    flags = ["--insecure", "--username", USER, "--password", password]
    env = {"BLOCKSTORE_USERNAME": USER, "BLOCKSTORE_PASSWORD": password}
    erofs_utils = ["-o", f"oci.username={USER},oci.password={password},oci.insecure"]
    return {
        "-o oci.password=": (erofs_utils, flags, {}),
        "--password": (flags, flags, {}),
        "BLOCKSTORE_PASSWORD": (["--insecure"], ["--insecure"], env),
    }


@pytest.mark.parametrize("password_registry", ["basic", "token"], indirect=True)
@pytest.mark.parametrize("way", list(_ways("")))
def test_mount_read_prefetch_umount_never_write_the_password(run, way):
    """Against a basic-auth and a token-auth registry: mount with the password given one
    way, with -v; read every file; list the mounts; prefetch; unmount. While mounted and
    after, no file in the run directory (records, sockets, logs), no cache byte, no
    output, no mount table entry and no process's command line holds the password, or
    a bearer token from the issuer."""
    args, prefetch_args, env = _ways(run.password)[way]
    _mount_read_prefetch_umount(run, args, prefetch_args, env)
    assert run.evidence.places_holding(run.password) == []
    assert run.evidence.places_with_a_bearer_token() == []


def _mount_read_prefetch_umount(
    run: Run, args: list[str], prefetch_args: list[str], env: dict[str, str]
) -> None:
    """With -v: mount, read every file, list the mounts, unmount, prefetch; everything on
    disk and every process's command line taken as evidence while mounted and after."""
    mnt = run.base / "mnt"
    mnt.mkdir()
    cache = ["--cache-dir", str(run.base / "cache")]
    run.blockstore("-v", "mount", *cache, *args, run.reference, str(mnt), **env)
    assert _read_tree(mnt, run.tree) > 0
    run.blockstore("-v", "mounts", "--json")
    run.evidence.processes()
    run.evidence.mount_table()
    run.everything_on_disk()  # records, sockets and the server's log, while they exist
    run.blockstore("-v", "umount", str(mnt))
    run.blockstore("-v", "prefetch", *cache, *prefetch_args, run.reference, **env)
    run.evidence.mount_table()
    run.everything_on_disk()
    # The search looks where a leak would land: the server's log and the cache hold the
    # reference, as they must, so they were read.
    holding_reference = run.evidence.places_holding(run.reference)
    assert any(where.endswith(".log") for where in holding_reference), holding_reference
    assert any(where.endswith("data.mdb") for where in holding_reference), holding_reference


def test_a_login_from_a_credential_helper_is_never_written(run, tmp_path):
    """Tried: the registry's login kept only by the real ``docker-credential-pass``
    (``credsStore`` of the run's docker config, its keyring outside the sandbox): mount,
    read every file, list the mounts, unmount, prefetch, with -v; then, with -v, an
    ``inspect`` whose helper answers that password in a Secret no header can carry
    (exit 4). Must hold: the mount and prefetch go with the helper's login, and no
    output, log, record, cache byte, mount table line or command line holds the
    password; the refusal of the bad Secret repeats none of it."""
    reason = why_pass_cannot_run()
    if reason:
        pytest.skip(reason)
    keyring = PassKeyring(tmp_path / "keyring")
    try:
        keyring.store(run.registry.host, USER, run.password)
        docker_config_with(run.base / "docker", {"credsStore": "pass"})
        _mount_read_prefetch_umount(run, ["--insecure"], ["--insecure"], keyring.env)
        bad = f'{{"Username": "{USER}", "Secret": "{run.password}\\r\\nX: 1"}}'
        helper_script(tmp_path / "helpers", "bad", f"printf '%s' '{bad}'")
        docker_config_with(run.base / "docker", {"credsStore": "bad"})
        path = f"{tmp_path / 'helpers'}{os.pathsep}{os.environ['PATH']}"
        refused = run.blockstore("-v", "inspect", "--insecure", run.reference, expect=4, PATH=path)
        assert "docker-credential-bad answered a login no request can carry" in refused.stderr
    finally:
        keyring.close()
    run.everything_on_disk()
    assert run.evidence.places_holding(run.password) == []


@pytest.mark.parametrize("password_registry", ["commas"], indirect=True)
def test_a_password_holding_commas_is_given_quoted_and_never_echoed_in_part(run):
    """Tried: a registry password holding commas given to mount with ``-o
    oci.password=``, first as it is (its commas split it into options), then in double
    quotes, as mount(8) takes a value holding commas. Must hold: the first is refused
    (exit 2) saying to quote it, repeating no piece of the password; the second mounts
    and the image reads whole, and no output, record, log or command line holds a piece
    of the password. Before, the first said "unknown mount option 'PIECE'", a piece of
    the password, and a password holding a comma could not be given with -o at all."""
    mnt = run.base / "mnt"
    mnt.mkdir()
    cache = ["--cache-dir", str(run.base / "cache")]
    given = f"oci.username={USER},oci.password={run.password},oci.insecure"
    refused = run.blockstore("mount", *cache, "-o", given, run.reference, str(mnt), expect=2)
    assert 'a password holding a comma goes in double quotes (oci.password="...")' in (
        refused.stderr
    )
    quoted = f'oci.username={USER},oci.password="{run.password}",oci.insecure'
    run.blockstore("mount", *cache, "-o", quoted, run.reference, str(mnt))
    assert _read_tree(mnt, run.tree) > 0
    run.blockstore("mounts", "--json")
    run.evidence.processes()
    run.everything_on_disk()
    run.blockstore("umount", str(mnt))
    run.everything_on_disk()
    for piece in run.password.split(",")[1:]:
        assert run.evidence.places_holding(piece) == []


def test_errors_on_purpose_never_repeat_a_password(run):
    """With -v: a wrong password to mount and inspect (exit 4) and a mount of an image
    never cached while offline (exit 9) name no password, the wrong one included, in
    any output, log, record or cache file."""
    wrong = f"wrong-{secrets.token_hex(8)}"
    mnt = run.base / "mnt"
    mnt.mkdir()
    cache = ["--cache-dir", str(run.base / "cache")]
    creds = ["--insecure", "--username", USER]
    run.blockstore("-v", "mount", *cache, *creds, "--password", wrong, run.reference, str(mnt),
                   expect=4)  # fmt: skip
    run.blockstore("-v", "inspect", *creds, "--password", wrong, run.reference, expect=4)
    run.blockstore("-v", "mount", "--offline", *cache, *creds, "--password", run.password,
                   run.reference, str(mnt), expect=9)  # fmt: skip
    run.everything_on_disk()
    assert run.evidence.places_holding(wrong) == []
    assert run.evidence.places_holding(run.password) == []


def test_a_reference_carrying_credentials_is_refused_without_echoing_them(run):
    """``user:password@host/repo:tag`` is not a reference: inspect, mount and prefetch
    refuse it (usage error, exit 2) and their messages, with -v, do not repeat the
    password."""
    mnt = run.base / "mnt"
    mnt.mkdir()
    bad = f"{USER}:{run.password}@{run.registry.host}/private/image:v1"
    run.blockstore("-v", "inspect", "--insecure", bad, expect=2)
    run.blockstore("-v", "mount", "--insecure", bad, str(mnt), expect=2)
    run.blockstore("-v", "prefetch", "--insecure", bad, expect=2)
    run.everything_on_disk()
    assert run.evidence.places_holding(run.password) == []


def test_an_offline_miss_names_no_password(run):
    """Mounted once with the password (no readahead, no start-up fetch: only what the
    mount itself reads is cached), then mounted --offline with -v and read whole: the
    reads of chunks never fetched fail with EIO, and neither the failing reads' log
    lines nor anything else holds the password."""
    mnt = run.base / "mnt"
    mnt.mkdir()
    cache = ["--cache-dir", str(run.base / "cache")]
    lean = ["--no-readahead", "--no-erofs-start", "--no-erofs-walk", "--no-trace"]
    env = {"BLOCKSTORE_USERNAME": USER, "BLOCKSTORE_PASSWORD": run.password}
    run.blockstore("-v", "mount", "--insecure", *cache, *lean, run.reference, str(mnt), **env)
    run.blockstore("umount", str(mnt))
    run.blockstore("-v", "mount", "--offline", *cache, *lean, run.reference, str(mnt), **env)
    failures: list[OSError] = []
    for directory, _, names in os.walk(mnt, onerror=failures.append):
        for name in names:
            try:
                (Path(directory) / name).read_bytes()
            except OSError as exc:
                failures.append(exc)
    assert failures, "every file was cached: no offline miss was tried"
    assert {exc.errno for exc in failures} == {errno.EIO}, failures[:3]
    run.evidence.processes()
    run.everything_on_disk()  # the server's log names the missing chunks
    run.blockstore("-v", "umount", str(mnt))
    run.everything_on_disk()
    logs_of_misses = [w for w in run.evidence.places_holding("not cached") if w.endswith(".log")]
    assert logs_of_misses, "the server's log of the misses was not searched"
    assert run.evidence.places_holding(run.password) == []
