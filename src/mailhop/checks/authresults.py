"""Our Authentication-Results header (RFC 8601), and recognising forged ones that claim our authserv-id.

RFC 8601 5: a receiver MUST remove (or rename) Authentication-Results fields carrying its own authserv-id that
arrive from outside, or a forger could claim "dkim=pass" in our name to the MUA or to filters after us.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import authres

from .api import AuthResult

__all__ = ["claims_authserv_id", "format_value"]

_TOKEN = re.compile(r"^\s*(?:\([^)]*\)\s*)*([^\s;()]+)")


def format_value(authserv_id: str, results: Sequence[AuthResult]) -> str:
    """The field value: ``authserv-id; method=result ...; ...`` or ``authserv-id; none`` (RFC 8601 2.2)."""
    if not results:
        return f"{authserv_id}; none"
    parts = [authserv_id]
    for r in results:
        props = [authres.AuthenticationResultProperty(*_split_property(k), v) for k, v in r.properties]
        parts.append(str(authres.AuthenticationResult(method=r.method, result=r.result, reason=r.reason or None,
                                                      properties=props)))
    return "; ".join(parts)


def _split_property(key: str) -> tuple[str, str]:
    ptype, _, name = key.partition(".")
    return ptype, name


def claims_authserv_id(raw_field: bytes, authserv_id: str) -> bool:
    """Whether an Authentication-Results field (raw, with its name) names ``authserv_id`` (case-insensitive)."""
    value = raw_field.partition(b":")[2].decode("utf-8", "replace")
    value = re.sub(r"\r?\n[ \t]", " ", value)
    try:
        found = authres.AuthenticationResultsHeader.parse_value(value).authserv_id
    except Exception:  # a malformed field: judge by its first token, so garbage cannot hide a claim
        m = _TOKEN.match(value)
        found = m.group(1) if m else ""
    return str(found).strip().lower() == authserv_id.lower()
