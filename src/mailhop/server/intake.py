"""One session's message in progress: the body streaming into the spool (our Received: field first), the
header scan beside it, and the end of data: the loop and From: checks, the content checks, the header edits and
the queue's commit. The session owns one and drives it from the core's events; a module of its own because the
session's event pump is enough for one file."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ..envelope import Envelope
from ..errors import QueueError, QueueFullError
from ..message.headers import HeaderScanner, received_header
from ..policy.submission import check_from_header
from ..reply import R, Reply
from ..smtp import DataEnd
from .checkflow import apply_header_edits

if TYPE_CHECKING:
    from ..queue.spool import BodyWriter
    from .session import SmtpSession

__all__ = ["MessageIntake"]

log = logging.getLogger("mailhop.smtp")


class MessageIntake:
    """The message a session is receiving, from DATA (or the first BDAT) to the reply at its end."""

    def __init__(self, session: SmtpSession) -> None:
        self.session = session
        self._body: BodyWriter | None = None
        self.error: Reply | None = None  # a spool write failed: the reply the end of data (or BDAT) gets
        self._headers: HeaderScanner | None = None
        self._received = b""  # our Received: field, the first bytes of the stored body

    def _check_from_header(self, headers: HeaderScanner) -> Reply | None:
        s = self.session
        services, user = s.ctx.auth, s.user
        if user is None or services is None or not services.enforce_from_header:
            return None
        reply = check_from_header(user, headers.field("From"))
        if reply is not None:
            log.info("From: header refused client=%s user=%s", s.client_ip, user.name)
        return reply

    def start(self) -> None:
        """DATA or the first BDAT: open a body in the spool, our Received: field first, and let the core take data."""
        s = self.session
        self.drop()
        try:
            body = s.ctx.queue.body_writer()
            tx = s.conn.transaction
            assert tx is not None  # the core emits DataStart only inside a transaction
            rcpts = tx.recipients
            proto = ("UTF8SMTP" if tx.mail_params.smtputf8 else "ESMTP") if s.extended else "SMTP"
            if s.conn.tls_active:
                proto += "S"
            if s.user is not None:
                proto += "A"  # RFC 3848
            received = received_header(
                    helo=s.helo,
                    client_ip=s.client_ip,
                    hostname=s.ctx.settings.hostname,
                    protocol=proto,
                    queue_id=body.queue_id,
                    recipient=rcpts[0].address if len(rcpts) == 1 else None,
                    user=s.user.name if s.user is not None and s.ctx.auth is not None
                    and s.ctx.auth.received_shows_user else None,
                )
            body.write(received)
            self._received = received
        except QueueFullError:
            s.conn.send(R.INSUFFICIENT_STORAGE)
            return
        except QueueError:
            s.conn.send(R.LOCAL_ERROR)
            return
        self._body = body
        self.error = None
        self._headers = HeaderScanner()
        s.conn.accept_data()

    def chunk(self, data: bytes) -> None:
        """Message octets, decoded by the core: into the header scan and the spool."""
        if self._body is None or self.error is not None:
            return
        assert self._headers is not None
        if not self._headers.done:
            self._headers.feed(data)
        try:
            self._body.write(data)
        except QueueFullError:
            self.error = R.INSUFFICIENT_STORAGE
        except QueueError:
            self.error = R.LOCAL_ERROR
        if self.error is not None:
            log.warning("spool write failed client=%s", self.session.client_ip)
            self.drop(keep_error=True)

    async def finish(self, event: DataEnd) -> Reply:
        """The end of data: the checks that need the whole message, then the queue's commit; the reply to send."""
        s = self.session
        body, headers = self._body, self._headers
        self._body = None
        if event.error is not None or self.error is not None or body is None or headers is None:
            if body is not None:
                body.abort()
            return event.error or self.error or R.LOCAL_ERROR
        body.canonical = not event.bare_newline  # always, here: a bare CR or LF is an error above
        headers.finish()
        if headers.received_count > s.ctx.max_received_headers:
            body.abort()
            log.info("mail loop client=%s received=%d", s.client_ip, headers.received_count)
            return R.MAIL_LOOP
        refused = self._check_from_header(headers)
        if refused is not None:
            body.abort()
            return refused
        hold_reason = ""
        checks = s.checks
        if checks is not None:
            refused = await checks.data(body, len(self._received), headers, event.size)
            if refused is not None:
                body.abort()
                checks.reset()
                return refused
            if checks.discarded is not None:
                body.abort()
                log.info("discarded id=%s client=%s: %s", body.queue_id, s.client_ip, checks.discarded)
                checks.reset()
                return Reply(250, "2.0.0", f"Ok: queued as {body.queue_id}")
            hold_reason = checks.hold_reason
        try:
            await apply_header_edits(body, self._received, headers, checks.ctx if checks else None,
                                     s.ctx.authserv_id)
        except QueueFullError:
            body.abort()
            return R.INSUFFICIENT_STORAGE
        except QueueError:
            body.abort()
            return R.LOCAL_ERROR
        if checks is not None:
            checks.reset()
        tx = s.conn.transaction
        assert tx is not None
        envelope = Envelope(
            sender=tx.sender,
            mail_params=tx.mail_params,
            recipients=tx.recipients,
            helo=s.helo,
            client_ip=s.client_ip,
            client_port=s.client_port,
            tls=s.conn.tls_active,
            authenticated=s.user.name if s.user is not None else None,
            hold_reason=hold_reason,
        )
        try:
            queue_id = await s.ctx.queue.accept(envelope, body)
        except QueueFullError:
            log.warning("queue full client=%s", s.client_ip)
            return R.INSUFFICIENT_STORAGE
        except QueueError as exc:
            log.error("queue error client=%s: %s", s.client_ip, exc.detail)
            return R.LOCAL_ERROR
        if s.user is not None and s.ctx.auth is not None:
            s.ctx.auth.rate.record(s.user.name, s.user.max_messages_per_hour)
        log.info(
            "queued id=%s from=<%s> nrcpt=%d size=%d client=%s%s",
            queue_id,
            envelope.sender_address,
            len(envelope.recipients),
            event.size,
            s.client_ip,
            f" held={hold_reason!r}" if hold_reason else "",
        )
        return Reply(250, "2.0.0", f"Ok: queued as {queue_id}")

    def drop(self, *, keep_error: bool = False) -> None:
        """Abort the body in progress (RSET, EHLO, a spool error, the end of the session)."""
        if self._body is not None:
            self._body.abort()
            self._body = None
        if not keep_error:
            self.error = None
