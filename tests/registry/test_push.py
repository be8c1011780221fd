"""push_image against the real registry: indexes built up platform by platform, reproducibly."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import requests
from rig.fault_proxy import Fault

from blockstore.errors import RegistryError, RegistryUnreachable, UsageError
from blockstore.registry import RegistryClient, push_image, resolve_image
from blockstore.registry.descriptors import MAX_LAYERS
from blockstore.registry.digests import canonical_json, digest_of
from blockstore.registry.mediatypes import OCI_CONFIG, OCI_INDEX, OCI_MANIFEST
from blockstore.registry.push import diff_id


def test_plain_image_becomes_an_index_when_a_platform_is_added(fresh_registry, erofs_images):
    """A tag holding one amd64 manifest, then an arm64 push with add_to_index: the tag
    becomes an index of both, each resolving to its own layer."""
    small, base = erofs_images.small, erofs_images.layers[0]
    with fresh_registry.client() as client:
        amd = push_image(client, "push/grow", "v1", [small.path], platform="linux/amd64")
        arm = push_image(
            client, "push/grow", "v1", [base.path], platform="linux/arm64/v8", add_to_index=True
        )
        ref = f"{fresh_registry.host}/push/grow:v1"
        as_amd = resolve_image(client, ref, "linux/amd64")
        as_arm = resolve_image(client, ref, "linux/arm64/v8")
    assert as_amd.platforms == ["linux/amd64", "linux/arm64/v8"]
    assert (as_amd.manifest_digest, as_amd.layers[0].digest) == (amd, small.digest)
    assert (as_arm.manifest_digest, as_arm.layers[0].digest) == (arm, base.digest)


def test_pushing_a_platform_again_replaces_its_entry(fresh_registry, erofs_images):
    """Re-pushing linux/amd64 into an index replaces that entry, the others stay."""
    small, base, changes = (erofs_images.small, *erofs_images.layers[:2])
    ref = f"{fresh_registry.host}/push/replace:v1"
    with fresh_registry.client() as client:
        for path, platform in [
            (small.path, "linux/amd64"),
            (base.path, "linux/arm64/v8"),
            (changes.path, "linux/amd64"),
        ]:
            push_image(client, "push/replace", "v1", [path], platform=platform, add_to_index=True)
        image = resolve_image(client, ref, "linux/amd64")
    assert image.platforms == ["linux/arm64/v8", "linux/amd64"]
    assert image.layers[0].digest == changes.digest


def test_an_exact_platform_is_chosen_before_a_compatible_one(fresh_registry, erofs_images):
    """An index listing linux/amd64/v3 before linux/amd64: asked for linux/amd64 (a plain
    amd64 host), the plain entry is taken; asked for linux/amd64/v3, the v3 entry."""
    small, base = erofs_images.small, erofs_images.layers[0]
    ref = f"{fresh_registry.host}/push/variants:v1"
    with fresh_registry.client() as client:
        for path, platform in [(small.path, "linux/amd64/v3"), (base.path, "linux/amd64")]:
            push_image(client, "push/variants", "v1", [path], platform=platform, add_to_index=True)
        plain = resolve_image(client, ref, "linux/amd64")
        v3 = resolve_image(client, ref, "linux/amd64/v3")
    assert plain.platforms == ["linux/amd64/v3", "linux/amd64"]
    assert (plain.platform, plain.layers[0].digest) == ("linux/amd64", base.digest)
    assert (v3.platform, v3.layers[0].digest) == ("linux/amd64/v3", small.digest)


def test_same_files_give_the_same_digests(fresh_registry, erofs_images):
    """Config and manifest are serialised deterministically: pushing twice, or to another
    repository, gives the same manifest digest."""
    paths = [layer.path for layer in erofs_images.layers]
    with fresh_registry.client() as client:
        first = push_image(client, "push/a", "v1", paths)
        again = push_image(client, "push/a", "v2", paths)
        elsewhere = push_image(client, "push/b", "v1", paths)
    assert first == again == elsewhere


def test_a_non_erofs_layer_is_refused_before_any_upload(fresh_registry, erofs_images, tmp_path):
    """push_image of an EROFS image and a file of random bytes, both as the EROFS media
    type: UsageError naming the bad file, and not even the good layer is uploaded."""
    bad = tmp_path / "random.bin"
    bad.write_bytes(os.urandom(4096))
    small = erofs_images.small
    with fresh_registry.client() as client:
        with pytest.raises(UsageError, match=f"{bad}: it is not an EROFS image"):
            push_image(client, "push/refused", "v1", [small.path, bad])
        assert not client.blob_exists("push/refused", small.digest)
        with pytest.raises(UsageError, match=f"cannot push {tmp_path}: "):
            push_image(client, "push/refused", "v1", [tmp_path])


def test_an_image_of_more_layers_than_are_served_is_refused_before_any_upload(
    fresh_registry, tmp_path
):
    """``blockstore push`` of 129 one-file tar layers, one more than an image may have to
    be served: exit 2, one line saying the count and the limit, and no layer uploaded.
    Before, all were uploaded and the image made, which ``mount`` and ``inspect`` then
    refused as having too many layers."""
    layers = []
    for i in range(MAX_LAYERS + 1):
        tar = tmp_path / f"layer{i}.tar"
        with tarfile.open(tar, "w") as archive:
            info = tarfile.TarInfo(f"file{i}")
            info.size = 1
            archive.addfile(info, io.BytesIO(b"x"))
        layers.append(str(tar))
    ref = f"{fresh_registry.host}/push/too-many:v1"
    done = subprocess.run(
        [sys.executable, "-m", "blockstore", "push", *layers, ref, "--insecure"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert f"an image of {MAX_LAYERS + 1} layers: at most {MAX_LAYERS} are served" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    with fresh_registry.client() as client:
        digest = "sha256:" + hashlib.sha256(Path(layers[0]).read_bytes()).hexdigest()
        assert not client.blob_exists("push/too-many", digest)


def test_adding_to_an_index_whose_platform_is_malformed_is_refused(
    fresh_registry, erofs_images, fault_proxy
):
    """A registry (here a proxy) serving under the tag an index whose entry says
    ``"variant": 8``: adding a platform to it is refused as a registry error naming the
    tag, never a traceback."""
    small = erofs_images.small
    platform = {"os": "linux", "architecture": "arm64", "variant": 8}
    entry = {"mediaType": OCI_MANIFEST, "digest": small.digest, "size": 500, "platform": platform}
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [entry]}
    proxy = fault_proxy(fresh_registry)
    proxy.fault = Fault.document(index, OCI_INDEX, method="GET", path_contains="/manifests/v1")
    refused = "push/odd:v1: the index under the tag is refused"
    with (
        RegistryClient(proxy.host, fresh_registry.options()) as client,
        pytest.raises(RegistryError, match=refused),
    ):
        push_image(
            client, "push/odd", "v1", [small.path], platform="linux/amd64", add_to_index=True
        )


def test_a_push_checks_blobs_past_storage_that_refuses_a_head(
    fresh_registry, erofs_images, fault_proxy
):
    """Tried: ``push`` to a registry that redirects blob HEADs to storage answering them
    403 (``SignatureDoesNotMatch``, as S3 answers a HEAD of a URL signed for GET). Must
    hold: exit 0, each blob uploaded, and the image reads back from the registry. Before,
    the check whether a blob is there already failed the push: "access denied", exit 4."""
    storage = fault_proxy(fresh_registry, listen="127.0.0.2")
    storage.fault = Fault(
        "status",
        status=403,
        method="HEAD",
        path_contains="/blobs/",
        body=b"<Error><Code>SignatureDoesNotMatch</Code></Error>",
    )
    front = fault_proxy(fresh_registry)
    front.fault = Fault("redirect", path_contains="/blobs/sha256:", redirect_to=storage.url)
    small = erofs_images.small
    argv = ["push", "--insecure", str(small.path), f"{front.host}/push/signed:v1"]
    done = subprocess.run(
        [sys.executable, "-m", "blockstore", *argv], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert [r for r in storage.requests if r.method == "HEAD"], "no HEAD was refused"
    with fresh_registry.client() as client:
        image = resolve_image(client, f"{fresh_registry.host}/push/signed:v1", None)
    assert image.layers[0].digest == small.digest


def test_a_refusal_from_an_upload_url_on_another_host_is_the_registrys_own(
    fresh_registry, erofs_images, fault_proxy
):
    """Tried: ``push`` to a registry that names its upload URLs on another host (its
    ``http.host``, or the Host a proxy in front sends), which refuses the upload's PUT
    with 403 ``DENIED: quota exceeded``, as a registry over its quota does. Must hold:
    the blob is sent once, and the push fails (exit 4) in one line saying the registry's
    own words, not that a storage URL it redirected to expired. Before, the refusal was
    taken for storage's: the blob was uploaded five times over, its reason never said."""
    uploads = fault_proxy(fresh_registry, listen="127.0.0.2")
    front = fault_proxy(fresh_registry, upstream_headers={"Host": uploads.host})
    uploads.fault = Fault(
        "status",
        status=403,
        method="PUT",
        body=b'{"errors": [{"code": "DENIED", "message": "quota exceeded"}]}',
        headers={"Content-Type": "application/json"},
    )
    argv = ["push", "--insecure", str(erofs_images.small.path), f"{front.host}/push/quota:v1"]
    done = subprocess.run(
        [sys.executable, "-m", "blockstore", *argv], capture_output=True, text=True
    )
    assert done.returncode == 4, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert "quota exceeded" in line and "redirected" not in line, line
    assert len([r for r in uploads.requests if r.method == "PUT"]) == 1


@pytest.mark.parametrize(
    ("content_type", "body"),
    [("text/html", b"<html><body>Sign in</body></html>"), ("application/json", b"[1, 2]")],
    ids=["login-page", "json-list"],
)
def test_adding_to_a_tag_whose_manifest_is_no_json_object_is_refused_in_one_line(
    fresh_registry, erofs_images, fault_proxy, content_type, body
):
    """Tried: ``push --add-to-index`` where the registry (here a proxy) answers the tag's
    manifest with 200 and a page that is not a manifest: a login page in HTML, or JSON
    that is no object. Must hold: exit 3, one line naming the tag and that what came is
    not a JSON object; nothing stored under the tag. Before, a traceback (exit 1): a
    JSONDecodeError, or an AttributeError of the list."""
    proxy = fault_proxy(fresh_registry)
    proxy.fault = Fault(
        "status",
        status=200,
        body=body,
        headers={"Content-Type": content_type},
        method="GET",
        path_contains="/manifests/v1",
    )
    argv = ["push", "--insecure", "--add-to-index", str(erofs_images.small.path)]
    done = subprocess.run(
        [sys.executable, "-m", "blockstore", *argv, f"{proxy.host}/push/paged:v1"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 3, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert "push/paged:v1" in line and "not a JSON object" in line, line
    assert not [r for r in proxy.requests if r.method == "PUT" and "/manifests/v1" in r.path]


@pytest.mark.parametrize(
    ("media_type", "uncompressed"),
    [
        ("application/vnd.oci.image.layer.v1.tar+gzip", True),
        ("application/vnd.docker.image.rootfs.diff.tar.gzip", True),
        ("application/vnd.oci.image.layer.nondistributable.v1.tar+gzip", True),
        ("application/vnd.oci.image.layer.v1.tar", False),
        ("application/vnd.example.table+gzip", False),
    ],
)
def test_diff_id_is_the_uncompressed_digest_of_compressed_tar_layers_only(
    tmp_path, media_type, uncompressed
):
    """A layer the tar layers read as a compressed tar (OCI, Docker, non-distributable)
    gets the digest of its tar as diff_id, the digest the mount checks; any other type,
    even one ending in +gzip, keeps its blob's digest."""
    tar = b"tar bytes " * 100
    layer = tmp_path / "layer"
    layer.write_bytes(gzip.compress(tar))
    blob = "sha256:" + hashlib.sha256(layer.read_bytes()).hexdigest()
    expected = "sha256:" + hashlib.sha256(tar).hexdigest() if uncompressed else blob
    assert diff_id(layer, media_type, blob) == expected


def test_an_upload_cut_short_is_made_again_as_a_new_one(fresh_registry, erofs_images, fault_proxy):
    """The link breaks while a layer's PUT is under way: the registry has part of the
    blob in that upload, the client no reply. The upload is made again as a new one
    (POST, then PUT), and the image pushed whole. Before, the PUT was sent again to
    the same upload, which the CNCF registry refuses once part of a body
    came (404 BLOB_UPLOAD_INVALID), and the push failed."""
    small = erofs_images.small
    proxy = fault_proxy(fresh_registry)
    proxy.fault = Fault("cut_request", method="PUT", path_contains="/blobs/uploads/", times=1)
    with RegistryClient(proxy.host, fresh_registry.options()) as client:
        push_image(client, "push/cut", "v1", [small.path])
        ref = f"{fresh_registry.host}/push/cut:v1"
    with fresh_registry.client() as client:
        (layer,) = resolve_image(client, ref, None).layers
        blob = client.get_blob("push/cut", layer.digest, limit=small.size)
    assert (layer.digest, blob) == (small.digest, small.path.read_bytes())
    uploads = [r.method for r in proxy.requests if "/blobs/uploads/" in r.path]
    assert [m for m in uploads if m != "DELETE"][:4] == ["POST", "PUT", "POST", "PUT"]


def unfinished_uploads(registry, repository: str) -> list[str]:
    """The uploads whose bytes the registry keeps for ``repository``, unfinished or
    abandoned (each one's ``data`` in its storage's ``_uploads``: it purges them only
    after days). A cancelled upload's ``data`` is gone; a few bytes of its hash
    state stay."""
    uploads = registry.data_dir / "docker/registry/v2/repositories" / repository / "_uploads"
    return sorted(p.parent.name for p in uploads.glob("*/data"))


def test_an_upload_the_registry_refuses_is_cancelled(fresh_registry, erofs_images, fault_proxy):
    """The registry refuses a blob's PUT for good (a 400 the push cannot retry). The push
    fails with the registry's error, and the upload it had started is cancelled
    (DELETE of its URL), so no part of it stays in the registry's storage.
    Before, every failed upload stayed there until the registry's purge."""
    small = erofs_images.small
    proxy = fault_proxy(fresh_registry)
    proxy.fault = Fault("status", method="PUT", path_contains="/blobs/uploads/", status=400)
    with (
        RegistryClient(proxy.host, fresh_registry.options()) as client,
        pytest.raises(RegistryError, match="HTTP 400"),
    ):
        client.upload_blob("push/refused", small.digest, small.path)
    assert [r.method for r in proxy.requests if "/blobs/uploads/" in r.path] == [
        "POST",
        "PUT",
        "DELETE",
    ]
    assert unfinished_uploads(fresh_registry, "push/refused") == []


def test_an_upload_the_link_keeps_cutting_names_the_blob(fresh_registry, erofs_images, fault_proxy):
    """Tried: every PUT of a layer cut by the link part way, so each try of the upload
    fails the same. Must hold: the push fails as the registry out of reach (exit 5), its
    message naming the blob it was uploading and where, then the link's own words.
    Before, it said only "connection closed by the server", which names no blob of a
    push of many layers."""
    small = erofs_images.small
    proxy = fault_proxy(fresh_registry)
    proxy.fault = Fault("cut_request", method="PUT", path_contains="/blobs/uploads/")
    options = fresh_registry.options(max_attempts=2)
    with (
        RegistryClient(proxy.host, options) as client,
        pytest.raises(RegistryUnreachable) as caught,
    ):
        client.upload_blob("push/cut-always", small.digest, small.path)
    message = str(caught.value)
    assert message.startswith(f"uploading blob {small.digest} to {proxy.host}/push/cut-always: ")
    assert caught.value.exit_code == 5 and message.count(small.digest) == 1, message


def test_an_upload_a_proxy_finds_too_large_says_so_once(registry, erofs_images, fault_proxy):
    """Tried: ``push`` through a proxy that refuses the layer's PUT with 413 and an HTML
    page (nginx's ``client_max_body_size``, 1 MiB by default, before a registry). Must
    hold: exit 3, one line naming the blob, the status once, and that the blob is larger
    than the registry or a proxy before it takes in one request. Before, it said "HTTP
    413 (HTTP 413)" and nothing more."""
    small = erofs_images.small
    proxy = fault_proxy(registry)
    page = b"<html><center><h1>413 Request Entity Too Large</h1></center></html>"
    proxy.fault = Fault(
        "status",
        method="PUT",
        path_contains="/blobs/uploads/",
        status=413,
        body=page,
        headers={"Content-Type": "text/html"},
    )
    command = [sys.executable, "-m", "blockstore", "push", str(small.path)]
    pushed = subprocess.run(
        [*command, f"{proxy.host}/push/capped:v1", "--insecure"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert pushed.returncode == 3, pushed.stderr
    assert pushed.stderr == (
        f"blockstore: uploading blob {small.digest} to {proxy.host}/push/capped: HTTP 413: "
        "larger than the registry, or a proxy before it, takes in one request\n"
    )
    uploads = [r.method for r in proxy.requests if "/blobs/uploads/" in r.path]
    assert uploads == ["POST", "PUT", "DELETE"]


def test_an_empty_blob_is_uploaded_with_its_content_length(registry, fault_proxy, tmp_path):
    """Tried: ``push --media-type`` of an empty file (a layer of no bytes). Must hold: the
    blob's PUT says ``Content-Length: 0``, as the distribution spec's monolithic upload
    requires, and the image resolves with its empty layer. Before, the empty file went
    as a chunked body with no Content-Length, which a registry or a proxy before it
    may refuse (411)."""
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    proxy = fault_proxy(registry)
    command = [
        sys.executable,
        "-m",
        "blockstore",
        "push",
        str(empty),
        f"{proxy.host}/push/empty:v1",
    ]
    command += ["--insecure", "--media-type", "application/octet-stream"]
    pushed = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert pushed.returncode == 0, pushed.stderr
    puts = [r for r in proxy.requests if r.method == "PUT" and "/blobs/uploads/" in r.path]
    assert puts[0].headers.get("Content-Length") == "0", puts[0].headers
    with RegistryClient(registry.host, registry.options()) as client:
        image = resolve_image(client, f"{registry.host}/push/empty:v1", None)
    assert [layer.size for layer in image.layers] == [0]


@pytest.mark.parametrize("status", [200, 202, 204])
def test_a_write_said_done_with_another_success_status_is_done(
    fresh_registry, erofs_images, fault_proxy, status
):
    """A registry that answers a stored manifest or blob with another success than
    201 (Quay says 202 Accepted for a manifest, as the first registries did; docker
    and containerd take any 2xx): the push succeeds, and the image resolves. Before,
    the push failed on the first such answer ("HTTP 202"), the blob stored all the same."""
    small = erofs_images.small
    proxy = fault_proxy(fresh_registry)
    proxy.fault = Fault("rewrite_status", method="PUT", status=status)
    with RegistryClient(proxy.host, fresh_registry.options()) as client:
        pushed = push_image(client, "push/accepted", "v1", [small.path])
    with fresh_registry.client() as client:
        image = resolve_image(client, f"{fresh_registry.host}/push/accepted:v1", None)
    assert (image.manifest_digest, image.layers[0].digest) == (pushed, small.digest)
    assert proxy.faults_applied == 3  # the layer, the config, the manifest


def test_an_upload_location_relative_to_the_uploads_path_is_resolved(
    fresh_registry, erofs_images, fault_proxy
):
    """A registry answering the upload POST with a ``Location`` relative to the request's
    path (``<uuid>?_state=...``: a URI reference the distribution spec leaves to RFC
    3986): the PUT goes to ``/v2/<name>/blobs/uploads/<uuid>``, and the blob is
    stored. Before, the Location was appended to the registry's address as it came
    (``http://host:port<uuid>...``), no URL at all: the push died with a ValueError."""
    small = erofs_images.small
    uploads = "/v2/push/relative/blobs/uploads/"
    started = requests.post(fresh_registry.url + uploads, timeout=10)  # handed out below
    upload = started.headers["Location"].partition(uploads)[2]
    proxy = fault_proxy(fresh_registry)
    proxy.fault = Fault("status", method="POST", status=202, headers={"Location": upload}, times=1)
    with RegistryClient(proxy.host, fresh_registry.options()) as client:
        client.upload_blob("push/relative", small.digest, small.path)
        assert client.blob_exists("push/relative", small.digest)
    assert [r.path.partition("?")[0] for r in proxy.requests if r.method == "PUT"] == [
        uploads + upload.partition("?")[0]
    ]


def push_attestation(client: RegistryClient, repository: str, subject: str) -> dict:
    """An attestation manifest of ``subject`` as buildx pushes one, and its index entry
    (platform unknown/unknown, annotations naming the manifest it describes)."""
    statement = canonical_json(
        {"_type": "https://in-toto.io/Statement/v0.1", "subject": [{"digest": subject}]}
    )
    config = canonical_json(
        {
            "architecture": "unknown",
            "os": "unknown",
            "rootfs": {"type": "layers", "diff_ids": [digest_of(statement)]},
        }
    )
    for data in (statement, config):
        client.upload_blob(repository, digest_of(data), data)
    manifest = canonical_json(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": digest_of(config), "size": len(config)},
            "layers": [
                {
                    "mediaType": "application/vnd.in-toto+json",
                    "digest": digest_of(statement),
                    "size": len(statement),
                }
            ],
        }
    )
    client.put_manifest(repository, digest_of(manifest), manifest, OCI_MANIFEST)
    return {
        "mediaType": OCI_MANIFEST,
        "digest": digest_of(manifest),
        "size": len(manifest),
        "platform": {"architecture": "unknown", "os": "unknown"},
        "annotations": {
            "vnd.docker.reference.digest": subject,
            "vnd.docker.reference.type": "attestation-manifest",
        },
    }


def test_replacing_a_platform_drops_the_attestation_of_the_manifest_replaced(
    fresh_registry, erofs_images
):
    """An index as buildx pushes it (each platform's manifest beside an attestation
    naming it): replacing linux/amd64 drops the amd64 attestation, which describes a
    manifest the index no longer lists; the arm64 one stays with its manifest. Pushing
    the same amd64 image again keeps its attestation. Before, the amd64 attestation
    stayed, naming a manifest gone from the index."""
    small, base, changes = (erofs_images.small, *erofs_images.layers[:2])
    repository = "push/attested"
    with fresh_registry.client() as client:
        entries = []
        for path, platform in ((small.path, "linux/amd64"), (base.path, "linux/arm64")):
            digest = push_image(client, repository, "one", [path], platform=platform)
            raw = client.get_manifest(repository, digest).raw
            os_name, architecture = platform.split("/")
            fields = {"os": os_name, "architecture": architecture}
            entries.append({"mediaType": OCI_MANIFEST, "digest": digest, "size": len(raw)})
            entries[-1]["platform"] = fields
            entries.append(push_attestation(client, repository, digest))
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}
        client.put_manifest(repository, "v1", canonical_json(index), OCI_INDEX)
        amd, amd_attestation, arm, arm_attestation = (e["digest"] for e in entries)

        def listed() -> set[str]:
            return {
                e["digest"]
                for e in json.loads(client.get_manifest(repository, "v1").raw)["manifests"]
            }

        add = {"platform": "linux/amd64", "add_to_index": True}
        push_image(client, repository, "v1", [small.path], **add)
        assert listed() == {amd, amd_attestation, arm, arm_attestation}
        new = push_image(client, repository, "v1", [changes.path], **add)
        assert listed() == {new, arm, arm_attestation}


def test_add_to_index_leaves_an_entry_nested_too_deeply_as_it_is(fresh_registry, erofs_images):
    """Tried: a tag holding an index that lists, without a ``platform``, a manifest
    holding beside its fields an array nested 5,000 deep (the registry stores it), then
    a linux/amd64 push with add_to_index. Must hold: the push succeeds; that entry is
    left as it is, as one that is not JSON is, and the new image is listed after it.
    Before, the push died with a RecursionError traceback."""
    repository = "push/deep-entry"
    with fresh_registry.client() as client:
        old = push_image(client, repository, "old", [erofs_images.small.path])
        document = json.loads(client.get_manifest(repository, old).raw)
        raw = canonical_json(document)[:-1] + b',"x":' + b"[" * 5000 + b"]" * 5000 + b"}"
        client.put_manifest(repository, "deep", raw, OCI_MANIFEST)
        entry = {"mediaType": OCI_MANIFEST, "digest": digest_of(raw), "size": len(raw)}
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [entry]}
        client.put_manifest(repository, "v1", canonical_json(index), OCI_INDEX)
        new = push_image(
            client,
            repository,
            "v1",
            [erofs_images.large.path],
            platform="linux/amd64",
            add_to_index=True,
        )
        listed = json.loads(client.get_manifest(repository, "v1").raw)["manifests"]
    assert [e["digest"] for e in listed] == [digest_of(raw), new]


def test_add_to_index_replaces_an_entry_whose_config_names_the_platform(
    fresh_registry, erofs_images
):
    """A tag holding an index whose linux/amd64 image is listed without a ``platform``
    (skopeo copies such an index as it is; its config names the platform), then a
    linux/amd64 push with add_to_index: the old entry is replaced, as one naming its
    platform is, and only the new image is left for linux/amd64. Before, the old one
    stayed beside it, listed first: a client that keeps an index's order among equals
    (containerd) went on pulling the old image."""
    small, large = erofs_images.small, erofs_images.large
    repository = "push/unnamed"
    with fresh_registry.client() as client:
        old = push_image(client, repository, "old", [small.path], platform="linux/amd64")
        raw = client.get_manifest(repository, old).raw
        entry = {"mediaType": OCI_MANIFEST, "digest": old, "size": len(raw)}
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [entry]}
        client.put_manifest(repository, "v1", canonical_json(index), OCI_INDEX)
        new = push_image(
            client, repository, "v1", [large.path], platform="linux/amd64", add_to_index=True
        )
        listed = json.loads(client.get_manifest(repository, "v1").raw)["manifests"]
    assert [e["digest"] for e in listed] == [new]
