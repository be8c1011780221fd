"""The OCI distribution client: references, auth, manifests, ranged blob reads, push."""

from blockstore.registry.blob import RegistryBlob
from blockstore.registry.client import RegistryClient
from blockstore.registry.manifests import Layer, ResolvedImage, resolve_image
from blockstore.registry.mediatypes import EROFS_MEDIA_TYPE
from blockstore.registry.options import RegistryOptions
from blockstore.registry.push import push_image
from blockstore.registry.reference import Reference, normalize_digest, parse_reference

__all__ = [
    "EROFS_MEDIA_TYPE",
    "Layer",
    "Reference",
    "RegistryBlob",
    "RegistryClient",
    "RegistryOptions",
    "ResolvedImage",
    "normalize_digest",
    "parse_reference",
    "push_image",
    "resolve_image",
]
