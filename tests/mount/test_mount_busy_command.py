"""A mount still in use refuses to be unmounted with the command that gets past it."""

from __future__ import annotations

import subprocess
import sys

from nbdfront.mount import records, stack, syscall
from nbdfront.mount.commands import shell_word

BLOCKSTORE = [sys.executable, "-m", "blockstore"]


def pasted(line: str) -> subprocess.CompletedProcess:
    """``line`` pasted into a shell where ``blockstore`` is this checkout's."""
    define = f'blockstore() {{ {" ".join(map(shell_word, BLOCKSTORE))} "$@"; }}; '
    return subprocess.run(["sh", "-c", define + line], capture_output=True, text=True, timeout=60)


def test_a_mount_a_process_still_uses_is_refused_with_the_lazy_umount_to_paste(
    mount_dirs, erofs_images, local_server
):
    """Tried: a mount at a path with a space and a quote in it, a process working inside
    it, then ``blockstore umount`` of it.
    Must hold: refused (exit 13) in one line naming the process and the lazy umount as
    one command, quoted, which pasted into a shell unmounts it and leaves no record.
    Before, the line said only "unmount with --lazy": the module that refuses could not
    make the command without an import cycle."""
    base, _ = mount_dirs
    mountpoint = base / "it's mine"
    mountpoint.mkdir()
    argv = local_server({"layer0": erofs_images.small.path})
    stack.mount(argv, str(mountpoint), image="small")
    squatter = subprocess.Popen(["sleep", "30"], cwd=mountpoint)
    try:
        busy = pasted(f"blockstore umount {shell_word(str(mountpoint))}")
        assert busy.returncode == 13, busy.stderr
        lazily = f"blockstore umount --lazy {shell_word(str(mountpoint))}"
        assert busy.stderr == (
            f"blockstore: {mountpoint} is busy: a process still uses it "
            f"(pid {squatter.pid} (sleep)) (end it, or `{lazily}`, after which what "
            "still uses it gets I/O errors)\n"
        )
        assert syscall.is_mounted(str(mountpoint))
        done = pasted(busy.stderr.split("`")[1])
        assert done.returncode == 0, done.stderr
        assert not syscall.is_mounted(str(mountpoint))
        assert records.load(str(mountpoint)) is None
    finally:
        squatter.kill()
        squatter.wait()
