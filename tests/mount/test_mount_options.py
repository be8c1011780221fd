"""``-o`` parsing for ``blockstore mount``: our spelling and erofs-utils' own."""

from __future__ import annotations

import argparse

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blockstore.cli import build_parser
from blockstore.cli.mount_cmds import OciOptions, merge_options, parse_mount_options
from blockstore.errors import UsageError


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
        "oci=-1",
        "oci.blob=notadigest",
        "oci.platform=amd64",
        "oci.platform=linux/",
        "oci.username=",
        "oci.insecure=maybe",
        "rw",
        "oci.tarindex=foo",
        "noatime",
        "oci.layer=1,oci.blob=sha256:" + "00" * 32,
    ],
)
def test_refused_options(text):
    """Malformed values, write access, unknown options and two layer selections are refused."""
    with pytest.raises(UsageError):
        parse_mount_options([text])


def test_empty_items_and_ro_are_harmless():
    """Stray commas and ``ro`` change nothing."""
    assert parse_mount_options([",ro,,", ""]) == OciOptions()


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
    layer=st.integers(min_value=0, max_value=10_000),
    user=st.text(
        st.characters(blacklist_characters=",=", blacklist_categories=("Cs",)), min_size=1
    ),
)
def test_any_layer_number_and_user_name_round_trip(layer, user):
    """Whatever layer number and user name (without ``,`` or ``=``) are given come back as given."""
    parsed = parse_mount_options([f"oci.layer={layer},oci.username={user}"])
    assert (parsed.layer, parsed.username) == (layer, user)
