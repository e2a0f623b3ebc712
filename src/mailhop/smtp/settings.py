"""Per-listener settings of the SMTP server core.

Untrusted input: none; these come from the operator's configuration.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .limits import Limits

__all__ = ["ServerSettings"]


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """What one listener offers. ``tls_active`` is True for implicit TLS (port 465)."""

    hostname: str
    limits: Limits = field(default_factory=Limits)
    tls_available: bool = False
    tls_active: bool = False
    advertise_dsn: bool = True
    advertise_smtputf8: bool = True
    advertise_chunking: bool = True
