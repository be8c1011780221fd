"""The OCI image spec's rules for manifests, indexes and descriptors.

Checked on every manifest before anything is fetched or served, so a bad one
is refused with one line naming what is wrong, instead of failing later as
an I/O error inside a mounted filesystem. Pure functions, no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from blockstore.registry.platforms import Platform

MAX_LAYERS = 128
"""Layers of one image; each becomes an export and, when mounted, an overlayfs lower
layer, so an image of more is refused before anything starts."""
MAX_INDEX_ENTRIES = 1024
"""Manifests an index may list."""
MAX_BLOB_SIZE = 1 << 44
"""16 TiB: larger than any filesystem image this engine serves, and a bound that keeps
sizes far inside the cache's 64-bit fields."""

# The OCI image spec's digest grammar: algorithm ":" encoded.
_DIGEST = re.compile(r"[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+")
_SHA256_HEX = re.compile(r"[a-f0-9]{64}")
# RFC 6838 type "/" subtype, each 1-127 restricted-name characters.
_MEDIA_TYPE = re.compile(
    r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}"
)


def is_media_type(text: str) -> bool:
    """Whether ``text`` is a media type as a descriptor must carry one (``type/subtype``)."""
    return _MEDIA_TYPE.fullmatch(text) is not None


class ManifestProblem(ValueError):
    """What is wrong with a manifest or index, in a phrase the caller puts in context."""


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    urls: tuple[str, ...] = ()
    """Where a foreign (non-distributable) layer may be had, the registry need not hold it."""


def check_descriptor(value: object, where: str) -> Descriptor:
    """A descriptor with a media type, a sha256 digest and a size within bounds."""
    if not isinstance(value, dict):
        raise ManifestProblem(f"{where} is not a descriptor object")
    media_type = value.get("mediaType")
    if not isinstance(media_type, str) or not is_media_type(media_type):
        raise ManifestProblem(f"{where} has no valid mediaType")
    digest = value.get("digest")
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise ManifestProblem(f"{where} has no valid digest (algorithm:encoded)")
    algorithm, _, encoded = digest.partition(":")
    if algorithm != "sha256":
        raise ManifestProblem(
            f"{where} has a {algorithm} digest; this engine checks sha256 digests only"
        )
    if not _SHA256_HEX.fullmatch(encoded):
        raise ManifestProblem(f"{where} has a sha256 digest that is not 64 lowercase hex digits")
    size = value.get("size")
    # JSON true is a Python int, and 1e300 a float: neither is a size.
    if type(size) is not int or not 0 <= size <= MAX_BLOB_SIZE:
        raise ManifestProblem(
            f"{where} has size {_shown(size)}; a size is an integer from 0 to {MAX_BLOB_SIZE}"
        )
    urls = value.get("urls", [])
    if not isinstance(urls, list) or not all(isinstance(url, str) for url in urls):
        raise ManifestProblem(f"{where} has urls that are not a list of strings")
    return Descriptor(media_type, digest, size, tuple(urls))


def check_manifest(document: dict) -> list[Descriptor]:
    """The layers of an image manifest, bottom first, once the whole of it is valid."""
    _check_schema_version(document)
    check_descriptor(document.get("config"), "the config")
    layers = document.get("layers")
    if not isinstance(layers, list):
        raise ManifestProblem("it has no list of layers")
    if not layers:
        raise ManifestProblem("it lists no layers")
    if len(layers) > MAX_LAYERS:
        raise ManifestProblem(f"it has {len(layers)} layers; at most {MAX_LAYERS} are served")
    return [check_descriptor(layer, f"layer {i}") for i, layer in enumerate(layers)]


def check_index(document: dict) -> list[Descriptor]:
    """The manifests an index lists, once each of them is a valid descriptor."""
    _check_schema_version(document)
    entries = document.get("manifests")
    if not isinstance(entries, list):
        raise ManifestProblem("it has no list of manifests")
    if len(entries) > MAX_INDEX_ENTRIES:
        raise ManifestProblem(
            f"it lists {len(entries)} manifests; at most {MAX_INDEX_ENTRIES} are read"
        )
    descriptors = []
    for i, entry in enumerate(entries):
        descriptors.append(check_descriptor(entry, f"entry {i}"))
        _check_platform(entry, f"entry {i}")
    return descriptors


def _check_platform(entry: dict, where: str) -> None:
    """An index entry's ``platform``, where it has one: an object of string fields."""
    platform = entry.get("platform")
    if platform is None:
        return
    if not isinstance(platform, dict):
        raise ManifestProblem(f"{where} has a platform that is not an object")
    try:
        Platform.from_descriptor(platform)
    except ValueError as exc:
        raise ManifestProblem(f"{where}: {exc}") from None


def _check_schema_version(document: dict) -> None:
    version = document.get("schemaVersion")
    if type(version) is not int or version != 2:
        raise ManifestProblem(f"schemaVersion is {_shown(version)}, not 2")


def _shown(value: object) -> str:
    """A JSON value as an error message repeats it: short, whatever it is."""
    text = repr(value)
    return text if len(text) <= 40 else text[:40] + "..."
