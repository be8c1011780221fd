"""The bytes and requests one connection may have in flight."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

ROOM_POLL = 0.05
"""How often a read larger than its connection's share looks again for room
server-wide (other connections free what they hold without a word to this one)."""


class Budget:
    """Bytes and requests in flight on one connection; ``acquire`` waits while over.

    Reads handed to workers hold what they were granted until their reply is
    in the outbox; reply bytes the socket has not taken are ``charge``\\ d by
    the outbox until sent. ``close`` wakes every waiter for good.
    """

    def __init__(
        self,
        max_bytes: Callable[[], int],
        max_requests: int,
        room: Callable[[int], bool] = lambda nbytes: True,
    ):
        """``max_bytes()``: the limit now (it shrinks as connections open). ``room(n)``:
        whether the server as a whole can take ``n`` more bytes; asked of a read larger
        than the limit, which would otherwise be granted whole to a connection holding
        nothing (a read that is not streamed, up to 32 MiB)."""
        self._max_bytes = max_bytes
        self._max_requests = max_requests
        self._room = room
        self.bytes = 0
        self.requests = 0
        self._closed = False
        self._cond = threading.Condition(threading.Lock())

    def acquire(self, nbytes: int, *, wait: bool = True, timeout: float | None = None) -> bool:
        """Take ``nbytes`` and one request; False (nothing taken) if over and not
        ``wait``, still over after ``timeout`` seconds, or closed. Something is always
        granted when nothing is held."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                limit = self._max_bytes()
                if (self.requests or self.bytes > 0) and (
                    self.bytes + nbytes > limit or self.requests >= self._max_requests
                ):
                    poll = None
                elif nbytes > limit and not self._room(nbytes):
                    # Other connections free what they hold without a word to this one.
                    poll = ROOM_POLL
                else:
                    break
                if not wait or self._closed:
                    return False
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return False
                    poll = left if poll is None else min(poll, left)
                self._cond.wait(poll)
            if self._closed:
                return False
            self.bytes += nbytes
            self.requests += 1
            return True

    def release(self, nbytes: int) -> None:
        with self._cond:
            self.bytes -= nbytes
            self.requests -= 1
            self._cond.notify_all()

    def charge(self, nbytes: int) -> None:
        """Count queued reply bytes: never waits, may go over."""
        with self._cond:
            self.bytes += nbytes

    def refund(self, nbytes: int) -> None:
        with self._cond:
            self.bytes -= nbytes
            self._cond.notify_all()

    def wait_for_room(self) -> None:
        """Return once the bytes are within the limit (or the connection is gone)."""
        with self._cond:
            while self.bytes > self._max_bytes() and not self._closed:
                self._cond.wait()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
