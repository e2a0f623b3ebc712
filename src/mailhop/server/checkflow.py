"""The policy chain as one SMTP session uses it (``SessionChecks``), and the I/O around its data phase: reading
the spooled message back for content checks, and writing the header edits (our Authentication-Results, filter
headers, forged-field removal) into the spool.

Where each phase's refusal lands (docs/checks.md): a connect tempfail is a 421 at the greeting; a connect or
HELO reject is enforced at MAIL for unauthenticated clients (postscreen's "enforce": a listed dynamic address
may still authenticate and send); mail, rcpt and data refusals answer that command. A discard verdict at any
phase makes the end of data answer 250 and keep nothing; a quarantine verdict holds the message."""

from __future__ import annotations

import asyncio
import logging
import re
from typing import TYPE_CHECKING

from ..checks.api import Action, CheckContext, Phase, Verdict
from ..checks.authresults import claims_authserv_id, format_value
from ..errors import QueueError
from ..message.edit import fold, rewrite_header_block
from ..message.headers import HeaderScanner
from ..queue.spool import BodyWriter
from ..reply import R, Reply

if TYPE_CHECKING:
    from ..checks.chain import PolicyChain
    from ..dns import Resolver

__all__ = ["SessionChecks", "apply_header_edits", "read_for_checks"]

log = logging.getLogger("mailhop.checks")

_AUTH_RESULTS = re.compile(rb"(?:^|\n)authentication-results[ \t]*:", re.IGNORECASE)


class SessionChecks:
    """One session's check context and its chain; each method runs one phase and says what to answer."""

    def __init__(self, chain: PolicyChain, *, client_ip: str, client_port: int, role: str, trusted: bool,
                 resolver: Resolver | None, tls: bool, max_scan_size: int) -> None:
        self.chain = chain
        self.max_scan_size = max_scan_size
        self.ctx = CheckContext(client_ip=client_ip, client_port=client_port, role=role, trusted=trusted,
                                resolver=resolver, tls=tls)

    def _refusal(self, verdict: Verdict, what: str) -> Reply | None:
        """The reply for a refusing verdict (logged), None otherwise; a discard is remembered for the data end."""
        ctx = self.ctx
        if verdict.action is Action.DISCARD:
            ctx.results["discard"] = verdict.reason
        elif verdict.reply is not None and verdict.action in (Action.REJECT, Action.TEMPFAIL):
            log.info("%s refused client=%s sender=<%s>: %s", what, ctx.client_ip, ctx.sender, verdict.reason)
            return verdict.reply
        return None

    async def connect(self) -> Reply | None:
        """The connect phase; a 421 to send instead of the greeting (then close), or None."""
        if not self.chain.has(Phase.CONNECT):
            return None
        verdict = await self.chain.run(Phase.CONNECT, self.ctx)
        if verdict.action is Action.TEMPFAIL and verdict.reply is not None:
            log.info("connection refused client=%s: %s", self.ctx.client_ip, verdict.reason)
            r = verdict.reply
            return r if r.code == 421 else Reply(421, r.enhanced or "4.7.0", r.text)
        if verdict.action is Action.REJECT:
            self.ctx.connect_verdict = verdict  # enforced at MAIL (see the module docstring)
        return None

    async def helo(self, hostname: str) -> None:
        ctx = self.ctx
        ctx.helo = hostname
        ctx.reset_transaction()
        if self.chain.has(Phase.HELO):
            verdict = await self.chain.run(Phase.HELO, ctx)
            if verdict.action in (Action.REJECT, Action.TEMPFAIL):
                ctx.session["helo_verdict"] = verdict  # enforced at MAIL, like a connect refusal

    def authenticated(self, user: str, mechanism: str) -> None:
        self.ctx.user = user
        self.ctx.session["auth_mechanism"] = mechanism

    def tls_started(self) -> None:
        """RFC 3207: nothing learnt before the handshake survives it."""
        ctx = self.ctx
        ctx.helo, ctx.user, ctx.tls = "", None, True
        ctx.session.pop("helo_verdict", None)
        ctx.reset_transaction()

    def reset(self) -> None:
        self.ctx.reset_transaction()

    async def mail(self, sender: str, *, tls: bool) -> Reply | None:
        """The mail phase for MAIL FROM:<sender> ('' for <>); the refusal, or None."""
        ctx = self.ctx
        ctx.reset_transaction()
        ctx.sender, ctx.tls = sender, tls
        if ctx.user is None:
            for early in (ctx.connect_verdict, ctx.session.get("helo_verdict")):
                if early is not None and early.reply is not None:
                    log.info("MAIL refused client=%s sender=<%s>: %s", ctx.client_ip, sender, early.reason)
                    return early.reply
        if not self.chain.has(Phase.MAIL):
            return None
        refusal = self._refusal(await self.chain.run(Phase.MAIL, ctx), "MAIL")
        if refusal is not None:
            ctx.reset_transaction()
        return refusal

    async def rcpt(self, recipient: str) -> Reply | None:
        """The rcpt phase for one recipient already past relay control; the refusal, or None."""
        ctx = self.ctx
        ctx.recipient = recipient
        refusal = None
        if self.chain.has(Phase.RCPT):
            refusal = self._refusal(await self.chain.run(Phase.RCPT, ctx), f"RCPT <{recipient}>")
        ctx.recipient = None
        if refusal is None:
            ctx.recipients.append(recipient)
        return refusal

    async def data(self, body: BodyWriter, received_len: int, headers: HeaderScanner, size: int) -> Reply | None:
        """The data phase on the spooled message; the refusal, or None to go on."""
        ctx = self.ctx
        if not self.chain.has(Phase.DATA):
            return None
        ctx.queue_id = body.queue_id
        ctx.header_block = headers.block
        ctx.size = size
        try:
            ctx.message = await read_for_checks(body, received_len, self.max_scan_size)
        except QueueError:
            return R.LOCAL_ERROR
        if ctx.message is None:
            log.info("not scanned id=%s size=%d over checks.max_scan_size", body.queue_id, size)
        verdict = await self.chain.run(Phase.DATA, ctx)
        ctx.message = None  # not needed past the checks: free it before the commit wait
        return self._refusal(verdict, f"message {body.queue_id}")

    @property
    def discarded(self) -> str | None:
        """Why the transaction is to be dropped after its 250, if a check said so."""
        reason = self.ctx.results.get("discard")
        return None if reason is None else str(reason)

    @property
    def hold_reason(self) -> str:
        """The queue hold reason a quarantine verdict asks for ('' for none)."""
        return f"quarantine: {self.ctx.quarantine_reason}" if self.ctx.quarantine_reason else ""


async def read_for_checks(body: BodyWriter, offset: int, max_size: int) -> bytes | None:
    """The message as the client sent it (after our Received:), or None when it is over ``max_size``."""
    if body.size - offset > max_size:
        return None
    if body.is_file_backed:
        return await asyncio.to_thread(body.read_back, offset)
    return body.read_back(offset)


async def apply_header_edits(body: BodyWriter, received: bytes, headers: HeaderScanner,
                             checks: CheckContext | None, authserv_id: str) -> None:
    """Rewrite the stored header section (which follows our ``received`` field) if anything asks for it; the
    common case (nothing to do) costs one regex scan of the header block."""
    block = headers.block
    forged = bool(authserv_id) and _AUTH_RESULTS.search(block) is not None
    edits = checks.header_edits if checks is not None else []
    results = checks.auth_results if checks is not None else []
    if not (forged or edits or results):
        return
    if headers.truncated:
        log.warning("header edits skipped id=%s: header section over %d octets", body.queue_id, len(block))
        return
    top = [fold("Authentication-Results", format_value(authserv_id, results))] if results else []
    core = block[:-2] if block.endswith(b"\r\n") else block

    def drop(name: str, raw: bytes) -> bool:
        if name == "authentication-results" and claims_authserv_id(raw, authserv_id):
            log.info("removed a forged Authentication-Results claiming %s id=%s", authserv_id, body.queue_id)
            return True
        return False

    new_block = rewrite_header_block(core, edits, top=top, drop=drop if forged else None)
    if not core and new_block:
        new_block += b"\r\n"  # the message had no header section: the new fields end before its blank line
    elif core and not new_block:
        # Every field was removed: drop the CRLF that ended the last one, so the blank line stays the boundary.
        core += b"\r\n"
    old_len = len(received) + len(core)
    if body.is_file_backed:
        await asyncio.to_thread(body.replace_head, old_len, received + new_block)
    else:
        body.replace_head(old_len, received + new_block)
