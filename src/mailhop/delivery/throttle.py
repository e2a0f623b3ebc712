"""Outbound concurrency: at most N attempts in flight overall and M per destination, so one slow domain cannot
take every connection. Slots are taken per destination first, then overall, always in that order (no deadlock).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

__all__ = ["Throttle"]


class Throttle:
    def __init__(self, max_total: int, max_per_destination: int) -> None:
        self._total = asyncio.Semaphore(max_total)
        self._per_dest_max = max_per_destination
        self._per_dest: dict[str, tuple[asyncio.Semaphore, list[int]]] = {}

    @asynccontextmanager
    async def slot(self, destination: str) -> AsyncIterator[None]:
        entry = self._per_dest.get(destination)
        if entry is None:
            entry = self._per_dest[destination] = (asyncio.Semaphore(self._per_dest_max), [0])
        sem, users = entry
        users[0] += 1
        try:
            async with sem, self._total:
                yield
        finally:
            users[0] -= 1
            if users[0] == 0:
                # Forget idle destinations so a bulk run over a million domains does not keep a million semaphores.
                self._per_dest.pop(destination, None)

    def active(self, destination: str) -> int:
        entry = self._per_dest.get(destination)
        return 0 if entry is None else entry[1][0]
