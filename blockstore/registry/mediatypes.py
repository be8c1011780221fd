"""The media types of manifests, indexes, configs and layers the client reads and writes."""

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

MANIFEST_ACCEPT = ", ".join(sorted(INDEX_TYPES | MANIFEST_TYPES))
"""Every manifest type we read: registries answer 404 for a type not accepted."""
