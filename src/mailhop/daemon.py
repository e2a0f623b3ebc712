"""The composition root: builds every part from the configuration and runs them with an ordered shutdown.

Shutdown order (SIGTERM/SIGINT): stop accepting connections; close idle sessions with 421; let sessions inside a
transaction finish it (bounded by ``limits.shutdown_grace``), then abort the rest; then stop the queue, whose
writer finishes every commit it has begun. A message either got its 250 or it was never accepted.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl
from pathlib import Path

from .config.schema import Config
from .policy.relay import RelayPolicy
from .queue.sqlite import SqliteQueue
from .server.listener import ConnectionLimiter, Listener
from .server.session import SessionContext
from .smtp import Limits, ServerSettings

__all__ = ["Daemon", "make_ssl_context"]

log = logging.getLogger("mailhop.daemon")


def make_ssl_context(certificate: Path, key: Path) -> ssl.SSLContext:
    """Server-side TLS context: TLS 1.2 minimum, no compression, server cipher preference."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.load_cert_chain(str(certificate), str(key))
    return ctx


class Daemon:
    """Owns the queue, the listeners and the sessions."""

    def __init__(self, config: Config) -> None:
        self.config = config
        lim = config.limits
        self.queue = SqliteQueue(config.queue.path, inline_max=config.queue.inline_body_max)
        self.relay = RelayPolicy(config.relay.trusted_networks, config.relay.domains)
        ssl_ctx = None
        if config.tls.certificate is not None and config.tls.key is not None:
            ssl_ctx = make_ssl_context(config.tls.certificate, config.tls.key)
        settings = ServerSettings(
            hostname=config.hostname,
            limits=Limits(
                max_command_line=lim.max_command_line,
                max_text_line=lim.max_text_line,
                max_recipients=lim.max_recipients,
                max_message_size=lim.max_message_size,
                max_errors=lim.max_errors,
                command_timeout=lim.command_timeout,
                data_timeout=lim.data_timeout,
            ),
            tls_available=ssl_ctx is not None,
        )
        self.ctx = SessionContext(
            settings=settings,
            relay=self.relay,
            queue=self.queue,
            limiter=ConnectionLimiter(lim.max_connections, lim.max_connections_per_ip),
            max_received_headers=lim.max_received_headers,
            ssl_context=ssl_ctx,
        )
        self.listeners = [Listener(lc, self.ctx) for lc in config.listener]
        self._stop = asyncio.Event()

    async def run(self) -> None:
        """Start everything, report readiness, and run until SIGTERM/SIGINT or ``request_stop``."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        await self.queue.start(recover=True)
        try:
            for listener in self.listeners:
                await listener.start()
            addresses = " ".join(f"{h}:{p}" for ls in self.listeners for h, p in ls.sockets)
            log.info("ready listeners=%s spool=%s", addresses, self.config.queue.path)
            await self._stop.wait()
            await self._shutdown()
        finally:
            await self.queue.stop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        log.info("stopped")

    def request_stop(self) -> None:
        self._stop.set()

    async def _shutdown(self) -> None:
        log.info("shutting down sessions=%d", len(self.ctx.sessions))
        self.ctx.shutting_down = True
        for listener in self.listeners:
            if listener.server is not None:
                listener.server.close()
        for session in list(self.ctx.sessions):
            session.shutdown()
        tasks = [s.task for s in self.ctx.sessions if s.task is not None]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=self.config.limits.shutdown_grace)
            for session in list(self.ctx.sessions):
                session.abort()
            if pending:
                log.warning("aborted sessions=%d after grace period", len(pending))
                await asyncio.wait(pending, timeout=5)
