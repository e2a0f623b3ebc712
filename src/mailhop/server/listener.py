"""Listening sockets and the connection caps that apply across them.

Untrusted input: connection attempts. Caps are enforced before any SMTP state is created, so a flood of
connections costs a 421 line each and nothing more.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections import Counter
from collections.abc import Callable

from ..config.schema import ListenerConfig
from .session import SessionContext, SmtpSession

__all__ = ["ConnectionLimiter", "Listener"]

log = logging.getLogger("mailhop.server")


class ConnectionLimiter:
    """Counts open connections overall and per client address."""

    def __init__(self, max_total: int, max_per_ip: int) -> None:
        self.max_total = max_total
        self.max_per_ip = max_per_ip
        self.total = 0
        self._per_ip: Counter[str] = Counter()

    def acquire(self, ip: str) -> bool:
        if self.total >= self.max_total or self._per_ip[ip] >= self.max_per_ip:
            return False
        self.total += 1
        self._per_ip[ip] += 1
        return True

    def release(self, ip: str) -> None:
        self.total -= 1
        self._per_ip[ip] -= 1
        if self._per_ip[ip] <= 0:
            del self._per_ip[ip]


class Listener:
    """One bound address serving one role."""

    def __init__(self, config: ListenerConfig, ctx: SessionContext, implicit_tls: ssl.SSLContext | None = None,
                 handshake_timeout: float = 60.0, reuse_port: bool = False) -> None:
        self.config = config
        self.ctx = ctx
        self.implicit_tls = implicit_tls
        self.handshake_timeout = handshake_timeout
        self.reuse_port = reuse_port
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        host, port = self.config.host_port
        loop = asyncio.get_running_loop()
        factory: Callable[[], asyncio.Protocol] = lambda: SmtpSession(self.ctx)  # noqa: E731
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        if self.implicit_tls is not None:
            # RFC 8314 implicit TLS: the handshake comes before any SMTP; a plaintext client gets no reply.
            self.server = await loop.create_server(
                factory, host, port, family=family, reuse_address=True, reuse_port=self.reuse_port or None,
                backlog=1024, start_serving=True, ssl=self.implicit_tls, ssl_handshake_timeout=self.handshake_timeout,
            )
        else:
            self.server = await loop.create_server(
                factory, host, port, family=family, reuse_address=True, reuse_port=self.reuse_port or None,
                backlog=1024, start_serving=True,
            )
        log.info("listening address=%s role=%s", self.config.address, self.config.role)

    @property
    def sockets(self) -> list[tuple[str, int]]:
        if self.server is None:
            return []
        return [s.getsockname()[:2] for s in self.server.sockets]

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
