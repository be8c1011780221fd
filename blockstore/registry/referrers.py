"""Artifacts attached to an image: pushed and found through OCI 1.1 referrers.

An artifact is a small manifest whose ``subject`` is the image manifest and
whose ``artifactType`` says what it carries (a chunk index, access traces).
A registry with the referrers API (``GET /v2/<name>/referrers/<digest>``)
lists it by itself, and says so with ``OCI-Subject`` when the artifact is
pushed; for one that does not (the CNCF registry 2.x) the distribution
spec's fallback is used: an image index under the tag ``sha256-<hex of the
subject>`` that lists the referrers. Both are read back (the tag also where
the API answers: it lists nothing pushed before the registry had it), so an
artifact pushed by one client is found by any other (``oras``, ``skopeo
inspect``).

One artifact of a type per image: pushing again replaces the previous one
in the fallback index, and readers take the newest of a type.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from blockstore.errors import BlockstoreError, NotFound, RegistryError, UsageError
from blockstore.registry.client import RegistryClient
from blockstore.registry.digests import canonical_json, check_size, digest_of
from blockstore.registry.manifests import fetch_manifest
from blockstore.registry.mediatypes import OCI_INDEX, OCI_MANIFEST

log = logging.getLogger(__name__)

EMPTY_CONFIG_TYPE = "application/vnd.oci.empty.v1+json"
EMPTY_CONFIG = b"{}"
CREATED = "org.opencontainers.image.created"
_NEVER = datetime.min.replace(tzinfo=UTC)
"""The created time of an artifact that states none."""
CLOCK_SKEW = timedelta(days=1)
"""How far ahead of this machine's clock an artifact's created time may be and count."""
MAX_ARTIFACT_BLOB = 64 << 20
"""Artifacts are tables and traces, a few MiB at most; a larger one is refused, not read."""
MAX_ARTIFACT_BYTES = 256 << 20
"""The most the blobs of an artifact read at once may add up to: they are held in memory,
and a manifest may list one blob thousands of times."""
ARTIFACT_FETCHES = 4
"""An artifact's blobs fetched at once."""
_NOT_IN_TAG = re.compile(r"[^a-zA-Z0-9._-]")

ArtifactBlob = tuple[bytes, str, dict[str, str]]
"""One blob of an artifact: its bytes, its media type and its annotations."""


@dataclass(frozen=True)
class Subject:
    """The image manifest an artifact is attached to."""

    repository: str
    digest: str
    size: int
    media_type: str = OCI_MANIFEST


@dataclass(frozen=True)
class Referrer:
    """One artifact found for a subject."""

    digest: str
    artifact_type: str
    annotations: dict[str, str]
    size: int | None = None
    """The artifact manifest's size as the listing says it; None where it says none."""


def push_artifact(
    client: RegistryClient,
    subject: Subject,
    artifact_type: str,
    blobs: list[ArtifactBlob],
    *,
    created: str | None = None,
) -> str:
    """Push ``blobs`` (data, media type, annotations) as one artifact on ``subject``.

    Returns the artifact manifest's digest. The manifest is deterministic
    for the same blobs and ``created`` time, which is now unless given.
    """
    _check_blob_sizes(artifact_type, blobs)
    if created is None:
        created = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    repository = subject.repository
    client.upload_blob(repository, digest_of(EMPTY_CONFIG), EMPTY_CONFIG)
    layers = []
    for data, media_type, notes in blobs:
        digest = digest_of(data)
        client.upload_blob(repository, digest, data)
        layer = {"mediaType": media_type, "digest": digest, "size": len(data)}
        if notes:
            layer["annotations"] = dict(sorted(notes.items()))
        layers.append(layer)
    manifest = canonical_json(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": artifact_type,
            "config": {
                "mediaType": EMPTY_CONFIG_TYPE,
                "digest": digest_of(EMPTY_CONFIG),
                "size": len(EMPTY_CONFIG),
            },
            "layers": layers,
            "subject": {
                "mediaType": subject.media_type,
                "digest": subject.digest,
                "size": subject.size,
            },
            "annotations": {CREATED: created},
        }
    )
    digest = digest_of(manifest)
    put = client.put_manifest(repository, digest, manifest, OCI_MANIFEST)
    # The distribution spec: a registry that lists the artifact by its subject says so
    # with OCI-Subject; without it, the client keeps the referrers tag itself.
    if put.subject != subject.digest:
        _add_to_fallback_index(client, subject, artifact_type, digest, len(manifest), created)
    return digest


def _check_blob_sizes(artifact_type: str, blobs: list[ArtifactBlob]) -> None:
    """Refuse, before anything is uploaded, blobs no reader would take (``read_artifact``
    refuses one over ``MAX_ARTIFACT_BLOB``, and more than ``MAX_ARTIFACT_BYTES`` in all)."""
    total = sum(len(data) for data, _, _ in blobs)
    if total > MAX_ARTIFACT_BYTES:
        raise UsageError(
            f"cannot push a {artifact_type} artifact: its blobs add up to {total} bytes, over "
            f"the {MAX_ARTIFACT_BYTES} an artifact may have"
        )
    for data, media_type, _ in blobs:
        if len(data) > MAX_ARTIFACT_BLOB:
            raise UsageError(
                f"cannot push a {artifact_type} artifact: its {media_type} blob of "
                f"{len(data)} bytes is over the {MAX_ARTIFACT_BLOB} an artifact blob may have"
            )


def list_referrers(client: RegistryClient, subject: Subject) -> list[Referrer]:
    """Every artifact attached to ``subject``: from the referrers API where the registry
    has it, and from the fallback tag. Both are asked at once, so a registry without
    either costs one round trip."""
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="referrers") as pool:
        api = pool.submit(_api_listing, client, subject)
        tagged = pool.submit(_fallback_listing, client, subject)
        entries = api.result()
        if entries is None:
            entries = tagged.result()
        else:
            # A registry that gained the API since (distribution 2 to 3) lists none of the
            # artifacts pushed before under the tag; the API's answer stands without it.
            try:
                more = tagged.result() or []
            except BlockstoreError as exc:
                log.debug("%s: the referrers tag is not read: %s", subject.digest, exc)
                more = []
            listed = {e.get("digest") for e in entries}
            entries += [e for e in more if e.get("digest") not in listed]
    return [
        Referrer(
            e["digest"],
            _text(e.get("artifactType")),
            _annotations(e.get("annotations")),
            e["size"] if type(e.get("size")) is int else None,
        )
        for e in entries or []
        if isinstance(e.get("digest"), str)
    ]


REFUSING_STATUSES = frozenset({400, 403, 405, 501})
"""How a registry without the referrers API may answer a call to it."""


def _api_listing(client: RegistryClient, subject: Subject) -> list[dict] | None:
    """The referrers API's entries, of every page; None where the registry has no API
    (404) or refuses the call (400, 403, 405, 501...): the referrers tag stands in."""
    what = f"referrers of {subject.digest}"
    try:
        pages = client.get_referrers(subject.repository, subject.digest)
        return None if pages is None else [e for p in pages for e in _index_entries(p, what)]
    except RegistryError as exc:
        # A refusal means no API; anything else (a 5xx, a lost page) may hide artifacts
        # that the tag, written only where the API was missing, does not list.
        refused = getattr(exc, "status", None) in REFUSING_STATUSES
        log.log(
            logging.DEBUG if refused else logging.WARNING,
            "%s: the referrers API failed, only the referrers tag is read: %s",
            what,
            exc,
        )
        return None


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""


def _annotations(value: object) -> dict[str, str]:
    """A descriptor's annotations as the spec has them (strings to strings); anything
    else a registry sends there is left out, never taken for a map."""
    if not isinstance(value, dict):
        return {}
    return {k: v for k, v in value.items() if isinstance(k, str) and isinstance(v, str)}


def newest(referrers: list[Referrer], artifact_type: str) -> Referrer | None:
    """The most recently created artifact of a type among ``referrers``: by its created
    annotation read as a time (one without it, with no RFC 3339 time, or with a time
    past ``CLOCK_SKEW`` ahead, which would shadow every artifact pushed until then, is
    oldest); of artifacts created in the same second, the greatest digest, so that every
    reader takes the same one whatever order a registry lists them in."""
    found = [r for r in referrers if r.artifact_type == artifact_type]
    latest = datetime.now(UTC) + CLOCK_SKEW
    return max(found, key=lambda r: (_created(r, latest), r.digest), default=None)


def _created(referrer: Referrer, latest: datetime) -> datetime:
    """The created annotation as an aware time (a time without a zone taken as UTC)."""
    try:
        when = datetime.fromisoformat(referrer.annotations.get(CREATED, ""))
    except ValueError:
        return _NEVER
    when = when if when.tzinfo else when.replace(tzinfo=UTC)
    return when if when <= latest else _NEVER


def _fallback_listing(client: RegistryClient, subject: Subject) -> list[dict] | None:
    """The fallback tag's entries; None when there is none, or when the tag holds
    something else (a tag of that name pushed by hand is not ours to complain about)."""
    tag = fallback_tag(subject.digest)
    try:
        raw = fetch_manifest(client, subject.repository, tag)[0]
    except NotFound:
        return None
    try:
        return _index_entries(raw, f"referrers tag {tag}")
    except RegistryError:
        log.debug("%s: the tag %s is not a referrers index; ignored", subject.digest, tag)
        return None


def read_artifact(
    client: RegistryClient,
    subject: Subject,
    referrer: Referrer,
    wanted: Callable[[dict[str, str]], bool] | None = None,
) -> list[ArtifactBlob]:
    """The blobs of an artifact, each checked against its digest, with its annotations;
    only those whose annotations ``wanted`` accepts, when given (one layer's of many)."""
    raw, _ = fetch_manifest(client, subject.repository, referrer.digest)
    what = f"artifact {referrer.digest} of {subject.digest}"
    if referrer.size is not None:
        check_size(raw, referrer.size, what)
    try:
        manifest = json.loads(raw)
        layers = manifest["layers"]
        if not isinstance(layers, list):
            raise TypeError("layers is no list")
        if manifest.get("subject", {}).get("digest") != subject.digest:
            raise RegistryError(f"{what}: it is attached to another image")
        if manifest.get("artifactType") != referrer.artifact_type:
            raise RegistryError(f"{what}: it is not a {referrer.artifact_type}")
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        raise RegistryError(f"{what}: not a valid artifact manifest") from None
    chosen: list[tuple[str, int, str, dict[str, str]]] = []
    for layer in layers:
        try:
            digest, size, media_type = layer["digest"], int(layer["size"]), layer["mediaType"]
            if not (isinstance(digest, str) and isinstance(media_type, str)):
                raise TypeError("digest or media type is no string")
        except (KeyError, TypeError, ValueError):
            raise RegistryError(f"{what}: a layer descriptor is malformed") from None
        notes = _annotations(layer.get("annotations"))
        if wanted is not None and not wanted(notes):
            continue
        if not 0 <= size <= MAX_ARTIFACT_BLOB:
            raise RegistryError(f"{what}: a blob of {size} bytes is refused")
        chosen.append((digest, size, media_type, notes))
    total = sum(size for _, size, _, _ in chosen)
    if total > MAX_ARTIFACT_BYTES:
        raise RegistryError(
            f"{what}: its blobs add up to {total} bytes, over the {MAX_ARTIFACT_BYTES} read at once"
        )

    def checked(digest: str, size: int) -> bytes:
        # No more than the descriptor says: the sizes are what the total bounds.
        data = client.get_blob(subject.repository, digest, f"{what}: blob", limit=size)
        check_size(data, size, f"{what}: blob {digest}")
        return data

    # All at once: a tar index is three blobs, asked for before a mount is ready.
    with ThreadPoolExecutor(ARTIFACT_FETCHES, thread_name_prefix="artifact") as pool:
        fetched = [pool.submit(checked, digest, size) for digest, size, _, _ in chosen]
        return [
            (done.result(), media_type, notes)
            for done, (_, _, media_type, notes) in zip(fetched, chosen, strict=True)
        ]


def fallback_tag(digest: str) -> str:
    """The referrers tag schema's tag for a subject: ``<algorithm>-<encoded>``, the
    algorithm cut to 32 characters and the encoded part to 64 (a sha512 subject's tag
    is not its whole digest), characters a tag cannot hold made ``-``."""
    algorithm, _, encoded = digest.partition(":")
    return _NOT_IN_TAG.sub("-", f"{algorithm[:32]}-{encoded[:64]}")


def _add_to_fallback_index(
    client: RegistryClient,
    subject: Subject,
    artifact_type: str,
    digest: str,
    size: int,
    created: str,
) -> None:
    """Put the new artifact in the subject's fallback index, in place of one of its type."""
    tag = fallback_tag(subject.digest)
    try:
        raw, _ = fetch_manifest(client, subject.repository, tag)
        entries = _index_entries(raw, f"referrers tag {tag}")
    except NotFound:
        entries = []
    kept = [e for e in entries if e.get("artifactType") != artifact_type]
    kept.append(
        {
            "mediaType": OCI_MANIFEST,
            "digest": digest,
            "size": size,
            "artifactType": artifact_type,
            "annotations": {CREATED: created},
        }
    )
    index = canonical_json({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": kept})
    client.put_manifest(subject.repository, tag, index, OCI_INDEX)
    log.debug("%s: referrers kept under the tag %s", subject.digest, tag)


def _index_entries(raw: bytes, what: str) -> list[dict]:
    try:
        document = json.loads(raw)
        entries = document["manifests"]
        if not isinstance(entries, list):
            raise TypeError
    except (ValueError, KeyError, TypeError, RecursionError):
        raise RegistryError(f"{what}: not an image index") from None
    return [e for e in entries if isinstance(e, dict)]
