"""``blockstore umount`` timed from the moment it tells the server to stop.

A test of the stop's bound tries the wait after the server is told (its grace, then
the kill), not the command's start-up and the checks before its first unmount, which on
a loaded machine take seconds of their own. ``umount`` tells the server right after it
unmounts the top, so that moment is when the mount point stops being one.
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from nbdfront.mount import syscall


@dataclass
class TimedUmount:
    done: subprocess.CompletedProcess
    took: float  # seconds from the command's start to its exit
    since_told: float  # seconds from the top's unmount (the server told to stop) to its exit


def umount_timed(mountpoint: Path, *args: str, timeout: float = 60) -> TimedUmount:
    """Run ``blockstore umount ARGS MOUNTPOINT``, watching for the top's unmount meanwhile."""
    argv = [sys.executable, "-m", "blockstore", "umount", *args, str(mountpoint)]
    started = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    unmounted_at = None
    try:
        while proc.poll() is None:
            if unmounted_at is None and not syscall.is_mounted(str(mountpoint)):
                unmounted_at = time.monotonic()
            if time.monotonic() - started > timeout:
                raise subprocess.TimeoutExpired(argv, timeout)
            time.sleep(0.01)
        ended = time.monotonic()
        stdout, stderr = proc.communicate()
    finally:
        proc.kill()
        proc.wait()
    done = subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr)
    return TimedUmount(done, ended - started, ended - (unmounted_at or ended))
