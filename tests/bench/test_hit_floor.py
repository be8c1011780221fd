"""The hit-floor side script runs and reports what it says it measures.

Nothing is timed here; what is checked is that each way of reading a warm
blob served every read (the script refuses a cold or failing read) and that
the table has a row for each read size with a figure for each way.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_hit_floor_reads_a_warm_blob_each_way_and_tabulates_it():
    """Tried: the script on a 4 MiB blob, two rounds. Must hold: it exits 0 (every hold
    and every check of the warm blob succeeded: a miss or a failed check stops it) and
    prints a row for 256, 128 and 32 KiB reads, each with three positive figures and
    their ratio."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.hit_floor", "--size-mib", "4", "--rounds", "2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ") and "KiB" in line]
    assert [row.split(" | ")[0] for row in rows] == ["| 256 KiB", "| 128 KiB", "| 32 KiB"]
    for row in rows:
        figures = [float(cell) for cell in row.strip("| ").split(" | ")[1:]]
        assert len(figures) == 4 and all(figure > 0 for figure in figures), row
