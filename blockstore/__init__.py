"""blockstore: mount filesystem images from OCI registries through a chunk cache."""

__version__ = "0.1.0"
