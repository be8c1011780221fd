"""Tar layers on a cache whose disk cannot hold their tar (a small ext4 on a loop device)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from oci_layout import MEDIA_TYPES, compress, push_tar_layer
from rig.small_disk import small_disk
from rig.turn_holder import turn_held
from rig.waiting import wait_for
from trees import make_tar

from blockstore.image import open_image
from blockstore.prefetch import PrefetchSettings
from blockstore.registry.push import push_image

CLI = [sys.executable, "-m", "blockstore"]


def blockstore(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120)


def cached(cache: Path) -> dict[str, dict]:
    listed = blockstore("cache", "ls", "--json", "--cache-dir", str(cache))
    assert listed.returncode == 0, listed.stderr
    return {blob["digest"]: blob for blob in json.loads(listed.stdout)}


def whole_and_sealed(cache: Path, digest: str) -> bool:
    blob = cached(cache).get(digest)
    return blob is not None and blob["sealed"] and blob["cached_fraction"] == 1.0


def layer_tar(tmp: Path, name: str, files: dict[str, bytes]) -> bytes:
    src = tmp / name
    src.mkdir()
    for path, data in files.items():
        (src / path).write_bytes(data)
    return make_tar(src, tmp / f"{name}.tar").read_bytes()


def compressible_files(repeats: int) -> dict[str, bytes]:
    """Three files of ``repeats`` times 16 KB, which compress to little: a small blob
    whose tar needs far more room than the blob."""
    pattern = os.urandom(16000)
    data = [b"".join(pattern + os.urandom(64) for _ in range(repeats)) for _ in range(3)]
    return {f"b{i}.bin": part for i, part in enumerate(data)}


def pushed(
    tmp: Path, registry, name: str, kind: str, files: dict[str, bytes]
) -> tuple[str, str, bytes]:
    """``files`` as the one layer, of ``kind``, of image ``o/NAME:v1``: its reference, its
    tar's digest (the cache's key for the inflated tar) and the tar."""
    tar = layer_tar(tmp, name, files)
    reference = push_tar_layer(registry, f"o/{name}", "v1", kind, tar, tmp)
    return reference, "sha256:" + hashlib.sha256(tar).hexdigest(), tar


def fill_to(disk: Path, left: int) -> Path:
    """A file filling ``disk`` until ``left`` bytes are free: the file."""
    free = os.statvfs(disk).f_bfree * os.statvfs(disk).f_frsize
    filler = disk / "filler"
    filler.write_bytes(bytes(free - left))
    return filler


@pytest.mark.parametrize("kind", ["gzip", "zstd"])
def test_a_compressed_layer_the_disk_cannot_hold_costs_no_other_layer(tmp_path, registry, kind):
    """Tried: a cache on a 32 MiB ext4 holding a prefetched tar.gz image (3 MiB tar,
    sealed), the disk then filled by another file to ~11 MiB free; a second image, of
    ``kind``, whose blob is small but whose tar is 12 MiB, is prefetched (indexing it
    here), then served with ``--fill``; then the file is removed and it is prefetched
    again. Must hold: the prefetch is refused (exit 8) in one line saying what it needs,
    and ``serve --fill`` skips the fill with one warning, the first image whole and
    sealed after each; once there is room, the prefetch seals the second image's tar,
    both are whole, and it reads back right offline. Before, the gzip pass stored the
    tar as it inflated it and the span pump decompressed the rest, each store finding
    the disk full evicting the oldest chunks: the first image went to 0%, and the
    prefetch succeeded at its cost."""
    three_mib = {"a.bin": os.urandom(3 << 20)}
    first_ref, first_tar, _ = pushed(tmp_path, registry, "first", "gzip", three_mib)
    second_ref, second_tar, second = pushed(
        tmp_path, registry, "second", kind, compressible_files(250)
    )
    with small_disk(tmp_path / "disk", "32M") as disk:
        cache = disk / "cache"
        done = blockstore("prefetch", first_ref, "--insecure", "--cache-dir", str(cache))
        assert done.returncode == 0, done.stderr
        assert whole_and_sealed(cache, first_tar)
        filler = fill_to(disk, 11 << 20)

        refused = blockstore("prefetch", second_ref, "--insecure", "--cache-dir", str(cache))
        assert refused.returncode == 8, refused.stderr
        assert f"{second_tar} needs about" in refused.stderr, refused.stderr
        assert "nothing was decompressed or evicted for it" in refused.stderr
        assert refused.stderr.count("\n") <= 2, refused.stderr  # the pass's warning, the error
        assert whole_and_sealed(cache, first_tar)

        log = tmp_path / "serve.log"
        where = ["--cache-dir", str(cache), "--unix", str(tmp_path / "s.sock")]
        with open(log, "w") as err:
            server = subprocess.Popen(
                [*CLI, "serve", second_ref, "--insecure", "--fill", "--no-trace", *where],
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        try:
            skipped = wait_for(lambda: "not filled" in log.read_text(), 60)
        finally:
            server.terminate()
            server.wait(timeout=30)
        assert skipped, log.read_text()
        assert f"{second_tar} needs about" in log.read_text()
        assert whole_and_sealed(cache, first_tar)

        filler.unlink()
        done = blockstore("prefetch", second_ref, "--insecure", "--cache-dir", str(cache))
        assert done.returncode == 0, done.stderr
        assert whole_and_sealed(cache, second_tar)
        assert whole_and_sealed(cache, first_tar)
        image = open_image(second_ref, cache_dir=cache, offline=True)
        try:
            (export,) = image.exports()
            start = export.index.tar_start
            assert b"".join(bytes(b) for b in export.read(start, len(second))) == second
        finally:
            image.close()


def test_a_zstd_tar_spooled_beside_a_cache_with_no_room_for_it_is_not_stored(
    tmp_path, registry, caplog
):
    """Tried: the same small disk holding a prefetched tar.gz image, filled to ~11 MiB
    free; a zstd image (a stream: its tar's size is known only at the end) whose tar is
    7 MiB is opened, so its indexing pass spools the tar beside the cache (7 MiB of the
    room), to store it once both digests hold. Must hold: the open succeeds and the tar
    is not stored, with a warning saying what it needs; the first image stays whole and
    sealed. Before, the spooled tar was stored all the same, each store finding the disk
    full evicting the first image's chunks."""
    three_mib = {"a.bin": os.urandom(3 << 20)}
    first_ref, first_tar, _ = pushed(tmp_path, registry, "first", "gzip", three_mib)
    second_ref, second_tar, _ = pushed(
        tmp_path, registry, "second", "zstd", compressible_files(150)
    )
    with small_disk(tmp_path / "disk", "32M") as disk:
        cache = disk / "cache"
        done = blockstore("prefetch", first_ref, "--insecure", "--cache-dir", str(cache))
        assert done.returncode == 0, done.stderr
        fill_to(disk, 11 << 20)
        caplog.set_level(logging.WARNING)
        lazy = PrefetchSettings(readahead=False)
        image = open_image(second_ref, cache_dir=cache, options=registry.options(), prefetch=lazy)
        try:
            assert len(image.exports()) == 1
        finally:
            image.close()
        assert f"{second_tar} needs about" in caplog.text, caplog.text
        assert "is full" not in caplog.text, caplog.text
        assert whole_and_sealed(cache, first_tar)


def test_a_zstd_tar_larger_than_the_cap_is_spooled_no_further_than_the_cap(
    tmp_path, registry, caplog
):
    """Tried: a zstd image (a stream: its tar's size is known only at the end) whose tar
    is 48 MiB, opened with a cache capped at 4 MiB on a 32 MiB disk, so its indexing
    pass spools the tar beside the cache. Must hold: the open succeeds, and the spool
    stops once it is past the cap, with a warning saying the tar is larger than the cap:
    the disk never fills. Before, the whole tar was spooled, to be dropped at the end
    for the cap: the disk filled (every other writer on it failing meanwhile) and the
    warning said "No space left on device"."""
    reference, tar_digest, _ = pushed(
        tmp_path, registry, "spooled", "zstd", compressible_files(1000)
    )
    with small_disk(tmp_path / "disk", "32M") as disk:
        caplog.set_level(logging.WARNING)
        lazy = PrefetchSettings(readahead=False)
        image = open_image(
            reference,
            cache_dir=disk / "cache",
            cache_size=4 << 20,
            options=registry.options(),
            prefetch=lazy,
        )
        try:
            assert len(image.exports()) == 1
        finally:
            image.close()
    assert f"{tar_digest} (48.0 MiB)" not in caplog.text
    assert (
        f"{tar_digest} is larger than the 3.6 MiB"
        " eviction keeps the cache to under its 4.0 MiB cap: its tar passed " in caplog.text
    )
    assert "No space left" not in caplog.text, caplog.text


def test_a_prefetch_over_the_cap_is_refused_before_a_byte_is_fetched(tmp_path, registry):
    """Tried: a cache capped at 8 MiB holding a prefetched tar.gz image (sealed); then
    ``prefetch`` of a tar.gz image whose blob is 10 MiB (random bytes), and of one whose
    blob is small but whose tar (as its trailer says) is 12 MiB. Must hold: each is
    refused (exit 8) saying it is larger than the cap, and the first image stays whole
    and sealed. Before, the first had its blob read whole to index it, which evicted
    the sealed image, and only then was refused."""
    first, first_tar, _ = pushed(tmp_path, registry, "kept", "gzip", {"a.txt": os.urandom(1 << 20)})
    cache = tmp_path / "cache"
    done = blockstore(
        "prefetch", first, "--insecure", "--cache-dir", str(cache), "--cache-size", "8M"
    )
    assert done.returncode == 0, done.stderr
    assert whole_and_sealed(cache, first_tar)
    big, _, _ = pushed(tmp_path, registry, "bigblob", "gzip", {"r.bin": os.urandom(10 << 20)})
    wide, _, _ = pushed(tmp_path, registry, "widetar", "gzip", compressible_files(256))
    for reference in (big, wide):
        refused = blockstore("prefetch", reference, "--insecure", "--cache-dir", str(cache))
        assert refused.returncode == 8, refused.stderr
        assert (
            "is larger than the 7.2 MiB eviction keeps the cache to under its 8.0 MiB cap"
            in refused.stderr
        ), refused.stderr
        assert whole_and_sealed(cache, first_tar), reference


def test_a_prefetch_between_the_low_water_mark_and_the_cap_names_the_limit(tmp_path, registry):
    """Tried: ``prefetch --cache-size 8M`` of a plain tar image whose tar is 7.5 MiB:
    smaller than the cap, larger than the 7.2 MiB eviction keeps the cache to. Must
    hold: refused (exit 8) naming the limit that applies, the low-water mark under the
    cap. Before, it said "(7.5 MiB) is larger than the cache size cap (8.0 MiB)", which
    no user can square."""
    reference, _, tar = pushed(
        tmp_path, registry, "between", "tar", {"r.bin": os.urandom((15 << 19) - (16 << 10))}
    )
    assert (15 << 19) - (32 << 10) < len(tar) <= 15 << 19
    cache = tmp_path / "cache"
    refused = blockstore(
        "prefetch", reference, "--insecure", "--cache-dir", str(cache), "--cache-size", "8M"
    )
    assert refused.returncode == 8, refused.stderr
    assert (
        "(7.5 MiB) is larger than the 7.2 MiB eviction keeps the cache to under its 8.0 MiB cap"
        in refused.stderr
    ), refused.stderr


def test_a_first_prefetch_of_a_tar_over_the_cap_leaves_no_cache(tmp_path, registry):
    """Tried: with no cache yet, ``prefetch --cache-size 4M`` of a tar.gz image whose blob
    is small but whose tar (as its trailer says) is 12 MiB. Must hold: refused (exit 8)
    saying the tar is larger than the cap, and no cache directory left, as for any first
    command that fails. Before, the trailer was read through the cache to learn the
    tar's size: its chunk and lease file were kept, and so was the cache made for them."""
    wide, _, _ = pushed(tmp_path, registry, "firstwide", "gzip", compressible_files(256))
    cache = tmp_path / "parent" / "cache"

    refused = blockstore(
        "prefetch", wide, "--insecure", "--cache-dir", str(cache), "--cache-size", "4M"
    )

    assert refused.returncode == 8, refused.stderr
    assert (
        "is larger than the 3.6 MiB eviction keeps the cache to under its 4.0 MiB cap"
        in refused.stderr
    ), refused.stderr
    assert not (tmp_path / "parent").exists(), list((tmp_path / "parent").rglob("*"))


def test_a_prefetch_of_a_zstd_tar_over_the_cap_is_refused_before_a_span_is_inflated(
    tmp_path, registry
):
    """Tried: a cache capped at 8 MiB holding a prefetched tar.gz image (sealed); then
    ``prefetch`` of a zstd image whose blob is small but whose tar is 11.8 MiB (a zstd
    stream names no size: it is known once the layer is opened, from its index). Must
    hold: refused (exit 8) saying the tar is larger than the cap, with no span inflated
    into the cache, and the first image stays whole and sealed. Before, every span was
    inflated and stored first, which evicted the sealed image (and took minutes for a
    tar of some GiB), and only then was the tar refused."""
    first, first_tar, _ = pushed(tmp_path, registry, "kept", "gzip", {"a.txt": os.urandom(1 << 20)})
    cache = tmp_path / "cache"
    done = blockstore(
        "prefetch", first, "--insecure", "--cache-dir", str(cache), "--cache-size", "8M"
    )
    assert done.returncode == 0, done.stderr
    assert whole_and_sealed(cache, first_tar)
    wide, wide_tar, _ = pushed(tmp_path, registry, "widezstd", "zstd", compressible_files(256))
    refused = blockstore("prefetch", wide, "--insecure", "--cache-dir", str(cache))
    assert refused.returncode == 8, refused.stderr
    assert (
        f"{wide_tar} (11.8 MiB) is larger than the 7.2 MiB"
        " eviction keeps the cache to under its 8.0 MiB cap" in refused.stderr
    )
    assert whole_and_sealed(cache, first_tar)
    assert cached(cache).get(wide_tar) is None or cached(cache)[wide_tar]["cached_fraction"] == 0


def test_span_readahead_of_a_tar_over_the_cap_is_skipped(tmp_path, registry, caplog):
    """Tried: a cache capped at 8 MiB holding a prefetched tar.gz image (sealed); a zstd
    image whose tar is 11.8 MiB, in frames of 1 MiB of tar (as pzstd writes it: spans
    of 4 MiB), opened with span readahead, as ``mount`` opens it, and the start of its
    tar read. Must hold: the readahead is skipped with a warning saying the tar is
    larger than the cap; the read is right (its span inflated); the sealed image stays
    whole. Before, the readahead inflated and stored every span, round after round,
    each round evicting the sealed image and then the tar's own first chunks."""
    first, first_tar, _ = pushed(tmp_path, registry, "kept", "gzip", {"a.txt": os.urandom(1 << 20)})
    cache = tmp_path / "cache"
    done = blockstore(
        "prefetch", first, "--insecure", "--cache-dir", str(cache), "--cache-size", "8M"
    )
    assert done.returncode == 0, done.stderr
    tar = layer_tar(tmp_path, "framed", compressible_files(256))
    frames = [tar[i : i + (1 << 20)] for i in range(0, len(tar), 1 << 20)]
    layer = tmp_path / "framed.tar.zst"
    layer.write_bytes(b"".join(compress("zstd", frame) for frame in frames))
    client = registry.client()
    try:
        push_image(client, "o/framed", "v1", [layer], media_type=MEDIA_TYPES["zstd"])
    finally:
        client.close()
    caplog.set_level(logging.WARNING)
    image = open_image(f"{registry.host}/o/framed:v1", cache_dir=cache, options=registry.options())
    try:
        (export,) = image.exports()
        start = export.index.tar_start
        assert b"".join(bytes(b) for b in export.read(start, 1 << 16)) == tar[: 1 << 16]
        filling = lambda: any(t.name == "tar-fill" for t in threading.enumerate())  # noqa: E731
        assert wait_for(lambda: not filling(), 120)
    finally:
        image.close()
    assert whole_and_sealed(cache, first_tar)
    assert (
        "is larger than the 7.2 MiB eviction keeps the cache to under its 8.0 MiB cap; not filled"
        in caplog.text
    ), caplog.text


def test_a_one_frame_zstd_tar_over_the_cap_is_read_without_keeping_its_span(
    tmp_path, registry, caplog
):
    """Tried: a cache capped at 8 MiB holding a prefetched tar.gz image (sealed); a zstd
    image whose tar is 11.8 MiB in one frame (as ``zstd FILE`` writes it: the whole tar
    is one span), opened without readahead, and 64 KiB of its tar read twice, at its
    start and 10 MiB in. Must hold: both reads are right; the span is served without
    being stored, said once in the log; the sealed image stays whole. Before, the
    first read inflated the tar and stored all of it, evicting the sealed image."""
    first, first_tar, _ = pushed(tmp_path, registry, "kept", "gzip", {"a.txt": os.urandom(1 << 20)})
    cache = tmp_path / "cache"
    done = blockstore(
        "prefetch", first, "--insecure", "--cache-dir", str(cache), "--cache-size", "8M"
    )
    assert done.returncode == 0, done.stderr
    _, _, tar = pushed(tmp_path, registry, "oneframe", "zstd", compressible_files(256))
    caplog.set_level(logging.INFO)
    image = open_image(
        f"{registry.host}/o/oneframe:v1",
        cache_dir=cache,
        options=registry.options(),
        prefetch=PrefetchSettings(readahead=False),
    )
    try:
        (export,) = image.exports()
        assert len(export.index.spans.points) == 1
        start = export.index.tar_start
        for at in (0, 10 << 20, 0, 10 << 20):
            got = b"".join(bytes(b) for b in export.read(start + at, 1 << 16))
            assert got == tar[at : at + (1 << 16)]
    finally:
        image.close()
    assert whole_and_sealed(cache, first_tar)
    assert caplog.text.count("not kept in the cache") == 1, caplog.text


def test_a_tar_layer_fill_waits_for_a_prefetch_filling_alone(tmp_path, registry):
    """Tried: a tar.gz image (tar 16 MiB, spans of 4 MiB) opened once, so its index is
    cached, and its tar then removed (`cache rm`); a process holding the cache's
    prefetch turn alone (as a prefetch whose layer lost chunks fills its next rounds);
    the image opened with fill, as ``serve --fill`` opens it, and the start of its tar
    read; 3 s later the turn let go. Must hold: the read is right at once; the fill
    inflates no other span into the cache while the turn is held alone, then fills the
    tar whole and seals it. Before, the fill took no turn: it filled beside the
    prefetch filling alone, evicting what that prefetch stored."""
    files = {"a.bin": os.urandom(16 << 20)}
    reference, tar_digest, tar = pushed(tmp_path, registry, "turn", "gzip", files)
    cache = tmp_path / "cache"
    image = open_image(reference, cache_dir=cache, options=registry.options())
    try:
        image.exports()
    finally:
        image.close()
    removed = blockstore("cache", "rm", tar_digest, "--cache-dir", str(cache))
    assert removed.returncode == 0, removed.stderr
    assert cached(cache).get(tar_digest) is None
    with turn_held(cache, alone=True) as holder:
        image = open_image(
            reference,
            cache_dir=cache,
            options=registry.options(),
            prefetch=PrefetchSettings(fill=True),
        )
        try:
            (export,) = image.exports()
            start = export.index.tar_start
            assert b"".join(bytes(b) for b in export.read(start, 1 << 16)) == tar[: 1 << 16]
            time.sleep(3)
            held = cached(cache).get(tar_digest, {}).get("cached_fraction", 0.0)
            holder.let_go()
            assert wait_for(lambda: whole_and_sealed(cache, tar_digest), 60)
        finally:
            image.close()
    assert held < 0.5, held


def test_a_tar_layer_closed_while_its_seal_waits_its_turn_stops_at_once(tmp_path, registry):
    """Tried: a tar.gz image (tar 16 MiB) opened once, so its index is cached, and its tar
    then removed (`cache rm`); the image opened with fill (at 8 MiB/s, so the reads come
    first), its start read again and again (so the filled tar is not sealed yet) until
    the tar is whole; then a process holding the cache's prefetch turn alone, a chunk of
    the tar dropped, and the reads stopped, so the seal, fetching the chunk first, waits
    for the turn; then the image closed, as a server asked to stop (SIGTERM) closes it.
    Must hold: the seal's wait, and its thread, end within a few seconds of the close.
    Before, it ignored the stop and went on waiting for the turn, up to five minutes,
    and then fetched what was missing for a closed cache."""
    files = {"a.bin": os.urandom(16 << 20)}
    reference, tar_digest, tar = pushed(tmp_path, registry, "closed", "gzip", files)
    cache = tmp_path / "cache"
    image = open_image(reference, cache_dir=cache, options=registry.options())
    try:
        image.exports()
    finally:
        image.close()
    assert blockstore("cache", "rm", tar_digest, "--cache-dir", str(cache)).returncode == 0
    fill = PrefetchSettings(fill=True, fill_rate=8 << 20)
    image = open_image(reference, cache_dir=cache, options=registry.options(), prefetch=fill)
    reads_done = threading.Event()
    try:
        (export,) = image.exports()
        start = export.index.tar_start

        def read_until_done() -> None:
            while True:
                assert b"".join(bytes(b) for b in export.read(start, 4096)) == tar[:4096]
                if reads_done.wait(0.1):
                    return

        reader = threading.Thread(target=read_until_done)
        reader.start()

        def whole() -> bool:
            record = image.store.lookup(tar_digest)
            return record is not None and record.present == record.chunks

        assert wait_for(whole, 60)
        with turn_held(cache, alone=True):
            image.store.drop_chunks(tar_digest, [1], recheck=False)
            reads_done.set()
            reader.join()
            time.sleep(2)  # the layer idle, its seal waits for the turn
            assert seal_threads()
            image.close()
            assert wait_for(lambda: not seal_threads(), 5), seal_threads()
    finally:
        reads_done.set()
        image.close()


def seal_threads() -> list[threading.Thread]:
    """The thread that fills and seals a compressed layer's tar, while it runs."""
    return [t for t in threading.enumerate() if t.name == "tar-fill"]


def test_spans_a_full_disk_cannot_keep_are_said_a_few_times_not_each(tmp_path, caplog):
    """Tried: forty inflated chunks of a tar handed to its span filler while the cache's
    disk is full to the last block (nothing of the cache's own to evict). Must hold:
    every store fails, costing only the caching; the log says so at most a burst's
    worth of times, each line naming the tar and why, not once per span. Before, each
    failed store logged its own line ("chunks from N not cached"): 39 lines for 300
    small files read from a mount."""
    from blockstore.cache import CHUNK_SIZE, ChunkStore
    from blockstore.tarlayer.export import SpanFiller
    from blockstore.throttledlog import ThrottledLog

    caplog.set_level(logging.WARNING)
    digest = "sha256:" + hashlib.sha256(b"a tar").hexdigest()
    with small_disk(tmp_path / "disk", "16M") as disk:
        store = ChunkStore(disk / "cache")
        try:
            with open(disk / "filler", "wb", buffering=0) as filler:
                for step in (1 << 20, 4096):
                    try:
                        while True:
                            filler.write(bytes(step))
                    except OSError:  # ENOSPC: on to smaller writes, then full to the block
                        pass
            fill = SpanFiller(store, digest, 40 * CHUNK_SIZE)
            for index in range(40):
                fill(index * CHUNK_SIZE, os.urandom(CHUNK_SIZE))
            assert store.lookup(digest) is None or store.lookup(digest).present == 0
        finally:
            store.close()
    said = [r.getMessage() for r in caplog.records if "not kept in the cache" in r.getMessage()]
    assert 1 <= len(said) <= ThrottledLog.BURST, said
    assert all(digest in line and "full" in line for line in said), said
