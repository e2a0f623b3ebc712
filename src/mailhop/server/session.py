"""One client connection: pumps bytes between the transport and a sans-IO ServerConnection.

Untrusted input: everything the client sends. The core bounds every line and message; this module bounds time
(RFC 5321 4.5.3.2 timeouts from the core's current state), memory (reading pauses while work is pending and
while the client does not read our replies) and storage (bodies stream into the spool, never into memory).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import ssl
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, cast

from ..policy.submission import check_mail, check_recipient_count
from ..queue.health import SpoolHealth
from ..reply import R, Reply
from ..smtp import (
    AuthAborted,
    AuthResponse,
    AuthStart,
    BdatChunkEnd,
    ConnectionClosed,
    DataChunk,
    DataEnd,
    DataStart,
    Ehlo,
    Event,
    Mail,
    NeedData,
    Quit,
    Rcpt,
    Reset,
    ServerConnection,
    ServerSettings,
    StartTls,
)
from .authflow import AuthExchange, AuthOutcome, AuthServices
from .checkflow import SessionChecks
from .intake import MessageIntake

if TYPE_CHECKING:
    from ..auth.users import User
    from ..checks.chain import PolicyChain
    from ..dns import Resolver
    from ..policy.relay import RelayPolicy
    from ..queue.backend import QueueBackend
    from .listener import ConnectionLimiter

__all__ = ["ServerState", "SessionContext", "SmtpSession"]

log = logging.getLogger("mailhop.smtp")

# Pause reading once this much unprocessed input is waiting: a pipelining client cannot make us buffer more.
_READ_HIGH_WATER = 256 * 1024
# Events handled in a row before yielding to the other sessions (see _pump_events).
_FAIR_BURST = 32


@dataclass
class ServerState:
    """What all listeners share: open sessions, connection caps, the shutdown flag, the spool's health (the
    queue's; while it is failed, greetings and MAIL get 421 4.3.2). Delivery learns of accepted mail from
    the queue itself (``QueueBackend.on_accepted``)."""

    limiter: ConnectionLimiter
    sessions: set[SmtpSession] = field(default_factory=set)
    shutting_down: bool = False
    health: SpoolHealth = field(default_factory=SpoolHealth)


@dataclass
class SessionContext:
    """Everything a session needs from the daemon, shared by all sessions of one listener."""

    settings: ServerSettings
    relay: RelayPolicy
    queue: QueueBackend
    state: ServerState
    max_received_headers: int = 50
    ssl_context: ssl.SSLContext | None = None  # for STARTTLS (None: not offered)
    role: str = "mx"
    auth: AuthServices | None = None  # None: this listener does not offer AUTH
    require_auth: bool = False  # MAIL needs a successful AUTH first
    listener_limiter: ConnectionLimiter | None = None  # this listener's own connection cap
    chain: PolicyChain | None = None  # this listener's policy checks (None: none)
    resolver: Resolver | None = None
    authserv_id: str = ""  # for Authentication-Results; forged fields claiming it are removed
    max_scan_size: int = 10 * 1024 * 1024  # content checks see messages up to this size


class SmtpSession(asyncio.Protocol):
    """The asyncio protocol for one SMTP connection; all decisions are delegated to the core and policy."""

    def __init__(self, ctx: SessionContext) -> None:
        self.ctx = ctx
        # Kept: asyncio.get_running_loop() makes a getpid() system call each time (fork check), ~6 per message.
        self._loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.conn = ServerConnection(ctx.settings)
        self.client_ip = ""
        self.client_port = 0
        self.trusted = False
        self.helo = ""
        self.extended = False
        self._waiting = False  # the pump is parked until input comes (see _pump)
        self._finished = False  # _cleanup has run
        self._closed_waiter: asyncio.Future[None] | None = None
        self._closed = False
        self._paused = False
        self._write_paused = False
        self._pending_bytes = 0
        self.intake = MessageIntake(self)
        self._task: asyncio.Task[None] | None = None  # the step the pump handed over to, while it runs
        self._step: Coroutine[Any, Any, bool] | None = None  # that step's coroutine
        self._upgrading: list[bytes] | None = None
        self.user: User | None = None
        self._auth: AuthExchange | None = None
        self._auth_mechanism = ""
        self.checks: SessionChecks | None = None  # set when the listener has a policy chain
        self._deadline = 0.0  # loop time when the current wait for input times out (0: none yet)
        self._timer: asyncio.TimerHandle | None = None  # armed for _deadline or earlier while it exists

    # -- asyncio.Protocol -------------------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing asyncio.Transport.
        self.transport = cast(asyncio.Transport, transport)
        peer = self.transport.get_extra_info("peername") or ("", 0)
        self.client_ip, self.client_port = str(peer[0]), int(peer[1])
        if self.ctx.state.shutting_down:
            self.transport.write(R.SHUTTING_DOWN.to_bytes())
            self.transport.close()
            self._closed = True
            return
        own = self.ctx.listener_limiter
        if own is not None and not own.acquire(""):
            self.transport.write(R.TOO_MANY_CONNECTIONS.to_bytes())
            self.transport.close()
            self._closed = True
            return
        if not self.ctx.state.limiter.acquire(self.client_ip):
            if own is not None:
                own.release("")
            self.transport.write(R.TOO_MANY_CONNECTIONS.to_bytes())
            self.transport.close()
            self._closed = True
            return
        self.trusted = self.ctx.relay.is_trusted(self.client_ip)
        self.ctx.state.sessions.add(self)
        if self.ctx.state.health.unavailable:
            # Before the connect checks: no DNS lookups for a client we cannot take mail from anyway.
            self._write_raw(R.SPOOL_UNAVAILABLE.to_bytes())
            self._cleanup()
            return
        chain = self.ctx.chain
        if chain is not None:
            self.checks = SessionChecks(chain, client_ip=self.client_ip, client_port=self.client_port,
                                        role=self.ctx.role, trusted=self.trusted, resolver=self.ctx.resolver,
                                        tls=self.conn.tls_active, max_scan_size=self.ctx.max_scan_size)
            self._suspend(self._start())
            return
        self.conn.send_greeting(self._greeting())
        self._pump()

    def data_received(self, data: bytes) -> None:
        if self._upgrading is not None:
            # Decrypted bytes that arrive after the handshake but before our coroutine resumes (uvloop does
            # this): they belong to the TLS session, so hold them until the core has been reset for it.
            self._upgrading.append(data)
            return
        self.conn.receive_data(data)
        self._pending_bytes += len(data)
        if self._pending_bytes > _READ_HIGH_WATER and not self._paused and self.transport is not None:
            self.transport.pause_reading()
            self._paused = True
        self._resume()

    def eof_received(self) -> bool | None:
        self.conn.receive_data(b"")
        self._resume()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._closed:
            self._closed = True
            self.conn.receive_data(b"")
        self._resume()

    def pause_writing(self) -> None:
        # The client is not reading our replies; stop reading its commands until it does.
        self._write_paused = True
        if self.transport is not None and not self._paused:
            self.transport.pause_reading()
            self._paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._resume()

    # -- the session loop -------------------------------------------------------------------------------------------
    # Why a pump and not one coroutine per session: a coroutine waits for every command on a future, and each
    # wake-up is a trip through the event loop's ready queue (future, callback, task step), six or more per
    # message for a client that does not pipeline. The pump handles the core's events straight from
    # data_received and only hands over to a task for a step that must wait (a policy check, the queue's group
    # commit, AUTH, STARTTLS); input that arrives meanwhile stays in the core until the task resumes the pump.
    def _resume(self) -> None:
        """Wake a pump that waits for input (more input, a resumed writer, a shutdown)."""
        if self._waiting:
            self._pump()

    def _flush(self) -> None:
        out = self.conn.data_to_send()
        if out and self.transport is not None and not self._closed:
            self.transport.write(out)

    def _pump(self) -> None:
        """Handle the core's events until it needs input or a step must wait; never raises."""
        self._waiting = False
        try:
            self._pump_events()
        except Exception:
            log.exception("session error client=%s", self.client_ip)
            self._cleanup()

    def _pump_events(self) -> None:
        conn = self.conn
        burst = 0
        while True:
            event = conn.next_event()
            if isinstance(event, NeedData):
                self._flush()
                if self._closed:
                    self._cleanup()
                elif self.ctx.state.shutting_down and not conn.in_transaction:
                    self._write_raw(R.SHUTTING_DOWN.to_bytes())
                    self._cleanup()
                else:
                    self._wait_for_input()
                return
            # The timeout is a deadline from the last event (a complete command, a DATA block), not an idle timer
            # that every byte restarts: a slowloris client trickling one byte at a time of a never-ending command
            # line still gets its 421 4.4.2 after command_timeout.
            self._deadline = 0.0
            burst += 1
            if burst > _FAIR_BURST:
                # A pipelining client can hand us thousands of commands in one read, and with no policy check
                # to wait for, nothing here stops: give the other sessions a turn before this event.
                self._flush()
                self._suspend(self._after_turn(event))
                return
            if not self._handle(event):
                return

    def _wait_for_input(self) -> None:
        """Park the pump until more bytes come (data_received) or the deadline passes (_on_timer)."""
        loop = self._loop
        if not self._deadline:
            self._deadline = loop.time() + self.conn.wants_timeout()
        deadline = self._deadline
        # One timer per session, not one per wait: a session waits several times per message and each
        # deadline is later than the last, so a timer left from an earlier wait fires early, finds the
        # deadline moved and re-arms itself (about once per timeout period instead of once per command).
        if self._timer is None or self._timer.when() > deadline:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = loop.call_at(deadline, self._on_timer)
        self._pending_bytes = 0
        self._waiting = True
        # Last, and with the pump already parked: should a transport ever deliver buffered input from inside
        # resume_reading (none of asyncio's or uvloop's do today), it would find a pump ready to take it.
        if self._paused and not self._write_paused and self.transport is not None and not self._closed:
            self._paused = False
            self.transport.resume_reading()

    def _on_timer(self) -> None:
        self._timer = None
        if not self._waiting:
            return  # a step is running: the next wait arms a timer for its own deadline
        if self._loop.time() >= self._deadline:
            self._waiting = False  # before closing: an SSL transport's close() may hand us its last input at once
            self._flush()
            self._write_raw(self.conn.timeout_reply().to_bytes())
            log.info("timeout client=%s", self.client_ip)
            self._cleanup()
        else:
            self._timer = self._loop.call_at(self._deadline, self._on_timer)

    def _suspend(self, step: Coroutine[Any, Any, bool]) -> None:
        """Run a step that must wait in a task; the pump resumes after it, or the session ends if it returns
        False."""
        self._step = step
        self._task = self._loop.create_task(self._run_step(step))

    async def _run_step(self, step: Coroutine[Any, Any, bool]) -> None:
        me = self._task
        try:
            go_on = await step
        except asyncio.CancelledError:
            self._cleanup()
            raise
        except Exception:
            log.exception("session error client=%s", self.client_ip)
            self._cleanup()
            return
        if self._task is not me:
            return  # the step handed over to another (an event after a fair turn that must wait too)
        self._task = self._step = None
        if not go_on:
            self._cleanup()
        elif not self._finished:
            self._pump()

    async def _start(self) -> bool:
        """The connect phase's checks, then the greeting."""
        assert self.checks is not None
        refused = await self.checks.connect()
        if refused is not None:
            self._write_raw(refused.to_bytes())
            return False
        self.conn.send_greeting(self._greeting())
        return True

    def _greeting(self) -> Reply:
        return Reply(220, "", f"{self.ctx.settings.hostname} ESMTP mailhop")

    async def _after_turn(self, event: Event) -> bool:
        await asyncio.sleep(0)
        self._handle(event)  # False from it means handed over or ended: _run_step tells which
        return True

    async def _reply_after(self, pending: Callable[[], Awaitable[Reply | None]], default: Reply) -> bool:
        # A callable, not an awaitable: nothing is created that a step cancelled before it starts leaves unawaited.
        self.conn.send(await pending() or default)
        return True

    async def _ehlo_after_checks(self, event: Ehlo) -> bool:
        assert self.checks is not None
        await self.checks.helo(event.hostname)
        self.conn.send(self.conn.ehlo_reply(f"Hello {event.hostname}"))
        return True

    def _handle(self, event: Event) -> bool:
        """Act on one event; False when the pump must stop here (a step was handed to a task, or the end)."""
        conn = self.conn
        if isinstance(event, DataChunk):
            self.intake.chunk(event.data)
        elif isinstance(event, Rcpt):
            reply = self._rcpt_policy(event)
            if reply is None and self.checks is not None:
                self._suspend(self._reply_after(partial(self.checks.rcpt, str(event.recipient.mailbox)), R.RCPT_OK))
                return False
            conn.send(reply or R.RCPT_OK)
        elif isinstance(event, Mail):
            reply = self._mail_policy(event)
            if reply.is_positive and self.checks is not None:
                sender = "" if event.sender is None else str(event.sender)
                self._suspend(self._reply_after(partial(self.checks.mail, sender, tls=conn.tls_active), reply))
                return False
            conn.send(reply)
        elif isinstance(event, DataStart):
            self.intake.start()
        elif isinstance(event, DataEnd):
            self._suspend(self._reply_after(partial(self.intake.finish, event), R.LOCAL_ERROR))
            return False
        elif isinstance(event, BdatChunkEnd):
            conn.send(self.intake.error or Reply(250, "2.0.0", f"{event.size} octets received"))
        elif isinstance(event, Ehlo):
            self.helo, self.extended = event.hostname, event.extended
            self.intake.drop()
            if self.checks is not None:
                self._suspend(self._ehlo_after_checks(event))
                return False
            conn.send(conn.ehlo_reply(f"Hello {event.hostname}"))
        elif isinstance(event, Reset):
            self.intake.drop()
            if self.checks is not None:
                self.checks.reset()
        elif isinstance(event, (AuthStart, AuthResponse)):
            self._suspend(self._on_auth(event))
            return False
        elif isinstance(event, AuthAborted):
            log.info("auth aborted client=%s: %s", self.client_ip, event.reason)
            self._auth = None
        elif isinstance(event, StartTls):
            self._suspend(self._start_tls())
            return False
        elif isinstance(event, (Quit, ConnectionClosed)):
            if isinstance(event, Quit):
                conn.send(R.BYE)
            self._flush()
            self._cleanup()  # closes the transport
            return False
        else:  # pragma: no cover - the core's event set is closed
            raise AssertionError(f"unhandled event {event!r}")
        return True

    # -- authentication and submission policy -----------------------------------------------------------------------
    async def _on_auth(self, event: AuthStart | AuthResponse) -> bool:
        """Run one AUTH step; False when the session must end (locked out)."""
        services = self.ctx.auth
        if services is None:  # the core only emits AUTH events when mechanisms are configured
            self.conn.send(R.NOT_IMPLEMENTED)
            return True
        if isinstance(event, AuthStart):
            self._auth = AuthExchange(services, self.client_ip, event.mechanism)
            self._auth_mechanism = event.mechanism
            outcome: AuthOutcome = await self._auth.start(event.initial)
        else:
            if self._auth is None:
                self.conn.send(R.BAD_SEQUENCE)
                return True
            outcome = await self._auth.respond(event.data)
        if outcome.done:
            self._auth = None
        if outcome.user is not None:
            self.user = outcome.user
            if self.checks is not None:
                self.checks.authenticated(outcome.user.name, self._auth_mechanism)
        self.conn.send(outcome.reply)
        if outcome.close:
            self._flush()
            self._close()
            return False
        return True

    def _mail_policy(self, event: Mail) -> Reply:
        """MAIL's answer before the policy chain's mail phase (which runs only when this is positive)."""
        if self.ctx.state.health.unavailable:
            log.info("MAIL refused client=%s: spool unavailable", self.client_ip)
            return R.SPOOL_UNAVAILABLE  # a 421: the core closes the dialogue after it
        services = self.ctx.auth
        reply = check_mail(
            user=self.user,
            sender=event.sender,
            require_auth=self.ctx.require_auth,
            enforce_sender=services is not None and services.enforce_sender,
            rate=services.rate if services is not None else None,
        )
        if not reply.is_positive and self.user is not None:
            log.info("MAIL refused client=%s user=%s sender=<%s>: %s", self.client_ip, self.user.name,
                     event.sender or "", reply)
        return reply

    def _rcpt_policy(self, event: Rcpt) -> Reply | None:
        """A refusal of RCPT by relay control or the recipient cap, before the policy chain; None: go on."""
        reply = self.ctx.relay.check(event.recipient.mailbox, trusted=self.trusted, authenticated=self.user is not None)
        if reply is None:
            reply = check_recipient_count(self.user, len(self.conn.transaction.recipients))
        return reply

    # -- TLS --------------------------------------------------------------------------------------------------------
    async def _start_tls(self) -> bool:
        ctx = self.ctx.ssl_context
        if ctx is None or self.transport is None:  # the core only emits StartTls when TLS is available
            self.conn.send(R.TLS_NOT_AVAILABLE)
            return True
        # Stop reading before the 220 goes out: the client's ClientHello must reach the TLS layer, not the
        # plaintext protocol (where the core would discard it as injected bytes and the handshake would stall).
        self.transport.pause_reading()
        self._paused = True
        self.conn.send(R.READY_TLS)
        self._flush()
        loop = self._loop
        self._upgrading = []
        try:
            new_transport = await loop.start_tls(
                self.transport, self, ctx, server_side=True, ssl_handshake_timeout=self.conn.wants_timeout()
            )
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
            log.info("TLS handshake failed client=%s: %s", self.client_ip, exc)
            self._upgrading = None
            self._close()
            return False
        self._paused = False
        early, self._upgrading = self._upgrading, None
        if new_transport is None:
            self._close()
            return False
        self.transport = new_transport
        self.conn.tls_started()
        for chunk in early:
            self.conn.receive_data(chunk)
        if self.conn.discarded_after_starttls:
            log.warning(
                "discarded %d bytes pipelined after STARTTLS client=%s",
                self.conn.discarded_after_starttls,
                self.client_ip,
            )
        self.helo = ""
        self.user = None  # RFC 3207: nothing from before the handshake survives it
        if self.checks is not None:
            self.checks.tls_started()
        self._auth = None
        self.intake.drop()
        return True

    # -- closing ----------------------------------------------------------------------------------------------------
    def _write_raw(self, data: bytes) -> None:
        if self.transport is not None and not self._closed:
            self.transport.write(data)
        self._close()

    def _close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
        self._closed = True

    def _cleanup(self) -> None:
        """End the session (once): close, free its body and its connection slots, wake shutdown waiters."""
        if self._finished:
            return
        self._finished = True
        self._waiting = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.intake.drop()
        self._close()
        if self in self.ctx.state.sessions:
            self.ctx.state.sessions.discard(self)
            self.ctx.state.limiter.release(self.client_ip)
            if self.ctx.listener_limiter is not None:
                self.ctx.listener_limiter.release("")
        if self._closed_waiter is not None and not self._closed_waiter.done():
            self._closed_waiter.set_result(None)

    def shutdown(self) -> None:
        """Ask the session to close at its next safe point (between transactions)."""
        if self._waiting and not self.conn.in_transaction:
            self._pump()

    def abort(self) -> None:
        """Close now, whatever the state (after the shutdown grace period)."""
        if self.transport is not None:
            self.transport.abort()
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            # A task cancelled before its first step never runs _run_step's handlers, nor its step: close the step
            # (no "never awaited" warning) and end the session here rather than rely on the task.
            if self._step is not None and inspect.getcoroutinestate(self._step) == inspect.CORO_CREATED:
                self._step.close()
        self._cleanup()

    def closed_waiter(self) -> asyncio.Future[None]:
        """A future that is done when the session has ended (for the daemon's shutdown grace period)."""
        if self._closed_waiter is None:
            self._closed_waiter = self._loop.create_future()
            if self._finished:
                self._closed_waiter.set_result(None)
        return self._closed_waiter
