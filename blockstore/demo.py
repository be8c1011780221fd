"""``blockstore demo``: the whole product, end to end, on this machine.

It starts a registry on loopback, builds an EROFS image of a real tree,
pushes it, mounts it lazily and reads a little (showing how little was
fetched), fills the rest of the cache, unmounts, stops the registry, mounts
again offline, checks every file against the source, and prints a summary.
An ordinary tar.gz image of the same tree goes the same way: mounted with no
conversion (its one indexing pass timed), prefetched, and mounted offline.
Every step runs the same ``blockstore`` commands a user would type, and the
commands are shown. Whatever happens, including Ctrl-C or SIGTERM, it
unmounts, stops the registry and removes its working directory; its mount
records and server logs live there too (``BLOCKSTORE_RUN_DIR``), so nothing
of it outlives the run.
"""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from blockstore.errors import BlockstoreError, MissingDependency, NotPermitted
from blockstore.localregistry import LocalRegistry
from blockstore.progress import human

DEFAULT_SOURCES = (Path(sysconfig.get_paths()["stdlib"]), Path("/usr/share/doc"))
"""A real tree found on every Debian machine: a few thousand files, text and binary."""
LAZY_READ_BYTES = 2 << 20
"""How much of the tree the lazy phase reads before showing what was fetched."""
REPOSITORY = "demo/tree"
TAR_GZ_REPOSITORY = "demo/tree-targz"


class DemoFailed(BlockstoreError):
    """A demo step did not do what it should; the message says which."""


class Demo:
    """One run of the demo in its own temporary directory."""

    def __init__(self, sources: list[Path], keep: bool = False):
        # Before the working directory is made: a refusal leaves nothing behind.
        check_prerequisites()
        self.sources = sources
        self.keep = keep
        self.workdir = Path(tempfile.mkdtemp(prefix="blockstore-demo-"))
        self.tree = self.workdir / "tree"
        self.image_path = self.workdir / "image.erofs"
        self.cache_dir = self.workdir / "cache"
        self.mountpoint = self.workdir / "mnt"
        self.registry = LocalRegistry(self.workdir)
        self.reference = f"{self.registry.host}/{REPOSITORY}:latest"
        self.tar_gz_path = self.workdir / "image.tar.gz"
        self.tar_gz_reference = f"{self.registry.host}/{TAR_GZ_REPOSITORY}:latest"
        self.tar_gz_mountpoint = self.workdir / "mnt-targz"
        self.mounted = False
        self.summary: list[tuple[str, str]] = []

    # --- the story ------------------------------------------------------------

    def run(self) -> int:
        previous = signal.signal(signal.SIGTERM, _interrupt)
        os.environ["BLOCKSTORE_RUN_DIR"] = str(self.workdir / "run")
        try:
            files = self.build()
            self.publish()
            self.mount_lazily()
            self.read_some(files)
            self.fill_cache()
            self.umount()
            self.mount_tar_gz()
            self.go_offline()
            self.mount_offline()
            self.check_everything()
            self.umount()
            self.mount_tar_gz_offline()
            self.print_summary()
        finally:
            signal.signal(signal.SIGTERM, previous)
            self.clean_up()
        return 0

    def build(self) -> list[Path]:
        step("Build an EROFS image of a real tree")
        self.tree.mkdir()
        for source in self.sources:
            shutil.copytree(
                source,
                _free_name(self.tree, source),
                symlinks=True,
                ignore=_left_out,
                ignore_dangling_symlinks=True,
            )
        files = sorted(p for p in walk(self.tree) if p.is_file() and not p.is_symlink())
        tree_bytes = sum(p.stat().st_size for p in files)
        show(f"mkfs.erofs --quiet -T0 --all-root image.erofs tree/   ({len(files)} files)")
        run(["mkfs.erofs", "--quiet", "-T0", "--all-root", str(self.image_path), str(self.tree)])
        self.image_size = self.image_path.stat().st_size
        show("tar -C tree -czf image.tar.gz .   (an ordinary image layer, for comparison)")
        run(["tar", "-C", str(self.tree), "-czf", str(self.tar_gz_path), "."])
        self.summary += [
            ("files in the tree", f"{len(files)} ({human(tree_bytes)})"),
            ("image size", human(self.image_size)),
        ]
        return files

    def publish(self) -> None:
        step(f"Start a registry on {self.registry.host} and push the image")
        self.registry.start()
        self.blockstore("push", str(self.image_path), self.reference, "--insecure")
        self.blockstore("push", str(self.tar_gz_path), self.tar_gz_reference, "--insecure")

    def mount_lazily(self) -> None:
        step("Mount it lazily: nothing is downloaded up front")
        self.mountpoint.mkdir()
        started = time.monotonic()
        self.blockstore(*self.mount_args("--insecure"))
        self.mounted = True
        self.summary.append(("first mount, whole command", f"{time.monotonic() - started:.2f} s"))

    def read_some(self, files: list[Path]) -> None:
        step("Read a few files through the mount")
        read = 0
        for path in files:
            if read >= LAZY_READ_BYTES:
                break
            relative = path.relative_to(self.tree)
            if not filecmp.cmp(path, self.mountpoint / relative, shallow=False):
                raise DemoFailed(f"{relative} differs from the source")
            read += path.stat().st_size
        fetched = self.cached_bytes()
        show(f"read {human(read)}; fetched {human(fetched)} of the {human(self.image_size)} image")
        self.summary.append(
            (
                "fetched for the first reads",
                f"{human(fetched)} ({fetched / self.image_size:.1%} of the image)",
            )
        )

    def fill_cache(self) -> None:
        step("Fetch the rest into the cache, verify it against its digest and seal it")
        started = time.monotonic()
        self.blockstore(
            "prefetch", self.reference, "--insecure", "--cache-dir", str(self.cache_dir)
        )
        self.summary.append(("prefetch of the rest", f"{time.monotonic() - started:.2f} s"))

    def mount_tar_gz(self) -> None:
        step("Mount the tar.gz image as it is: one pass indexes it, then reads are lazy")
        self.tar_gz_mountpoint.mkdir()
        started = time.monotonic()
        self.blockstore(*self.mount_args("--insecure", tar_gz=True))
        self.mounted = True
        seconds = time.monotonic() - started
        self.summary.append(("tar.gz: first mount, indexing included", f"{seconds:.2f} s"))
        started = time.monotonic()
        entries = sum(1 for _ in walk(self.tar_gz_mountpoint))
        seconds = time.monotonic() - started
        show(f"listed {entries} entries in {seconds:.2f} s")
        self.summary.append(("tar.gz: first full listing", f"{entries} entries, {seconds:.2f} s"))
        self.blockstore("umount", str(self.tar_gz_mountpoint))
        self.blockstore(
            "prefetch", self.tar_gz_reference, "--insecure", "--cache-dir", str(self.cache_dir)
        )

    def mount_tar_gz_offline(self) -> None:
        step("Mount the tar.gz image again, offline, and check every file")
        started = time.monotonic()
        self.blockstore(*self.mount_args("--offline", tar_gz=True))
        self.mounted = True
        checked = compare_trees(self.tree, self.tar_gz_mountpoint)
        seconds = time.monotonic() - started
        self.summary.append(
            (
                "tar.gz: offline mount and full check",
                f"{checked} entries identical, {seconds:.2f} s",
            )
        )
        self.blockstore("umount", str(self.tar_gz_mountpoint))
        self.mounted = False

    def go_offline(self) -> None:
        step("Stop the registry: from here on there is no network source at all")
        self.registry.stop()
        show(f"registry on {self.registry.host} stopped")

    def mount_offline(self) -> None:
        step("Mount again, offline, from the cache alone")
        started = time.monotonic()
        self.blockstore(*self.mount_args("--offline"))
        self.mounted = True
        self.summary.append(("offline mount, whole command", f"{time.monotonic() - started:.2f} s"))

    def check_everything(self) -> None:
        step("Read every file and compare it with the source")
        started = time.monotonic()
        checked = compare_trees(self.tree, self.mountpoint)
        seconds = time.monotonic() - started
        show(f"{checked} entries (files, directories, links) identical to the source")
        outcome = f"{checked} entries identical, {seconds:.2f} s"
        self.summary.append(("offline full read and check", outcome))

    def umount(self) -> None:
        self.blockstore("umount", str(self.mountpoint))
        self.mounted = False

    def print_summary(self) -> None:
        step("Summary")
        width = max(len(label) for label, _ in self.summary)
        for label, value in self.summary:
            print(f"  {label:<{width}}  {value}")
        sys.stdout.flush()

    def clean_up(self) -> None:
        # Whether or not a mount finished: an interrupted one may have left a record.
        for mountpoint in (self.mountpoint, self.tar_gz_mountpoint):
            if mountpoint.exists():
                umount = ["-q", "umount", "--lazy", str(mountpoint)]
                subprocess.run(
                    [sys.executable, "-m", "blockstore", *umount], capture_output=True, check=False
                )
        self.registry.stop()
        if self.keep:
            print(f"kept {self.workdir}")
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # --- helpers --------------------------------------------------------------

    def mount_args(self, *extra: str, tar_gz: bool = False) -> list[str]:
        return [
            "mount",
            self.tar_gz_reference if tar_gz else self.reference,
            str(self.tar_gz_mountpoint if tar_gz else self.mountpoint),
            "--cache-dir",
            str(self.cache_dir),
            *extra,
        ]

    def blockstore(self, *args: str) -> str:
        show("blockstore " + " ".join(args))
        return run([sys.executable, "-m", "blockstore", *args], echo=True)

    def cached_bytes(self) -> int:
        ls = ["cache", "ls", "--json", "--cache-dir", str(self.cache_dir)]
        listing = run([sys.executable, "-m", "blockstore", *ls])
        return sum(round(b["cached_fraction"] * b["size"]) for b in json.loads(listing))


def check_prerequisites() -> None:
    if os.geteuid() != 0:
        raise NotPermitted("the demo mounts filesystems: run it as root (sudo)")
    if not os.path.exists("/dev/fuse"):
        raise MissingDependency("the demo needs FUSE (/dev/fuse)")
    for tool in ("mkfs.erofs", "nbdfuse", "docker-registry"):
        if shutil.which(tool) is None:
            raise MissingDependency(f"the demo needs {tool}: run ./dev demo, which installs it")


def _free_name(tree: Path, source: Path) -> Path:
    """Where in ``tree`` a copy of ``source`` goes: under its own name (that of the
    directory ``.`` or ``..`` names, too), with a number added when another source took
    it."""
    name = Path(os.path.abspath(source)).name or "root"
    place, count = tree / name, 1
    while place.exists():
        count += 1
        place = tree / f"{name}-{count}"
    return place


def _left_out(directory: str, names: list[str]) -> set[str]:
    """What of a source tree the image does without: bytecode caches, and entries that
    are not files, directories or links. copytree fails on a FIFO or a socket (as ``/run``
    holds) and would read a device for its bytes (``/dev/zero`` for ever)."""
    left_out = {"__pycache__"} & set(names)
    for name in names:
        mode = os.lstat(os.path.join(directory, name)).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode) or stat.S_ISLNK(mode)):
            left_out.add(name)
    return left_out


def walk(root: Path) -> Iterator[Path]:
    for directory, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in [*dirnames, *sorted(filenames)]:
            yield Path(directory, name)


def compare_trees(source: Path, mounted: Path) -> int:
    """Compare every entry (type, symlink target, bytes); return how many were checked."""
    checked = 0
    for path in walk(source):
        relative = path.relative_to(source)
        other = mounted / relative
        if path.is_symlink():
            same = other.is_symlink() and os.readlink(path) == os.readlink(other)
        elif path.is_dir():
            same = other.is_dir() and not other.is_symlink()
        else:
            same = other.is_file() and filecmp.cmp(path, other, shallow=False)
        if not same:
            raise DemoFailed(f"{relative} differs between the source and the mount")
        checked += 1
    source_count = checked
    mounted_count = sum(1 for _ in walk(mounted))
    if mounted_count != source_count:
        raise DemoFailed(f"the mount has {mounted_count} entries, the source {source_count}")
    return checked


def step(title: str) -> None:
    print(f"\n==> {title}", flush=True)


def show(line: str) -> None:
    print(f"    {line}", flush=True)


def run(argv: list[str], echo: bool = False) -> str:
    """Run a step; interrupted, the step gets SIGINT and is waited for, so it can undo
    what it started (a half-made mount) instead of being killed part way.

    Interrupts are held while the child starts, so there is no moment when it
    runs and the demo could be interrupted without knowing it."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, INTERRUPTS)
    process = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_release
    )
    with process:
        try:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)  # a held interrupt lands here
            stdout, stderr = process.communicate()
        except KeyboardInterrupt:
            process.send_signal(signal.SIGINT)
            process.wait(60)
            raise
    if echo:
        for line in stdout.splitlines():
            show(f"  {line}")
    if process.returncode != 0:
        raise DemoFailed(
            f"{Path(argv[0]).name} {' '.join(argv[1:3])}... failed ({process.returncode}): "
            f"{stderr.strip()}"
        )
    return stdout


INTERRUPTS = {signal.SIGINT, signal.SIGTERM}


def _release() -> None:
    """In the child: take interrupts again (the mask is inherited across exec)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, INTERRUPTS)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt
