from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .harness import Relay, run_relay


@pytest.fixture(scope="module", params=["uvloop", "asyncio"])
def relay(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Relay]:
    """A relay that trusts loopback (so the test client may relay anywhere), small limits to exercise them.
    Every test using it runs on both event loops."""
    extra = """
    [limits]
    max_recipients = 100
    max_message_size = 100000
    max_errors = 5
    max_connections_per_ip = 200
    """
    with run_relay(tmp_path_factory.mktemp("relay"), extra=extra, loop=request.param) as r:
        yield r


@pytest.fixture(scope="module")
def mx_relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Relay]:
    """A relay that trusts no loopback client: only served domains may be reached (the open-relay tests)."""
    tmp: Path = tmp_path_factory.mktemp("mx")
    with run_relay(tmp, trusted='["192.0.2.0/24"]', domains='["example.test", "bücher.test"]') as r:
        yield r
