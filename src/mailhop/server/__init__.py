"""Asyncio inbound side: listeners and sessions. Holds no protocol rules; those live in mailhop.smtp."""

from .listener import ConnectionLimiter, Listener
from .session import ServerState, SessionContext, SmtpSession

__all__ = ["ConnectionLimiter", "Listener", "ServerState", "SessionContext", "SmtpSession"]
