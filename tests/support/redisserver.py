"""The machine's Redis (127.0.0.1:6379) for tests of the shared backends: a skip with the reason when it is missing,
a failure under CI=true; a fresh key prefix per test, and removing its keys afterwards."""

from __future__ import annotations

import os
import uuid

import pytest

__all__ = ["REDIS_URL", "delete_prefix", "fresh_prefix", "redis_or_skip"]

REDIS_URL = "redis://127.0.0.1:6379/0"


def redis_or_skip() -> None:
    """Skip (fail under CI=true) when redis-py or the Redis server at 127.0.0.1:6379 is missing."""
    reason = ""
    try:
        import redis
    except ImportError:
        reason = "redis-py not installed (pip install 'redis>=5')"
    else:
        try:
            with redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1.0, socket_timeout=1.0) as client:
                client.ping()
        except (redis.RedisError, OSError) as exc:
            reason = f"no Redis server at 127.0.0.1:6379 ({exc})"
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)


def fresh_prefix() -> str:
    """A key prefix no other test (or run) uses."""
    return f"mailhop-test:{uuid.uuid4().hex}:"


async def delete_prefix(prefix: str) -> None:
    """Remove every key under prefix."""
    import redis.asyncio

    client = redis.asyncio.Redis.from_url(REDIS_URL)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()
