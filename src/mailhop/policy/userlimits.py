"""Per-user sending limits for authenticated submission: messages per hour and recipients per message.

Memory backend (one process); the counting interface is small so a Redis backend can implement it for a
cluster. Untrusted input: none beyond the authenticated identity (bounded by the user store's name rules).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from ..reply import Reply

__all__ = ["UserRateLimiter", "rate_reply", "recipients_reply"]

_HOUR = 3600.0


def rate_reply(limit: int) -> Reply:
    return Reply(450, "4.7.1", f"Sending rate limit reached ({limit} messages per hour), try again later")


def recipients_reply(limit: int) -> Reply:
    return Reply(452, "4.7.1", f"Recipient limit reached ({limit} per message), send the rest in a new message")


class UserRateLimiter:
    """A sliding one-hour window of accepted messages per user."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._sent: dict[str, deque[float]] = {}

    def allowed(self, user: str, limit: int | None) -> bool:
        """May ``user`` start another message now?"""
        if limit is None:
            return True
        times = self._sent.get(user)
        if times is None:
            return True
        cutoff = self.clock() - _HOUR
        while times and times[0] <= cutoff:
            times.popleft()
        return len(times) < limit

    def record(self, user: str, limit: int | None) -> None:
        """Count one accepted message (only when a limit applies: nothing to remember otherwise)."""
        if limit is None:
            return
        times = self._sent.setdefault(user, deque())
        times.append(self.clock())
        while len(times) > limit:
            times.popleft()
