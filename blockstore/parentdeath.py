"""Children that must not outlive the process that started them.

Linux's parent-death signal (``prctl(PR_SET_PDEATHSIG)``) reaches a child even
when its parent is killed by SIGKILL, which no cleanup code of the parent's
can catch, so nothing is left running behind an interrupted run.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable

PR_SET_PDEATHSIG = 1

# Loaded here, not in the child: between fork and exec the child should do little.
_libc = ctypes.CDLL(None, use_errno=True)


def dies_with_parent(signum: int) -> Callable[[], None]:
    """A ``preexec_fn`` for ``subprocess.Popen``: the child gets ``signum`` when we die.

    The kernel sends it when the thread that started the child exits, so start
    a child from a thread that lives as long as this process means it to. A
    parent gone before the signal was set up would never send it: the child
    then exits at once instead.
    """
    parent = os.getpid()

    def arm() -> None:
        _libc.prctl(PR_SET_PDEATHSIG, signum)
        if os.getppid() != parent:
            os._exit(1)

    return arm
