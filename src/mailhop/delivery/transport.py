"""The transport seam: one delivery attempt for the recipients of one message at one destination.

Contract: a transport tries once and classifies; it never sleeps to retry, never decides expiry and never builds
bounces (the queue side does all of that). It returns exactly one Outcome per recipient it was given, in any
order. A connection-level failure (no host reachable, TLS required but unavailable, a timeout) defers every
recipient of the attempt with a reply that says why. It must not raise for anything the remote side does;
an exception out of ``deliver`` is a bug and the engine defers the recipients with 451 4.3.0.
"""

from __future__ import annotations

import io
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import BinaryIO, Protocol

from ..queue.model import QueuedMessage, RecipientState
from ..reply import Reply

__all__ = ["Candidate", "CanonicalBody", "Destination", "Outcome", "OutcomeKind", "TlsPolicy", "Transport"]


class TlsPolicy(StrEnum):
    NONE = "none"  # never STARTTLS
    OPPORTUNISTIC = "opportunistic"  # STARTTLS when offered, no verification; plaintext if not offered or failing
    REQUIRED = "required"  # STARTTLS must succeed (certificate not verified), else defer
    VERIFY = "verify"  # STARTTLS must succeed with a certificate valid for the host name, else defer


@dataclass(frozen=True, slots=True)
class Candidate:
    """One address to try: the host name (for TLS verification and Remote-MTA) and where to connect."""

    host: str
    address: str
    port: int


@dataclass(frozen=True, slots=True)
class Destination:
    """Where and how to deliver: candidates in the order to try them, and the connection policy."""

    key: str  # throttling and pooling key, e.g. "mx:example.test" or "smtp://relay.example:587"
    candidates: tuple[Candidate, ...]
    tls: TlsPolicy = TlsPolicy.OPPORTUNISTIC
    implicit_tls: bool = False  # smtps://: TLS from the first byte (RFC 8314)
    username: str | None = None
    password: str | None = None
    lmtp: bool = False


class OutcomeKind(StrEnum):
    DELIVERED = "delivered"
    DEFERRED = "deferred"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class Outcome:
    idx: int  # RecipientState.idx
    kind: OutcomeKind
    reply: Reply
    remote_host: str | None = None  # host name of the server that gave the reply, for Remote-MTA
    dsn_passed_on: bool = False  # the next hop accepted our NOTIFY/ORCPT (RFC 3461: it reports from now on)


BodyOpener = Callable[[], Awaitable[BinaryIO]]


class CanonicalBody(io.BytesIO):
    """A body known to be canonical: every line ends in CRLF, no bare CR or LF, so the DATA encoder only
    dot-stuffs it. Only bodies whose writer vouched for it qualify (``BodyWriter.canonical``: the SMTP server's
    decoder refuses bare CR/LF, and our own header fields are folded with CRLF)."""


class Transport(Protocol):
    async def deliver(
        self,
        destination: Destination,
        message: QueuedMessage,
        recipients: Sequence[RecipientState],
        open_body: BodyOpener,
    ) -> list[Outcome]:
        """One attempt; one Outcome per recipient. See the module docstring for the contract."""
        ...


