"""The daemon shortens CPython's GIL switch interval while it runs (why: daemon.GIL_SWITCH_INTERVAL) and puts the
previous one back when it stops. A real daemon in this process, on a loopback port."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from mailhop.config.load import load_config
from mailhop.daemon import GIL_SWITCH_INTERVAL, Daemon
from tests.support.sink import free_port

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_the_switch_interval_is_short_while_serving_and_restored_after(tmp_path: Path) -> None:
    port = free_port()
    config_path = tmp_path / "mailhop.toml"
    config_path.write_text(
        f'hostname = "relay.test"\n[[listener]]\naddress = "127.0.0.1:{port}"\nrole = "mx"\n'
        f'[queue]\npath = "{tmp_path / "spool"}"\n[delivery]\nenabled = false\n'
    )
    before = sys.getswitchinterval()
    assert before != pytest.approx(GIL_SWITCH_INTERVAL)
    daemon = Daemon(load_config(config_path))
    task = asyncio.create_task(daemon.run())
    try:
        for _ in range(500):  # until the listener answers
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                break
            except OSError:
                await asyncio.sleep(0.01)
        else:
            pytest.fail("the daemon never listened")
        assert (await reader.readline()).startswith(b"220")
        assert sys.getswitchinterval() == pytest.approx(GIL_SWITCH_INTERVAL)
        writer.close()
    finally:
        daemon.request_stop()
        await asyncio.wait_for(task, 10)
    assert sys.getswitchinterval() == pytest.approx(before)
