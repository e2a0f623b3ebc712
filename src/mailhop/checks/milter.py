"""A Sendmail-protocol mail filter (OpenDKIM, rspamd's proxy, ClamAV's clamav-milter, ...) as a data-phase check.

At end of data the whole transaction is replayed to the milter over one new connection (``milter.client``):
connect, HELO, MAIL, each RCPT, the header fields, the body, end of message. Its answer becomes the verdict:

    milter says                                     verdict
    reject / tempfail / custom 4xx-5xx reply        REJECT (550 5.7.1) / TEMPFAIL (451 4.7.1) or its own reply
    discard                                         DISCARD
    quarantine (at end of message)                  QUARANTINE with the milter's reason
    add / insert / change header                    the matching ``HeaderEdit``s
    accept / continue                               no objection (a milter's "accept" is not a whitelist for
                                                    the other checks: it only means it wants no more)

Recipients: the milter sees the recipients we already accepted. A per-recipient refusal cannot be applied after
the fact (their RCPT was answered 250 long ago); if the milter refuses every recipient the message is refused,
otherwise the refusal is logged and the message goes on to all of them.

Failure: when the milter cannot be reached, times out or breaks the protocol, the check applies its own
``on_error`` ("tempfail": 451 4.7.1 "Content filter unavailable"; "accept": no opinion) and logs the reason. The
chain's deadline (``checks.timeout``) still bounds the whole replay; past it the chain's ``on_error`` applies.

Sets ``ctx.results["milter:NAME"]`` to the milter's ``Result`` (or "error").
Untrusted input: the message and envelope (passed on) and the milter's replies (checked in ``milter.protocol``).
"""

from __future__ import annotations

import ipaddress
import logging
import socket

from ..config.checks import MilterConfig
from ..milter.client import MilterClient, MilterError
from ..milter.conversation import Connect, Decision, MessageInfo, Result
from ..milter.protocol import AddHeader, ChangeHeader, Cmd, InsertHeader, ProtocolError
from .api import Action, Check, CheckContext, HeaderEdit, Verdict, discard, reject, tempfail

__all__ = ["MilterCheck"]

log = logging.getLogger("mailhop.checks.milter")

_REJECT_TEXT = "Message rejected by content filter"
_TEMPFAIL_TEXT = "Message deferred by content filter, try again later"
_UNAVAILABLE_TEXT = "Content filter unavailable"


class MilterCheck(Check):
    """One configured milter (``[[checks.milter]]``)."""

    def __init__(self, config: MilterConfig, hostname: str | None = None) -> None:
        self.name = config.name
        self.config = config
        # The "j" macro (our host name). gethostname() asks no DNS, unlike getfqdn().
        self.hostname = hostname or socket.gethostname()
        self.client = MilterClient(config.address, connect_timeout=config.connect_timeout,
                                   timeout=config.timeout)
        # Outer bound for the whole replay: connect, then a few replies' worth (each reply has its own timeout).
        self.deadline = config.connect_timeout + 4 * config.timeout

    async def data(self, ctx: CheckContext) -> Verdict | None:
        key = f"milter:{self.name}"
        if ctx.message is None:
            log.info("milter %s: message %s of %d octets is over the scan limit; not filtered",
                     self.name, ctx.queue_id, ctx.size)
            return None
        try:
            result = await self.client.check(self._info(ctx, ctx.message))
        except (MilterError, ProtocolError) as exc:
            ctx.results[key] = "error"
            log.warning("milter %s failed for %s (client %s): %s; on_error=%s", self.name, ctx.queue_id,
                        ctx.client_ip, exc, self.config.on_error)
            if self.config.on_error == "tempfail":
                return tempfail(_UNAVAILABLE_TEXT, reason=f"milter {self.name} unavailable: {exc}")
            return None
        ctx.results[key] = result
        return self._verdict(ctx, result)

    def _info(self, ctx: CheckContext, message: bytes) -> MessageInfo:
        try:
            family = "6" if ipaddress.ip_address(ctx.client_ip).version == 6 else "4"
        except ValueError:
            family = "U"  # not an IP client (a local submission): no port, no address
        # No client host name we could vouch for: libmilter's convention is the address in brackets.
        client_name = f"[{ctx.client_ip}]" if family != "U" else "localhost"
        connect_macros = [("j", self.hostname), ("{daemon_name}", "mailhop"), ("{client_addr}", ctx.client_ip),
                          ("{client_port}", str(ctx.client_port)), ("{client_name}", client_name)]
        mail_macros = [("i", ctx.queue_id)]
        if ctx.user is not None:
            # OpenDKIM takes a non-empty {auth_type} as "authenticated, sign it"; the session may record the
            # SASL mechanism in ctx.session["auth_mechanism"].
            mechanism = str(ctx.session.get("auth_mechanism") or "unknown")
            mail_macros += [("{auth_authen}", ctx.user), ("{auth_type}", mechanism)]
        per_message = (("i", ctx.queue_id),)
        return MessageInfo(
            connect=Connect(client_name, family, ctx.client_port, ctx.client_ip if family != "U" else ""),
            helo=ctx.helo,
            sender=ctx.sender or "",
            recipients=tuple(ctx.recipients),
            message=message,
            macros={Cmd.CONNECT: tuple(connect_macros), Cmd.MAIL: tuple(mail_macros), Cmd.DATA: per_message,
                    Cmd.EOH: per_message, Cmd.BODYEOB: per_message},
        )

    def _verdict(self, ctx: CheckContext, result: Result) -> Verdict | None:
        where = f"milter {self.name} at {result.stage}"
        if result.refused_recipients and result.decision in (Decision.CONTINUE, Decision.ACCEPT):
            refused = ", ".join(r for r, _, _ in result.refused_recipients)
            log.warning("%s refused some recipients of %s (%s); a refusal after the fact cannot be applied to "
                        "one recipient, so the message goes on to all", where, ctx.queue_id, refused)
        reply = result.reply
        if result.decision is Decision.REJECT:
            if reply is not None:
                return reject(reply.text or _REJECT_TEXT, reply.code, reply.enhanced or "5.7.1", reason=where)
            return reject(_REJECT_TEXT, reason=where)
        if result.decision is Decision.TEMPFAIL:
            if reply is not None:
                return tempfail(reply.text or _TEMPFAIL_TEXT, reply.code, reply.enhanced or "4.7.1", reason=where)
            return tempfail(_TEMPFAIL_TEXT, reason=where)
        if result.decision is Decision.DISCARD:
            return discard(where)
        edits = tuple(_edit(h) for h in result.headers)
        if result.quarantine is not None:
            return Verdict(Action.QUARANTINE, reason=result.quarantine, headers=edits)
        return Verdict(headers=edits) if edits else None


def _edit(change: AddHeader | InsertHeader | ChangeHeader) -> HeaderEdit:
    if isinstance(change, AddHeader):
        return HeaderEdit("add", change.name, change.value)
    if isinstance(change, InsertHeader):
        # Sendmail and Postfix count their own Received: field in an insert position (index 1 is just below
        # it, where OpenDKIM puts its signature); ours sits above the edited block, so index 0 is just below it.
        return HeaderEdit("insert", change.name, change.value, max(0, change.index - 1))
    # A change position counts fields of that name from 1, as received; 0 is taken as 1 (as Sendmail does).
    return HeaderEdit("change", change.name, change.value, max(1, change.index))
