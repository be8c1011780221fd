"""The bytes and requests one connection may have in flight."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

ROOM_POLL = 0.05
"""How often a read larger than its connection's share looks again for room
server-wide (other connections free what they hold without a word to this one)."""
LIMIT_POLL = 0.16
"""How often a waiter for a release looks again all the same: the limit grows as
other connections close, without a word to this one."""


class Budget:
    """Bytes and requests in flight on one connection; ``acquire`` waits while over.

    Reads handed to workers hold what they were granted until their reply is
    in the outbox; reply bytes the socket has not taken are ``charge``\\ d by
    the outbox until sent. ``close`` wakes every waiter for good.

    A thread that waits for something else too (the client's next request)
    waits on ``signal`` instead (``acquire_or_signal``); it is made, and
    written, only once such a thread waits: a release costs no system call
    while none does.
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
        self._signal: int | None = None  # an eventfd
        self._signal_wanted = False  # written at the next change that may make room
        self._signal_set = False  # written and not read since

    def acquire(self, nbytes: int, *, wait: bool = True, timeout: float | None = None) -> bool:
        """Take ``nbytes`` and one request; False (nothing taken) if over and not
        ``wait``, still over after ``timeout`` seconds, or closed. Something is always
        granted when nothing is held."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while (poll := self._over(nbytes)) is not None:
                if not wait or self._closed:
                    return False
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return False
                    poll = min(poll, left)
                self._cond.wait(poll)
            return self._take(nbytes)

    def acquire_or_signal(self, nbytes: int) -> float:
        """Take ``nbytes`` and one request if they fit now (0.0 then). Else the next
        release, refund or close makes ``signal`` readable, and the answer is how long
        to wait for it at most before asking again (the limit and the room server-wide
        change without a word to this connection); nothing is taken."""
        with self._cond:
            if self._signal_set:
                self._signal_set = False
                os.eventfd_read(self._made_signal())
            poll = self._over(nbytes)
            if poll is None and self._take(nbytes):
                return 0.0
            self._made_signal()
            self._signal_wanted = True
            return LIMIT_POLL if poll is None else poll

    @property
    def signal(self) -> int:
        """A file descriptor readable once ``acquire_or_signal`` may find room."""
        with self._cond:
            return self._made_signal()

    def _made_signal(self) -> int:
        if self._signal is None:
            self._signal = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        return self._signal

    def _over(self, nbytes: int) -> float | None:
        """None if ``nbytes`` and a request fit now; else how long a waiter may wait
        for a release before looking again."""
        limit = self._max_bytes()
        if (self.requests or self.bytes > 0) and (
            self.bytes + nbytes > limit or self.requests >= self._max_requests
        ):
            return LIMIT_POLL
        if nbytes > limit and not self._room(nbytes):
            # Other connections free what they hold without a word to this one.
            return ROOM_POLL
        return None

    def _take(self, nbytes: int) -> bool:
        if self._closed:
            return False
        self.bytes += nbytes
        self.requests += 1
        return True

    def _changed(self) -> None:
        """With the lock held: wake every waiter, and ``signal`` the one that asked."""
        self._cond.notify_all()
        if self._signal_wanted and self._signal is not None:
            self._signal_wanted = False
            self._signal_set = True
            os.eventfd_write(self._signal, 1)

    def release(self, nbytes: int) -> None:
        with self._cond:
            self.bytes -= nbytes
            self.requests -= 1
            self._changed()

    def charge(self, nbytes: int) -> None:
        """Count queued reply bytes: never waits, may go over."""
        with self._cond:
            self.bytes += nbytes

    def refund(self, nbytes: int) -> None:
        with self._cond:
            self.bytes -= nbytes
            self._changed()

    def wait_for_room(self) -> None:
        """Return once the bytes are within the limit (or the connection is gone);
        looked at again every ``LIMIT_POLL``, as the limit grows without a word."""
        with self._cond:
            while self.bytes > self._max_bytes() and not self._closed:
                self._cond.wait(LIMIT_POLL)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._changed()

    def close_signal(self) -> None:
        """Let ``signal`` go, once no thread waits on it (a release after is not told)."""
        with self._cond:
            if self._signal is not None:
                os.close(self._signal)
                self._signal = None
                self._signal_set = self._signal_wanted = False
