"""The gate in front of the LMDB handle: readers take it without a lock, and an exclusive
taker (a renewal after damage, a fork) must still never overlap one of them."""

from __future__ import annotations

import threading
import time

from blockstore.cache.env import _Gate


def test_an_exclusive_holder_never_overlaps_a_shared_one():
    """Readers loop on the lock-free shared path while another thread keeps taking the gate
    exclusively; a reader that finds the exclusive flag set while it holds, or an exclusive
    holder that finds a reader inside, is a broken gate."""
    gate = _Gate()
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
    stop.set()
    for thread in threads:
        thread.join(5)
    assert not any(t.is_alive() for t in threads), "a holder is stuck at the gate"
    assert exclusive_turns > 10
    assert not overlaps, overlaps[:3]
    assert gate.holders == [] and gate.blocked == 0
