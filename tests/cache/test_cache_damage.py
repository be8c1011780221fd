"""A cache whose file is damaged, of another format, forked, or short of reader slots.

A cache is only a cache: losing one is fine, dying of a signal or showing a
traceback is not, and no damage may ever serve a wrong byte.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import lmdb
import pytest
from cache_rig import lockless_user, run_cli
from cache_sources import ScriptedSource, make_blob
from rig.pushed import push_erofs
from rig.small_disk import small_disk
from rig.stored_chunks import zero_tree_pages
from rig.waiting import wait_for

import blockstore.cache.damage as damage
import blockstore.cache.env as cache_env
from blockstore.cache import CHUNK_SIZE, CacheDamaged, CachedBlob, ChunkStore
from blockstore.cache.layout import (
    ALL_DBS,
    DB_BLOBS,
    DB_META,
    DB_PARTS,
    DB_REFS,
    FORMAT_VERSION,
    U64,
    UPGRADED_IN_PLACE,
    stored_format,
)
from blockstore.cache.traces import TraceShelf
from blockstore.errors import CacheError
from blockstore.image import open_image
from blockstore.prefetch import PrefetchSettings, Trace
from blockstore.prefetch.trace import UNIT
from blockstore.registry import RegistryOptions

OLDER_FORMAT = min(UPGRADED_IN_PLACE) - 1
"""An older version's format this one does not bring to its own: replaced, not read."""


def fill(cache_dir: Path, blobs, *, whole: bool = True) -> None:
    with ChunkStore(cache_dir) as store:
        for data, digest in blobs:
            blob = CachedBlob(store, digest, len(data), ScriptedSource(data, digest))
            if whole:
                blob.prefetch()
            else:
                blob.read(0, len(data) // 2)
            blob.close()


def aside(cache_dir: Path, label: str) -> list[Path]:
    return sorted(cache_dir.parent.glob(f"{cache_dir.name}.{label}-*"))


def newest_meta(cache_dir: Path) -> tuple[int, int]:
    """(last page, free-page database root) from data.mdb's newer meta page."""
    head = (cache_dir / "data.mdb").read_bytes()[: 2 * 4096]
    metas = [head[:152], head[4096 : 4096 + 152]]
    meta = max(metas, key=lambda m: struct.unpack_from("<Q", m, 144)[0])
    return struct.unpack_from("<Q", meta, 136)[0], struct.unpack_from("<Q", meta, 80)[0]


def short_of_its_last_page(cache_dir: Path) -> int:
    """Bytes by which data.mdb ends before the last page its newest meta page names."""
    return (newest_meta(cache_dir)[0] + 1) * 4096 - (cache_dir / "data.mdb").stat().st_size


def cache_ending_on_free_pages(cache: Path, data: bytes, digest: str) -> int:
    """A filled cache whose data.mdb LMDB itself left short: in a scratch database,
    chunk-sized values stored and half of them dropped (a free list to reclaim), then
    in one transaction a hundred more stored and dropped, whose pages LMDB counts but
    never writes. How many bytes short it ends."""
    fill(cache, [(data, digest)])
    env = lmdb.open(str(cache), max_dbs=32, metasync=False)
    try:
        scratch = env.open_db(b"scratch-for-this-test")
        value = bytes(CHUNK_SIZE + 8)
        with env.begin(write=True, db=scratch) as txn:
            for i in range(20):
                txn.put(b"old%d" % i, value)
        with env.begin(write=True, db=scratch) as txn:
            for i in range(0, 20, 2):
                txn.delete(b"old%d" % i)
        with env.begin(write=True, db=scratch) as txn:
            txn.put(b"marker", b"")
        with env.begin(write=True, db=scratch) as txn:
            for i in range(100):
                txn.put(b"new%d" % i, value)
            for i in range(100):
                txn.delete(b"new%d" % i)
    finally:
        env.close()
    return short_of_its_last_page(cache)


def test_a_file_ending_on_free_pages_is_kept_whole(cache_dir):
    """LMDB counts pages a transaction allocated and freed again up to the meta's last
    page without writing them, so a healthy data.mdb may end megabytes short of it.
    Tried: such a cache, made by LMDB itself. Must hold: opening it moves nothing
    aside, and the blob is still whole, sealed, and reads right offline."""
    data, digest = make_blob(16 * CHUNK_SIZE, seed=64)
    short = cache_ending_on_free_pages(cache_dir, data, digest)
    assert short > 64 * 4096, "LMDB wrote every page it counted"
    with ChunkStore(cache_dir, offline=True) as store:
        record = store.lookup(digest)
        assert record is not None and record.sealed and record.present == record.chunks
        blob = CachedBlob(store, digest, len(data), None)
        assert b"".join(bytes(b) for b in blob.read(0, len(data))) == data
    assert not aside(cache_dir, "damaged")


def test_no_file_lmdb_writes_is_called_damaged(tmp_path):
    """Tried: on fresh LMDB files, seeded random transactions of puts (inline and
    overflow values) and deletes, as a cache's chunks and records come and go. Must
    hold: after every commit the file passes the damage check; and some of them did
    end short of their last page, so the rule was put to the test."""
    short = 0
    for seed in range(30):
        rng = random.Random(seed)
        env = lmdb.open(str(tmp_path / f"env{seed}"), max_dbs=4, metasync=False)
        try:
            db = env.open_db(b"values")
            for _ in range(40):
                with env.begin(write=True, db=db) as txn:
                    for _ in range(rng.randrange(1, 20)):
                        key = b"%d" % rng.randrange(200)
                        if rng.random() < 0.6:
                            txn.put(key, bytes(rng.choice([100, 5000, CHUNK_SIZE + 8])))
                        else:
                            txn.delete(key)
                assert damage.file_damage(tmp_path / f"env{seed}") is None, seed
                short += short_of_its_last_page(tmp_path / f"env{seed}") > 0
        finally:
            env.close()
    assert short, "no file ended short of its last page"


def test_a_file_cut_by_one_page_in_use_is_moved_aside(cache_dir):
    """The other side of the free-page rule. Tried: a healthy cache cut just below its
    highest page that LMDB's free list does not hold. Must hold: it is damaged at open,
    moved aside before it is mapped, and an empty cache takes its place."""
    data, digest = make_blob(16 * CHUNK_SIZE, seed=65)
    fill(cache_dir, [(data, digest)])
    path = cache_dir / "data.mdb"
    last, root = newest_meta(cache_dir)
    free = damage._free_pages(path, 4096, path.stat().st_size, root)
    assert free is not None
    in_use = max(p for p in range(2, last + 1) if p not in free)
    os.truncate(path, in_use * 4096)
    with ChunkStore(cache_dir) as store:
        assert store.lookup(digest) is None
    assert len(aside(cache_dir, "damaged")) == 1


def test_a_truncated_file_is_moved_aside_never_mapped(cache_dir):
    """data.mdb cut to half its length (it used to end every command in SIGBUS): `cache
    stats` exits 0 with one line saying the cache was moved aside and shows an empty cache;
    cut again, `cache verify` reports the damage (exit 6); offline, opening it is a
    CacheDamaged (exit 8) and `serve --offline` exits 8 with a one-line error; online, a
    blob reads right through the empty cache that replaced it."""
    data, digest = make_blob(40 * CHUNK_SIZE, seed=60)

    def cut() -> None:
        fill(cache_dir, [(data, digest)])
        path = cache_dir / "data.mdb"
        os.truncate(path, path.stat().st_size // 2)

    cut()
    result = run_cli("cache", "stats", "--json", "--cache-dir", str(cache_dir))
    assert result.returncode == 0, result.stderr
    assert "damaged" in result.stderr and "Traceback" not in result.stderr
    assert '"blobs": 0' in result.stdout
    assert len(aside(cache_dir, "damaged")) == 1

    cut()
    result = run_cli("cache", "verify", "--cache-dir", str(cache_dir))
    assert result.returncode == 6, result.stdout + result.stderr
    assert "damaged and moved aside" in result.stdout

    cut()
    with pytest.raises(CacheDamaged) as caught:
        ChunkStore(cache_dir, offline=True)
    assert caught.value.exit_code == 8 and "offline" in str(caught.value)

    cut()
    result = run_cli(
        "serve",
        "127.0.0.1:1/any/image:v1",
        "--offline",
        "--cache-dir",
        str(cache_dir),
        "--listen",
        "127.0.0.1:0",
    )
    assert result.returncode == 8, result.stdout + result.stderr
    assert "damaged" in result.stderr and "Traceback" not in result.stderr
    assert len(aside(cache_dir, "damaged")) == 4

    with ChunkStore(cache_dir) as store:
        blob = CachedBlob(store, digest, len(data), ScriptedSource(data, digest))
        assert b"".join(blob.read(0, len(data))) == data
        blob.close()


def test_a_damaged_cache_that_cannot_be_moved_aside_says_what_to_do(tmp_path):
    """Tried: data.mdb cut short in a cache directory that is a mount point (a volume
    given to the cache), so it cannot be renamed aside. Must hold: `cache stats` exits 8
    in one line saying the cache cannot be moved aside and what to do instead (move its
    files out, or use another --cache-dir); done, a new cache starts there. Before, the
    line ended with the rename's ``[Errno 16]`` and both paths, and said nothing of what
    to do: every command failed so for good."""
    data, digest = make_blob(8 * CHUNK_SIZE, seed=67)
    with small_disk(tmp_path / "volume", "16M") as cache_dir:
        fill(cache_dir, [(data, digest)])
        os.truncate(cache_dir / "data.mdb", (cache_dir / "data.mdb").stat().st_size // 2)
        result = run_cli("cache", "stats", "--cache-dir", str(cache_dir))
        assert result.returncode == 8, result.stderr
        [line] = result.stderr.splitlines()
        assert "cannot be moved aside (Device or resource busy)" in line, line
        assert "move its files out of that directory" in line, line
        for name in ("data.mdb", "lock.mdb"):
            (cache_dir / name).unlink()
        fill(cache_dir, [(data, digest)])
        result = run_cli("cache", "stats", "--json", "--cache-dir", str(cache_dir))
        assert result.returncode == 0, result.stderr
        assert '"blobs": 1' in result.stdout


def test_a_prefetch_finding_a_cache_it_cannot_move_aside_damaged_stops_at_once(tmp_path):
    """Tried: a 32 MiB blob read at its start into a cache that is a mount point (so it
    cannot be renamed aside), then prefetched, its B-tree pages zeroed as the prefetch's
    first fetch starts. Must hold: the prefetch raises ``CacheDamaged`` (exit 8) saying
    the cache is damaged and cannot be moved aside, having fetched the blob no more than
    once. Before, it fetched it three times over (nothing fetched was kept) and then
    said parts of it "went as it was filled (evicted under the cap...)"."""
    data, digest = make_blob(1024 * CHUNK_SIZE, seed=71)
    with small_disk(tmp_path / "volume", "128M") as cache_dir:

        class Damaging(ScriptedSource):
            def read_range(self, offset: int, length: int) -> bytes:
                if len(self.requests) == 1:  # the prefetch's first
                    assert zero_tree_pages(cache_dir) > 0
                return super().read_range(offset, length)

        source = Damaging(data, digest)
        with ChunkStore(cache_dir) as store:
            blob = CachedBlob(store, digest, len(data), source)
            assert b"".join(blob.read(0, 100)) == data[:100]
            with pytest.raises(CacheDamaged) as raised:
                blob.prefetch()
            blob.close()
    assert raised.value.exit_code == 8
    assert f"the cache at {cache_dir} is damaged: " in str(raised.value), raised.value
    assert "cannot be moved aside (Device or resource busy)" in str(raised.value)
    assert sum(length for _, length in source.requests[1:]) <= len(data)


def fetched(source: ScriptedSource) -> int:
    return sum(length for _, length in source.requests)


def test_a_fill_round_under_way_stops_when_the_cache_is_lost(tmp_path, caplog):
    """Tried: a 16 MiB blob opened with fill at an eighth of it a second, its cache a
    mount point (so it cannot be renamed aside); a second into the fill's first round,
    the cache's B-tree pages are zeroed and a read finds the damage. Must hold: the read
    is right; the fill ends within two seconds, having fetched less than a quarter of
    the blob more, saying the cache keeps nothing. Before, the round under way went on
    to its end (eight seconds, the whole blob) before the fill looked at the cache."""
    data, digest = make_blob(512 * CHUNK_SIZE, seed=79)
    settings = PrefetchSettings(readahead=False, fill=True, fill_rate=len(data) // 8)
    with small_disk(tmp_path / "volume", "64M") as cache_dir, ChunkStore(cache_dir) as store:
        source = ScriptedSource(data, digest)
        blob = CachedBlob(store, digest, len(data), source, settings=settings)
        try:
            time.sleep(1)
            # Looked for before the loss: once lost, the fill may end before a look after.
            filling = [t for t in threading.enumerate() if t.name == "prefetch-start"]
            assert filling
            assert zero_tree_pages(cache_dir) > 0
            assert b"".join(blob.read(len(data) - 100, 100)) == data[-100:]
            assert store.lost() is not None
            before = fetched(source)
            assert wait_for(lambda: not any(t.is_alive() for t in filling), 2.0)
            assert fetched(source) - before < len(data) // 4, (fetched(source), before)
        finally:
            blob.close()
    assert "not filled, as the cache keeps nothing" in caplog.text, caplog.text


def test_a_lost_cache_reads_nothing_ahead(tmp_path):
    """Tried: a 32 MiB blob with readahead, its cache a mount point (so it cannot be
    renamed aside); a read, then the cache's B-tree pages zeroed and a read finding the
    damage; then the first 16 MiB read in order, 128 KiB at a time. Must hold: every
    byte is right, and the source is asked for those 16 MiB once: nothing ahead. Before,
    readahead went on fetching ahead of the reads for a cache that kept none of it, and
    each read fetched its bytes again: three times the bytes read."""
    data, digest = make_blob(1024 * CHUNK_SIZE, seed=83)
    with small_disk(tmp_path / "volume", "64M") as cache_dir, ChunkStore(cache_dir) as store:
        source = ScriptedSource(data, digest)
        blob = CachedBlob(store, digest, len(data), source, settings=PrefetchSettings())
        try:
            assert b"".join(blob.read(0, 100)) == data[:100]
            assert zero_tree_pages(cache_dir) > 0
            assert b"".join(blob.read(len(data) - 100, 100)) == data[-100:]
            assert store.lost() is not None
            before, step, end = fetched(source), 128 << 10, 16 << 20
            for offset in range(0, end, step):
                assert b"".join(blob.read(offset, step)) == data[offset : offset + step]
            time.sleep(0.5)  # readahead queued off the read path has gone out, if any
            assert fetched(source) - before == end, (fetched(source) - before, end)
        finally:
            blob.close()


def test_a_trace_replay_stops_when_the_cache_is_lost(tmp_path):
    """Tried: a 64 MiB blob whose kept access trace reads it whole, opened with trace
    replay from a source taking a second a request, its cache a mount point (so it
    cannot be renamed aside); half a second into the replay (all of it queued within the
    prefetch budget), the cache's B-tree pages zeroed and a read finding the damage.
    Must hold: the read is right; once what was on its way has come, the replay asks
    the source for nothing more, having fetched less than half the blob. Before, every
    range it had queued was still fetched: all of the blob, for a cache that kept none
    of it."""
    data, digest = make_blob(2048 * CHUNK_SIZE, seed=97)
    with small_disk(tmp_path / "volume", "128M") as cache_dir, ChunkStore(cache_dir) as store:
        TraceShelf(store).put(Trace(digest, UNIT, time.time(), [(0, 0, len(data) // UNIT)]))
        source = ScriptedSource(data, digest, delay=1.0)
        replay = PrefetchSettings(readahead=False, trace_replay=True)
        blob = CachedBlob(store, digest, len(data), source, settings=replay)
        try:
            time.sleep(0.5)
            assert zero_tree_pages(cache_dir) > 0
            assert b"".join(blob.read(len(data) - 100, 100)) == data[-100:]
            assert store.lost() is not None
            time.sleep(3)  # what was on its way before the loss has come
            asked = len(source.requests)
            time.sleep(1)
            assert len(source.requests) == asked, "the replay went on"
            assert fetched(source) < len(data) // 2, (fetched(source), len(data))
        finally:
            blob.close()


def test_a_cache_command_finding_damage_it_cannot_move_aside_says_it_in_one_line(tmp_path):
    """Tried: a cache that is a mount point (so it cannot be renamed aside) holding a
    blob, the leaf pages holding its digest zeroed (found only once read, not when the
    cache opens); then `cache stats` and `cache pin` of the blob. Must hold: each exits 8
    in one line saying the cache is damaged and cannot be moved aside. Before, each
    first warned that "until restarted, this process goes on without it", as a server
    does; `cache stats` then gave the same words again as its error, and `cache pin`
    said there was no such blob in the cache (exit 3)."""
    data, digest = make_blob(8 * CHUNK_SIZE, seed=73)
    with small_disk(tmp_path / "volume", "16M") as cache_dir:
        fill(cache_dir, [(data, digest)])
        raw = (cache_dir / "data.mdb").read_bytes()
        with open(cache_dir / "data.mdb", "r+b") as f:
            for pgno in range(2, len(raw) // 4096):
                page = raw[pgno * 4096 : (pgno + 1) * 4096]
                if page[10] & 0x2 and digest.encode() in page:  # P_LEAF
                    f.seek(pgno * 4096)
                    f.write(bytes(4096))
        for command in (["stats"], ["pin", digest]):
            result = run_cli("cache", *command, "--cache-dir", str(cache_dir))
            assert result.returncode == 8, (command, result.stderr)
            [line] = result.stderr.splitlines()
            assert f"the cache at {cache_dir} is damaged: " in line, line
            assert "cannot be moved aside (Device or resource busy)" in line, line


def test_a_damaged_cache_whose_parent_this_user_cannot_read_says_what_to_do():
    """Tried: user nobody's cache, data.mdb not an LMDB file, in a directory of root's
    that others may pass through but not read or write (0711), so the cache can be
    neither renamed aside nor its parent opened to take turns at that; then `cache stats`
    as nobody. Must hold: exit 8 in one line saying the cache is damaged, cannot be moved
    aside (Permission denied), and what to do. Before, it exited 1 with only
    "[Errno 13] Permission denied" and the parent's path."""
    if os.geteuid() != 0:
        pytest.skip("needs root, to act as root and as another user")
    base = Path(tempfile.mkdtemp(prefix="bs-users-"))  # not under pytest's 0700 directory
    try:
        cache = base / "cache"
        cache.mkdir()
        (cache / "data.mdb").write_bytes(bytes(8192))
        for path in (cache, cache / "data.mdb"):
            shutil.chown(path, "nobody")
        base.chmod(0o711)
        stats = [sys.executable, "-m", "blockstore", "cache", "stats", "--cache-dir", str(cache)]
        result = subprocess.run(
            ["runuser", "-u", "nobody", "--", *stats], capture_output=True, text=True, timeout=60
        )
    finally:
        shutil.rmtree(base)
    if "No module named" in result.stderr:
        pytest.skip("this checkout cannot be run by user nobody")
    assert result.returncode == 8, result.stderr
    [line] = result.stderr.splitlines()
    assert f"the cache at {cache} is damaged" in line, line
    assert "cannot be moved aside (Permission denied)" in line, line
    assert "move its files out of that directory" in line, line


def test_damage_found_while_serving_costs_the_cache_not_the_read(cache_dir):
    """The B-tree pages of an open cache zeroed under it (LMDB then reports corrupted
    pages): offline, a read is EIO, not a crash; online, reads are served right, from the
    source, the damaged cache moved aside for an empty one that fills again. The same when
    the damage is found by an export opened after it."""
    data, digest = make_blob(6 * CHUNK_SIZE, seed=61)
    fill(cache_dir, [(data, digest)])
    with ChunkStore(cache_dir) as store:
        source = ScriptedSource(data, digest)
        online = CachedBlob(store, digest, len(data), source)
        offline = CachedBlob(store, digest, len(data), None)
        assert zero_tree_pages(cache_dir) > 0
        with pytest.raises(OSError):
            offline.read(0, 100)
        assert b"".join(online.read(0, len(data))) == data
        assert source.requests  # fetched again: the cache that was there is gone
        assert len(aside(cache_dir, "damaged")) == 1
        requests = len(source.requests)
        assert b"".join(online.read(0, len(data))) == data
        assert len(source.requests) == requests  # served from the new cache
        online.close()
    fill(cache_dir, [(data, digest)])
    with ChunkStore(cache_dir) as store:
        assert zero_tree_pages(cache_dir) > 0  # found this time by the blob's first look
        source = ScriptedSource(data, digest)
        late = CachedBlob(store, digest, len(data), source)
        assert b"".join(late.read(0, len(data))) == data
        assert source.requests and len(aside(cache_dir, "damaged")) == 2
        late.close()


def test_a_stored_record_that_does_not_parse_is_damage_not_a_traceback(cache_dir):
    """A blob's record cut to 3 bytes (it used to end `cache ls` in a struct.error
    traceback): `cache ls` exits 0, says the cache was damaged and moved aside, and lists
    the empty cache; an online read through a store that finds it is right."""
    data, digest = make_blob(3 * CHUNK_SIZE, seed=66)
    fill(cache_dir, [(data, digest)])
    with ChunkStore(cache_dir) as store:
        store.env.write(lambda txn: txn.put(digest.encode(), b"abc", db=store.dbs[DB_BLOBS]))
    result = run_cli("cache", "ls", "--json", "--cache-dir", str(cache_dir))
    assert result.returncode == 0, result.stderr
    assert "damaged" in result.stderr and "Traceback" not in result.stderr
    assert result.stdout.strip() == "[]"
    fill(cache_dir, [(data, digest)])
    with ChunkStore(cache_dir) as store:
        store.env.write(lambda txn: txn.put(digest.encode(), b"abc", db=store.dbs[DB_BLOBS]))
        blob = CachedBlob(store, digest, len(data), ScriptedSource(data, digest))
        assert b"".join(blob.read(0, len(data))) == data
        blob.close()
    assert len(aside(cache_dir, "damaged")) == 2


def test_a_damaged_offline_record_is_a_cache_error_and_verify_drops_it(cache_dir):
    """A stored reference record that is no longer JSON: resolving it offline is a
    CacheError (exit 8, no traceback); `cache rm` of another image is not stopped by it
    (it warns and says that image is not cached); `cache verify` reports it as damage
    (exit 6) and drops it; the next verify is clean."""
    with ChunkStore(cache_dir) as store:
        key = b"127.0.0.1:5000/demo/app:v1\0linux/amd64"
        store.env.write(lambda txn: txn.put(key, b'{"reference": "127.0', db=store.dbs[DB_REFS]))
    with pytest.raises(CacheError, match="damaged"):
        open_image(
            "127.0.0.1:5000/demo/app:v1", cache_dir=cache_dir, platform="linux/amd64", offline=True
        ).close()
    result = run_cli("cache", "rm", "127.0.0.1:5000/demo/other:v1", "--cache-dir", str(cache_dir))
    assert result.returncode == 3 and "no image" in result.stderr, result.stdout + result.stderr
    assert "damaged" in result.stderr and "Traceback" not in result.stderr
    result = run_cli("cache", "verify", "--cache-dir", str(cache_dir))
    assert result.returncode == 6, result.stdout + result.stderr
    assert "the cached record of 127.0.0.1:5000/demo/app:v1 is damaged: dropped" in result.stdout
    result = run_cli("cache", "verify", "--cache-dir", str(cache_dir))
    assert result.returncode == 0, result.stdout + result.stderr


def _change_layer_digest(raw: bytes) -> bytes:
    record = json.loads(raw)
    digest = record["layers"][0]["digest"]
    record["layers"][0]["digest"] = digest[:-1] + ("0" if digest[-1] != "0" else "1")
    return json.dumps(record, sort_keys=True).encode()


def _change_one_byte(raw: bytes) -> bytes:
    return raw.replace(b'"size"', b'"sizf"', 1)


@pytest.mark.parametrize(
    ("db", "change"), [(DB_REFS, _change_layer_digest), (b"manifests", _change_one_byte)]
)
def test_an_offline_record_that_says_other_than_its_manifest_is_damage(
    registry, erofs_images, cache_dir, db, change
):
    """Tried: an image prefetched, then one hex digit of its kept record's layer digest
    changed, or one byte of the manifest kept beside it; then an offline open, and
    ``cache verify``. Must hold: the open is a CacheError naming the record as damaged
    (exit 8 for a command), never an export of a blob the image does not have; verify
    drops the record (exit 6); the open then says the image is not cached (exit 9).
    Before, the server said it was ready and every read was EIO, and verify said ok."""
    from blockstore.errors import ImageNotCached

    reference = push_erofs(registry.host, "damage/record", "v1", [erofs_images.small.path])
    prefetch = ("prefetch", reference, "--insecure", "--cache-dir", str(cache_dir))
    assert run_cli(*prefetch).returncode == 0
    with ChunkStore(cache_dir) as store:

        def work(txn) -> None:
            ((key, raw),) = [(bytes(k), bytes(v)) for k, v in txn.cursor(db=store.dbs[db])]
            txn.put(key, change(raw), db=store.dbs[db])

        store.env.write(work)
    with pytest.raises(CacheError, match=f"the cached record of {reference} is damaged: its"):
        open_image(reference, cache_dir=cache_dir, offline=True).close()
    served = run_cli(
        "serve", reference, "--offline", "--cache-dir", str(cache_dir), "--listen", "127.0.0.1:0"
    )
    assert served.returncode == 8 and "is damaged" in served.stderr, served.stderr
    verified = run_cli("cache", "verify", "--cache-dir", str(cache_dir))
    assert verified.returncode == 6, verified.stdout + verified.stderr
    assert f"the cached record of {reference} is damaged: dropped" in verified.stdout
    with pytest.raises(ImageNotCached):
        open_image(reference, cache_dir=cache_dir, offline=True).close()


def _rewrite_record(store: ChunkStore, digest: str, change) -> None:
    """Change a blob's stored record as a flipped bit on the disk would."""
    from blockstore.cache.layout import BlobRecord

    def work(txn) -> None:
        record = BlobRecord.unpack(txn.get(digest.encode(), db=store.dbs[DB_BLOBS]))
        change(record)
        txn.put(digest.encode(), record.pack(), db=store.dbs[DB_BLOBS])

    store.env.write(work)


def _read_offline(store: ChunkStore, data: bytes, digest: str) -> bytes:
    blob = CachedBlob(store, digest, len(data), None)
    try:
        return b"".join(bytes(b) for b in blob.read(0, len(data)))
    finally:
        blob.close()


@pytest.mark.parametrize("then", ["read", "rm", "verify"])
def test_a_record_whose_id_names_another_blob_costs_that_blob_nothing(cache_dir, then):
    """Tried: blob A's record given blob B's id (B pinned and sealed; ids are consecutive,
    so one flipped bit does this), then A read offline, removed, or ``verify`` run.
    Must hold: A's record is found out and dropped with A's own chunks (A is then not
    cached: an offline read is EIO, never B's bytes); B stays whole, pinned and sealed,
    and reads byte for byte offline; the cache is not moved aside. Before, A's reads
    met B's chunks, which failed A's checks and were deleted; rm A deleted all of B;
    verify called B's chunks bad, then moved the whole cache aside."""
    a, b = make_blob(3 * CHUNK_SIZE, seed=41), make_blob(5 * CHUNK_SIZE, seed=42)
    fill(cache_dir, [a, b])
    with ChunkStore(cache_dir) as store:
        store.pin(b[1])
        b_id = store.lookup(b[1]).blob_id
        _rewrite_record(store, a[1], lambda record: setattr(record, "blob_id", b_id))
        if then == "read":
            with pytest.raises(OSError):
                _read_offline(store, a[0], a[1])
        elif then == "rm":
            assert store.remove(a[1]) is False  # dropped as damaged on the way: gone
        else:
            report = store.verify()
            assert report.damaged_records == [a[1]] and not report.bad_chunks
            assert report.damage is None
        assert store.lookup(a[1]) is None
        record = store.lookup(b[1])
        assert record.pinned and record.sealed and record.present == 5
        assert _read_offline(store, b[0], b[1]) == b[0]
        assert store.verify().ok
    assert not list(cache_dir.parent.glob("*.damaged-*"))


def test_a_damaged_record_a_command_that_looks_drops_is_said_once(cache_dir):
    """Tried: blob A's record given blob B's id (one flipped bit), then ``cache verify``,
    which opens the cache to look (``looking``) and becomes a writer at its first write
    that changes something, there the drop of A's record. Must hold: A's record is
    dropped (exit 6, A named as damaged), and the warning that says so is logged once.
    Before, it was logged twice: the drop ran first in the read transaction that looks,
    said so, then met its first delete, and ran again as a writer."""
    a, b = make_blob(3 * CHUNK_SIZE, seed=43), make_blob(5 * CHUNK_SIZE, seed=44)
    fill(cache_dir, [a, b])
    with ChunkStore(cache_dir) as store:
        b_id = store.lookup(b[1]).blob_id
        _rewrite_record(store, a[1], lambda record: setattr(record, "blob_id", b_id))
    result = run_cli("cache", "verify", "--cache-dir", str(cache_dir))
    assert result.returncode == 6, result.stdout + result.stderr
    assert f"the cached record of {a[1]} is damaged: dropped" in result.stdout
    said = f"the cache's record of {a[1]} is damaged"
    assert result.stderr.count(said) == 1, result.stderr


def test_a_lookup_meeting_a_damaged_record_returns_what_the_drop_finds(cache_dir, caplog):
    """Tried: a lookup that finds A's record damaged (B's id), where another writer makes
    A's record right again before the lookup's drop runs; then one whose drop cannot be
    written. Must hold: the first returns the record made meanwhile, not None (nothing
    of A is dropped); the second returns None with a warning, never an error, and the
    next writer drops the damaged record."""
    from blockstore.cache.layout import DB_BLOBS

    a, b = make_blob(3 * CHUNK_SIZE, seed=48), make_blob(2 * CHUNK_SIZE, seed=49)
    fill(cache_dir, [a, b])
    with ChunkStore(cache_dir) as store:
        good = store.lookup(a[1])
        b_id = store.lookup(b[1]).blob_id
        raw = store.env.write(lambda txn: bytes(txn.get(a[1].encode(), db=store.dbs[DB_BLOBS])))
        _rewrite_record(store, a[1], lambda record: setattr(record, "blob_id", b_id))
        asked = store.env.ask

        def then_made_right(question, empty):
            answer = asked(question, empty)
            store.env.write(lambda txn: txn.put(a[1].encode(), raw, db=store.dbs[DB_BLOBS]))
            return answer

        store.env.ask = then_made_right
        assert store.lookup(a[1]) == good
        del store.env.ask
        assert _read_offline(store, a[0], a[1]) == a[0]

        _rewrite_record(store, a[1], lambda record: setattr(record, "blob_id", b_id))
        writes = store.env.write

        def refused(work):
            raise CacheError("the disk is full")

        store.env.write = refused
        assert store.lookup(a[1]) is None
        assert f"the cache's damaged record of {a[1]} could not be dropped" in caplog.text
        store.env.write = writes
        assert store.remove(a[1]) is False  # the next writer drops it
        assert _read_offline(store, b[0], b[1]) == b[0]


def test_a_damaged_record_of_a_read_only_cache_is_left_and_said(cache_dir, tmp_path, caplog):
    """Tried: the same damage (A's record given B's id) in a cache then seen read-only.
    Must hold: A is looked up as not cached, with a warning naming it; nothing is
    written; B reads byte for byte."""
    from rig.read_only import read_only_view

    a, b = make_blob(3 * CHUNK_SIZE, seed=46), make_blob(4 * CHUNK_SIZE, seed=47)
    fill(cache_dir, [a, b])
    with ChunkStore(cache_dir) as store:
        b_id = store.lookup(b[1]).blob_id
        _rewrite_record(store, a[1], lambda record: setattr(record, "blob_id", b_id))
    before = (cache_dir / "data.mdb").read_bytes()
    with read_only_view(cache_dir, tmp_path / "ro") as ro, ChunkStore(ro) as store:
        assert store.read_only
        assert store.lookup(a[1]) is None
        assert f"the cache's record of {a[1]} is damaged; the cache is read-only" in caplog.text
        assert _read_offline(store, b[0], b[1]) == b[0]
    assert (cache_dir / "data.mdb").read_bytes() == before


def test_a_record_marked_sealed_without_its_sealed_entries_is_dropped(cache_dir):
    """Tried: a blob half cached, its record then marked sealed (one flipped bit of its
    flags) though it was never checked against its digest. Must hold: it is not taken
    for sealed: the record is dropped with its chunks, and a prefetch then fetches the
    blob whole, checks it against its digest and seals it for real. Before, the flag
    was believed: the blob was never checked against its digest, so chunks a lying
    registry sent stayed served, offline too, until ``verify``."""
    from blockstore.cache.layout import SEALED

    data, digest = make_blob(6 * CHUNK_SIZE, seed=43)
    fill(cache_dir, [(data, digest)], whole=False)
    with ChunkStore(cache_dir) as store:
        _rewrite_record(store, digest, lambda record: setattr(record, "flags", SEALED))
        assert store.lookup(digest) is None
        assert store.sealed_sums(digest) is None
        blob = CachedBlob(store, digest, len(data), ScriptedSource(data, digest))
        blob.prefetch()
        blob.close()
        store.seal(digest)
        record = store.lookup(digest)
        assert record.sealed and record.present == 6 and store.sealed_sums(digest)
        assert _read_offline(store, data, digest) == data


def _rewrite_sums(store: ChunkStore, digest: str, change) -> None:
    from blockstore.cache.layout import DB_SUMS

    def work(txn) -> None:
        sums = bytearray(txn.get(digest.encode(), db=store.dbs[DB_SUMS]))
        txn.put(digest.encode(), bytes(change(sums)), db=store.dbs[DB_SUMS])

    store.env.write(work)


def _flip_bit(sums: bytearray) -> bytearray:
    sums[2 * 8 + 3] ^= 0x10  # in chunk 2's entry
    return sums


def _small_size(record) -> None:
    record.size -= 100  # as a low bit flipped: the last chunk shorter, as many chunks


def _one_chunk_more(record) -> None:
    record.size += CHUNK_SIZE  # as bit 15 flipped: a list one entry longer than before


@pytest.mark.parametrize(("damage", "sums", "record"), [
    ("a bit of chunk 2's sealed entry", _flip_bit, None),
    ("the size, within its last chunk", None, _small_size),
    ("the size, one chunk more", None, _one_chunk_more),
])  # fmt: skip
def test_a_sealed_blob_whose_seal_does_not_hold_is_fetched_again(cache_dir, damage, sums, record):
    """Tried: a sealed blob, then damage on the disk to its sealed list or to its
    record's size (the last chunk shorter: as many chunks); then the blob read from an
    honest source. Must hold: the seal is found not to hold (its list carries one sum
    of its entries and of the blob's size), the blob is dropped and fetched again, read
    byte for byte, sealed again and verified; the cache is not moved aside. Before, the
    seal was believed: a flipped entry refused chunk 2 from any source once it had been
    evicted (EIO for good, while verify said ok), and a flipped size refused the blob."""
    data, digest = make_blob(5 * CHUNK_SIZE, seed=44)
    fill(cache_dir, [(data, digest)])
    with ChunkStore(cache_dir) as store:
        assert store.lookup(digest).sealed
        if sums is not None:
            _rewrite_sums(store, digest, sums)
        if record is not None:
            _rewrite_record(store, digest, record)
        assert store.lookup(digest) is None, damage
        blob = CachedBlob(store, digest, len(data), ScriptedSource(data, digest))
        assert b"".join(bytes(b) for b in blob.read(0, len(data))) == data
        blob.close()
        store.seal(digest)
        assert store.lookup(digest).sealed
        assert _read_offline(store, data, digest) == data
        assert store.verify().ok
    assert not list(cache_dir.parent.glob("*.damaged-*"))


def test_a_sealed_list_kept_by_an_older_version_is_still_believed(cache_dir):
    """A sealed list with an entry for each chunk and no sum of its own, as an older
    version kept it: the blob stays sealed and is read offline byte for byte."""
    from blockstore.cache.integrity import SEALED_SIZE

    data, digest = make_blob(4 * CHUNK_SIZE, seed=45)
    fill(cache_dir, [(data, digest)])
    with ChunkStore(cache_dir) as store:
        _rewrite_sums(store, digest, lambda sums: sums[: 4 * SEALED_SIZE])
        assert store.lookup(digest).sealed
        assert _read_offline(store, data, digest) == data
        assert store.verify().ok


def test_a_cache_holding_sealed_lists_with_a_sum_is_of_a_format_older_versions_refuse(
    cache_dir,
):
    """Tried: a blob sealed by this version, whose sealed list ends with a sum of its
    own. Must hold: versions of format 4 judged a list that is not a whole number of
    entries long damaged, and dropped the blob with its chunks, so the cache holding
    it says a format they refuse, not 4. Before, it said format 4: such a version,
    going back to the cache, called every sealed blob damaged and dropped it (cache
    ls, verify, and offline reads then EIO)."""
    from blockstore.cache.integrity import SEALED_SIZE
    from blockstore.cache.layout import DB_SUMS

    data, digest = make_blob(3 * CHUNK_SIZE, seed=67)
    fill(cache_dir, [(data, digest)])
    with ChunkStore(cache_dir) as store:
        with store.env.reader(DB_SUMS) as txn:
            listed = bytes(txn.get(digest.encode()))
        with store.env.reader(DB_META) as txn:
            version, _ = stored_format(txn, store.dbs[DB_META])
    assert len(listed) % SEALED_SIZE != 0  # what a format 4 version drops
    assert version > 4


def test_a_format_4_cache_is_brought_to_this_format_with_its_sealed_lists_kept(cache_dir):
    """Tried: a cache format 4 wrote: a sealed, pinned blob whose sealed list has no sum
    of its own. Must hold: `cache ls` lists it sealed and pinned, saying in one warning
    that it brought the cache to this format; the blob is read offline byte for byte
    and `verify` finds it good."""
    from blockstore.cache.integrity import SEALED_SIZE

    data, digest = make_blob(4 * CHUNK_SIZE, seed=68)
    fill(cache_dir, [(data, digest)])
    with ChunkStore(cache_dir) as store:
        store.pin(digest)
        _rewrite_sums(store, digest, lambda sums: sums[: 4 * SEALED_SIZE])
        store.env.write(lambda txn: txn.put(b"format", U64.pack(4), db=store.dbs[DB_META]))
    listed = run_cli("cache", "ls", "--json", "--cache-dir", str(cache_dir))
    assert listed.returncode == 0, listed.stderr
    [blob] = json.loads(listed.stdout)
    assert (blob["digest"], blob["sealed"], blob["pinned"]) == (digest, True, True)
    assert f"format 4, an older version's: brought it to format {FORMAT_VERSION}" in (listed.stderr)
    assert len(listed.stderr.strip().splitlines()) == 1, listed.stderr
    with ChunkStore(cache_dir, offline=True) as store:
        assert _read_offline(store, data, digest) == data
        assert store.verify().ok


def test_an_empty_layer_is_prefetched_and_sealed(cache_dir):
    """A 0-byte blob (digest: sha256 of nothing) is prefetched, sealed, listed, and reads
    of nothing succeed; it used to fail with "could not be kept whole"."""
    digest = "sha256:" + hashlib.sha256(b"").hexdigest()
    with ChunkStore(cache_dir) as store:
        blob = CachedBlob(store, digest, 0, ScriptedSource(b"", digest))
        blob.prefetch()
        assert blob.read(0, 0) == []
        [info] = store.blobs()
        assert info.digest == digest and info.sealed and info.size == 0
        blob.close()


def set_meta(cache_dir: Path, name: bytes, value: int) -> bytes:
    """Fill a cache, then make it look written by another version; its data.mdb bytes."""
    data, digest = make_blob(3 * CHUNK_SIZE, seed=62)
    fill(cache_dir, [(data, digest)])
    with ChunkStore(cache_dir) as store:
        store.env.write(lambda txn: txn.put(name, U64.pack(value), db=store.dbs[DB_META]))
    return (cache_dir / "data.mdb").read_bytes()


WRITE_LOCK_HOLDER = (
    "import lmdb, sys, time\n"
    "env = lmdb.open(sys.argv[1], max_dbs=16, map_size=1 << 30)\n"
    "txn = env.begin(write=True)\n"
    "print('ready', flush=True)\n"
    "time.sleep(60)\n"
)
"""A process holding a cache's write lock until it is killed."""


def format_3_cache(cache_dir: Path) -> tuple[bytes, str]:
    """A cache as format 3 left it: a sealed, pinned blob with a trace, and no database
    of parts (which format 4 added, and nothing else); the blob's bytes and digest."""
    data, digest = make_blob(3 * CHUNK_SIZE, seed=66)
    fill(cache_dir, [(data, digest)])
    with ChunkStore(cache_dir) as store:
        store.pin(digest)
        TraceShelf(store).put(Trace(digest, UNIT, time.time(), [(0, 0, 2)]))
    env = lmdb.open(str(cache_dir), max_dbs=len(ALL_DBS))
    with env.begin(write=True) as txn:
        txn.drop(env.open_db(DB_PARTS, txn=txn), delete=True)
        txn.put(b"format", U64.pack(3), db=env.open_db(DB_META, txn=txn))
    env.close()
    return data, digest


def test_a_format_3_cache_is_brought_to_this_format_in_place(cache_dir):
    """Tried: a cache format 3 wrote (a sealed, pinned blob, a trace), then `cache ls`,
    `trace ls` and an offline read of this version. Must hold: all of it is kept and
    read, byte for byte, the first command saying once that it brought the cache to
    this format in place; the format stored is then this version's. Before, it was
    refused offline and moved aside, pin and trace with it, by the first online serve
    or prefetch: an empty cache where the old one could have been used as it was."""
    data, digest = format_3_cache(cache_dir)
    listed = run_cli("cache", "ls", "--json", "--cache-dir", str(cache_dir))
    assert listed.returncode == 0, listed.stderr
    [blob] = json.loads(listed.stdout)
    assert (blob["digest"], blob["sealed"], blob["pinned"]) == (digest, True, True)
    warning = listed.stderr.strip()
    assert len(warning.splitlines()) == 1, warning
    assert f"format 3, an older version's: brought it to format {FORMAT_VERSION}" in warning
    traces = run_cli("trace", "ls", "--cache-dir", str(cache_dir))
    assert traces.returncode == 0 and digest in traces.stdout, traces.stderr
    assert traces.stderr == ""
    with ChunkStore(cache_dir, offline=True) as store:
        assert _read_offline(store, data, digest) == data
        assert store.verify().ok
        with store.env.reader(DB_META) as txn:
            assert stored_format(txn, store.dbs[DB_META]) == (FORMAT_VERSION, CHUNK_SIZE)
    assert not aside(cache_dir, "old")


def test_a_format_3_cache_open_in_an_older_process_is_not_upgraded_under_it(cache_dir):
    """Tried: a format 3 cache that an older version's server still has open (no lock
    of this version's), opened by `cache ls`; then again once that process is gone.
    Must hold: refused in one line naming the process (exit 8), the file left byte for
    byte (the older server would go on beside records it does not know); then brought
    to this format and listed."""
    _, digest = format_3_cache(cache_dir)
    before = (cache_dir / "data.mdb").read_bytes()
    user = lockless_user(cache_dir)
    try:
        refused = run_cli("cache", "ls", "--cache-dir", str(cache_dir))
        assert refused.returncode == 8, refused.stderr
        assert f"it is open in pid {user.pid} " in refused.stderr, refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
        assert (cache_dir / "data.mdb").read_bytes() == before
    finally:
        user.kill()
        user.wait()
    listed = run_cli("cache", "ls", "--cache-dir", str(cache_dir))
    assert listed.returncode == 0 and digest in listed.stdout, listed.stderr


def test_a_format_4_cache_opened_by_two_processes_of_this_version_at_once_is_brought_up(
    cache_dir,
):
    """Tried: a format 4 cache whose write lock a process holds while two `cache ls` of
    this version open it; the holder is then killed, so both go on at once. Must hold:
    both list it (exit 0), one of them saying it brought the cache to this format.
    Before, the one that upgraded saw the other, which had LMDB's lock file open while
    it waited its turn, as an older version's process, and refused (exit 8)."""
    from blockstore.openers import processes_with_open

    set_meta(cache_dir, b"format", 4)
    holder = subprocess.Popen(
        [sys.executable, "-c", WRITE_LOCK_HOLDER, str(cache_dir)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        listers = [
            subprocess.Popen(
                [sys.executable, "-m", "blockstore", "cache", "ls", "--cache-dir", str(cache_dir)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(2)
        ]
        opened = {f"pid {lister.pid} " for lister in listers}

        def both_opening() -> bool:
            users = processes_with_open([str(cache_dir / "data.mdb")])
            return opened <= {user[: user.index(" (") + 1] for user in users}

        assert wait_for(both_opening, timeout=30)
        time.sleep(0.5)  # from the data file's claim to LMDB's lock file, then its write lock
    finally:
        holder.kill()
        holder.wait()
    results = [(*lister.communicate(timeout=60), lister.returncode) for lister in listers]
    assert [code for _, _, code in results] == [0, 0], results
    upgraded = [err for _, err, _ in results if "brought it to format" in err]
    assert len(upgraded) == 1, results


def test_a_process_letting_go_of_a_format_4_cache_as_it_is_brought_up_is_waited_for(
    cache_dir,
):
    """Tried: a format 4 cache whose LMDB lock file another process has open for one
    more second (as one dying with the write lock keeps its files a moment after the
    lock passes on), and `cache ls` of this version at once. Must hold: it waits for that
    process to go, brings the cache up and lists it (exit 0). Before, any process seen
    with the file open at that instant was taken for an older version's server: refused,
    exit 8 (seen in a clean-clone run, the dying process a test's lock holder)."""
    set_meta(cache_dir, b"format", 4)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; f = open(sys.argv[1], 'rb'); print('ready', flush=True); "
            "time.sleep(1)",
            str(cache_dir / "lock.mdb"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        listed = run_cli("cache", "ls", "--cache-dir", str(cache_dir))
    finally:
        holder.kill()
        holder.wait()
    assert listed.returncode == 0, listed.stderr
    assert "brought it to format" in listed.stderr


def test_a_read_only_format_3_cache_says_where_it_can_be_brought_up(cache_dir, tmp_path):
    """Tried: a format 3 cache seen read-only, listed by `cache ls`. Must hold: refused
    in one line (exit 8) naming format 3 and saying to open it once where it can be
    written, not called damaged; nothing written. Before, its missing database of
    parts had it called damaged."""
    from rig.read_only import contents, read_only_view

    format_3_cache(cache_dir)
    before = contents(cache_dir)
    with read_only_view(cache_dir, tmp_path / "ro") as ro:
        result = run_cli("cache", "ls", "--cache-dir", str(ro))
    message = result.stderr.strip()
    assert result.returncode == 8, message
    assert "has format 3, an older version's" in message, message
    assert "open it once where it can be written" in message, message
    assert "damaged" not in message and len(message.splitlines()) == 1, message
    assert contents(cache_dir) == before


def test_a_read_only_format_4_cache_is_read_as_it_is(cache_dir, tmp_path):
    """Tried: a format 4 cache (every database this version reads, sealed lists without
    a sum of their own) seen read-only, as a user sees root's cache: `cache ls`, then an
    offline read of its blob. Must hold: listed (exit 0) and read byte for byte, nothing
    written. Before, a read-only open refused every older format, this one too, until
    someone opened it where it could be written."""
    from rig.read_only import contents, read_only_view

    data, digest = make_blob(3 * CHUNK_SIZE, seed=67)
    fill(cache_dir, [(data, digest)])
    set_meta(cache_dir, b"format", 4)
    before = contents(cache_dir)
    with read_only_view(cache_dir, tmp_path / "ro") as ro:
        listed = run_cli("cache", "ls", "--cache-dir", str(ro))
        assert listed.returncode == 0, listed.stderr
        assert digest[7:19] in listed.stdout, listed.stdout
        with ChunkStore(ro, offline=True) as store:
            blob = CachedBlob(store, digest, len(data), None)
            assert b"".join(blob.read(0, len(data))) == data
            blob.close()
    assert contents(cache_dir) == before


def test_an_older_format_is_left_alone_by_commands_that_look_and_replaced_by_a_filler(
    cache_dir,
):
    """Tried: a cache written by an older version (format one lower), opened offline,
    by `cache ls`, `cache stats`, `cache verify` and `cache rm`, then by a store that
    will fill it (a server's, a prefetch's). Must hold: all but the last refuse (exit 8)
    naming both formats and what replaces it, and leave it as it is, byte for byte
    (a listing used to move aside the cache an older server was filling, and verify
    called it damaged); the filler moves it aside, kept whole, for an empty one."""
    before = set_meta(cache_dir, b"format", OLDER_FORMAT)
    with pytest.raises(CacheError, match=f"format {OLDER_FORMAT}, an older version's"):
        ChunkStore(cache_dir, offline=True)
    for command in (["ls"], ["stats"], ["verify"], ["rm", "sha256:" + "0" * 64]):
        result = run_cli("cache", *command, "--cache-dir", str(cache_dir))
        assert result.returncode == 8, (command, result.stderr)
        message = result.stderr.strip()
        assert f"this version needs format {FORMAT_VERSION}" in message, message
        assert "left as it is until a serve, mount or prefetch moves it aside" in message
        assert "damaged" not in message and len(message.splitlines()) == 1
    assert not aside(cache_dir, "old")
    assert (cache_dir / "data.mdb").read_bytes() == before
    with ChunkStore(cache_dir, replace_older=True) as store:
        assert store.blobs() == []
    [old] = aside(cache_dir, "old")
    assert (old / "data.mdb").read_bytes() == before


@pytest.mark.parametrize(
    ("name", "value"), [(b"format", FORMAT_VERSION + 1), (b"chunk_size", 65536)]
)
def test_a_newer_versions_cache_is_never_moved(cache_dir, name, value):
    """Tried: a cache of a newer format (or another chunk size), opened by a store that
    would replace an older one. Must hold: refused, naming the newer format and what to
    do, and left where it is: a downgrade must not take the newer version's cache."""
    before = set_meta(cache_dir, name, value)
    with pytest.raises(CacheError, match=r"(a newer version's|another build's); this"):
        ChunkStore(cache_dir, replace_older=True)
    assert not aside(cache_dir, "old")
    assert (cache_dir / "data.mdb").read_bytes() == before


@pytest.mark.parametrize("version", [FORMAT_VERSION + 1, OLDER_FORMAT], ids=["newer", "older"])
def test_serve_offline_refuses_another_format_before_it_binds_an_address(cache_dir, version):
    """Tried: ``serve --offline`` of a cache of a newer and of an older format, told to
    listen on an address another socket holds. Must hold: the cache refused (exit 8, in
    the one line it gives with a free address), not the address: nothing is bound or
    said before the cache is judged; the file left byte for byte. Before, it listened
    first, so a free address was bound, then the cache refused, and a taken one was
    the error (exit 1) that hid the real one."""
    before = set_meta(cache_dir, b"format", version)
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    serve = ["serve", "127.0.0.1:5000/demo/x:v1", "--offline", "--cache-dir", str(cache_dir)]
    try:
        busy = run_cli(*serve, "--listen", f"127.0.0.1:{taken.getsockname()[1]}")
    finally:
        taken.close()
    free = run_cli(*serve, "--listen", "127.0.0.1:0")
    assert free.returncode == 8 and free.stdout == "", free.stdout + free.stderr
    assert f"has format {version}" in free.stderr and "as it is" in free.stderr
    assert len(free.stderr.splitlines()) == 1, free.stderr
    assert (busy.returncode, busy.stdout, busy.stderr) == (8, "", free.stderr)
    assert (cache_dir / "data.mdb").read_bytes() == before


@pytest.mark.parametrize("version", [FORMAT_VERSION + 1, OLDER_FORMAT])
def test_a_cache_of_another_format_without_a_database_of_this_one_is_left_as_it_is(
    cache_dir, version
):
    """Tried: a cache of a newer format and one of an older format, each without a
    database this version has (parts: a newer one may keep them otherwise, an older
    one had none), listed by `cache ls`. Must hold: refused (exit 8) and data.mdb left
    byte for byte. Before, the refusing open made the missing database first, writing
    to a cache it then said it left as it is."""
    set_meta(cache_dir, b"format", version)
    env = lmdb.open(str(cache_dir), max_dbs=len(ALL_DBS))
    with env.begin(write=True) as txn:
        txn.drop(env.open_db(DB_PARTS, txn=txn), delete=True)
    env.close()
    before = (cache_dir / "data.mdb").read_bytes()
    result = run_cli("cache", "ls", "--cache-dir", str(cache_dir))
    assert result.returncode == 8, result.stderr
    assert f"has format {version}" in result.stderr, result.stderr
    assert (cache_dir / "data.mdb").read_bytes() == before


@pytest.mark.parametrize(
    ("name", "value"), [(b"format", FORMAT_VERSION + 1), (b"chunk_size", 65536)]
)
def test_a_newer_versions_cache_is_not_compacted(cache_dir, name, value):
    """Tried: `cache compact` on a cache of a newer format (or another chunk size).
    Must hold: refused in one line naming both formats (exit 8), data.mdb left byte
    for byte: only the version that wrote it knows what its file may become. Before,
    it was rewritten like one of this version's."""
    before = set_meta(cache_dir, name, value)
    result = run_cli("cache", "compact", "--cache-dir", str(cache_dir))
    assert result.returncode == 8, result.stderr
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1, message
    assert f"this version needs format {FORMAT_VERSION}" in message, message
    assert "leaves it as it is" in message, message
    assert (cache_dir / "data.mdb").read_bytes() == before


def test_an_older_format_open_in_another_process_is_not_replaced_under_it(cache_dir):
    """Tried: an older version's cache that one of its servers still has open (no lock
    of this version's), opened by a store that would replace it. Must hold: refused,
    naming the process, and left where it is (the server would go on filling a cache
    moved aside); once that process is gone, it is replaced."""
    set_meta(cache_dir, b"format", OLDER_FORMAT)
    user = lockless_user(cache_dir)
    try:
        with pytest.raises(CacheError, match=f"open in pid {user.pid} "):
            ChunkStore(cache_dir, replace_older=True)
        assert not aside(cache_dir, "old")
    finally:
        user.kill()
        user.wait()
    with ChunkStore(cache_dir, replace_older=True) as store:
        assert store.blobs() == []
    assert len(aside(cache_dir, "old")) == 1


def test_a_forked_child_uses_the_cache_through_its_own_handle(cache_dir):
    """A process forks five times while one of its threads stores chunks without pause
    (so a fork can land in the middle of a write). Each child, within 10 s, reads every
    byte through the store it inherited and through a new one on the same directory,
    and stores chunks of its own: it must not hang on a lock or transaction copied from
    the parent. The parent then reads the children's chunks, right."""
    data, digest = make_blob(8 * CHUNK_SIZE, seed=63)
    busy, busy_digest = make_blob(4 * CHUNK_SIZE, seed=65)
    with ChunkStore(cache_dir) as store:
        blob = CachedBlob(store, digest, len(data), ScriptedSource(data, digest))
        blob.read(0, 4 * CHUNK_SIZE)
        stop = threading.Event()

        def writer() -> None:
            while not stop.is_set():
                store.store_chunks(busy_digest, len(busy), 0, [busy[:CHUNK_SIZE]])
                store.remove(busy_digest)

        thread = threading.Thread(target=writer)
        thread.start()
        try:
            for child in range(5):
                pid = os.fork()
                if pid == 0:
                    status = 1
                    try:
                        signal.alarm(10)
                        ok = b"".join(blob.read(0, len(data))) == data
                        with ChunkStore(cache_dir) as again:
                            offline = CachedBlob(again, digest, len(data), None)
                            ok = ok and b"".join(offline.read(0, len(data))) == data
                        status = 0 if ok else 2
                    finally:
                        os._exit(status)
                _, status = os.waitpid(pid, 0)
                assert os.waitstatus_to_exitcode(status) == 0, f"child {child}: {status}"
        finally:
            stop.set()
            thread.join()
        offline = CachedBlob(store, digest, len(data), None)
        assert b"".join(offline.read(0, len(data))) == data
        blob.close()


def test_many_more_readers_than_slots_wait_for_one_never_fail(cache_dir, monkeypatch):
    """A cache opened with 8 reader slots and 48 threads reading hits at once, each holding
    its read transaction a while: every read returns the right bytes, none fails (running
    out of slots used to be an EIO)."""
    monkeypatch.setattr(cache_env, "MAX_READERS", 8)
    data, digest = make_blob(4 * CHUNK_SIZE, seed=64)
    failures: list[BaseException] = []
    with ChunkStore(cache_dir) as store:
        assert store.env.env.info()["max_readers"] == 8
        blob = CachedBlob(store, digest, len(data), ScriptedSource(data, digest))
        blob.read(0, len(data))
        start = threading.Barrier(48)

        def reader(n: int) -> None:
            try:
                start.wait()
                for i in range(20):
                    offset = (n * 997 + i * 4099) % (len(data) - 5000)
                    values, txn = store.read_chunks(blob_id, 0, 3)
                    try:
                        assert all(v is not None for v in values)
                        threading.Event().wait(0.001)
                    finally:
                        store.end_read(txn)
                    del values, txn  # an ended read transaction keeps its slot until freed
                    got = b"".join(blob.read(offset, 5000))
                    assert got == data[offset : offset + 5000]
            except BaseException as exc:
                failures.append(exc)

        blob_id = store.lookup(digest).blob_id
        threads = [threading.Thread(target=reader, args=(n,)) for n in range(48)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        blob.close()
    assert not failures, failures[:3]


def test_a_damaged_cache_another_opener_replaced_first_is_left_to_it(tmp_path, monkeypatch):
    """Two processes open one damaged cache at once. This one finds the damage; before
    it moves the directory aside, the other has moved it and started a new cache in its
    place (simulated in the damage check). This one must open that new cache, not move
    it aside too: its data stays, and there is one directory aside, the other's."""
    import shutil

    data, digest = make_blob(3 * CHUNK_SIZE, seed=81)
    healthy, cache = tmp_path / "healthy", tmp_path / "cache"
    with ChunkStore(healthy) as store:
        CachedBlob(store, digest, len(data), ScriptedSource(data, digest)).prefetch()
    shutil.copytree(healthy, cache)
    real = cache_env.file_damage
    raced: list[Path] = []

    def damaged_then_replaced(path: Path):
        if not raced and Path(path) == cache:
            raced.append(cache.rename(tmp_path / "cache.damaged-by-the-other"))
            shutil.copytree(healthy, cache)  # the other's new cache, already in use
            return "cut short (the other process saw it too)"
        return real(path)

    monkeypatch.setattr(cache_env, "file_damage", damaged_then_replaced)
    with ChunkStore(cache) as store:
        assert raced, "the damage check never ran"
        assert store.lookup(digest) is not None and store.lookup(digest).sealed
        offline = CachedBlob(store, digest, len(data), None)
        assert b"".join(bytes(b) for b in offline.read(0, len(data))) == data
        offline.close()
    aside = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("cache."))
    assert aside == ["cache.damaged-by-the-other"]


def test_an_older_format_is_replaced_for_a_filler_only_once_the_registry_answers(
    fresh_registry, erofs_images, cache_dir
):
    """Tried: an older version's cache, opened for an image by a command that would fill
    it (serve, prefetch) while the registry is down, then with it up; and by one that
    does not fill it (index, trace push). Must hold: with the registry down the cache
    is refused and left as it is (replacing it would leave an empty cache and nothing
    to fill it from); with it up it is replaced and the image read; a command that does
    not fill it refuses it. Before, any online open replaced it first."""
    reference = push_erofs(fresh_registry.host, "older/img", "v1", [erofs_images.small.path])
    before = set_meta(cache_dir, b"format", OLDER_FORMAT)
    options = RegistryOptions(insecure=True, timeout=2.0, max_attempts=2)
    with pytest.raises(CacheError, match="left as it is until a serve"):
        open_image(reference, cache_dir=cache_dir, options=options)
    fresh_registry.stop()
    with pytest.raises(CacheError, match="registry cannot be reached"):
        open_image(reference, cache_dir=cache_dir, options=options, replace_older=True)
    assert not aside(cache_dir, "old")
    assert (cache_dir / "data.mdb").read_bytes() == before
    fresh_registry.start()
    image = open_image(reference, cache_dir=cache_dir, options=options, replace_older=True)
    try:
        (blob,) = image.exports()
        data = erofs_images.small.path.read_bytes()
        assert b"".join(bytes(b) for b in blob.read(0, len(data))) == data
    finally:
        image.close()
    assert len(aside(cache_dir, "old")) == 1


def test_a_kept_manifest_page_damaged_costs_a_prefetch_the_cache_not_the_run(
    registry, erofs_images, cache_dir
):
    """Tried: a prefetched image, then every leaf page of data.mdb holding its layer's
    digest zeroed (its blob record, sums and the records kept beside its manifests;
    found only once read, not when the cache opens), then a prefetch of another image.
    Must hold: the prefetch exits 0 (verified and sealed), the damaged cache moved
    aside with a warning; the next prefetch of it finds it cached. Before, the
    prefetch exited 8 ("the cache ... is damaged") and left the cache as it was, so
    the next prefetch failed on it the same way."""
    small = push_erofs(registry.host, "damage/kept-a", "v1", [erofs_images.small.path])
    large = push_erofs(registry.host, "damage/kept-b", "v1", [erofs_images.large.path])
    where = ["--insecure", "--cache-dir", str(cache_dir)]
    assert run_cli("prefetch", small, *where).returncode == 0
    digest = erofs_images.small.digest.encode()
    data = cache_dir / "data.mdb"
    raw = data.read_bytes()
    with open(data, "r+b") as f:
        for pgno in range(2, len(raw) // 4096):
            page = raw[pgno * 4096 : (pgno + 1) * 4096]
            if page[10] & 0x2 and digest in page:  # P_LEAF
                f.seek(pgno * 4096)
                f.write(bytes(4096))
    result = run_cli("prefetch", large, *where, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "verified and sealed" in result.stdout, result.stdout
    assert "moved it to" in result.stderr and "Traceback" not in result.stderr
    assert len(aside(cache_dir, "damaged")) == 1
    again = run_cli("prefetch", large, *where, timeout=120)
    assert again.returncode == 0 and again.stderr == "", again.stderr


def test_a_link_planted_at_the_name_a_damaged_cache_goes_to_is_not_in_the_way(cache_dir):
    """Tried: dangling symlinks planted at every name a damaged cache would be moved to
    in the next minute (`DIR.damaged-TIME`, as one who can write the cache's parent
    could), then data.mdb cut short and `cache stats` run. Must hold: the cache is moved
    aside to a directory of its own (exit 0, an empty cache), no link is followed (their
    targets never made), the links left as they were. Before, the rename onto the link
    failed and the command exited 8 saying the cache could not be moved aside."""
    data, digest = make_blob(4 * CHUNK_SIZE, seed=61)
    fill(cache_dir, [(data, digest)])
    target = cache_dir.parent / "target"
    now = time.time()
    links = []
    for second in range(60):
        stamp = time.strftime("%Y%m%dT%H%M%S", time.localtime(now + second))
        link = cache_dir.with_name(f"{cache_dir.name}.damaged-{stamp}")
        link.symlink_to(target / stamp)
        links.append(link)
    path = cache_dir / "data.mdb"
    os.truncate(path, path.stat().st_size // 2)
    result = run_cli("cache", "stats", "--json", "--cache-dir", str(cache_dir))
    assert result.returncode == 0, result.stderr
    assert '"blobs": 0' in result.stdout
    (moved,) = [p for p in aside(cache_dir, "damaged") if not p.is_symlink()]
    assert moved.is_dir() and (moved / "data.mdb").is_file()
    assert not target.exists()
    assert all(link.is_symlink() for link in links)


def test_a_handle_lmdb_gave_up_after_a_failed_write_is_opened_again_never_moved_aside(
    cache_dir, caplog
):
    """Tried: LMDB's ``MDB_PANIC`` (``lmdb.PanicError``) from a transaction of a filled
    cache, as LMDB gives every transaction of a handle once a write of its meta page
    failed (a disk erring as a commit ended), while the file holds the last commit.
    Must hold: it is not taken for damage: the cache stays where it is, this process
    opens it again (saying so once) and reads every chunk it held from it, and writes
    go on. Before, the panic was counted as damage: the next use moved the whole cache
    aside and started an empty one (on a disk gone read-only the move failed, and the
    process went on without its cache, offline failing every read)."""
    data, digest = make_blob(8 * CHUNK_SIZE, seed=71)
    fill(cache_dir, [(data, digest)])
    with ChunkStore(cache_dir) as store:
        given_up = lmdb.PanicError(
            "mdb_txn_begin: MDB_PANIC: Update of meta page failed or environment had fatal error"
        )
        error = store.env.damaged(given_up)
        assert not isinstance(error, CacheDamaged), error
        blob = CachedBlob(store, digest, len(data), None)
        assert b"".join(blob.read(0, len(data))) == data
        blob.close()
        other, other_digest = make_blob(2 * CHUNK_SIZE, seed=72)
        kept = CachedBlob(store, other_digest, len(other), ScriptedSource(other, other_digest))
        kept.prefetch()
        kept.close()
        assert store.lookup(other_digest) is not None
    assert aside(cache_dir, "damaged") == []
    said = [r.getMessage() for r in caplog.records if "opened it again" in r.getMessage()]
    assert len(said) == 1 and "read-only" not in said[0], said
