"""What the kernel has mounted, read back from mountinfo, for any mount point name."""

from __future__ import annotations

import subprocess
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blockstore.errors import MountpointBusy
from nbdfront.mount import syscall
from nbdfront.mount.syscall import _unescape

# What the kernel's mangle() escapes in mountinfo fields: each as \NNN octal.
KERNEL_ESCAPED = " \t\n\\"


def kernel_escape(path: str) -> str:
    return "".join(f"\\{ord(c):03o}" if c in KERNEL_ESCAPED else c for c in path)


def test_non_ascii_mount_point_with_a_space():
    """A UTF-8 name with an escaped space comes back as it was written: only the \\040
    is undone, the non-ASCII characters are left as they are (not read as Latin-1)."""
    assert _unescape("/mnt/café\\040über\\011ß\\134x") == "/mnt/café über\tß\\x"


@given(st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0")))
def test_any_path_survives_the_kernel_escaping(path):
    """Whatever a path holds, escaping it as the kernel does and unescaping gives it back."""
    assert _unescape(kernel_escape(path)) == path


def test_a_real_mount_at_a_non_ascii_path_with_a_space_is_seen(mount_dirs):
    """A tmpfs mounted at ``tmp/café dir`` is listed under that exact path, and is_mounted
    says so, until it is unmounted."""
    target = mount_dirs[0] / "café dir"
    target.mkdir()
    syscall.mount("none", str(target), "tmpfs")
    try:
        assert syscall.mounted()[str(target)][0] == "tmpfs"
        assert syscall.is_mounted(str(target))
    finally:
        syscall.umount(str(target))
    assert not syscall.is_mounted(str(target))


def test_a_file_system_held_for_a_moment_longer_is_unmounted_not_called_busy(mount_dirs):
    """Tried: a tmpfs whose last user (a shell in it) ends 0.3 s after ``umount`` is
    asked, as a reader's last ``cat`` or the kernel's release of a layer unmounted just
    before would hold it. Must hold: it is unmounted, not refused as busy; a user who
    stays is still refused, after a second, naming the process."""
    target = mount_dirs[0] / "held"
    target.mkdir()
    syscall.mount("none", str(target), "tmpfs")
    try:
        ending = subprocess.Popen(["sh", "-c", "sleep 0.3"], cwd=target)
        staying = None
        try:
            syscall.umount(str(target))
            assert not syscall.is_mounted(str(target))
            syscall.mount("none", str(target), "tmpfs")
            staying = subprocess.Popen(["sleep", "30"], cwd=target)
            started = time.monotonic()
            with pytest.raises(MountpointBusy, match=rf"pid {staying.pid} \(sleep\)"):
                syscall.umount(str(target))
            assert 0.9 < time.monotonic() - started < 5
        finally:
            ending.wait()
            if staying is not None:
                staying.kill()
                staying.wait()
    finally:
        if syscall.is_mounted(str(target)):
            syscall.umount(str(target))
