"""The backend contract (contract.py) run against SqliteQueue."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from contract import *  # noqa: F403 (the contract's test functions are collected here)
from contract import FakeClock

from mailhop.queue import SqliteQueue


@pytest.fixture
async def backend(anyio_backend: str, tmp_path: Path, clock: FakeClock) -> AsyncIterator[SqliteQueue]:
    q = SqliteQueue(tmp_path / "spool", clock=clock)
    await q.start()
    try:
        yield q
    finally:
        await q.stop()


@pytest.fixture
async def reopen(anyio_backend: str, tmp_path: Path,
                 clock: FakeClock) -> AsyncIterator[Callable[[SqliteQueue], Awaitable[SqliteQueue]]]:
    opened: list[SqliteQueue] = []

    async def _reopen(old: SqliteQueue) -> SqliteQueue:
        await old.stop()
        q = SqliteQueue(tmp_path / "spool", clock=clock)
        await q.start()
        opened.append(q)
        return q

    try:
        yield _reopen
    finally:
        for q in opened:
            await q.stop()
