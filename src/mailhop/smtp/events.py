"""Events the SMTP server core hands to the session, and the NEED_DATA sentinel.

Untrusted input: event fields carry values parsed from client commands (hostnames, addresses,
parameters) and raw message content; the parsers guarantee syntax, never truthfulness.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from ..address import Mailbox
from ..envelope import MailParams, Recipient
from ..reply import Reply

__all__ = [
    "NEED_DATA",
    "AuthAborted",
    "AuthResponse",
    "AuthStart",
    "BdatChunkEnd",
    "ConnectionClosed",
    "DataChunk",
    "DataEnd",
    "DataStart",
    "Ehlo",
    "Event",
    "Mail",
    "NeedData",
    "Quit",
    "Rcpt",
    "Reset",
    "StartTls",
    "Transaction",
]


@dataclass(frozen=True, slots=True)
class Ehlo:
    """EHLO (``extended``) or HELO; reply with ``conn.ehlo_reply(text)`` or an error."""

    hostname: str
    extended: bool


@dataclass(frozen=True, slots=True)
class Mail:
    """MAIL FROM; ``sender`` None is the null reverse-path. Reply 250 to accept."""

    sender: Mailbox | None
    params: MailParams


@dataclass(frozen=True, slots=True)
class Rcpt:
    """RCPT TO; a 2xx reply adds the recipient to the transaction."""

    recipient: Recipient


@dataclass(frozen=True, slots=True)
class StartTls:
    """STARTTLS; reply R.READY_TLS, handshake, then call ``conn.tls_started()``."""


@dataclass(frozen=True, slots=True)
class Quit:
    """QUIT; reply R.BYE. The connection is then closed."""


@dataclass(frozen=True, slots=True)
class AuthStart:
    """AUTH <mechanism> [initial-response] (RFC 4954), already checked against the settings, the command
    order and TLS. ``initial`` is the decoded initial response (``b""`` for "="), None when absent.

    Reply 334 (``sasl.challenge_reply``) to continue the exchange, 235 on success, or 4xx/5xx to end it.
    ``initial`` may hold a password, so it is left out of the repr.
    """

    mechanism: str
    initial: bytes | None = field(repr=False)


@dataclass(frozen=True, slots=True)
class AuthResponse:
    """The client's decoded answer to our 334 challenge; reply like AuthStart. Not in the repr: secrets."""

    data: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class AuthAborted:
    """The core ended a running AUTH exchange itself and sent the reply (``reason``: "cancelled" for the
    client's "*", "bad base64", "line too long", "bare newline"). Drop the mechanism. No reply.
    """

    reason: str


@dataclass(frozen=True, slots=True)
class DataStart:
    """DATA (``bdat`` False) or the first BDAT chunk: call ``conn.accept_data()`` or send an error."""

    bdat: bool


@dataclass(frozen=True, slots=True)
class DataChunk:
    """A piece of message content, already dot-unstuffed. No reply."""

    data: bytes


@dataclass(frozen=True, slots=True)
class BdatChunkEnd:
    """End of a non-LAST BDAT chunk of ``size`` octets; reply 250 or an error (which aborts the message)."""

    size: int


@dataclass(frozen=True, slots=True)
class DataEnd:
    """End of message content. ``error`` is the core's recommended reply, None if content looked fine.

    ``size`` counts all content octets received, including those not emitted because of ``too_big``.
    Any reply ends the transaction.
    """

    error: Reply | None
    bare_newline: bool
    line_too_long: bool
    too_big: bool
    size: int


@dataclass(frozen=True, slots=True)
class Reset:
    """RSET was answered by the core; drop any partial transaction. No reply."""


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The dialogue is over (peer EOF, QUIT, too many errors, forbidden command, 421). No reply."""

    reason: str


@dataclass(frozen=True, slots=True)
class Transaction:
    """The accepted sender and recipients of the current transaction (``ServerConnection.transaction``)."""

    sender: Mailbox | None
    mail_params: MailParams
    recipients: tuple[Recipient, ...]


class NeedData:
    """Sentinel type: the core needs more input. Flush ``data_to_send()`` then read."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData()

Event = (
    Ehlo | Mail | Rcpt | StartTls | Quit | DataStart | DataChunk | BdatChunkEnd | DataEnd | Reset | ConnectionClosed
    | AuthStart | AuthResponse | AuthAborted
)
