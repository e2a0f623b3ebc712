"""Brute-force protection for AUTH: failures are counted per client address and per user name in a sliding
window; past the limit, that address or name is locked out for a penalty period (421 4.7.0 and disconnect).

Untrusted input: client addresses and user names (bounded: the table keeps at most ``max_entries`` keys and
drops the oldest, so a spray of random names cannot grow memory without bound). Pure: the clock is injected.
"""

from __future__ import annotations

import ipaddress
import time
from collections import OrderedDict, deque
from collections.abc import Callable

__all__ = ["AuthLimiter"]


class AuthLimiter:
    def __init__(
        self,
        *,
        max_failures: int = 5,
        window: float = 300.0,
        penalty: float = 900.0,
        max_entries: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_failures = max_failures
        self.window = window
        self.penalty = penalty
        self.max_entries = max_entries
        self.clock = clock
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._locked: OrderedDict[str, float] = OrderedDict()

    @staticmethod
    def ip_key(ip: str) -> str:
        if ":" in ip:  # IPv6: one client usually owns a whole /64
            try:
                return "ip:" + str(ipaddress.ip_network(f"{ip.split('%')[0]}/64", strict=False))
            except ValueError:
                pass
        return "ip:" + ip

    @staticmethod
    def user_key(name: str) -> str:
        return "user:" + name.lower()[:256]

    def locked(self, *keys: str) -> bool:
        """True if any of the keys is serving a penalty."""
        now = self.clock()
        for key in keys:
            until = self._locked.get(key)
            if until is not None:
                if until > now:
                    return True
                del self._locked[key]
        return False

    def failure(self, *keys: str) -> bool:
        """Count one failure against each key; True when this failure locks any of them out."""
        now = self.clock()
        locked = False
        for key in keys:
            times = self._failures.get(key)
            if times is None:
                times = self._failures[key] = deque()
            self._failures.move_to_end(key)
            times.append(now)
            while times and times[0] <= now - self.window:
                times.popleft()
            if len(times) >= self.max_failures:
                self._locked[key] = now + self.penalty
                self._locked.move_to_end(key)
                times.clear()
                locked = True
        while len(self._failures) > self.max_entries:
            self._failures.popitem(last=False)
        while len(self._locked) > self.max_entries:
            self._locked.popitem(last=False)
        return locked

    def success(self, *keys: str) -> None:
        """A successful login clears the user's failures (not the address's: a spray from one address stays)."""
        for key in keys:
            if key.startswith("user:"):
                self._failures.pop(key, None)
