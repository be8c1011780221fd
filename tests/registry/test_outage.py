"""A registry that stops answering after the image resolved: reads fail fast, and
the first one after it is back succeeds.

Real registry, stopped and started again on its own port and storage; the
reads go through ``open_image`` and the chunk cache as a server's would.
"""

from __future__ import annotations

import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from rig.fault_proxy import Fault
from rig.pushed import push_erofs

from blockstore.errors import BlockstoreError
from blockstore.image import open_image
from blockstore.registry import RegistryOptions, retry

CHUNK = 32 * 1024
DOWN_READS = 8


def test_reads_during_an_outage_fail_fast_and_the_first_after_it_succeeds(
    fresh_registry, erofs_images, tmp_path: Path
):
    """Tried: the registry process stops after the image resolved; uncached reads
    at distinct offsets, one after another, as `find | xargs cat` makes them.
    Must hold: the first read spends its retries (a blip is not an outage), the
    outage is declared about a second in and each read after that fails within a
    fraction of one, never
    with wrong or missing bytes taken for data; once the registry is back, the
    very next read succeeds with the image's bytes, with no pause to sit out."""
    source = erofs_images.large.path.read_bytes()
    reference = push_erofs(fresh_registry.host, "outage/img", "v1", [erofs_images.large.path])
    options = RegistryOptions(insecure=True, timeout=10.0)
    image = open_image(reference, cache_dir=tmp_path / "cache", options=options)
    try:
        (blob,) = image.exports()
        assert b"".join(bytes(b) for b in blob.read(0, CHUNK)) == source[:CHUNK]
        fresh_registry.stop()
        spacing = (blob.size - CHUNK) // (DOWN_READS + 2) // CHUNK * CHUNK
        offsets = [CHUNK + spacing * (i + 1) for i in range(DOWN_READS + 1)]

        first = time.monotonic()
        declared_by, after = None, []
        for i, offset in enumerate(offsets):
            started = time.monotonic()
            with pytest.raises(BlockstoreError) as caught:
                blob.read(offset, 4096)
            took = time.monotonic() - started
            assert "connection refused" in str(caught.value)
            assert i or took > 0.1, "the first failure was not retried at all"
            if declared_by is not None:
                after.append(took)
            elif "(no reply for" in str(caught.value):
                declared_by = time.monotonic() - first
        # Reads retry until the outage is declared, at the first attempt DOWN_AFTER into
        # it; the one that declares it may have slept one backoff (up to 1.6 s) past
        # that. Every read after it fails at once: without the outage each would spend
        # its retries (1.5 s on average, as the first did).
        policy = retry.RetryPolicy()
        longest_pause = min(policy.max_delay, policy.base_delay * 2 ** (policy.max_attempts - 2))
        assert declared_by is not None, "the outage was never declared"
        assert declared_by < retry.DOWN_AFTER + longest_pause + 0.5, declared_by
        assert len(after) >= DOWN_READS - 3 and max(after) < 0.2, after
        fresh_registry.start()
        started = time.monotonic()
        got = b"".join(bytes(b) for b in blob.read(offsets[-1], 4096))
        assert got == source[offsets[-1] : offsets[-1] + 4096]
        assert time.monotonic() - started < 1.0
    finally:
        image.close()


def test_a_silent_registry_is_tried_by_one_read_at_a_time(
    fresh_registry, fault_proxy, erofs_images, tmp_path: Path
):
    """Tried: after the image resolved, the registry accepts connections but never
    answers (each attempt waits out its stall), until it is taken as down; then one
    read through the cache, and four at once through the registry client. Must hold:
    the one read makes one attempt; of the four, one tries the registry and the other
    three fail at once rather than each wait out a stall on a dead host; when the
    registry answers again, reads succeed with the image's bytes."""
    source = erofs_images.large.path.read_bytes()
    proxy = fault_proxy(fresh_registry)
    reference = push_erofs(proxy.host, "silent/img", "v1", [erofs_images.large.path])
    options = RegistryOptions(insecure=True, timeout=3.0)
    stall = options.timeout / 3  # what each attempt waits before it is given up
    image = open_image(reference, cache_dir=tmp_path / "cache", options=options)
    try:
        (blob,) = image.exports()
        proxy.fault = Fault("delay", path_contains="/blobs/", seconds=30)
        for offset in (CHUNK * 100, CHUNK * 200):  # the outage is taken as one
            with pytest.raises(BlockstoreError):
                blob.read(offset, 4096)
        # Through the cache, one attempt: before, a streamed read that failed was
        # resumed with another, so each read waited out two stalls.
        started = time.monotonic()
        with pytest.raises(BlockstoreError, match="no reply for"):
            blob.read(CHUNK * 250, 4096)
        assert time.monotonic() - started < 1.7

        client, repository = image.client, image.repository
        assert client is not None

        def timed_read(offset: int) -> tuple[float, str]:
            # The registry client itself: the cache's fetch layer may queue its reads.
            started = time.monotonic()
            try:
                client.read_blob_range(repository, blob.digest, offset, offset + 4095, blob.size)
            except BlockstoreError as exc:
                return time.monotonic() - started, str(exc)
            return time.monotonic() - started, "read succeeded"

        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(timed_read, [CHUNK * (300 + 50 * i) for i in range(4)]))
        # Quick: ended before one stall could have, so none waited on the silent host.
        quick = [said for took, said in results if took < stall]
        assert len(quick) >= 3, results
        assert all("another request is trying it again" in said for said in quick), results

        proxy.fault = None
        offset = CHUNK * 500
        got = b"".join(bytes(b) for b in blob.read(offset, 4096))
        assert got == source[offset : offset + 4096]
    finally:
        image.close()


SHORT_OF_DESCRIPTORS = """
import logging, os, resource, sys
from blockstore.registry import RegistryClient, RegistryOptions
logging.basicConfig(level=logging.INFO, format="LOG %(message)s")
client = RegistryClient(sys.argv[1], RegistryOptions(insecure=True, timeout=3.0))
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
held = []
try:
    while True:
        held.append(os.open("/dev/null", os.O_RDONLY))
except OSError:
    pass
try:
    client.get_manifest("fixtures/small", "v1")
except Exception as exc:
    print("FAILED", type(exc).__name__, exc)
for fd in held:
    os.close(fd)
client.get_manifest("fixtures/small", "v1")
print("THEN OK")
"""


def test_a_process_out_of_descriptors_says_so_and_does_not_blame_the_registry(
    registry, pushed_images
):
    """Tried: a manifest fetch while this process has no file descriptor left (its
    RLIMIT_NOFILE reached), then the same fetch with descriptors free. Must hold: the
    error names the shortage, not a registry that timed out, and the registry is not
    taken as down for it; the next fetch succeeds. Before, urllib3's wrapping made it
    "timed out", and a second of it declared the registry down."""
    done = subprocess.run(
        [sys.executable, "-c", SHORT_OF_DESCRIPTORS, registry.host],
        capture_output=True,
        text=True,
        timeout=60,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "FAILED" in out and "out of file descriptors" in out, out
    assert "timed out" not in out and "has not answered" not in out, out
    assert "THEN OK" in out


def test_a_failure_long_ago_does_not_make_an_outage_of_two_now(monkeypatch):
    """Tried: one failed attempt, nothing for 100 s, then three quick failures, then
    one more a second later. Must hold: the three quick ones are a new streak, not an
    outage (a failure long ago says nothing of the host now); the streak that has
    lasted a second, with three failures or more, is."""
    clock = [0.0]
    monkeypatch.setattr(retry.time, "monotonic", lambda: clock[0])
    outage = retry.Outage("registry.example")
    refused = "connection refused"
    assert outage.failed(refused, 0.0) is None
    clock[0] = 100.0
    assert [outage.failed(refused, 100.0) for _ in range(3)] == [None, None, None]
    clock[0] = 101.1
    assert outage.failed(refused, 101.1) == "no reply for 1s"
    outage.answered()
    assert outage.failed(refused, 101.1) is None


def test_attempts_that_each_wait_out_a_long_stall_are_one_streak(monkeypatch):
    """Tried: a silent host, each attempt failing after a 10 s stall, the next begun at
    once. Must hold: the third failure makes the outage (the gap that starts a new streak
    is from one failure to the next attempt's start, not between failures); then an
    attempt in flight keeps others off for a second only, so one stuck on the silent
    host does not keep the rest from finding it back."""
    clock = [0.0]
    monkeypatch.setattr(retry.time, "monotonic", lambda: clock[0])
    outage = retry.Outage("registry.example")
    said = []
    for _ in range(3):
        started = clock[0]
        outage.enter("registry.example:443")
        clock[0] += 10.0
        said.append(outage.failed("timed out", started))
        outage.leave()
    assert said == [None, None, "no reply for 30s"]
    outage.enter("registry.example:443")  # a probe, stuck on the silent host
    clock[0] += 0.5
    with pytest.raises(BlockstoreError, match="another request is trying it again"):
        outage.enter("registry.example:443")
    clock[0] += 0.6
    outage.enter("registry.example:443")  # a second, a while later, may go
    outage.answered()


def test_a_burst_of_attempts_timing_out_together_is_no_outage(monkeypatch):
    """Tried: forty attempts begun together that time out together (a burst of reads
    against a registry busy for a moment), then their retries. Must hold: the burst
    counts as one failure, so no outage is declared while the retries may still get
    replies; retries that fail too make it one. Before, three of the forty timing out
    a second apart declared the registry down, and the rest of the burst failed at
    once where retrying would have read their bytes."""
    clock = [0.0]
    monkeypatch.setattr(retry.time, "monotonic", lambda: clock[0])
    outage = retry.Outage("registry.example")
    said = []
    for i in range(40):
        clock[0] = 1.7 + i * 0.03  # each begun at 0, timing out over a second
        said.append(outage.failed("timed out", 0.0))
    assert said == [None] * 40
    clock[0] = 4.0
    assert outage.failed("timed out", 3.0) is None  # a retry, begun after the first failure
    clock[0] = 6.0
    assert outage.failed("timed out", 5.0) == "no reply for 6s"
