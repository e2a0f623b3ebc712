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
from .delivery.bounce import Notifier
from .delivery.engine import DeliveryEngine
from .delivery.pool import ConnectionPool
from .delivery.smtp import SmtpTransport
from .dns import Resolver
from .policy.relay import RelayPolicy
from .queue.schedule import RetryPolicy
from .queue.sqlite import SqliteQueue
from .routing import Router
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
        self.router = Router(config.route)  # reads smarthost password files now: a bad one fails at start
        self.engine: DeliveryEngine | None = None
        self.pool: ConnectionPool | None = None
        self._stop = asyncio.Event()

    def _build_engine(self) -> DeliveryEngine:
        d = self.config.delivery
        self.pool = ConnectionPool(idle_timeout=d.connection_idle_timeout, max_messages=d.max_messages_per_connection)
        transport = SmtpTransport(
            hostname=self.config.hostname,
            pool=self.pool,
            connect_timeout=d.connect_timeout,
            command_timeout=d.command_timeout,
            data_timeout=d.data_timeout,
            max_rcpts_per_transaction=d.max_recipients_per_transaction,
        )
        resolver = Resolver(self.config.dns.nameservers, timeout=self.config.dns.timeout,
                            lifetime=self.config.dns.lifetime)
        policy = RetryPolicy(first_retry=d.first_retry, max_interval=d.max_retry_interval,
                             lifetime=d.max_queue_lifetime, delay_warning=d.delay_warning_time)
        endpoints = [(h, p) for ls in self.listeners for h, p in ls.sockets]
        return DeliveryEngine(
            self.queue, self.router, resolver, transport,
            Notifier(hostname=self.config.hostname, postmaster=d.postmaster),
            policy=policy, mx_port=d.mx_port, local_endpoints=endpoints, max_connections=d.max_connections,
            max_per_destination=d.max_connections_per_destination, batch_size=d.batch_size,
        )

    async def run(self) -> None:
        """Start everything, report readiness, and run until SIGTERM/SIGINT or ``request_stop``."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        await self.queue.start(recover=True)
        try:
            for listener in self.listeners:
                await listener.start()
            engine_task = None
            if self.config.delivery.enabled:
                self.engine = self._build_engine()
                self.ctx.on_queued = self.engine.wake
                engine_task = asyncio.get_running_loop().create_task(self.engine.run())
            addresses = " ".join(f"{h}:{p}" for ls in self.listeners for h, p in ls.sockets)
            log.info("ready listeners=%s spool=%s", addresses, self.config.queue.path)
            await self._stop.wait()
            await self._shutdown()
            if self.engine is not None and engine_task is not None:
                await self.engine.stop(grace=self.config.limits.shutdown_grace)
                await engine_task
            if self.pool is not None:
                await self.pool.close()
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
