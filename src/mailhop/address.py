"""Mailbox and domain parsing for SMTP paths (RFC 5321 4.1.2, SMTPUTF8 per RFC 6531).

Untrusted input: every MAIL FROM and RCPT TO path from any client. Parsing is strict: what RFC 5321 does not
allow is refused rather than guessed at, because a lenient parser is how open-relay tricks slip through.
Domains are compared in one canonical form (lowercase A-labels, UTS #46 mapping, no trailing dot).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

import idna

__all__ = ["AddressError", "Mailbox", "canonical_domain", "parse_path"]

# RFC 5321 4.5.3.1.1-3: local part 64 octets, domain 255, path 256 (with the angle brackets).
MAX_LOCAL_PART = 64
MAX_DOMAIN = 255
MAX_PATH = 256

_ATEXT = r"A-Za-z0-9!#$%&'*+\-/=?^_`{|}~"
_UTF8 = "\u0080-\U0010ffff"
_DOT_ATOM = re.compile(rf"[{_ATEXT}]+(?:\.[{_ATEXT}]+)*")
_DOT_ATOM_UTF8 = re.compile(rf"[{_ATEXT}{_UTF8}]+(?:\.[{_ATEXT}{_UTF8}]+)*")
# qtextSMTP and quoted-pairSMTP (RFC 5321 4.1.2); UTF-8 allowed in qtext under SMTPUTF8.
_QUOTED = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"')
_QUOTED_UTF8 = re.compile(rf'"(?:[\x20\x21\x23-\x5b\x5d-\x7e{_UTF8}]|\\[\x20-\x7e])*"')
_LDH_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_SOURCE_ROUTE = re.compile(r"@[^,:]+(?:,@[^,:]+)*:")
# The common case in one C-level match: <dot-atom@ldh.labels> with no xn-- label (those need IDNA checks).
_FAST_PATH = re.compile(
    rf"<([{_ATEXT}]+(?:\.[{_ATEXT}]+)*)@((?:[A-Za-z0-9](?:[A-Za-z0-9-]{{0,61}}[A-Za-z0-9])?\.)*"
    rf"[A-Za-z0-9](?:[A-Za-z0-9-]{{0,61}}[A-Za-z0-9])?)>"
)


class AddressError(ValueError):
    """The path is not valid RFC 5321 syntax; ``reason`` is safe to log."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Mailbox:
    """A parsed mailbox. ``domain`` is canonical (lowercase A-label, or ``[literal]``); ``local`` as sent."""

    local: str
    domain: str
    is_literal: bool = False
    had_source_route: bool = False
    utf8: bool = False

    def __str__(self) -> str:
        return f"{self.local}@{self.domain}" if self.domain else self.local

    @property
    def local_unquoted(self) -> str:
        """The local part with RFC 5321 quoting removed."""
        if len(self.local) >= 2 and self.local[0] == '"' and self.local[-1] == '"':
            return re.sub(r"\\(.)", r"\1", self.local[1:-1])
        return self.local


def canonical_domain(domain: str) -> str:
    """Return the canonical comparison form of a domain name, or raise AddressError.

    UTS #46 mapping (so fullwidth dots and case variants collapse to the name they display as), lowercase
    A-labels, and no trailing dot: RFC 5321 domains never end in a dot, so one is refused, not stripped.
    """
    if not domain or len(domain) > MAX_DOMAIN:
        raise AddressError("domain empty or too long")
    if domain.isascii():
        labels = domain.lower().split(".")
        if all(_LDH_LABEL.fullmatch(label) for label in labels):
            for label in labels:
                if label.startswith("xn--"):
                    try:
                        idna.decode(label)
                    except idna.IDNAError as exc:
                        raise AddressError(f"invalid A-label {label!r}") from exc
            return ".".join(labels)
        raise AddressError("invalid domain syntax")
    try:
        ascii_name = idna.encode(domain, uts46=True, transitional=False).decode("ascii")
    except (idna.IDNAError, UnicodeError) as exc:
        raise AddressError("invalid internationalized domain") from exc
    return canonical_domain(ascii_name)


def _parse_literal(text: str) -> str:
    inner = text[1:-1]
    if inner.lower().startswith("ipv6:"):
        try:
            return f"[IPv6:{ipaddress.IPv6Address(inner[5:]).compressed}]"
        except ValueError as exc:
            raise AddressError("invalid IPv6 address literal") from exc
    try:
        return f"[{ipaddress.IPv4Address(inner)}]"
    except ValueError as exc:
        # General-address-literal (tag:content) is syntactically allowed but names nothing we can route.
        raise AddressError("unsupported address literal") from exc


def parse_path(text: str, *, smtputf8: bool = False, allow_null: bool = False) -> Mailbox | None:
    """Parse ``<mailbox>`` (or ``<>`` when ``allow_null``); returns None for the null path.

    A source route (``<@a,@b:user@c>``) is accepted and ignored, as RFC 5321 4.1.2 and C.1 require; the
    mailbox after it is what counts. ``<postmaster>`` without a domain is accepted (RFC 5321 4.5.1).
    """
    if len(text) <= MAX_PATH:
        fast = _FAST_PATH.fullmatch(text)
        if fast is not None and len(fast.group(1)) <= MAX_LOCAL_PART and "xn--" not in text.lower():
            return Mailbox(fast.group(1), fast.group(2).lower())
    if len(text.encode("utf-8")) > MAX_PATH:
        raise AddressError("path too long")
    if len(text) < 2 or text[0] != "<" or text[-1] != ">":
        raise AddressError("path not in angle brackets")
    inner = text[1:-1]
    if inner == "":
        if allow_null:
            return None
        raise AddressError("null path not allowed here")
    if not inner.isascii() and not smtputf8:
        raise AddressError("non-ASCII address without SMTPUTF8")
    routed = False
    m = _SOURCE_ROUTE.match(inner)
    if m:
        routed = True
        for hop in m.group(0)[:-1].split(","):
            _parse_domain_part(hop[1:])
        inner = inner[m.end():]
    if inner.lower() == "postmaster":
        return Mailbox("postmaster", "", had_source_route=routed)
    at = inner.rfind("@")
    if at <= 0:
        raise AddressError("missing @domain")
    local, domain_text = inner[:at], inner[at + 1 :]
    if len(local.encode("utf-8")) > MAX_LOCAL_PART:
        raise AddressError("local part too long")
    dot_atom = _DOT_ATOM_UTF8 if smtputf8 else _DOT_ATOM
    quoted = _QUOTED_UTF8 if smtputf8 else _QUOTED
    if not (dot_atom.fullmatch(local) or quoted.fullmatch(local)):
        raise AddressError("invalid local part")
    domain, literal = _parse_domain_part(domain_text)
    return Mailbox(local, domain, is_literal=literal, had_source_route=routed, utf8=not text.isascii())


def _parse_domain_part(text: str) -> tuple[str, bool]:
    if text.startswith("[") and text.endswith("]"):
        return _parse_literal(text), True
    return canonical_domain(text), False
