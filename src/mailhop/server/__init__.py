"""Asyncio inbound side: listeners and sessions. Holds no protocol rules; those live in mailhop.smtp."""

from .listener import ConnectionLimiter, Listener
from .session import SessionContext, SmtpSession

__all__ = ["ConnectionLimiter", "Listener", "SessionContext", "SmtpSession"]
