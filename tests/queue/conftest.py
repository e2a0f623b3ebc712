"""Fixtures for the queue tests: anyio on asyncio, a settable clock."""

from __future__ import annotations

import pytest
from contract import FakeClock


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()
