"""One cause, one exit code: a registry's refusal met under a read, whatever the command."""

from __future__ import annotations

import pytest
from rig.fault_proxy import Fault
from rig.prefetching import blockstore


@pytest.mark.parametrize("command", ["index", "prefetch"])
def test_a_reply_of_another_range_exits_3_for_every_command(
    registry, pushed_images, fault_proxy, tmp_path, command
):
    """Tried: ``index`` and ``prefetch`` of the small image from a registry that answers
    every range read of a blob 206 with a ``Content-Range`` one byte past the span
    asked. Must hold: both exit 3 (the registry's answer refused), in one line naming the
    blob. Before, ``prefetch`` gave 3 and ``index`` 7, the code of bytes not cached while
    offline: the rule lived in ``prefetch`` alone, not in the one mapping of errors to
    codes."""
    proxy = fault_proxy(registry)
    proxy.fault = Fault("bad_range", path_contains="/blobs/", method="GET")
    reference = pushed_images.small.replace(registry.host, proxy.host)

    got = blockstore(
        command, reference, "--insecure", "--timeout", "5", "--cache-dir", str(tmp_path / "c")
    )

    assert got.returncode == 3, got.stderr
    (line,) = got.stderr.strip().splitlines()
    assert "blob sha256:" in line and "'bytes 1-" in line, line
