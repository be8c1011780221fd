"""Images as builders and copiers other than ours write them: BuildKit, skopeo.

Each image is pushed to the real registry in the shape that tool gives it,
then resolved and opened as a user's ``mount`` would.
"""

from __future__ import annotations

import gzip
import io
import json
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from blockstore.errors import IntegrityError, NotFound, RegistryError
from blockstore.image import open_image
from blockstore.registry import (
    EROFS_MEDIA_TYPE,
    RegistryClient,
    RegistryOptions,
    push_image,
    resolve_image,
)
from blockstore.registry.digests import canonical_json, digest_of
from blockstore.registry.mediatypes import (
    DOCKER_CONFIG,
    DOCKER_MANIFEST,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_MANIFEST,
    OCI_TAR_GZIP,
)
from blockstore.registry.referrers import EMPTY_CONFIG_TYPE
from blockstore.tarlayer.erofs_reader import read_metadata

DOCKER_ZSTD_LAYER = "application/vnd.docker.image.rootfs.diff.tar.zstd"
"""BuildKit's zstd layer type under Docker media types (``oci-mediatypes=false``)."""


def one_file_tar(name: str, content: bytes) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(name)
        info.size, info.mode = len(content), 0o644
        tar.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def push_docker_image(
    client: RegistryClient, repository: str, tag: str, blob: bytes, layer_type: str, tar: bytes
) -> None:
    """A one-layer image with Docker's manifest and config types, as BuildKit pushes it."""
    config = canonical_json(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": [digest_of(tar)]},
        }
    )
    for data in (blob, config):
        client.upload_blob(repository, digest_of(data), data)
    manifest = {
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST,
        "config": {"mediaType": DOCKER_CONFIG, "digest": digest_of(config), "size": len(config)},
        "layers": [{"mediaType": layer_type, "digest": digest_of(blob), "size": len(blob)}],
    }
    client.put_manifest(repository, tag, canonical_json(manifest), DOCKER_MANIFEST)


def test_a_zstd_layer_under_dockers_media_types_is_a_tar_layer(registry, tmp_path: Path):
    """BuildKit with ``compression=zstd`` and Docker media types labels its layers
    ``application/vnd.docker.image.rootfs.diff.tar.zstd`` (containerd and
    containers/image know the type): opened, the layer is the zstd tar it is, its
    files listed and its tar served. Before, it was served as its raw bytes, with a
    warning, and the mount failed (EINVAL from the kernel)."""
    tar = one_file_tar("hello.txt", b"hello from a docker zstd layer\n")
    blob = subprocess.run(["zstd", "-q", "-c"], input=tar, capture_output=True, check=True).stdout
    with registry.client() as client:
        push_docker_image(client, "builders/docker-zstd", "v1", blob, DOCKER_ZSTD_LAYER, tar)
    ref = f"{registry.host}/builders/docker-zstd:v1"
    image = open_image(ref, cache_dir=tmp_path / "cache", options=registry.options())
    try:
        (export,) = image.exports()
        data = b"".join(bytes(piece) for piece in export.read(0, export.size))
    finally:
        image.close()
    metadata = export.index.metadata
    assert set(read_metadata(data[: len(metadata)]).root.children) == {b"hello.txt"}
    assert data[export.index.tar_start :][: len(tar)] == tar


def layout_blob(layout: Path, data: bytes, media_type: str) -> dict:
    """``data`` kept in an OCI layout's ``blobs/sha256``; its descriptor."""
    digest = digest_of(data)
    path = layout / "blobs" / "sha256" / digest.partition(":")[2]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return {"mediaType": media_type, "digest": digest, "size": len(data)}


def index_layout_without_platforms(layout: Path, layer: bytes, tag: str) -> None:
    """An OCI layout whose tag names an index listing one linux/amd64 image manifest
    with no ``platform`` in its entry (the field is optional), as tools that wrap a
    single image in an index write it."""
    config = json.dumps(
        {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}
    ).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": layout_blob(layout, config, OCI_CONFIG),
        "layers": [layout_blob(layout, layer, EROFS_MEDIA_TYPE)],
    }
    entry = layout_blob(layout, json.dumps(manifest).encode(), OCI_MANIFEST)
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [entry]}
    named = layout_blob(layout, json.dumps(index).encode(), OCI_INDEX)
    named["annotations"] = {"org.opencontainers.image.ref.name": tag}
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [named]}))


def test_an_index_entry_without_a_platform_is_judged_by_its_config(
    registry, erofs_images, tmp_path: Path
):
    """An index whose one image entry names no platform, copied into the registry by
    skopeo (``--multi-arch all``), which keeps the index as it is: resolved for
    linux/amd64 by the platform its config names, as containerd resolves it; asked
    for arm64, refused naming linux/amd64. Before, such entries were passed over and
    the image refused as having no platform at all ("it has: none")."""
    small = erofs_images.small
    layout = tmp_path / "layout"
    index_layout_without_platforms(layout, small.path.read_bytes(), "v1")
    ref = f"{registry.host}/builders/no-platform:v1"
    copy = ["skopeo", "copy", "--quiet", "--multi-arch", "all", "--dest-tls-verify=false"]
    subprocess.run([*copy, f"oci:{layout}:v1", f"docker://{ref}"], check=True, capture_output=True)
    with registry.client() as client:
        index = json.loads(client.get_manifest("builders/no-platform", "v1").raw)
        assert "platform" not in index["manifests"][0]
        image = resolve_image(client, ref, "linux/amd64")
        assert (image.platform, image.layers[0].digest) == ("linux/amd64", small.digest)
        refused = r"no platform linux/arm64; it has: linux/amd64 \(name one with --platform\)$"
        with pytest.raises(NotFound, match=refused):
            resolve_image(client, ref, "linux/arm64")


def test_an_artifact_listed_in_an_index_is_not_taken_for_an_image(registry, erofs_images):
    """An index listing an artifact with no layers (its entry names an ``artifactType``,
    as the image spec has artifact entries do) before an image, neither with a
    platform: the artifact is passed over unread and the image is the one resolved;
    read, the artifact would have failed the whole image as a manifest with no
    layers."""
    small = erofs_images.small
    repository = "builders/with-artifact"
    with registry.client() as client:
        push_image(client, repository, "image", [small.path], platform="linux/amd64")
        raw = client.get_manifest(repository, "image").raw
        image = {"mediaType": OCI_MANIFEST, "digest": digest_of(raw), "size": len(raw)}
        artifact = push_sbom_artifact(client, repository)
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [artifact, image]}
        client.put_manifest(repository, "v1", canonical_json(index), OCI_INDEX)
        resolved = resolve_image(client, f"{registry.host}/{repository}:v1", "linux/amd64")
    assert (resolved.platform, resolved.layers[0].digest) == ("linux/amd64", small.digest)


def test_an_index_of_artifacts_alone_says_to_name_one_by_digest(registry):
    """Tried: an image named by a tag whose index lists artifacts alone, as the tag of
    the referrers tag schema (``REPO:sha256-HEX``, which ``index --push`` makes on a
    registry without the referrers API) does. Must hold: not found, saying the index
    lists no image of any platform and to name one of its manifests by digest; before,
    it said the image had no platform linux/amd64 and that it had "none"."""
    repository = "builders/artifacts-alone"
    with registry.client() as client:
        artifact = push_sbom_artifact(client, repository)
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [artifact]}
        client.put_manifest(repository, "artifacts", canonical_json(index), OCI_INDEX)
        with pytest.raises(NotFound) as refused:
            resolve_image(client, f"{registry.host}/{repository}:artifacts", "linux/amd64")
    assert str(refused.value) == (
        f"image {registry.host}/{repository}:artifacts lists no image of any platform (as "
        "an index of attached artifacts does): name one of its manifests by digest, "
        f"{registry.host}/{repository}@sha256:..."
    )


def push_sbom_artifact(client: RegistryClient, repository: str) -> dict:
    """An artifact (an SBOM's type, no layers) pushed by digest; its entry for an index."""
    client.upload_blob(repository, digest_of(b"{}"), b"{}")
    sbom = "application/vnd.example.sbom.v1+json"
    empty = {"mediaType": EMPTY_CONFIG_TYPE, "digest": digest_of(b"{}"), "size": 2}
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": sbom}
    raw = canonical_json({**manifest, "config": empty, "layers": []})
    client.put_manifest(repository, digest_of(raw), raw, OCI_MANIFEST)
    return {
        "mediaType": OCI_MANIFEST,
        "artifactType": sbom,
        "digest": digest_of(raw),
        "size": len(raw),
    }


def push_two_gzip_layers(
    registry, repository: str, diff_ids: Callable[[list[str]], list]
) -> tuple[str, bytes]:
    """A two-layer gzip image in ``repository`` whose config's ``rootfs.diff_ids`` is
    ``diff_ids`` of the two tars' digests (a config that lies about them): its reference
    and its config."""
    tars = [one_file_tar(f"f{i}.txt", f"layer {i}\n".encode()) for i in range(2)]
    blobs = [gzip.compress(tar, mtime=0) for tar in tars]
    rootfs = {"type": "layers", "diff_ids": diff_ids([digest_of(tar) for tar in tars])}
    config = canonical_json({"architecture": "amd64", "os": "linux", "rootfs": rootfs})
    with registry.client() as client:
        for data in (*blobs, config):
            client.upload_blob(repository, digest_of(data), data)
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": digest_of(config), "size": len(config)},
            "layers": [
                {"mediaType": OCI_TAR_GZIP, "digest": digest_of(blob), "size": len(blob)}
                for blob in blobs
            ],
        }
        client.put_manifest(repository, "v1", canonical_json(manifest), OCI_MANIFEST)
    return f"{registry.host}/{repository}:v1", config


def test_a_config_naming_another_count_of_layers_is_refused(registry, tmp_path: Path):
    """A two-layer gzip image whose config lists one diff_id (``rootfs.diff_ids`` names
    each layer's tar, in order, as containerd and docker check it): refused, saying
    both counts, when a layer is opened. Before, the second layer went unchecked and
    the image mounted."""
    ref, _ = push_two_gzip_layers(registry, "builders/short-config", lambda digests: digests[:1])
    image = open_image(ref, cache_dir=tmp_path / "cache", options=registry.options())
    try:
        with pytest.raises(IntegrityError, match="config lists 1 diff_ids for its 2 layers"):
            image.exports(layer=1)
    finally:
        image.close()


def test_a_config_whose_diff_ids_are_not_all_digests_is_refused(registry, tmp_path: Path):
    """A two-layer gzip image whose config lists ``[<the first tar's digest>, 5]``: the
    config lies about its layers, so opening either layer is refused with an error that
    names the config and the bad entry. Before, the 5 was dropped silently and the
    refusal spoke of a count (1 diff_id for 2 layers) the config does not have."""
    ref, config = push_two_gzip_layers(
        registry, "builders/non-digest-diff-id", lambda digests: [digests[0], 5]
    )
    image = open_image(ref, cache_dir=tmp_path / "cache", options=registry.options())
    expected = rf"config {digest_of(config)}: rootfs.diff_ids\[1\] is 5, not a digest"
    try:
        for layer in (0, 1):
            with pytest.raises(IntegrityError, match=expected):
                image.exports(layer=layer)
    finally:
        image.close()


def test_a_config_naming_no_diff_ids_for_its_layers_is_refused(registry, tmp_path: Path):
    """A one-layer gzip image whose config lists no diff_ids (``"diff_ids": []``): its
    count is another than the manifest's, so it is refused as one listing one too few
    is, when the layer is opened. A config with no ``rootfs`` at all says nothing of the
    layers, and is read without the check. Before, an empty list passed: the layer's
    tar went unchecked."""
    tar = one_file_tar("f.txt", b"layer\n")
    blob = gzip.compress(tar, mtime=0)
    repository = "builders/no-diff-ids"
    platform = {"architecture": "amd64", "os": "linux"}
    with registry.client() as client:
        client.upload_blob(repository, digest_of(blob), blob)
        for tag, config in (
            ("empty", canonical_json({**platform, "rootfs": {"type": "layers", "diff_ids": []}})),
            ("none", canonical_json(platform)),
        ):
            client.upload_blob(repository, digest_of(config), config)
            manifest = {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": {
                    "mediaType": OCI_CONFIG,
                    "digest": digest_of(config),
                    "size": len(config),
                },
                "layers": [
                    {"mediaType": OCI_TAR_GZIP, "digest": digest_of(blob), "size": len(blob)}
                ],
            }
            client.put_manifest(repository, tag, canonical_json(manifest), OCI_MANIFEST)
    options = registry.options()
    image = open_image(
        f"{registry.host}/{repository}:empty", cache_dir=tmp_path / "c", options=options
    )
    try:
        with pytest.raises(IntegrityError, match="config lists 0 diff_ids for its 1 layers"):
            image.exports()
    finally:
        image.close()
    image = open_image(
        f"{registry.host}/{repository}:none", cache_dir=tmp_path / "c", options=options
    )
    try:
        (export,) = image.exports()
        assert tar in b"".join(bytes(piece) for piece in export.read(0, export.size))
    finally:
        image.close()


def test_entries_without_a_platform_are_chosen_as_entries_with_one_are(registry, erofs_images):
    """An index listing two images without a platform, linux/amd64/v3 first and
    linux/amd64 second (each config names its own), asked for linux/amd64: the exact
    match is chosen, as for entries naming their platform (and as containerd sorts
    them), whatever the order; so is it beside an entry naming linux/amd64/v3. Before,
    the first one the platform accepted was taken: the v3 image, built for CPUs the
    host may not have."""
    small, large = erofs_images.small, erofs_images.large
    repository = "builders/unnamed-variants"
    with registry.client() as client:
        entries = {}
        for tag, path, platform in (
            ("v3", small.path, "linux/amd64/v3"),
            ("plain", large.path, "linux/amd64"),
        ):
            push_image(client, repository, tag, [path], platform=platform)
            raw = client.get_manifest(repository, tag).raw
            entries[tag] = {"mediaType": OCI_MANIFEST, "digest": digest_of(raw), "size": len(raw)}
        named_v3 = {**entries["v3"], "platform": {"os": "linux", "architecture": "amd64"}}
        named_v3["platform"]["variant"] = "v3"
        for tag, listed in (
            ("unnamed", [entries["v3"], entries["plain"]]),
            ("mixed", [named_v3, entries["plain"]]),
        ):
            index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": listed}
            client.put_manifest(repository, tag, canonical_json(index), OCI_INDEX)
            for platform, image in (("linux/amd64", large), ("linux/amd64/v3", small)):
                resolved = resolve_image(client, f"{registry.host}/{repository}:{tag}", platform)
                assert (resolved.platform, resolved.layers[0].digest) == (platform, image.digest)


def test_a_config_fetched_to_judge_an_entrys_platform_is_not_fetched_again(
    registry, fault_proxy, tmp_path: Path
):
    """An index whose gzip image's entry names no platform, opened and read through a
    proxy that records requests: its config, fetched to judge the platform, is fetched
    once, not again to check the layer's diff_id (a warm open, resolving the index
    again, judges it again: once). Before, a cold open fetched it twice."""
    tar = one_file_tar("hello.txt", b"hello from an unnamed entry\n")
    layer = tmp_path / "layer.tar.gz"
    layer.write_bytes(gzip.compress(tar, mtime=0))
    repository = "builders/unnamed-config"
    with registry.client() as client:
        push_image(client, repository, "image", [layer], media_type=OCI_TAR_GZIP)
        raw = client.get_manifest(repository, "image").raw
        config = json.loads(raw)["config"]["digest"]
        entry = {"mediaType": OCI_MANIFEST, "digest": digest_of(raw), "size": len(raw)}
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [entry]}
        client.put_manifest(repository, "v1", canonical_json(index), OCI_INDEX)
    proxy = fault_proxy(registry)
    options = RegistryOptions(insecure=True, timeout=10.0)
    fetched = []
    for _ in range(2):
        image = open_image(
            f"{proxy.host}/{repository}:v1", cache_dir=tmp_path / "c", options=options
        )
        try:
            (export,) = image.exports()
            data = b"".join(bytes(piece) for piece in export.read(0, export.size))
        finally:
            image.close()
        assert tar in data
        fetched.append([r.path for r in proxy.requests].count(f"/v2/{repository}/blobs/{config}"))
    assert fetched == [1, 2]  # once by each open, to judge the platform


def test_an_entry_judged_past_a_match_that_cannot_be_read_costs_not_the_match(
    registry, erofs_images
):
    """An index listing linux/amd64/v3 with its platform, then an image without one
    whose config names no platform at all, asked for linux/amd64: the v3 image is
    accepted, the entry after it is judged for an exact match and cannot be, and the
    v3 image is still the one resolved; listed alone, the unjudgeable entry is refused
    naming its config."""
    small = erofs_images.small
    repository = "builders/unjudgeable"
    with registry.client() as client:
        v3 = push_image(client, repository, "v3", [small.path], platform="linux/amd64/v3")
        raw = client.get_manifest(repository, v3).raw
        named = {"mediaType": OCI_MANIFEST, "digest": v3, "size": len(raw)}
        named["platform"] = {"os": "linux", "architecture": "amd64", "variant": "v3"}
        config = b"{}"
        client.upload_blob(repository, digest_of(config), config)
        manifest = json.loads(raw)
        manifest["config"] = {"mediaType": OCI_CONFIG, "digest": digest_of(config), "size": 2}
        odd = canonical_json(manifest)
        client.put_manifest(repository, digest_of(odd), odd, OCI_MANIFEST)
        unnamed = {"mediaType": OCI_MANIFEST, "digest": digest_of(odd), "size": len(odd)}
        for tag, listed in (("both", [named, unnamed]), ("alone", [unnamed])):
            index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": listed}
            client.put_manifest(repository, tag, canonical_json(index), OCI_INDEX)
        resolved = resolve_image(client, f"{registry.host}/{repository}:both", "linux/amd64")
        assert (resolved.manifest_digest, resolved.platform) == (v3, "linux/amd64/v3")
        with pytest.raises(RegistryError, match="names no os and architecture"):
            resolve_image(client, f"{registry.host}/{repository}:alone", "linux/amd64")


def push_one_gzip_layer(registry, repository: str, config: bytes) -> str:
    """A one-layer gzip image in ``repository`` with ``config`` as it is: its reference."""
    blob = gzip.compress(one_file_tar("f.txt", b"layer\n"), mtime=0)
    with registry.client() as client:
        for data in (blob, config):
            client.upload_blob(repository, digest_of(data), data)
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": digest_of(config), "size": len(config)},
            "layers": [{"mediaType": OCI_TAR_GZIP, "digest": digest_of(blob), "size": len(blob)}],
        }
        client.put_manifest(repository, "v1", canonical_json(manifest), OCI_MANIFEST)
    return f"{registry.host}/{repository}:v1"


def test_a_config_nested_too_deeply_is_refused_in_one_line(registry, tmp_path: Path):
    """Tried: a one-layer gzip image whose config (300 KB, its digest right) holds an
    array nested 100,000 deep beside its platform and diff_ids, then ``inspect
    --platform`` (which reads the config's platform) and ``prefetch`` (which reads its
    diff_ids). Must hold: each refused in one line naming the config (exit 3, and 6 as
    a config that lies), no traceback. Before, each died with a RecursionError
    traceback (exit 1)."""
    nested = b"[" * 100_000 + b"]" * 100_000
    config = b'{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]},'
    config += b'"x":' + nested + b"}"
    ref = push_one_gzip_layer(registry, "builders/deep-config", config)
    cli = [sys.executable, "-m", "blockstore"]
    for command, code in (
        (["inspect", ref, "--platform", "linux/amd64"], 3),
        (["prefetch", ref, "--cache-dir", str(tmp_path / "c")], 6),
    ):
        done = subprocess.run([*cli, *command, "--insecure"], capture_output=True, text=True)
        assert done.returncode == code, done.stderr
        (line,) = done.stderr.splitlines()
        assert f"config {digest_of(config)} is nested too deeply" in line, line


SERVE = (sys.executable, "-m", "blockstore", "serve")


def test_a_config_naming_each_compressed_blob_as_its_diff_id_says_the_pusher_erred(
    registry, tmp_path: Path
):
    """Tried: a two-layer gzip image whose config gives each compressed blob's own digest
    as its diff_id (a mistake of pushers that hash what they upload), served. Must hold:
    `serve` exits 6 in one line that names the layer, says the config gives the
    compressed blob's digest where the uncompressed tar's belongs, and says to push the
    image again; nothing is served; the layer's blob, read whole to index it, stays
    cached. Before, the line gave the two digests and "not indexed" alone, and the
    indexing pass stored the tar under the diff_id it was given, the blob's own:
    over the blob's record, which went (its seal, racing, said it "changed while it was
    hashed")."""
    blobs = [
        digest_of(gzip.compress(one_file_tar(f"f{i}.txt", f"layer {i}\n".encode()), mtime=0))
        for i in range(2)
    ]
    ref, _ = push_two_gzip_layers(registry, "builders/blob-digest-diff-ids", lambda _: blobs)
    cache = str(tmp_path / "cache")
    served = subprocess.run(
        [*SERVE, ref, "--insecure", "--cache-dir", cache, "--listen", "127.0.0.1:0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert served.returncode == 6, served.stderr
    [line] = [line for line in served.stderr.splitlines() if "diff_id" in line]
    assert f"layer 0 ({blobs[0]}, gzip)" in line, line
    assert "gives the compressed blob's own digest where the uncompressed tar's belongs" in line
    assert "push it again" in line, line
    assert "not sealed" not in served.stderr, served.stderr
    listed = subprocess.run(
        [sys.executable, "-m", "blockstore", "cache", "ls", "--cache-dir", cache],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert blobs[0] in listed.stdout, listed.stdout
