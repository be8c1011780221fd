"""``blockstore prefetch``: whole layers into the cache, interrupted and resumed."""

from __future__ import annotations

import gzip
import io
import json
import os
import random
import resource
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from rig.fault_proxy import Fault
from rig.images import build_erofs
from rig.pushed import push_erofs
from rig.turn_holder import turn_held
from rig.waiting import wait_for

from blockstore.cache import ChunkStore
from blockstore.cache.traces import TraceShelf
from blockstore.image import open_image
from blockstore.prefetch import PrefetchSettings, Trace
from blockstore.prefetch.trace import traces_document


def blockstore(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "blockstore", *args], capture_output=True, text=True, **kw
    )


def cached_fraction(cache: Path) -> float:
    if not cache.exists():
        return 0.0  # the prefetch has not made it yet; cache ls would refuse it
    listing = blockstore("cache", "ls", "--json", "--cache-dir", str(cache), check=True)
    blobs = json.loads(listing.stdout)
    return blobs[0]["cached_fraction"] if blobs else 0.0


def requested_bytes(requests) -> int:
    total = 0
    for request in requests:
        spec = request.headers.get("Range", "")
        if spec.startswith("bytes="):
            first, _, last = spec[6:].partition("-")
            total += int(last) - int(first) + 1
    return total


def pinning_prefetch_under_way(reference: str, cache: Path) -> tuple[list[str], subprocess.Popen]:
    """``prefetch --pin`` of ``reference`` started, once a tenth of its layer is cached
    (or 30 s passed): its command line, and the process, still running."""
    argv = [sys.executable, "-m", "blockstore", "prefetch", reference, "--insecure", "--pin"]
    argv += ["--cache-dir", str(cache)]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and cached_fraction(cache) < 0.1:
            time.sleep(0.1)
    except BaseException:
        process.kill()
        raise
    return argv, process


def test_prefetch_interrupted_then_resumed(fresh_registry, fault_proxy, erofs_images, tmp_path):
    """Prefetch a 64 MiB layer over a slowed link, SIGINT it part way, run it again:
    the second run fetches only what is missing, and the layer ends verified, sealed
    and pinned."""
    proxy = fault_proxy(fresh_registry)
    image = erofs_images.large
    reference = push_erofs(proxy.host, "prefetch/large", "v1", [image.path])
    cache = tmp_path / "cache"
    proxy.fault = Fault("delay", path_contains="/blobs/", method="GET", seconds=0.15)
    argv, first = pinning_prefetch_under_way(reference, cache)
    # The rest waits: on a loaded machine the layer could otherwise be whole before the
    # signal is taken, and there would be nothing left to resume.
    proxy.fault = Fault("delay", path_contains="/blobs/", method="GET", seconds=8)
    try:
        first.send_signal(signal.SIGINT)
        _, err = first.communicate(timeout=30)
    finally:
        first.kill()
    assert first.returncode == 130, err
    part = cached_fraction(cache)
    assert 0.0 < part < 1.0, "the interrupted run should have left part of the layer"

    proxy.fault = None
    before = len(proxy.requests)
    second = blockstore(*argv[3:], timeout=120)
    assert second.returncode == 0, second.stderr
    assert f"{image.digest}" in second.stdout and "verified and sealed, pinned" in second.stdout
    fetched_again = requested_bytes(proxy.requests[before:])
    missing = (1 - part) * image.size
    assert fetched_again <= missing + 8 * 32768, (fetched_again, missing)

    listing = json.loads(blockstore("cache", "ls", "--json", "--cache-dir", str(cache)).stdout)
    (blob,) = listing
    assert blob["sealed"] and blob["pinned"] and blob["cached_fraction"] == 1.0


def test_prefetch_with_the_registry_gone_says_so(
    fresh_registry, fault_proxy, erofs_images, tmp_path
):
    """A prefetch that could not fetch a layer (blob GETs answered 404) leaves the image
    known to the cache; with the registry then gone, the next prefetch falls back to the
    cache, which cannot make the layer whole: it fails as the registry being out of reach
    (exit 5, saying so), not as an offline cache (exit 7), since --offline was never
    given. That is its one line: no warning that it serves the image from the cache,
    which a prefetch never does."""
    proxy = fault_proxy(fresh_registry)
    reference = push_erofs(proxy.host, "prefetch/gone", "v1", [erofs_images.small.path])
    argv = ["prefetch", reference, "--insecure", "--cache-dir", str(tmp_path / "cache")]
    proxy.fault = Fault("status", path_contains="/blobs/", method="GET", status=404)
    assert blockstore(*argv, timeout=60).returncode != 0
    proxy.stop()
    gone = blockstore(*argv, timeout=60)
    assert gone.returncode == 5, gone.stderr
    (line,) = gone.stderr.strip().splitlines()
    assert "layer 0 is not whole in the cache" in line and "offline" not in line
    assert line.startswith("blockstore: ") and "from the cache alone" not in line


def test_prefetch_of_whole_layers_with_the_registry_gone_warns_once(
    fresh_registry, fault_proxy, erofs_images, tmp_path
):
    """With every layer whole in the cache, a prefetch with the registry gone succeeds,
    and its one warning says what happened, as its other messages read (no timestamp,
    no logger): not that it serves the image, which it does not."""
    proxy = fault_proxy(fresh_registry)
    reference = push_erofs(proxy.host, "prefetch/whole", "v1", [erofs_images.small.path])
    argv = ["prefetch", reference, "--insecure", "--cache-dir", str(tmp_path / "cache")]
    assert blockstore(*argv, timeout=60).returncode == 0
    proxy.stop()
    again = blockstore(*argv, timeout=60)
    assert again.returncode == 0, again.stderr
    assert "verified and sealed" in again.stdout
    (line,) = again.stderr.strip().splitlines()
    assert line.startswith("blockstore: warning: ") and line.endswith("were whole in the cache")
    assert "from the cache alone" not in line


def test_a_registry_gone_after_the_image_resolved_exits_as_unreachable(
    registry, fault_proxy, erofs_images, tmp_path
):
    """The manifest comes, then every blob request finds nothing listening (the registry
    stopped between the two; here, a redirect to a closed port): prefetch fails in one
    line saying the registry cannot be reached, with the exit code of an unreachable
    registry (5), not that of a read that could not be served (7)."""
    ref = push_erofs(registry.host, "gone/img", "v1", [erofs_images.small.path])
    proxy = fault_proxy(registry)
    proxy.fault = Fault(
        "redirect", path_contains="/blobs/", method="GET", redirect_to="http://127.0.0.1:1"
    )
    ref = ref.replace(registry.host, proxy.host)
    done = blockstore("prefetch", ref, "--insecure", "--cache-dir", str(tmp_path / "c"))
    assert done.returncode == 5, done.stderr
    assert done.stderr.strip().splitlines() == [
        "blockstore: cannot reach registry 127.0.0.1:1: connection refused"
    ]


@pytest.mark.parametrize("status", [429, 503])
def test_a_registry_failing_every_blob_read_after_the_image_resolved_exits_as_unreachable(
    registry, fault_proxy, erofs_images, tmp_path, status
):
    """Tried: the manifest comes, then every blob request is answered 429 or 503 (a pull
    limit reached, or the registry's storage down behind its gateway), retries and all.
    Must hold: ``prefetch`` exits 5, as it does when the registry answers only that from
    the start, in one line with the registry's answer. Before, the read's own code, 7
    ("a read that could not be served"), as if the cache or the bytes were at fault."""
    ref = push_erofs(registry.host, "limited/img", "v1", [erofs_images.small.path])
    proxy = fault_proxy(registry)
    proxy.fault = Fault("status", status=status, path_contains="/blobs/", method="GET")
    ref = ref.replace(registry.host, proxy.host)
    done = blockstore("prefetch", ref, "--insecure", "--cache-dir", str(tmp_path / "c"))
    assert done.returncode == 5, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert f"HTTP {status}" in line, line


def refusal(code: str) -> bytes:
    return json.dumps({"errors": [{"code": code, "message": "refused"}]}).encode()


@pytest.mark.parametrize(
    ("where", "status", "body"),
    [
        # S3 refusing a HEAD of a URL the registry signed for GET
        ("storage", 403, b"<Error><Code>SignatureDoesNotMatch</Code></Error>"),
        # Harbor's proxy cache: a blob not fetched yet is unknown to a HEAD, fetched on GET
        ("registry", 404, refusal("BLOB_UNKNOWN")),
        # ECR Public, refusing every HEAD of a blob
        ("registry", 403, refusal("DENIED")),
        ("registry", 405, refusal("UNSUPPORTED")),
    ],
    ids=["storage-403", "proxy-cache-404", "registry-403", "registry-405"],
)
def test_a_head_refused_for_a_blob_the_registry_serves_leaves_the_image_usable(
    registry, fault_proxy, erofs_images, tmp_path, where, status, body
):
    """Tried: ``prefetch`` from a registry that serves every blob on GET but refuses its
    HEAD: storage the registry redirects blob requests to answers the HEAD 403
    (``SignatureDoesNotMatch``), or the registry itself answers it 404 (Harbor's proxy
    cache, for a blob it fetches upstream on GET), 403 (ECR Public) or 405. Must hold:
    exit 0, the layer verified and sealed; its size, checked against the manifest's
    before serving, is had from a GET of its first byte. Before, the HEAD that checks
    the size failed the command: "access denied" (exit 4), "not found" or "HTTP 405"
    (exit 3)."""
    ref = push_erofs(registry.host, "headless/img", "v1", [erofs_images.small.path])
    front = fault_proxy(registry)
    head = Fault("status", status=status, method="HEAD", path_contains="/blobs/", body=body)
    if where == "storage":
        storage = fault_proxy(registry, listen="127.0.0.2")
        storage.fault = head
        front.fault = Fault("redirect", path_contains="/blobs/sha256:", redirect_to=storage.url)
    else:
        storage, front.fault = front, head
    ref = ref.replace(registry.host, front.host)
    done = blockstore("prefetch", ref, "--insecure", "--cache-dir", str(tmp_path / "c"))
    assert done.returncode == 0, done.stderr
    assert "verified and sealed" in done.stdout
    assert [r for r in storage.requests if r.method == "HEAD"], "no HEAD was refused"
    assert [r for r in storage.requests if r.headers.get("Range") == "bytes=0-0"]


def test_a_head_saying_no_length_as_zero_leaves_the_image_usable(
    registry, fault_proxy, erofs_images, tmp_path
):
    """Tried: ``prefetch`` through a proxy that answers every blob HEAD with
    ``Content-Length: 0`` (as some reverse proxies write a HEAD's length they dropped).
    Must hold: exit 0, the layer verified and sealed, its size had from a GET of its
    first byte. Before, the open took the 0 for the blob's size and refused the image:
    "the manifest says N bytes, the registry holds 0" (exit 6)."""
    ref = push_erofs(registry.host, "zerohead/img", "v1", [erofs_images.small.path])
    proxy = fault_proxy(registry)
    proxy.fault = Fault(
        "rewrite_headers", method="HEAD", path_contains="/blobs/", headers={"Content-Length": "0"}
    )
    ref = ref.replace(registry.host, proxy.host)
    done = blockstore("prefetch", ref, "--insecure", "--cache-dir", str(tmp_path / "c"))
    assert done.returncode == 0, done.stderr
    assert "verified and sealed" in done.stdout
    assert [r for r in proxy.requests if r.headers.get("Range") == "bytes=0-0"]


def test_credentials_in_a_redirect_url_are_never_shown(
    registry, fault_proxy, erofs_images, tmp_path
):
    """Tried: blob requests redirected to ``http://user:s3cret@127.0.0.1:1/...`` (a URL
    carrying credentials in its user part, to a port nothing listens on), ``prefetch``
    with the debug log on. Must hold: exit 5, the host and port named, and the password
    nowhere in what is printed or logged. Before, the error and the debug log wrote the
    URL's whole network location, ``user:s3cret@127.0.0.1:1``."""
    ref = push_erofs(registry.host, "userinfo/img", "v1", [erofs_images.small.path])
    proxy = fault_proxy(registry)
    proxy.fault = Fault(
        "redirect",
        path_contains="/blobs/",
        method="GET",
        redirect_to="http://user:s3cret@127.0.0.1:1",
    )
    ref = ref.replace(registry.host, proxy.host)
    done = blockstore("-vv", "prefetch", ref, "--insecure", "--cache-dir", str(tmp_path / "c"))
    assert done.returncode == 5, done.stderr
    assert "127.0.0.1:1" in done.stderr
    assert "s3cret" not in done.stderr + done.stdout


def test_a_command_needing_the_registry_through_its_outage_names_the_image_once(
    registry, fault_proxy, erofs_images, tmp_path
):
    """Tried: an image prefetched, then ``index --push`` (which must write to the registry)
    while the registry answers every request 503. Must hold: exit 5, one line naming the
    image once and the registry's answer. Before, the line named the image twice
    ("REF: image REF: HTTP 503 ...")."""
    ref = push_erofs(registry.host, "outage/img", "v1", [erofs_images.small.path])
    proxy = fault_proxy(registry)
    ref = ref.replace(registry.host, proxy.host)
    where = ["--insecure", "--cache-dir", str(tmp_path / "c")]
    assert blockstore("prefetch", ref, *where).returncode == 0
    proxy.fault = Fault("status", status=503)
    done = blockstore("index", ref, "--push", *where)
    assert done.returncode == 5, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.count("outage/img:v1") == 1 and "HTTP 503" in line, line


def test_an_image_of_an_index_is_pinned_by_the_index_digest(registry, pushed_images, tmp_path):
    """Tried: ``prefetch`` of a multi-platform image by tag, then ``cache unpin`` and
    ``cache pin`` of ``REPO@DIGEST`` with the index's digest (docker's RepoDigest of such
    an image, which ``inspect`` shows as its index). Must hold: both find the image and
    its layer. Before, only the platform manifest's digest was matched: the index's
    was "no image in the cache" (exit 3)."""
    where = ["--cache-dir", str(tmp_path)]
    assert blockstore("prefetch", pushed_images.index, "--insecure", *where).returncode == 0
    shown = json.loads(blockstore("inspect", pushed_images.index, "--json", "--insecure").stdout)
    repository = pushed_images.index.rsplit(":", 1)[0]
    named = f"{repository}@{shown['indexDigest']}"
    unpinned = blockstore("cache", "unpin", named, *where)
    assert unpinned.returncode == 0, unpinned.stderr
    pinned = blockstore("cache", "pin", named, "--json", *where)
    assert pinned.returncode == 0, pinned.stderr
    assert len(json.loads(pinned.stdout)["pinned"]) == 1


PIDS_CGROUP = Path("/sys/fs/cgroup/pids")


@pytest.mark.skipif(
    not (PIDS_CGROUP / "cgroup.procs").exists() or os.geteuid() != 0,
    reason="needs root and a cgroup v1 pids controller to limit the process's threads",
)
@pytest.mark.parametrize(("most", "code"), [(3, 14), (10, 0)])
def test_prefetch_at_a_thread_limit_seals_or_says_so_in_one_line(
    registry, pushed_images, tmp_path, most, code
):
    """Tried: prefetch in a cgroup that allows ``most`` threads (a container's or a
    service's task limit): 3, too few to fetch at all; 10, fewer than its fetch
    workers, sealer and store threads would take. Must hold: with 3, one line naming
    the cause and exit 14, no traceback; with 10, the layer fetched on the threads it
    has, verified and sealed. Before, both ended in tracebacks, or a fetch job queued
    for a worker that never started."""
    group = PIDS_CGROUP / f"blockstore-test-{os.getpid()}-{most}"
    group.mkdir()
    try:
        (group / "pids.max").write_text(f"{most}\n")
        cache = tmp_path / "cache"
        done = subprocess.run(
            [
                "sh",
                "-c",
                f'echo $$ > {group}/cgroup.procs && exec "$@"',
                "sh",
                sys.executable,
                "-m",
                "blockstore",
                "prefetch",
                pushed_images.large,
                "--insecure",
                "--cache-dir",
                str(cache),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        group.rmdir()
    assert done.returncode == code, done.stderr
    assert "Traceback" not in done.stderr
    if code:
        assert done.stderr.count("\n") == 1 and "out of threads" in done.stderr, done.stderr
    else:
        assert "verified and sealed" in done.stdout
        assert blockstore("cache", "verify", "--cache-dir", str(cache)).returncode == 0


def test_unpinning_an_image_keeps_the_layers_a_pinned_image_shares(
    registry, erofs_images, tmp_path
):
    """Tried: ``prefetch --pin`` of an image of layers S and L, then of an image of S
    alone, then ``cache unpin`` of the second, then of the first. Must hold: the first
    unpin keeps S pinned, saying the other pinned image uses it; the second unpins S
    and L. Before, the first unpin let S go, and gc could evict a layer of an image
    pinned for offline use."""
    small, large = erofs_images.small, erofs_images.large
    both = push_erofs(registry.host, "pins/both", "v1", [small.path, large.path])
    alone = push_erofs(registry.host, "pins/alone", "v1", [small.path])
    cache = str(tmp_path / "cache")
    for reference in (both, alone):
        done = blockstore("prefetch", reference, "--insecure", "--pin", "--cache-dir", cache)
        assert done.returncode == 0, done.stderr

    def pinned() -> dict[str, bool]:
        listing = blockstore("cache", "ls", "--json", "--cache-dir", cache, check=True)
        return {blob["digest"]: blob["pinned"] for blob in json.loads(listing.stdout)}

    first = blockstore("cache", "unpin", alone, "--cache-dir", cache)
    assert first.returncode == 0, first.stderr
    assert f"kept pinned {small.digest}: pinned image" in first.stdout
    assert pinned() == {small.digest: True, large.digest: True}
    second = blockstore("cache", "unpin", both, "--cache-dir", cache)
    assert second.returncode == 0, second.stderr
    assert pinned() == {small.digest: False, large.digest: False}


def test_an_image_an_older_version_pinned_keeps_its_layers_when_another_is_unpinned(
    registry, erofs_images, tmp_path
):
    """Tried: an image of layers S and L and an image of S alone, both pinned by a
    version of format 4 that kept no mark of an image pinned as a whole (records
    without one), then `cache unpin` of the second by this version. Must hold: S stays
    pinned, the first image named as pinned: the upgrade of the cache takes an image
    all of whose layers are pinned for one pinned as a whole. Before, S was unpinned,
    and gc could evict a layer of the image pinned for offline use."""
    import lmdb

    from blockstore.cache.layout import ALL_DBS, DB_META, DB_REFS, U64

    small, large = erofs_images.small, erofs_images.large
    both = push_erofs(registry.host, "oldpins/both", "v1", [small.path, large.path])
    alone = push_erofs(registry.host, "oldpins/alone", "v1", [small.path])
    cache = tmp_path / "cache"
    for reference in (both, alone):
        done = blockstore("prefetch", reference, "--insecure", "--pin", "--cache-dir", str(cache))
        assert done.returncode == 0, done.stderr
    env = lmdb.open(str(cache), max_dbs=len(ALL_DBS))
    with env.begin(write=True) as txn:
        refs = env.open_db(DB_REFS, txn=txn)
        for key, raw in list(txn.cursor(db=refs)):
            record = json.loads(raw)
            record.pop("pinned", None)
            txn.put(key, json.dumps(record, sort_keys=True).encode(), db=refs)
        txn.put(b"format", U64.pack(4), db=env.open_db(DB_META, txn=txn))
    env.close()
    unpinned = blockstore("cache", "unpin", alone, "--cache-dir", str(cache))
    assert unpinned.returncode == 0, unpinned.stderr
    assert f"kept pinned {small.digest}: pinned image" in unpinned.stdout, unpinned.stdout
    listing = blockstore("cache", "ls", "--json", "--cache-dir", str(cache), check=True)
    pinned = {blob["digest"]: blob["pinned"] for blob in json.loads(listing.stdout)}
    assert pinned == {small.digest: True, large.digest: True}


def test_unpinning_an_image_one_of_whose_layers_was_removed_unpins_the_rest(
    registry, erofs_images, tmp_path
):
    """Tried: ``prefetch --pin`` of an image of layers S and L, ``cache rm`` of S by its
    digest (the image's record stays), then ``cache unpin`` of the image. Must hold:
    exit 0, L unpinned and S said not pinned, as for any layer that was not. Before,
    it failed with "S is not in the cache" (exit 8, the code of a cache that cannot be
    written) once the image was marked unpinned, L left pinned if it came after S."""
    small, large = erofs_images.small, erofs_images.large
    reference = push_erofs(registry.host, "pins/removed", "v1", [small.path, large.path])
    cache = str(tmp_path / "cache")
    done = blockstore("prefetch", reference, "--insecure", "--pin", "--cache-dir", cache,
                      timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    removed = blockstore("cache", "rm", small.digest, "--cache-dir", cache)
    assert removed.returncode == 0, removed.stderr

    unpinned = blockstore("cache", "unpin", reference, "--cache-dir", cache)

    assert unpinned.returncode == 0, unpinned.stderr
    assert f"unpinned {large.digest}" in unpinned.stdout, unpinned.stdout
    assert f"was not pinned {small.digest}" in unpinned.stdout, unpinned.stdout
    listing = blockstore("cache", "ls", "--json", "--cache-dir", cache, check=True)
    assert {b["digest"]: b["pinned"] for b in json.loads(listing.stdout)} == {large.digest: False}


def test_a_prefetch_pin_undone_meanwhile_by_cache_rm_is_not_called_pinned(
    fresh_registry, fault_proxy, erofs_images, tmp_path
):
    """Tried: ``prefetch --pin`` of a 64 MiB layer over a slowed link, and ``cache rm``
    of the image while it runs. Must hold: the prefetch does not say the layer is
    sealed and pinned: it exits 8 saying another process undid it, and to run it
    again; a second prefetch then pins it. Before, it said "verified and sealed,
    pinned" (exit 0) of a layer neither pinned nor findable by its image offline."""
    proxy = fault_proxy(fresh_registry)
    image = erofs_images.large
    reference = push_erofs(proxy.host, "prefetch/undone", "v1", [image.path])
    cache = tmp_path / "cache"
    proxy.fault = Fault("pace", path_contains="/blobs/", method="GET", seconds=0.005)
    argv, first = pinning_prefetch_under_way(reference, cache)
    # The rest waits until the removal is done: on a loaded machine the prefetch could
    # otherwise end before ``cache rm`` has started, and there would be nothing to undo.
    proxy.fault = Fault("delay", path_contains="/blobs/", method="GET", seconds=8)
    try:
        removed = blockstore("cache", "rm", reference, "--cache-dir", str(cache))
        assert removed.returncode == 0, removed.stderr
        proxy.fault = None
        out, err = first.communicate(timeout=120)
    finally:
        first.kill()
    assert first.returncode == 8, (out, err)
    assert "by another process while it was prefetched" in err and "pinned" not in out
    again = blockstore(*argv[3:], timeout=120)
    assert again.returncode == 0, again.stderr
    assert "verified and sealed, pinned" in again.stdout


@pytest.mark.parametrize("command", ["prefetch", "serve", "index"])
@pytest.mark.parametrize("select", [["--layer", "5"], ["--blob", "sha256:" + "0" * 64]])
def test_a_first_command_naming_a_layer_the_image_lacks_leaves_no_cache(
    pushed_images, tmp_path: Path, command: str, select: list[str]
):
    """Tried: with no cache yet, ``prefetch``, ``serve`` and ``index`` of an image with one
    layer, naming a layer it does not have (``--layer 5``, or a digest not among its
    layers). Must hold: exit 3 naming the layers it has, and no cache directory left, as
    for an image the registry does not know. Before, the cache made to open the image
    stayed, with its LMDB files."""
    cache = tmp_path / "parent" / "cache"
    where = ["--listen", "127.0.0.1:0"] if command == "serve" else []
    done = blockstore(
        command,
        pushed_images.small,
        "--insecure",
        *select,
        *where,
        "--cache-dir",
        str(cache),
        timeout=60,
    )
    assert done.returncode == 3, done.stderr
    assert done.stderr.startswith("blockstore: image ") and "has no layer" in done.stderr
    assert list(tmp_path.iterdir()) == [], list(tmp_path.rglob("*"))


@pytest.mark.parametrize("command", ["prefetch", "serve", "index"])
def test_a_mistyped_blob_digest_is_refused_before_the_registry(tmp_path: Path, command: str):
    """Tried: ``--blob sha256:abc`` (a digest cut short) for an image on a registry that
    cannot be reached. Must hold: exit 2 naming ``--blob`` and the digest, as any usage
    error, and no cache made. Before, the registry was asked first and its being out of
    reach (exit 5) was said instead: the mistake showed only once it was back."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]  # nothing listens there once the probe is closed
    image = f"127.0.0.1:{closed}/app:v1"
    cache = tmp_path / "cache"
    done = blockstore(
        command, image, "--insecure", "--blob", "sha256:abc", "--cache-dir", str(cache), timeout=60
    )
    assert done.returncode == 2, done.stderr
    assert f"blockstore {command}: error: argument --blob: invalid digest 'sha256:abc'" in (
        done.stderr
    )
    assert done.stderr.count("\n") == 1
    assert not cache.exists()


def test_a_sealed_layer_prefetched_again_where_it_no_longer_fits_is_not_called_sealed(
    pushed_images, erofs_images, tmp_path
):
    """Tried: the large image prefetched with ``--pin`` (64 MiB pinned) and the small one
    (3.4 MiB) prefetched, sealed; ``cache gc --cache-size 4M`` evicts the small one, which
    stays sealed; then ``prefetch`` of the small one again: it fits the 4 MiB cap, but the
    pins leave the unpinned layers only a quarter of it. Must hold: the prefetch does not
    say "verified and sealed" of a layer it could not keep whole: it exits 8 saying so,
    and ``cache ls`` agrees. Before, the seal it had once was taken for its being whole:
    exit 0, "verified and sealed", with about a third of it cached, and an offline read
    of the rest failed."""
    cache = str(tmp_path / "cache")
    pinned = blockstore("prefetch", pushed_images.large, "--insecure", "--pin", "--cache-dir",
                        cache, timeout=120)  # fmt: skip
    assert pinned.returncode == 0, pinned.stderr
    first = blockstore("prefetch", pushed_images.small, "--insecure", "--cache-dir", cache)
    assert first.returncode == 0, first.stderr
    gc = blockstore("cache", "gc", "--cache-size", "4M", "--cache-dir", cache)
    assert gc.returncode == 0, gc.stderr
    again = blockstore("prefetch", pushed_images.small, "--insecure", "--cache-dir", cache)
    listing = blockstore("cache", "ls", "--json", "--cache-dir", cache, check=True)
    small = {b["digest"]: b for b in json.loads(listing.stdout)}[erofs_images.small.digest]
    assert small["cached_fraction"] < 1.0, small
    assert again.returncode == 8, (again.stdout, again.stderr)
    assert "verified and sealed" not in again.stdout
    assert "could not be kept whole in the cache" in again.stderr, again.stderr


def test_a_prefetch_refused_over_the_cap_records_nothing_and_makes_no_cache(
    pushed_images, erofs_images, tmp_path
):
    """Tried: with no cache yet, ``prefetch`` of the 64 MiB image under ``--cache-size
    4M``; then the small image prefetched there, the large one's prefetch refused again,
    and ``cache pin`` of the large image. Must hold: each refusal exits 8 saying the
    layer is larger than the cap; the first leaves no cache directory, as any first
    command that fails; the second records nothing, so ``cache pin`` finds no such image
    (exit 3) and ``cache ls`` lists the small layer alone. Before, the refused prefetch
    kept the image's record (and a new cache), and ``cache pin`` said "pinned" of a
    layer of which nothing was cached."""
    cache = tmp_path / "parent" / "cache"
    options = ["--insecure", "--cache-size", "4M", "--cache-dir", str(cache)]

    first = blockstore("prefetch", pushed_images.large, *options, timeout=60)

    assert first.returncode == 8, first.stderr
    assert (
        "is larger than the 3.6 MiB eviction keeps the cache to under its 4.0 MiB cap"
        in first.stderr
    ), first.stderr
    assert list(tmp_path.iterdir()) == [], list(tmp_path.rglob("*"))
    small = blockstore("prefetch", pushed_images.small, *options, timeout=60)
    assert small.returncode == 0, small.stderr
    again = blockstore("prefetch", pushed_images.large, *options, timeout=60)
    assert again.returncode == 8, again.stderr
    pinned = blockstore("cache", "pin", pushed_images.large, "--cache-dir", str(cache))
    assert pinned.returncode == 3, pinned.stdout + pinned.stderr
    assert "pinned" not in pinned.stdout
    listing = blockstore("cache", "ls", "--json", "--cache-dir", str(cache), check=True)
    assert [b["digest"] for b in json.loads(listing.stdout)] == [erofs_images.small.digest]


def test_two_prefetches_that_fit_the_cap_only_one_at_a_time_both_seal(
    fresh_registry, fault_proxy, tmp_path
):
    """Tried: two images of one 3 MiB layer each, prefetched at once into one cache
    capped at 3500 KiB (each fits, both do not) over a slowed link, so their stores
    interleave. Must hold: both exit 0, "verified and sealed", as when run one after
    the other: a prefetch whose layer lost chunks to the other's fills its next round
    in turn, once the other's layer is sealed. Before, each evicted the other's chunks
    as it stored its own, and both failed (exit 8) saying their layer could not be
    kept whole."""
    proxy = fault_proxy(fresh_registry)
    references = []
    for name in ("one", "two"):
        tree = tmp_path / name
        tree.mkdir()
        (tree / "data").write_bytes(random.Random(name).randbytes(3 << 20))
        image = build_erofs(tree, tmp_path / f"{name}.erofs")
        references.append(push_erofs(proxy.host, f"turns/{name}", "v1", [image.path]))
    proxy.fault = Fault("pace", path_contains="/blobs/", method="GET", seconds=0.01)
    cache = str(tmp_path / "cache")
    options = ["--insecure", "--cache-size", "3500K", "--cache-dir", cache]
    prefetches = [
        subprocess.Popen(
            [sys.executable, "-m", "blockstore", "prefetch", reference, *options],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for reference in references
    ]
    try:
        done = [process.communicate(timeout=120) for process in prefetches]
    finally:
        for process in prefetches:
            process.kill()
    for process, (out, err) in zip(prefetches, done, strict=True):
        assert process.returncode == 0, err
        assert "verified and sealed" in out, out


def test_pinning_an_image_whose_layer_is_not_cached_says_so(registry, erofs_images, tmp_path):
    """Tried: ``prefetch`` of an image of layers S and L, ``cache rm`` of L by its digest
    (the image's record stays), then ``cache pin`` of the image. Must hold: exit 0; S is
    said pinned; L is said pinned with none of it cached, the rest kept once fetched
    (``not_whole`` in ``--json``); ``cache ls`` agrees: L pinned at 0%. Before, both
    were said "pinned" alike, as if the image were cached whole for offline use."""
    small, large = erofs_images.small, erofs_images.large
    reference = push_erofs(registry.host, "pins/uncached", "v1", [small.path, large.path])
    cache = str(tmp_path / "cache")
    done = blockstore("prefetch", reference, "--insecure", "--cache-dir", cache, timeout=120)
    assert done.returncode == 0, done.stderr
    assert blockstore("cache", "rm", large.digest, "--cache-dir", cache).returncode == 0

    pinned = blockstore("cache", "pin", reference, "--cache-dir", cache)
    as_json = blockstore("cache", "pin", reference, "--json", "--cache-dir", cache)

    assert pinned.returncode == 0, pinned.stderr
    lines = pinned.stdout.splitlines()
    assert f"pinned {small.digest}" in lines, lines
    assert f"pinned {large.digest}: none of it is cached yet (kept once fetched)" in lines
    assert json.loads(as_json.stdout)["not_whole"] == [large.digest]
    listing = blockstore("cache", "ls", "--json", "--cache-dir", cache, check=True)
    blobs = {b["digest"]: (b["pinned"], b["cached_fraction"]) for b in json.loads(listing.stdout)}
    assert blobs[large.digest] == (True, 0.0), blobs


def test_pinning_a_gzip_layer_whose_tar_is_whole_says_it_whole(registry, tmp_path):
    """Tried: ``prefetch`` of a tar+gzip image (1.4 MiB of random bytes) under a 2 MiB
    cap, which seals the tar while its compressed blob's chunks are evicted for it; then
    ``cache pin --json`` of the image. Must hold: exit 0, nothing in ``not_whole``: the
    layer is read from its tar, whole, as an offline open reads it back. Before, the
    compressed blob was said not whole ("23.9% of it is cached") though nothing of the
    layer was missing."""
    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w") as archive:
        content = random.Random(3).randbytes(1_500_000)
        entry = tarfile.TarInfo("f")
        entry.size = len(content)
        archive.addfile(entry, io.BytesIO(content))
    layer = tmp_path / "layer.tar.gz"
    layer.write_bytes(gzip.compress(tar.getvalue()))
    media_type = "application/vnd.oci.image.layer.v1.tar+gzip"
    reference = push_erofs(registry.host, "pins/gzip", "v1", [layer], media_type=media_type)
    cache = tmp_path / "cache"
    options = ["--insecure", "--cache-size", "2M", "--cache-dir", str(cache)]
    done = blockstore("prefetch", reference, *options, timeout=120)
    assert done.returncode == 0, done.stderr

    pinned = blockstore("cache", "pin", reference, "--json", "--cache-dir", str(cache))

    assert pinned.returncode == 0, pinned.stderr
    report = json.loads(pinned.stdout)
    assert len(report["pinned"]) == 2 and report["not_whole"] == [], report
    image = open_image(reference, cache_dir=cache, offline=True)
    try:
        (export,) = image.exports()
        start = export.index.tar_start
        assert bytes(b"".join(export.read(start, len(tar.getvalue())))) == tar.getvalue()
    finally:
        image.close()


def test_a_prefetch_with_nothing_to_fetch_does_not_wait_for_one_filling_alone(
    pushed_images, tmp_path
):
    """Tried: the small image prefetched whole; then a process holding the cache's
    prefetch turn alone (as a prefetch whose layer lost chunks fills its next rounds);
    then the small image prefetched again. Must hold: the second
    prefetch, which has nothing to fetch or store, exits 0 at once saying its layer
    verified and sealed, without waiting for the turn. Before, it waited for the other
    prefetch to end, up to five minutes, to do nothing."""
    cache = tmp_path / "cache"
    options = ["--insecure", "--cache-dir", str(cache)]
    assert blockstore("prefetch", pushed_images.small, *options, timeout=60).returncode == 0
    with turn_held(cache, alone=True):
        again = blockstore("prefetch", pushed_images.small, *options, timeout=30)
    assert again.returncode == 0, again.stderr
    assert "verified and sealed" in again.stdout
    assert "waiting for" not in again.stderr


def test_a_fill_waits_for_a_prefetch_filling_alone(pushed_images, registry, tmp_path):
    """Tried: a process holding the cache's prefetch turn alone (as a prefetch whose
    layer lost chunks fills its next rounds); the large image opened with fill, as
    ``serve --fill`` opens it, and read at its start; 3 s later the turn let go. Must
    hold: the read is served at once; the fill fetches nothing while the turn is held
    alone, then fills the layer whole and seals it. Before, the fill took no turn: it
    filled beside the prefetch filling alone, evicting what that prefetch stored."""
    cache = tmp_path / "cache"
    cache.mkdir()
    with turn_held(cache, alone=True) as holder:
        image = open_image(
            pushed_images.large,
            cache_dir=cache,
            options=registry.options(),
            prefetch=PrefetchSettings(readahead=False, fill=True),
        )
        try:
            (export,) = image.exports()
            started = time.monotonic()
            assert b"".join(bytes(b) for b in export.read(0, 4096))
            assert time.monotonic() - started < 2
            time.sleep(3)
            held = cached_fraction(cache)
            holder.let_go()
            assert wait_for(lambda: cached_fraction(cache) == 1.0, 60)
            assert wait_for(lambda: sealed(cache), 30)
        finally:
            image.close()
    assert held < 0.5, held


def sealed(cache: Path) -> bool:
    listing = blockstore("cache", "ls", "--json", "--cache-dir", str(cache), check=True)
    return all(blob["sealed"] for blob in json.loads(listing.stdout))


def test_a_registry_lying_that_a_layer_is_16_tib_fails_a_pinned_prefetch_early(
    registry, pushed_images, fault_proxy, tmp_path
):
    """Tried: a registry (through a proxy) whose manifest and HEAD both say the one layer
    is 16 TiB, then `prefetch --pin`, with 2 GiB of address space. Must hold: refused in
    one line within seconds (exit 8), saying the layer does not fit on the cache's disk,
    in bounded memory (no list of the 512M chunks of such a size is built); nothing of
    the layer fetched, no cache left with the lie pinned in it. Before, the prefetch
    pinned it, then built a list of every missing chunk to judge the disk's room:
    out of memory (exit 14), gigabytes later, with a cache holding the pin."""
    from blockstore.registry.mediatypes import OCI_MANIFEST

    lie = 16 << 40
    with registry.client() as client:
        manifest = json.loads(client.get_manifest("fixtures/small", "v1").raw)
    layer = manifest["layers"][0]
    layer["size"] = lie
    proxy = fault_proxy(registry)
    proxy.fault = Fault.document(manifest, OCI_MANIFEST, path_contains="/manifests/")
    head = Fault("rewrite_headers", method="HEAD", headers={"Content-Length": str(lie)})
    head.path_contains = f"/blobs/{layer['digest']}"
    proxy.more_faults = [head]
    image = f"{proxy.host}/fixtures/small:v1"
    command = [sys.executable, "-m", "blockstore", "prefetch", "--pin", image, "--insecure"]
    process = subprocess.Popen(
        [*command, "--cache-dir", str(tmp_path / "cache")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30)),
    )
    started = time.monotonic()
    _, stderr = process.communicate(timeout=120)
    took = time.monotonic() - started
    assert process.returncode == 8, stderr
    (line,) = stderr.splitlines()
    assert "needs about 18.0 TiB more" in line and "the disk holding it has room" in line
    assert "nothing was fetched or pinned" in line, line
    assert took < 30, took
    assert not [r for r in proxy.requests if r.method == "GET" and layer["digest"] in r.path]
    assert not (tmp_path / "cache").exists()


def test_quiet_silences_the_success_lines_of_every_command(pushed_images, tmp_path):
    """Tried: ``blockstore -q`` before each command that acts and says what it did:
    ``prefetch``, ``index``, ``cache pin|unpin|gc|verify|compact|rm``, ``trace
    import|export|rm``. Must hold: each succeeds with nothing on stdout, as ``-q mount``
    and ``-q umount`` print nothing; what was asked to be shown (``--json``) still is.
    Before, prefetch printed its "verified and sealed" line per layer and the others
    their reports."""
    cache = ["--cache-dir", str(tmp_path / "cache")]
    digest = "sha256:" + "a" * 64
    traces = tmp_path / "traces.json"
    traces.write_bytes(traces_document([]))
    commands = [
        ["prefetch", pushed_images.small, "--insecure", *cache],
        ["index", pushed_images.small, "--insecure", *cache],
        ["cache", "pin", pushed_images.small, *cache],
        ["cache", "unpin", pushed_images.small, *cache],
        ["cache", "gc", *cache],
        ["cache", "verify", *cache],
        ["cache", "compact", *cache],
        ["trace", "import", str(traces), *cache],
        ["cache", "rm", pushed_images.small, *cache],
    ]
    for argv in commands:
        done = blockstore("-q", *argv, timeout=120)
        assert (done.returncode, done.stdout, done.stderr) == (0, "", ""), argv
    with ChunkStore(tmp_path / "cache") as store:
        TraceShelf(store).put(Trace(digest, 4096, 1.0, [(0, 1, 1)]))
    for argv in (["trace", "export", digest, str(traces)], ["trace", "rm", digest]):
        done = blockstore("-q", *argv, *cache, timeout=60)
        assert (done.returncode, done.stdout, done.stderr) == (0, "", ""), argv
    shown = blockstore("-q", "cache", "gc", "--json", *cache, timeout=60)
    assert json.loads(shown.stdout)["evicted_chunks"] == 0
