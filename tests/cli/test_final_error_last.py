"""The one-line error a command ends with is the last line it says."""

from __future__ import annotations

import resource
import subprocess
import sys


def test_warnings_held_back_are_counted_before_the_final_error(registry, pushed_images, tmp_path):
    """Tried: ``prefetch`` of the 64 MiB image under a 4 MiB file size limit, so every
    store in the cache fails and more than ten "serving uncached bytes" warnings are
    made, the rest held back and counted. Must hold: exit 8, the count said before the
    error, which is the last line. Before, the count was said at the interpreter's exit,
    after the error, so the line a user reads last was not why the command failed."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (4 << 20, 4 << 20))

    # How many stores fail before the round ends depends on the fetches in flight: a
    # run with ten or fewer holds nothing back, so it is tried again, a few times at most.
    for attempt in range(5):
        cache = tmp_path / f"c{attempt}"
        argv = ["prefetch", pushed_images.large, "--insecure", "--cache-dir", str(cache)]
        got = subprocess.run(
            [sys.executable, "-m", "blockstore", *argv],
            capture_output=True,
            text=True,
            timeout=300,
            preexec_fn=limit,
        )
        assert got.returncode == 8, got.stderr
        lines = got.stderr.strip().splitlines()
        if any("more fetches" in line and "not kept" in line for line in lines):
            break
    else:
        raise AssertionError(f"no run held warnings back: {got.stderr}")
    assert lines[-1].startswith("blockstore: sha256:"), lines[-1]
    assert "could not be kept whole" in lines[-1], lines[-1]
