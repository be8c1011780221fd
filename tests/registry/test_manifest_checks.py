"""Malformed manifests and indexes, served by a proxy in front of the real registry.

Each must be refused before anything is fetched or served, with one line
that says what is wrong and the exit code for a refused image (3), or for
bytes that do not match their descriptor (6); never a traceback.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from rig.fault_proxy import Fault
from rig.pushed import push_erofs

from blockstore.errors import IntegrityError, RegistryError
from blockstore.image import open_image
from blockstore.registry import RegistryClient, RegistryOptions, resolve_image
from blockstore.registry.descriptors import MAX_LAYERS, ManifestProblem, check_descriptor
from blockstore.registry.digests import digest_of
from blockstore.registry.mediatypes import OCI_INDEX, OCI_MANIFEST

BLOCKSTORE = [sys.executable, "-m", "blockstore"]
OPTIONS = RegistryOptions(insecure=True, timeout=5.0, max_attempts=2)
SHA = "sha256:" + "ab" * 32


def real_manifest(registry, repository: str = "fixtures/small") -> dict:
    with registry.client() as client:
        return json.loads(client.get_manifest(repository, "v1").raw)


def serving(fault_proxy, registry, manifest: dict | bytes):
    """A proxy that answers every manifest request with ``manifest`` (no digest header,
    as a registry may), and forwards the rest to the real registry."""
    proxy = fault_proxy(registry)
    raw = manifest if isinstance(manifest, bytes) else json.dumps(manifest).encode()
    proxy.fault = Fault(
        "status",
        status=200,
        headers={"Content-Type": OCI_MANIFEST},
        body=raw,
        path_contains="/manifests/",
    )
    return proxy


def refusal(fault_proxy, registry, manifest: dict | bytes) -> str:
    proxy = serving(fault_proxy, registry, manifest)
    with (
        RegistryClient(proxy.host, OPTIONS) as client,
        pytest.raises(RegistryError) as refused,
    ):
        resolve_image(client, f"{proxy.host}/fixtures/small:v1", None)
    assert type(refused.value) is RegistryError
    return str(refused.value)


def with_layers(manifest: dict, layers: list) -> dict:
    return {**manifest, "layers": layers}


def test_deeply_nested_json_is_refused_in_one_line(registry, pushed_images, fault_proxy):
    """A manifest of 100000 nested arrays: refused as nested too deeply, no RecursionError."""
    raw = b"[" * 100_000 + b"]" * 100_000
    assert "nested too deeply" in refusal(fault_proxy, registry, raw)


def test_a_manifest_without_layers_is_refused(registry, pushed_images, fault_proxy):
    """``"layers": []`` is refused when resolved, not an IndexError when a layer is picked."""
    manifest = with_layers(real_manifest(registry), [])
    assert refusal(fault_proxy, registry, manifest).endswith("is refused: it lists no layers")


@pytest.mark.parametrize("size", [-1, 1e300, 10**30, "4096", True, None])
def test_a_layer_size_that_is_not_a_size_is_refused(registry, pushed_images, fault_proxy, size):
    """-1, 1e300, a number past any disk, a string, a boolean, nothing: each refused,
    naming the layer, before the server could fail on it."""
    manifest = real_manifest(registry)
    manifest["layers"][0]["size"] = size
    assert "layer 0 has size" in refusal(fault_proxy, registry, manifest)


@pytest.mark.parametrize(
    ("digest", "why"),
    [
        ("sha512:" + "ab" * 64, "sha512 digest; this engine checks sha256 digests only"),
        ("md5:" + "ab" * 16, "md5 digest; this engine checks sha256 digests only"),
        ("sha256:" + "AB" * 32, "not 64 lowercase hex digits"),
        ("sha256", "no valid digest"),
    ],
)
def test_a_digest_this_engine_cannot_check_is_refused(
    registry, pushed_images, fault_proxy, digest, why
):
    """OCI's grammar allows sha512 and other algorithms; this engine checks sha256 only,
    and says so when the image is resolved, not as an I/O error in a mounted filesystem."""
    manifest = real_manifest(registry)
    manifest["layers"][0]["digest"] = digest
    assert why in refusal(fault_proxy, registry, manifest)


def test_more_layers_than_the_limit_are_refused_before_anything_starts(
    registry, pushed_images, fault_proxy
):
    """1000 layers: refused at once, stating the limit (no export, no NBD connection)."""
    manifest = real_manifest(registry)
    layer = {"mediaType": "application/vnd.erofs.layer.v1", "digest": SHA, "size": 4096}
    message = refusal(fault_proxy, registry, with_layers(manifest, [layer] * 1000))
    assert message.endswith(f"it has 1000 layers; at most {MAX_LAYERS} are served")


def test_an_index_entry_without_a_valid_descriptor_is_refused(registry, pushed_images, fault_proxy):
    """An index whose entry has a negative size is refused as a whole."""
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {
                "mediaType": OCI_MANIFEST,
                "digest": SHA,
                "size": -5,
                "platform": {"os": "linux", "architecture": "amd64"},
            }
        ],
    }
    assert "entry 0 has size -5" in refusal(fault_proxy, registry, index)


def test_a_manifest_larger_than_4_mib_is_refused(registry, pushed_images, fault_proxy):
    """The manifest's own size is capped (4 MiB, the distribution spec's figure)."""
    manifest = real_manifest(registry)
    manifest["annotations"] = {"padding": "x" * (5 << 20)}
    assert "larger than 4194304 bytes, refused" in refusal(fault_proxy, registry, manifest)


def test_a_layer_size_off_by_some_kib_is_refused_before_serving(
    registry, pushed_images, erofs_images, fault_proxy, tmp_path: Path
):
    """The manifest says 4 KiB more than the blob holds: opening the layer asks the
    registry for the blob's size and refuses it (integrity), before any read is served."""
    manifest = real_manifest(registry)
    manifest["layers"][0]["size"] += 4096
    proxy = serving(fault_proxy, registry, manifest)
    image = open_image(
        f"{proxy.host}/fixtures/small:v1", cache_dir=tmp_path / "cache", options=OPTIONS
    )
    try:
        with pytest.raises(IntegrityError, match=r"the manifest says .* the registry holds"):
            image.exports()
    finally:
        image.close()


@pytest.mark.parametrize(
    ("change", "code"),
    [("nested", RegistryError.exit_code), ("size", IntegrityError.exit_code)],
)
def test_the_commands_refuse_a_bad_manifest_with_one_line_and_its_code(
    registry, pushed_images, fault_proxy, tmp_path: Path, change, code
):
    """``prefetch`` of a too-deeply nested manifest exits 3, of a layer whose size is
    off exits 6: one line each, no traceback."""
    manifest = real_manifest(registry)
    if change == "nested":
        manifest = b"{" + b'"a":{' * 50_000 + b"}" * 50_001
    else:
        manifest["layers"][0]["size"] -= 4096
    proxy = serving(fault_proxy, registry, manifest)
    done = subprocess.run(
        [
            *BLOCKSTORE,
            "prefetch",
            f"{proxy.host}/fixtures/small:v1",
            "--insecure",
            "--cache-dir",
            str(tmp_path / "cache"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == code, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    "descriptor",
    [
        {"mediaType": "x", "digest": SHA, "size": 1},
        {"mediaType": "a/b", "digest": SHA, "size": 1.0},
        {"mediaType": "a/b", "digest": SHA, "size": (1 << 44) + 1},
        {"mediaType": "a/b", "digest": "sha256:" + "ab" * 31, "size": 1},
        {"digest": SHA, "size": 1},
        [SHA],
    ],
)
def test_descriptor_rules(descriptor):
    """Media type ``type/subtype``, a 64-hex sha256, an integer size within the bound."""
    with pytest.raises(ManifestProblem):
        check_descriptor(descriptor, "layer 0")


def test_a_valid_descriptor_is_taken():
    """The boundary sizes 0 and 16 TiB are sizes."""
    for size in (0, 1 << 44):
        assert check_descriptor({"mediaType": "a/b", "digest": SHA, "size": size}, "x").size == size


def index_of(platform: object) -> dict:
    entry = {"mediaType": OCI_MANIFEST, "digest": SHA, "size": 500, "platform": platform}
    return {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [entry]}


@pytest.mark.parametrize(
    ("platform", "why"),
    [
        ({"os": "linux", "architecture": "amd64", "variant": 3}, "platform variant 3 is not"),
        ({"os": "linux", "architecture": ["amd64"]}, "platform architecture ['amd64'] is not"),
        ({"os": {"name": "linux"}, "architecture": "amd64"}, "platform os {'name'"),
        ("linux/amd64", "has a platform that is not an object"),
    ],
)
def test_an_index_entry_whose_platform_fields_are_not_strings_is_refused(
    registry, pushed_images, fault_proxy, platform, why
):
    """An index entry whose variant, architecture or os is a number, a list or an object,
    or whose platform is no object: refused in one line naming the entry, as any other
    malformed index, never a TypeError."""
    message = refusal(fault_proxy, registry, index_of(platform))
    assert "is refused: entry 0" in message and why in message


def test_an_image_config_whose_variant_is_not_a_string_is_refused(registry, erofs_images):
    """A plain manifest whose config says ``"variant": 7``, resolved for a platform (which
    reads the config): refused as a registry error naming the config, never a TypeError."""
    repository = "checks/config-variant"
    push_erofs(registry.host, repository, "v1", [erofs_images.small.path])
    config = json.dumps({"os": "linux", "architecture": "amd64", "variant": 7}).encode()
    manifest = real_manifest(registry, repository)
    manifest["config"] = {**manifest["config"], "digest": digest_of(config), "size": len(config)}
    with registry.client() as client:
        client.upload_blob(repository, digest_of(config), config)
        client.put_manifest(repository, "v1", json.dumps(manifest).encode(), OCI_MANIFEST)
        with pytest.raises(RegistryError) as refused:
            resolve_image(
                client,
                f"{registry.host}/checks/config-variant:v1",
                "linux/amd64",
                require_platform=True,
            )
    assert type(refused.value) is RegistryError
    assert str(refused.value).endswith("is refused: platform variant 7 is not a string")


def test_an_index_entry_whose_size_is_not_its_manifests_is_refused(
    registry, pushed_images, fault_proxy
):
    """An index (served for the tag) whose entry names the real manifest's digest but a
    size one byte larger: refused as an integrity error, as the image spec has content
    of another size than its descriptor's not trusted, though its digest matches."""
    with registry.client() as client:
        reply = client.get_manifest("fixtures/small", "v1")
    entry = {
        "mediaType": OCI_MANIFEST,
        "digest": digest_of(reply.raw),
        "size": len(reply.raw) + 1,
        "platform": {"os": "linux", "architecture": "amd64"},
    }
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [entry]}
    proxy = fault_proxy(registry)
    proxy.fault = Fault.document(index, OCI_INDEX, path_contains="/manifests/v1")
    with (
        RegistryClient(proxy.host, OPTIONS) as client,
        pytest.raises(IntegrityError, match="its descriptor says"),
    ):
        resolve_image(client, f"{proxy.host}/fixtures/small:v1", "linux/amd64")


def test_a_config_whose_size_is_not_its_descriptors_is_refused(
    registry, pushed_images, fault_proxy
):
    """A manifest whose config descriptor is one byte off, resolved for a platform (which
    reads the config): refused as an integrity error naming the config."""
    manifest = real_manifest(registry)
    manifest["config"]["size"] -= 1
    proxy = serving(fault_proxy, registry, manifest)
    with (
        RegistryClient(proxy.host, OPTIONS) as client,
        pytest.raises(IntegrityError, match=r"config sha256:\w+ is \d+ bytes, its descriptor says"),
    ):
        resolve_image(
            client, f"{proxy.host}/fixtures/small:v1", "linux/amd64", require_platform=True
        )


def test_a_manifest_named_by_a_digest_no_check_is_had_for_is_refused_naming_it(
    registry, pushed_images, fault_proxy
):
    """A registry naming a tag's manifest by a sha384 digest in ``Docker-Content-Digest``
    (an algorithm of go-digest's the image spec does not register, and this engine
    cannot check): the image is refused (exit 6) in one line that names the image and
    the algorithm. Before, the line was "unsupported digest algorithm 'sha384'" alone."""
    proxy = fault_proxy(registry)
    said = "sha384:" + "ab" * 48
    proxy.fault = Fault(
        "rewrite_headers", headers={"Docker-Content-Digest": said}, path_contains="/manifests/"
    )
    ref = f"{proxy.host}/fixtures/small:v1"
    done = subprocess.run(
        [*BLOCKSTORE, "inspect", ref, "--insecure"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 6, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"blockstore: image {ref} from {proxy.host} is named by a 'sha384' digest, an "
        "algorithm no check is had for here (sha256, sha512): refused"
    ]


@pytest.mark.parametrize("spaced", ["{} ", "{}\t"], ids=["space", "tab"])
def test_a_manifest_digest_header_with_whitespace_after_it_names_the_manifest(
    registry, pushed_images, fault_proxy, spaced
):
    """Tried: ``inspect`` of a tag whose manifest comes with its true digest in
    ``Docker-Content-Digest`` followed by a space or a tab (a proxy's doing; the
    whitespace around a header's value is no part of it). Must hold: exit 0, the
    manifest digest shown without it. Before, the image was refused (exit 6) in a line
    saying the manifest hashes to its digest, "not" the same digest and a space."""
    with registry.client() as client:
        digest = digest_of(client.get_manifest("fixtures/small", "v1").raw)
    proxy = fault_proxy(registry)
    proxy.fault = Fault(
        "rewrite_headers", headers={"Docker-Content-Digest": spaced}, path_contains="/manifests/"
    )
    done = subprocess.run(
        [*BLOCKSTORE, "inspect", f"{proxy.host}/fixtures/small:v1", "--insecure", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["digest"] == digest
