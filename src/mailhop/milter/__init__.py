"""A Sendmail milter (mail filter) client: ``protocol`` is the sans-IO protocol, ``client`` the socket side."""

from __future__ import annotations

from .client import MilterClient, MilterError, parse_address
from .conversation import Connect, Decision, MessageInfo, Result
from .protocol import ProtocolError

__all__ = ["Connect", "Decision", "MessageInfo", "MilterClient", "MilterError", "ProtocolError", "Result",
           "parse_address"]
