"""One exception tree. Each error says who is at fault and whether a retry can help.

Peer-visible text is generic (a Reply from the catalogue); detail for the log travels in ``detail``.
"""

from __future__ import annotations

from .reply import Reply

__all__ = [
    "ConfigError",
    "MailhopError",
    "PolicyReject",
    "ProtocolError",
    "QueueError",
    "QueueFullError",
]


class MailhopError(Exception):
    """Base of every mailhop error."""

    def __init__(self, detail: str = "", *, reply: Reply | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.reply = reply


class ProtocolError(MailhopError):
    """The peer broke the protocol; the reply says how."""


class PolicyReject(MailhopError):
    """A policy check refused the command; ``reply`` is what the peer sees."""


class QueueError(MailhopError):
    """The queue could not durably store or change a message. Transient: retrying later may help."""

    transient = True


class QueueFullError(QueueError):
    """Out of storage space (ENOSPC or quota)."""


class ConfigError(MailhopError):
    """The configuration is invalid; ``detail`` names the key and the fix."""
