"""Building queued messages and running one SmtpTransport attempt against test receivers."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any, BinaryIO

from mailhop.delivery.smtp import SmtpTransport, Timeouts
from mailhop.delivery.transport import Candidate, Destination, Outcome, OutcomeKind, TlsPolicy
from mailhop.envelope import MailParams
from mailhop.queue.model import QueuedMessage, RcptStatus, RecipientState
from tests.support.receiver import Receiver

HOST = "127.0.0.31"
OTHER = "127.0.0.32"
BODY = (
    b"From: a@example.test\r\nTo: b@example.test\r\nSubject: test\r\n\r\n"
    b"first line\r\n.starts with a dot\r\n..two dots\r\n.\r\n\r\nlast line\r\n"
)
DELIVERED, DEFERRED, FAILED = OutcomeKind.DELIVERED, OutcomeKind.DEFERRED, OutcomeKind.FAILED


def recipient(idx: int, address: str, *, notify: tuple[str, ...] = (), orcpt: str | None = None) -> RecipientState:
    return RecipientState(idx, address, address.rpartition("@")[2], orcpt, notify, RcptStatus.PENDING, 0, "",
                          0.0, 0.0)


def message(
    addresses: Sequence[str] = ("b@example.test",),
    *,
    sender: str = "a@example.test",
    body: bytes = BODY,
    params: MailParams | None = None,
    notify: tuple[str, ...] = (),
    orcpt: bool = False,
) -> QueuedMessage:
    rcpts = tuple(recipient(i, a, notify=notify, orcpt=f"rfc822;{a}" if orcpt else None)
                  for i, a in enumerate(addresses))
    return QueuedMessage("Q0001", sender, params or MailParams(size=len(body)), 0.0, len(body), False, "",
                         "192.0.2.1", "client.test", rcpts)


def candidate(r: Receiver | tuple[str, int], host: str = "receiver.test") -> Candidate:
    address, port = (r.host, r.port) if isinstance(r, Receiver) else r
    return Candidate(host, address, port)


def destination(*targets: Receiver | tuple[str, int] | Candidate, **options: Any) -> Destination:
    options.setdefault("tls", TlsPolicy.NONE)
    candidates = tuple(t if isinstance(t, Candidate) else candidate(t) for t in targets)
    return Destination("smtp:test", candidates, **options)


def transport(**options: Any) -> SmtpTransport:
    options.setdefault("timeouts", Timeouts.all(5.0))
    return SmtpTransport(hostname="relay.example.test", **options)


async def deliver(t: SmtpTransport, dest: Destination, msg: QueuedMessage, body: bytes | None = None,
                  ) -> dict[int, Outcome]:
    """One attempt for every recipient of ``msg``; outcomes by recipient index (exactly one each)."""
    content = BODY if body is None else body

    async def open_body() -> BinaryIO:
        return io.BytesIO(content)

    outcomes = await t.deliver(dest, msg, msg.recipients, open_body)
    by_idx = {o.idx: o for o in outcomes}
    assert len(outcomes) == len(by_idx) == len(msg.recipients), outcomes
    return by_idx


def kinds(outcomes: dict[int, Outcome]) -> list[OutcomeKind]:
    return [outcomes[i].kind for i in sorted(outcomes)]


def refused_port(host: str) -> tuple[str, int]:
    """An address where nothing listens (connections are refused)."""
    import socket

    with socket.socket() as sock:
        sock.bind((host, 0))
        return host, int(sock.getsockname()[1])


