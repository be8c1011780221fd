"""The gate in front of the LMDB handle: readers take it without a lock, and an exclusive
taker (a renewal after damage, a fork) must still never overlap one of them, nor wait
forever on a reader that writes."""

from __future__ import annotations

import threading
import time

from cache_sources import ScriptedSource, make_blob
from rig.waiting import wait_for

from blockstore.cache import CHUNK_SIZE, CachedBlob, ChunkStore
from blockstore.cache.env import CacheEnv
from blockstore.cache.gate import Gate
from blockstore.cache.traces import TraceShelf
from blockstore.prefetch import PrefetchSettings


def test_an_exclusive_holder_never_overlaps_a_shared_one():
    """Readers loop on the lock-free shared path while another thread keeps taking the gate
    exclusively; a reader that finds the exclusive flag set while it holds, or an exclusive
    holder that finds a reader inside, is a broken gate."""
    gate = Gate()
    inside = {"shared": 0, "exclusive": False}
    count_lock = threading.Lock()
    overlaps: list[str] = []
    stop = threading.Event()
    exclusive_turns = 0

    def reader() -> None:
        while not stop.is_set():
            gate.acquire_shared()
            with count_lock:
                inside["shared"] += 1
                if inside["exclusive"]:
                    overlaps.append("reader inside with an exclusive holder")
            with count_lock:
                inside["shared"] -= 1
            gate.release_shared()

    def renewer() -> None:
        nonlocal exclusive_turns
        while not stop.is_set():
            with gate.exclusive():
                with count_lock:
                    if inside["shared"]:
                        overlaps.append("exclusive holder with a reader inside")
                    inside["exclusive"] = True
                time.sleep(0.0005)
                with count_lock:
                    inside["exclusive"] = False
            exclusive_turns += 1

    threads = [threading.Thread(target=reader) for _ in range(6)]
    threads.append(threading.Thread(target=renewer))
    for thread in threads:
        thread.start()
    time.sleep(1.5)
    # Ten turns at least, however few a loaded machine gave it in that time.
    assert wait_for(lambda: exclusive_turns > 10), "the exclusive taker never got its turns"
    stop.set()
    for thread in threads:
        thread.join(5)
    assert not any(t.is_alive() for t in threads), "a holder is stuck at the gate"
    assert exclusive_turns > 10
    assert not overlaps, overlaps[:3]
    assert gate.holders == [] and gate.blocked == 0


def test_a_hit_that_ends_the_trace_period_never_writes_under_its_read(cache_dir, monkeypatch):
    """A cache hit whose read ends the access trace's period, while another thread is
    about to take the gate exclusively (as after another process grew the map): the
    trace is saved, and the hit returns. Saving it on the hit's own thread, inside its
    read transaction, would wait on that exclusive taker, which waits on the hit."""
    data, digest = make_blob(4 * CHUNK_SIZE, seed=530)
    store = ChunkStore(cache_dir)
    settings = PrefetchSettings(readahead=False, trace_period=0.2)
    blob = CachedBlob(store, digest, len(data), ScriptedSource(data, digest), settings=settings)
    blob.read(0, 4096)  # fetched and stored; the period starts here
    time.sleep(0.3)
    write = CacheEnv.write
    adopters: list[threading.Thread] = []

    def write_while_the_map_is_resized(env: CacheEnv, work):
        if env._gate.holders and not adopters:
            adopters.append(threading.Thread(target=env._adopt_map_size, daemon=True))
            adopters[0].start()
            # Go on once the taker waits on the gate (or has had it and gone: the read
            # ended first). A fixed sleep let a loaded machine write before it waited, and
            # a hit writing under its own read then passed.
            taker = adopters[0]
            assert wait_for(lambda: env._gate.blocked or not taker.is_alive())
        return write(env, work)

    monkeypatch.setattr(CacheEnv, "write", write_while_the_map_is_resized)
    hit = threading.Thread(target=blob.read_cached, args=(0, 4096), daemon=True)
    hit.start()
    hit.join(5)

    assert not hit.is_alive(), "the hit never returned"
    for thread in threading.enumerate():
        if thread.name == "trace-save":
            thread.join(5)
    assert TraceShelf(store).get(digest) is not None
    blob.close()
    store.close()
