"""Resolving and reading the fixture images from a real plain-HTTP registry."""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rig.fault_proxy import Fault

from blockstore.errors import BlobReadError, IntegrityError, NotFound, RegistryError, UsageError
from blockstore.registry import (
    EROFS_MEDIA_TYPE,
    RegistryBlob,
    RegistryClient,
    RegistryOptions,
    ResolvedImage,
    parse_reference,
    push_image,
    resolve_image,
)
from blockstore.registry.digests import digest_of
from blockstore.registry.manifests import MAX_INDEX_DEPTH, MAX_INDEX_FETCHES
from blockstore.registry.mediatypes import OCI_INDEX, OCI_MANIFEST
from blockstore.source import BlobSource


def test_single_platform_image_resolves_to_its_layer(registry, pushed_images, erofs_images):
    """A one-layer OCI image: the layer's digest, size and media type are the file's."""
    with registry.client() as client:
        image = resolve_image(client, pushed_images.small, None)
    assert image.reference == pushed_images.small
    assert image.platforms == [] and image.platform is None
    [layer] = image.layers
    assert (layer.index, layer.digest, layer.size, layer.media_type) == (
        0,
        erofs_images.small.digest,
        erofs_images.small.size,
        EROFS_MEDIA_TYPE,
    )
    assert image.manifest_digest in image.manifests


@pytest.mark.parametrize("which", ["index", "docker_list"])
def test_index_picks_the_requested_platform(registry, pushed_images, erofs_images, which):
    """An OCI index and a Docker manifest list: each platform gets its own layer."""
    ref = getattr(pushed_images, which)
    with registry.client() as client:
        amd = resolve_image(client, ref, "linux/amd64")
        arm = resolve_image(client, ref, "linux/arm64")
    assert amd.platforms == ["linux/amd64", "linux/arm64/v8"]
    assert (amd.platform, amd.layers[0].digest) == ("linux/amd64", erofs_images.small.digest)
    assert (arm.platform, arm.layers[0].digest) == ("linux/arm64/v8", erofs_images.layers[0].digest)
    assert amd.index_digest in amd.manifests and amd.manifest_digest in amd.manifests


def test_unknown_platform_lists_the_platforms_there_are(registry, pushed_images):
    """Asking an index for a platform it lacks names the platforms it has."""
    with registry.client() as client, pytest.raises(NotFound) as caught:
        resolve_image(client, pushed_images.index, "linux/s390x")
    assert "linux/s390x" in str(caught.value)
    assert "linux/amd64, linux/arm64/v8" in str(caught.value)


def test_docker_schema2_and_multilayer(registry, pushed_images, erofs_images):
    """Docker schema2 media types resolve like OCI; layers keep their order."""
    with registry.client() as client:
        docker = resolve_image(client, pushed_images.docker_schema2, None)
        stacks = [
            resolve_image(client, pushed_images.multilayer, None),
            resolve_image(client, pushed_images.docker_multilayer, None),
        ]
    assert docker.layers[0].digest == erofs_images.small.digest
    for stack in stacks:
        assert [layer.digest for layer in stack.layers] == [i.digest for i in erofs_images.layers]
        assert [layer.index for layer in stack.layers] == [0, 1, 2]


def test_by_digest_and_record_round_trip(registry, pushed_images):
    """A reference pinned by digest gives the same image; the record survives JSON."""
    with registry.client() as client:
        by_tag = resolve_image(client, pushed_images.multilayer, None)
        ref = parse_reference(pushed_images.multilayer)
        pinned = f"{ref.registry}/{ref.repository}@{by_tag.manifest_digest}"
        by_digest = resolve_image(client, pinned, None)
    assert by_digest.layers == by_tag.layers
    again = ResolvedImage.from_record(by_tag.to_record())
    assert again.layers == by_tag.layers and again.manifest_digest == by_tag.manifest_digest
    assert by_tag.select_layer(index=1) == by_tag.layers[1]
    assert by_tag.select_layer(digest=by_tag.layers[2].digest.removeprefix("sha256:")).index == 2


def test_ranged_reads_return_the_blob_bytes(registry, pushed_images, erofs_images):
    """Random ranges of the 64 MiB layer, including past its end, equal the file's bytes."""
    data = erofs_images.large.path.read_bytes()
    with registry.client() as client:
        image = resolve_image(client, pushed_images.large, None)
        repository = parse_reference(pushed_images.large).repository
        blob: BlobSource = RegistryBlob(client, repository, image.layers[0])
        assert (blob.digest, blob.size) == (erofs_images.large.digest, len(data))
        rng = random.Random(7)
        for _ in range(20):
            offset = rng.randrange(len(data) + 100)
            length = rng.choice([1, 4096, 32768, 1 << 20, 3 << 20])
            assert blob.read_range(offset, length) == data[offset : offset + length]
        assert blob.read_range(len(data), 10) == b""
        assert blob.read_range(len(data) - 5, 100) == data[-5:]


@pytest.fixture(scope="module")
def small_blob(registry, pushed_images):
    client = registry.client()
    image = resolve_image(client, pushed_images.small, None)
    yield RegistryBlob(client, "fixtures/small", image.layers[0])
    client.close()


@settings(max_examples=60, deadline=None)
@given(offset=st.integers(0, 4 << 20), length=st.integers(0, 1 << 20))
def test_any_range_reads_the_files_bytes(small_blob, erofs_images, offset, length):
    """Any offset and length, inside, across or past the end: exactly the file's bytes."""
    with erofs_images.small.path.open("rb") as file:
        file.seek(offset)
        expected = file.read(length)
    assert small_blob.read_range(offset, length) == expected


def test_a_required_platform_holds_for_a_plain_manifest(registry, pushed_images, fault_proxy):
    """A plain linux/amd64 manifest asked for with require_platform: linux/arm64 is
    refused with NotFound naming the image's platform; linux/amd64 (and its alias
    x86_64) resolves, and the result carries the platform its config names."""
    proxy = fault_proxy(registry)
    ref = pushed_images.small.replace(registry.host, proxy.host)
    with RegistryClient(proxy.host, RegistryOptions(insecure=True)) as client:
        with pytest.raises(NotFound, match=r"is linux/amd64 only; asked for linux/arm64$"):
            resolve_image(client, ref, "linux/arm64", require_platform=True)
        for asked in ("linux/amd64", "linux/x86_64"):
            image = resolve_image(client, ref, asked, require_platform=True)
            assert (image.platform, image.platforms) == ("linux/amd64", [])
    assert any("/blobs/" in request.path for request in proxy.requests)


def test_an_unrequired_platform_costs_no_config_request(registry, pushed_images, fault_proxy):
    """Without require_platform (what opening an image with the host's default does), a
    plain manifest of another platform resolves as before, with no request for its
    config: the default path stays one manifest request."""
    proxy = fault_proxy(registry)
    ref = pushed_images.small.replace(registry.host, proxy.host)
    with RegistryClient(proxy.host, RegistryOptions(insecure=True)) as client:
        image = resolve_image(client, ref, "linux/arm64")
    assert image.platform is None and image.layers
    assert [r.path for r in proxy.requests if r.method == "GET"] == [
        f"/v2/{parse_reference(ref).repository}/manifests/v1"
    ]


def test_a_config_with_other_bytes_is_refused(registry, pushed_images, fault_proxy):
    """A required platform read from a config whose bytes were flipped on the way is an
    IntegrityError, never a platform taken from unchecked bytes."""
    proxy = fault_proxy(registry)
    proxy.fault = Fault("corrupt", path_contains="/blobs/", after_bytes=2)
    ref = pushed_images.small.replace(registry.host, proxy.host)
    with (
        RegistryClient(proxy.host, RegistryOptions(insecure=True)) as client,
        pytest.raises(IntegrityError, match="config sha256:"),
    ):
        resolve_image(client, ref, "linux/amd64", require_platform=True)


def test_a_malformed_platform_is_refused_before_any_request(registry, pushed_images, fault_proxy):
    """platform='bogus' fails with the same UsageError as everywhere a platform is parsed,
    for a single-platform image too, and before anything is sent."""
    proxy = fault_proxy(registry)
    ref = pushed_images.small.replace(registry.host, proxy.host)
    with RegistryClient(proxy.host, RegistryOptions(insecure=True)) as client:
        for require in (False, True):
            with pytest.raises(UsageError, match=r"invalid platform 'bogus': expected os/arch"):
                resolve_image(client, ref, "bogus", require_platform=require)
    assert proxy.requests == []


def put_index(client: RegistryClient, repository: str, tag: str, entries: list[dict]) -> dict:
    """Store an OCI index of ``entries`` under ``tag``; its descriptor (no platform)."""
    raw = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}).encode()
    client.put_manifest(repository, tag, raw, OCI_INDEX)
    return {"mediaType": OCI_INDEX, "digest": digest_of(raw), "size": len(raw)}


def index_of_one(client: RegistryClient, repository: str, tag: str, path, platform: str) -> dict:
    """An index under ``tag`` listing one image of ``platform``; its descriptor."""
    push_image(client, repository, tag, [path], platform=platform, add_to_index=True)
    raw = client.get_manifest(repository, tag).raw
    return {"mediaType": OCI_INDEX, "digest": digest_of(raw), "size": len(raw)}


def test_nested_indexes_are_followed(fresh_registry, erofs_images):
    """The image spec allows an index entry that is an index: one without a platform is
    searched (the arm64 one first, then the amd64 one), as is one whose platform is the
    one asked for; the layer is the platform's, the platforms those of every index seen."""
    small, base = erofs_images.small, erofs_images.layers[0]
    repository = "nested/image"
    with fresh_registry.client() as client:
        arm = index_of_one(client, repository, "arm", base.path, "linux/arm64/v8")
        amd = index_of_one(client, repository, "amd", small.path, "linux/amd64")
        put_index(client, repository, "bare", [arm, amd])
        amd_platform = {"os": "linux", "architecture": "amd64"}
        put_index(client, repository, "named", [{**amd, "platform": amd_platform}])
        for tag in ("bare", "named"):
            image = resolve_image(
                client, f"{fresh_registry.host}/{repository}:{tag}", "linux/amd64"
            )
            assert (image.platform, image.layers[0].digest) == ("linux/amd64", small.digest)
            assert amd["digest"] in image.manifests
        bare = resolve_image(client, f"{fresh_registry.host}/{repository}:bare", "linux/amd64")
    assert bare.platforms == ["linux/arm64/v8", "linux/amd64"]


def test_indexes_nested_past_the_bound_are_refused(fresh_registry, erofs_images):
    """A chain of MAX_INDEX_DEPTH indexes reaches its image; one more is refused as a
    registry error naming the bound, not followed on."""
    repository = "nested/chain"
    with fresh_registry.client() as client:
        entry = index_of_one(client, repository, "0", erofs_images.small.path, "linux/amd64")
        for depth in range(1, MAX_INDEX_DEPTH + 1):
            entry = put_index(client, repository, str(depth), [entry])
        deepest = f"{fresh_registry.host}/{repository}:{MAX_INDEX_DEPTH - 1}"
        assert resolve_image(client, deepest, "linux/amd64").layers
        too_deep = f"{fresh_registry.host}/{repository}:{MAX_INDEX_DEPTH}"
        with pytest.raises(RegistryError, match=f"nested more than {MAX_INDEX_DEPTH} deep"):
            resolve_image(client, too_deep, "linux/amd64")


def test_indexes_of_indexes_are_searched_once_each_and_within_a_budget(
    fresh_registry, erofs_images
):
    """An index listing one arm64-only index 1000 times, for an amd64 host: that index
    is fetched once, and the platform is said to be missing. Indexes fanning out to
    more than MAX_INDEX_FETCHES distinct indexes are refused, not searched through
    (three levels of a thousand would be a billion fetches within the depth bound)."""
    base = erofs_images.layers[0]
    repository = "nested/wide"
    with fresh_registry.client() as client:
        arm = index_of_one(client, repository, "arm", base.path, "linux/arm64/v8")
        put_index(client, repository, "repeated", [arm] * 1000)
        with pytest.raises(RegistryError, match="linux/arm64/v8"):
            resolve_image(client, f"{fresh_registry.host}/{repository}:repeated", "linux/amd64")
        many = [
            put_index(client, repository, f"empty{i}", [{**arm, "annotations": {"n": str(i)}}])
            for i in range(MAX_INDEX_FETCHES + 1)
        ]
        put_index(client, repository, "wide", many)
        with pytest.raises(RegistryError, match=f"more than {MAX_INDEX_FETCHES} manifests"):
            resolve_image(client, f"{fresh_registry.host}/{repository}:wide", "linux/amd64")


def test_a_foreign_layer_the_registry_lacks_names_its_urls(registry, pushed_images, fault_proxy):
    """A manifest (served by a proxy) with a non-distributable layer with urls, which
    the registry does not hold: its URLs are kept with the layer, and both the size
    query and a read, answered 404, say the layer is foreign and name its URLs."""
    url = "https://foreign.example/layers/base.tar.gz"
    with registry.client() as client:
        manifest = json.loads(client.get_manifest("fixtures/small", "v1").raw)
    missing = b"never uploaded"
    manifest["layers"].append(
        {
            "mediaType": "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
            "digest": digest_of(missing),
            "size": len(missing),
            "urls": [url],
        }
    )
    proxy = fault_proxy(registry)
    proxy.fault = Fault.document(manifest, OCI_MANIFEST, path_contains="/manifests/")
    with RegistryClient(proxy.host, RegistryOptions(insecure=True, timeout=5.0)) as client:
        image = resolve_image(client, f"{proxy.host}/fixtures/small:v1", None)
        foreign = image.layers[1]
        assert foreign.urls == (url,)
        with pytest.raises(NotFound) as sized:
            client.blob_size("fixtures/small", foreign.digest, foreign.size)
        with pytest.raises(BlobReadError) as read:
            RegistryBlob(client, "fixtures/small", foreign).read_range(0, 4)
    for message in (str(sized.value), str(read.value)):
        assert "not found" in message and "it is a foreign layer" in message and url in message
    assert ResolvedImage.from_record(image.to_record()).layers[1].urls == (url,)
