"""Proper OCI images of tar layers: an image layout on disk, copied to a registry with skopeo.

The layout is what ``skopeo``, ``podman`` and ``buildah`` write: ``oci-layout``,
``index.json`` and content-addressed ``blobs/sha256``. The config carries the
``diff_ids`` (sha256 of each uncompressed tar), as every image builder writes.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import subprocess
from pathlib import Path

MEDIA_TYPES = {
    "tar": "application/vnd.oci.image.layer.v1.tar",
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
}


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _put(layout: Path, data: bytes) -> dict:
    digest = _digest(data)
    path = layout / "blobs" / "sha256" / digest.split(":")[1]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return {"digest": digest, "size": len(data)}


def push_tar_layer(registry, repository: str, tag: str, kind: str, tar: bytes, where: Path) -> str:
    """``tar``, compressed as ``kind``, pushed as a one-layer image with that kind's media
    type (its config's diff_id is the tar's digest); the image's reference."""
    from blockstore.registry.push import push_image

    layer = where / f"layer.{kind}"
    layer.write_bytes(compress(kind, tar))
    client = registry.client()
    try:
        push_image(client, repository, tag, [layer], media_type=MEDIA_TYPES[kind])
    finally:
        client.close()
    return f"{registry.host}/{repository}:{tag}"


def compress(kind: str, tar: bytes) -> bytes:
    if kind == "gzip":
        return gzip.compress(tar, 6, mtime=0)
    if kind == "zstd":
        return subprocess.run(
            ["zstd", "-q", "-c"], input=tar, capture_output=True, check=True
        ).stdout
    return tar


def make_layout(layout: Path, tag: str, layers: list[tuple[str, bytes]]) -> Path:
    """An OCI layout holding one linux/amd64 image of ``(kind, tar bytes)`` layers, bottom first."""
    layout.mkdir(parents=True, exist_ok=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    descriptors, diff_ids = [], []
    for kind, tar in layers:
        desc = _put(layout, compress(kind, tar))
        descriptors.append({"mediaType": MEDIA_TYPES[kind], **desc})
        diff_ids.append(_digest(tar))
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                **_put(layout, config),
            },
            "layers": descriptors,
        }
    ).encode()
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                **_put(layout, manifest),
                "annotations": {"org.opencontainers.image.ref.name": tag},
            }
        ],
    }
    (layout / "index.json").write_text(json.dumps(index))
    return layout


def skopeo_copy(layout: Path, tag: str, registry_host: str, repository: str) -> str:
    """Copy the layout's image into a plain-HTTP registry; return its reference."""
    ref = f"{registry_host}/{repository}:{tag}"
    subprocess.run(
        [
            "skopeo",
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
            "--preserve-digests",
            f"oci:{layout}:{tag}",
            f"docker://{ref}",
        ],
        check=True,
        capture_output=True,
    )
    return ref
