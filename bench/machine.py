"""What the figures were measured on: CPUs, memory, kernel, and each tool's version."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

from bench.processes import tool_version

TOOLS = {
    "nbdkit": ["nbdkit", "--version"],
    "nbdcopy": ["nbdcopy", "--version"],
    "fio": ["fio", "--version"],
    "nbd-server": ["nbd-server", "-V"],
    "mkfs.erofs": ["mkfs.erofs", "-V"],
    "docker-registry": ["docker-registry", "--version"],
}


def describe() -> dict:
    return {
        "cpus": os.cpu_count(),
        "cpu": _cpu_model(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "engine_commit": _commit(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "tools": {name: tool_version(argv) for name, argv in TOOLS.items()},
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _commit() -> str:
    return commit_of(Path(__file__).parent)


def commit_of(checkout: Path) -> str:
    """The short commit a source tree is at ("unknown" outside git)."""
    done = subprocess.run(
        ["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    )
    return done.stdout.strip() or "unknown"
