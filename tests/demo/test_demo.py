"""``blockstore demo``, the README's main-job command, run as a user runs it."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/fuse") or not shutil.which("nbdfuse"),
    reason="the demo mounts: it needs root, /dev/fuse and nbdfuse",
)


def demo_dirs() -> set[Path]:
    """Demo work directories, and anything named after one in the system's run directory."""
    found = set(Path(tempfile.gettempdir()).glob("blockstore-demo-*"))
    return found | {p for p in Path("/run/blockstore").rglob("*") if "blockstore-demo-" in p.name}


def leftovers(before: set[Path]) -> list[str]:
    """Anything a demo run left behind: work dirs, mounts, registry or server processes,
    mount records or logs in the system's run directory."""
    found = [str(p) for p in demo_dirs() - before]
    with open("/proc/mounts") as mounts:
        found += [line for line in mounts if "blockstore-demo-" in line]
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "blockstore-demo-" in cmdline:
            found.append(cmdline)
    return found


def test_demo_runs_end_to_end_and_leaves_nothing():
    """The demo with its default real tree: it must exit 0 after checking every file
    offline, print its summary, and leave no directory, mount or process behind."""
    before = demo_dirs()
    result = subprocess.run(
        [sys.executable, "-m", "blockstore", "demo"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "identical to the source" in out
    for label in (
        "first mount, whole command",
        "fetched for the first reads",
        "offline mount, whole command",
        "tar.gz: first mount, indexing included",
        "tar.gz: offline mount and full check",
    ):
        assert label in out
    assert "via nbdfuse" in out or "via kernel NBD" in out
    assert leftovers(before) == []


@pytest.mark.parametrize(
    ("signum", "step"),
    [
        (signal.SIGINT, "==> Read a few files"),  # Ctrl-C with the image mounted
        (signal.SIGTERM, "==> Mount it lazily"),  # a kill while the mount is being made
    ],
)
def test_demo_interrupted_cleans_up(tmp_path: Path, signum: int, step: str):
    """Interrupted with the image mounted, or while mounting: the demo must exit 130
    and unmount, stop its registry and server, and remove its working directory."""
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    for i in range(200):
        (tree / "sub" / f"f{i}").write_bytes(os.urandom(20_000))
    before = demo_dirs()
    demo = subprocess.Popen(
        [sys.executable, "-m", "blockstore", "demo", "--source", str(tree)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for line in demo.stdout:
            if line.startswith(step):
                break
        demo.send_signal(signum)
        _, err = demo.communicate(timeout=60)
    finally:
        demo.kill()
    assert demo.returncode == 130, err
    assert leftovers(before) == []
