"""What the kernel has mounted, read back from mountinfo, for any mount point name."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

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
