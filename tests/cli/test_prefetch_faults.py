"""``blockstore prefetch`` against registries that fail part of an image."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from rig.fault_proxy import Fault
from rig.prefetching import blockstore, first_blob
from rig.pushed import push_erofs
from rig.waiting import wait_for


def sealed_digests(cache: Path) -> set[str]:
    listing = blockstore("cache", "ls", "--json", "--cache-dir", str(cache), check=True)
    return {blob["digest"] for blob in json.loads(listing.stdout) if blob["sealed"]}


def test_a_layer_whose_bytes_fail_its_digest_leaves_the_others_prefetched(
    fresh_registry, fault_proxy, erofs_images, tmp_path
):
    """Tried: ``prefetch`` of a three-layer image whose first layer's every GET has one
    byte flipped on the way. Must hold: that layer is dropped, the two after it verified
    and sealed; exit 6 (integrity) naming layer 0 and saying the others were sealed.
    Before, the prefetch stopped at layer 0, leaving the two after it unfetched."""
    proxy = fault_proxy(fresh_registry)
    layers = erofs_images.layers
    reference = push_erofs(proxy.host, "prefetch/altered", "v1", [x.path for x in layers])
    cache = tmp_path / "cache"
    proxy.fault = Fault("corrupt", path_contains=layers[0].digest, method="GET", after_bytes=1000)

    got = blockstore("prefetch", reference, "--insecure", "--cache-dir", str(cache), timeout=120)

    assert got.returncode == 6, got.stderr
    last = got.stderr.strip().splitlines()[-1]
    assert last.startswith("blockstore: layer 0: ") and "do not match the digest" in last, last
    assert "the other 2 layer(s) were verified and sealed" in last, last
    assert sealed_digests(cache) == {layers[1].digest, layers[2].digest}


def ranges_asked(requests) -> list[tuple[int, int]]:
    """The byte spans of the Range headers among ``requests``."""
    spans = []
    for request in requests:
        first, _, last = request.headers.get("Range", "").removeprefix("bytes=").partition("-")
        if first.isdigit() and last.isdigit():
            spans.append((int(first), int(last)))
    return spans


@pytest.mark.parametrize("method", ["GET", None], ids=["get", "head-and-get"])
def test_a_layer_missing_from_the_registry_leaves_the_others_prefetched(
    fresh_registry, fault_proxy, erofs_images, tmp_path, method
):
    """Tried: ``prefetch`` of a three-layer image whose middle layer's blob the registry
    answers 404, on its GETs alone (its HEAD still giving its size, as a registry that
    lost the blob's bytes but not its record does) or on every request. Must hold: the
    first and the last layer are verified and sealed; the command fails with exit 3 (not
    found), in one line naming layer 1; a rerun once the blob is back fetches layer 1
    alone. Before, the prefetch stopped at layer 1, leaving layer 2 unfetched, and a
    404 under a read ended it with exit 7, as if a read had met an offline cache."""
    proxy = fault_proxy(fresh_registry)
    layers = erofs_images.layers
    reference = push_erofs(proxy.host, "prefetch/missing", "v1", [x.path for x in layers])
    cache = tmp_path / "cache"
    argv = ["prefetch", reference, "--insecure", "--cache-dir", str(cache)]
    proxy.fault = Fault("status", path_contains=layers[1].digest, method=method, status=404)

    got = blockstore(*argv, timeout=120)

    assert got.returncode == 3, got.stderr
    (line,) = got.stderr.strip().splitlines()
    assert "layer 1:" in line and "not found" in line and layers[1].digest in line, line
    assert sealed_digests(cache) == {layers[0].digest, layers[2].digest}
    assert f"layer 2 {layers[2].digest}" in got.stdout

    proxy.fault = None
    before = len(proxy.requests)
    again = blockstore(*argv, timeout=120)
    assert again.returncode == 0, again.stderr
    assert sealed_digests(cache) == {x.digest for x in layers}
    ranged = [r.path for r in proxy.requests[before:] if "Range" in r.headers]
    assert ranged and all(layers[1].digest in path for path in ranged), ranged


@pytest.mark.parametrize(
    "fault",
    [
        Fault("pace", path_contains="/blobs/", method="GET", seconds=0.1),
        Fault("reset", path_contains="/blobs/", method="GET", after_bytes=100_000),
        Fault("truncate", path_contains="/blobs/", method="GET", after_bytes=100_000),
    ],
    ids=["slower-than-the-timeout", "reset-mid-body", "shorter-than-its-length"],
)
def test_a_registry_failing_mid_body_ends_a_prefetch_as_out_of_reach(
    registry, pushed_images, fault_proxy, tmp_path, fault
):
    """Tried: ``prefetch --timeout 2`` of the 64 MiB image from a registry whose blob
    bodies come at 32 KiB a tenth of a second (a range of its first request takes 6 s),
    or are reset after 100 kB, or end there, short of their Content-Length, every
    attempt. Must hold: exit 5 (the registry out of reach, as README says of a read
    still unanswered at its timeout), in one line; what came is kept, `cache verify`
    finds it clean, and a rerun from a sound registry seals the layer, asking for
    exactly the bytes that were missing. Before, it exited 7, the code of a read that
    met an offline cache: a body that broke off or outlasted the timeout was taken for
    no fault of the registry."""
    proxy = fault_proxy(registry)
    proxy.fault = fault
    reference = pushed_images.large.replace(registry.host, proxy.host)
    cache = tmp_path / "cache"
    argv = ["prefetch", reference, "--insecure", "--timeout", "2", "--cache-dir", str(cache)]

    got = blockstore(*argv, timeout=120)

    assert got.returncode == 5, got.stderr
    (line,) = got.stderr.strip().splitlines()
    # The layer's read names the image; on a loaded machine the deadline may run out in
    # the retries' pauses first, which names the registry.
    named = "fixtures/large" in line or f"cannot reach registry {proxy.host}" in line
    assert line.startswith("blockstore: ") and named, line
    verify = blockstore("cache", "verify", "--cache-dir", str(cache))
    assert verify.returncode == 0, verify.stdout + verify.stderr
    (blob,) = json.loads(blockstore("cache", "ls", "--json", "--cache-dir", str(cache)).stdout)
    proxy.fault = None
    before = len(proxy.requests)
    again = blockstore(*argv, timeout=120)
    assert again.returncode == 0, again.stderr
    assert "verified and sealed" in again.stdout
    asked = sum(last - first + 1 for first, last in ranges_asked(proxy.requests[before:]))
    assert asked == blob["size"] - blob["cached_bytes"], (asked, blob)


def test_a_reply_of_another_range_is_refused_naming_the_blob_and_registry(
    registry, pushed_images, fault_proxy, tmp_path
):
    """Tried: ``prefetch --timeout 5`` from a registry that answers every range read of a
    blob 206 with a ``Content-Range`` one byte past the span asked. Must hold: no byte is
    kept (`cache verify` finds nothing); exit 3, the registry's answer refused, in one
    line naming the blob, the registry and repository, and what was sent. Before, it
    exited 7, as a read that met an offline cache, saying only "asked for bytes
    0-2097151 of 3579904, the registry sent 'bytes 1-2097152/3579904'": no blob, no
    registry."""
    proxy = fault_proxy(registry)
    proxy.fault = Fault("bad_range", path_contains="/blobs/", method="GET")
    reference = pushed_images.small.replace(registry.host, proxy.host)
    cache = tmp_path / "cache"
    argv = ["prefetch", reference, "--insecure", "--timeout", "5", "--cache-dir", str(cache)]

    got = blockstore(*argv, timeout=120)

    assert got.returncode == 3, got.stderr
    (line,) = got.stderr.strip().splitlines()
    assert f"of {proxy.host}/fixtures/small: asked for bytes 0-" in line, line
    assert "blob sha256:" in line and "the registry sent 'bytes 1-" in line, line
    verify = blockstore("cache", "verify", "--cache-dir", str(cache))
    assert verify.returncode == 0 and "checked 0 chunks" in verify.stdout, verify.stdout


def test_a_prefetch_beside_a_server_reading_the_same_image_fetches_each_byte_once(
    registry, pushed_images, erofs_images, fault_proxy, tmp_path
):
    """Tried: ``serve`` of the 64 MiB image read whole by ``nbdcopy`` while ``prefetch``
    of the same image fills the same cache, both started together over a link pacing
    each 32 KiB. Must hold: both succeed, the copy is the image byte for byte, the
    registry is asked for each byte once in all (no two ranges overlap), the layer is
    sealed once, and the cache counts it once: as many chunks stored and bytes fetched
    as the layer has."""
    proxy = fault_proxy(registry)
    proxy.fault = Fault("pace", path_contains="/blobs/", method="GET", seconds=0.005)
    image = erofs_images.large
    reference = pushed_images.large.replace(registry.host, proxy.host)
    cache, sock = tmp_path / "cache", tmp_path / "serve.sock"
    common = [reference, "--insecure", "--cache-dir", str(cache)]
    argv = [sys.executable, "-m", "blockstore"]
    server = subprocess.Popen(
        [*argv, "serve", *common, "--unix", str(sock)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert wait_for(lambda: server.stdout.readline().strip() == "ready", 30)
        prefetch = subprocess.Popen(
            [*argv, "prefetch", *common], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        copy = subprocess.run(
            ["nbdcopy", f"nbd+unix:///?socket={sock}", str(tmp_path / "copy")],
            capture_output=True,
            text=True,
            timeout=120,
        )
        out, err = prefetch.communicate(timeout=120)
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=20) == 0, server.stderr.read()
    finally:
        server.kill()
        server.wait()
        server.stdout.close()
        server.stderr.close()
    assert prefetch.returncode == 0 and "verified and sealed" in out, err
    assert copy.returncode == 0, copy.stderr
    assert (tmp_path / "copy").read_bytes() == image.path.read_bytes()
    covered = 0
    for first, last in sorted(ranges_asked(proxy.requests)):
        assert first >= covered, f"bytes from {first} asked twice"
        covered = last + 1
    assert sum(last - first + 1 for first, last in ranges_asked(proxy.requests)) == image.size
    stats = json.loads(blockstore("cache", "stats", "--json", "--cache-dir", str(cache)).stdout)
    assert stats["seals"] == 1 and stats["sealed_blobs"] == 1, stats
    assert stats["bytes_fetched"] == stats["stored_bytes"] == image.size, stats
    assert stats["chunks"] == -(-image.size // 32768), stats


EXPIRED_URL = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
    b"<Message>Request has expired</Message></Error>"
)


def cached_fraction(cache: Path) -> float:
    return first_blob(cache, "cached_fraction") or 0.0


@pytest.mark.parametrize("refusals", [4, None], ids=["four-refusals", "refused-for-good"])
def test_storage_refusing_its_signed_url_partway_through_a_prefetch(
    registry, pushed_images, fault_proxy, tmp_path, refusals
):
    """Tried: ``prefetch`` of the 64 MiB image from a registry that redirects blob reads
    to a storage host (another address), which, once a tenth of the layer is cached,
    answers its next four GETs 403 ``AccessDenied: Request has expired`` (a presigned
    URL past its expiry), or every GET from then on. Must hold: four refusals are ridden
    out, each read asking the registry again for a new URL: exit 0, the layer sealed;
    refused for good, exit 3 (the storage said no), in one line naming the storage host
    and its 403, what came kept and `cache verify` clean. Before, the refusal for good
    exited 7, the code of a read that met an offline cache."""
    storage = fault_proxy(registry, listen="127.0.0.2")
    front = fault_proxy(registry)
    front.fault = Fault("redirect", path_contains="/blobs/sha256:", redirect_to=storage.url)
    pace = Fault("pace", path_contains="/blobs/", method="GET", seconds=0.02)
    storage.fault = pace
    reference = pushed_images.large.replace(registry.host, front.host)
    cache = tmp_path / "cache"
    argv = [sys.executable, "-m", "blockstore", "prefetch", reference, "--insecure"]
    process = subprocess.Popen(
        [*argv, "--cache-dir", str(cache)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert wait_for(lambda: cached_fraction(cache) >= 0.1, 60)
        storage.more_faults = [pace]
        storage.fault = Fault(
            "status",
            path_contains="/blobs/",
            method="GET",
            status=403,
            body=EXPIRED_URL,
            times=refusals,
        )
        out, err = process.communicate(timeout=120)
    finally:
        process.kill()
        process.wait()
    if refusals is not None:
        assert process.returncode == 0 and "verified and sealed" in out, err
        assert storage.fault.times == 0, "every refusal was given"
        return
    assert process.returncode == 3, err
    (line,) = err.strip().splitlines()
    assert storage.host in line and "(HTTP 403)" in line, line
    assert 0.1 <= cached_fraction(cache) < 1.0
    verify = blockstore("cache", "verify", "--cache-dir", str(cache))
    assert verify.returncode == 0, verify.stdout + verify.stderr
