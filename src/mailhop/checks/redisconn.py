"""One Redis connection for a check's shared state, with what the checks' Redis backends share: redis-py's
asyncio client, imported only when a connection is made (redis is an optional dependency), every command bounded
by a timeout, and a warning at most once a minute while the server is away (each backend fails open)."""

from __future__ import annotations

import importlib
import logging
import math
import time
from typing import Any

__all__ = ["RedisConnection"]


class RedisConnection:
    """A client for ``url`` and the errors that mean "Redis is away"; ``warn`` logs one of them, throttled."""

    WARN_EVERY = 60.0

    def __init__(self, url: str, *, timeout: float, log: logging.Logger, consequence: str) -> None:
        redis_asyncio = importlib.import_module("redis.asyncio")
        exceptions = importlib.import_module("redis.exceptions")
        self.client: Any = redis_asyncio.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        self.errors: tuple[type[BaseException], ...] = (exceptions.RedisError, OSError)
        self._log = log
        self._consequence = consequence  # what the warning says happens meanwhile
        self._warned = -math.inf

    def script(self, lua: str) -> Any:
        """A server-side script (atomic on the server), called as ``await script(keys=[...], args=[...])``."""
        return self.client.register_script(lua)

    def warn(self, exc: BaseException) -> None:
        now = time.monotonic()
        if now - self._warned >= self.WARN_EVERY:
            self._warned = now
            check = self._log.name.rsplit(".", 1)[-1]  # "mailhop.checks.greylist" -> "greylist"
            self._log.warning("%s: redis unavailable (%s: %s); %s until it is back", check, type(exc).__name__, exc,
                              self._consequence)

    async def aclose(self) -> None:
        await self.client.aclose()
