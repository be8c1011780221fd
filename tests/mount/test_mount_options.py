"""``-o`` parsing for ``blockstore mount``: our spelling and erofs-utils' own."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blockstore.cli import build_parser
from blockstore.cli.common import (
    check_image_arguments,
    check_registry_arguments,
    check_tar_index_options,
    tar_indexes_from,
)
from blockstore.cli.mount_options import (
    USERNAME_OPTIONS,
    OciOptions,
    merge_options,
    parse_mount_options,
    serve_command,
    without_credentials,
)
from blockstore.errors import UsageError
from blockstore.registry.manifests import Layer


def test_erofs_utils_spellings():
    """Every option mount.erofs -t erofs.nbd takes is understood, in one -o or several."""
    parsed = parse_mount_options(
        [
            "oci.layer=2,oci.platform=linux/arm64/v8",
            "oci.username=alice,oci.password=s3cret,oci.insecure",
        ]
    )
    assert parsed == OciOptions(
        layer=2,
        platform="linux/arm64/v8",
        username="alice",
        password="s3cret",
        insecure=True,
    )


def test_negative_layer_counts_from_the_top_in_both_spellings():
    """``-o oci.layer=-1`` and ``-o oci=-2`` are taken as ``--layer -1``/``-2`` are (a
    negative index counts from the top), and ``--layer -1 -o oci.layer=-1`` agree."""
    assert parse_mount_options(["oci.layer=-1"]).layer == -1
    assert parse_mount_options(["oci=-2"]).layer == -2
    args = _mount_args("--layer", "-1", "-o", "oci.layer=-1")
    merge_options(args, parse_mount_options(args.options))
    assert args.layer == -1


def test_old_oci_spelling_and_blob():
    """``oci=N`` is the older spelling of oci.layer; oci.blob takes a digest."""
    assert parse_mount_options(["oci=0"]).layer == 0
    digest = "sha256:" + "ab" * 32
    assert parse_mount_options([f"ro,oci.blob={digest}"]).blob == digest


@pytest.mark.parametrize(
    "text",
    [
        "oci.layer=x",
        "oci.layer=",
        "oci.layer=+1",
        "oci.layer=--1",
        "oci=1.5",
        "oci.blob=notadigest",
        "oci.platform=amd64",
        "oci.platform=linux/",
        "oci.username=",
        "oci.insecure=maybe",
        "rw",
        "oci.tarindex=",
        "oci.zinfo=",
        "noatime",
        "oci.layer=1,oci.blob=sha256:" + "00" * 32,
    ],
)
def test_refused_options(text):
    """Malformed values, write access, unknown options and two layer selections are refused."""
    with pytest.raises(UsageError):
        parse_mount_options([text])


def test_an_unknown_option_is_refused_saying_where_the_known_ones_are_listed():
    """Tried: ``-o ro,noatime``, an fstab spelling of an option blockstore has not. Must
    hold: the refusal names the option and ``blockstore mount --help``, which lists those
    ``-o`` takes. Before, it said only "unknown mount option 'noatime'", naming no fix."""
    with pytest.raises(UsageError) as refused:
        parse_mount_options(["ro,noatime"])
    assert str(refused.value) == (
        "unknown mount option 'noatime': `blockstore mount --help` lists those -o takes"
    )


def test_a_password_whose_quotes_the_shell_took_says_how_to_keep_them():
    """Tried: what a shell passes for ``-o oci.password="a,b"`` typed as the README once
    showed it: ``oci.password=a,b``, the quotes taken by the shell. Must hold: the refusal
    shows the whole ``-o`` value in single quotes, which keep the double quotes for
    mount's parser; before, it said only to use double quotes, which the user had done."""
    with pytest.raises(UsageError, match=r"""-o 'oci\.password="\.\.\."'"""):
        parse_mount_options(["oci.password=a,b"])


def test_empty_items_and_ro_are_harmless():
    """Stray commas and ``ro`` change nothing."""
    assert parse_mount_options([",ro,,", ""]) == OciOptions()


def test_defaults_stands_for_blockstores_own_not_mount8s():
    """Tried: ``-o defaults,ro``, as fstab lines are written, and ``defaults`` before and
    after ``suid``. Must hold: ``defaults`` is taken, as blockstore's own defaults (no
    setuid bits or device files honoured), never mount(8)'s ``rw,suid,dev``; the last one
    given wins. Before, ``defaults`` was refused as an unknown option."""
    assert parse_mount_options(["defaults,ro"]) == OciOptions()
    assert parse_mount_options(["defaults,suid"]).suid is True
    assert parse_mount_options(["suid,dev,noexec,defaults"]) == OciOptions()
    with pytest.raises(UsageError):
        parse_mount_options(["defaults=1"])


def test_insecure_can_be_spelled_as_a_boolean():
    assert parse_mount_options(["oci.insecure=false"]).insecure is False
    assert parse_mount_options(["oci.insecure=1"]).insecure is True


def _mount_args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["mount", "img", "/mnt", *argv])


def test_options_fill_flags_and_must_agree_with_them():
    """-o fills what flags left unset; a flag and an -o saying different things is an error."""
    args = _mount_args("--platform", "linux/amd64", "-o", "oci.layer=1,oci.insecure")
    merge_options(args, parse_mount_options(args.options))
    assert (args.layer, args.insecure, args.platform) == (1, True, "linux/amd64")

    same = _mount_args("--layer", "1", "-o", "oci=1")
    merge_options(same, parse_mount_options(same.options))
    assert same.layer == 1

    clash = _mount_args("--platform", "linux/amd64", "-o", "oci.platform=linux/arm64")
    with pytest.raises(UsageError):
        merge_options(clash, parse_mount_options(clash.options))

    twice = _mount_args("--layer", "0", "-o", "oci.blob=sha256:" + "11" * 32)
    with pytest.raises(UsageError):
        merge_options(twice, parse_mount_options(twice.options))


@given(
    layer=st.integers(min_value=-10_000, max_value=10_000),
    user=st.text(
        st.characters(blacklist_characters=",=", blacklist_categories=("Cs",)), min_size=1
    ),
)
def test_any_layer_number_and_user_name_round_trip(layer, user):
    """Whatever layer number and user name (without ``,`` or ``=``) are given come back as given."""
    parsed = parse_mount_options([f"oci.layer={layer},oci.username={user}"])
    assert (parsed.layer, parsed.username) == (layer, user)


def test_layer_zero_flag_is_not_replaced_by_another_layer_in_options():
    """``--layer 0 -o oci.layer=1`` names two different layers: refused, never layer 1
    silently (0 is a value given, not a flag left unset)."""
    args = _mount_args("--layer", "0", "-o", "oci.layer=1")
    with pytest.raises(UsageError, match="disagree"):
        merge_options(args, parse_mount_options(args.options))

    agree = _mount_args("--layer", "0", "-o", "oci=0")
    merge_options(agree, parse_mount_options(agree.options))
    assert agree.layer == 0


# The options of every command that opens an image, as a user types them, and what each
# must parse to. IMAGE and the layer choice first, then registry and cache options.
IMAGE_ARGV = ["reg:5000/a:v1", "--layer", "-1", "--platform", "linux/arm64"]
REGISTRY_ARGV = ["--insecure", "--ca-file", "/ca.pem", "--username", "u", "--password", "p"]
REGISTRY_ARGV += ["--mirror", "m1:5000", "--mirror", "m2", "--cache-dir", "/c"]
REGISTRY_ARGV += ["--cache-size", "1G"]
PARSED = {
    "image": "reg:5000/a:v1",
    "layer": -1,
    "blob": None,
    "platform": "linux/arm64",
    "insecure": True,
    "ca_file": "/ca.pem",
    "username": "u",
    "password": "p",
    "mirror": ["m1:5000", "m2"],
    "cache_dir": Path("/c"),
    "cache_size": 1 << 30,
}
# What each command takes beside them; prefetch fetches, so it has no --offline.
COMMANDS = {"mount": ["/mnt", "--offline"], "serve": ["--offline"], "prefetch": []}
DIGEST = "sha256:" + "ab" * 32


def _parse(argv: list[str]) -> argparse.Namespace:
    return build_parser(argv).parse_args(argv)


@pytest.mark.parametrize("command", COMMANDS)
def test_mount_serve_and_prefetch_take_the_same_image_options(command):
    """A real command line with every image, registry and cache option parses to the same
    values for ``mount``, ``serve`` and ``prefetch``; ``--blob`` does too, and ``--layer``
    with ``--blob`` is refused by each. A command that loses one of them fails here."""
    argv = [command, *IMAGE_ARGV[:1], *COMMANDS[command], *IMAGE_ARGV[1:], *REGISTRY_ARGV]
    args = _parse(argv)
    assert {key: getattr(args, key) for key in PARSED} == PARSED
    if command != "prefetch":
        assert args.offline is True
    if command == "mount":
        assert args.mountpoint == "/mnt"

    by_digest = _parse([command, "reg:5000/a:v1", *COMMANDS[command][:1], "--blob", DIGEST])
    assert (by_digest.blob, by_digest.layer) == (DIGEST, None)
    with pytest.raises(SystemExit) as refused:
        _parse([command, "reg:5000/a:v1", *COMMANDS[command][:1], "--layer", "0", "--blob", "x"])
    assert refused.value.code == 2


@pytest.mark.parametrize("command", COMMANDS)
def test_help_of_mount_serve_and_prefetch_shows_the_image_options(command):
    """``blockstore COMMAND --help``, run as a user runs it, lists IMAGE and every image,
    registry and cache option (and ``--offline`` for the two that can serve from the cache
    alone), and says which layer ``--layer`` picks in the command's own verb."""
    shown = subprocess.run(
        [sys.executable, "-m", "blockstore", command, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    usage = shown.partition("\n\n")[0]
    for option in ["IMAGE", "--layer N", "--blob DIGEST", "--platform", "--insecure"]:
        assert option in usage, (option, usage)
    for option in ["--ca-file", "--username", "--password", "--mirror", "--cache-dir"]:
        assert option in usage, (option, usage)
    assert "--cache-size" in usage
    assert ("--offline" in usage) == (command != "prefetch")
    verb = {"prefetch": "fetch"}.get(command, command)
    assert f"{verb} only layer N (0 is the bottom, -1 the top)" in " ".join(shown.split())


def test_digests_are_compared_normalised():
    """A bare 64-hex digest is sha256:<hex>, so ``--blob HEX -o oci.blob=sha256:HEX`` agree."""
    hex_digest = "ab" * 32
    assert parse_mount_options([f"oci.blob={hex_digest}"]).blob == f"sha256:{hex_digest}"
    args = _mount_args("--blob", hex_digest, "-o", f"oci.blob=sha256:{hex_digest}")
    check_image_arguments(args)
    merge_options(args, parse_mount_options(args.options))
    assert args.blob == f"sha256:{hex_digest}"


@pytest.mark.parametrize("argv", [["--platform", "amd64"], ["--platform", "linux/"]])
def test_bad_platform_flags_are_usage_errors(argv):
    """Platform flags are checked by the parser the server uses: UsageError."""
    with pytest.raises(UsageError):
        check_image_arguments(_mount_args(*argv))


@pytest.mark.parametrize("digest", ["sha256:short", "notadigest"])
def test_bad_digest_flags_are_usage_errors(digest, capsys):
    """A --blob that is no digest is refused by the command line's parser (exit 2)."""
    with pytest.raises(SystemExit) as refused:
        _mount_args("--blob", digest)
    assert refused.value.code == 2
    assert "argument --blob: invalid digest" in capsys.readouterr().err


def test_a_password_without_a_user_name_is_refused_with_the_fix(monkeypatch):
    """``-o oci.password=P`` alone would be dropped by the server: it is a UsageError that
    names the options giving a user name; with ``oci.username`` (or ``--username``) it passes."""
    monkeypatch.delenv("BLOCKSTORE_USERNAME", raising=False)
    alone = _mount_args("-o", "oci.password=pw")
    merge_options(alone, parse_mount_options(alone.options))
    with pytest.raises(UsageError, match=r"--username.*oci\.username"):
        check_registry_arguments(alone, username_options=USERNAME_OPTIONS)
    for argv in (
        ["-o", "oci.password=pw,oci.username=u"],
        ["--username", "u", "-o", "oci.password=pw"],
    ):
        args = _mount_args(*argv)
        merge_options(args, parse_mount_options(args.options))
        check_registry_arguments(args, username_options=USERNAME_OPTIONS)


def test_bad_reference_is_a_usage_error():
    """An image reference docker would refuse is a UsageError before anything starts."""
    args = build_parser(["mount"]).parse_args(["mount", "Bad Ref:x", "/mnt"])
    with pytest.raises(UsageError, match="invalid image reference"):
        check_image_arguments(args)


def test_the_login_leaves_the_options_and_reaches_the_server_by_its_environment():
    """``-o oci.username=,oci.password=`` are taken off the options once parsed, and the
    server's command line carries neither (``ps`` shows it to every user): both travel in
    its environment, which only its owner can read."""
    assert without_credentials([" oci.username=u,ro,oci.password=p=q", "oci.password=x"]) == [
        "ro",
        "",
    ]
    args = _mount_args("-o", "oci.username=alice,oci.password=pw-123,oci.insecure")
    merge_options(args, parse_mount_options(args.options))
    argv, env = serve_command(args)
    assert not [word for word in argv if "alice" in word or "pw-123" in word], argv
    assert (env["BLOCKSTORE_USERNAME"], env["BLOCKSTORE_PASSWORD"]) == ("alice", "pw-123")


def test_a_local_tar_index_is_refused_for_a_layer_that_is_no_tar(tmp_path):
    """``--tarindex`` names a tar layer's metadata image: given for an EROFS layer it
    would be ignored without a word, so it is a usage error naming the layer's type;
    for a tar layer it is taken."""
    index = tmp_path / "layer.meta"
    index.write_bytes(b"an index")
    args = argparse.Namespace(tarindex=index, zinfo=None)
    erofs = Layer(0, "sha256:" + "a" * 64, 4096, "application/vnd.erofs.layer.v1")
    with pytest.raises(UsageError, match=r"is for tar layers; layer 0 is application/vnd\.erofs"):
        tar_indexes_from(args, [erofs])
    tar = Layer(0, "sha256:" + "b" * 64, 4096, "application/vnd.oci.image.layer.v1.tar")
    assert tar_indexes_from(args, [tar]) == {0: (index.resolve(), None)}


def test_a_local_tar_index_that_is_no_file_is_named_with_its_option(tmp_path):
    """Tried: ``--tarindex /dev/null`` (a device, not a file), then ``--zinfo`` naming a
    path that does not exist. Must hold: a usage error naming the option and saying
    which; before, "/dev/null: no such file", naming no option, of a path that exists."""
    index = tmp_path / "layer.meta"
    index.write_bytes(b"an index")
    device = argparse.Namespace(tarindex=Path("/dev/null"), zinfo=None)
    with pytest.raises(UsageError, match=r"^--tarindex /dev/null: not a regular file$"):
        check_tar_index_options(device)
    missing = argparse.Namespace(tarindex=index, zinfo=tmp_path / "none.zinfo")
    with pytest.raises(UsageError, match=r"^--zinfo .*none\.zinfo: no such file$"):
        check_tar_index_options(missing)


def test_mounts_looks_up_the_layers_a_mount_could_not_name(pushed_images, tmp_path):
    """A mount whose cache could not be read when it was made (damaged, then moved
    aside and refilled by its server) recorded no layers. ``mounts`` must look them up
    again in the cache as it is now, and show how much of each is cached, not "?"
    for as long as the mount lives."""
    from blockstore.cli.mount_layers import with_layers
    from blockstore.cli.mount_listing import cached_fractions
    from blockstore.image import open_image
    from blockstore.registry import RegistryOptions
    from nbdfront.mount.attach import Attachment
    from nbdfront.mount.records import MountRecord

    cache = tmp_path / "cache"
    image = open_image(pushed_images.small, cache_dir=cache, options=RegistryOptions(insecure=True))
    try:
        (blob,) = image.exports()
        blob.prefetch()
    finally:
        image.close()
    attachment = Attachment("layer0", "nbd+unix:///layer0", "nbdfuse", "/dev/null")
    record = MountRecord(
        "/mnt/x",
        pushed_images.small,
        "nbdfuse",
        "/state",
        "/log",
        attachments=[attachment],
        info={"cache_dir": str(cache), "layers": [], "image_layers": 0},
    )
    assert cached_fractions(record) == []
    found = with_layers(record)
    assert [layer["export"] for layer in found.info["layers"]] == ["layer0"]
    assert found.info["image_layers"] == 1
    assert cached_fractions(found) == [1.0]
