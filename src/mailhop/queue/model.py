"""Pure queue types and recipient state transitions. No I/O here.

A message is queued once, with one ``RecipientState`` per RCPT TO (``idx`` is its position in the
envelope). Recipients move ``pending -> deferred* -> delivered | failed``; ``delivered`` and ``failed`` are
final. The transition functions return new values; storing them is the backend's job.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum

from ..envelope import MailParams

__all__ = [
    "InvalidTransition",
    "QueuedMessage",
    "RcptStatus",
    "RecipientState",
    "mark_deferred",
    "mark_delivered",
    "mark_failed",
]


class RcptStatus(StrEnum):
    PENDING = "pending"  # never tried
    DEFERRED = "deferred"  # tried, transient failure; due again at next_attempt
    DELIVERED = "delivered"  # final
    FAILED = "failed"  # final (permanent failure or expired)


FINAL_STATUSES = frozenset({RcptStatus.DELIVERED, RcptStatus.FAILED})


class InvalidTransition(ValueError):
    """A recipient in a final state (delivered, failed) cannot change state."""


@dataclass(frozen=True, slots=True)
class RecipientState:
    idx: int  # position in the envelope's RCPT list, 0-based
    address: str  # the mailbox as str(Mailbox): local@domain (domain canonical)
    domain: str  # the canonical domain ('' for <postmaster>); what delivery routes on
    orcpt: str | None  # RFC 3461 ORCPT: "addr-type;address", or None if not given
    notify: tuple[str, ...]  # RFC 3461 NOTIFY: () if not given
    status: RcptStatus
    attempts: int
    last_reply: str  # the last reply from a delivery attempt ('' before the first)
    next_attempt: float  # epoch seconds when it is due (pending: the time it was received)
    updated: float  # epoch seconds of the last change

    @property
    def is_final(self) -> bool:
        return self.status in FINAL_STATUSES


@dataclass(frozen=True, slots=True)
class QueuedMessage:
    id: str
    sender: str  # '' is the null reverse-path <>
    params: MailParams  # SIZE, BODY, SMTPUTF8, RET, ENVID, REQUIRETLS as given on MAIL FROM
    received_at: float  # epoch seconds
    size: int  # body bytes as stored
    held: bool
    hold_reason: str  # '' unless held; 'corrupt: ...' for messages quarantined by recovery
    client_ip: str
    helo: str
    recipients: tuple[RecipientState, ...]
    client_port: int = 0
    authenticated: str | None = None  # the SASL identity, if the client authenticated
    tls: bool = False
    warned: bool = False  # a delay notice (RFC 3464 action "delayed") has been sent
    kind: str = ""  # "" ordinary mail; "postmaster": a notice that could not be returned, given to postmaster

    @property
    def is_done(self) -> bool:
        """True when every recipient is final (the message can be removed)."""
        return all(r.is_final for r in self.recipients)


def _check_not_final(state: RecipientState, target: RcptStatus) -> None:
    if state.status in FINAL_STATUSES:
        raise InvalidTransition(f"recipient {state.idx} is {state.status}; cannot become {target}")


def mark_delivered(state: RecipientState, reply: str, *, now: float) -> RecipientState:
    """One delivery attempt succeeded."""
    _check_not_final(state, RcptStatus.DELIVERED)
    return replace(state, status=RcptStatus.DELIVERED, attempts=state.attempts + 1, last_reply=reply,
                   updated=now)


def mark_deferred(state: RecipientState, reply: str, next_attempt: float, *, now: float) -> RecipientState:
    """One delivery attempt failed transiently; retry at ``next_attempt``."""
    _check_not_final(state, RcptStatus.DEFERRED)
    return replace(state, status=RcptStatus.DEFERRED, attempts=state.attempts + 1, last_reply=reply,
                   next_attempt=next_attempt, updated=now)


def mark_failed(state: RecipientState, reply: str, *, now: float, attempted: bool = True) -> RecipientState:
    """Permanent failure; ``attempted=False`` when no attempt was made (e.g. expired in the queue)."""
    _check_not_final(state, RcptStatus.FAILED)
    return replace(state, status=RcptStatus.FAILED, attempts=state.attempts + (1 if attempted else 0),
                   last_reply=reply, updated=now)
