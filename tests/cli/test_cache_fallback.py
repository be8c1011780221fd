"""A command that falls back to the cache says only what is true of it."""

from __future__ import annotations

import subprocess
import sys

from rig.pushed import push_erofs


def blockstore(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "blockstore", *args], capture_output=True, text=True, timeout=60
    )


def test_a_command_that_needs_the_registry_fails_in_one_line(registry, erofs_images, tmp_path):
    """``trace push`` of an image the cache knows, without --insecure for a plain-HTTP
    registry, cannot fall back to the cache: one line saying why, exit 5, and no warning
    that it serves the image from the cache alone, which it never does."""
    reference = push_erofs(registry.host, "fallback/trace", "v1", [erofs_images.small.path])
    cache = ["--cache-dir", str(tmp_path / "cache")]
    assert blockstore("prefetch", reference, "--insecure", *cache).returncode == 0
    pushed = blockstore("trace", "push", reference, *cache)
    assert pushed.returncode == 5, pushed.stderr
    (line,) = pushed.stderr.strip().splitlines()
    assert "does not speak TLS" in line and "from the cache alone" not in line
