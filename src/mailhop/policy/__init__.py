"""Checks applied to SMTP sessions. Relay control (relay.py) always runs first at RCPT and cannot be disabled."""

from .relay import RelayPolicy

__all__ = ["RelayPolicy"]
