"""When to notify and whom: turns one attempt's final and deferred recipients into DSN messages to enqueue.

Rules (RFC 3461 and Postfix practice):
- One notice per message per event, covering every recipient the event concerns.
- Failed (incl. expired) recipients: a "failed" DSN to the envelope sender, NOTIFY permitting.
- Still deferred after ``delay_warning``: one "delayed" DSN per message, ever, NOTIFY permitting.
- NOTIFY=SUCCESS: a "relayed" notice when the next hop did not take over DSN duty (it lacked the DSN
  extension); when it accepted our NOTIFY, it reports success itself.
- Never a DSN to the null sender. A failed message from the null sender (a bounce that cannot be returned) is
  given to the postmaster once; if that fails too, it is dropped and logged, never bounced again.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import BinaryIO

from ..address import AddressError, parse_path
from ..envelope import Envelope, MailParams, RcptParams, Recipient
from ..message.dsn import Action, DsnRecipient, build_dsn, should_notify
from ..queue.model import QueuedMessage, RecipientState

__all__ = ["NoticeItem", "Notifier"]

log = logging.getLogger("mailhop.delivery")
_EIGHT_BIT_CTE = re.compile(rb"^Content-Transfer-Encoding:\s*8bit", re.IGNORECASE | re.MULTILINE)


@dataclass(frozen=True, slots=True)
class NoticeItem:
    """One recipient's part in a notice."""

    rcpt: RecipientState
    action: Action
    status: str
    diagnostic: str
    remote_mta: str | None
    will_retry_until: float | None = None


class Notifier:
    """Builds the notices for one event of one message."""

    def __init__(self, *, hostname: str, postmaster: str) -> None:
        self.hostname = hostname
        self.postmaster = postmaster if "@" in postmaster else f"{postmaster}@{hostname}"

    def build(
        self, message: QueuedMessage, items: Sequence[NoticeItem], original: BinaryIO | None, *, now: float
    ) -> list[tuple[Envelope, bytes]]:
        """The notices (envelope, body) this event needs; empty when none is due."""
        if not items:
            return []
        if message.sender == "":
            return self._undeliverable_bounce(message, items, original, now=now)
        wanted = [i for i in items if should_notify(i.rcpt.notify, i.action)]
        if not wanted:
            return []
        to = message.sender
        return [self._notice(message, wanted, original, to=to, kind="", now=now)]

    def _undeliverable_bounce(
        self, message: QueuedMessage, items: Sequence[NoticeItem], original: BinaryIO | None, *, now: float
    ) -> list[tuple[Envelope, bytes]]:
        failed = [i for i in items if i.action == "failed"]
        if not failed:
            return []
        if message.kind == "postmaster":
            log.error("dropping undeliverable notice %s to the postmaster: %s", message.id, failed[0].diagnostic)
            return []
        log.warning("notice %s is undeliverable; giving it to %s", message.id, self.postmaster)
        return [self._notice(message, failed, original, to=self.postmaster, kind="postmaster", now=now)]

    def _notice(
        self,
        message: QueuedMessage,
        items: Sequence[NoticeItem],
        original: BinaryIO | None,
        *,
        to: str,
        kind: str,
        now: float,
    ) -> tuple[Envelope, bytes]:
        smtputf8 = message.params.smtputf8 or not to.isascii()
        body = build_dsn(
            reporting_mta=self.hostname,
            queue_id=message.id,
            envelope_sender=to,
            envid=message.params.envid,
            arrival_date=message.received_at,
            recipients=[
                DsnRecipient(
                    final_recipient=i.rcpt.address,
                    original_recipient=i.rcpt.orcpt,
                    action=i.action,
                    status=i.status,
                    remote_mta=i.remote_mta,
                    diagnostic=i.diagnostic or None,
                    last_attempt=now,
                    will_retry_until=i.will_retry_until,
                )
                for i in items
            ],
            original=original,
            ret=message.params.ret if message.params.ret in ("FULL", "HDRS") else None,  # type: ignore[arg-type]
            postmaster=self.postmaster,
            now=now,
            smtputf8=smtputf8,
        )
        try:
            mailbox = parse_path(f"<{to}>", smtputf8=True)
        except AddressError:
            mailbox = None
        if mailbox is None:
            mailbox = parse_path(f"<{self.postmaster}>", smtputf8=True)
            assert mailbox is not None
        header_end = body.find(b"\r\n\r\n")
        eight_bit = bool(_EIGHT_BIT_CTE.search(body[: header_end if header_end > 0 else len(body)]))
        params = MailParams(body="8BITMIME" if eight_bit else None, smtputf8=smtputf8)
        envelope = Envelope(
            sender=None, mail_params=params, recipients=(Recipient(mailbox, RcptParams()),),
            helo=self.hostname, kind=kind,
        )
        return envelope, body
