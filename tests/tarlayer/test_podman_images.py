"""Images built and pushed with podman, as users make them, mounted with ``blockstore mount``.

Each image is built ``FROM scratch`` from a real tree (COPY and ADD need no container
runtime) or edited in a podman-mounted container and committed (so podman itself
writes the whiteouts and the opaque directory), then pushed to the test registry.
What the mount shows must be what extracting the image's own layer blobs in order
gives, file by file. Every image holds fresh random bytes, so no push can reuse
another test's blob in another compression. The tests share one podman store and
so run in one worker.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from test_cli_mount import cli, run_dir  # noqa: F401 (run_dir: a fixture the tests use)
from test_overlay_layers import extract_in_order, without_dir_counts
from trees import make_tar, populate, snapshot

from blockstore.image import open_image

pytestmark = [
    pytest.mark.slow,
    pytest.mark.usefixtures("run_dir"),
    pytest.mark.xdist_group("podman"),
    pytest.mark.skipif(shutil.which("podman") is None, reason="podman is not installed"),
]

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
LAYER_TYPES = {
    "gzip": {
        "application/vnd.oci.image.layer.v1.tar+gzip",
        "application/vnd.docker.image.rootfs.diff.tar.gzip",
    },
    "zstd": {"application/vnd.oci.image.layer.v1.tar+zstd"},
}
CHUNKED_TOC = "io.containers.zstd-chunked.manifest-position"


class Podman:
    """podman with a store, state and temporary files of its own under ``root`` (overlay
    driver, so a directory deleted and made again is an opaque directory, as on users'
    machines), logging no events."""

    def __init__(self, root: Path, runroot: Path):
        self.root = root
        (root / "tmp").mkdir(parents=True)
        self._base = [
            "podman",
            "--root",
            str(root / "storage"),
            "--runroot",
            str(runroot),
            "--storage-driver",
            "overlay",
            "--tmpdir",
            str(root / "libpod"),
            "--network-config-dir",
            str(root / "networks"),
            "--events-backend",
            "none",
        ]
        self._env = {**os.environ, "TMPDIR": str(root / "tmp")}

    def __call__(self, *args: str) -> str:
        done = subprocess.run(
            [*self._base, *args], capture_output=True, text=True, env=self._env, timeout=120
        )
        assert done.returncode == 0, f"podman {' '.join(args)}: {done.stderr}"
        return done.stdout.strip()

    def build(
        self, context: Path, tag: str, lines: list[str], *flags: str, base: str = "scratch"
    ) -> str:
        """``FROM base`` then ``lines``, built in ``context``; the image's name."""
        (context / "Containerfile").write_text("\n".join([f"FROM {base}", *lines]) + "\n")
        self("build", "-q", *flags, "-t", tag, str(context))
        return tag

    def edit_and_commit(self, image: str, tag: str, edit: Callable[[Path], None]) -> str:
        """A container of ``image``, its tree changed by ``edit(root)``, committed."""
        name = self("create", image, "/none")
        try:
            edit(Path(self("mount", name)))
            self("commit", "-q", name, tag)
        finally:
            self("rm", "-f", name)
        return tag

    def push(self, image: str, ref: str, *flags: str) -> str:
        self("push", "-q", "--tls-verify=false", *flags, image, f"docker://{ref}")
        return ref


@pytest.fixture(scope="module")
def podman(tmp_path_factory) -> Iterator[Podman]:
    """A podman of the module's own. Its run directory is a short path of its own:
    podman refuses one over 50 characters, as test directories under xdist are."""
    runroot = Path(tempfile.mkdtemp(prefix="bs-podman-"))
    try:
        yield Podman(tmp_path_factory.mktemp("podman"), runroot)
    finally:
        shutil.rmtree(runroot, ignore_errors=True)


def raw_manifest(ref: str, *flags: str) -> dict:
    done = subprocess.run(
        ["skopeo", "inspect", "--raw", "--tls-verify=false", *flags, f"docker://{ref}"],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout)


def layer_tars(ref: str, where: Path, *flags: str) -> list[Path]:
    """The image's layer blobs, decompressed, bottom first: copied with skopeo (which
    keeps each blob as pushed) into an OCI layout, then ``gzip -d`` / ``zstd -d``."""
    layout = where / "layout"
    subprocess.run(
        [
            "skopeo",
            "copy",
            "-q",
            "--src-tls-verify=false",
            *flags,
            f"docker://{ref}",
            f"oci:{layout}",
        ],
        check=True,
        capture_output=True,
    )
    index = json.loads((layout / "index.json").read_text())
    blob = lambda digest: layout / "blobs" / "sha256" / digest.split(":")[1]  # noqa: E731
    manifest = json.loads(blob(index["manifests"][0]["digest"]).read_bytes())
    tars = []
    for i, layer in enumerate(manifest["layers"]):
        data = blob(layer["digest"]).read_bytes()
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
        elif data[:4] == b"\x28\xb5\x2f\xfd":
            data = subprocess.run(
                ["zstd", "-d", "-c"], input=data, capture_output=True, check=True
            ).stdout
        tar = where / f"layer{i}.tar"
        tar.write_bytes(data)
        tars.append(tar)
    return tars


def tar_names(tar: Path) -> set[str]:
    with tarfile.open(tar) as archive:
        return set(archive.getnames())


def mounted_tree(
    tmp_path: Path, ref: str, platform: str | None = None, layer: int | None = None
) -> tuple[tuple[dict, list], str]:
    """``blockstore mount`` of ``ref`` (of ``platform``, OS/ARCH; of one layer alone, if
    given), checked against the extraction of the image's own layers (that layer
    alone), then unmounted: the mount's entries (directory link counts aside) and what
    ``mount`` said."""
    flags: tuple[str, ...] = () if layer is None else ("--layer", str(layer))
    pick: tuple[str, ...] = ()
    if platform:
        os_name, arch = platform.split("/")
        flags += ("--platform", platform)
        pick = ("--override-os", os_name, "--override-arch", arch)
    want_dir = tmp_path / "extracted"
    tars = layer_tars(ref, tmp_path, *pick)
    extract_in_order(tars if layer is None else tars[layer : layer + 1], want_dir)
    want = without_dir_counts(snapshot(want_dir, with_mtime=False))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    said = cli("mount", "--insecure", "--cache-dir", str(tmp_path / "cache"), *flags, ref, str(mnt))
    try:
        got = without_dir_counts(snapshot(mnt, with_mtime=False))
    finally:
        cli("umount", str(mnt))
    assert got == want
    return got, said.stdout


def user_xattrs_only(attrs: tuple) -> tuple:
    """A snapshot entry as podman copies it: of the xattrs, only ``user.*`` ones."""
    xattrs = {name: value for name, value in attrs[-1].items() if name.startswith("user.")}
    return (*attrs[:-1], xattrs)


def source_context(tmp_path: Path) -> Path:
    """A build context: ``tree.tar``, a populated tree (owners, modes, hard links,
    xattrs, devices, a 3 MiB file of fresh random bytes), and ``extra/``, a few files
    of fresh bytes too."""
    context = tmp_path / "context"
    context.mkdir()
    make_tar(populate(tmp_path / "tree"), context / "tree.tar")
    extra = context / "extra"
    (extra / "opt" / "app").mkdir(parents=True)
    (extra / "opt" / "app" / "id").write_bytes(os.urandom(64))
    (extra / "opt" / "app" / "empty").write_bytes(b"")
    os.symlink("app/id", extra / "opt" / "id-link")
    return context


@pytest.mark.parametrize(
    ("flags", "manifest_type", "compression"),
    [
        ((), OCI_MANIFEST, "gzip"),
        (("--format", "oci"), OCI_MANIFEST, "gzip"),
        (("--format", "v2s2"), DOCKER_MANIFEST, "gzip"),
        (("--compression-format", "zstd"), OCI_MANIFEST, "zstd"),
        (("--compression-format", "zstd:chunked"), OCI_MANIFEST, "zstd"),
    ],
    ids=["default", "oci", "v2s2", "zstd", "zstd-chunked"],
)
def test_a_podman_pushed_image_mounts_as_its_layers_extract(
    tmp_path, registry, podman, flags, manifest_type, compression
):
    """Tried: an image of two layers (``ADD tree.tar``, which keeps owners, modes, hard
    links and xattrs; ``COPY extra/``) pushed by podman as it does by default, as OCI,
    as Docker v2s2, with zstd and with zstd:chunked layers. Must hold: the manifest and
    layers are of the kind asked for, and the mount shows, file by file, what
    extracting the pushed layers in order gives, and the source tree where the
    first layer put it."""
    context = source_context(tmp_path)
    tag = f"localhost/formats-{len(flags)}-{os.urandom(4).hex()}"
    podman.build(context, tag, ["ADD tree.tar /", "COPY extra/ /"])
    ref = podman.push(tag, f"{registry.host}/podman/formats:{tag.rsplit('-', 1)[1]}", *flags)
    manifest = raw_manifest(ref)
    assert manifest["mediaType"] == manifest_type
    assert {layer["mediaType"] for layer in manifest["layers"]} <= LAYER_TYPES[compression]
    if "zstd:chunked" in flags:  # frames per file, and the table of contents in skippable ones
        for layer in manifest["layers"]:
            assert CHUNKED_TOC in layer.get("annotations", {})
    (got, _), _ = mounted_tree(tmp_path, ref)
    source = without_dir_counts(snapshot(tmp_path / "tree", with_mtime=False))[0]
    del source["."]  # the image's root is podman's
    kept = {path: user_xattrs_only(attrs) for path, attrs in source.items()}
    assert {path: got.get(path) for path in source} == kept


def delete_and_remake(root: Path) -> None:
    """What a ``RUN`` step would do: delete a file, a directory and a symlink, empty a
    directory by deleting and making it again (overlayfs marks it opaque), turn a file
    into a directory and a directory into a symlink, and change a mode."""
    (root / "etc" / "shadow").unlink()
    shutil.rmtree(root / "many")
    (root / "dangling").unlink()
    shutil.rmtree(root / "home" / "user")
    (root / "home" / "user").mkdir(mode=0o700)
    os.chown(root / "home" / "user", 1000, 1000)
    (root / "home" / "user" / "fresh").write_text("the only file left here\n")
    (root / "empty-file").unlink()
    (root / "empty-file").mkdir()
    shutil.rmtree(root / "opt" / "app")
    os.symlink("/usr/lib", root / "opt" / "app")
    os.chmod(root / "usr" / "lib" / "exact-block", 0o600)


def test_whiteouts_and_an_opaque_directory_podman_wrote_mount_as_they_extract(
    tmp_path, registry, podman
):
    """Tried: an image of four layers: ``ADD tree.tar``; ``COPY extra/``; a layer podman
    committed from a container whose tree was edited (deletions, so whiteouts; a
    directory deleted and made again, so an opaque directory; kinds and modes
    changed); and a ``COPY`` over it that brings a deleted file back. Must hold: the
    third layer holds the whiteouts and the opaque marker (so the case is tried),
    and the mount shows what extracting the four layers in order gives; that layer
    mounted alone (``--layer 2``) shows what extracting it alone gives: no
    whiteouts, no opaque marks (it showed each whiteout as a 0:0 character device
    and its stacking marks as ``trusted.overlay.*`` xattrs)."""
    context = source_context(tmp_path)
    suffix = os.urandom(4).hex()
    base = podman.build(context, f"localhost/base-{suffix}", ["ADD tree.tar /", "COPY extra/ /"])
    edited = podman.edit_and_commit(base, f"localhost/edited-{suffix}", delete_and_remake)
    back = context / "back" / "etc"
    back.mkdir(parents=True)
    (back / "shadow").write_text("root:!:20000::::::\n")
    top = podman.build(context, f"localhost/top-{suffix}", ["COPY back/ /"], base=edited)
    ref = podman.push(top, f"{registry.host}/podman/whiteouts:{suffix}")

    (got, _), _ = mounted_tree(tmp_path, ref)
    names = tar_names(tmp_path / "layer2.tar")
    assert {"etc/.wh.shadow", ".wh.many", "home/user/.wh..wh..opq"} <= names
    assert sorted(os.listdir(tmp_path / "extracted" / "home" / "user")) == ["fresh"]
    assert "many" not in got and got["opt/app"][-2] == "/usr/lib"

    alone = tmp_path / "alone"
    alone.mkdir()
    (got, _), _ = mounted_tree(alone, ref, layer=2)
    assert not [path for path in got if "/.wh." in f"/{path}"]


@pytest.mark.parametrize(
    ("list_format", "list_type"),
    [
        ("oci", "application/vnd.oci.image.index.v1+json"),
        ("v2s2", "application/vnd.docker.distribution.manifest.list.v2+json"),
    ],
)
def test_a_podman_manifest_list_mounts_the_platform_asked_for(
    tmp_path, registry, podman, list_format, list_type
):
    """Tried: ``podman manifest create/add/push --all`` of two images, linux/amd64 and
    linux/arm64, built from different trees, pushed as an OCI index and as a Docker
    manifest list, then ``mount --platform`` of each. Must hold: the list is of the
    kind asked for and names both platforms, and each mount shows its own platform's
    tree, as extracting that image's layers gives."""
    suffix = os.urandom(4).hex()
    images = {}
    for platform in ("linux/amd64", "linux/arm64"):
        context = tmp_path / "context" / platform
        (context / "tree" / "etc").mkdir(parents=True)
        (context / "tree" / "etc" / "platform").write_text(platform + "\n")
        (context / "tree" / "payload").write_bytes(os.urandom(256 << 10))
        tag = f"localhost/{platform.replace('/', '-')}-{suffix}"
        images[platform] = podman.build(context, tag, ["COPY tree/ /"], "--platform", platform)
    listed = f"localhost/list-{suffix}"
    podman("manifest", "create", listed)
    for image in images.values():
        podman("manifest", "add", listed, f"containers-storage:{image}")
    ref = f"{registry.host}/podman/list:{suffix}"
    push = ["manifest", "push", "-q", "--all", "--format", list_format, "--tls-verify=false"]
    podman(*push, listed, f"docker://{ref}")

    index = raw_manifest(ref)
    assert index["mediaType"] == list_type
    platforms = {
        f"{m['platform']['os']}/{m['platform']['architecture']}" for m in index["manifests"]
    }
    assert platforms == set(images)
    for platform, arch in (("linux/amd64", "amd64"), ("linux/arm64", "arm64")):
        where = tmp_path / arch
        where.mkdir()
        (got, _), _ = mounted_tree(where, ref, platform)
        assert got["etc/platform"][-2] == hashlib.sha256(f"{platform}\n".encode()).hexdigest()


def test_a_one_layer_podman_image_shows_none_of_the_marks_for_stacking(tmp_path, registry, podman):
    """Tried: the commonest podman image, ``FROM scratch`` and one ``COPY`` (its layer
    has no entry for the root, which is so only implied), mounted. Must hold: the
    mount shows what extracting the layer gives, with no xattr on the root, and says
    it is "1 layer under a read-only overlayfs" (not "1 layers"). Before, a
    lone layer was mounted as its EROFS image, showing the root's mark for overlayfs
    (``trusted.overlay.blockstore.implied``) to root's ``getfattr``, ``cp -a`` and
    ``tar --xattrs``."""
    context = source_context(tmp_path)
    tag = podman.build(context, f"localhost/one-{os.urandom(4).hex()}", ["COPY extra/ /"])
    ref = podman.push(tag, f"{registry.host}/podman/one:{tag.rsplit('-', 1)[1]}")
    (got, _), said = mounted_tree(tmp_path, ref)
    assert got["."][-1] == {}
    assert "1 layer under a read-only overlayfs" in said
    assert {"./", "."}.isdisjoint(tar_names(tmp_path / "layer0.tar"))  # the root is implied


def test_a_zstd_chunked_layer_is_entered_at_its_frames(tmp_path, registry, podman):
    """Tried: a zstd:chunked layer podman pushed of a 9 MiB file and a few small ones
    (a frame or more per file, the table of contents in skippable frames), indexed
    and mounted. Must hold: the index restarts inside the layer (more than one point,
    each at a zstd frame's magic in the blob, spans of 4 MiB apart at least), and the
    mount shows what ``zstd -d`` of the blob extracts to."""
    context = tmp_path / "context"
    (context / "tree" / "data").mkdir(parents=True)
    (context / "tree" / "data" / "big").write_bytes(os.urandom(9 << 20))
    for i in range(20):
        (context / "tree" / "data" / f"small-{i}").write_bytes(os.urandom(i * 100))
    tag = podman.build(context, f"localhost/chunked-{os.urandom(4).hex()}", ["COPY tree/ /"])
    ref = podman.push(
        tag,
        f"{registry.host}/podman/chunked:{tag.rsplit('-', 1)[1]}",
        "--compression-format",
        "zstd:chunked",
    )
    (layer,) = raw_manifest(ref)["layers"]
    assert CHUNKED_TOC in layer["annotations"]

    mounted_tree(tmp_path, ref)
    blob = next((tmp_path / "layout" / "blobs" / "sha256").glob(layer["digest"][7:])).read_bytes()
    image = open_image(ref, cache_dir=tmp_path / "cache", options=registry.options())
    try:
        (export,) = image.exports()
        spans = export.index.spans
    finally:
        image.close()
    assert spans.kind == "zstd" and len(spans.points) > 1
    assert all(blob[c : c + 4] == b"\x28\xb5\x2f\xfd" for c, _ in spans.points)
