"""``blockstore push`` and ``blockstore inspect`` as a user runs them, checked by skopeo."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from rig.fault_proxy import Fault
from rig.registry_server import RegistryServer

from blockstore.errors import UsageError
from blockstore.registry import EROFS_MEDIA_TYPE
from blockstore.registry.mediatypes import OCI_TAR_GZIP
from blockstore.registry.platforms import Platform


def blockstore(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "blockstore", *args], capture_output=True, text=True, timeout=60
    )


def test_push_then_skopeo_and_inspect_read_it(registry, erofs_images):
    """What push uploads, skopeo (an independent client) and inspect --json both read back."""
    if shutil.which("skopeo") is None:
        pytest.skip("skopeo is not installed")
    image = f"{registry.host}/cli/pushed:v1"
    pushed = blockstore("push", str(erofs_images.small.path), image, "--insecure")
    assert pushed.returncode == 0, pushed.stderr
    digest = pushed.stdout.strip()
    assert digest.startswith("sha256:")

    skopeo = subprocess.run(
        ["skopeo", "inspect", "--tls-verify=false", f"docker://{image}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert skopeo.returncode == 0, skopeo.stderr
    seen = json.loads(skopeo.stdout)
    assert seen["Digest"] == digest
    assert seen["Layers"] == [erofs_images.small.digest]
    assert (seen["Os"], seen["Architecture"]) == ("linux", "amd64")

    inspected = blockstore("inspect", image, "--insecure", "--json")
    assert inspected.returncode == 0, inspected.stderr
    record = json.loads(inspected.stdout)
    assert record["digest"] == digest and record["platforms"] == []
    assert record["layers"] == [
        {
            "index": 0,
            "digest": erofs_images.small.digest,
            "size": erofs_images.small.size,
            "mediaType": EROFS_MEDIA_TYPE,
        }
    ]


def test_push_add_to_index_and_human_inspect(registry, erofs_images):
    """Two pushes with --add-to-index under one tag make an index inspect lists."""
    image = f"{registry.host}/cli/multi:v1"
    for path, platform in [
        (erofs_images.small.path, "linux/amd64"),
        (erofs_images.layers[0].path, "linux/arm64/v8"),
    ]:
        pushed = blockstore(
            "push", str(path), image, "--insecure", "--add-to-index", "--platform", platform
        )
        assert pushed.returncode == 0, pushed.stderr
    shown = blockstore("inspect", image, "--insecure", "--platform", "linux/arm64")
    assert shown.returncode == 0, shown.stderr
    assert "platforms  linux/amd64, linux/arm64/v8" in shown.stdout
    assert "platform   linux/arm64/v8" in shown.stdout
    assert erofs_images.layers[0].digest in shown.stdout


def test_inspect_errors_exit_with_their_code(registry):
    """An invalid reference is a usage error (2); an unknown image is not found (3)."""
    bad = blockstore("inspect", "Bad/Name", "--insecure")
    assert bad.returncode == 2 and "lowercase" in bad.stderr
    missing = blockstore("inspect", f"{registry.host}/no/such:image", "--insecure")
    assert missing.returncode == 3
    assert f"image {registry.host}/no/such:image: not found" in missing.stderr
    assert "NAME_UNKNOWN" in missing.stderr or "MANIFEST_UNKNOWN" in missing.stderr


def test_a_tag_or_repository_mistyped_is_told_what_there_is(registry, erofs_images):
    """Tried: a mistyped tag, a missing tag (``latest`` taken), and a mistyped repository.
    Must hold: exit 3, one line naming the tags the repository has, not those that
    name artifacts (the referrers tag schema's ``sha256-...`` and ``sha512-...``,
    cosign's ``.sig`` beside them), or that the registry has no such repository.
    Before, each said only "not found (MANIFEST_UNKNOWN: manifest unknown)", whatever
    the mistake."""
    repository = f"{registry.host}/cli/tagged"
    artifacts = ("sha256-" + "a" * 64, "sha512-" + "b" * 64, "sha256-" + "c" * 64 + ".sig")
    for tag in ("v1.0", "v1.1", *artifacts):
        image = f"{repository}:{tag}"
        pushed = blockstore("push", str(erofs_images.small.path), image, "--insecure")
        assert pushed.returncode == 0, pushed.stderr
    for wrong, said in (
        (f"{repository}:v1.2", "; cli/tagged has tags: v1.0, v1.1\n"),
        (repository, "; cli/tagged has tags: v1.0, v1.1\n"),
        (f"{registry.host}/cli/taged:v1.0", "; the registry has no repository cli/taged\n"),
    ):
        shown = blockstore("inspect", wrong, "--insecure")
        assert shown.returncode == 3, shown.stderr
        assert shown.stderr.count("\n") == 1 and shown.stderr.endswith(said), shown.stderr


def test_tags_a_registry_lists_are_shown_only_when_they_are_tags(
    registry, erofs_images, fault_proxy
):
    """Tried: a registry whose tag list holds, beside a real tag, a string with a newline
    and one with a terminal's escape sequence, told a mistyped tag. Must hold: one line,
    exit 3, naming the real tag and nothing else. Before, the registry's text went to
    the terminal as it came: a second line, and escapes the terminal would obey."""
    pushed = blockstore(
        "push", str(erofs_images.small.path), f"{registry.host}/cli/listed:v1", "--insecure"
    )
    assert pushed.returncode == 0, pushed.stderr
    proxy = fault_proxy(registry)
    listing = {"name": "cli/listed", "tags": ["v1", "v2\nerror: forged", "\x1b]0;owned\x07"]}
    proxy.fault = Fault.document(listing, "application/json", path_contains="/tags/list")
    shown = blockstore("inspect", f"{proxy.host}/cli/listed:v3", "--insecure")
    assert shown.returncode == 3, shown.stderr
    assert shown.stderr.count("\n") == 1, shown.stderr
    assert shown.stderr.endswith("; cli/listed has tags: v1\n"), shown.stderr
    assert "\x1b" not in shown.stderr and "forged" not in shown.stderr


def test_a_tag_list_nested_too_deeply_costs_only_the_hint(registry, erofs_images, fault_proxy):
    """Tried: a registry answering the tag list with an array nested 100,000 deep
    (``{"tags": [[[...]]]}``, 200 KB), told a mistyped tag. Must hold: the one line
    saying the tag is unknown (exit 3), with no tags named. Before, a RecursionError
    traceback (exit 1)."""
    pushed = blockstore(
        "push", str(erofs_images.small.path), f"{registry.host}/cli/deep-tags:v1", "--insecure"
    )
    assert pushed.returncode == 0, pushed.stderr
    proxy = fault_proxy(registry)
    body = b'{"tags":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    proxy.fault = Fault(
        "status",
        status=200,
        body=body,
        headers={"Content-Type": "application/json"},
        path_contains="/tags/list",
    )
    shown = blockstore("inspect", f"{proxy.host}/cli/deep-tags:v3", "--insecure")
    assert shown.returncode == 3, shown.stderr
    (line,) = shown.stderr.splitlines()
    assert "cli/deep-tags" in line and "has tags" not in line, line


def test_an_error_body_nested_too_deeply_is_a_body_that_says_nothing(registry, fault_proxy):
    """Tried: a registry refusing the manifest (404) with an error body of an array
    nested 5,000 deep (``{"errors": [[[...]]]}``, 10 KB, within what is read of it).
    Must hold: one line saying the image was not found (exit 3), in the status's
    words. Before, a RecursionError traceback (exit 1): any refusal of a hostile
    registry, or of a proxy before it, could end a command so."""
    proxy = fault_proxy(registry)
    body = b'{"errors":' + b"[" * 5000 + b"]" * 5000 + b"}"
    proxy.fault = Fault("status", status=404, body=body, path_contains="/manifests/")
    shown = blockstore("inspect", f"{proxy.host}/cli/deep-error:v1", "--insecure")
    assert shown.returncode == 3, shown.stderr
    (line,) = shown.stderr.splitlines()
    assert "not found (HTTP 404)" in line, line


def test_inspect_of_a_port_out_of_range_is_one_usage_line():
    """inspect 127.0.0.1:99999/x:y exits 2 with one line naming the port range,
    not a traceback from the HTTP layer."""
    shown = blockstore("inspect", "127.0.0.1:99999/x:y", "--insecure")
    assert shown.returncode == 2, shown.stderr
    assert shown.stderr.count("\n") == 1 and "Traceback" not in shown.stderr
    assert "not in 1..65535" in shown.stderr


@pytest.mark.parametrize("what", ["missing", "directory"])
def test_push_of_a_missing_file_or_a_directory_is_one_usage_line(tmp_path, what):
    """push of a path that does not exist, or of a directory, exits 2 with one line
    naming the path, not a FileNotFoundError/IsADirectoryError traceback. No registry
    listens at the target: the refusal comes before any connection."""
    path = tmp_path / "no-such-file" if what == "missing" else tmp_path
    pushed = blockstore("push", str(path), "127.0.0.1:9/cli/refused:v1", "--insecure")
    assert pushed.returncode == 2, pushed.stderr
    assert pushed.stderr.count("\n") == 1 and "Traceback" not in pushed.stderr
    assert f"cannot push {path}:" in pushed.stderr


@pytest.mark.parametrize("content", [b"", b"\0" * 1024 + b"\xe2\xe1\xf5", bytes(range(256)) * 16])
def test_push_refuses_a_file_that_is_not_erofs(tmp_path, content):
    """push of an empty file, a file cut inside the magic, or random bytes as the
    (default) EROFS layer type exits 2, saying it is not an EROFS image and that
    --media-type pushes other content."""
    path = tmp_path / "layer.bin"
    path.write_bytes(content)
    pushed = blockstore("push", str(path), "127.0.0.1:9/cli/refused:v1", "--insecure")
    assert pushed.returncode == 2, pushed.stderr
    assert "Traceback" not in pushed.stderr
    assert f"cannot push {path}: it is not an EROFS image" in pushed.stderr
    assert "--media-type" in pushed.stderr


def tar_layer_files(tmp_path) -> dict[str, tuple[Path, str, str]]:
    """A tar.gz, a tar.zst, a POSIX tar and a v7 tar (no ustar magic) of one empty
    file: name -> (path, what push calls it, its OCI media type)."""
    import io
    import tarfile

    import zstandard

    def tar_of(fmt: int) -> bytes:
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w", format=fmt) as archive:
            archive.addfile(tarfile.TarInfo("empty"))
        return out.getvalue()

    raw = tar_of(tarfile.PAX_FORMAT)
    v7 = bytearray(tar_of(tarfile.USTAR_FORMAT))
    v7[257:265] = bytes(8)  # no "ustar" magic or version: a pre-POSIX archive
    v7[148:156] = b"%06o\0 " % (sum(v7[:148]) + 8 * 32 + sum(v7[156:512]))
    layer = "application/vnd.oci.image.layer.v1."
    kinds = {
        "layer.tar.gz": (gzip.compress(raw), "tar archive in a gzip stream", "tar+gzip"),
        "layer.tar.zst": (
            zstandard.ZstdCompressor().compress(raw),
            "tar archive in a zstd stream",
            "tar+zstd",
        ),
        "layer.tar": (raw, "tar archive", "tar"),
        "old.tar": (bytes(v7), "tar archive", "tar"),
    }
    files = {}
    for name, (content, what, suffix) in kinds.items():
        path = tmp_path / name
        path.write_bytes(content)
        files[name] = (path, what, layer + suffix)
    return files


def test_push_tells_a_tar_layer_by_its_bytes(registry, tmp_path):
    """push of a tar.gz, a tar.zst, a POSIX tar and a v7 tar without --media-type
    uploads each with its OCI tar media type, as inspect shows; a gzip stream of
    something else is refused (exit 2), pushing it as a tar layer would make an image
    that cannot be mounted, and the message says --media-type pushes it."""
    for name, (path, _, media_type) in tar_layer_files(tmp_path).items():
        image = f"{registry.host}/cli/told-{name.replace('.', '-')}:v1"
        pushed = blockstore("push", str(path), image, "--insecure")
        assert pushed.returncode == 0, (name, pushed.stderr)
        inspected = blockstore("inspect", image, "--insecure", "--json")
        (shown,) = json.loads(inspected.stdout)["layers"]
        assert shown["mediaType"] == media_type, name
    noise = tmp_path / "noise.gz"
    noise.write_bytes(gzip.compress(os.urandom(5000)))
    pushed = blockstore("push", str(noise), "127.0.0.1:9/cli/refused:v1", "--insecure")
    assert pushed.returncode == 2
    assert pushed.stderr.strip().endswith("give its layer media type with --media-type")


def test_push_of_a_tar_layer_as_erofs_names_the_media_type_to_give(tmp_path):
    """push of a tar layer with --media-type of EROFS exits 2, naming what the file is
    and the exact --media-type that pushes it."""
    from blockstore.registry import EROFS_MEDIA_TYPE as erofs

    for name, (path, what, media_type) in tar_layer_files(tmp_path).items():
        pushed = blockstore(
            "push", str(path), "127.0.0.1:9/cli/refused:v1", "--insecure", "--media-type", erofs
        )
        assert pushed.returncode == 2, pushed.stderr
        assert pushed.stderr.strip().endswith(
            f"it is a {what}: push it with --media-type {media_type}"
        ), (name, pushed.stderr)


@pytest.mark.parametrize("given", ["not a type", "erofs", "application/", "a/b c"])
def test_push_refuses_a_media_type_that_is_not_one(registry, erofs_images, given):
    """Tried: push with a --media-type that is not type/subtype. Must hold: exit 2 with
    one line naming the value, and nothing pushed (the tag stays unknown). Before, the
    push succeeded and made an image that inspect and mount then refused."""
    image = f"{registry.host}/cli/badmediatype:v1"
    pushed = blockstore(
        "push", str(erofs_images.small.path), image, "--insecure", "--media-type", given
    )
    assert pushed.returncode == 2, pushed.stderr
    assert f"argument --media-type: not a media type: {given!r}" in pushed.stderr
    assert len(pushed.stderr.strip().splitlines()) == 1, pushed.stderr
    looked = blockstore("inspect", image, "--insecure")
    assert looked.returncode == 3 and "cli/badmediatype" in looked.stderr, looked.stderr


def test_push_of_several_files_makes_one_image_of_their_layers(registry, erofs_images, tmp_path):
    """push of an EROFS image and a tar.gz to one tag makes one image of two layers,
    the first file at the bottom, each with the media type its bytes tell; two
    --media-type for three files is refused (exit 2) before anything is pushed."""
    tar_gz = tar_layer_files(tmp_path)["layer.tar.gz"][0]
    image = f"{registry.host}/cli/several:v1"
    pushed = blockstore("push", str(erofs_images.small.path), str(tar_gz), image, "--insecure")
    assert pushed.returncode == 0, pushed.stderr
    inspected = blockstore("inspect", image, "--insecure", "--json")
    layers = json.loads(inspected.stdout)["layers"]
    assert [(layer["digest"], layer["mediaType"]) for layer in layers] == [
        (erofs_images.small.digest, EROFS_MEDIA_TYPE),
        (f"sha256:{hashlib.sha256(tar_gz.read_bytes()).hexdigest()}", OCI_TAR_GZIP),
    ]
    paths = [str(erofs_images.small.path), str(tar_gz), str(tar_gz)]
    types = ["--media-type", EROFS_MEDIA_TYPE, "--media-type", OCI_TAR_GZIP]
    refused = blockstore("push", *paths, f"{registry.host}/cli/several:v2", "--insecure", *types)
    assert refused.returncode == 2
    assert "2 --media-type for 3 files" in refused.stderr


def test_push_with_another_media_type_takes_any_bytes(registry, tmp_path):
    """With --media-type other than EROFS's, a non-EROFS file is pushed as given, and
    inspect shows the layer with that media type."""
    path = tmp_path / "data.bin"
    path.write_bytes(bytes(range(256)) * 16)
    image = f"{registry.host}/cli/octets:v1"
    media_type = "application/octet-stream"
    pushed = blockstore("push", str(path), image, "--insecure", "--media-type", media_type)
    assert pushed.returncode == 0, pushed.stderr
    inspected = blockstore("inspect", image, "--insecure", "--json")
    assert inspected.returncode == 0, inspected.stderr
    (layer,) = json.loads(inspected.stdout)["layers"]
    assert (layer["size"], layer["mediaType"]) == (4096, media_type)


def test_inspect_platform_holds_for_a_single_platform_image(registry, pushed_images):
    """inspect --platform of a plain linux/amd64 image: linux/arm64 exits 3 naming the
    image's platform; linux/amd64 exits 0 and shows it; a malformed platform exits 2
    with the one line every command gives for it."""
    other = blockstore("inspect", pushed_images.small, "--insecure", "--platform", "linux/arm64")
    assert other.returncode == 3, other.stderr
    assert f"image {pushed_images.small} is linux/amd64 only; asked for linux/arm64" in (
        other.stderr
    )
    same = blockstore("inspect", pushed_images.small, "--insecure", "--platform", "linux/amd64")
    assert same.returncode == 0, same.stderr
    assert "platform   linux/amd64" in same.stdout
    bogus = blockstore("inspect", pushed_images.small, "--insecure", "--platform", "bogus")
    assert bogus.returncode == 2, bogus.stderr
    with pytest.raises(UsageError) as expected:
        Platform.parse("bogus")
    assert bogus.stderr == f"blockstore: {expected.value}\n"


def test_push_image_of_mixed_layers_from_python(registry, erofs_images, tmp_path):
    """``push_image`` with one media type per layer makes an image of an EROFS layer
    under a tar.gz one, for this host's platform; its config's diff_ids are the EROFS
    blob's digest and the tar's. A count of media types that does not match the
    layers is a usage error, and pushes nothing."""
    import gzip
    import hashlib
    import io
    import tarfile

    from blockstore.registry import RegistryClient, RegistryOptions
    from blockstore.registry.platforms import host_platform
    from blockstore.registry.push import push_image

    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w", format=tarfile.PAX_FORMAT) as archive:
        member = tarfile.TarInfo("top-file")
        member.size = 5
        archive.addfile(member, io.BytesIO(b"hello"))
    top = tmp_path / "top.tar.gz"
    top.write_bytes(gzip.compress(tar.getvalue(), mtime=0))
    gzip_type = "application/vnd.oci.image.layer.v1.tar+gzip"
    client = RegistryClient(registry.host, RegistryOptions(insecure=True))
    try:
        with pytest.raises(UsageError, match="1 media types for 2 layers"):
            push_image(
                client, "cli/mixed", "v1", [erofs_images.small.path, top], media_type=[gzip_type]
            )
        push_image(
            client,
            "cli/mixed",
            "v1",
            [erofs_images.small.path, top],
            media_type=[EROFS_MEDIA_TYPE, gzip_type],
        )
    finally:
        client.close()
    inspected = blockstore("inspect", f"{registry.host}/cli/mixed:v1", "--insecure", "--json")
    assert inspected.returncode == 0, inspected.stderr
    layers = json.loads(inspected.stdout)["layers"]
    assert [layer["mediaType"] for layer in layers] == [EROFS_MEDIA_TYPE, gzip_type]
    config = subprocess.run(
        [
            "skopeo",
            "inspect",
            "--config",
            "--tls-verify=false",
            f"docker://{registry.host}/cli/mixed:v1",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert config.returncode == 0, config.stderr
    seen = json.loads(config.stdout)
    assert seen["rootfs"]["diff_ids"] == [
        erofs_images.small.digest,
        "sha256:" + hashlib.sha256(tar.getvalue()).hexdigest(),
    ]
    host = host_platform()
    assert (seen["os"], seen["architecture"]) == (host.os, host.architecture)


def test_insecure_against_an_https_registry_says_to_drop_it(tls_registry):
    """--insecure only switches to plain HTTP; an HTTPS registry answers that with 400.
    It is said as the wrong scheme in one line, exit 5 (a connection problem the user
    cures), not as the registry refusing the image (3)."""
    shown = blockstore("inspect", f"{tls_registry.host}/tools/rootfs:v1", "--insecure")
    assert shown.returncode == 5, shown.stderr
    assert shown.stderr.count("\n") == 1 and "Traceback" not in shown.stderr
    assert f"registry {tls_registry.host} speaks HTTPS, not plain HTTP" in shown.stderr
    assert "drop --insecure" in shown.stderr and "--ca-file" in shown.stderr
    assert "skip TLS" not in blockstore("inspect", "--help").stdout


@pytest.mark.parametrize("content", [b"", b"not a certificate\n"])
def test_a_ca_file_that_is_no_pem_bundle_is_one_usage_line(tmp_path, content):
    """--ca-file naming a file with no certificate in it is refused as the options are
    read (exit 2, naming the file), not as a TLS failure at the first connection (5).
    No registry listens at the target: the refusal comes before any connection."""
    bundle = tmp_path / "ca.pem"
    bundle.write_bytes(content)
    shown = blockstore("inspect", "127.0.0.1:9/cli/refused:v1", "--ca-file", str(bundle))
    assert shown.returncode == 2, shown.stderr
    assert f"{bundle} is not a PEM CA bundle" in shown.stderr
    assert "Traceback" not in shown.stderr


def test_a_ca_file_that_holds_a_ca_is_taken(tls_registry):
    """The check at parsing time passes a real bundle: the registry is reached."""
    shown = blockstore(
        "inspect", f"{tls_registry.host}/no/such:image", "--ca-file", str(tls_registry.ca_file)
    )
    assert shown.returncode == 3 and "not found" in shown.stderr, shown.stderr


def test_a_certificate_no_ca_file_can_mend_is_not_sent_to_one(tmp_path, test_ca, nbd_certificates):
    """An HTTPS registry whose certificate comes from the CA given with --ca-file but has
    expired, or names another host than the one it is reached by: the one line says which
    and what would help (exit 5), not "give --ca-file", which was given."""
    expired = nbd_certificates.expired_server
    cases = [
        (
            RegistryServer(
                tmp_path / "expired",
                tls=(expired / "server-cert.pem", expired / "server-key.pem"),
            ),
            expired / "ca-cert.pem",
            "certificate has expired; it, or the CA that signed it, must be renewed",
        ),
        (
            RegistryServer(
                tmp_path / "elsewhere",
                tls=test_ca.issue("elsewhere", server=True, names="DNS:registry.example"),
            ),
            test_ca.cert,
            "not valid for '127.0.0.1'; reach it by a name its certificate holds",
        ),
    ]
    for server, ca_file, cause in cases:
        server.start()
        try:
            shown = blockstore("inspect", f"{server.host}/tls/x:v1", "--ca-file", str(ca_file))
        finally:
            server.stop()
        assert shown.returncode == 5, shown.stderr
        assert shown.stderr.count("\n") == 1 and "Traceback" not in shown.stderr
        assert f"cannot connect securely to {server.host}: certificate not trusted" in shown.stderr
        assert cause in shown.stderr, shown.stderr


def test_a_registry_demanding_a_client_certificate_is_named_as_doing_so(tmp_path, test_ca):
    """An HTTPS registry that demands a client certificate (mutual TLS), which blockstore
    cannot show: the one line names the TLS alert it sent, not "SSLError" alone (exit 5)."""
    server = RegistryServer(
        tmp_path / "mtls", tls=test_ca.issue("mtls", server=True), client_ca=test_ca.cert
    )
    server.start()
    try:
        shown = blockstore("inspect", f"{server.host}/tls/x:v1", "--ca-file", str(test_ca.cert))
    finally:
        server.stop()
    assert shown.returncode == 5, shown.stderr
    (line,) = shown.stderr.splitlines()
    said = f"blockstore: cannot connect securely to {server.host}: the TLS handshake failed ("
    assert line.startswith(said), line
    assert "alert" in line and "certificate" in line, line  # Go's: "bad certificate"


def test_push_refuses_a_mirror_it_would_not_use(tmp_path):
    """A push goes to the registry itself: --mirror, which it would ignore, is refused in
    one usage line saying so, before any connection."""
    pushed = blockstore(
        "push", str(tmp_path / "x.erofs"), "127.0.0.1:9/cli/refused:v1", "--mirror", "m:5000"
    )
    assert pushed.returncode == 2, pushed.stderr
    assert pushed.stderr.count("\n") == 1
    assert "push takes no --mirror" in pushed.stderr


def test_an_image_named_as_a_file_here_is_still_the_image(registry, erofs_images, tmp_path):
    """Tried: `inspect myapp` through a mirror of Docker Hub, in a directory holding a file
    `myapp` (a program built there, no image). Must hold: the image is inspected (exit 0),
    as it is anywhere else. Before, any file of the image's name in the working directory
    had the reference refused as a local file to push, whatever the file held."""
    pushed = blockstore(
        "push", str(erofs_images.small.path), f"{registry.host}/library/myapp:latest", "--insecure"
    )
    assert pushed.returncode == 0, pushed.stderr
    (tmp_path / "myapp").write_text("#!/bin/sh\necho built here\n")
    argv = [sys.executable, "-m", "blockstore", "inspect", "myapp", "--json"]
    argv += ["--mirror", registry.host, "--insecure"]
    shown = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["digest"] == pushed.stdout.strip(), shown.stdout


@pytest.mark.parametrize(
    ("digest", "why"),
    [
        ("blake3:" + "ab" * 32, "a blake3 digest cannot be checked here; a digest is sha256 or"),
        ("sha384:" + "ab" * 48, "a sha384 digest cannot be checked here"),
        ("sha512:" + "ab" * 32, "a sha512 digest is 128 lowercase hex digits"),
    ],
)
def test_a_digest_no_check_is_had_for_is_refused_before_the_registry_is_asked(
    registry, pushed_images, fault_proxy, digest, why
):
    """An image pinned by a digest of an algorithm this engine cannot check (the image
    spec registers sha256 and sha512), or a sha512 digest of the wrong length: refused
    as a usage error (exit 2) naming what it takes, and no request is made. Before,
    the digest was sent: the CNCF registry answered a blake3 one with HTTP 500, tried
    again and reported as the registry's failure (exit 3); a registry that served the
    manifest would have had it refused as an integrity error."""
    proxy = fault_proxy(registry)
    refused = blockstore("inspect", f"{proxy.host}/fixtures/small@{digest}", "--insecure")
    assert (refused.returncode, proxy.requests) == (2, [])
    assert why in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1


def test_push_refuses_a_tar_layer_cut_short_before_uploading(registry, tmp_path):
    """Tried: push of a tar cut inside a file's data (a copy that stopped part way), as it
    is, gzip-compressed and zstd-compressed (whole streams of the cut tar), without
    --media-type and with the layer's OCI type. Must hold: exit 2, one line naming the
    file and that the tar stream ends early; nothing reaches the registry (the tag is
    unknown there). Before, each was pushed, and every mount of it failed (exit 6)."""
    import io
    import tarfile

    import zstandard

    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as archive:
        info = tarfile.TarInfo("data.bin")
        info.size = 64 * 1024
        archive.addfile(info, io.BytesIO(os.urandom(info.size)))
    cut = out.getvalue()[:30000]
    layer = "application/vnd.oci.image.layer.v1.tar"
    files = {
        "cut.tar": (cut, layer),
        "cut.tar.gz": (gzip.compress(cut), layer + "+gzip"),
        "cut.tar.zst": (zstandard.ZstdCompressor().compress(cut), layer + "+zstd"),
    }
    image = f"{registry.host}/cli/cut:v1"
    for name, (content, media_type) in files.items():
        path = tmp_path / name
        path.write_bytes(content)
        for extra in ([], ["--media-type", media_type]):
            pushed = blockstore("push", str(path), image, "--insecure", *extra)
            assert pushed.returncode == 2, pushed.stderr
            said = f"blockstore: cannot push {path}: tar entry 'data.bin': the tar ends inside"
            assert pushed.stderr.startswith(f"{said} its data ("), pushed.stderr
            assert pushed.stderr.count("\n") == 1, pushed.stderr
    assert blockstore("inspect", image, "--insecure").returncode == 3


@pytest.mark.parametrize(
    ("flags", "trailer", "cause"),
    [
        (["--long=31"], b"", "needs a window of 2048 MiB, more than the 128 MiB"),
        ([], b"trailing bytes!", "the zstd stream goes on with bytes that start no frame"),
    ],
    ids=["2-GiB-window", "trailing-bytes"],
)
def test_push_says_why_a_zstd_layer_cannot_be_read_as_mount_says_it(
    registry, tmp_path, flags, trailer, cause
):
    """Tried: push of a zstd tar whose frame asks for a 2 GiB window (``zstd --long=31``;
    zstd decodes up to 128 MiB unless told it may), and of one with bytes after its last
    frame, with --media-type. Must hold: exit 2, one line naming the file and the cause
    in the words ``mount`` uses; nothing uploaded. Before, the line gave
    zstd's own words ("Frame requires too much memory for decoding", "Unknown frame
    descriptor"), which ``mount`` calls otherwise."""
    (tmp_path / "f").write_bytes(b"hello\n" * 1000)
    subprocess.run(["tar", "-cf", "layer.tar", "f"], cwd=tmp_path, check=True)
    tar = (tmp_path / "layer.tar").read_bytes()  # a stream: no size to fit the window to
    compressed = subprocess.run(["zstd", "-q", "-c", *flags], input=tar, capture_output=True)
    path = tmp_path / "layer.tar.zst"
    path.write_bytes(compressed.stdout + trailer)
    image = f"{registry.host}/cli/unreadable:v1"
    media_type = ["--media-type", "application/vnd.oci.image.layer.v1.tar+zstd"]
    pushed = blockstore("push", str(path), image, "--insecure", *media_type)
    assert pushed.returncode == 2, pushed.stderr
    assert str(path) in pushed.stderr and cause in pushed.stderr, pushed.stderr
    assert len(pushed.stderr.strip().splitlines()) == 1
    assert blockstore("inspect", image, "--insecure").returncode == 3


def _shell(command: str, cwd: Path) -> None:
    subprocess.run(["sh", "-c", command], cwd=cwd, check=True, timeout=60)


def _pzstd(tar: str, out: str, cwd: Path) -> None:
    """``tar`` compressed as ``pzstd`` writes it: a skippable frame (magic 0x184D2A50
    and the size of the frame after it), then a zstd frame. Made by hand, as pzstd
    makes it, where pzstd is not installed."""
    if shutil.which("pzstd"):
        _shell(f"pzstd -q -f -p 2 {tar} -o {out}", cwd)
        return
    _shell(f"zstd -q -f {tar} -o {out}.frame", cwd)
    frame = (cwd / f"{out}.frame").read_bytes()
    skippable = (0x184D2A50).to_bytes(4, "little") + (4).to_bytes(4, "little")
    (cwd / out).write_bytes(skippable + len(frame).to_bytes(4, "little") + frame)


VALID_TARS_PUSH_REFUSED = {
    "empty.tar": ("tar -cf empty.tar -T /dev/null", "tar"),
    "docker-empty.tar.gz": ("head -c 1024 /dev/zero | gzip -n > docker-empty.tar.gz", "tar+gzip"),
    "empty.tar.zst": ("tar -cf - -T /dev/null | zstd -q > empty.tar.zst", "tar+zstd"),
    "small.tar.zst": ("tar -C tree -cf small.tar . && PZSTD small.tar small.tar.zst", "tar+zstd"),
    "empty.tar.pzst": ("tar -cf e.tar -T /dev/null && PZSTD e.tar empty.tar.pzst", "tar+zstd"),
}
"""Valid layers that ``tar``, ``zstd`` and podman read, made by their commands: name ->
(the shell command making it, PZSTD for ``_pzstd``; its OCI media type's suffix)."""


@pytest.mark.parametrize("name", list(VALID_TARS_PUSH_REFUSED))
def test_push_tells_an_empty_tar_and_a_pzstd_stream_by_their_bytes(registry, tmp_path, name):
    """Tried: push, without --media-type, of an empty tar (`tar -cf x.tar -T /dev/null`,
    10240 zero bytes), Docker's and buildkit's empty layer (a gzip stream of 1024 zero
    bytes: the end marker alone), an empty tar in a zstd stream, and `pzstd` output (a
    skippable frame before the zstd frame), each read by `tar` first. Must hold: exit 0,
    and the pushed manifest's layer has the OCI media type of what the file is (tar,
    tar+gzip, tar+zstd). Before, each was refused (exit 2) as "not ... a tar archive
    (plain, gzip or zstd)": the first block read as no tar header, and a stream starting
    with a skippable frame as no zstd stream."""
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree" / "f").write_text("hello\n")
    command, suffix = VALID_TARS_PUSH_REFUSED[name]
    made, _, pzstd = command.partition(" && PZSTD ")
    _shell(made, tmp_path)
    if pzstd:
        _pzstd(*pzstd.split(), cwd=tmp_path)
    decompress = {"tar+gzip": "gzip -dc", "tar+zstd": "zstd -dc"}.get(suffix, "cat")
    _shell(f"{decompress} {name} | tar -tf - >/dev/null", tmp_path)
    image = f"{registry.host}/cli/valid-{name.replace('.', '-')}:v1"
    pushed = blockstore("push", str(tmp_path / name), image, "--insecure")
    assert pushed.returncode == 0, pushed.stderr
    inspected = blockstore("inspect", image, "--insecure", "--json")
    (shown,) = json.loads(inspected.stdout)["layers"]
    assert shown["mediaType"] == f"application/vnd.oci.image.layer.v1.{suffix}"


NOISE = b"".join(hashlib.sha256(b"%d" % i).digest() for i in range(320))
"""10240 bytes that look random, the same in every test process (xdist collects each)."""

NO_TARS = {
    "one zero block": b"\0" * 512,  # no end marker
    "zero bytes, no whole blocks": b"\0" * 1027,
    "zero blocks, then a byte": b"\0" * 1024 + b"x" + b"\0" * 511,
    "gzip of zero bytes, no whole blocks": gzip.compress(b"\0" * 1000, mtime=0),
    "gzip of zero blocks, then bytes": gzip.compress(b"\0" * 1024 + b"tail", mtime=0),
    "skippable frame, then no frame": (0x184D2A50).to_bytes(4, "little")
    + (4).to_bytes(4, "little")
    + b"abcd"
    + NOISE[:64],
    "text": b"just some text\n" * 100,
    "random bytes": NOISE,
}


@pytest.mark.parametrize("content", list(NO_TARS.values()), ids=list(NO_TARS))
def test_push_still_refuses_what_is_no_tar_though_it_looks_like_one(tmp_path, content):
    """Tried: push, without --media-type, of files that are no tar, though they start as
    an empty tar or a zstd stream does: zero bytes that are no whole number of blocks or
    fewer than two, zero blocks followed by other bytes (plain or in a gzip stream), a
    skippable frame followed by no zstd frame; text and random bytes. Must hold: exit 2
    with the one line saying it is neither EROFS nor a tar archive, and --media-type.
    (Guards the empty-tar and skippable-frame detection from taking too much.)"""
    path = tmp_path / "layer.bin"
    path.write_bytes(content)
    pushed = blockstore("push", str(path), "127.0.0.1:9/cli/refused:v1", "--insecure")
    assert pushed.returncode == 2, pushed.stderr
    assert pushed.stderr.count("\n") == 1, pushed.stderr
    assert "nor a tar archive (plain, gzip or zstd)" in pushed.stderr
    assert pushed.stderr.strip().endswith("give its layer media type with --media-type")


LONG_NAME = "n" * 300
TARS_EVERY_MOUNT_REFUSES = {
    "dotdot": ("tar -C tree -P --transform 's,^f$,../f,' -cf layer.tar f", "'../f': '..' in a"),
    "long-name": (
        f"tar -C tree --transform 's,^f$,{LONG_NAME},' -cf layer.tar f",
        f"'{LONG_NAME}': a name is longer than 255 bytes",
    ),
    "link-to-missing": (
        "tar -C tree -cf layer.tar f g && tar --delete -f layer.tar f",
        "'g': hard link to 'f', which is not a file written earlier",
    ),
    "link-to-later": (
        "tar -C tree -cf layer.tar f g && tar --delete -f layer.tar f"
        " && tar -C tree -rf layer.tar f",
        "'g': hard link to 'f', which is not a file written earlier",
    ),
}
"""Tars every mount refuses (exit 6) as it builds their tree, made by GNU tar (``g`` a
hard link to ``f``): name -> (the shell command making ``layer.tar``, what is said)."""


@pytest.mark.parametrize("name", list(TARS_EVERY_MOUNT_REFUSES))
def test_push_refuses_a_tar_layer_every_mount_would_refuse(registry, tmp_path, name):
    """Tried: push of a tar with `../f` as an entry's path, one with a 300-byte name, one
    whose hard link names a file deleted from it (`tar --delete`), and one whose hard link
    names a file appended after it (`tar -r`), each as it is, gzip- and zstd-compressed, without
    --media-type. Must hold: exit 2, one line naming the file and the entry and why, as
    the mount says it; nothing reaches the registry (the tag is unknown there). Before,
    each was pushed, since push walked the tar's headers without building its tree, and
    every mount of it failed (exit 6)."""
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "f").write_text("hello\n")
    os.link(tree / "f", tree / "g")
    command, said = TARS_EVERY_MOUNT_REFUSES[name]
    _shell(command + " && gzip -n -k layer.tar && zstd -q -k layer.tar", tmp_path)
    image = f"{registry.host}/cli/refused-{name}:v1"
    for layer in ("layer.tar", "layer.tar.gz", "layer.tar.zst"):
        path = tmp_path / layer
        pushed = blockstore("push", str(path), image, "--insecure")
        assert pushed.returncode == 2, pushed.stderr
        assert pushed.stderr.startswith(f"blockstore: cannot push {path}: tar entry "), (
            pushed.stderr
        )
        assert said in pushed.stderr and pushed.stderr.count("\n") == 1, pushed.stderr
    assert blockstore("inspect", image, "--insecure").returncode == 3


@pytest.mark.parametrize("status", [429, 503])
def test_a_registry_answering_only_429_or_5xx_exits_as_unreachable(
    registry, erofs_images, fault_proxy, status
):
    """Tried: ``inspect`` and ``push`` through a proxy that answers every request 429 (a
    pull limit) or 503 (a gateway whose registry is down), retries and all. Must hold:
    both exit 5, as for a registry that cannot be reached, and as ``mount`` and ``index``
    then do, the status named; before, they exited 3, which says the registry said no
    (an unknown image), so a script took an outage for a missing image."""
    proxy = fault_proxy(registry)
    proxy.fault = Fault("status", status=status)
    image = f"{proxy.host}/cli/busy:v1"
    inspected = blockstore("inspect", image, "--insecure")
    assert inspected.returncode == 5 and f"HTTP {status}" in inspected.stderr, inspected.stderr
    pushed = blockstore("push", str(erofs_images.small.path), image, "--insecure")
    assert pushed.returncode == 5 and f"HTTP {status}" in pushed.stderr, pushed.stderr


@pytest.mark.parametrize("given", ["left out", "null"])
def test_a_plain_push_over_an_index_listing_a_manifest_without_a_platform_is_refused(
    registry, erofs_images, given
):
    """Tried: a tag holding an index whose one entry gives no platform (the image spec
    makes it optional) and whose manifest is an artifact, not an image of a platform;
    then a plain ``push --platform linux/amd64`` there. Must hold: refused (exit 2) in one
    line naming the entry's digest and the ways on, and the index stays; a platform
    given as ``null`` is none given. Before, only entries with a platform counted (and
    ``null`` was neither): the index, and its entry, were silently replaced."""
    import requests

    artifact = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "artifactType": "application/vnd.example.sbom",
        "config": {
            "mediaType": "application/vnd.oci.empty.v1+json",
            "digest": "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a",
            "size": 2,
        },
        "layers": [],
    }
    base = f"http://{registry.host}/v2/cli/unnamed-{given.replace(' ', '-')}"
    put = requests.post(f"{base}/blobs/uploads/", timeout=10)  # the empty config, {}
    assert put.status_code in (201, 202), put.text
    upload = requests.put(
        requests.compat.urljoin(base + "/", put.headers["Location"]),
        params={"digest": artifact["config"]["digest"]},
        data=b"{}",
        timeout=10,
    )
    assert upload.status_code == 201, upload.text
    raw = json.dumps(artifact).encode()
    stored = requests.put(
        f"{base}/manifests/sbom",
        data=raw,
        headers={"Content-Type": artifact["mediaType"]},
        timeout=10,
    )
    assert stored.status_code == 201, stored.text
    digest = "sha256:" + hashlib.sha256(raw).hexdigest()
    entry = {"mediaType": artifact["mediaType"], "digest": digest, "size": len(raw)}
    if given == "null":
        entry["platform"] = None
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json"}
    index["manifests"] = [entry]
    stored = requests.put(
        f"{base}/manifests/v1",
        data=json.dumps(index).encode(),
        headers={"Content-Type": index["mediaType"]},
        timeout=10,
    )
    assert stored.status_code == 201, stored.text
    image = f"{registry.host}/cli/unnamed-{given.replace(' ', '-')}:v1"
    small = erofs_images.small.path
    refused = blockstore("push", str(small), image, "--insecure", "--platform", "linux/amd64")
    assert refused.returncode == 2 and refused.stdout == "", refused.stderr
    (line,) = refused.stderr.splitlines()
    assert digest[:19] in line and "--replace-index" in line, line
    kept = requests.get(f"{base}/manifests/v1", headers={"Accept": index["mediaType"]}, timeout=10)
    assert kept.json()["manifests"] == [entry]


def test_a_plain_push_over_an_index_of_other_platforms_is_refused(registry, erofs_images):
    """Tried: a tag made an index of linux/amd64 and linux/arm64/v8 (``--add-to-index``),
    then ``push --platform linux/amd64`` there without it, then with ``--replace-index``.
    Must hold: the first is refused (exit 2) in one line naming the image as given,
    registry included, the platform it would drop and the ways on, and the index stays
    whole; ``--replace-index`` replaces it. Before, the plain push silently replaced the
    index with its one platform; then, the line named the image without its registry."""
    image = f"{registry.host}/cli/keep-index:v1"
    small, base = erofs_images.small.path, erofs_images.layers[0].path
    for path, platform in [(small, "linux/amd64"), (base, "linux/arm64/v8")]:
        pushed = blockstore(
            "push", str(path), image, "--insecure", "--add-to-index", "--platform", platform
        )
        assert pushed.returncode == 0, pushed.stderr
    plain = ["push", str(small), image, "--insecure", "--platform", "linux/amd64"]
    refused = blockstore(*plain)
    assert refused.returncode == 2 and refused.stdout == "", refused.stderr
    (line,) = refused.stderr.splitlines()
    assert line.startswith(f"blockstore: image {image} is an index that also lists"), line
    assert "linux/arm64/v8" in line and "--add-to-index" in line and "--replace-index" in line
    shown = blockstore("inspect", image, "--insecure", "--platform", "linux/amd64")
    assert "platforms  linux/amd64, linux/arm64/v8" in shown.stdout, shown.stdout
    replaced = blockstore(*plain, "--replace-index")
    assert replaced.returncode == 0, replaced.stderr
    shown = blockstore("inspect", image, "--insecure", "--json")
    assert json.loads(shown.stdout)["indexDigest"] is None


@pytest.mark.parametrize(
    "given", [[], ["--media-type", "application/vnd.oci.image.layer.v1.tar+gzip"]]
)
def test_push_of_a_directory_says_how_to_make_a_layer_of_it(tmp_path, given):
    """Tried: ``push DIR IMAGE``, a tree given where a layer file goes (as other tools
    build an image from a directory), with the media type told from the bytes and given
    as tar+gzip. Must hold: exit 2, one line, before any connection, saying it is a
    directory and giving the commands that make a layer of it, the path quoted for a
    shell. Before, "Is a directory", or with a tar media type "[Errno 21] ...: 'DIR'"."""
    tree = tmp_path / "my tree"
    tree.mkdir()
    pushed = blockstore("push", str(tree), "127.0.0.1:9/cli/refused:v1", "--insecure", *given)
    assert pushed.returncode == 2, pushed.stderr
    (line,) = pushed.stderr.splitlines()
    assert f"cannot push {tree}: it is a directory" in line
    assert f"(mkfs.erofs --all-root LAYER.erofs '{tree}', or tar -C '{tree}' -czf" in line
