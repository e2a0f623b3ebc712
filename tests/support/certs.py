"""What the tests read off a peer's certificate."""

from __future__ import annotations

from typing import Any, cast

__all__ = ["dns_names"]


def dns_names(cert: Any) -> list[str]:
    """The DNS names in the subjectAltName of a certificate as ``SSLSocket.getpeercert()`` returns it."""
    assert cert, "the peer sent no certificate"
    alt_names = cast("tuple[tuple[str, str], ...]", cert.get("subjectAltName", ()))
    return [value for kind, value in alt_names if kind == "DNS"]
