"""Fixtures shared by every test: real registries, fixture images, the fault proxy.

The machinery lives in ``tests/rig``; this file only gives it pytest
lifetimes. Registries and images are session-scoped (each starts or builds
once, in well under a second or two); ``fresh_registry`` is a registry of a
test's own, free to stop.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from rig.images import ErofsImages, build_images
from rig.pushed import PushedImages, push_fixture_images
from rig.registry_server import RegistryServer


def _serve(server: RegistryServer) -> Iterator[RegistryServer]:
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    """A plain-HTTP registry shared by the session; a test that stops it must start it again."""
    yield from _serve(RegistryServer(tmp_path_factory.mktemp("registry")))


@pytest.fixture
def fresh_registry(tmp_path: Path) -> Iterator[RegistryServer]:
    """A plain-HTTP registry of this test's own, empty, free to stop and restart."""
    yield from _serve(RegistryServer(tmp_path / "registry"))


@pytest.fixture(scope="session")
def erofs_images(tmp_path_factory: pytest.TempPathFactory) -> ErofsImages:
    """EROFS images built once per session: ``.small``, ``.large``, ``.layers``."""
    return build_images(tmp_path_factory.mktemp("erofs"))


@pytest.fixture(scope="session")
def pushed_images(registry: RegistryServer, erofs_images: ErofsImages) -> PushedImages:
    """The fixture images pushed into ``registry``, as reference strings."""
    return push_fixture_images(registry.host, erofs_images)
