"""Fixtures of the registry client tests."""

from __future__ import annotations

from pathlib import Path

import pytest

import blockstore.registry.credentials as credentials

AUTH_ENVIRONMENT = (
    "DOCKER_CONFIG",
    "REGISTRY_AUTH_FILE",
    "XDG_RUNTIME_DIR",
    "BLOCKSTORE_USERNAME",
    "BLOCKSTORE_PASSWORD",
)


@pytest.fixture(autouse=True)
def no_ambient_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Each test sees no credentials but those it sets: an empty HOME, no auth variables,
    and podman's place for a login without ``$XDG_RUNTIME_DIR`` moved to an empty one."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setattr(credentials, "PODMAN_RUN_AUTH", str(tmp_path / "run" / "auth.json"))
    for name in AUTH_ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)
    return home
