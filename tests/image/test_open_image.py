"""Resolving an image online, from the cache offline, and with the registry gone.

Real registry, real cache; a fault proxy in front of the registry records
every request, so "never opens a network connection" is checked, not assumed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rig.credential_helpers import docker_config_with, helper_script
from rig.fault_proxy import Fault
from rig.pushed import push_erofs

from blockstore.errors import (
    CredentialHelperError,
    ImageNotCached,
    NotCached,
    NotFound,
    RegistryUnreachable,
)
from blockstore.image import open_image
from blockstore.registry import RegistryOptions

OPTIONS = RegistryOptions(insecure=True, timeout=2.0, max_attempts=2)


def read_all(blob) -> bytes:
    return b"".join(bytes(b) for b in blob.read(0, blob.size))


def test_offline_open_serves_cached_bytes_and_sends_nothing(
    fresh_registry, fault_proxy, erofs_images, tmp_path: Path
):
    """Resolve and read through a recording proxy, then open --offline: the bytes
    must match the image file, and the proxy must see no request at all."""
    proxy = fault_proxy(fresh_registry)
    reference = push_erofs(proxy.host, "offline/img", "v1", [erofs_images.small.path])
    expected = erofs_images.small.path.read_bytes()
    image = open_image(reference, cache_dir=tmp_path / "cache", options=OPTIONS)
    try:
        (blob,) = image.exports()
        assert read_all(blob) == expected
        blob.close()
    finally:
        image.close()
    seen = len(proxy.requests)

    offline = open_image(reference, cache_dir=tmp_path / "cache", offline=True)
    try:
        assert not offline.online
        (blob,) = offline.exports()
        assert blob.name == "layer0"
        assert read_all(blob) == expected
    finally:
        offline.close()
    assert len(proxy.requests) == seen, "an offline open sent requests"


def test_offline_uncached_read_fails_fast_with_eio(
    fresh_registry, fault_proxy, erofs_images, tmp_path: Path
):
    """Only the first chunk is cached; offline, a read elsewhere must raise NotCached
    (errno EIO) within a second and name the blob and offset."""
    proxy = fault_proxy(fresh_registry)
    reference = push_erofs(proxy.host, "partial/img", "v1", [erofs_images.large.path])
    image = open_image(reference, cache_dir=tmp_path / "cache", options=OPTIONS)
    (blob,) = image.exports()
    blob.read(0, 4096)
    blob.close()
    image.close()
    fresh_registry.stop()

    offline = open_image(reference, cache_dir=tmp_path / "cache", offline=True)
    try:
        (blob,) = offline.exports()
        started = time.monotonic()
        with pytest.raises(NotCached) as caught:
            blob.read(blob.size - 100_000, 4096)
        assert time.monotonic() - started < 1.0
        assert caught.value.errno == 5
        assert blob.digest in str(caught.value)
        assert "offset" in str(caught.value)
    finally:
        offline.close()


def _read_once_then_stopped(
    registry, erofs_images, tmp_path: Path, repository: str
) -> tuple[str, bytes]:
    """The large image pushed to ``repository``, its first 64 KiB read once into the cache
    at ``tmp_path/cache``, then ``registry`` stopped: the reference, and the bytes read."""
    reference = push_erofs(registry.host, repository, "v1", [erofs_images.large.path])
    image = open_image(reference, cache_dir=tmp_path / "cache", options=OPTIONS)
    (blob,) = image.exports()
    head = b"".join(bytes(b) for b in blob.read(0, 65536))
    blob.close()
    image.close()
    registry.stop()
    return reference, head


def test_registry_down_falls_back_to_cached_resolution(
    fresh_registry, erofs_images, tmp_path: Path
):
    """Online open with the registry process stopped: the cached resolution is used,
    saying why (the caller warns with it), cached bytes are served and uncached ones
    fail at once."""
    reference, head = _read_once_then_stopped(fresh_registry, erofs_images, tmp_path, "down/img")

    image = open_image(reference, cache_dir=tmp_path / "cache", options=OPTIONS)
    try:
        assert not image.online
        assert image.unreachable is not None
        (blob,) = image.exports()
        assert b"".join(bytes(b) for b in blob.read(0, 65536)) == head
        started = time.monotonic()
        with pytest.raises(NotCached):
            blob.read(blob.size - 4096, 4096)
        assert time.monotonic() - started < 1.0
    finally:
        image.close()


@pytest.mark.parametrize("status", [429, 502, 503])
def test_a_registry_answering_only_server_errors_falls_back_to_the_cache(
    fresh_registry, fault_proxy, erofs_images, tmp_path: Path, status
):
    """Tried: an image read once through a proxy, then the proxy answers every request
    with a 429 (a pull limit reached), a 502 (a gateway whose registry is down) or a
    503, retries and all. Must hold:
    the open serves the cached resolution and bytes, saying why, as for a registry that
    cannot be reached. Before, it failed with exit 3, as if the registry had said no to
    the image, and a cached image could not be mounted through its registry's outage."""
    reference = push_erofs(fresh_registry.host, "gateway/img", "v1", [erofs_images.large.path])
    proxy = fault_proxy(fresh_registry)
    through = reference.replace(fresh_registry.host, proxy.host)
    image = open_image(through, cache_dir=tmp_path / "cache", options=OPTIONS)
    (blob,) = image.exports()
    head = b"".join(bytes(b) for b in blob.read(0, 65536))
    blob.close()
    image.close()
    proxy.fault = Fault("status", status=status)

    image = open_image(through, cache_dir=tmp_path / "cache", options=OPTIONS)
    try:
        assert not image.online
        assert f"HTTP {status}" in str(image.unreachable)
        (blob,) = image.exports()
        read_head = b"".join(bytes(b) for b in blob.read(0, 65536))
    finally:
        image.close()
    assert read_head == head
    with pytest.raises(RegistryUnreachable) as caught:  # never cached: said as for a registry down
        open_image(through.replace("v1", "v2"), cache_dir=tmp_path / "cache", options=OPTIONS)
    assert caught.value.exit_code == 5 and f"HTTP {status}" in str(caught.value)


def test_a_cached_image_opens_when_its_credential_helper_fails_offline(
    fresh_registry, erofs_images, tmp_path: Path, monkeypatch
):
    """Tried: an image read once, then the registry stopped and its login left to a
    credential helper that fails, as a cloud one (gcloud, ecr-login) does when it cannot
    reach its provider to renew its token with the network down. Must hold: the open
    serves the cached resolution and bytes, saying the helper's failure as why, as for a
    registry that cannot be reached; an image never resolved here is refused naming the
    helper, as before, and so is a command that needs the registry (``index --push``,
    exit 4). Before, the helper's failure ended every open, and a cached image
    could not be mounted offline once its registry's login was a helper's."""
    reference, head = _read_once_then_stopped(fresh_registry, erofs_images, tmp_path, "helper/img")
    helper_script(tmp_path / "bin", "cloud", "echo 'cannot reach the provider' >&2; exit 1")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))
    docker_config_with(tmp_path / "docker", {"credHelpers": {fresh_registry.host: "cloud"}})

    image = open_image(reference, cache_dir=tmp_path / "cache", options=OPTIONS)
    try:
        assert not image.online
        assert "cannot reach the provider" in str(image.unreachable)
        (blob,) = image.exports()
        assert b"".join(bytes(b) for b in blob.read(0, 65536)) == head
    finally:
        image.close()
    with pytest.raises(CredentialHelperError, match="docker-credential-cloud"):
        open_image(reference.replace("v1", "v2"), cache_dir=tmp_path / "cache", options=OPTIONS)
    cache = ["--cache-dir", str(tmp_path / "cache")]
    pushed = subprocess.run(
        [sys.executable, "-m", "blockstore", "index", "--push", reference, "--insecure", *cache],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert pushed.returncode == CredentialHelperError.exit_code, pushed.stderr
    assert "docker-credential-cloud get failed" in pushed.stderr


def test_nothing_cached_and_registry_down_says_so(fresh_registry, tmp_path: Path):
    """No registry and no cached resolution: one clear error naming the reference
    and the cache; unreachable (exit 5) online, not cached (exit 9) offline. Where no
    cache was there before, it says so: before, it spoke of the image as "not in the
    cache" at a directory that held no cache (a failed first command removes it)."""
    reference = f"{fresh_registry.host}/never/seen:v1"
    fresh_registry.stop()
    for said in ("there was no cache at", "never resolved"):  # the first open made one
        with pytest.raises(RegistryUnreachable) as caught:
            open_image(reference, cache_dir=tmp_path / "cache", options=OPTIONS)
        message = str(caught.value)
        assert "never/seen:v1" in message and said in message, message
        assert str(tmp_path / "cache") in message
        assert caught.value.exit_code == 5

    with pytest.raises(ImageNotCached, match="offline"):
        open_image(reference, cache_dir=tmp_path / "cache", offline=True)


def test_layer_selection_by_index_and_digest(pushed_images, erofs_images, tmp_path: Path):
    """A multi-layer image exports every layer by default; --layer and --blob pick one,
    and an unknown layer is refused with the image's layer count."""
    image = open_image(pushed_images.multilayer, cache_dir=tmp_path / "cache", options=OPTIONS)
    try:
        assert [b.name for b in image.exports()] == ["layer0", "layer1", "layer2"]
        top = erofs_images.layers[2]
        (by_index,) = image.exports(layer=2)
        (by_digest,) = image.exports(blob=top.digest.removeprefix("sha256:"))
        assert by_index.digest == by_digest.digest == top.digest
        with pytest.raises(Exception, match="has no layer 7; it has 3"):
            image.exports(layer=7)
    finally:
        image.close()


def test_explicit_platform_must_match_a_single_platform_image(pushed_images, tmp_path: Path):
    """A one-platform (linux/amd64) image opened for linux/arm64 is refused with the
    platform it has; opened for its own platform, it resolves and says which."""
    with pytest.raises(NotFound, match="linux/amd64 only"):
        open_image(
            pushed_images.small,
            cache_dir=tmp_path / "cache",
            platform="linux/arm64",
            options=OPTIONS,
        )
    image = open_image(
        pushed_images.small, cache_dir=tmp_path / "cache", platform="linux/amd64", options=OPTIONS
    )
    try:
        assert image.resolved.platform == "linux/amd64"
    finally:
        image.close()


def test_layer_sizes_are_asked_beside_the_artifact_lookup(
    fresh_registry, fault_proxy, erofs_images, tmp_path: Path
):
    """Every request takes 1 s more (a far registry). Opening an image asks for its
    manifest, then its attached artifacts and each layer's size (HEAD, checked before
    serving): those go out together, so the open and its exports take two round trips
    (2 s), not three or more (4 s, one HEAD after another, before), and the sizes are
    still checked. Together is measured by when the requests reached the registry's
    proxy (within the second none of them can be answered in), not by how long the open
    took, which a loaded machine stretches."""
    proxy = fault_proxy(fresh_registry)
    reference = push_erofs(
        proxy.host, "far/img", "v1", [erofs_images.small.path, erofs_images.large.path]
    )
    proxy.fault = Fault("delay", seconds=1.0)
    pushed = len(proxy.requests)
    started = time.monotonic()
    patient = RegistryOptions(insecure=True, timeout=10.0, max_attempts=1)
    image = open_image(reference, cache_dir=tmp_path / "cache", options=patient)
    try:
        exports = image.exports()
        took = time.monotonic() - started
    finally:
        image.close()
    assert [e.name for e in exports] == ["layer0", "layer1"]
    heads = [r for r in proxy.requests[pushed:] if r.method == "HEAD"]
    assert len(heads) == 2, proxy.requests
    assert took >= 2.0, f"open and exports took {took:.2f} s"
    after_manifest = [r for r in proxy.requests[pushed:] if not r.path.endswith("/manifests/v1")]
    went_out = [r.arrived for r in after_manifest]
    assert max(went_out) - min(went_out) < 1.0, [(r.method, r.path) for r in after_manifest]


def test_only_the_layers_to_be_served_are_asked_for_their_size(
    fresh_registry, fault_proxy, erofs_images, tmp_path: Path
):
    """Serving one layer of a two-layer image (``--layer 1``) asks the registry for that
    layer's size alone; a layer that does not exist asks for none, and the open fails
    with the usual message."""
    proxy = fault_proxy(fresh_registry)
    reference = push_erofs(
        proxy.host, "one/img", "v1", [erofs_images.small.path, erofs_images.large.path]
    )
    pushed = len(proxy.requests)
    image = open_image(reference, cache_dir=tmp_path / "cache", options=OPTIONS, reading=(1, None))
    try:
        (export,) = image.exports(layer=1)
        assert export.name == "layer1"
    finally:
        image.close()
    heads = [r.path for r in proxy.requests[pushed:] if r.method == "HEAD"]
    assert len(heads) == 1 and heads[0].endswith(image.resolved.layers[1].digest)

    pushed = len(proxy.requests)
    with pytest.raises(NotFound, match="has no layer 5"):
        open_image(reference, cache_dir=tmp_path / "cache", options=OPTIONS, reading=(5, None))
    assert not [r for r in proxy.requests[pushed:] if r.method == "HEAD"]
