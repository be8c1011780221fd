"""`blockstore index`: building a layer's chunk index is the engine's own pass, not a read."""

from __future__ import annotations

import json
import subprocess
import sys


def blockstore(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "blockstore", *args], capture_output=True, text=True, timeout=120
    )


def test_indexing_a_sealed_layer_is_not_counted_as_served(pushed_images, tmp_path):
    """A layer prefetched (complete and sealed) is indexed from the cache: `index` says
    so, and `cache stats` then counts no byte more served and no hit more than before,
    which are what clients read."""
    cache = ["--cache-dir", str(tmp_path / "cache")]
    ref = pushed_images.small
    assert blockstore("prefetch", ref, "--insecure", *cache).returncode == 0

    def served() -> tuple[int, int]:
        stats = json.loads(blockstore("cache", "stats", "--json", *cache).stdout)
        return stats["bytes_served"], stats["hits"]

    before = served()
    done = blockstore("index", ref, "--insecure", *cache)

    assert done.returncode == 0, done.stderr
    assert "(from the cache)" in done.stdout
    assert served() == before
