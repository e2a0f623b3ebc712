"""Delivery status notifications (RFC 3461, 3464, 6522; RFC 6533 for SMTPUTF8): the bytes of a multipart/report.

Pure: no clock, no queue, no network; the only I/O is reading the original message from the file object given.
Untrusted input: the original message, the remote reply text and the addresses. Control characters (CR and LF
first) are removed from every value before it is written, so nothing from outside starts a header field or a
MIME part of its own, and every line of the result ends in CRLF and is at most 998 octets (RFC 5322 2.1.1).
"""

from __future__ import annotations

import quopri
import re
import secrets
import textwrap
from collections.abc import Iterator, Sequence, Set
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import BinaryIO, Literal

from ..address import canonical_domain

__all__ = ["MAX_HEADER_BYTES", "Action", "DsnRecipient", "build_dsn", "is_bounceable", "should_notify"]

Action = Literal["failed", "delayed", "delivered", "relayed", "expanded"]

MAX_HEADER_BYTES = 1024 * 1024  # the most of the original's header block returned (RET=HDRS, or truncated)

_ACTIONS = ("failed", "delayed", "delivered", "relayed", "expanded")
_SUCCESS = frozenset({"delivered", "relayed", "expanded"})
_NOTIFY_WORD = {
    "failed": "FAILURE",
    "delayed": "DELAY",
    "delivered": "SUCCESS",
    "relayed": "SUCCESS",
    "expanded": "SUCCESS",
}
_FALLBACK_STATUS = {
    "failed": "5.0.0",
    "delayed": "4.0.0",
    "delivered": "2.0.0",
    "relayed": "2.0.0",
    "expanded": "2.0.0",
}

_CRLF = b"\r\n"
_LINE_MAX = 998  # octets, without the CRLF (RFC 5321 4.5.3.1.6, RFC 5322 2.1.1)
_FOLD_AT = 78  # where header-style fields are folded when they can be (RFC 5322 2.1.1 SHOULD)
_TEXT_WIDTH = 76
_CHUNK = 64 * 1024

_STATUS = re.compile(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}")
_SMTP_REPLY = re.compile(r"[2-5][0-9][0-9](?:[ -]|$)")
_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_SURROGATES = re.compile(r"[\ud800-\udfff]")
_SPACES = re.compile(r"\s+")
_EOL = re.compile(rb"\r\n|\r|\n")
_EIGHT_BIT = re.compile(rb"[\x80-\xff]")
_NOT_ID = re.compile(r"[^A-Za-z0-9-]")


@dataclass(frozen=True, slots=True)
class DsnRecipient:
    """What happened to one recipient, as the DSN reports it (RFC 3464 2.3)."""

    final_recipient: str  # the address we tried, e.g. "user@example.test"
    original_recipient: str | None  # ORCPT as stored: "rfc822;user@example.test", or None if not given
    action: Action
    status: str  # enhanced status code (RFC 3463), e.g. "5.1.1"
    remote_mta: str | None  # host name, rendered "dns; mx.example.test"
    diagnostic: str | None  # the remote reply text, e.g. "550 5.1.1 No such user"
    last_attempt: float | None  # epoch seconds -> Last-Attempt-Date
    will_retry_until: float | None  # epoch seconds -> Will-Retry-Until (only written for "delayed")


def is_bounceable(envelope_sender: str) -> bool:
    """False for the null reverse-path: a DSN is never sent about a DSN (RFC 3461 6.2, RFC 5321 4.5.5)."""
    return envelope_sender != ""


def should_notify(notify: tuple[str, ...], action: str) -> bool:
    """Whether RCPT TO NOTIFY (RFC 3461 4.1) asks for a DSN with this action; () means not given."""
    if action not in _NOTIFY_WORD:
        raise ValueError(f"unknown DSN action {action!r}")
    words = {word.upper() for word in notify}
    if "NEVER" in words:
        return False
    if not words:
        # The default is failures, and delays at our discretion (RFC 3461 4.1); we warn about delays.
        return action in ("failed", "delayed")
    return _NOTIFY_WORD[action] in words


def build_dsn(
    *,
    reporting_mta: str,
    queue_id: str,
    envelope_sender: str,
    envid: str | None,
    arrival_date: float,
    recipients: Sequence[DsnRecipient],
    original: BinaryIO | None,
    ret: Literal["FULL", "HDRS"] | None,
    postmaster: str,
    now: float,
    max_original_bytes: int = 10 * 1024 * 1024,
    smtputf8: bool = False,
    message_id_domain: str | None = None,
) -> bytes:
    """Return the DSN message, to be sent from ``<>`` to ``envelope_sender``.

    ``ret`` None returns the full original when a recipient failed and only its headers otherwise; an
    original over ``max_original_bytes`` is returned as headers only. ``smtputf8`` selects the RFC 6533
    types (the DSN must then itself be sent with SMTPUTF8). Raises ValueError for a null or (without
    ``smtputf8``) non-ASCII sender, no recipients, or an unknown action.
    """
    if not is_bounceable(envelope_sender):
        raise ValueError("no DSN is sent to the null reverse-path (RFC 3461 6.2)")
    if not recipients:
        raise ValueError("a DSN needs at least one recipient")
    for rcpt in recipients:
        if rcpt.action not in _ACTIONS:
            raise ValueError(f"unknown DSN action {rcpt.action!r}")
    sender = _strip(envelope_sender)
    if not sender.isascii() and not smtputf8:
        # A To: header cannot carry a non-ASCII address in 7-bit form (RFC 2047 does not apply to addr-spec).
        raise ValueError("a non-ASCII envelope sender needs smtputf8=True (RFC 6531, 6533)")
    mta = _host(reporting_mta)
    if not mta:
        raise ValueError("reporting_mta is empty")
    actions = {rcpt.action for rcpt in recipients}

    returned: _Returned | None = None
    if original is not None:
        want_full = ret == "FULL" or (ret is None and "failed" in actions)
        returned = _read_original(original, want_full=want_full, max_bytes=max_original_bytes)
        if not returned.content:
            returned = None  # an empty original: nothing to attach

    parts = [
        _notification_part(
            mta, queue_id, recipients, returned, _strip(postmaster), arrival_date, now, smtputf8
        ),
        _status_part(mta, envid, arrival_date, recipients, smtputf8),
    ]
    if returned is not None:
        parts.append(_returned_part(returned, actions, smtputf8))
    boundary = _boundary([content for _, content in parts])

    if "failed" in actions:
        subject = "Undelivered Mail Returned to Sender"
    elif "delayed" in actions:
        subject = "Delayed Mail (still being retried)"
    else:
        subject = "Successful Mail Delivery Report"
    id_domain = _host(message_id_domain) if message_id_domain else mta
    qid = _NOT_ID.sub("-", queue_id)[:64] or "dsn"
    report_type = "global-delivery-status" if smtputf8 else "delivery-status"
    eight_bit = any(_EIGHT_BIT.search(headers) or _EIGHT_BIT.search(content) for headers, content in parts)
    out = bytearray()
    for name, value in (
        ("From", f"Mail Delivery System <MAILER-DAEMON@{mta}>"),
        ("To", f"<{sender}>"),
        ("Subject", subject),
        ("Date", _date(now)),
        ("Message-ID", f"<{int(now)}.{qid}.{secrets.token_hex(8)}@{id_domain}>"),
        # RFC 3834: autoresponders and vacation programs must not answer this.
        ("Auto-Submitted", "auto-replied"),
        ("MIME-Version", "1.0"),
        # RFC 6522 3: report-type is the subtype of the second part.
        ("Content-Type", f'multipart/report; report-type={report_type}; boundary="{boundary}"'),
        ("Content-Transfer-Encoding", "8bit" if eight_bit else "7bit"),
    ):
        out += _field(name, value)
    out += _CRLF + b"This is a MIME-encapsulated message." + _CRLF
    delimiter = b"--" + boundary.encode("ascii")
    for headers, content in parts:
        # The CRLF before each delimiter belongs to the delimiter (RFC 2046 5.1.1), not to the part.
        out += _CRLF + delimiter + _CRLF + headers + _CRLF + content
    out += _CRLF + delimiter + b"--" + _CRLF
    return bytes(out)


# --- the three parts -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Returned:
    content: bytes  # CRLF lines, each at most 998 octets
    headers_only: bool
    truncated: bool  # the full message was wanted but was too large


def _notification_part(
    mta: str,
    queue_id: str,
    recipients: Sequence[DsnRecipient],
    returned: _Returned | None,
    postmaster: str,
    arrival_date: float,
    now: float,
    smtputf8: bool,
) -> tuple[bytes, bytes]:
    failed = [r for r in recipients if r.action == "failed"]
    delayed = [r for r in recipients if r.action == "delayed"]
    succeeded = [r for r in recipients if r.action in _SUCCESS]
    paras: list[str] = [f"This is the mail system at host {mta}."]
    if failed:
        attached = ""
        if returned is not None and returned.truncated:
            attached = " The message was too large to return in full; its headers are attached below."
        elif returned is not None:
            attached = (
                " Its headers are attached below." if returned.headers_only else " It's attached below."
            )
        paras.append(
            "I'm sorry to have to inform you that your message could not be delivered to one or more "
            "recipients." + attached
        )
    elif delayed:
        paras.append(
            "####################################################################\n"
            "# THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE. #\n"
            "####################################################################"
        )
    if delayed:
        until = [r.will_retry_until for r in delayed if r.will_retry_until is not None]
        hours = max(0.0, now - arrival_date) / 3600
        text = f"Your message could not yet be delivered to {_count(len(delayed))} after {hours:.1f} hours."
        text += (
            f" The mail system will keep trying until {_date(max(until))}."
            if until
            else " The mail system will keep trying."
        )
        paras.append(text + " No action is needed on your part.")
    if succeeded and not failed and not delayed:
        paras.append(
            "Your message was successfully delivered to the destination(s) listed below. If the message "
            "was delivered to a mailbox you will receive no further notifications. Otherwise you may still "
            "receive notifications of mail delivery errors from other systems."
        )
    paras.append(
        f"For further assistance, please send mail to <{postmaster}>."
        if postmaster
        else "For further assistance, please send mail to the postmaster."
    )
    if failed and returned is not None:
        paras.append(
            "If you do so, please include this problem report. You can delete your own text from the "
            "attached returned message."
        )
    paras.append("                   The mail system")

    groups = [
        (g, title)
        for g, title in (
            (failed, "Delivery to these recipients failed:"),
            (delayed, "Delivery to these recipients is delayed and will be retried:"),
            (succeeded, "Delivery to these recipients succeeded:"),
        )
        if g
    ]
    for group, title in groups:
        if len(groups) > 1:
            paras.append(title)
        # Recipient entries hang-indent their continuation lines, as Postfix's do; the "<" marks an entry.
        paras.extend(_entry(r) for r in group)
    paras.append(f"(Queue ID {_clean(queue_id, ascii_only=True)}.)")

    prose = textwrap.TextWrapper(width=_TEXT_WIDTH, break_long_words=True, break_on_hyphens=False)
    entry = textwrap.TextWrapper(
        width=_TEXT_WIDTH, subsequent_indent="    ", break_long_words=True, break_on_hyphens=False
    )
    lines: list[str] = []
    for para in paras:
        for line in para.split("\n"):
            # The banner and the signature keep their layout; they are short.
            wrapper = entry if line.startswith("<") else prose
            lines.extend(wrapper.wrap(line) if len(line) > _TEXT_WIDTH else [line])
        lines.append("")
    body = "\n".join(lines).encode("utf-8")
    if body.isascii():
        cte = "7bit"
    elif smtputf8:
        cte = "8bit"
    else:
        # Keeps the notification 7-bit, so only the returned original can need 8BITMIME.
        cte = "quoted-printable"
        body = quopri.encodestring(body, quotetabs=False)
    headers = (
        _field("Content-Description", "Notification")
        + _field("Content-Type", "text/plain; charset=utf-8")
        + _field("Content-Transfer-Encoding", cte)
    )
    return headers, body.replace(b"\n", _CRLF)


def _entry(rcpt: DsnRecipient) -> str:
    address = _clean(rcpt.final_recipient, ascii_only=False)
    diagnostic = _clean(rcpt.diagnostic or "", ascii_only=False)
    host = _host(rcpt.remote_mta) if rcpt.remote_mta else ""
    if rcpt.action in _SUCCESS:
        what = {
            "delivered": "delivered",
            "relayed": "relayed to a system that sends no delivery notifications",
            "expanded": "delivered to a list or alias",
        }[rcpt.action]
        via = f" via {host}" if host else ""
        return f"<{address}>: {what}{via}" + (f": {diagnostic}" if diagnostic else "")
    if host and diagnostic:
        return f"<{address}>: host {host} said: {diagnostic}"
    if diagnostic:
        return f"<{address}>: {diagnostic}"
    what = "delivery failed" if rcpt.action == "failed" else "delivery temporarily failed"
    return f"<{address}>: {what} (status {_status(rcpt)})"


def _status_part(
    mta: str, envid: str | None, arrival_date: float, recipients: Sequence[DsnRecipient], smtputf8: bool
) -> tuple[bytes, bytes]:
    ascii_only = not smtputf8
    body = bytearray()
    if envid:
        body += _field("Original-Envelope-Id", _clean(envid, ascii_only=ascii_only))
    body += _field("Reporting-MTA", f"dns; {mta}")
    body += _field("Arrival-Date", _date(arrival_date))
    for rcpt in recipients:
        body += _CRLF
        if rcpt.original_recipient:
            body += _field("Original-Recipient", _orcpt(rcpt.original_recipient, smtputf8))
        body += _field("Final-Recipient", _typed_address(rcpt.final_recipient, smtputf8))
        body += _field("Action", rcpt.action)
        body += _field("Status", _status(rcpt))
        if rcpt.remote_mta and (host := _host(rcpt.remote_mta)):
            body += _field("Remote-MTA", f"dns; {host}")
        if rcpt.diagnostic and (text := _clean(rcpt.diagnostic, ascii_only=ascii_only)):
            # "smtp" is for SMTP replies (RFC 3464 2.3.6); anything else is our own explanation.
            kind = "smtp" if _SMTP_REPLY.match(text) else "X-mailhop"
            body += _field("Diagnostic-Code", f"{kind}; {text}")
        if rcpt.last_attempt is not None:
            body += _field("Last-Attempt-Date", _date(rcpt.last_attempt))
        if rcpt.action == "delayed" and rcpt.will_retry_until is not None:
            body += _field("Will-Retry-Until", _date(rcpt.will_retry_until))
    content = bytes(body)
    headers = _field("Content-Description", "Delivery report") + _field(
        "Content-Type", "message/global-delivery-status" if smtputf8 else "message/delivery-status"
    )
    if _EIGHT_BIT.search(content):
        headers += _field("Content-Transfer-Encoding", "8bit")
    return headers, content


def _returned_part(returned: _Returned, actions: Set[str], smtputf8: bool) -> tuple[bytes, bytes]:
    undelivered = "Undelivered " if actions & {"failed", "delayed"} else ""
    if returned.headers_only:
        description = f"{undelivered}Message Headers"
        ctype = "message/global-headers" if smtputf8 else "text/rfc822-headers"  # RFC 6533 6.3
    else:
        description = f"{undelivered}Message"
        ctype = "message/global" if smtputf8 else "message/rfc822"
    headers = _field("Content-Description", description) + _field("Content-Type", ctype)
    if _EIGHT_BIT.search(returned.content):
        # message/* allows no encoding but 7bit/8bit/binary (RFC 2046 5.2.1), so it is labelled, not encoded;
        # the DSN then needs BODY=8BITMIME, as the original did.
        headers += _field("Content-Transfer-Encoding", "8bit")
    return headers, returned.content


# --- reading the original --------------------------------------------------------------------------------


def _read_original(fp: BinaryIO, *, want_full: bool, max_bytes: int) -> _Returned:
    """Read the original as CRLF lines: all of it if wanted and it fits, else its header block."""
    header = bytearray()
    header_done = False  # the blank line was seen, or the header block passed MAX_HEADER_BYTES
    in_header = True
    body: bytearray | None = bytearray() if want_full else None
    truncated = False
    for piece, continued in _pieces(fp):
        if in_header:
            if not piece and not continued:
                in_header = False
                header_done = True
            elif not header_done:
                # A header line cut for length goes on as a folded continuation, so it stays a header.
                line = (b" " + piece if continued else piece) + _CRLF
                if len(header) + len(line) > MAX_HEADER_BYTES:
                    header_done = True
                else:
                    header += line
        if body is not None:
            line = (b" " + piece if continued and in_header else piece) + _CRLF
            if len(body) + len(line) > max_bytes:
                body = None
                truncated = True
            else:
                body += line
        if body is None and header_done:
            break
    if body is not None:
        return _Returned(bytes(body), headers_only=False, truncated=False)
    return _Returned(bytes(header), headers_only=True, truncated=truncated)


def _pieces(fp: BinaryIO) -> Iterator[tuple[bytes, bool]]:
    """Lines of ``fp`` without their ends (CRLF, bare LF or bare CR), cut to fit 997 octets.

    Yields ``(piece, continued)``: ``continued`` when the piece goes on a line cut for length. 997 leaves
    room for the space that folds a cut header line.
    """
    limit = _LINE_MAX - 1
    buf = b""
    continued = False
    while True:
        chunk = fp.read(_CHUNK)
        eof = not chunk
        buf += chunk
        pos = 0
        m = _EOL.search(buf)
        while True:
            end = m.start() if m else len(buf)
            if end - pos > limit:
                cut = _utf8_cut(buf, pos, pos + limit)
                yield buf[pos:cut], continued
                continued, pos = True, cut
            elif m is not None and (eof or m.end() < len(buf) or m.group() != b"\r"):
                # A CR at the very end may be the first half of a CRLF: wait for the next chunk.
                yield buf[pos:end], continued
                continued, pos = False, m.end()
                # Searched again only once the line end is used, so a long line is not rescanned per cut.
                m = _EOL.search(buf, pos)
            else:
                break
        buf = buf[pos:]
        if eof:
            if buf:
                yield buf, continued
            return


def _utf8_cut(buf: bytes, start: int, cut: int) -> int:
    """Move a cut back off UTF-8 continuation octets (at most 3), so a character is not split."""
    for back in range(4):
        i = cut - back
        if i <= start:
            break
        if buf[i] & 0xC0 != 0x80:
            return i
    return cut


# --- fields and values -----------------------------------------------------------------------------------


def _field(name: str, value: str) -> bytes:
    """``Name: value`` with CRLF, folded at spaces near 78 octets and never over 998 (RFC 5322 2.2.3)."""
    line = f"{name}: {value}".encode()
    lines: list[bytes] = []
    while len(line) > _FOLD_AT:
        cut = line.rfind(b" ", 1, _FOLD_AT + 1)
        if cut <= 0:
            cut = line.find(b" ", _FOLD_AT + 1)
        if 0 < cut <= _LINE_MAX:
            lines.append(line[:cut])
            line = line[cut:]
        elif len(line) > _LINE_MAX:
            # One word longer than a line: it has to be cut, which unfolds with a space in it.
            cut = _utf8_cut(line, 0, _LINE_MAX)
            lines.append(line[:cut])
            line = b" " + line[cut:]
        else:
            break
    lines.append(line)
    return _CRLF.join(lines) + _CRLF


def _strip(text: str) -> str:
    """Remove control characters; lone surrogates (from surrogateescape) become U+FFFD."""
    return _CONTROLS.sub("", _SURROGATES.sub("\ufffd", text)).strip()


def _clean(text: str, *, ascii_only: bool) -> str:
    """Free text on one line: controls (a multi-line reply's CRLFs too) become single spaces."""
    text = _SPACES.sub(" ", _CONTROLS.sub(" ", _SURROGATES.sub("\ufffd", text))).strip()
    return text.encode("ascii", "replace").decode("ascii") if ascii_only else text


def _host(name: str) -> str:
    """A host name as a 7-bit dns-type value: A-labels for an IDN, '?' for what cannot be one."""
    host = _SPACES.sub("", _strip(name))
    if host.isascii():
        return host
    try:
        return canonical_domain(host)
    except ValueError:
        return host.encode("ascii", "replace").decode("ascii")


def _typed_address(address: str, smtputf8: bool) -> str:
    """``rfc822; addr`` for ASCII, else ``utf-8;`` raw (global) or as utf-8-addr-xtext (RFC 6533 3)."""
    addr = _strip(address)
    if addr.isascii():
        return f"rfc822; {addr}"
    if smtputf8:
        return f"utf-8; {addr}"
    return "utf-8; " + "".join(ch if "!" <= ch <= "~" and ch not in "+=\\" else _embedded(ch) for ch in addr)


def _orcpt(orcpt: str, smtputf8: bool) -> str:
    """The ORCPT as stored, type kept; non-ASCII escaped where the part must stay 7-bit (RFC 6533 3)."""
    kind, semi, addr = _strip(orcpt).partition(";")
    if not semi:
        kind, addr = "rfc822", kind
    kind = kind.strip() if kind.strip().isascii() and kind.strip() else "rfc822"
    if addr.isascii():
        return f"{kind};{addr}"
    if smtputf8:
        return f"utf-8;{addr}"
    # A stored utf-8 ORCPT is utf-8-addr-unitext (its ASCII specials already \x{..}), so escaping just the
    # non-ASCII characters turns it into utf-8-addr-xtext without escaping twice.
    return "utf-8;" + "".join(ch if ch.isascii() else _embedded(ch) for ch in addr)


def _embedded(ch: str) -> str:
    """RFC 6533 EmbeddedUnicodeChar: ``\\x{HEXPOINT}``, upper case, no leading zeros beyond two digits."""
    return f"\\x{{{ord(ch):02X}}}"


def _status(rcpt: DsnRecipient) -> str:
    # A malformed code must not cost the sender the notification: fall back to the action's class.
    status = rcpt.status.strip()
    return status if _STATUS.fullmatch(status) else _FALLBACK_STATUS[rcpt.action]


def _date(epoch: float) -> str:
    return format_datetime(datetime.fromtimestamp(epoch, UTC))


def _count(n: int) -> str:
    return "1 recipient" if n == 1 else f"{n} recipients"


def _boundary(contents: Sequence[bytes]) -> str:
    """A MIME boundary that occurs in no part.

    192 random bits: the sender of the original cannot guess it (it is drawn after the original was read),
    and chance collision is ~2**-192 per position. "=_" cannot occur in quoted-printable or base64 text, so
    encoded parts never hold it either. Since the parts are in memory anyway, it is also checked.
    """
    while True:
        boundary = "=_mailhop_" + secrets.token_hex(24)
        marker = boundary.encode("ascii")
        if not any(marker in content for content in contents):
            return boundary
