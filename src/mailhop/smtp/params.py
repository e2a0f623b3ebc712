"""ESMTP parameters of MAIL FROM and RCPT TO (RFC 5321 4.1.2, RFC 1870, 3461, 6152, 6531, 8689).

Untrusted input: the parameter words after a client's path, as raw bytes. Every value is checked against
its grammar before it is stored, and decoded xtext must be printable, because ENVID and ORCPT are later
copied into DSN headers where a decoded CR or LF would inject header lines.
"""

from __future__ import annotations

import re

from ..envelope import MailParams, RcptParams
from ..reply import R, Reply

__all__ = ["NO_MAIL_PARAMS", "NO_RCPT_PARAMS", "decode_xtext", "parse_mail_params", "parse_rcpt_params"]

# Shared empty parameter sets: almost every command has no parameters, so do not allocate one each time.
NO_MAIL_PARAMS = MailParams()
NO_RCPT_PARAMS = RcptParams()

# esmtp-keyword = (ALPHA / DIGIT) *(ALPHA / DIGIT / "-"); esmtp-value = 1*(%d33-60 / %d62-126), which
# RFC 6531 widens with UTF-8 octets (checked for validity by the parameters that allow them).
_KEYWORD = re.compile(rb"[A-Za-z0-9][A-Za-z0-9-]*")
_VALUE = re.compile(rb"[\x21-\x3c\x3e-\x7e\x80-\xff]+")
# xtext (RFC 3461 4): "!".."~" except "+" and "=", or "+" and two uppercase hex digits.
_XTEXT = re.compile(rb"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*")
_XTEXT_UTF8 = re.compile(rb"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e\x80-\xff]|\+[0-9A-F]{2})*")
_HEXCHAR = re.compile(rb"\+([0-9A-F]{2})")
# Decoded DSN values must be printable: RFC 3461 4.2 and 4.4 require graphic or space characters.
_UNPRINTABLE = re.compile(rb"[\x00-\x1f\x7f]")

_MAX_ENVID = 100  # RFC 3461 4.4
_MAX_ORCPT = 500  # RFC 3461 4.2 (we apply it to the value as sent, which is never shorter than decoded)
_NOTIFY_WORDS = frozenset((b"SUCCESS", b"FAILURE", b"DELAY"))


def _hex_byte(m: re.Match[bytes]) -> bytes:
    return bytes((int(m.group(1), 16),))


def decode_xtext(value: bytes, *, utf8: bool = False) -> bytes | None:
    """Decode RFC 3461 xtext; None if ``value`` is not xtext. ``utf8`` also admits raw UTF-8 octets."""
    if (_XTEXT_UTF8 if utf8 else _XTEXT).fullmatch(value) is None:
        return None
    return _HEXCHAR.sub(_hex_byte, value) if b"+" in value else value


def _split(word: bytes) -> tuple[bytes, bytes | None] | None:
    """Split ``keyword[=value]``; None when either half breaks the esmtp-param grammar."""
    key, eq, value = word.partition(b"=")
    if _KEYWORD.fullmatch(key) is None:
        return None
    if not eq:
        return key.upper(), None
    if _VALUE.fullmatch(value) is None:
        return None
    return key.upper(), value


def _pairs(words: list[bytes]) -> list[tuple[bytes, bytes | None]] | Reply:
    """Every ``keyword[=value]`` split, or the reply for the first malformed (501) or repeated (555) one."""
    seen: set[bytes] = set()
    pairs = []
    for word in words:
        parts = _split(word)
        if parts is None:
            return R.BAD_ARGS
        if parts[0] in seen:
            return R.PARAM_NOT_IMPLEMENTED
        seen.add(parts[0])
        pairs.append(parts)
    return pairs


def parse_mail_params(
    words: list[bytes], *, max_size: int, max_digits: int, dsn: bool, smtputf8: bool
) -> MailParams | Reply:
    """Parse MAIL FROM parameters: 555 for unknown or repeated ones, 501 for bad values, 552 for SIZE."""
    if not words:
        return NO_MAIL_PARAMS
    pairs = _pairs(words)
    if isinstance(pairs, Reply):
        return pairs
    size: int | None = None
    body: str | None = None
    utf8 = False
    ret: str | None = None
    envid: str | None = None
    requiretls = False
    for key, value in pairs:
        if key == b"SIZE":
            if value is None or not value.isdigit() or len(value) > max_digits:
                return R.BAD_ARGS
            size = int(value)
            if size > max_size:
                return R.MESSAGE_TOO_BIG
        elif key == b"BODY":
            if value is None:
                return R.BAD_ARGS
            upper = value.upper()
            if upper not in (b"7BIT", b"8BITMIME"):
                return R.BAD_ARGS
            body = upper.decode("ascii")
        elif key == b"SMTPUTF8" and smtputf8:
            if value is not None:
                return R.BAD_ARGS
            utf8 = True
        elif key == b"REQUIRETLS":
            if value is not None:
                return R.BAD_ARGS
            requiretls = True
        elif key == b"RET" and dsn:
            if value is None:
                return R.BAD_ARGS
            upper = value.upper()
            if upper not in (b"FULL", b"HDRS"):
                return R.BAD_ARGS
            ret = upper.decode("ascii")
        elif key == b"ENVID" and dsn:
            if value is None or len(value) > _MAX_ENVID:
                return R.BAD_ARGS
            decoded = decode_xtext(value)
            if decoded is None or not decoded.isascii() or _UNPRINTABLE.search(decoded):
                return R.BAD_ARGS
            envid = decoded.decode("ascii")
        else:
            return R.PARAM_NOT_IMPLEMENTED
    return MailParams(size=size, body=body, smtputf8=utf8, ret=ret, envid=envid, requiretls=requiretls)


def _parse_notify(value: bytes) -> tuple[str, ...] | None:
    items = value.upper().split(b",")
    if items == [b"NEVER"]:
        return ("NEVER",)
    if len(set(items)) != len(items) or not _NOTIFY_WORDS.issuperset(items):
        return None
    return tuple(item.decode("ascii") for item in items)


def _parse_orcpt(value: bytes) -> str | None:
    addr_type, semi, text = value.partition(b";")
    kind = addr_type.lower()
    if not semi or not text or len(value) > _MAX_ORCPT or kind not in (b"rfc822", b"utf-8"):
        return None
    # RFC 6533 lets the utf-8 type carry raw UTF-8 (utf-8-addr-unitext); rfc822 is ASCII only.
    decoded = decode_xtext(text, utf8=kind == b"utf-8")
    if decoded is None or _UNPRINTABLE.search(decoded):
        return None
    try:
        address = decoded.decode("utf-8" if kind == b"utf-8" else "ascii")
    except UnicodeDecodeError:
        return None
    return f"{kind.decode('ascii')};{address}"


def parse_rcpt_params(words: list[bytes], *, dsn: bool) -> RcptParams | Reply:
    """Parse RCPT TO parameters (NOTIFY and ORCPT, RFC 3461 4.1-4.2)."""
    if not words:
        return NO_RCPT_PARAMS
    pairs = _pairs(words)
    if isinstance(pairs, Reply):
        return pairs
    notify: tuple[str, ...] = ()
    orcpt: str | None = None
    for key, value in pairs:
        if key == b"NOTIFY" and dsn:
            parsed = None if value is None else _parse_notify(value)
            if parsed is None:
                return R.BAD_ARGS
            notify = parsed
        elif key == b"ORCPT" and dsn:
            orcpt = None if value is None else _parse_orcpt(value)
            if orcpt is None:
                return R.BAD_ARGS
        else:
            return R.PARAM_NOT_IMPLEMENTED
    return RcptParams(notify=notify, orcpt=orcpt)
