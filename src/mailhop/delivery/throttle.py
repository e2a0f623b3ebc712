"""Outbound concurrency: at most N attempts in flight overall and M per destination, so one slow domain cannot
take every connection. Slots are taken per destination first, then overall, always in that order (no deadlock).
"""

from __future__ import annotations

import asyncio
from types import TracebackType

__all__ = ["Throttle"]


class _Slot:
    """``async with throttle.slot(destination)``: a plain class, not a generator-based context manager,
    because delivery takes one per attempt."""

    __slots__ = ("_destination", "_sem", "_throttle", "_users")

    def __init__(self, throttle: Throttle, destination: str) -> None:
        self._throttle = throttle
        self._destination = destination
        self._sem: asyncio.Semaphore | None = None
        self._users: list[int] = [0]

    async def __aenter__(self) -> None:
        throttle, destination = self._throttle, self._destination
        entry = throttle._per_dest.get(destination)
        if entry is None:
            entry = throttle._per_dest[destination] = (asyncio.Semaphore(throttle._per_dest_max), [0])
        sem, users = entry
        self._users = users
        users[0] += 1
        try:
            await sem.acquire()
            try:
                await throttle._total.acquire()
            except BaseException:
                sem.release()
                raise
        except BaseException:
            self._leave(users)
            raise
        self._sem = sem

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        sem = self._sem
        assert sem is not None
        self._throttle._total.release()
        sem.release()
        self._leave(self._users)

    def _leave(self, users: list[int]) -> None:
        users[0] -= 1
        if users[0] == 0:
            # Forget idle destinations so a bulk run over a million domains does not keep a million semaphores.
            self._throttle._per_dest.pop(self._destination, None)


class Throttle:
    def __init__(self, max_total: int, max_per_destination: int) -> None:
        self._total = asyncio.Semaphore(max_total)
        self._per_dest_max = max_per_destination
        self._per_dest: dict[str, tuple[asyncio.Semaphore, list[int]]] = {}

    def slot(self, destination: str) -> _Slot:
        """Hold one overall and one per-destination slot for the body of ``async with``."""
        return _Slot(self, destination)

    def active(self, destination: str) -> int:
        entry = self._per_dest.get(destination)
        return 0 if entry is None else entry[1][0]
