"""Usage errors: one line, by the command that got them, pointing at its --help."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys

import pytest


def blockstore(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "blockstore", *args], capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize(
    ("argv", "prog", "said"),
    [
        ([], "blockstore", "the following arguments are required: COMMAND"),
        (["nosuch"], "blockstore", "invalid choice: 'nosuch'"),
        (["--bogus", "mounts"], "blockstore", "unrecognized arguments: --bogus"),
        (["mount", "h/i:v", "/mnt", "--cache-size", "10X"], "blockstore mount", "not a size"),
        (["serve"], "blockstore serve", "required: IMAGE"),
        (["cache"], "blockstore cache", "required: ACTION"),
        (["trace", "import"], "blockstore trace import", "required: FILE"),
        (["umount"], "blockstore umount", "required: MOUNTPOINT"),
        (["prefetch", "h/i:v", "--offline"], "blockstore prefetch", "unrecognized arguments"),
        (["mount", "h/i:v", "/mnt", "-v"], "blockstore mount", "go before the command"),
    ],
)
def test_a_usage_error_is_one_line_naming_its_command(argv, prog, said):
    """No usage block before the error: the line names the command that got the bad
    arguments (a subcommand's unknown option too) and where its usage is, exit 2."""
    shown = blockstore(*argv)
    assert shown.returncode == 2, shown.stderr
    assert shown.stderr.count("\n") == 1, shown.stderr
    assert shown.stderr.startswith(f"{prog}: error: ") and said in shown.stderr
    assert shown.stderr.rstrip().endswith(f"(usage: {prog} --help)")


@pytest.mark.parametrize(
    ("argv", "prog", "said"),
    [
        (["--insecure", "mount", "h/i:v", "/mnt"], "blockstore", "blockstore mount --insecure"),
        (["--json", "mounts"], "blockstore", "blockstore mounts --json"),
        (["--cache-dir", "/c", "cache", "ls"], "blockstore", "blockstore cache ls --cache-dir"),
        (["--cache-dir=/c", "cache", "ls"], "blockstore", "blockstore cache ls --cache-dir"),
        (
            ["cache", "--cache-dir", "/c", "ls"],
            "blockstore cache",
            "blockstore cache ls --cache-dir",
        ),
    ],
)
def test_an_option_before_its_command_is_shown_where_it_goes(argv, prog, said):
    """Tried: a command's option given before the command, as a newcomer writes it.
    Must hold: one line saying where it goes. Before, argparse took the option's value
    for the command ("invalid choice: '/c'") or said only "unrecognized arguments"."""
    shown = blockstore(*argv)
    assert shown.returncode == 2, shown.stderr
    assert shown.stderr.count("\n") == 1, shown.stderr
    assert shown.stderr.startswith(f"{prog}: error: "), shown.stderr
    assert f"goes after the command: {said} ..." in shown.stderr, shown.stderr


@pytest.mark.parametrize(
    "command", [["mount"], ["serve"], ["prefetch"], ["inspect"], ["index"], ["trace", "push"]]
)
@pytest.mark.parametrize("named", ["image.erofs", "./image.erofs", "{dir}/image.erofs"])
def test_a_local_image_file_named_as_the_image_says_to_push_it(
    tmp_path, erofs_images, command, named
):
    """Tried: an EROFS file built here named where the image reference goes, as a
    newcomer tries first. Must hold: exit 2, one line saying it is a local file and how
    to push it; no cache made, nothing asked of any registry. Before, ``image.erofs``
    was taken for the Docker Hub image ``library/image.erofs`` (exit 5 offline, after a
    cache was made) and ``./image.erofs`` for an invalid reference; ``trace push``, which
    asks the registry too, took it so after the others no longer did."""
    (tmp_path / "image.erofs").write_bytes(erofs_images.small.path.read_bytes())
    given = named.format(dir=tmp_path)
    argv = [sys.executable, "-m", "blockstore", *command, given]
    argv += [str(tmp_path / "mnt")] if command == ["mount"] else []
    env = {**os.environ, "BLOCKSTORE_CACHE_DIR": str(tmp_path / "cache")}
    shown = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env)
    assert shown.returncode == 2, shown.stderr
    assert shown.stderr.count("\n") == 1, shown.stderr
    assert f"{given} is a local file" in shown.stderr
    assert f"blockstore push {given} HOST[:PORT]/NAME:TAG" in shown.stderr
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("first", ["layer.tar", "127.0.0.1:5000/tools/app:v1"])
def test_a_local_layer_file_named_as_the_image_to_push_to_says_the_image_goes_last(
    tmp_path, erofs_images, first
):
    """Tried: ``push layer.tar image.erofs``, two layer files and no image (the image
    forgotten), and ``push HOST/NAME:TAG image.erofs``, the image and the file swapped.
    Must hold: exit 2, one line saying the last argument is a local file and that the
    image to push to goes last, as ``push`` takes them; nothing asked of any registry.
    Before, the first pushed ``layer.tar`` to the Docker Hub image ``library/image.erofs``
    (exit 5 offline, a login asked online) and the second said only that no file
    ``HOST/NAME:TAG`` exists."""
    (tmp_path / "image.erofs").write_bytes(erofs_images.small.path.read_bytes())
    (tmp_path / "layer.tar").write_bytes(bytes(10240))
    argv = [sys.executable, "-m", "blockstore", "push", first, "image.erofs"]
    shown = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert shown.returncode == 2, shown.stderr
    assert shown.stderr.count("\n") == 1, shown.stderr
    assert "image.erofs is a local file" in shown.stderr, shown.stderr
    assert "blockstore push FILE... HOST[:PORT]/NAME:TAG" in shown.stderr, shown.stderr


@pytest.mark.parametrize(
    "start",
    [
        bytes(10240),
        b"\x50\x2a\x4d\x18" + (4).to_bytes(4, "little") + bytes(4) + b"\x28\xb5\x2f\xfd",
    ],
    ids=["empty-tar", "pzstd"],
)
def test_an_empty_tar_or_a_pzstd_layer_named_as_the_image_says_to_push_it(tmp_path, start):
    """Tried: an empty tar (zero blocks), and a file that starts as ``pzstd``'s output
    does (a skippable frame), named where the image reference goes. Must hold: exit 2,
    saying it is a local file to push, as for any layer file ``push`` takes. Before,
    each was taken for a Docker Hub image name."""
    (tmp_path / "layer").write_bytes(start + bytes(64))
    env = {**os.environ, "BLOCKSTORE_CACHE_DIR": str(tmp_path / "cache")}
    argv = [sys.executable, "-m", "blockstore", "inspect", "layer"]
    shown = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env)
    assert shown.returncode == 2, shown.stderr
    assert "layer is a local file" in shown.stderr


def test_a_cache_cap_given_to_a_command_that_only_looks_says_why(tmp_path):
    """``cache ls --cache-size`` is refused saying which commands take a cap, and why."""
    shown = blockstore("cache", "ls", "--cache-size", "10G", "--cache-dir", str(tmp_path))
    assert shown.returncode == 2 and shown.stderr.count("\n") == 1, shown.stderr
    assert "cache ls takes no --cache-size" in shown.stderr
    assert "mount, serve, prefetch, index" in shown.stderr and "cache gc" in shown.stderr


@pytest.mark.parametrize("command", [["serve", "h/i:v"], ["mount", "h/i:v", "/mnt"]])
def test_a_bad_metrics_address_is_shown_a_metrics_example(command):
    """The example a bad --metrics gets is a metrics port, not the NBD port 10809."""
    shown = blockstore(*command, "--metrics", ":abc")
    assert shown.returncode == 2 and shown.stderr.count("\n") == 1, shown.stderr
    assert "try 127.0.0.1:9109" in shown.stderr and "10809" not in shown.stderr


def test_a_user_name_without_a_password_says_how_to_give_one(tmp_path, monkeypatch):
    """--username with no password anywhere (no option, environment or login file for the
    registry) would go anonymous: it is refused saying how to give the password."""
    monkeypatch.delenv("BLOCKSTORE_PASSWORD", raising=False)
    monkeypatch.delenv("REGISTRY_AUTH_FILE", raising=False)
    monkeypatch.delenv("DOCKER_CONFIG", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    shown = blockstore("inspect", "127.0.0.1:9/a:v1", "--insecure", "--username", "alice")
    assert shown.returncode == 2 and shown.stderr.count("\n") == 1, shown.stderr
    assert "without a password" in shown.stderr
    assert "--password" in shown.stderr and "$BLOCKSTORE_PASSWORD" in shown.stderr
    monkeypatch.setenv("BLOCKSTORE_PASSWORD", "pw")
    given = blockstore("inspect", "127.0.0.1:9/a:v1", "--insecure", "--username", "alice")
    assert given.returncode == 5, given.stderr  # on to the registry, which is not there


def test_a_user_name_from_the_environment_without_a_password_is_refused(tmp_path, monkeypatch):
    """Tried: $BLOCKSTORE_USERNAME set, with no password anywhere. Must hold: exit 2 naming
    $BLOCKSTORE_USERNAME, as for --username. Before, the name was dropped without a word
    and the registry's 401 left the user guessing why their login was not used."""
    monkeypatch.delenv("BLOCKSTORE_PASSWORD", raising=False)
    monkeypatch.delenv("REGISTRY_AUTH_FILE", raising=False)
    monkeypatch.delenv("DOCKER_CONFIG", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    monkeypatch.setenv("BLOCKSTORE_USERNAME", "alice")
    shown = blockstore("inspect", "127.0.0.1:9/a:v1", "--insecure")
    assert shown.returncode == 2 and shown.stderr.count("\n") == 1, shown.stderr
    assert "$BLOCKSTORE_USERNAME was given without a password" in shown.stderr
    # Another user's login for the registry does not stand in for alice's password.
    logins = {"auths": {"127.0.0.1:9": {"auth": base64.b64encode(b"bob:pw").decode()}}}
    (tmp_path / ".docker").mkdir()
    (tmp_path / ".docker" / "config.json").write_text(json.dumps(logins))
    other = blockstore("inspect", "127.0.0.1:9/a:v1", "--insecure")
    assert other.returncode == 2, other.stderr
    monkeypatch.setenv("BLOCKSTORE_PASSWORD", "pw")
    given = blockstore("inspect", "127.0.0.1:9/a:v1", "--insecure")
    assert given.returncode == 5, given.stderr  # on to the registry, which is not there


@pytest.mark.parametrize("argv", [["mounts"], ["umount", "--help"]])
def test_commands_that_open_no_cache_do_not_load_it(argv, tmp_path):
    """Tried: ``mounts`` with nothing mounted, and the parser of ``umount``, run with the
    modules each loads recorded. Must hold: neither LMDB nor the cache's read path
    (fetch, prefetch) nor the registry's HTTP stack is loaded: each costs start-up time
    on every call, and the CLI loads them only where a command needs them."""
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['blockstore', *{argv!r}]\n"
        "try:\n"
        "    runpy.run_module('blockstore', run_name='__main__')\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = ('lmdb', 'blockstore.cache', 'blockstore.fetch', 'requests')\n"
        "print(sorted(m for m in sys.modules if m in heavy))\n"
    )
    env = {**os.environ, "BLOCKSTORE_RUN_DIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env
    )
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout + done.stderr


def test_version_is_told_not_asked_for_a_command():
    """Tried: ``blockstore --version``. Must hold: exit 0 and one line, ``blockstore``
    and the version pyproject.toml gives. Before, it was a usage error (exit 2) saying
    a COMMAND is required."""
    import tomllib
    from pathlib import Path

    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    version = tomllib.loads(pyproject.read_text())["project"]["version"]
    done = blockstore("--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"blockstore {version}\n"


@pytest.mark.parametrize(
    ("image", "hinted"),
    [("tools/rootfs:v1", True), ("docker.io/tools/rootfs:v1", False)],
)
def test_docker_hub_out_of_reach_for_an_image_named_without_a_host_says_why_it_was_asked(
    monkeypatch, capsys, tmp_path, image, hinted
):
    """Tried: ``inspect`` of an image written without a registry host, Docker Hub's
    address not resolving (a machine with no way out, as a user of a local registry
    has). Must hold: exit 4, the unreachable registry named, and a second line saying such
    a name is looked up on Docker Hub and how to name another registry; not said when
    the user named Docker Hub. Before, only "cannot reach registry registry-1.docker.io"."""
    import socket

    from blockstore.cli import main
    from blockstore.errors import RegistryUnreachable

    resolve = socket.getaddrinfo

    def no_docker_hub(host, *args, **kwargs):
        if "docker.io" in str(host):
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return resolve(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", no_docker_hub)
    monkeypatch.setenv("BLOCKSTORE_CACHE_DIR", str(tmp_path / "cache"))
    code = main(["inspect", image])
    err = capsys.readouterr().err
    assert code == RegistryUnreachable.exit_code, err
    assert "cannot reach registry registry-1.docker.io" in err
    assert ("looked up on Docker Hub; name one in another registry as HOST[:PORT]" in err) == hinted


def test_mount_help_does_not_offer_the_tls_option_it_refuses():
    """Tried: ``mount --help`` beside ``serve --help``. Must hold: serve offers
    ``--tls-verify-peer``; mount, which refuses it in one line (its nbdfuse client cannot
    present a client certificate), lists it in neither its usage nor its options, and
    still lists its other TLS options. Before, mount's help offered it as serve's does."""
    assert "--tls-verify-peer" in blockstore("serve", "--help").stdout
    shown = blockstore("mount", "--help")
    assert shown.returncode == 0, shown.stderr
    assert "--tls-certificates" in shown.stdout
    assert "--tls-verify-peer" not in shown.stdout


@pytest.mark.skipif(os.geteuid() != 0, reason="mount checks for root before its options")
def test_a_user_name_given_by_mount_option_is_named_as_given(tmp_path, monkeypatch):
    """Tried: ``mount IMAGE DIR -o oci.username=alice`` (erofs-utils' spelling) with no
    password anywhere. Must hold: exit 2, one line naming ``-o oci.username``, the option
    the user wrote; before, it named ``--username``, which the command line did not hold."""
    monkeypatch.delenv("BLOCKSTORE_USERNAME", raising=False)
    monkeypatch.delenv("BLOCKSTORE_PASSWORD", raising=False)
    monkeypatch.delenv("REGISTRY_AUTH_FILE", raising=False)
    monkeypatch.delenv("DOCKER_CONFIG", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    (tmp_path / "mnt").mkdir()
    shown = blockstore(
        "mount", "127.0.0.1:9/a:v1", str(tmp_path / "mnt"), "--insecure", "-o", "oci.username=alice"
    )
    assert shown.returncode == 2 and shown.stderr.count("\n") == 1, shown.stderr
    assert "-o oci.username was given without a password" in shown.stderr
    assert "--username" not in shown.stderr


def test_umount_lazy_help_names_what_it_still_refuses():
    """Tried: ``umount --help``, read for ``--lazy``. Must hold: it says what a lazy
    unmount still refuses, to be unmounted first (another blockstore mount inside the
    mount, a mount that hides it), as ``umount --lazy`` does (tests/mount/test_mount_stack.py
    tries both). Before, it said "detach even if busy", though those are refused as busy."""
    shown = blockstore("umount", "--help")
    assert shown.returncode == 0, shown.stderr
    text = " ".join(shown.stdout.split())
    assert "even if busy" not in text, text
    assert (
        "(still refused, to be unmounted first: another blockstore mount inside it, or a "
        "mount that hides it)" in text
    ), text


@pytest.mark.parametrize("command", ["serve", "mount"])
def test_the_tar_index_options_help_names_the_o_spelling_only_where_there_is_one(command):
    """Tried: ``serve --help`` and ``mount --help``, read for ``--tarindex`` and
    ``--zinfo``. Must hold: mount's help names their ``-o oci.tarindex=``/``oci.zinfo=``
    spellings, and serve's, which has no ``-o``, names none; before, serve's help
    offered ``-o`` too, which serve then refused as an unknown argument."""
    shown = blockstore(command, "--help")
    assert shown.returncode == 0, shown.stderr
    text = " ".join(shown.stdout.split())  # as read, not as wrapped
    named = ["-o oci.tarindex=PATH", "-o oci.zinfo=PATH"]
    assert [spelling in text for spelling in named] == [command == "mount"] * 2


@pytest.mark.parametrize(
    ("command", "said"),
    [
        ("mount", "before it fails with EIO"),
        ("serve", "before it fails with EIO"),
        ("prefetch", "before the command fails (exit 5)"),
        ("index", "before the command fails (exit 5)"),
    ],
)
def test_timeout_help_says_what_a_read_past_it_ends_in(command, said):
    """Tried: ``--help`` of each command taking ``--timeout``. Must hold: ``mount`` and
    ``serve``, whose reads answer a client, say a read past it fails with EIO;
    ``prefetch`` and ``index``, which answer no client, say the command fails (exit 5),
    as a registry that stops answering makes them do. Before, all four said EIO."""
    shown = blockstore(command, "--help")
    assert shown.returncode == 0, shown.stderr
    text = " ".join(shown.stdout.split())
    assert f"retries included, {said} (default: 30)" in text, text
