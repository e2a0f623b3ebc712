"""The backend contract (contract.py) run against SqliteQueue: as configured by default, and with every body kept in
memory going to a body segment (``segment_min = 1``, segments.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from contract import *  # noqa: F403 (the contract's test functions are collected here)
from contract import FakeClock

from mailhop.queue import SqliteQueue


@pytest.fixture(params=[0, 1], ids=["database-bodies", "segment-bodies"])
def segment_min(request: pytest.FixtureRequest) -> int:
    return int(request.param)


@pytest.fixture
async def backend(anyio_backend: str, tmp_path: Path, clock: FakeClock, segment_min: int) -> AsyncIterator[SqliteQueue]:
    q = SqliteQueue(tmp_path / "spool", clock=clock, segment_min=segment_min)
    await q.start()
    try:
        yield q
    finally:
        await q.stop()


@pytest.fixture
async def reopen(anyio_backend: str, tmp_path: Path, clock: FakeClock,
                 segment_min: int) -> AsyncIterator[Callable[[SqliteQueue], Awaitable[SqliteQueue]]]:
    opened: list[SqliteQueue] = []

    async def _reopen(old: SqliteQueue) -> SqliteQueue:
        await old.stop()
        q = SqliteQueue(tmp_path / "spool", clock=clock, segment_min=segment_min)
        await q.start()
        opened.append(q)
        return q

    try:
        yield _reopen
    finally:
        for q in opened:
            await q.stop()
