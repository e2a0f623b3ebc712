"""SMTP/LMTP delivery: one attempt for the recipients of one message, trying the candidates in order.

Untrusted input: everything the remote servers say (through ``SmtpConnection``: bounded in size and time)
and the queued message (content and envelope as a client gave them: content is re-encoded canonically by
the DotStuffer, envelope values go through the command builders that refuse CR/LF/NUL).

Classification (see mailhop.delivery.transport for the contract): a server reply decides per recipient
(2xx delivered, 4xx deferred, 5xx failed); anything wrong with a connection before MAIL was answered moves
on to the next candidate; after that it defers. We never raise for the remote side's behaviour.
"""

from __future__ import annotations

import logging
import os
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import BinaryIO

from ..queue.model import QueuedMessage, RecipientState
from ..reply import Reply
from ..smtp import client
from ..smtp.client import NO_CAPABILITIES, CommandError, parse_ehlo
from ..smtp.encode import DotStuffer
from .pool import ConnectionLost, ConnectionPool, PoolKey, SmtpConnection
from .tls import make_client_context
from .transport import BodyOpener, Candidate, CanonicalBody, Destination, Outcome, OutcomeKind, TlsPolicy

__all__ = ["SmtpTransport", "Timeouts"]

log = logging.getLogger("mailhop.delivery")

SslContextFactory = Callable[[bool], ssl.SSLContext]
READ_SIZE = 65536


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds to wait, per phase; defaults from RFC 5321 4.5.3.2 (connect and QUIT are ours)."""

    connect: float = 30.0
    greeting: float = 300.0
    command: float = 300.0  # EHLO, STARTTLS (and its handshake), AUTH, MAIL, RCPT, RSET
    data_init: float = 120.0
    data_block: float = 180.0
    final: float = 600.0
    quit: float = 10.0

    @classmethod
    def all(cls, seconds: float) -> Timeouts:
        return cls(seconds, seconds, seconds, seconds, seconds, seconds, seconds)


class _NextCandidate(Exception):
    """This candidate cannot take the message now; ``reply`` says why if no other one can either."""

    def __init__(self, reply: Reply, *, tls: bool = False) -> None:
        super().__init__(str(reply))
        self.reply = reply
        self.tls = tls


class _DeferAll(Exception):
    """Stop trying: defer every pending recipient with ``reply`` (e.g. our credentials were refused)."""

    def __init__(self, reply: Reply, host: str | None) -> None:
        super().__init__(str(reply))
        self.reply = reply
        self.host = host


class _TlsFallback(Exception):
    """Opportunistic STARTTLS broke the connection: reconnect in plaintext."""


class _Stale(Exception):
    """The connection broke before MAIL was answered, or MAIL got 421: nothing can have been delivered."""

    def __init__(self, reply: Reply | None = None, cause: str = "") -> None:
        super().__init__(str(reply) if reply is not None else cause)
        self.reply = reply
        self.cause = cause  # why the connection broke (a timeout, a close, a malformed reply), for the last reply


def _local(code: int, enhanced: str, text: str) -> Reply:
    return Reply(code, enhanced, text.replace("\r", " ").replace("\n", " "))


def _transient(reply: Reply, host: str, fallback: str) -> Reply:
    """A remote reply restated as a deferral (a 5xx here must not bounce the mail)."""
    enhanced = "4" + reply.enhanced[1:] if reply.enhanced else fallback
    return _local(reply.code if reply.is_transient else 451, enhanced, f"{host} said: {reply}")


class _Attempt:
    """The state of one ``deliver`` call: recipients still without an outcome, and the outcomes."""

    def __init__(self, destination: Destination, message: QueuedMessage,
                 recipients: Sequence[RecipientState], open_body: BodyOpener) -> None:
        self.destination = destination
        self.message = message
        self.open_body = open_body
        self.pending: dict[int, RecipientState] = {r.idx: r for r in recipients}
        self.outcomes: list[Outcome] = []

    def settle(self, rcpts: Sequence[RecipientState], kind: OutcomeKind, reply: Reply, host: str | None,
               dsn: bool = False) -> None:
        for r in rcpts:
            if self.pending.pop(r.idx, None) is not None:
                self.outcomes.append(Outcome(r.idx, kind, reply, host, dsn and kind is OutcomeKind.DELIVERED))

    def by_reply(self, rcpts: Sequence[RecipientState], reply: Reply, host: str, dsn: bool = False) -> None:
        kind = (OutcomeKind.DELIVERED if 200 <= reply.code < 300 else OutcomeKind.FAILED
                if reply.is_permanent else OutcomeKind.DEFERRED)
        self.settle(rcpts, kind, reply, host, dsn)

    def defer_rest(self, reply: Reply, host: str | None) -> None:
        self.settle(list(self.pending.values()), OutcomeKind.DEFERRED, reply, host)


class SmtpTransport:
    """Delivers over SMTP (or LMTP) per ``Destination``; implements ``mailhop.delivery.transport.Transport``.

    ``timeouts`` overrides the shorthands ``connect_timeout``, ``command_timeout`` (greeting and commands)
    and ``data_timeout`` (the reply to the end of data). ``ssl_context_factory(verify)`` makes the TLS
    client contexts (cached: building one loads the trust store).
    """

    def __init__(
        self,
        *,
        hostname: str,
        connect_timeout: float = 30.0,
        command_timeout: float = 300.0,
        data_timeout: float = 600.0,
        timeouts: Timeouts | None = None,
        pool: ConnectionPool | None = None,
        max_rcpts_per_transaction: int = 100,
        ssl_context_factory: SslContextFactory = make_client_context,
    ) -> None:
        client.ehlo(hostname)  # refuse an unusable EHLO name now, not at every delivery
        self.hostname = hostname
        self.timeouts = timeouts or Timeouts(connect=connect_timeout, greeting=command_timeout,
                                             command=command_timeout, final=data_timeout)
        self.pool = pool
        self.max_rcpts = max(1, max_rcpts_per_transaction)
        self._factory = ssl_context_factory
        self._contexts: dict[bool, ssl.SSLContext] = {}

    def _context(self, verify: bool) -> ssl.SSLContext:
        context = self._contexts.get(verify)
        if context is None:
            context = self._contexts[verify] = self._factory(verify)
        return context

    async def deliver(
        self,
        destination: Destination,
        message: QueuedMessage,
        recipients: Sequence[RecipientState],
        open_body: BodyOpener,
    ) -> list[Outcome]:
        """One attempt; one Outcome per recipient."""
        attempt = _Attempt(destination, message, recipients, open_body)
        failure: Reply | None = None
        tls_failure: Reply | None = None
        for candidate in destination.candidates:
            if not attempt.pending:
                break
            try:
                await self._candidate(attempt, candidate)
            except _NextCandidate as exc:
                log.info("delivery of %s via %s[%s]:%d: %s", message.id, candidate.host, candidate.address,
                         candidate.port, exc.reply)
                if exc.tls:
                    tls_failure = exc.reply
                else:
                    failure = exc.reply
            except _DeferAll as exc:
                attempt.defer_rest(exc.reply, exc.host)
        if attempt.pending:
            reply = tls_failure or failure or _local(451, "4.4.4", "No host to deliver to")
            attempt.defer_rest(reply, None)
        return attempt.outcomes

    # -- one candidate ----------------------------------------------------------------------------------

    async def _candidate(self, attempt: _Attempt, candidate: Candidate) -> None:
        dest = attempt.destination
        key = PoolKey(candidate.host, candidate.address, candidate.port, str(dest.tls), dest.implicit_tls,
                      dest.lmtp, dest.username)
        conn = self.pool.acquire(key) if self.pool is not None else None
        reused = conn is not None
        if conn is None:
            conn = await self._open(dest, key)
        try:
            try:
                usable = await self._transactions(conn, attempt, reused=reused)
            except _Stale:
                log.info("pooled connection to %s went stale; reconnecting", conn.peer)
                conn.abort()
                await conn.close()
                conn = await self._open(dest, key)
                usable = await self._transactions(conn, attempt, reused=False)
        except BaseException:
            conn.abort()
            await conn.close()
            raise
        if usable and self.pool is not None:
            await self.pool.release(conn)
        else:
            await conn.quit(self.timeouts.quit)

    async def _open(self, dest: Destination, key: PoolKey, *, plaintext: bool = False) -> SmtpConnection:
        """Connect, read the greeting, EHLO, STARTTLS and AUTH as the destination asks."""
        t = self.timeouts
        where = f"{key.host}[{key.address}]:{key.port}"
        implicit = dest.implicit_tls
        context = self._context(dest.tls is TlsPolicy.VERIFY) if implicit else None
        try:
            conn = await SmtpConnection.open(key, within=t.connect, ssl_context=context)
        except TimeoutError:
            raise _NextCandidate(_local(451, "4.4.1", f"connect to {where}: timed out")) from None
        except ssl.SSLError as exc:
            raise _NextCandidate(_local(451, "4.7.5", f"TLS with {where} failed: {exc}"), tls=True) from None
        except OSError as exc:
            reason = os.strerror(exc.errno) if exc.errno else str(exc)  # asyncio's text hides the errno
            raise _NextCandidate(_local(451, "4.4.1", f"connect to {where}: {reason}")) from None
        try:
            greeting = await conn.read_reply(t.greeting)
            if greeting.code != 220:
                await conn.quit(t.quit)
                raise _NextCandidate(_transient(greeting, key.host, "4.4.2"))
            await self._hello(conn, dest)
            if not implicit and not plaintext and dest.tls is not TlsPolicy.NONE:
                await self._starttls(conn, dest)
            if dest.username is not None:
                await self._auth(conn, dest)
        except ConnectionLost as exc:
            conn.abort()
            await conn.close()
            raise _NextCandidate(_local(451, "4.4.2", f"{where}: {exc}")) from None
        except _TlsFallback as exc:
            conn.abort()
            await conn.close()
            log.warning("STARTTLS with %s failed (%s); retrying without TLS (opportunistic)", where, exc)
            return await self._open(dest, key, plaintext=True)
        except BaseException:
            conn.abort()
            await conn.close()
            raise
        return conn

    async def _hello(self, conn: SmtpConnection, dest: Destination) -> None:
        t = self.timeouts
        if dest.lmtp:
            reply = await conn.command(client.lhlo(self.hostname), t.command)
        else:
            reply = await conn.command(client.ehlo(self.hostname), t.command)
            if reply.is_permanent:  # RFC 5321 3.2: an old server; HELO gets no extensions
                reply = await conn.command(client.helo(self.hostname), t.command)
                if reply.code == 250:
                    conn.caps = NO_CAPABILITIES
                    return
        if reply.code != 250:
            await conn.quit(t.quit)
            raise _NextCandidate(_transient(reply, conn.key.host, "4.4.2"))
        conn.caps = parse_ehlo(reply)

    async def _starttls(self, conn: SmtpConnection, dest: Destination) -> None:
        t = self.timeouts
        opportunistic = dest.tls is TlsPolicy.OPPORTUNISTIC
        unavailable = f"TLS required but unavailable at {conn.peer}"
        if not conn.caps.starttls:
            if opportunistic:
                return
            await conn.quit(t.quit)
            raise _NextCandidate(_local(451, "4.7.5", f"{unavailable}: STARTTLS not offered"), tls=True)
        try:
            reply = await conn.command(client.starttls(), t.command)
            if reply.code != 220:
                if opportunistic:  # the server said no; the plaintext session goes on
                    log.info("STARTTLS refused by %s: %s", conn.peer, reply)
                    return
                await conn.quit(t.quit)
                raise _NextCandidate(_local(451, "4.7.5", f"{unavailable}: {reply}"), tls=True)
            await conn.start_tls(self._context(dest.tls is TlsPolicy.VERIFY), t.command)
        except (ConnectionLost, ssl.SSLError, OSError) as exc:
            # Includes certificate verification failures (ssl.SSLCertVerificationError).
            if opportunistic:
                raise _TlsFallback(str(exc) or type(exc).__name__) from None
            conn.abort()
            raise _NextCandidate(_local(451, "4.7.5", f"{unavailable}: {exc}"), tls=True) from None
        await self._hello(conn, dest)

    async def _auth(self, conn: SmtpConnection, dest: Destination) -> None:
        t = self.timeouts
        user, password = dest.username or "", dest.password or ""
        if not conn.tls:
            if dest.tls is not TlsPolicy.NONE:
                await conn.quit(t.quit)
                raise _NextCandidate(_local(451, "4.7.5", f"no TLS with {conn.peer}: will not send credentials"),
                                     tls=True)
            log.warning("sending credentials to %s without TLS (tls policy: none)", conn.peer)
        mechanisms = [m for m in ("PLAIN", "LOGIN") if m in conn.caps.auth]  # PLAIN: one round trip
        if not mechanisms:
            await conn.quit(t.quit)
            raise _NextCandidate(_local(451, "4.7.0", f"{conn.peer} offers no AUTH PLAIN or LOGIN"))
        try:
            reply = await self._sasl(conn, mechanisms, user, password)
        except CommandError as exc:  # e.g. NUL in the configured password
            await conn.quit(t.quit)
            raise _DeferAll(_local(451, "4.7.0", f"Cannot send credentials to {conn.peer}: {exc}"), None) from None
        if reply.code != 235:
            # A wrong password is our misconfiguration: defer, never bounce, and do not hammer other hosts.
            await conn.quit(t.quit)
            raise _DeferAll(_transient(reply, conn.key.host, "4.7.0"), conn.key.host)

    async def _sasl(self, conn: SmtpConnection, mechanisms: Sequence[str], user: str, password: str) -> Reply:
        t = self.timeouts
        reply = Reply(504, "5.5.4", "")
        for mechanism in mechanisms:
            if mechanism == "PLAIN":
                reply = await conn.command(client.auth_plain(user, password), t.command)
                if reply.code == 334:  # we gave the initial response; a server asking again is confused
                    reply = await conn.command(b"*\r\n", t.command)
            else:
                reply = await conn.command(client.auth_login_start(), t.command)
                for value in (user, password):
                    if reply.code != 334:
                        break
                    reply = await conn.command(client.auth_login_response(value), t.command)
            if reply.code != 504:  # 504: mechanism not supported after all; try the next one
                break
        return reply

    # -- transactions -----------------------------------------------------------------------------------

    async def _transactions(self, conn: SmtpConnection, attempt: _Attempt, *, reused: bool) -> bool:
        """Run transactions until every pending recipient has an outcome; whether ``conn`` is still usable."""
        caps, params, host = conn.caps, attempt.message.params, conn.key.host
        pending = list(attempt.pending.values())
        if params.smtputf8 and not caps.smtputf8:  # RFC 6531 3.4: no downgrade
            attempt.settle(pending, OutcomeKind.FAILED,
                           _local(553, "5.6.7", f"{host} does not support SMTPUTF8, required by this message"), host)
            return True
        if caps.size and attempt.message.size > caps.size:
            attempt.settle(pending, OutcomeKind.FAILED, _local(
                552, "5.3.4", f"Message too big for remote: {host} accepts at most {caps.size} octets"), host)
            return True
        if params.body == "8BITMIME" and not caps.eightbitmime:
            log.info("%s lacks 8BITMIME; sending %s as is (no RFC 6152 downgrade)", host, attempt.message.id)
        first = True
        while attempt.pending:
            batch = list(attempt.pending.values())[: self.max_rcpts]
            try:
                if not await self._transaction(conn, attempt, batch):
                    return False
            except _Stale as exc:
                conn.abort()
                if reused and first:
                    raise  # the server dropped an idle connection: one retry on a fresh one
                if exc.reply is not None:  # 421 to MAIL: the server is going away
                    attempt.defer_rest(exc.reply, host)
                    return False
                # Say why: "timed out after 300s" and "closed by the server" call for different fixes.
                raise _NextCandidate(_local(451, "4.4.2", f"lost connection with {conn.peer} after MAIL: {exc.cause}")
                                     ) from None
            first = False
        return conn.usable

    async def _transaction(self, conn: SmtpConnection, attempt: _Attempt, batch: list[RecipientState]) -> bool:
        """One MAIL..final-reply transaction for ``batch``; whether the connection is still usable.

        Raises _Stale if the connection broke before MAIL was answered (nothing can have been delivered).
        """
        caps, msg = conn.caps, attempt.message
        p = msg.params
        try:
            body = await attempt.open_body()
        except OSError as exc:
            log.warning("cannot open the body of %s: %s", msg.id, exc)
            attempt.defer_rest(_local(451, "4.3.0", "Local error reading the message"), None)
            return conn.usable
        try:
            try:
                mail_cmd = client.mail(msg.sender, caps=caps, size=msg.size, body=p.body, smtputf8=p.smtputf8,
                                       ret=p.ret, envid=p.envid)
            except CommandError as exc:
                attempt.settle(batch, OutcomeKind.FAILED, _local(553, "5.1.7", f"Invalid sender: {exc}"), None)
                return conn.usable
            rcpts: list[tuple[RecipientState, bytes]] = []
            for r in batch:
                try:
                    rcpts.append((r, client.rcpt(r.address, caps=caps, smtputf8=p.smtputf8, notify=r.notify,
                                                 orcpt=r.orcpt)))
                except CommandError as exc:
                    attempt.settle([r], OutcomeKind.FAILED, _local(553, "5.1.3", f"Invalid recipient: {exc}"),
                                   None)
            if not rcpts:
                return conn.usable
            return await self._dialogue(conn, attempt, mail_cmd, rcpts, body)
        finally:
            body.close()

    async def _dialogue(self, conn: SmtpConnection, attempt: _Attempt, mail_cmd: bytes,
                        rcpts: list[tuple[RecipientState, bytes]], body: BinaryIO) -> bool:
        t, caps, host = self.timeouts, conn.caps, conn.key.host
        pipelined = caps.pipelining
        phase = "MAIL"
        try:
            if pipelined:  # RFC 2920: MAIL, every RCPT and DATA in one write, then the replies in order
                conn.write(b"".join([mail_cmd, *(cmd for _, cmd in rcpts), client.data()]))
            else:
                conn.write(mail_cmd)
            try:
                mail_reply = await conn.read_reply(t.command)
            except ConnectionLost as exc:
                raise _Stale(cause=str(exc)) from None
            if mail_reply.code == 421:
                raise _Stale(mail_reply)
            phase = "RCPT"
            accepted: list[RecipientState] = []
            rejected: list[tuple[RecipientState, Reply]] = []
            data_reply: Reply | None = None
            if pipelined:
                rcpt_replies = [await conn.read_reply(t.command) for _ in rcpts]
                phase = "DATA"
                data_reply = await conn.read_reply(t.data_init)
            elif mail_reply.is_positive:
                rcpt_replies = [await conn.command(cmd, t.command) for _, cmd in rcpts]
            else:
                rcpt_replies = []
            if not mail_reply.is_positive:  # about the sender or the message: applies to every recipient
                attempt.by_reply(list(attempt.pending.values()), mail_reply, host)
                return await self._abandon(conn, data_reply)
            for (r, _), reply in zip(rcpts, rcpt_replies, strict=True):
                if 200 <= reply.code < 300:
                    accepted.append(r)
                else:
                    rejected.append((r, reply))
            for r, reply in rejected:
                # 452 too many recipients (RFC 5321 4.5.3.1.10): retry those in the next transaction.
                if not (reply.code == 452 and accepted):
                    attempt.by_reply([r], reply, host)
            if not accepted:
                return await self._abandon(conn, data_reply)
            phase = "DATA"
            if data_reply is None:
                data_reply = await conn.command(client.data(), t.data_init)
            if data_reply.code != 354:
                attempt.by_reply(accepted, data_reply if not data_reply.is_positive else
                                 _transient(data_reply, host, "4.5.0"), host)
                return await self._abandon(conn, None)
            phase = "message content"
            if not await self._send_body(conn, attempt, body):
                return False
            phase = "end of data"
            dsn = caps.dsn
            if attempt.destination.lmtp:  # RFC 2033 4.2: one reply per accepted recipient, in order
                for r in accepted:
                    attempt.by_reply([r], await conn.read_reply(t.final), host, dsn and bool(r.notify))
            else:
                final = await conn.read_reply(t.final)
                for r in accepted:
                    attempt.by_reply([r], final, host, dsn and bool(r.notify))
            conn.transactions += 1
            return conn.usable
        except ConnectionLost as exc:
            # After MAIL was answered: defer what is left. After the data, the message may have been
            # delivered anyway; the duplicate that the retry then makes is RFC 5321 6.1's accepted risk.
            attempt.defer_rest(_local(451, "4.4.2", f"lost connection with {conn.peer} after {phase}: {exc}"),
                               host)
            return False

    async def _abandon(self, conn: SmtpConnection, data_reply: Reply | None) -> bool:
        """End a transaction that sends no message: back to the ready-for-MAIL state, if possible."""
        t = self.timeouts
        if data_reply is not None and data_reply.code == 354:
            # Pipelined DATA accepted although nothing valid preceded it: send an empty message's end
            # (RFC 2920 3.1) so the dialogue stays in step; whatever it says is not ours to deliver.
            await conn.command(b".\r\n", t.final)
        reply = await conn.command(client.rset(), t.command)
        if reply.code != 250:
            conn.abort()
        return conn.usable

    async def _send_body(self, conn: SmtpConnection, attempt: _Attempt, body: BinaryIO) -> bool:
        """Stream the dot-stuffed content and the end marker; False (all deferred) on a local read error."""
        t = self.timeouts
        stuffer = DotStuffer(canonical=isinstance(body, CanonicalBody))
        held = b""  # the last encoded chunk goes out with the end marker: one write for most messages
        while True:
            try:
                chunk = body.read(READ_SIZE)
            except OSError as exc:
                # Close without the final dot: the server then discards what it got, nothing is delivered.
                conn.abort()
                log.warning("reading the body of %s failed: %s", attempt.message.id, exc)
                attempt.defer_rest(_local(451, "4.3.0", "Local error reading the message"), None)
                return False
            if not chunk:
                break
            out = stuffer.feed(chunk)
            if out:
                if held:
                    conn.write(held)
                    await conn.drain(t.data_block)
                held = out
        conn.write(held + stuffer.finish())
        await conn.drain(t.data_block)
        if stuffer.long_lines:
            log.info("%s has lines over 998 octets; sent intact to %s", attempt.message.id, conn.peer)
        return True
