"""``blockstore demo``, the README's main-job command, run as a user runs it."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from rig.processes import processes_mentioning

from nbdfront.mount import syscall

pytestmark = [
    pytest.mark.skipif(
        os.geteuid() != 0 or not os.path.exists("/dev/fuse") or not shutil.which("nbdfuse"),
        reason="the demo mounts: it needs root, /dev/fuse and nbdfuse",
    ),
    # Each run tells its leftovers from the system run directory's entries of
    # demos, so no two demos may run at once.
    pytest.mark.xdist_group("demo"),
]


SYSTEM_RUN_DIR = Path("/run/blockstore")


def system_run_entries() -> set[Path]:
    """What of a demo is in the system's run directory (mount keys carry the mount point)."""
    if not SYSTEM_RUN_DIR.exists():
        return set()
    return {p for p in SYSTEM_RUN_DIR.rglob("*") if "blockstore-demo-" in p.name}


class DemoRun:
    """A demo whose temporary directory is this test's own (short: it holds Unix sockets),
    so what it leaves is told apart from what other runs on this machine do meanwhile."""

    def __init__(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="bsdt-"))
        self.env = dict(os.environ, TMPDIR=str(self.tmp))
        self.system_before = system_run_entries()

    def leftovers(self) -> list[str]:
        """Anything the run left behind: work dirs (with their mount records and logs),
        mounts, registry or server processes, anything new in the system's run directory."""
        tmp = str(self.tmp)
        found = [str(p) for p in self.tmp.iterdir()]
        found += sorted(str(p) for p in system_run_entries() - self.system_before)
        # Other tests mount at names that are not UTF-8 meanwhile: any bytes must decode.
        with open("/proc/mounts", errors="surrogateescape") as mounts:
            found += [line for line in mounts if tmp in line]
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                cmdline = (
                    (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                )
            except OSError:
                continue
            if tmp in cmdline:
                found.append(cmdline)
        return found

    def undo(self) -> None:
        """Whatever a failed run left: its mounts (deepest first), then its processes, so
        that they do not outlive the test and trouble the ones after it."""
        prefix = f"{self.tmp}/"
        for point in sorted(syscall.mounted(), key=len, reverse=True):
            if point.startswith(prefix):
                syscall.umount(point, lazy=True)
        for pid in processes_mentioning(str(self.tmp)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.tmp, ignore_errors=True)


@pytest.fixture
def demo_run():
    run = DemoRun()
    yield run
    run.undo()


def test_demo_runs_end_to_end_and_leaves_nothing(demo_run):
    """The demo with its default real tree: it must exit 0 after checking every file
    offline, print its summary, and leave no directory, mount or process behind."""
    result = subprocess.run(
        [sys.executable, "-m", "blockstore", "demo"],
        capture_output=True,
        text=True,
        timeout=300,
        env=demo_run.env,
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
    assert demo_run.leftovers() == []


@pytest.mark.parametrize(
    ("signum", "step"),
    [
        (signal.SIGINT, "==> Read a few files"),  # Ctrl-C with the image mounted
        (signal.SIGTERM, "==> Mount it lazily"),  # a kill while the mount is being made
    ],
)
def test_demo_interrupted_cleans_up(tmp_path: Path, demo_run, signum: int, step: str):
    """Interrupted with the image mounted, or while mounting: the demo must exit 130
    and unmount, stop its registry and server, and remove its working directory."""
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    for i in range(200):
        (tree / "sub" / f"f{i}").write_bytes(os.urandom(20_000))
    demo = subprocess.Popen(
        [sys.executable, "-m", "blockstore", "demo", "--source", str(tree)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=demo_run.env,
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
    assert demo_run.leftovers() == []


def test_a_source_holding_fifos_and_sockets_is_imaged_without_them(tmp_path: Path, demo_run):
    """Tried: ``demo --source`` of a tree that holds, beside its files, a FIFO and a
    Unix socket (as ``/run`` or ``/tmp`` do). Must hold: the demo runs to its end (exit
    0), every file identical offline, and nothing left. Before, copying the tree failed
    on them and the demo exited 1 with a Python list of tuples as its error line."""
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "file").write_bytes(os.urandom(100_000))
    os.mkfifo(tree / "sub" / "fifo")
    with socket.socket(socket.AF_UNIX) as listening:
        listening.bind(str(tree / "socket"))
        done = subprocess.run(
            [sys.executable, "-m", "blockstore", "demo", "--source", str(tree)],
            capture_output=True,
            text=True,
            timeout=300,
            env=demo_run.env,
        )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "identical to the source" in done.stdout
    assert demo_run.leftovers() == []


def test_sources_named_by_dot_or_by_the_same_name_each_go_in_the_image(tmp_path: Path, demo_run):
    """Tried: ``demo --source . --source DIR`` run inside DIR, the two sources being one
    tree whose copies would share a name, the first with none (``.``). Must hold: the
    demo runs to its end (exit 0) with both copies in the image, every file identical
    offline, and nothing left. Before, the copy of ``.`` was made over the image's tree
    itself and the demo exited 1 with "[Errno 17] File exists", as did a second source
    of the same base name."""
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "file").write_bytes(os.urandom(100_000))
    done = subprocess.run(
        [sys.executable, "-m", "blockstore", "demo", "--source", ".", "--source", str(tree)],
        capture_output=True,
        text=True,
        timeout=300,
        env=demo_run.env,
        cwd=tree,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "(2 files)" in done.stdout and "identical to the source" in done.stdout
    assert demo_run.leftovers() == []


@pytest.mark.parametrize(
    ("given", "said"), [("nosuch", "no such directory"), ("file", "not a directory")]
)
def test_a_source_that_is_no_directory_is_one_usage_line(tmp_path: Path, given: str, said: str):
    """Tried: ``demo --source`` naming a path that does not exist, and a file. Must hold:
    exit 2, one line naming the path, before the demo starts (no working directory, no
    registry). Before, the demo began, then failed with "[Errno 2] No such file or
    directory" (exit 1)."""
    (tmp_path / "file").write_text("not a tree\n")
    source = tmp_path / given
    done = subprocess.run(
        [sys.executable, "-m", "blockstore", "demo", "--source", str(source)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1 and f"{source}: {said}" in done.stderr, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_a_demo_refused_for_a_missing_tool_leaves_no_working_directory(tmp_path: Path):
    """Tried: ``demo`` with none of the tools it needs on PATH (mkfs.erofs, nbdfuse,
    docker-registry), as on a machine ``./dev setup`` has not prepared. Must hold: exit
    12, one line naming the tool, and nothing left in TMPDIR. Before, its working
    directory was made before the check and stayed, empty, at every such refusal."""
    (tmp_path / "bin").mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "blockstore", "demo"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "TMPDIR": str(tmp_path), "PATH": str(tmp_path / "bin")},
    )
    assert done.returncode == 12, done.stderr
    assert done.stderr.count("\n") == 1 and "the demo needs mkfs.erofs" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bin"]
