"""Image references parsed as docker and podman parse them (pure parser tests)."""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st

from blockstore.errors import InvalidReference
from blockstore.registry import Reference, normalize_digest, parse_reference
from blockstore.registry.reference import DOCKER_HUB

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("alpine", "registry-1.docker.io/library/alpine:latest"),
        ("alpine:3.19", "registry-1.docker.io/library/alpine:3.19"),
        ("docker.io/alpine", "registry-1.docker.io/library/alpine:latest"),
        ("index.docker.io/library/alpine", "registry-1.docker.io/library/alpine:latest"),
        ("user/app", "registry-1.docker.io/user/app:latest"),
        ("localhost/app", "localhost/app:latest"),
        ("localhost:5000/a/b:tag", "localhost:5000/a/b:tag"),
        ("127.0.0.1:5000/demo/img", "127.0.0.1:5000/demo/img:latest"),
        ("quay.io/org/sub/app:v1.2-rc_3", "quay.io/org/sub/app:v1.2-rc_3"),
        (f"ghcr.io/org/app@{DIGEST}", f"ghcr.io/org/app@{DIGEST}"),
        (f"ghcr.io/org/app:v1@{DIGEST}", f"ghcr.io/org/app:v1@{DIGEST}"),
        ("[::1]:5000/app:v1", "[::1]:5000/app:v1"),
        ("a__b/c.d/e-f--g", "registry-1.docker.io/a__b/c.d/e-f--g:latest"),
    ],
)
def test_known_references(text, canonical):
    """Docker's own examples: Docker Hub, library/, latest, hosts with ports, digests."""
    ref = parse_reference(text)
    assert str(ref) == canonical
    assert parse_reference(canonical) == ref


def test_fields():
    """The registry actually contacted, repository, tag and digest are separate fields."""
    ref = parse_reference(f"127.0.0.1:5000/demo/img:v1@{DIGEST}")
    assert ref == Reference("127.0.0.1:5000", "demo/img", "v1", DIGEST)
    assert ref.manifest_ref == DIGEST
    assert parse_reference("alpine").manifest_ref == "latest"


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "empty"),
        (" alpine", "spaces"),
        ("Alpine", "lowercase"),
        ("host:5000/Demo", "lowercase"),
        ("app:", "tag"),
        ("app:-x", "tag"),
        ("app:" + "t" * 129, "tag"),
        ("app@sha256:abc", "not a digest"),
        ("app@sha256:" + "AB" * 32, "64 lowercase hex"),
        ("a//b", "not a valid name component"),
        ("-a", "not a valid name component"),
        ("a/", "not a valid name component"),
        ("host:port/x", "bad registry host"),
        ("host:5000/", "no repository"),
        ("a/" + "b" * 256, "longer than 255"),
        ("http://127.0.0.1:5000/app:v1", r"takes no scheme \(drop 'http://'; --insecure"),
        ("https://reg.example/app", r"takes no scheme \(drop 'https://'\)"),
        # A digest with its algorithm left off, taken before for an image on Docker Hub.
        ("ab" * 32, "name a digest, not an image \\(write sha256:" + "ab" * 32),
        ("ab" * 32 + ":v1", "name a digest"),
    ],
)
def test_invalid_references_say_why(text, why):
    """Each refusal names its reason."""
    with pytest.raises(InvalidReference, match=why):
        parse_reference(text)


@pytest.mark.parametrize("tag", ["caf\u00e9", "v\u0661", "\uff561", "\u30bf\u30b0", "x\u00b2"])
def test_a_tag_with_letters_or_digits_outside_ascii_is_refused(tag):
    """distribution's tag grammar is ASCII (Go's \\w): a tag with an accented letter,
    an Arabic-Indic or fullwidth digit, kana or a superscript is a usage error saying
    what a tag may hold, not a request a registry would refuse."""
    with pytest.raises(InvalidReference, match=r"tag .* must be 1-128 of ASCII letters") as refused:
        parse_reference(f"registry.example/app:{tag}")
    assert refused.value.exit_code == 2


def test_normalize_digest():
    """A layer digest may be given as bare hex; anything else must be a digest."""
    assert normalize_digest("ab" * 32) == DIGEST
    assert normalize_digest(DIGEST) == DIGEST
    with pytest.raises(InvalidReference):
        normalize_digest("abc")


@pytest.mark.parametrize("text", ["sha256:0000", "abc", "sha256:" + "AB" * 32, "sha256"])
def test_a_bad_digest_is_called_a_bad_digest(text):
    """A short or malformed digest (as given to --blob) is refused as an invalid digest
    saying the expected form, not as an invalid image reference."""
    with pytest.raises(InvalidReference) as refused:
        normalize_digest(text)
    message = str(refused.value)
    assert message.startswith(f"invalid digest {text!r}:")
    assert "64 lowercase hex digits" in message
    assert "image reference" not in message


@pytest.mark.parametrize(
    "text",
    [
        "127.0.0.1:99999/x:y",
        "host.example:0/x",
        "localhost:65536/x",
        "[::1]:70000/x",
        "host.example:" + "9" * 5000 + "/x",
    ],
)
def test_port_outside_range_is_refused(text):
    """A registry port outside 1..65535 (even one too long for int()) is refused as an
    InvalidReference naming the port range, not a ValueError from deeper down."""
    with pytest.raises(InvalidReference, match=r"not in 1\.\.65535"):
        parse_reference(text)


@pytest.mark.parametrize("text", ["localhost:1/x", "localhost:65535/x", "[::1]:5000/x"])
def test_ports_at_the_edges_are_accepted(text):
    """Ports 1 and 65535 are valid and keep their host:port form."""
    assert parse_reference(text).registry == text.removesuffix("/x")


@pytest.mark.parametrize(
    "text",
    [
        "A" * 5000,
        "app:" + "t" * 5000,
        "a/" + "-" * 5000,
        "host.example:5000/app@sha256:" + "0" * 5000,
        "-" * 5000 + ".example/app",
    ],
)
def test_a_long_invalid_reference_is_shortened_in_the_message(text):
    """A 5000-character invalid reference is refused with a message that repeats only
    its first 100 characters (and says how long it was), whichever part is wrong."""
    with pytest.raises(InvalidReference) as refused:
        parse_reference(text)
    message = str(refused.value)
    assert len(message) < 400, message
    assert repr(text[:100]) in message
    assert f"({len(text)} characters)" in message


_component = st.from_regex(r"[a-z0-9]{1,5}(?:(?:[._]|__|-{1,2})[a-z0-9]{1,5}){0,2}", fullmatch=True)
_host = st.one_of(
    st.just("localhost"),
    st.from_regex(r"[a-z][a-z0-9-]{0,6}[a-z0-9]\.[a-z]{2,4}", fullmatch=True),
    st.builds(lambda a, b: f"{a}:{b}", st.just("127.0.0.1"), st.integers(1, 65535)),
)
_tag = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}", fullmatch=True)
_digest = st.from_regex(r"[a-f0-9]{64}", fullmatch=True).map(lambda h: f"sha256:{h}")


@given(
    host=st.one_of(st.none(), _host),
    path=st.lists(_component, min_size=1, max_size=4),
    tag=st.one_of(st.none(), _tag),
    digest=st.one_of(st.none(), _digest),
)
def test_generated_references_round_trip(host, path, tag, digest):
    """Any reference built from the grammar parses into its parts, and its canonical
    form parses back to the same reference."""
    # Without a host, a first component with a dot would itself name a host.
    assume(host is not None or len(path) == 1 or "." not in path[0])
    text = "/".join(([host] if host else []) + path)
    text += f":{tag}" if tag else ""
    text += f"@{digest}" if digest else ""
    ref = parse_reference(text)
    repository = "/".join(path)
    if host is None:
        assert ref.registry == "registry-1.docker.io"
        if len(path) == 1:
            repository = f"library/{repository}"
    else:
        assert ref.registry == host
    assert ref.repository == repository
    assert ref.digest == digest
    assert ref.tag == (tag or (None if digest else "latest"))
    assert parse_reference(str(ref)) == ref


@given(st.text(max_size=80))
@example("a:b:c")
@example("@")
@example("a@b@c")
@example("127.0.0.1:99999/x:y")
@example("h.io:0/x")
def test_any_text_parses_or_is_refused_with_invalid_reference(text):
    """No input makes the parser fail with anything but InvalidReference, and a
    registry it accepts is a host:port that URL parsing (hence requests) accepts too."""
    try:
        ref = parse_reference(text)
    except InvalidReference as exc:
        assert str(exc).startswith("invalid image reference")
    else:
        assert parse_reference(str(ref)) == ref
        assert urlsplit(f"http://{ref.registry}/").port != 0


@pytest.mark.parametrize("text", ["127.0.0.1:5000", "localhost:5000", "registry.example:443"])
def test_a_registry_address_alone_is_refused_naming_where_the_image_goes(text):
    """Tried: a registry's address given where the image goes (``inspect 127.0.0.1:5000``,
    the image left off). Must hold: exit 2, saying it is a registry address with no image
    and how to name one in it; a Docker Hub image with a numeric tag (``node:20``) and
    the same name spelled out on Docker Hub still parse. Before, it was taken for the
    Docker Hub image ``library/127.0.0.1`` with the tag ``5000``, and the command failed
    reaching Docker Hub, saying a name without a registry host is looked up there."""
    with pytest.raises(InvalidReference, match="a registry address with no image") as refused:
        parse_reference(text)
    assert refused.value.exit_code == 2
    assert f"(name one in it as {text}/NAME:TAG)" in str(refused.value)
    assert parse_reference("node:20") == Reference(DOCKER_HUB, "library/node", "20", None)
    spelled = parse_reference(f"docker.io/library/{text}")
    assert spelled.registry == DOCKER_HUB
