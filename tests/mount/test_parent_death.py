"""Children that must not outlive their parent: a mount's server, the local registry."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from nbdfront.mount.process import ProcessRef

PARENT = textwrap.dedent(
    """
    import signal, subprocess, sys, time
    from blockstore.parentdeath import dies_with_parent
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"],
        preexec_fn=dies_with_parent(getattr(signal, sys.argv[1])),
    )
    print(child.pid, flush=True)
    time.sleep(60)
    """
)


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGKILL"])
def test_child_goes_when_its_parent_is_killed(signame):
    """A child started with ``dies_with_parent`` by a process that is then SIGKILLed (no
    cleanup of its own can run) gets the signal and is gone within seconds."""
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, signame], stdout=subprocess.PIPE, text=True
    )
    child_pid = int(parent.stdout.readline())
    child = ProcessRef.of(child_pid)
    try:
        assert child is not None and child.alive()
        parent.kill()
        parent.wait()
        assert child.wait(5), f"the child outlived its parent ({signame} never came)"
    finally:
        parent.stdout.close()
        if child is not None and child.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signal.SIGKILL)
