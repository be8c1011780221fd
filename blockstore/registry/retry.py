"""When to try a registry request again, how long to wait first, and when to stop.

One policy and one deadline for each operation (a range read, a manifest
fetch): every attempt of it, whatever failed (no connection, a 5xx or 429,
a body cut short), draws on the same clock, so no loop nests inside another
and a read ends within its timeout. Waits are exponential backoff with full
jitter (so clients that failed together do not retry together), or what the
server asked for in ``Retry-After``. A host that asked for quiet is left
alone by every reader of it until the time it named (``Quiet``); a host
that stopped answering at all is tried once per operation, not retried,
until it answers again (``Outage``).
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import TypeVar

from blockstore.errors import BlockstoreError, RegistryUnreachable

log = logging.getLogger(__name__)

RETRIABLE_STATUS = frozenset({429, 500, 502, 503, 504})
T = TypeVar("T")


class Deadline:
    """The moment an operation must be over; ``seconds=None`` has none (an upload).

    ``stall`` is the longest a single connect or receive may wait: by default
    a third of the whole, so a connection that went silent is given up while
    there is still time for another attempt.
    """

    def __init__(self, seconds: float | None, *, stall: float | None = None):
        self.seconds = seconds
        self._expires = math.inf if seconds is None else time.monotonic() + seconds
        if stall is None:
            if seconds is None:
                raise ValueError("a deadline without an end needs a stall timeout")
            stall = seconds / 3
        self.stall = stall

    def left(self) -> float:
        return max(0.0, self._expires - time.monotonic())

    @property
    def expired(self) -> bool:
        return self.left() <= 0.0

    def cap(self, seconds: float) -> float:
        """``seconds``, or the time left when that is shorter (never 0: sockets take 0 as
        non-blocking)."""
        return max(0.001, min(seconds, self.left()))

    def receive_timeout(self) -> float:
        """What a socket may wait for the next bytes now: the stall, or the time left."""
        return self.cap(self.stall)


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 5
    base_delay: float = 0.2
    max_delay: float = 10.0
    """The longest backoff; a server's ``Retry-After`` is bounded by the deadline instead."""

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait before attempt ``attempt + 1`` (``attempt`` counts from 1)."""
        if retry_after is not None:
            return max(retry_after, 0.0)
        ceiling = min(self.max_delay, self.base_delay * 2 ** (attempt - 1))
        return random.uniform(0, ceiling)


class TryAgain(Exception):
    """A failure another attempt may cure; ``error`` is what the user gets if none does."""

    def __init__(self, error: BlockstoreError, retry_after: float | None = None):
        super().__init__(str(error))
        self.error = error
        self.retry_after = retry_after


def with_retries(policy: RetryPolicy, deadline: Deadline, attempt: Callable[[], T], what: str) -> T:
    """``attempt()`` until it returns, raises anything but ``TryAgain``, or attempts or
    time run out; then the last failure's ``error`` is raised, with the cause it was given
    (a blob body broken off: the registry out of reach, which sets a command's exit code)
    and not the retry's own context."""
    attempts = 0
    while True:
        attempts += 1
        try:
            return attempt()
        except TryAgain as failure:
            pause = policy.delay(attempts, failure.retry_after)
            if attempts >= policy.max_attempts or pause >= deadline.left():
                raise failure.error from failure.error.__cause__
            log.info("retrying %s in %.1fs: %s", what, pause, failure.error)
            time.sleep(pause)


MAX_QUIET = 300.0
"""The longest quiet a host's Retry-After is kept for, in seconds."""


class Quiet:
    """A host's request for quiet (a 429 or 503 with ``Retry-After``), shared by every
    reader of that host, so a thousand reads do not each knock on a door that said
    "come back in two minutes"."""

    def __init__(self) -> None:
        self._until = 0.0
        self._lock = threading.Lock()

    def asked(self, seconds: float) -> None:
        """Keep quiet ``seconds`` (``MAX_QUIET`` at most: a bogus year-long Retry-After
        must not fail every read until a restart; still asked, it is kept again)."""
        with self._lock:
            self._until = max(self._until, time.monotonic() + min(seconds, MAX_QUIET))

    def left(self) -> float:
        return max(0.0, self._until - time.monotonic())

    def wait(self, deadline: Deadline) -> bool:
        """Wait out the quiet if it ends before ``deadline``; False (at once) if not."""
        left = self.left()
        if left <= 0.0:
            return True
        if left >= deadline.left():
            return False
        time.sleep(left)
        return True


DOWN_AFTER = 1.0
"""Seconds a host must have failed every attempt (no reply at all) to be taken as down."""
DOWN_AFTER_FAILURES = 3
"""Failed attempts in a row it takes as well, so that one slow connect is no outage."""
STREAK_GAP = 5.0
"""Seconds from one failure to the start of the next attempt after which that attempt
starts a new streak: one failure long ago, with no request since, says nothing of the
host now."""
PROBE_EVERY = 1.0
"""While the host is down, seconds after which another attempt may go while one is still
in flight: one stuck on a silent host must not keep the rest from finding it back."""


class Outage:
    """A host that stopped answering (refused, unreachable, silent), shared by every
    reader of it.

    Once ``DOWN_AFTER_FAILURES`` attempts in a row have failed over
    ``DOWN_AFTER`` seconds at least (counting only attempts begun after the
    streak's first failure, so a burst that times out together is one), the
    host is down: each operation then tries it once and fails without
    retrying, and while one attempt has been under way for less than
    ``PROBE_EVERY`` the others fail at once instead of queueing on a dead host.
    Without this, a walk over a mount with the registry gone spends a whole
    retry budget (seconds) on every file. The first reply of any kind ends
    the outage, so the read after the host is back succeeds with no pause.
    """

    def __init__(self, host: str):
        self._host = host
        self._lock = threading.Lock()
        self._failing_since: float | None = None  # when the streak's first attempt began
        self._first_failure = 0.0
        self._last_failure = 0.0
        self._probed = 0.0  # when the latest attempt began
        self._failures = 0
        self._down = False
        self._cause = ""
        self._trying = 0

    def enter(self, where: str) -> None:
        """Before an attempt; raises ``RegistryUnreachable`` at once if the host is down
        and another attempt began less than ``PROBE_EVERY`` ago and is still finding
        out whether it is back."""
        now = time.monotonic()
        with self._lock:
            if self._down and self._trying and now - self._probed < PROBE_EVERY:
                raise RegistryUnreachable(
                    f"cannot reach registry {where}: {self._cause} ({self._for()}; "
                    "another request is trying it again)"
                )
            self._trying += 1
            self._probed = now

    def leave(self) -> None:
        with self._lock:
            self._trying -= 1

    def failed(self, cause: str, started: float) -> str | None:
        """An attempt begun at ``started`` got no reply; what to add to its error if the
        host is down (the operation should then fail, not retry), else None."""
        now = time.monotonic()
        with self._lock:
            if self._failing_since is None or (
                not self._down and started - self._last_failure > STREAK_GAP
            ):
                self._failing_since, self._first_failure, self._failures = started, now, 0
            # Only attempts begun after the streak's first failure count: many begun
            # together (a burst of reads) that time out together are one failure of a
            # busy host, not proof that it stopped answering.
            if not self._failures or started >= self._first_failure:
                self._failures += 1
            self._last_failure = now
            self._cause = cause
            if self._down:
                return self._for()
            if self._failures < DOWN_AFTER_FAILURES or now - self._failing_since < DOWN_AFTER:
                return None
            self._down = True
            log.info(
                "registry %s has not answered for %.1fs (%s): each read now tries it once, "
                "without retrying, until it answers again",
                self._host,
                now - self._failing_since,
                cause,
            )
            return self._for()

    def answered(self) -> None:
        """A reply came (of any status): the host is up."""
        if self._failing_since is None:  # the common case, without the lock
            return
        with self._lock:
            if self._down:
                log.info("registry %s answers again, after %s", self._host, self._for())
            self._failing_since, self._failures, self._down = None, 0, False

    def _for(self) -> str:
        since = self._failing_since if self._failing_since is not None else time.monotonic()
        return f"no reply for {time.monotonic() - since:.0f}s"


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """``Retry-After`` as seconds from now: delta-seconds or an HTTP date; None if absent/bad."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))
