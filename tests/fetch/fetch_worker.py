"""One of several processes reading a registry blob through one shared cache.

    python fetch_worker.py CACHE_DIR HOST REPOSITORY DIGEST EXPECTED_FILE START [replay]

Waits until the file START exists (so the processes begin together), reads
the whole blob in 256 KiB reads through the cache, checks every byte against
EXPECTED_FILE, and exits 0; wrong bytes exit 1. With ``replay``, it opens
the blob replaying the trace kept in the cache instead, waits until the
traced blocks are cached (by either process's replay) and reads them alone.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from blockstore.cache import CachedBlob, ChunkStore
from blockstore.cache.traces import TraceShelf
from blockstore.prefetch import PrefetchSettings
from blockstore.registry import RegistryClient, RegistryOptions
from blockstore.registry.blob import RegistryBlob
from blockstore.registry.manifests import Layer

READ = 256 << 10
REPLAY = PrefetchSettings(readahead=False, trace_replay=True)


def main() -> int:
    cache_dir, host, repository, digest, expected_file, start = sys.argv[1:7]
    expected = Path(expected_file).read_bytes()
    client = RegistryClient(host, RegistryOptions(insecure=True))
    source = RegistryBlob(client, repository, Layer(0, digest, len(expected), "x"))
    replay = sys.argv[7:] == ["replay"]
    with ChunkStore(cache_dir) as store:
        while not Path(start).exists():
            time.sleep(0.005)
        if replay:
            trace = TraceShelf(store).get(digest)
            blob = CachedBlob(store, digest, len(expected), source, settings=REPLAY)
            # Done when every traced block is cached, by either replay: the replay starts
            # on a thread of its own, so an idle fetcher may be one that has not begun,
            # and a read then would fetch the block's whole chunk beside the replays.
            blocks = [b for _, first, n in trace.events for b in range(first, first + n)]
            deadline = time.monotonic() + 60
            while len(blob._load_blocks(blocks)) < len(blocks):
                if time.monotonic() > deadline:
                    print("the replays left traced blocks uncached", flush=True)
                    return 1
                time.sleep(0.01)
            reads = [(first * trace.unit, n * trace.unit) for _, first, n in trace.events]
        else:
            blob = CachedBlob(store, digest, len(expected), source)
            reads = [(o, min(READ, len(expected) - o)) for o in range(0, len(expected), READ)]
        for offset, length in reads:
            got = b"".join(bytes(b) for b in blob.read(offset, length))
            if got != expected[offset : offset + length]:
                print(f"WRONG BYTES at {offset}", flush=True)
                return 1
        blob.close()
    client.close()
    print("ok", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
