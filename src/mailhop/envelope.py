"""The envelope of one message: sender, recipients and their ESMTP parameters (RFC 5321, 1870, 3461, 6152, 6531)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .address import Mailbox

__all__ = ["Envelope", "MailParams", "RcptParams", "Recipient"]


@dataclass(frozen=True, slots=True)
class MailParams:
    """MAIL FROM parameters we understand. Unknown ones are refused by the core (555)."""

    size: int | None = None  # RFC 1870
    body: str | None = None  # "7BIT" | "8BITMIME" (RFC 6152); "BINARYMIME" needs BINARYMIME we do not offer
    smtputf8: bool = False  # RFC 6531
    ret: str | None = None  # "FULL" | "HDRS" (RFC 3461 4.3)
    envid: str | None = None  # xtext-decoded (RFC 3461 4.4)
    requiretls: bool = False  # RFC 8689 (stored; enforced by the delivery side)


@dataclass(frozen=True, slots=True)
class RcptParams:
    """RCPT TO parameters (RFC 3461 4.1-4.2)."""

    notify: tuple[str, ...] = ()  # () = not given; ("NEVER",) or a subset of SUCCESS, FAILURE, DELAY
    orcpt: str | None = None  # "addr-type;xtext-decoded address", e.g. "rfc822;user@example.test"


@dataclass(frozen=True, slots=True)
class Recipient:
    mailbox: Mailbox
    params: RcptParams = field(default_factory=RcptParams)

    @property
    def address(self) -> str:
        return str(self.mailbox)


@dataclass(frozen=True, slots=True)
class Envelope:
    """What the client told us about one message. ``sender`` None is the null reverse-path ``<>``."""

    sender: Mailbox | None
    mail_params: MailParams
    recipients: tuple[Recipient, ...]
    helo: str = ""
    client_ip: str = ""
    client_port: int = 0
    authenticated: str | None = None
    tls: bool = False
    kind: str = ""  # "" ordinary mail; "postmaster": an undeliverable notice handed to the postmaster (never again)
    hold_reason: str = ""  # non-empty: queue the message held (e.g. "quarantine: rspamd: ..."), not for delivery

    @property
    def sender_address(self) -> str:
        return "" if self.sender is None else str(self.sender)
