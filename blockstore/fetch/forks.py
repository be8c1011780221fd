"""Starting afresh in a forked child: threads do not survive a fork, their state does.

A child inherits the queues, counts and locks of threads that exist only
in its parent (a lock may even be held by one of them), and fetches the
parent had in flight will never finish there. Each object that runs
threads registers here and is told, in the child, to drop all of that.
"""

from __future__ import annotations

import os
import weakref
from typing import Protocol


class ForkAware(Protocol):
    def forget_threads(self) -> None:
        """In a forked child: new locks, no threads, nothing in flight."""


_objects: weakref.WeakSet = weakref.WeakSet()


def register(obj: ForkAware) -> None:
    _objects.add(obj)


def _after_fork_in_child() -> None:
    for obj in list(_objects):
        obj.forget_threads()


os.register_at_fork(after_in_child=_after_fork_in_child)
