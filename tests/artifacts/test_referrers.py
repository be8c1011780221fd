"""Artifacts on an image, pushed and read back through the referrers tag schema."""

from __future__ import annotations

import pytest
from rig.pushed import push_erofs

from blockstore.errors import UsageError
from blockstore.registry import RegistryClient, resolve_image
from blockstore.registry.digests import digest_of
from blockstore.registry.referrers import (
    MAX_ARTIFACT_BLOB,
    Subject,
    list_referrers,
    newest,
    push_artifact,
    read_artifact,
)

ARTIFACT = "application/vnd.blockstore.test-artifact.v1"
BLOB = "application/octet-stream"
CREATED = "2024-01-01T00:00:00Z"


def subject_of(client: RegistryClient, ref: str) -> Subject:
    image = resolve_image(client, ref, None)
    raw = image.manifests[image.manifest_digest]
    return Subject(ref.split("/", 1)[1].rsplit(":", 1)[0], image.manifest_digest, len(raw))


@pytest.fixture
def subject_ref(registry, erofs_images, request) -> str:
    """An image of this test's own repository, so its artifacts meet no other test's."""
    repository = "referrers/" + request.node.name.replace("_", "-")[:60].strip("-")
    return push_erofs(registry.host, repository, "v1", [erofs_images.small.path])


def test_an_artifact_blob_over_4_mib_reads_back(registry, subject_ref):
    """A blob one byte over 4 MiB (the cap of manifests and configs) is pushed as an
    artifact and read back whole: artifact blobs are allowed up to MAX_ARTIFACT_BLOB."""
    data = bytes(range(256)) * ((4 << 20) // 256) + b"!"
    with registry.client() as client:
        subject = subject_of(client, subject_ref)
        push_artifact(client, subject, ARTIFACT, [(data, BLOB, {})], created=CREATED)
        referrer = newest(list_referrers(client, subject), ARTIFACT)
        assert referrer is not None
        assert read_artifact(client, subject, referrer) == [(data, BLOB, {})]


def test_an_artifact_blob_over_the_limit_is_refused_before_any_upload(registry, subject_ref):
    """A blob over MAX_ARTIFACT_BLOB, which no reader would take, is refused up front with
    a usage error saying its size and the limit; nothing of the artifact is uploaded."""
    small, big = b"first", b"\0" * (MAX_ARTIFACT_BLOB + 1)
    with registry.client() as client:
        subject = subject_of(client, subject_ref)
        with pytest.raises(UsageError, match=f"{MAX_ARTIFACT_BLOB + 1} bytes is over"):
            push_artifact(
                client, subject, ARTIFACT, [(small, BLOB, {}), (big, BLOB, {})], created=CREATED
            )
        assert not client.blob_exists(subject.repository, digest_of(small))
        assert list_referrers(client, subject) == []
