"""The outbound throttle: overall and per-destination limits, forgetting idle destinations, cancellation."""

from __future__ import annotations

import asyncio

import pytest

from mailhop.delivery.throttle import Throttle

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_limits_hold_and_idle_destinations_are_forgotten() -> None:
    throttle = Throttle(max_total=3, max_per_destination=2)
    busy = {"a": 0, "b": 0, "all": 0}
    peak = {"a": 0, "b": 0, "all": 0}

    async def attempt(dest: str) -> None:
        async with throttle.slot(dest):
            busy[dest] += 1
            busy["all"] += 1
            for key in (dest, "all"):
                peak[key] = max(peak[key], busy[key])
            await asyncio.sleep(0.01)
            busy[dest] -= 1
            busy["all"] -= 1

    await asyncio.gather(*(attempt(d) for d in "ab" * 10))
    assert peak == {"a": 2, "b": 2, "all": 3}
    assert throttle.active("a") == throttle.active("b") == 0
    assert throttle._per_dest == {}


async def test_cancelled_waiter_and_failing_body_release_everything() -> None:
    throttle = Throttle(max_total=1, max_per_destination=1)
    entered = asyncio.Event()
    release = asyncio.Event()

    async def holder() -> None:
        async with throttle.slot("x"):
            entered.set()
            await release.wait()

    task = asyncio.create_task(holder())
    await entered.wait()
    waiter = asyncio.create_task(throttle.slot("x").__aenter__())
    await asyncio.sleep(0.01)
    assert throttle.active("x") == 2
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert throttle.active("x") == 1
    release.set()
    await task
    with pytest.raises(RuntimeError):
        async with throttle.slot("y"):
            raise RuntimeError("attempt failed")
    async with throttle.slot("x"):  # nothing leaked: both limits are free again
        assert throttle.active("x") == 1
    assert throttle._per_dest == {}
