"""One of several processes reading a registry blob through one shared cache.

    python fetch_worker.py CACHE_DIR HOST REPOSITORY DIGEST EXPECTED_FILE START

Waits until the file START exists (so the processes begin together), reads
the whole blob in 256 KiB reads through the cache, checks every byte against
EXPECTED_FILE, and exits 0; wrong bytes exit 1.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from blockstore.cache import CachedBlob, ChunkStore
from blockstore.registry import RegistryClient, RegistryOptions
from blockstore.registry.blob import RegistryBlob
from blockstore.registry.manifests import Layer

READ = 256 << 10


def main() -> int:
    cache_dir, host, repository, digest, expected_file, start = sys.argv[1:7]
    expected = Path(expected_file).read_bytes()
    client = RegistryClient(host, RegistryOptions(insecure=True))
    source = RegistryBlob(client, repository, Layer(0, digest, len(expected), "x"))
    with ChunkStore(cache_dir) as store:
        blob = CachedBlob(store, digest, len(expected), source)
        while not Path(start).exists():
            time.sleep(0.005)
        for offset in range(0, len(expected), READ):
            got = b"".join(bytes(b) for b in blob.read(offset, min(READ, len(expected) - offset)))
            if got != expected[offset : offset + READ]:
                print(f"WRONG BYTES at {offset}", flush=True)
                return 1
        blob.close()
    client.close()
    print("ok", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
