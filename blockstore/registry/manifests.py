"""From an image reference to the layers of one platform, every byte checked.

An OCI index or Docker manifest list names one manifest per platform; a
manifest names the layers. Each manifest fetched must hash to the digest it
was asked by, or to the registry's ``Docker-Content-Digest``, so a mirror or
a proxy cannot substitute another image.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field

from blockstore.errors import BlockstoreError, InvalidReference, NotFound, RegistryError
from blockstore.registry.client import RegistryClient
from blockstore.registry.descriptors import ManifestProblem, check_index, check_manifest
from blockstore.registry.digests import check_size, digest_of
from blockstore.registry.mediatypes import (
    IMAGE_CONFIG_TYPES,
    INDEX_TYPES,
    MANIFEST_TYPES,
    OCI_INDEX,
    OCI_MANIFEST,
)
from blockstore.registry.platforms import Platform, host_platform
from blockstore.registry.reference import Reference, normalize_digest, parse_reference

log = logging.getLogger(__name__)

MAX_INDEX_DEPTH = 4
"""Indexes followed from the image's own down to a manifest (an index of indexes is
allowed; a chain longer than this is refused, not followed)."""
MAX_INDEX_FETCHES = 64
"""Manifests fetched at most while searching the indexes of one image."""


@dataclass(frozen=True)
class Layer:
    index: int
    digest: str
    size: int
    media_type: str
    urls: tuple[str, ...] = ()
    """A foreign layer's URLs, as its descriptor names them."""

    def to_record(self) -> dict:
        record = {
            "index": self.index,
            "digest": self.digest,
            "size": self.size,
            "mediaType": self.media_type,
        }
        return {**record, "urls": list(self.urls)} if self.urls else record


@dataclass
class ResolvedImage:
    """One platform's manifest of an image, and its layers, bottom first."""

    reference: str
    """Canonical reference, e.g. ``127.0.0.1:5000/demo/img:latest``."""
    manifest_digest: str
    """Digest of the platform's manifest (the one listing the layers)."""
    platform: str | None
    """The platform chosen from an index, or named by a plain manifest's config
    when it was fetched (a platform was required); else None."""
    platforms: list[str]
    """Every platform of the index; [] for a plain manifest."""
    layers: list[Layer]
    manifests: dict[str, bytes] = field(default_factory=dict)
    """Raw bytes of every manifest and index fetched, by digest."""
    index_digest: str | None = None
    """Digest of the index the manifest was chosen from, if any."""
    configs: dict[str, bytes] = field(default_factory=dict)
    """Raw bytes of the image configs fetched to judge a platform, by digest (checked
    against it): opening the image reads its config again, and need not fetch it."""

    def to_record(self) -> dict:
        """The JSON-able record the cache keeps for offline re-resolution."""
        record = {
            "reference": self.reference,
            "platform": self.platform,
            "manifest_digest": self.manifest_digest,
            "platforms": list(self.platforms),
            "layers": [layer.to_record() for layer in self.layers],
        }
        if self.index_digest is not None:  # what names the whole image (docker's RepoDigest)
            record["index_digest"] = self.index_digest
        return record

    @classmethod
    def from_record(cls, record: dict) -> ResolvedImage:
        return cls(
            reference=record["reference"],
            manifest_digest=record["manifest_digest"],
            index_digest=record.get("index_digest"),
            platform=record.get("platform"),
            platforms=list(record.get("platforms", [])),
            layers=[
                Layer(
                    int(d["index"]),
                    d["digest"],
                    int(d["size"]),
                    d.get("mediaType", ""),
                    tuple(d.get("urls", ())),
                )
                for d in record["layers"]
            ],
        )

    def select_layer(self, *, index: int | None = None, digest: str | None = None) -> Layer:
        """A layer by index (negative counts from the top) or by digest (bare hex allowed)."""
        if digest is not None:
            wanted = normalize_digest(digest)
            for layer in self.layers:
                if layer.digest == wanted:
                    return layer
            raise NotFound(
                f"image {self.reference} has no layer {wanted}; its layers are "
                + ", ".join(layer.digest for layer in self.layers)
            )
        if index is None:
            index = -1
        if not -len(self.layers) <= index < len(self.layers):
            raise NotFound(
                f"image {self.reference} has no layer {index}; it has {len(self.layers)} "
                f"(0..{len(self.layers) - 1})"
            )
        return self.layers[index]


def _no_image_for(ref: Reference, wanted: Platform, platforms: list[str]) -> str:
    """Why an index gave no image for ``wanted``, and what to name instead: one of its
    platforms, or, where it lists none (artifacts alone, as the referrers tag schema's
    tag does), one of its manifests by digest."""
    if platforms:
        offered = ", ".join(platforms)
        return f"image {ref} has no platform {wanted}; it has: {offered} (name one with --platform)"
    return (
        f"image {ref} lists no image of any platform (as an index of attached artifacts "
        f"does): name one of its manifests by digest, {ref.registry}/{ref.repository}@sha256:..."
    )


def resolve_image(
    client: RegistryClient,
    ref: Reference | str,
    platform: str | None = None,
    *,
    require_platform: bool = False,
) -> ResolvedImage:
    """Fetch and check the manifest (through the index for ``platform``) of ``ref``.

    ``platform`` defaults to this host's and is checked before any request.
    An index is always matched against it. A plain manifest names no
    platform, so it is taken as it is unless ``require_platform`` (the user
    asked for a platform): then its config is fetched, and an image of
    another platform is refused. Raises ``NotFound`` naming the platforms
    the image has when none matches, ``IntegrityError`` for a manifest or
    config whose bytes do not match its digest.
    """
    if isinstance(ref, str):
        ref = parse_reference(ref)
    wanted = Platform.parse(platform) if platform else host_platform()
    try:
        raw, digest = fetch_manifest(client, ref.repository, ref.manifest_ref)
    except NotFound as exc:
        hint = "" if ref.digest else _what_the_repository_has(client, ref.repository)
        raise NotFound(f"{exc}{hint}", status=exc.status, code=exc.code) from None
    manifests = {digest: raw}
    document, media_type = _decode(raw, ref, digest)
    if media_type not in INDEX_TYPES:
        layers = _layers(client, document)
        if not require_platform:
            # Fetching the config would cost a round trip on every default open.
            return ResolvedImage(str(ref), digest, None, [], layers, manifests)
        configs: dict[str, bytes] = {}
        offered = config_platform(client, ref.repository, document, f"image {ref}", configs)
        if not wanted.accepts(offered):
            raise NotFound(f"image {ref} is {offered} only; asked for {wanted}")
        return ResolvedImage(str(ref), digest, str(offered), [], layers, manifests, configs=configs)
    names: list[str] = []
    configs = {}
    found = _from_index(client, ref, document, wanted, manifests, names, configs)
    platforms = list(dict.fromkeys(names))
    if found is None:
        raise NotFound(_no_image_for(ref, wanted, platforms))
    child_digest, child, chosen = found
    layers = _layers(client, child)
    return ResolvedImage(
        str(ref), child_digest, str(chosen), platforms, layers, manifests, digest, configs
    )


def _from_index(
    client: RegistryClient,
    ref: Reference,
    index: dict,
    wanted: Platform,
    manifests: dict[str, bytes],
    names: list[str],
    configs: dict[str, bytes],
    depth: int = 1,
) -> tuple[str, dict, Platform] | None:
    """The manifest for ``wanted`` under ``index``: its digest, document and platform.

    The entry whose platform ``wanted`` chooses comes first; an index in its place
    (the image spec allows indexes of indexes) is searched in turn, as is every entry
    that is an index without a platform, down to ``MAX_INDEX_DEPTH``. The platform is
    optional in an entry (skopeo copies an index so), so an image manifest without
    one is judged by its config's platform, as containerd does. buildx's attestations
    ("unknown/unknown") and entries naming an artifact type are not images to run.
    An exact match (the same variant, or none on either side) is taken before the first
    entry merely accepted, as ``Platform.choose`` has it, wherever either is listed.
    ``names`` gathers the platforms seen, for the error when none is chosen, and
    ``configs`` the configs fetched to judge them. Each
    manifest is fetched once, and at most ``MAX_INDEX_FETCHES`` in all: a hostile
    index of indexes could otherwise ask for millions within the depth bound.
    """
    entries = index.get("manifests", [])
    runnable = [
        e
        for e in entries
        if isinstance(e.get("platform"), dict) and e["platform"].get("os") not in (None, "unknown")
    ]
    offered = [Platform.from_descriptor(e["platform"]) for e in runnable]
    names += [str(p) for p in offered]
    chosen = wanted.choose(offered)
    candidates = [(runnable[chosen], offered[chosen])] if chosen is not None else []
    # ``"platform": null`` is read as none given, as ``push`` reads it.
    candidates += [(e, None) for e in entries if e.get("platform") is None and _may_be_image(e)]
    accepted: tuple[str, dict, Platform] | None = None  # the first match, not exact
    for entry, platform in candidates:
        if entry["digest"] in manifests:
            continue  # searched already: an index may list one index many times
        try:
            found = _from_entry(
                client, ref, entry, platform, wanted, manifests, names, configs, depth
            )
        except BlockstoreError as exc:
            if accepted is None:
                raise
            # Judged only for a better match than one in hand, which it does not cost.
            log.info("image %s: entry %s passed over: %s", ref, entry["digest"], exc)
            continue
        if found is not None and found[2].normalized() == wanted.normalized():
            return found
        accepted = accepted or found
    return accepted


def _from_entry(
    client: RegistryClient,
    ref: Reference,
    entry: dict,
    platform: Platform | None,
    wanted: Platform,
    manifests: dict[str, bytes],
    names: list[str],
    configs: dict[str, bytes],
    depth: int,
) -> tuple[str, dict, Platform] | None:
    """The manifest for ``wanted`` an index entry names: itself, judged by ``platform``
    or else by its config's, or one under it, for an index."""
    digest, child, child_type = _fetch_entry(client, ref, entry, manifests)
    if child_type in MANIFEST_TYPES:
        platform = platform or _config_platform_if(client, ref, child, wanted, names, configs)
        return (digest, child, platform) if platform is not None else None
    if depth >= MAX_INDEX_DEPTH:
        raise RegistryError(f"image {ref}: indexes nested more than {MAX_INDEX_DEPTH} deep")
    return _from_index(client, ref, child, wanted, manifests, names, configs, depth + 1)


def _may_be_image(entry: dict) -> bool:
    """Whether an index entry without a platform may be an image or an index of them: a
    manifest or index not marked as an artifact (the image spec has an artifact's entry
    name its ``artifactType``; one may have no layers at all)."""
    return entry["mediaType"] in INDEX_TYPES | MANIFEST_TYPES and "artifactType" not in entry


def _fetch_entry(
    client: RegistryClient, ref: Reference, entry: dict, manifests: dict[str, bytes]
) -> tuple[str, dict, str]:
    """The manifest or index an index entry names, checked against its descriptor and
    kept in ``manifests``, within the ``MAX_INDEX_FETCHES`` budget."""
    if len(manifests) >= MAX_INDEX_FETCHES:
        raise RegistryError(
            f"image {ref}: more than {MAX_INDEX_FETCHES} manifests under its indexes"
        )
    raw, digest = fetch_manifest(client, ref.repository, entry["digest"])
    check_size(raw, entry["size"], f"image {ref}: manifest {digest}")
    manifests[digest] = raw
    child, child_type = _decode(raw, ref, digest)
    return digest, child, child_type


def _config_platform_if(
    client: RegistryClient,
    ref: Reference,
    manifest: dict,
    wanted: Platform,
    names: list[str],
    configs: dict[str, bytes],
) -> Platform | None:
    """The platform an index entry without one runs on, from its manifest's config, if
    ``wanted`` accepts it; None for another platform, or for an artifact (a signature,
    an SBOM: its config is no image config)."""
    if manifest["config"]["mediaType"] not in IMAGE_CONFIG_TYPES:
        return None
    offered = config_platform(client, ref.repository, manifest, f"image {ref}", configs)
    names.append(str(offered))
    return offered if wanted.accepts(offered) else None


SHOWN_TAGS = 10
_ARTIFACT_TAG = re.compile(r"(sha256|sha512)-[0-9a-f]{64}(\.(sig|att|sbom))?")
"""Tags that name artifacts, not images: the referrers tag schema's (an algorithm and
the digest's first 64 digits), and cosign's signatures, attestations and SBOMs."""


def _what_the_repository_has(client: RegistryClient, repository: str) -> str:
    """For a tag not found: the repository's tags, so a typo shows, or that there is no
    such repository; nothing where the registry does not list them (an error, a login)."""
    try:
        tags = client.list_tags(repository)
    except NotFound as exc:
        unknown = exc.code == "NAME_UNKNOWN"
        return f"; the registry has no repository {repository}" if unknown else ""
    except BlockstoreError:
        return ""
    tags = sorted(tag for tag in tags if not _ARTIFACT_TAG.fullmatch(tag))
    if not tags:
        return f"; {repository} has no tags"
    more = ", ..." if len(tags) > SHOWN_TAGS else ""
    return f"; {repository} has tags: {', '.join(tags[:SHOWN_TAGS])}{more}"


def fetch_manifest(client: RegistryClient, repository: str, reference: str) -> tuple[bytes, str]:
    """A manifest's raw bytes and its digest, checked against the digest asked for
    (``reference`` is one) or else against ``Docker-Content-Digest``."""
    reply = client.get_manifest(repository, reference)  # checked against the digest named
    named = reference if ":" in reference else reply.digest_header
    return reply.raw, named or digest_of(reply.raw)


def config_platform(
    client: RegistryClient,
    repository: str,
    manifest: dict,
    subject: str,
    configs: dict[str, bytes] | None = None,
) -> Platform:
    """The platform a plain manifest's config names, the config's bytes checked first
    (and kept in ``configs``, if given, by digest)."""
    try:
        config_digest = normalize_digest(manifest["config"]["digest"])
        size = manifest["config"]["size"]
        if type(size) is not int:
            raise TypeError("the size is no integer")
    except (KeyError, TypeError, AttributeError, InvalidReference):
        raise RegistryError(f"{subject}: the manifest has no valid config descriptor") from None
    config = client.get_blob(repository, config_digest, "config")  # checked against it
    check_size(config, size, f"{subject}: config {config_digest}")
    if configs is not None:
        configs[config_digest] = config
    try:
        document = json.loads(config)
    except ValueError:
        raise RegistryError(f"{subject}: config {config_digest} is not JSON") from None
    except RecursionError:
        raise RegistryError(f"{subject}: config {config_digest} is nested too deeply") from None
    try:
        offered = Platform.from_descriptor(document if isinstance(document, dict) else {})
    except ValueError as exc:
        raise RegistryError(f"{subject}: config {config_digest} is refused: {exc}") from None
    if not (offered.os and offered.architecture):
        raise RegistryError(f"{subject}: config {config_digest} names no os and architecture")
    return offered


def _decode(raw: bytes, ref: Reference, digest: str) -> tuple[dict, str]:
    try:
        document = json.loads(raw)
    except ValueError:
        raise RegistryError(f"image {ref}: manifest {digest} is not JSON") from None
    except RecursionError:
        raise RegistryError(f"image {ref}: manifest {digest} is nested too deeply") from None
    if not isinstance(document, dict):
        raise RegistryError(f"image {ref}: manifest {digest} is not a JSON object")
    media_type = document.get("mediaType") or (
        OCI_INDEX if "manifests" in document else OCI_MANIFEST if "layers" in document else ""
    )
    if document.get("schemaVersion") == 1:
        raise RegistryError(f"image {ref}: Docker schema 1 manifests are not supported")
    if media_type not in INDEX_TYPES | MANIFEST_TYPES:
        raise RegistryError(f"image {ref}: unsupported manifest type {media_type!r}")
    try:
        (check_index if media_type in INDEX_TYPES else check_manifest)(document)
    except ManifestProblem as problem:
        raise RegistryError(f"image {ref}: manifest {digest} is refused: {problem}") from None
    return document, media_type


def _layers(client: RegistryClient, manifest: dict) -> list[Layer]:
    """The layers of a manifest ``_decode`` has checked; the client is told of the
    foreign ones, so that a registry's 404 for one names its URLs."""
    layers = [
        Layer(i, layer.digest, layer.size, layer.media_type, layer.urls)
        for i, layer in enumerate(check_manifest(manifest))
    ]
    for layer in layers:
        if layer.urls:
            client.note_foreign(layer.digest, layer.urls)
    return layers
