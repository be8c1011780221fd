"""Upload files as the layers of an image: blobs, a config, a manifest, maybe an index.

What ``blockstore push`` does for users who build EROFS images, and what the
tests use to put fixture images in a real registry. The config and
manifests are serialised deterministically, so pushing the same files gives
the same digests.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shlex
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from blockstore import erofs_format
from blockstore.errors import IntegrityError, NotFound, RegistryError, UsageError
from blockstore.registry.client import RegistryClient
from blockstore.registry.descriptors import MAX_LAYERS, ManifestProblem, check_index
from blockstore.registry.digests import canonical_json, digest_of
from blockstore.registry.manifests import config_platform, fetch_manifest
from blockstore.registry.mediatypes import (
    DOCKER_CONFIG,
    DOCKER_LIST,
    DOCKER_MANIFEST,
    EROFS_MEDIA_TYPE,
    GZIP,
    IMAGE_CONFIG_TYPES,
    INDEX_TYPES,
    MANIFEST_TYPES,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_MANIFEST,
    OCI_TAR,
    OCI_TAR_GZIP,
    OCI_TAR_ZSTD,
    compressed_tar,
    layer_kind,
)
from blockstore.registry.platforms import Platform, host_platform
from blockstore.tarlayer.zstdframes import ZSTD_MAGIC, is_skippable_frame, read_frames


def push_image(
    client: RegistryClient,
    repository: str,
    tag: str,
    layer_paths: list[Path],
    *,
    platform: str | None = None,
    media_type: str | Sequence[str] = EROFS_MEDIA_TYPE,
    add_to_index: bool = False,
    replace_index: bool = False,
    docker_schema2: bool = False,
) -> str:
    """Push ``layer_paths`` (bottom first) as one image; return its manifest digest.

    ``platform``: this host's by default, as ``blockstore push`` has it.
    ``media_type``: one for every layer, or one per layer (an image of EROFS and
    tar layers). With ``add_to_index`` the tag becomes an index holding this
    platform's manifest next to the other platforms already under the tag
    (replacing an entry of the same platform); without it, a tag holding an index of
    other platforms is refused unless ``replace_index`` says to replace it.
    ``docker_schema2`` uses Docker's media types for the manifest, config and index
    instead of OCI's.
    """
    if not layer_paths:
        raise UsageError("an image needs at least one layer")
    if len(layer_paths) > MAX_LAYERS:
        # Refused before any upload: every command here refuses such a manifest.
        raise UsageError(
            f"an image of {len(layer_paths)} layers: at most {MAX_LAYERS} are served, "
            "so it could not be mounted or inspected"
        )
    target = Platform.parse(platform) if platform else host_platform()
    paths = [Path(p) for p in layer_paths]
    types = [media_type] * len(paths) if isinstance(media_type, str) else list(media_type)
    if len(types) != len(paths):
        raise UsageError(f"{len(types)} media types for {len(paths)} layers")
    for path, layer_type in zip(paths, types, strict=True):
        check_layer_file(path, layer_type)
    if not (add_to_index or replace_index):
        _check_index_kept(client, repository, tag, target)  # before a byte is uploaded
    layers = []
    diff_ids = []
    for path, layer_type in zip(paths, types, strict=True):
        digest, size = file_digest(path)
        client.upload_blob(repository, digest, path)
        layers.append({"mediaType": layer_type, "digest": digest, "size": size})
        diff_ids.append(diff_id(path, layer_type, digest))
    config = canonical_json(
        {
            **_platform_fields(target),
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "config": {},
            # A fixed date keeps the config, hence every digest, reproducible.
            "created": "1970-01-01T00:00:00Z",
        }
    )
    config_digest = digest_of(config)
    client.upload_blob(repository, config_digest, config)
    manifest_type = DOCKER_MANIFEST if docker_schema2 else OCI_MANIFEST
    manifest = canonical_json(
        {
            "schemaVersion": 2,
            "mediaType": manifest_type,
            "config": {
                "mediaType": DOCKER_CONFIG if docker_schema2 else OCI_CONFIG,
                "digest": config_digest,
                "size": len(config),
            },
            "layers": layers,
        }
    )
    manifest_digest = digest_of(manifest)
    if not add_to_index:
        client.put_manifest(repository, tag, manifest, manifest_type)
        return manifest_digest
    client.put_manifest(repository, manifest_digest, manifest, manifest_type)
    entry = {
        "mediaType": manifest_type,
        "digest": manifest_digest,
        "size": len(manifest),
        "platform": _platform_fields(target),
    }
    others = _kept_entries(client, repository, tag, target, manifest_digest)
    index_type = DOCKER_LIST if docker_schema2 else OCI_INDEX
    index = canonical_json(
        {"schemaVersion": 2, "mediaType": index_type, "manifests": [*others, entry]}
    )
    client.put_manifest(repository, tag, index, index_type)
    return manifest_digest


def check_layer_file(path: Path, media_type: str) -> None:
    """Refuse, before anything is uploaded, a layer that cannot be read or that claims
    the EROFS media type without being an EROFS image (it would only fail at mount)."""
    try:
        with path.open("rb") as file:
            head = file.read(erofs_format.SUPER_OFFSET + 4)
    except OSError as exc:
        raise unreadable_layer(path, exc) from None
    if media_type != EROFS_MEDIA_TYPE:
        return
    if not _is_erofs(head):
        seen = _tar_layer_type(path, head)
        hint = (
            f"it is a {seen[0]}: push it with --media-type {seen[1]}"
            if seen
            else "to push other content, give its layer media type with --media-type"
        )
        raise UsageError(
            f"cannot push {path}: it is not an EROFS image (no EROFS superblock at byte "
            f"{erofs_format.SUPER_OFFSET}); {hint}"
        )


def detect_media_type(path: Path) -> str:
    """The layer media type of what ``path`` holds: an EROFS image, or a tar archive,
    plain or in a gzip or zstd stream. Anything else is refused, since its type cannot
    be told from its bytes."""
    try:
        with path.open("rb") as file:
            head = file.read(erofs_format.SUPER_OFFSET + 4)
    except OSError as exc:
        raise unreadable_layer(path, exc) from None
    if _is_erofs(head):
        return EROFS_MEDIA_TYPE
    seen = _tar_layer_type(path, head)
    if seen is None:
        raise UsageError(
            f"cannot push {path}: it is not an EROFS image (no EROFS superblock at byte "
            f"{erofs_format.SUPER_OFFSET}) nor a tar archive (plain, gzip or zstd); to push "
            "other content, give its layer media type with --media-type"
        )
    return seen[1]


def unreadable_layer(path: Path, exc: OSError) -> UsageError:
    """Why ``path`` cannot be pushed; a directory is told how to make a layer of it, as
    a user who pushes a tree, as other tools build images from one, expects."""
    if isinstance(exc, IsADirectoryError):
        tree = shlex.quote(str(path))
        return UsageError(
            f"cannot push {path}: it is a directory, and a layer is a file: make one of it "
            f"first (mkfs.erofs --all-root LAYER.erofs {tree}, or tar -C {tree} "
            "-czf LAYER.tar.gz .)"
        )
    return UsageError(f"cannot push {path}: {exc.strerror or exc}")


def _is_erofs(head: bytes) -> bool:
    """Whether a file's first bytes hold the EROFS superblock's magic in its place."""
    magic = head[erofs_format.SUPER_OFFSET :]
    return len(magic) == 4 and int.from_bytes(magic, "little") == erofs_format.SUPER_MAGIC


def _tar_layer_type(path: Path, head: bytes) -> tuple[str, str] | None:
    """What kind of tar layer the file is, and its OCI media type, if the tar it holds
    (inside the gzip or zstd stream it starts with) starts with a tar header, or is an
    empty tar."""
    if head.startswith(b"\x1f\x8b"):
        kind, media_type = "tar archive in a gzip stream", OCI_TAR_GZIP
    elif head.startswith(ZSTD_MAGIC) or is_skippable_frame(head):
        kind, media_type = "tar archive in a zstd stream", OCI_TAR_ZSTD
    else:
        kind, media_type = "tar archive", OCI_TAR
    try:
        with path.open("rb") as raw:
            stream: IO[bytes] = raw
            if media_type == OCI_TAR_GZIP:
                stream = gzip.GzipFile(fileobj=raw)
            elif media_type == OCI_TAR_ZSTD:  # every frame: pzstd's stream starts skippable
                stream = read_frames(raw)
            first = _read_up_to(stream, tarfile.BLOCKSIZE)
            if len(first) == tarfile.BLOCKSIZE and not first.strip(b"\0"):
                return (kind, media_type) if _rest_is_zero_blocks(stream, 1) else None
            tarfile.TarInfo.frombuf(first, "utf-8", "surrogateescape")
    except (OSError, EOFError, tarfile.HeaderError, IntegrityError):
        return None
    return kind, media_type


def _read_up_to(stream: IO[bytes], size: int) -> bytes:
    """``size`` bytes of ``stream``, fewer only at its end (a zstd reader may hand over
    less than asked at a frame's end)."""
    data = b""
    while len(data) < size:
        more = stream.read(size - len(data))
        if not more:
            break
        data += more
    return data


def _rest_is_zero_blocks(stream: IO[bytes], blocks: int) -> bool:
    """Whether what is left of ``stream``, after ``blocks`` zero blocks read, is zero
    blocks only, two at least in all: an empty tar. ``tar -cf x.tar -T /dev/null``
    writes 20 zero blocks (10240 bytes), Docker's and buildkit's empty layer is a
    gzip stream of two (1024 bytes): a tar holding no entry is its end marker alone,
    two zero blocks, padded with zero blocks to its record size. Anything else after
    them (a partial block, a byte not zero) is no empty tar."""
    size = blocks * tarfile.BLOCKSIZE
    while chunk := stream.read(1 << 16):
        if chunk.strip(b"\0"):
            return False
        size += len(chunk)
    return size % tarfile.BLOCKSIZE == 0 and size >= 2 * tarfile.BLOCKSIZE


def diff_id(path: Path, media_type: str, digest: str) -> str:
    """A layer's diff_id: the digest of its tar uncompressed (gzip, zstd), as the image
    spec says and as a tar layer's index is checked against; the blob's own digest for
    anything the tar layers do not take for a compressed tar."""
    if not compressed_tar(media_type):
        return digest
    try:
        with path.open("rb") as raw:
            if layer_kind(media_type) == GZIP:
                stream = gzip.GzipFile(fileobj=raw)
            else:  # every frame, as a zstd:chunked layer has many, read as a mount reads them
                stream = read_frames(raw)
            return "sha256:" + hashlib.file_digest(stream, "sha256").hexdigest()
    except (OSError, EOFError, IntegrityError) as exc:
        raise UsageError(f"cannot push {path} as {media_type}: {exc}") from None


def file_digest(path: Path) -> tuple[str, int]:
    """``sha256:<hex>`` and size of a file, read in blocks."""
    with path.open("rb") as file:
        digest = hashlib.file_digest(file, "sha256").hexdigest()
        return f"sha256:{digest}", file.tell()


def _kept_entries(
    client: RegistryClient, repository: str, tag: str, target: Platform, digest: str
) -> list[dict]:
    """The entries under ``tag`` that stay beside ``target``'s new manifest ``digest``:
    all but ``target``'s own entry (one listed without a platform judged by its config,
    as resolving judges it) and the attestations of the manifest it replaces."""
    entries = _index_entries(client, repository, tag)
    own = [e for e in entries if _same_platform(e, target, client, repository, tag)]
    replaced = {e["digest"] for e in own} - {digest}
    return [e for e in entries if e not in own and not _attests(e, replaced)]


def _index_entries(client: RegistryClient, repository: str, tag: str) -> list[dict]:
    """The platform entries already under ``tag``: those of an index, or the plain manifest's."""
    try:
        raw, digest = fetch_manifest(client, repository, tag)
    except NotFound:
        return []
    document = _json_object(raw)
    if document is None:
        # A page a proxy or login wall answers with: the index must not be guessed at.
        raise RegistryError(
            f"{_named(client, repository, tag)}: what the registry sent for the tag is not a JSON "
            "object, so its index cannot be added to"
        )
    if _is_index(document):
        try:
            check_index(document)
        except ManifestProblem as problem:
            raise RegistryError(
                f"{_named(client, repository, tag)}: the index under the tag is refused: {problem}"
            ) from None
        return list(document["manifests"])
    offered = config_platform(client, repository, document, _named(client, repository, tag))
    platform = _platform_fields(offered)
    return [
        {
            "mediaType": document.get("mediaType", OCI_MANIFEST),
            "digest": digest,
            "size": len(raw),
            "platform": platform,
        }
    ]


def _json_object(raw: bytes) -> dict | None:
    """``raw`` parsed as a JSON object, or None if it is none."""
    try:
        document = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    return document if isinstance(document, dict) else None


def _is_index(document: dict) -> bool:
    return document.get("mediaType") in INDEX_TYPES or "manifests" in document


def _named(client: RegistryClient, repository: str, tag: str) -> str:
    """The image pushed to, as the user named it: its registry too, which a user pushing
    the same name to several registries needs to tell which one refused."""
    return f"image {client.registry}/{repository}:{tag}"


def _check_index_kept(client: RegistryClient, repository: str, tag: str, target: Platform) -> None:
    """Refuse to put one platform's manifest where an index lists others: they would be
    gone from the tag without a word. An index of ``target`` alone loses nothing."""
    dropped = _other_platforms(client, repository, tag, target)
    if dropped:
        them = "it" if len(dropped) == 1 else "them"
        raise UsageError(
            f"{_named(client, repository, tag)} is an index that also lists {', '.join(dropped)}: "
            f"pushing {target} there alone would drop {them}; add {target} beside "
            f"{them} with --add-to-index, replace the index with --replace-index, or "
            "push to another tag"
        )


def _other_platforms(
    client: RegistryClient, repository: str, tag: str, target: Platform
) -> list[str]:
    """The platforms the index under ``tag`` lists besides ``target`` (not attestations,
    whose platform is ``unknown``), then its entries listed without a platform that are
    not of ``target``; none if the tag holds no index, or one refused."""
    try:
        raw, _ = fetch_manifest(client, repository, tag)
    except NotFound:
        return []
    document = _json_object(raw)
    if document is None or not _is_index(document):
        return []
    try:
        check_index(document)
    except ManifestProblem:
        return []  # no image could be read from it: replacing it loses none
    entries = document["manifests"]
    offered = [
        Platform.from_descriptor(entry["platform"])
        for entry in entries
        if isinstance(entry.get("platform"), dict) and entry["platform"].get("os") != "unknown"
    ]
    # An entry may leave its platform out (the image spec makes it optional): replacing
    # the index drops it all the same, unless its config says it is of ``target``.
    listed = {entry.get("digest") for entry in entries}
    unnamed = [
        f"{str(entry.get('digest'))[:19]}… (listed without a platform)"
        for entry in entries
        if entry.get("platform") is None
        and not _attests(entry, listed)
        and not _same_platform(entry, target, client, repository, tag)
    ]
    return sorted({str(p) for p in offered if p.normalized() != target.normalized()}) + unnamed


def _platform_fields(platform: Platform) -> dict[str, str]:
    """The ``os``/``architecture``/``variant`` fields of a config or an index entry."""
    fields = {"architecture": platform.architecture, "os": platform.os}
    if platform.variant:
        fields["variant"] = platform.variant
    return fields


ATTESTED = "vnd.docker.reference.digest"
"""The annotation by which buildx's attestation entry in an index names the manifest it
describes."""


def _attests(entry: dict, digests: set[str]) -> bool:
    """Whether ``entry`` is an attestation of one of ``digests``: once they leave the
    index, it would describe a manifest the index does not list."""
    annotations = entry.get("annotations")
    return isinstance(annotations, dict) and annotations.get(ATTESTED) in digests


def _same_platform(
    entry: dict, target: Platform, client: RegistryClient, repository: str, tag: str
) -> bool:
    """Whether ``entry`` is of ``target``: by its platform, or, listed without one (the
    field is optional), by its image config's, as resolving judges it."""
    if entry.get("platform") is not None:  # ``null`` is no platform given, as resolving reads it
        offered = Platform.from_descriptor(entry["platform"])
    elif entry.get("mediaType") in MANIFEST_TYPES and "artifactType" not in entry:
        raw, _ = fetch_manifest(client, repository, entry["digest"])
        try:
            document = json.loads(raw)
        except (ValueError, RecursionError):
            return False  # no image: left as it is
        config = document.get("config") if isinstance(document, dict) else None
        if not isinstance(config, dict) or config.get("mediaType") not in IMAGE_CONFIG_TYPES:
            return False
        offered = config_platform(client, repository, document, _named(client, repository, tag))
    else:
        return False
    return offered.normalized() == target.normalized()
