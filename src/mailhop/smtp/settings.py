"""Per-listener settings of the SMTP server core.

Untrusted input: none; these come from the operator's configuration.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .limits import Limits
from .sasl import MECHANISMS

__all__ = ["ServerSettings"]


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """What one listener offers. ``tls_active`` is True for implicit TLS (port 465).

    ``auth_mechanisms`` are the SASL mechanisms offered for AUTH (RFC 4954), upper case, from
    ``sasl.MECHANISMS``; empty means no AUTH (the command gets 502). They are advertised and usable only
    under TLS unless ``auth_plaintext_ok``, which the session sets only where plaintext AUTH is
    explicitly allowed (say, a loopback-only listener configured so).
    """

    hostname: str
    limits: Limits = field(default_factory=Limits)
    tls_available: bool = False
    tls_active: bool = False
    advertise_dsn: bool = True
    advertise_smtputf8: bool = True
    advertise_chunking: bool = True
    auth_mechanisms: tuple[str, ...] = ()
    auth_plaintext_ok: bool = False

    def __post_init__(self) -> None:
        for name in self.auth_mechanisms:
            if name not in MECHANISMS:
                raise ValueError(f"unsupported AUTH mechanism {name!r}; supported: {', '.join(MECHANISMS)}")
        if len(set(self.auth_mechanisms)) != len(self.auth_mechanisms):
            raise ValueError("auth_mechanisms lists a mechanism twice")
