"""Image references, parsed the way docker and podman parse them.

``alpine`` means ``registry-1.docker.io/library/alpine:latest``; a first
component with a dot, a colon or ``localhost`` is a registry host. The
grammar follows distribution's ``reference`` package, so a name we accept is
one every other client accepts, and a name we refuse says why.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from blockstore.errors import InvalidReference

DOCKER_HUB = "registry-1.docker.io"
# Names users write for Docker Hub; all of them are served by DOCKER_HUB.
_DOCKER_HUB_ALIASES = {"docker.io", "index.docker.io", "registry-1.docker.io"}
DEFAULT_TAG = "latest"

_PATH_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_HOST = re.compile(
    r"(?:(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
    r"(?:\.(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9]))*"
    r"|\[[0-9a-fA-F:.]+\])"
    r"(?::(?P<port>[0-9]+))?"
)
# ASCII word characters, as Go's \w in distribution's grammar (Python's takes "é", "٣").
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_DIGEST = re.compile(r"[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]{32,}")
_SHA256_HEX = re.compile(r"[a-f0-9]{64}")
_HEX_DIGITS = {"sha256": 64, "sha512": 128}
"""The digest algorithms the image spec registers, which ``digests.py`` checks."""
# algorithm:encoded as a digest may be written, but not host:port.
_ALGORITHM_AND_VALUE = re.compile(r"[a-z0-9]+(?:[.+_-][a-z0-9]+)*:(?![0-9]+$)[a-zA-Z0-9=_-]+")
_MAX_NAME_LENGTH = 255
# How much of a refused text an error message repeats: enough to recognise it,
# not a screenful when a script passes something huge.
_MAX_ECHO = 100


def is_tag(text: str) -> bool:
    """Whether ``text`` is a tag as the distribution spec allows one (1-128 of ASCII
    letters, digits, '_', '.', '-', not starting with '.' or '-')."""
    return _TAG.fullmatch(text) is not None


@dataclass(frozen=True)
class Reference:
    """A parsed image reference; ``str()`` gives its canonical form."""

    registry: str
    repository: str
    tag: str | None
    digest: str | None

    def __str__(self) -> str:
        text = f"{self.registry}/{self.repository}"
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text

    @property
    def manifest_ref(self) -> str:
        """What to ask the registry for: the digest when pinned, else the tag."""
        return self.digest or self.tag or DEFAULT_TAG


_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
"""``http://``, ``https://``, ``docker://``: a URL's scheme, which docker refuses too."""


def parse_reference(text: str) -> Reference:
    """Parse ``[host[:port]/]path[:tag][@digest]``; raise ``InvalidReference`` saying why.

    A reference written with ``user:password@`` before its host is refused,
    and no message repeats what came before the ``@``.
    """
    if redact(text) != text:
        raise InvalidReference(
            f"invalid image reference {_echo(text)}: a reference cannot carry a user name or "
            "password (give --username with $BLOCKSTORE_PASSWORD, or log in with podman or "
            "docker)"
        )
    scheme = _SCHEME.match(text)
    if scheme:
        plain = "; --insecure asks for plain HTTP" if scheme.group(0).lower() == "http://" else ""
        raise InvalidReference(
            f"invalid image reference {_echo(text)}: a reference takes no scheme (drop "
            f"{scheme.group(0)!r}{plain})"
        )
    if not text or text != text.strip():
        raise InvalidReference(
            f"invalid image reference {_echo(text)}: empty or surrounded by spaces"
        )
    name, _, digest = text.partition("@")
    digest_or_none = _check_digest(text, digest) if "@" in text else None
    tag = None
    last_slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > last_slash:
        name, tag = name[:colon], name[colon + 1 :]
        if not _TAG.fullmatch(tag):
            raise InvalidReference(
                f"invalid image reference {_echo(text)}: tag {_echo(tag)} must be 1-128 of "
                "ASCII letters, digits, '_', '.', '-' and not start with '.' or '-'"
            )
    if _SHA256_HEX.fullmatch(name):
        # Docker refuses such a name too: it is a digest with its algorithm left off.
        raise InvalidReference(
            f"invalid image reference {_echo(text)}: 64 hex digits name a digest, not an "
            f"image (write sha256:{name})"
        )
    if _registry_alone(name, tag):
        raise InvalidReference(
            f"invalid image reference {_echo(text)}: a registry address with no image "
            f"(name one in it as {text}/NAME:TAG)"
        )
    registry, repository = _split_registry(text, name)
    if len(repository) > _MAX_NAME_LENGTH:
        raise InvalidReference(
            f"invalid image reference {_echo(text)}: repository name longer than "
            f"{_MAX_NAME_LENGTH} characters"
        )
    if tag is None and digest_or_none is None:
        tag = DEFAULT_TAG
    return Reference(registry, repository, tag, digest_or_none)


def normalize_digest(text: str) -> str:
    """``sha256:<hex>`` from a digest or bare 64-hex; raise ``InvalidReference`` otherwise."""
    text = text.strip()
    if _SHA256_HEX.fullmatch(text):
        return f"sha256:{text}"
    why = digest_problem(text)
    if why:
        raise InvalidReference(f"invalid digest {_echo(text)}: {why}")
    return text


def _check_digest(original: str, digest: str) -> str:
    why = digest_problem(digest)
    if why:
        raise InvalidReference(
            f"invalid image reference {_echo(original)}: {_echo(digest)} is not a digest ({why})"
        )
    return digest


def digest_problem(digest: str) -> str | None:
    """Why ``digest`` is not a digest this engine can check (the image spec's sha256 or
    sha512, ``algorithm:hex``), or None when it is one: no other is sent to a registry,
    nor would the bytes it names be checked."""
    if not _DIGEST.fullmatch(digest):
        return "expected algorithm:hex, for sha256 64 lowercase hex digits"
    algorithm, _, hex_part = digest.partition(":")
    if algorithm not in _HEX_DIGITS:
        return f"a {algorithm} digest cannot be checked here; a digest is sha256 or sha512"
    if not re.fullmatch(f"[a-f0-9]{{{_HEX_DIGITS[algorithm]}}}", hex_part):
        return f"a {algorithm} digest is {_HEX_DIGITS[algorithm]} lowercase hex digits"
    return None


def redact(text: str) -> str:
    """``text`` with anything before an ``@`` in its host part replaced by ``***``.

    ``alice:pw@host:5000/app`` -> ``***@host:5000/app``. With no ``/``, what
    follows a lone ``@`` may be a digest (``alpine@sha256:...``, even a bad
    one): it is left as it is unless it reads as a host (no ``:``, or a port).
    """
    head, slash, rest = text.partition("/")
    if "@" not in head:
        return text
    host = head.rpartition("@")[2]
    if not slash and head.count("@") == 1 and _ALGORITHM_AND_VALUE.fullmatch(host):
        return text
    return f"***@{host}{slash}{rest}"


def _echo(text: str) -> str:
    """``text`` quoted for an error message (credentials redacted), cut to its first
    ``_MAX_ECHO`` characters."""
    text = redact(text)
    if len(text) <= _MAX_ECHO:
        return repr(text)
    return f"{text[:_MAX_ECHO]!r}... ({len(text)} characters)"


def names_host(text: str) -> bool:
    """Whether ``text`` starts with a registry host, not a Docker Hub name."""
    first, slash, _ = text.partition("/")
    return bool(slash) and _is_host(first)


def _is_host(first: str) -> bool:
    """Docker's rule: a reference's first component (before a '/') is a host if it has a
    dot, a port or uppercase letters, or is "localhost"; otherwise it is Docker Hub's."""
    return "." in first or ":" in first or first == "localhost" or first != first.lower()


def _registry_alone(name: str, tag: str | None) -> bool:
    """Whether ``name:tag`` is a host and port with no image (``127.0.0.1:5000``,
    ``localhost:5000``): Docker's grammar reads it as the Docker Hub image ``name`` with
    the tag ``5000``, which no Docker Hub name holding a dot, or ``localhost``, is."""
    if "/" in name or tag is None or not is_port(tag):
        return False
    return "." in name or name == "localhost"


def is_port(text: str) -> bool:
    """Whether ``text`` is a TCP port, 1..65535 in ASCII digits: checked before any
    request, as requests would refuse another later with a bare ValueError."""
    return text.isascii() and text.isdigit() and len(text) <= 5 and 1 <= int(text) <= 65535


def _split_registry(original: str, name: str) -> tuple[str, str]:
    first, slash, rest = name.partition("/")
    if slash and _is_host(first):
        host = _HOST.fullmatch(first)
        if not host:
            raise InvalidReference(
                f"invalid image reference {_echo(original)}: bad registry host {_echo(first)}"
            )
        port = host["port"]
        if port is not None and not is_port(port):
            raise InvalidReference(
                f"invalid image reference {_echo(original)}: port {_echo(port)} of registry "
                "host is not in 1..65535"
            )
        registry, path = first, rest
    else:
        registry, path = DOCKER_HUB, name
    if registry in _DOCKER_HUB_ALIASES:
        registry = DOCKER_HUB
    if not path:
        raise InvalidReference(f"invalid image reference {_echo(original)}: no repository name")
    for component in path.split("/"):
        if _PATH_COMPONENT.fullmatch(component):
            continue
        if _PATH_COMPONENT.fullmatch(component.lower()):
            raise InvalidReference(
                f"invalid image reference {_echo(original)}: repository name must be lowercase"
            )
        raise InvalidReference(
            f"invalid image reference {_echo(original)}: {_echo(component)} is not a valid name "
            "component (lowercase letters, digits and single separators '.', '_', '__', '-')"
        )
    if registry == DOCKER_HUB and "/" not in path:
        path = f"library/{path}"
    return registry, path
