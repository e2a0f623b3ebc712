"""The composition root: builds every part from the configuration and runs them with an ordered shutdown.

Shutdown order (SIGTERM/SIGINT): stop accepting connections; close idle sessions with 421; let sessions inside a
transaction finish it (bounded by ``limits.shutdown_grace``), then abort the rest; then stop the queue, whose
writer finishes every commit it has begun. A message either got its 250 or it was never accepted.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import resource
import signal
import sys

from .auth.users import UserStore
from .checks.registry import CheckRegistry
from .config.schema import Config, ListenerConfig
from .delivery.bounce import Notifier
from .delivery.engine import DeliveryEngine
from .delivery.pool import ConnectionPool
from .delivery.smtp import SmtpTransport
from .dns import Resolver
from .policy.authlimit import AuthLimiter
from .policy.relay import RelayPolicy
from .policy.userlimits import UserRateLimiter
from .queue.health import watch as watch_spool
from .queue.schedule import RetryPolicy
from .queue.sqlite import SqliteQueue
from .routing import Router
from .server.authflow import AuthServices
from .server.listener import ConnectionLimiter, Listener
from .server.session import ServerState, SessionContext
from .server.tls import TlsContexts
from .signing.outbound import OutboundSigner
from .smtp import Limits, ServerSettings
from .workers import shard_path

__all__ = ["Daemon"]

log = logging.getLogger("mailhop.daemon")

# The queue's writer thread needs the GIL back after each SQLite call (CPython's sqlite3 releases it for every
# statement reset and step, a dozen or more times per batch), and CPython makes a thread that wants the GIL wait up to the switch interval, 5 ms by default, for the
# thread holding it, which under load is always the event loop. Every accepted message's 250 waits for that
# commit, so at the default the commit latency, not the CPU, limited throughput: measured with 20 sessions,
# 1 ms took accept 5 KB from ~2,560 to ~3,000 msgs/s at the same CPU per message (bench/RESULTS.md); 0.5 ms and
# 0.2 ms were no better.
GIL_SWITCH_INTERVAL = 0.001


def raise_nofile_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit and return it (logged).

    Each SMTP connection holds a descriptor; the usual default soft limit (1024) is below max_connections,
    and a daemon out of descriptors cannot even accept the connection that would be refused with a 421.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("could not raise RLIMIT_NOFILE soft=%d to hard=%d: %s", soft, hard, exc)
    log.info("RLIMIT_NOFILE soft=%s hard=%s", "unlimited" if soft == resource.RLIM_INFINITY else soft,
             "unlimited" if hard == resource.RLIM_INFINITY else hard)
    return soft


class Daemon:
    """Owns the queue, the listeners and the sessions."""

    def __init__(self, config: Config, *, worker: int | None = None) -> None:
        """``worker``: this process is worker I of ``config.workers`` (mailhop.workers): it serves spool shard I
        and binds its listeners with SO_REUSEPORT beside the other workers."""
        self.worker = worker
        self.users_root = config.queue.path  # users.db is shared by every worker: it stays at the spool root
        if worker is not None:
            config = config.model_copy(update={"queue": config.queue.model_copy(
                update={"path": shard_path(config.queue.path, worker)})})
        self.config = config
        lim = config.limits
        self.queue = SqliteQueue(config.queue.path, inline_max=config.queue.inline_body_max,
                                 page_size=config.queue.page_size, segment_min=config.queue.segment_min)
        self.relay = RelayPolicy(config.relay.trusted_networks, config.relay.domains)
        self.tls = TlsContexts()
        # The one resolver: policy checks and delivery share its cache and its nameserver configuration.
        self.resolver = Resolver(config.dns.nameservers, timeout=config.dns.timeout, lifetime=config.dns.lifetime)
        self.checks = CheckRegistry(config.checks, self.resolver, hostname=config.hostname)
        self.state = ServerState(limiter=ConnectionLimiter(lim.max_connections, lim.max_connections_per_ip),
                                 health=self.queue.health)
        limits = Limits(
            max_command_line=lim.max_command_line,
            max_text_line=lim.max_text_line,
            max_recipients=lim.max_recipients,
            max_message_size=lim.max_message_size,
            max_errors=lim.max_errors,
            command_timeout=lim.command_timeout,
            data_timeout=lim.data_timeout,
        )
        self.auth: AuthServices | None = None
        if any(lc.offers_auth for lc in config.listener):
            a = config.auth
            self.auth = AuthServices(
                users=UserStore.for_spool(self.users_root, cache_ttl=a.cache_ttl),
                limiter=AuthLimiter(max_failures=a.max_failures, window=a.failure_window, penalty=a.penalty),
                rate=UserRateLimiter(),
                failure_delay=a.failure_delay,
                enforce_sender=a.enforce_sender,
                enforce_from_header=a.enforce_from_header,
                received_shows_user=a.received_shows_user,
            )
        self.listeners = [self._listener(lc, limits) for lc in config.listener]
        self.router = Router(config.route)  # reads smarthost password files now: a bad one fails at start
        # Loads every DKIM key now: a bad key file fails at start, naming the file.
        self.signer = OutboundSigner(config.dkim, self.relay.is_trusted) if config.dkim.sign else None
        self.engine: DeliveryEngine | None = None
        self.pool: ConnectionPool | None = None
        self._stop = asyncio.Event()

    def _listener(self, lc: ListenerConfig, limits: Limits) -> Listener:
        cert = lc.certificate or self.config.tls.certificate
        key = lc.key or self.config.tls.key
        ssl_ctx = self.tls.get(cert, key, lc.tls_min_version) if cert is not None and key is not None else None
        implicit = lc.role == "submissions"
        if lc.max_message_size is not None or lc.max_recipients is not None:
            limits = dataclasses.replace(
                limits,
                max_message_size=lc.max_message_size or limits.max_message_size,
                max_recipients=lc.max_recipients or limits.max_recipients,
            )
        settings = ServerSettings(
            hostname=self.config.hostname,
            limits=limits,
            tls_available=ssl_ctx is not None and not implicit,
            tls_active=implicit,
            auth_mechanisms=tuple(self.config.auth.mechanisms) if lc.offers_auth else (),
            auth_plaintext_ok=lc.allow_plaintext_auth,
        )
        ctx = SessionContext(
            settings=settings,
            relay=self.relay,
            queue=self.queue,
            state=self.state,
            max_received_headers=self.config.limits.max_received_headers,
            ssl_context=None if implicit else ssl_ctx,
            role=lc.role,
            auth=self.auth if lc.offers_auth else None,
            require_auth=lc.requires_auth,
            listener_limiter=ConnectionLimiter(lc.max_connections, lc.max_connections)
            if lc.max_connections is not None else None,
            chain=self.checks.chain(self.config.listener_checks(lc)),
            resolver=self.resolver,
            authserv_id=self.config.checks.authserv_id or self.config.hostname,
            max_scan_size=self.config.checks.max_scan_size,
        )
        return Listener(lc, ctx, implicit_tls=ssl_ctx if implicit else None,
                        handshake_timeout=self.config.limits.command_timeout, reuse_port=self.worker is not None)

    def _build_engine(self) -> DeliveryEngine:
        d = self.config.delivery
        # Keep as many idle connections per destination as may be busy at once: fewer, and a burst of
        # deliveries to one destination opens and closes a connection per message.
        self.pool = ConnectionPool(idle_timeout=d.connection_idle_timeout, max_messages=d.max_messages_per_connection,
                                   max_idle_per_key=d.max_connections_per_destination)
        transport = SmtpTransport(
            hostname=self.config.hostname,
            pool=self.pool,
            connect_timeout=d.connect_timeout,
            command_timeout=d.command_timeout,
            data_timeout=d.data_timeout,
            max_rcpts_per_transaction=d.max_recipients_per_transaction,
        )
        resolver = self.resolver
        policy = RetryPolicy(first_retry=d.first_retry, max_interval=d.max_retry_interval,
                             lifetime=d.max_queue_lifetime, delay_warning=d.delay_warning_time)
        endpoints = [(h, p) for ls in self.listeners for h, p in ls.sockets]
        return DeliveryEngine(
            self.queue, self.router, resolver, transport,
            Notifier(hostname=self.config.hostname, postmaster=d.postmaster),
            policy=policy, mx_port=d.mx_port, local_endpoints=endpoints, max_connections=d.max_connections,
            max_per_destination=d.max_connections_per_destination, batch_size=d.batch_size, signer=self.signer,
        )

    async def run(self) -> None:
        """Start everything, report readiness, and run until SIGTERM/SIGINT or ``request_stop``."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self.tls.reload)
        # `mailhop queue flush` / `release` poke us with SIGUSR1 so their changes act at once. Installed even
        # with delivery off: SIGUSR1's default action would kill the daemon.
        loop.add_signal_handler(signal.SIGUSR1, self._poke)
        previous_interval = sys.getswitchinterval()
        sys.setswitchinterval(GIL_SWITCH_INTERVAL)
        try:
            await self._run(loop)
        finally:
            sys.setswitchinterval(previous_interval)

    async def _run(self, loop: asyncio.AbstractEventLoop) -> None:
        nofile = raise_nofile_limit()
        if nofile != resource.RLIM_INFINITY and nofile < self.config.limits.max_connections + 64:
            log.warning("RLIMIT_NOFILE %d is below limits.max_connections=%d: connections beyond it fail at accept",
                        nofile, self.config.limits.max_connections)
        await self.queue.start(recover=True)
        # Brings the spool back to ok after a storage error, without which sessions would get 421 forever.
        prober = loop.create_task(watch_spool(self.queue.health, self.queue.probe,
                                              self.config.queue.health_probe_interval))
        watcher = None
        if self.config.tls.reload_interval > 0:
            watcher = loop.create_task(self._watch_certificates(self.config.tls.reload_interval))
        try:
            for listener in self.listeners:
                await listener.start()
            engine_task = None
            if self.config.delivery.enabled:
                self.engine = self._build_engine()
                self.queue.on_accepted = self.engine.offer
                engine_task = asyncio.get_running_loop().create_task(self.engine.run())
            addresses = " ".join(f"{h}:{p}" for ls in self.listeners for h, p in ls.sockets)
            log.info("ready listeners=%s spool=%s%s", addresses, self.config.queue.path,
                     f" worker={self.worker}" if self.worker is not None else "")
            await self._stop.wait()
            await self._shutdown()
            if self.engine is not None and engine_task is not None:
                await self.engine.stop(grace=self.config.limits.shutdown_grace)
                await engine_task
            if self.pool is not None:
                await self.pool.close()
        finally:
            prober.cancel()
            if watcher is not None:
                watcher.cancel()
            if self.auth is not None:
                await self.auth.users.aclose()
            await self.checks.aclose()
            await self.queue.stop()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
                loop.remove_signal_handler(sig)
        log.info("stopped")

    async def _watch_certificates(self, interval: float) -> None:
        """Certificates renewed on disk (certbot, ACME clients) take effect without a restart or a signal."""
        while True:
            await asyncio.sleep(interval)
            self.tls.reload(only_changed=True)

    def _poke(self) -> None:
        if self.engine is not None:
            self.engine.wake()

    def request_stop(self) -> None:
        self._stop.set()

    async def _shutdown(self) -> None:
        log.info("shutting down sessions=%d", len(self.state.sessions))
        self.state.shutting_down = True
        for listener in self.listeners:
            if listener.server is not None:
                listener.server.close()
        for session in list(self.state.sessions):
            session.shutdown()
        waiters = [s.closed_waiter() for s in self.state.sessions]
        if waiters:
            _, pending = await asyncio.wait(waiters, timeout=self.config.limits.shutdown_grace)
            for session in list(self.state.sessions):
                session.abort()
            if pending:
                log.warning("aborted sessions=%d after grace period", len(pending))
                await asyncio.wait(pending, timeout=5)
