"""When to try a request again, and how long to wait first.

Exponential backoff with full jitter (so many clients that failed together
do not retry together), bounded both in attempts and in total time, and a
server's ``Retry-After`` honoured when it asks for a pause (429, 503).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

RETRIABLE_STATUS = frozenset({429, 500, 502, 503, 504})


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 5
    budget: float = 60.0
    """Seconds from the first attempt after which no new attempt starts."""
    base_delay: float = 0.2
    max_delay: float = 10.0

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait before attempt ``attempt + 1`` (``attempt`` counts from 1)."""
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.max_delay)
        ceiling = min(self.max_delay, self.base_delay * 2 ** (attempt - 1))
        return random.uniform(0, ceiling)


class RetryClock:
    """One request's retry state: how many attempts so far, how much time is left."""

    def __init__(self, policy: RetryPolicy):
        self.policy = policy
        self.attempts = 0
        self._deadline = time.monotonic() + policy.budget

    def start_attempt(self) -> None:
        self.attempts += 1

    def wait_before_next(self, retry_after: float | None = None) -> bool:
        """Sleep before the next attempt; False when attempts or time are used up."""
        if self.attempts >= self.policy.max_attempts:
            return False
        pause = self.policy.delay(self.attempts, retry_after)
        if time.monotonic() + pause >= self._deadline:
            return False
        time.sleep(pause)
        return True


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """``Retry-After`` as seconds from now: delta-seconds or an HTTP date; None if absent/bad."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))
