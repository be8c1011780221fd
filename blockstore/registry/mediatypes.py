"""The media types of manifests, indexes, configs and layers the client reads and writes,
and the kind of tar layer each layer type is."""

from __future__ import annotations

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
EROFS_MEDIA_TYPE = "application/vnd.erofs.layer.v1"
"""The layer media type containerd's EROFS snapshotter and our push use."""

INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})
MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
IMAGE_CONFIG_TYPES = frozenset({OCI_CONFIG, DOCKER_CONFIG})

MANIFEST_ACCEPT = ", ".join(sorted(INDEX_TYPES | MANIFEST_TYPES))
"""Every manifest type we read: registries answer 404 for a type not accepted."""

TAR, GZIP, ZSTD = "tar", "gzip", "zstd"
"""The kinds of tar layer: how the tar is stored in the blob."""
_OCI_LAYER = "application/vnd.oci.image.layer."
_DOCKER_LAYER = "application/vnd.docker.image.rootfs."
OCI_TAR = _OCI_LAYER + "v1.tar"
OCI_TAR_GZIP = OCI_TAR + "+gzip"
OCI_TAR_ZSTD = OCI_TAR + "+zstd"
LAYER_KINDS = {
    OCI_TAR: TAR,
    OCI_TAR_GZIP: GZIP,
    OCI_TAR_ZSTD: ZSTD,
    _OCI_LAYER + "nondistributable.v1.tar": TAR,
    _OCI_LAYER + "nondistributable.v1.tar+gzip": GZIP,
    _OCI_LAYER + "nondistributable.v1.tar+zstd": ZSTD,
    _DOCKER_LAYER + "diff.tar": TAR,
    _DOCKER_LAYER + "diff.tar.gzip": GZIP,
    # BuildKit's zstd layers under Docker media types; containerd reads them too.
    _DOCKER_LAYER + "diff.tar.zstd": ZSTD,
    _DOCKER_LAYER + "foreign.diff.tar": TAR,
    _DOCKER_LAYER + "foreign.diff.tar.gzip": GZIP,
}


def layer_kind(media_type: str) -> str | None:
    """``tar``, ``gzip`` or ``zstd`` for a tar layer; None for anything served as is."""
    return LAYER_KINDS.get(media_type)


def compressed_tar(media_type: str) -> bool:
    """A gzip or zstd tar layer: read from its decompressed tar, kept under the tar's own
    digest; its blob is read only by the layer's passes and span pump."""
    return layer_kind(media_type) not in (None, TAR)
