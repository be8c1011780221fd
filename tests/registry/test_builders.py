"""Images as builders and copiers other than ours write them: BuildKit, skopeo.

Each image is pushed to the real registry in the shape that tool gives it,
then resolved and opened as a user's ``mount`` would.
"""

from __future__ import annotations

import io
import subprocess
import tarfile
from pathlib import Path

from blockstore.image import open_image
from blockstore.registry import RegistryClient
from blockstore.registry.digests import canonical_json, digest_of
from blockstore.registry.mediatypes import DOCKER_CONFIG, DOCKER_MANIFEST
from blockstore.tarlayer.erofs_reader import read_metadata

DOCKER_ZSTD_LAYER = "application/vnd.docker.image.rootfs.diff.tar.zstd"
"""BuildKit's zstd layer type under Docker media types (``oci-mediatypes=false``)."""


def one_file_tar(name: str, content: bytes) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(name)
        info.size, info.mode = len(content), 0o644
        tar.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def push_docker_image(
    client: RegistryClient, repository: str, tag: str, blob: bytes, layer_type: str, tar: bytes
) -> None:
    """A one-layer image with Docker's manifest and config types, as BuildKit pushes it."""
    config = canonical_json(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": [digest_of(tar)]},
        }
    )
    for data in (blob, config):
        client.upload_blob(repository, digest_of(data), data)
    manifest = {
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST,
        "config": {"mediaType": DOCKER_CONFIG, "digest": digest_of(config), "size": len(config)},
        "layers": [{"mediaType": layer_type, "digest": digest_of(blob), "size": len(blob)}],
    }
    client.put_manifest(repository, tag, canonical_json(manifest), DOCKER_MANIFEST)


def test_a_zstd_layer_under_dockers_media_types_is_a_tar_layer(registry, tmp_path: Path):
    """BuildKit with ``compression=zstd`` and Docker media types labels its layers
    ``application/vnd.docker.image.rootfs.diff.tar.zstd`` (containerd and
    containers/image know the type): opened, the layer is the zstd tar it is, its
    files listed and its tar served. Before, it was served as its raw bytes, with a
    warning, and the mount failed (EINVAL from the kernel)."""
    tar = one_file_tar("hello.txt", b"hello from a docker zstd layer\n")
    blob = subprocess.run(["zstd", "-q", "-c"], input=tar, capture_output=True, check=True).stdout
    with registry.client() as client:
        push_docker_image(client, "builders/docker-zstd", "v1", blob, DOCKER_ZSTD_LAYER, tar)
    ref = f"{registry.host}/builders/docker-zstd:v1"
    image = open_image(ref, cache_dir=tmp_path / "cache", options=registry.options())
    try:
        (export,) = image.exports()
        data = b"".join(bytes(piece) for piece in export.read(0, export.size))
    finally:
        image.close()
    metadata = export.index.metadata
    assert set(read_metadata(data[: len(metadata)]).root.children) == {b"hello.txt"}
    assert data[len(metadata) :][: len(tar)] == tar
