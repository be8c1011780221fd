"""The fixture images pushed into a registry, as references every test can read."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from blockstore.registry import RegistryClient, RegistryOptions, push_image
from rig.images import ErofsImages

DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
"""Docker's layer media type, for the fixture images pushed with Docker's types."""


def push_erofs(
    registry_host: str,
    repo: str,
    tag: str,
    paths: list[Path],
    *,
    options: RegistryOptions | None = None,
    **push_options,
) -> str:
    """Push image files as the layers of ``registry_host/repo:tag``; return the reference.

    Plain HTTP unless ``options`` say otherwise; ``push_options`` go to
    ``push_image`` (``platform``, ``add_to_index``, ``docker_schema2``...).
    """
    with RegistryClient(registry_host, options or RegistryOptions(insecure=True)) as client:
        push_image(client, repo, tag, [Path(p) for p in paths], **push_options)
    return f"{registry_host}/{repo}:{tag}"


@dataclass
class PushedImages:
    small: str
    """One OCI manifest, one layer: ``erofs_images.small``."""
    large: str
    """One layer of at least 64 MiB: ``erofs_images.large``."""
    multilayer: str
    """The three ``erofs_images.layers``, bottom first."""
    index: str
    """OCI index: linux/amd64 is ``small``, linux/arm64/v8 is ``layers[0]``."""
    docker_schema2: str
    """Docker schema2 media types (manifest, config, layer), one layer: ``small``."""
    docker_list: str
    """Docker manifest list: linux/amd64 is ``small``, linux/arm64/v8 is ``layers[0]``."""
    docker_multilayer: str
    """The three ``erofs_images.layers`` with Docker schema2 media types."""

    @staticmethod
    def push_erofs(registry_host: str, repo: str, tag: str, paths: list[Path], **kw) -> str:
        return push_erofs(registry_host, repo, tag, paths, **kw)


def push_fixture_images(host: str, images: ErofsImages, **kw) -> PushedImages:
    """Push every fixture image into the registry at ``host``."""
    small, base = images.small.path, images.layers[0].path
    stack = [layer.path for layer in images.layers]
    docker = {"docker_schema2": True, "media_type": DOCKER_LAYER, **kw}

    def index_of_two(repo: str, **options) -> str:
        """``small`` for linux/amd64 and the base layer for linux/arm64/v8, under one tag."""
        for path, platform in ((small, "linux/amd64"), (base, "linux/arm64/v8")):
            ref = push_erofs(host, repo, "v1", [path], platform=platform, add_to_index=True,
                             **options)  # fmt: skip
        return ref

    return PushedImages(
        small=push_erofs(host, "fixtures/small", "v1", [small], **kw),
        large=push_erofs(host, "fixtures/large", "v1", [images.large.path], **kw),
        multilayer=push_erofs(host, "fixtures/multilayer", "v1", stack, **kw),
        index=index_of_two("fixtures/index", **kw),
        docker_schema2=push_erofs(host, "fixtures/docker", "v1", [small], **docker),
        docker_list=index_of_two("fixtures/docker-list", **docker),
        docker_multilayer=push_erofs(host, "fixtures/docker-multilayer", "v1", stack, **docker),
    )
