"""The real ``blockstore cache`` command on a cache built by the library."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess

import pytest
from cache_rig import REPO, misfile_chunk, run_cli
from cache_sources import ScriptedSource, make_blob
from lmdb_pages import regions
from rig.stored_chunks import flip_stored_byte

from blockstore.cache import CHUNK_SIZE, CachedBlob, ChunkStore
from blockstore.errors import NotCached


def fill(cache_dir, blobs, prefetch: bool = True) -> None:
    with ChunkStore(cache_dir) as store:
        for data, digest in blobs:
            blob = CachedBlob(store, digest, len(data), ScriptedSource(data, digest))
            if prefetch:
                blob.prefetch()
            else:
                blob.read(0, 3 * CHUNK_SIZE)
            blob.close()


def test_verify_finds_and_drops_corrupted_chunks(cache_dir):
    """A bit flipped in a chunk of a sealed blob and in one of a partial blob: `cache
    verify` reports both, drops them and exits 6; a second run is clean (exit 0); the
    chunks are fetched again, right, on the next read."""
    sealed = make_blob(6 * CHUNK_SIZE, seed=40)
    partial = make_blob(9 * CHUNK_SIZE, seed=41)
    fill(cache_dir, [sealed])
    fill(cache_dir, [partial], prefetch=False)
    with ChunkStore(cache_dir) as store:
        assert flip_stored_byte(store, sealed[1], 4, 1000)
        assert flip_stored_byte(store, partial[1], 1, 20000)
    result = run_cli("cache", "verify", "--cache-dir", str(cache_dir))
    assert result.returncode == 6, result.stdout + result.stderr
    assert f"bad chunk {sealed[1]} #4: dropped" in result.stdout
    assert f"bad chunk {partial[1]} #1: dropped" in result.stdout
    result = run_cli("cache", "verify", "--json", "--cache-dir", str(cache_dir))
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] and report["bad_chunks"] == [] and report["blobs_checked"] == 0
    with ChunkStore(cache_dir) as store:
        infos = {i.digest: i for i in store.blobs()}
        assert infos[sealed[1]].present == 5 and infos[sealed[1]].sealed
        assert infos[partial[1]].present == 2
        assert store.stats()["checksum_failures"] == 2
        blob = CachedBlob(store, sealed[1], len(sealed[0]), ScriptedSource(*sealed))
        assert b"".join(blob.read(0, len(sealed[0]))) == sealed[0]
        blob.close()


@pytest.mark.parametrize("json_output", [True, False], ids=["json", "text"])
def test_verify_that_finds_bad_data_says_so_on_stderr(cache_dir, json_output: bool):
    """Tried: ``blockstore -q cache verify`` (with and without ``--json``) of a cache with
    a bit flipped in a chunk of a sealed blob. Must hold: exit 6 with its one line on
    stderr, starting ``blockstore:``, as every failure has, for -q silences warnings, never
    errors; with ``--json``, stdout is the JSON report alone. Before, the bad chunk was
    said only in a warning, which -q silenced: exit 6 with no word of why."""
    sealed = make_blob(4 * CHUNK_SIZE, seed=47)
    fill(cache_dir, [sealed])
    with ChunkStore(cache_dir) as store:
        assert flip_stored_byte(store, sealed[1], 2, 1000)
    argv = ["-q", "cache", "verify", "--cache-dir", str(cache_dir)] + ["--json"] * json_output
    result = run_cli(*argv)
    assert result.returncode == 6, result.stdout + result.stderr
    assert result.stderr == f"blockstore: bad data found and dropped in the cache at {cache_dir}\n"
    if json_output:
        assert json.loads(result.stdout)["bad_chunks"] == [[sealed[1], 2]]


def test_a_chunk_under_another_chunks_key_is_never_served_as_it(cache_dir):
    """Chunk 1's whole value stored under chunk 5's key, and another blob's chunk 0 under
    chunk 3's key (what a flipped bit in a key does): offline, reads of chunks 5 and 3 fail
    with EIO rather than return those bytes; `cache verify` names both as bad (exit 6) and
    drops them; online, the right bytes come back."""
    data, digest = make_blob(8 * CHUNK_SIZE, seed=45)
    other = make_blob(2 * CHUNK_SIZE, seed=46)
    fill(cache_dir, [(data, digest), other])
    with ChunkStore(cache_dir) as store:
        misfile_chunk(store, (digest, 1), (digest, 5))
        misfile_chunk(store, (other[1], 0), (digest, 3))
        offline = CachedBlob(store, digest, len(data), None)
        for index in (5, 3):
            with pytest.raises(NotCached):
                offline.read(index * CHUNK_SIZE, 10)
        assert b"".join(offline.read(CHUNK_SIZE, 10)) == data[CHUNK_SIZE : CHUNK_SIZE + 10]
    fill(cache_dir, [])
    with ChunkStore(cache_dir) as store:
        misfile_chunk(store, (digest, 1), (digest, 5))
        misfile_chunk(store, (other[1], 0), (digest, 3))
    result = run_cli("cache", "verify", "--cache-dir", str(cache_dir))
    assert result.returncode == 6, result.stdout + result.stderr
    assert f"bad chunk {digest} #3: dropped" in result.stdout
    assert f"bad chunk {digest} #5: dropped" in result.stdout
    with ChunkStore(cache_dir) as store:
        blob = CachedBlob(store, digest, len(data), ScriptedSource(data, digest))
        assert b"".join(blob.read(0, len(data))) == data
        blob.close()


def test_stats_ls_pin_rm_gc_by_digest_and_reference(cache_dir):
    """stats and ls show what the library stored; pin and rm accept an image reference
    (matched in canonical form) or a digest; rm keeps a layer another image uses; gc
    evicts unpinned blobs down to the cap."""
    base = make_blob(4 * CHUNK_SIZE, seed=42)
    top = make_blob(5 * CHUNK_SIZE, seed=43)
    other = make_blob(3 * CHUNK_SIZE, seed=44)
    fill(cache_dir, [base, top, other])

    def record(reference: str, layers) -> dict:
        return {
            "reference": reference,
            "platform": "linux/amd64",
            "manifest_digest": "sha256:" + "e" * 64,
            "platforms": [],
            "layers": [
                {"index": i, "digest": d, "size": len(b), "mediaType": "x"}
                for i, (b, d) in enumerate(layers)
            ],
        }

    with ChunkStore(cache_dir) as store:
        store.images.put(
            "127.0.0.1:5000/demo/img:latest",
            "linux/amd64",
            record("127.0.0.1:5000/demo/img:latest", [base, top]),
        )
        store.images.put(
            "127.0.0.1:5000/demo/two:latest",
            "linux/amd64",
            record("127.0.0.1:5000/demo/two:latest", [base]),
        )
    stats = json.loads(run_cli("cache", "stats", "--json", "--cache-dir", str(cache_dir)).stdout)
    assert stats["blobs"] == 3 and stats["sealed_blobs"] == 3 and stats["bytes_fetched"] > 0
    listing = json.loads(run_cli("cache", "ls", "--json", "--cache-dir", str(cache_dir)).stdout)
    assert {b["digest"] for b in listing} == {base[1], top[1], other[1]}
    assert all(b["cached_fraction"] == 1.0 for b in listing)
    assert "SEALED" in run_cli("cache", "ls", "--cache-dir", str(cache_dir)).stdout
    # A command that only looks takes no cap: one given would be kept by the cache, and
    # the next gc would evict down to it.
    for look in ("ls", "stats", "verify"):
        result = run_cli("cache", look, "--cache-size", "64K", "--cache-dir", str(cache_dir))
        assert result.returncode == 2 and "--cache-size" in result.stderr, look
    with ChunkStore(cache_dir) as store:
        assert store.size_cap != 64 << 10

    result = run_cli("cache", "pin", "127.0.0.1:5000/demo/img", "--cache-dir", str(cache_dir))
    assert result.returncode == 0, result.stderr
    result = run_cli(
        "cache", "gc", "--cache-size", str(9 * CHUNK_SIZE), "--cache-dir", str(cache_dir)
    )
    assert result.returncode == 0, result.stderr
    with ChunkStore(cache_dir) as store:
        infos = {i.digest: i for i in store.blobs()}
        assert infos[base[1]].pinned and infos[top[1]].pinned
        assert infos[base[1]].present == 4 and infos[top[1]].present == 5
        assert infos[other[1]].present == 0  # evicted: unpinned, over the cap

    result = run_cli("cache", "rm", "127.0.0.1:5000/demo/img:latest", "--cache-dir", str(cache_dir))
    assert result.returncode == 0, result.stderr
    assert f"removed {top[1]}" in result.stdout and f"kept {base[1]}" in result.stdout
    result = run_cli("cache", "rm", other[1], "--cache-dir", str(cache_dir))
    assert f"removed {other[1]}" in result.stdout
    with ChunkStore(cache_dir) as store:
        assert {i.digest for i in store.blobs()} == {base[1]}
        assert [r["reference"] for r in store.images.all()] == ["127.0.0.1:5000/demo/two:latest"]

    result = run_cli("cache", "pin", "127.0.0.1:5000/demo/nothing:1", "--cache-dir", str(cache_dir))
    assert result.returncode == 3 and "no image" in result.stderr
    result = run_cli("cache", "pin", "NOT A REFERENCE", "--cache-dir", str(cache_dir))
    assert result.returncode == 2, result.stderr


def test_a_count_of_stored_chunks_too_low_costs_nothing_else(cache_dir):
    """Tried: a blob whose record counts one chunk fewer than are stored (a bit of the
    record flipped on the disk), then ``cache gc`` evicting every chunk of it, beside a
    pinned blob. Must hold: gc succeeds, the cache stays where it is with the pinned
    blob whole, and ``verify`` counts the evicted blob's chunks again (none). Before,
    the count went below zero, the record could not be written, and that was taken
    for a damaged cache: gc exited 8, and a server moved the whole cache aside."""
    from blockstore.cache.layout import DB_BLOBS, BlobRecord

    kept, evicted = make_blob(3 * CHUNK_SIZE, seed=31), make_blob(4 * CHUNK_SIZE, seed=32)
    with ChunkStore(cache_dir) as store:
        for data, digest in (kept, evicted):
            blob = CachedBlob(store, digest, len(data), ScriptedSource(data, digest))
            blob.prefetch()
            blob.close()
        store.pin(kept[1], len(kept[0]))

        def lower_the_count(txn):
            key = evicted[1].encode()
            record = BlobRecord.unpack(txn.get(key, db=store.dbs[DB_BLOBS]))
            record.present -= 1
            txn.put(key, record.pack(), db=store.dbs[DB_BLOBS])

        store.env.write(lower_the_count)
    where = ("--cache-dir", str(cache_dir))
    result = run_cli("cache", "gc", "--cache-size", str(3 * CHUNK_SIZE), *where)
    assert result.returncode == 0, result.stderr
    assert not list(cache_dir.parent.glob("*.damaged-*"))
    with ChunkStore(cache_dir) as store:
        infos = {i.digest: i for i in store.blobs()}
        assert infos[kept[1]].present == 3 and infos[evicted[1]].present == 0
        assert store.verify().ok
        blob = CachedBlob(store, kept[1], len(kept[0]), None)
        assert b"".join(bytes(b) for b in blob.read(0, len(kept[0]))) == kept[0]
        blob.close()


def test_a_stored_total_past_the_file_is_counted_again(cache_dir):
    """Tried: a cache of one unpinned blob of 8 chunks under a cap of 16, its stored
    total given 1 TiB more (bit 40 set, as a bit flipped on the disk leaves it), then
    ``cache gc``. Must hold: the total is counted again from what is stored (said once),
    gc evicts nothing, ``cache stats`` shows the true total, and the blob stays whole.
    Before, gc evicted the whole blob, saying "1.0 TiB of 512.0 KiB stored", and the
    total stayed 1 TiB (a prefetch took it for pinned layers, to keep the others to a
    quarter of the cap)."""
    from blockstore.cache.layout import DB_META, U64

    data, digest = make_blob(8 * CHUNK_SIZE, seed=33)
    fill(cache_dir, [(data, digest)])
    with ChunkStore(cache_dir) as store:

        def flip_a_high_bit(txn):
            stored = U64.unpack(txn.get(b"stored_bytes", db=store.dbs[DB_META]))[0]
            txn.put(b"stored_bytes", U64.pack(stored | 1 << 40), db=store.dbs[DB_META])

        store.env.write(flip_a_high_bit)
    where = ("--cache-dir", str(cache_dir))
    result = run_cli("cache", "gc", "--cache-size", str(16 * CHUNK_SIZE), *where)
    assert result.returncode == 0, result.stderr
    assert "pinned" not in result.stderr, result.stderr
    assert result.stderr.count("counted again") == 1, result.stderr
    stats = json.loads(run_cli("cache", "stats", "--json", *where).stdout)
    assert stats["stored_bytes"] == len(data) and stats["evictions"] == 0, stats
    with ChunkStore(cache_dir) as store:
        [info] = store.blobs()
        assert info.present == 8
        assert store.verify().ok


def test_gc_left_over_its_cap_by_pins_says_so(cache_dir):
    """A pinned blob of 6 chunks and an unpinned one, then `cache gc` to a cap of 2
    chunks: the unpinned blob is evicted, the pinned one kept, and gc, still over the
    cap, says the pinned layers hold it there and how to let them go (and `--json`
    gives the pinned bytes); without pins over the cap, no such line."""
    pinned = make_blob(6 * CHUNK_SIZE, seed=50)
    loose = make_blob(3 * CHUNK_SIZE, seed=51)
    fill(cache_dir, [pinned, loose])
    where = ["--cache-dir", str(cache_dir)]
    assert run_cli("cache", "pin", pinned[1], *where).returncode == 0
    result = run_cli("cache", "gc", "--cache-size", str(2 * CHUNK_SIZE), *where)
    assert result.returncode == 0, result.stderr
    assert "over the cap: pinned layers hold 192.0 KiB" in result.stdout
    assert "blockstore cache unpin IMAGE|DIGEST" in result.stdout
    report = json.loads(run_cli("cache", "gc", "--json", *where).stdout)
    assert report["pinned_bytes"] == 6 * CHUNK_SIZE > report["size_cap"]
    assert run_cli("cache", "unpin", pinned[1], *where).returncode == 0
    result = run_cli("cache", "gc", *where)
    assert result.returncode == 0 and "over the cap" not in result.stdout, result.stdout


def test_unpin_of_a_blob_never_pinned_says_so(cache_dir):
    """Tried: `cache pin` of one cached blob, then `cache unpin` of it and of another
    cached blob never pinned, in text and in `--json`. Must hold: the pinned one is
    said unpinned, the other "was not pinned" (and under `not_pinned`), and both end
    unpinned. Before, both were said "unpinned", which tells a user who mistyped which
    layer they meant that the pin they wanted gone is gone."""
    pinned = make_blob(2 * CHUNK_SIZE, seed=53)
    loose = make_blob(2 * CHUNK_SIZE, seed=54)
    fill(cache_dir, [pinned, loose])
    where = ["--cache-dir", str(cache_dir)]
    assert run_cli("cache", "pin", pinned[1], *where).returncode == 0
    result = run_cli("cache", "unpin", pinned[1], loose[1], *where)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"unpinned {pinned[1]}", f"was not pinned {loose[1]}"]
    again = json.loads(run_cli("cache", "unpin", "--json", pinned[1], *where).stdout)
    assert again["unpinned"] == [] and again["not_pinned"] == [pinned[1]]
    with ChunkStore(cache_dir) as store:
        assert not store.lookup(pinned[1]).pinned and not store.lookup(loose[1]).pinned


def test_pin_of_a_digest_not_cached_is_not_found(cache_dir):
    """Tried: `cache pin` and `cache unpin` of a digest the cache holds nothing of, named
    after a cached blob. Must hold: exit 3 (not found, as for an image the cache does
    not know) and one line naming the digest; the cached blob named with it is left as
    it was. Before, exit 8, which says the cache cannot be opened or written."""
    data, digest = make_blob(2 * CHUNK_SIZE, seed=52)
    fill(cache_dir, [(data, digest)])
    unknown = "sha256:" + "0" * 64
    for action in ("pin", "unpin"):
        result = run_cli("cache", action, digest, unknown, "--cache-dir", str(cache_dir))
        assert result.returncode == 3, result.stderr
        assert result.stderr == f"blockstore: no blob {unknown} in the cache\n"
    with ChunkStore(cache_dir) as store:
        assert not store.lookup(digest).pinned


def test_rm_of_a_digest_not_cached_is_not_found_and_removes_nothing(cache_dir):
    """Tried: `cache rm` of a cached blob's digest and of one the cache holds nothing of;
    then `cache rm` of the cached one twice. Must hold: the first exits 3 naming the
    unknown digest and removes nothing (the cached blob stays); the second removes the
    blob; the third exits 3, as a second rm of an image does. Before, an unknown digest
    was "nothing to remove", exit 0, and the blob named with it was removed."""
    data, digest = make_blob(2 * CHUNK_SIZE, seed=53)
    fill(cache_dir, [(data, digest)])
    unknown = "sha256:" + "0" * 64
    mixed = run_cli("cache", "rm", digest, unknown, "--cache-dir", str(cache_dir))
    assert mixed.returncode == 3, mixed.stderr
    assert mixed.stderr == f"blockstore: no blob {unknown} in the cache\n"
    with ChunkStore(cache_dir) as store:
        assert store.lookup(digest) is not None
    removed = run_cli("cache", "rm", digest, "--cache-dir", str(cache_dir))
    assert (removed.returncode, removed.stdout) == (0, f"removed {digest}\n"), removed.stderr
    again = run_cli("cache", "rm", digest, "--cache-dir", str(cache_dir))
    assert again.returncode == 3 and f"no blob {digest}" in again.stderr, again.stderr


def test_cache_dir_from_the_environment(tmp_path):
    """BLOCKSTORE_CACHE_DIR chooses the cache when --cache-dir is not given. A cache
    command only looks after a cache: where there is none it says so (exit 8) and
    makes nothing; nor in an empty directory (before, it made a cache there and said
    it was sound, after a cache directory was deleted and made anew)."""
    import os
    import subprocess
    import sys

    from cache_rig import REPO

    from blockstore.cache import ChunkStore

    chosen = tmp_path / "envcache"
    env = {**os.environ, "BLOCKSTORE_CACHE_DIR": str(chosen)}

    def stats() -> subprocess.CompletedProcess:
        argv = [sys.executable, "-m", "blockstore", "cache", "stats"]
        return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)

    missing = stats()
    assert missing.returncode == 8
    assert missing.stderr.strip() == (
        f"blockstore: no cache at {chosen}: nothing was ever kept there; name the cache "
        "mount, serve or prefetch used with --cache-dir (or $BLOCKSTORE_CACHE_DIR)"
    )
    assert not chosen.exists()
    chosen.mkdir()  # a directory made anew, or by hand, holds no cache either
    empty = stats()
    assert empty.returncode == 8
    assert empty.stderr.strip() == (
        f"blockstore: no cache at {chosen}: the directory holds no data.mdb; name the "
        "cache mount, serve or prefetch used with --cache-dir (or $BLOCKSTORE_CACHE_DIR)"
    )
    assert not any(chosen.iterdir())
    ChunkStore(chosen).close()
    result = stats()
    assert result.returncode == 0, result.stderr
    assert str(chosen) in result.stdout


def test_a_cache_dir_that_cannot_be_one_is_refused_in_one_line(tmp_path):
    """``--cache-dir ''`` would be the current directory: a usage error (exit 2). A file
    named as the directory, or as one above it: exit 8, saying why in words. Neither
    leaves a cache file behind."""
    empty = run_cli("cache", "ls", "--cache-dir", "")
    assert empty.returncode == 2 and "an empty name is no cache directory" in empty.stderr
    assert not (REPO / "data.mdb").exists()  # run_cli's working directory
    a_file = tmp_path / "image.erofs"
    a_file.write_bytes(b"not a directory")
    refused = run_cli("cache", "ls", "--cache-dir", str(a_file))
    assert refused.returncode == 8, refused.stderr
    assert refused.stderr.strip() == (
        f"blockstore: cannot open the cache at {a_file}: it is not a directory"
    )
    assert a_file.read_bytes() == b"not a directory"
    # A directory that cannot be made: the reason, not Python's "[Errno 2] ...", and what
    # to do.
    unmakeable = a_file / "cache"
    refused = run_cli("prefetch", "127.0.0.1:5000/x:v1", "--cache-dir", str(unmakeable))
    assert refused.returncode == 8, refused.stderr
    assert refused.stderr.strip() == (
        f"blockstore: cannot open the cache at {unmakeable}: Not a directory; "
        "give another --cache-dir"
    )


def test_a_cache_command_finding_no_cache_says_how_to_name_the_one_used(tmp_path):
    """Tried: ``cache ls`` where there is no cache, as a user meets it whose mounts ran
    under ``sudo`` (root's cache is under root's home), or who gave another
    ``--cache-dir`` to ``prefetch``: a directory that does not exist, and one holding no
    ``data.mdb``. Must hold: exit 8, and the line says how to name the cache that was
    used; before, it said only that there was no cache there."""
    for where in (tmp_path / "none", tmp_path):
        refused = run_cli("cache", "ls", "--cache-dir", str(where))
        assert refused.returncode == 8, refused.stderr
        assert refused.stderr.strip().startswith(f"blockstore: no cache at {where}: ")
        assert refused.stderr.strip().endswith(
            "; name the cache mount, serve or prefetch used with --cache-dir "
            "(or $BLOCKSTORE_CACHE_DIR)"
        ), refused.stderr


@pytest.mark.parametrize("command", ["rm", "pin", "unpin"])
def test_a_mistyped_digest_is_a_usage_error_not_an_image_name(cache_dir, command):
    """``cache rm sha256:0000``: a digest cut short is refused as an invalid digest
    (exit 2), not looked up as an image named "sha256" on Docker Hub (exit 3)."""
    ChunkStore(cache_dir).close()
    result = run_cli("cache", command, "sha256:0000", "--cache-dir", str(cache_dir))
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().startswith("blockstore: invalid digest 'sha256:0000'")


def test_a_registry_host_named_sha256_is_still_an_image(cache_dir):
    """``sha256:5000/app:v1`` holds a slash, so it cannot be a digest: it is looked up as
    the image on the registry host ``sha256`` (not cached here: exit 3, naming it)."""
    ChunkStore(cache_dir).close()
    result = run_cli("cache", "rm", "sha256:5000/app:v1", "--cache-dir", str(cache_dir))
    assert result.returncode == 3, result.stderr
    assert "no image sha256:5000/app:v1 in the cache" in result.stderr


def test_an_image_opened_by_tag_is_named_by_its_manifest_digest(cache_dir):
    """Tried: an image kept as opened by tag, then `cache pin REPO@DIGEST` with its
    manifest's digest (what `inspect` shows), and the same digest under another
    repository. Must hold: the first pins both its layers and marks the image pinned;
    the second is not found (exit 3), as a registry would not take it either. Before,
    the digest form was matched only against an image opened by that very digest."""
    base = make_blob(2 * CHUNK_SIZE, seed=55)
    top = make_blob(2 * CHUNK_SIZE, seed=56)
    fill(cache_dir, [base, top])
    manifest = "sha256:" + "d" * 64
    record = {
        "reference": "127.0.0.1:5000/demo/img:v1",
        "platform": None,
        "manifest_digest": manifest,
        "platforms": [],
        "layers": [
            {"index": i, "digest": d, "size": len(b), "mediaType": "x"}
            for i, (b, d) in enumerate([base, top])
        ],
    }
    with ChunkStore(cache_dir) as store:
        store.images.put(record["reference"], None, record)
    where = ["--cache-dir", str(cache_dir)]
    other = run_cli("cache", "pin", f"127.0.0.1:5000/demo/other@{manifest}", *where)
    assert other.returncode == 3, other.stderr
    result = run_cli("cache", "pin", f"127.0.0.1:5000/demo/img@{manifest}", *where)
    assert result.returncode == 0, result.stderr
    with ChunkStore(cache_dir) as store:
        assert store.lookup(base[1]).pinned and store.lookup(top[1]).pinned
        assert store.images.get(record["reference"], None)["pinned"]


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_verify_on_a_full_disk_says_it_could_not_drop_what_it_found_bad(tmp_path):
    """Tried: two sealed 3 MiB blobs on a 16 MiB tmpfs, compacted (no free page left in
    the file), a bit flipped in twelve chunks of the newer one by writing the file
    itself, the rest of the disk filled, then `cache verify`. Must hold: exit 8, and
    nothing says the bad chunks were dropped: the last line says the disk is full, so
    they could not be, and to run verify again with room; once there is room, `verify`
    drops all twelve (exit 6) and a third run finds nothing bad (exit 0). Before, each
    bad chunk was logged as "dropped", then the commit met the full disk and the only
    error was "the disk holding the cache is full" (exit 8), every bad chunk kept."""
    disk = tmp_path / "small"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)], check=True)
    try:
        cache_dir = disk / "cache"
        new = make_blob(3 << 20, seed=91)
        fill(cache_dir, [make_blob(3 << 20, seed=90), new])
        assert run_cli("cache", "compact", "--cache-dir", str(cache_dir)).returncode == 0
        # Compaction removes the lock file: the next open makes it, while there is room.
        assert run_cli("cache", "stats", "--cache-dir", str(cache_dir)).returncode == 0
        data = cache_dir / "data.mdb"
        values = regions(data)["values"][-96::8]  # chunks of the newer blob
        with open(data, "r+b") as f:  # behind LMDB's back: its file gains no free page
            for start, _ in values:
                f.seek(start + 1000)
                byte = f.read(1)[0]
                f.seek(start + 1000)
                f.write(bytes([byte ^ 1]))
        with open(disk / "filler", "wb", buffering=0) as filler, contextlib.suppress(OSError):
            while True:
                filler.write(bytes(1 << 16))

        full = run_cli("cache", "verify", "--cache-dir", str(cache_dir))

        assert full.returncode == 8, full.stdout + full.stderr
        assert "bad: dropped" not in full.stderr and "Traceback" not in full.stderr, full.stderr
        last = full.stderr.splitlines()[-1]
        assert f"the disk holding the cache at {cache_dir} is full" in last, last
        assert "could not be dropped" in last and "run verify again" in last, last
        (disk / "filler").unlink()
        again = run_cli("cache", "verify", "--cache-dir", str(cache_dir))
        assert again.returncode == 6, again.stdout + again.stderr
        dropped = [line for line in again.stdout.splitlines() if line.startswith("bad chunk")]
        assert len(dropped) == 12, again.stdout
        assert all(new[1] in line and line.endswith(": dropped") for line in dropped), dropped
        third = run_cli("cache", "verify", "--cache-dir", str(cache_dir))
        assert third.returncode == 0, third.stdout + third.stderr
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_an_image_not_kept_is_told_what_the_cache_keeps_of_its_repository(cache_dir):
    """Tried: an image kept as ``demo/img:v1`` for linux/amd64, then ``cache pin`` and
    ``serve --offline`` of ``demo/img:latest``, ``serve --offline --platform
    linux/arm64`` of ``demo/img:v1``, and ``cache pin`` of another repository. Must hold:
    exit 3 and 9 as before, each message naming what the cache keeps of the
    repository (the image and the platform it is kept for), or that it keeps none.
    Before, only "not in the cache", and no command lists the images a cache keeps."""
    blob = make_blob(CHUNK_SIZE, seed=57)
    fill(cache_dir, [blob])
    record = {
        "reference": "127.0.0.1:5000/demo/img:v1",
        "platform": None,
        "manifest_digest": "sha256:" + "e" * 64,
        "platforms": [],
        "layers": [{"index": 0, "digest": blob[1], "size": len(blob[0]), "mediaType": "x"}],
    }
    with ChunkStore(cache_dir) as store:
        store.images.put(record["reference"], "linux/amd64", record)
    where = ["--cache-dir", str(cache_dir)]
    kept = "it keeps 127.0.0.1:5000/demo/img:v1 (linux/amd64)"
    pinned = run_cli("cache", "pin", "127.0.0.1:5000/demo/img:latest", *where)
    assert pinned.returncode == 3, pinned.stderr
    assert pinned.stderr.strip().endswith(f"in the cache; {kept}"), pinned.stderr
    for image, platform in [("img:latest", "linux/amd64"), ("img:v1", "linux/arm64")]:
        served = run_cli(
            "serve", f"127.0.0.1:5000/demo/{image}", "--offline", "--platform", platform, *where
        )
        assert served.returncode == 9, served.stderr
        assert served.stderr.strip().endswith(f"(cache rm); {kept}"), served.stderr
    other = run_cli("cache", "pin", "127.0.0.1:5000/demo/other:v1", *where)
    assert other.returncode == 3, other.stderr
    assert other.stderr.strip().endswith("it keeps no image of 127.0.0.1:5000/demo/other")


def test_ls_names_the_images_each_blob_is_a_layer_of(cache_dir):
    """Tried: three blobs cached, two images kept (one of two layers, one sharing its
    base), then ``cache ls`` and ``cache ls --json``. Must hold: each row names the
    images whose layer the blob is (both for the shared base, ``-`` for a blob no image
    lists), and the JSON gives them as ``images``. Before, a row gave the digest alone,
    and no command said which image a digest was of or which images a cache keeps."""
    base, top, loose = (make_blob(CHUNK_SIZE, seed=s) for s in (61, 62, 63))
    fill(cache_dir, [base, top, loose])
    images = {"127.0.0.1:5000/demo/app:v1": [base, top], "127.0.0.1:5000/demo/base:v1": [base]}
    with ChunkStore(cache_dir) as store:
        for reference, layers in images.items():
            record = {
                "reference": reference,
                "platform": None,
                "manifest_digest": "sha256:" + "f" * 64,
                "platforms": [],
                "layers": [
                    {"index": i, "digest": d, "size": len(b), "mediaType": "x"}
                    for i, (b, d) in enumerate(layers)
                ],
            }
            store.images.put(reference, "linux/amd64", record)
    where = ["--cache-dir", str(cache_dir)]
    listing = json.loads(run_cli("cache", "ls", "--json", *where).stdout)
    assert {b["digest"]: b["images"] for b in listing} == {
        base[1]: ["127.0.0.1:5000/demo/app:v1", "127.0.0.1:5000/demo/base:v1"],
        top[1]: ["127.0.0.1:5000/demo/app:v1"],
        loose[1]: [],
    }
    shown = run_cli("cache", "ls", *where)
    assert shown.returncode == 0, shown.stderr
    header, *rows = shown.stdout.splitlines()
    assert header.endswith("LAST USE  IMAGES")
    row = {line.split()[0]: line for line in rows}
    assert row[base[1]].endswith("  127.0.0.1:5000/demo/app:v1, 127.0.0.1:5000/demo/base:v1")
    assert row[top[1]].endswith("  127.0.0.1:5000/demo/app:v1")
    assert row[loose[1]].endswith("  -")
