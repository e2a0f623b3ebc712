"""The sans-IO SMTP client core: reply parsing, EHLO capabilities and command building (RFC 5321, 1869).

Untrusted input: every byte a remote server sends, via ``ReplyParser.feed``. Replies are bounded (line
length, lines per reply) so a hostile server can make us refuse it but never buffer without limit, and
their text is stripped of control characters before it reaches logs, queue state and DSNs.

Commands are built from our own data (queue state), but that data came from clients once: every builder
refuses CR, LF and NUL in its arguments, so nothing stored can inject a command line.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable
from dataclasses import dataclass

from ..reply import Reply
from .encode import xtext

__all__ = [
    "NO_CAPABILITIES",
    "Capabilities",
    "CommandError",
    "ReplyError",
    "ReplyParser",
    "auth_login_response",
    "auth_login_start",
    "auth_plain",
    "bdat",
    "data",
    "ehlo",
    "helo",
    "lhlo",
    "mail",
    "noop",
    "parse_ehlo",
    "quit",
    "rcpt",
    "rset",
    "starttls",
]

MAX_REPLY_LINE = 2048  # octets without CRLF; RFC 5321 4.5.3.1.5 says 512, real servers exceed it
MAX_REPLY_LINES = 100

# Reply-code: 2-5, then two digits; then "-" (more lines follow), " " or nothing (the last line).
_LINE = re.compile(rb"([2-5][0-9][0-9])([- ]?)")
# An enhanced status code (RFC 3463): class.subject.detail, then a space or the end of the text.
_ENHANCED = re.compile(r"([245])\.([0-9]{1,3})\.([0-9]{1,3})(?: |$)")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_BAD_ARG = re.compile(r"[\r\n\x00]")


class ReplyError(ValueError):
    """The server sent something that is not a well-formed, reasonably sized reply."""


class CommandError(ValueError):
    """A command argument cannot be sent (CR, LF or NUL in it, or non-ASCII without SMTPUTF8)."""


class ReplyParser:
    """Turns server bytes into ``Reply`` objects, one complete (possibly multi-line) reply at a time.

    Between calls it holds at most one unterminated line (``max_line`` octets) plus the lines of the
    reply being assembled (at most ``max_lines``); a longer line is refused as soon as it is seen. Lines end in LF; a CR before it is
    dropped (servers that send bare LF are common and harmless here).
    """

    __slots__ = ("_buf", "_code", "_held", "_lines", "max_line", "max_lines")

    def __init__(self, *, max_line: int = MAX_REPLY_LINE, max_lines: int = MAX_REPLY_LINES) -> None:
        self.max_line = max_line
        self.max_lines = max_lines
        self._buf = bytearray()
        self._code = b""
        self._lines: list[str] = []
        self._held = 0  # raw octets (code, text, line end) of the lines in _lines

    @property
    def buffered(self) -> int:
        """Octets received and not yet part of a returned reply (raw: a pending ``250-`` line counts)."""
        return len(self._buf) + self._held

    def discard(self) -> int:
        """Drop everything buffered (after STARTTLS's 220: plaintext must not survive); octets dropped."""
        n = self.buffered
        self._buf.clear()
        self._lines.clear()
        self._code = b""
        self._held = 0
        return n

    def feed(self, data: bytes) -> list[Reply]:
        """Add received bytes; the replies they completed, in order. ReplyError on a malformed reply."""
        buf = self._buf
        scan = len(buf)  # the buffer holds no LF: search only the new bytes
        buf += data
        limit = self.max_line + 1  # +1: the CR of the CRLF
        replies: list[Reply] = []
        pos = 0
        while True:
            nl = buf.find(b"\n", scan)
            if nl < 0:
                break
            if nl - pos > limit:
                raise ReplyError(f"reply line longer than {self.max_line} octets")
            end = nl - 1 if nl > pos and buf[nl - 1] == 0x0D else nl
            reply = self._line(bytes(buf[pos:end]))
            self._held = 0 if reply is not None else self._held + nl + 1 - pos
            pos = scan = nl + 1
            if reply is not None:
                replies.append(reply)
        if pos:
            del buf[:pos]
        if len(buf) > limit:
            raise ReplyError(f"reply line longer than {self.max_line} octets")
        return replies

    def _line(self, line: bytes) -> Reply | None:
        if len(line) > self.max_line:
            raise ReplyError(f"reply line longer than {self.max_line} octets")
        m = _LINE.match(line)
        if m is None or (not m.group(2) and len(line) > 3):
            raise ReplyError(f"malformed reply line {line[:40]!r}")
        code = m.group(1)
        if self._code and code != self._code:
            raise ReplyError(f"reply code changed from {self._code.decode()} to {code.decode()} mid-reply")
        if len(self._lines) >= self.max_lines:
            raise ReplyError(f"reply longer than {self.max_lines} lines")
        self._code = code
        self._lines.append(_clean(line[4:]))
        if m.group(2) == b"-":
            return None
        lines, self._lines, self._code = self._lines, [], b""
        return _reply(int(code), lines)


def _clean(raw: bytes) -> str:
    # UTF-8 is legitimate (RFC 6531 servers); control characters never are and must not reach DSN headers.
    return _CONTROL.sub(" ", raw.decode("utf-8", "replace"))


def _reply(code: int, lines: list[str]) -> Reply:
    # RFC 3463 / 2034: the enhanced code leads every line; it is split off when it matches the reply class.
    m = _ENHANCED.match(lines[0])
    if m is None or m.group(1) != str(code)[0]:
        return Reply(code, "", lines[0], tuple(lines[1:]))
    enhanced = m.group(0).rstrip(" ")
    prefix = enhanced + " "
    rest = tuple(
        line[len(prefix) :] if line.startswith(prefix) else "" if line == enhanced else line for line in lines[1:]
    )
    return Reply(code, enhanced, lines[0][len(prefix) :], rest)


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a server's EHLO reply advertised. ``size``: None if SIZE is not advertised, 0 if no limit."""

    pipelining: bool = False
    size: int | None = None
    eightbitmime: bool = False
    smtputf8: bool = False
    dsn: bool = False
    chunking: bool = False
    starttls: bool = False
    enhancedstatuscodes: bool = False
    auth: frozenset[str] = frozenset()
    keywords: frozenset[str] = frozenset()


NO_CAPABILITIES = Capabilities()  # HELO: plain RFC 5321, no extensions


def parse_ehlo(reply: Reply) -> Capabilities:
    """Capabilities from a 250 EHLO (or LHLO) reply: one keyword and its parameters per line after the first."""
    keywords: set[str] = set()
    size: int | None = None
    auth: set[str] = set()
    for line in reply.extra:
        words = line.split()
        if not words:
            continue
        keyword = words[0].upper()
        keywords.add(keyword)
        if keyword == "SIZE":
            # isascii(): str.isdigit() also accepts digits like "²" that int() refuses.
            arg = words[1] if len(words) > 1 else ""
            size = int(arg) if arg.isascii() and arg.isdigit() and len(arg) < 20 else 0
        elif keyword == "AUTH":
            auth.update(w.upper() for w in words[1:])
    return Capabilities(
        pipelining="PIPELINING" in keywords,
        size=size,
        eightbitmime="8BITMIME" in keywords,
        smtputf8="SMTPUTF8" in keywords,
        dsn="DSN" in keywords,
        chunking="CHUNKING" in keywords,
        starttls="STARTTLS" in keywords,
        enhancedstatuscodes="ENHANCEDSTATUSCODES" in keywords,
        auth=frozenset(auth),
        keywords=frozenset(keywords),
    )


def _check(value: str, what: str, *, utf8: bool = False) -> str:
    if _BAD_ARG.search(value) is not None:
        raise CommandError(f"CR, LF or NUL in {what}")
    if not utf8 and not value.isascii():
        raise CommandError(f"non-ASCII {what} without SMTPUTF8")
    return value


def _line(*words: str) -> bytes:
    try:
        return (" ".join(words) + "\r\n").encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate: not text we can send
        raise CommandError("argument is not valid Unicode") from exc


def _name(name: str) -> str:
    _check(name, "EHLO name")
    if not name or " " in name or "\t" in name:
        raise CommandError("EHLO name must be one non-empty word")
    return name


def ehlo(name: str) -> bytes:
    return _line("EHLO", _name(name))


def helo(name: str) -> bytes:
    return _line("HELO", _name(name))


def lhlo(name: str) -> bytes:
    return _line("LHLO", _name(name))


def mail(
    sender: str,
    *,
    caps: Capabilities,
    size: int | None = None,
    body: str | None = None,
    smtputf8: bool = False,
    ret: str | None = None,
    envid: str | None = None,
) -> bytes:
    """MAIL FROM with the parameters the server supports; the rest are left out."""
    utf8 = smtputf8 and caps.smtputf8
    words = [f"FROM:<{_check(sender, 'sender', utf8=utf8)}>"]
    if size is not None and caps.size is not None:
        words.append(f"SIZE={int(size)}")
    if body in ("7BIT", "8BITMIME") and caps.eightbitmime:
        words.append(f"BODY={body}")
    if utf8:
        words.append("SMTPUTF8")
    if caps.dsn:
        if ret in ("FULL", "HDRS"):
            words.append(f"RET={ret}")
        if envid:
            words.append(f"ENVID={xtext(_check(envid, 'ENVID').encode('ascii'))}")
    return _line("MAIL", *words)


def _orcpt(value: str, utf8: bool) -> str:
    addr_type, _, address = value.partition(";")
    _check(value, "ORCPT", utf8=True)
    kind = addr_type.lower()
    if kind == "utf-8":
        if utf8:  # utf-8-addr-unitext (RFC 6533 3): raw UTF-8, xtext for the rest
            return "utf-8;" + "".join(c if ord(c) > 0x7F else xtext(c.encode("ascii")) for c in address)
        # utf-8-addr-xtext: non-ASCII as \x{HEX}, then xtext
        escaped = "".join(f"\\x{{{ord(c):X}}}" if ord(c) > 0x7F else c for c in address)
        return "utf-8;" + xtext(escaped.encode("ascii"))
    _check(address, "ORCPT")
    return f"{_check(addr_type, 'ORCPT type')};{xtext(address.encode('ascii'))}"


def rcpt(
    address: str,
    *,
    caps: Capabilities,
    smtputf8: bool = False,
    notify: Iterable[str] = (),
    orcpt: str | None = None,
) -> bytes:
    """RCPT TO; NOTIFY and ORCPT (xtext) only when the server supports DSN."""
    utf8 = smtputf8 and caps.smtputf8
    words = [f"TO:<{_check(address, 'recipient', utf8=utf8)}>"]
    if caps.dsn:
        notify = tuple(notify)
        if notify:
            words.append("NOTIFY=" + ",".join(_check(n, "NOTIFY").upper() for n in notify))
        if orcpt:
            words.append("ORCPT=" + _orcpt(orcpt, utf8))
    return _line("RCPT", *words)


def data() -> bytes:
    return b"DATA\r\n"


def bdat(size: int, last: bool = False) -> bytes:
    if size < 0:
        raise CommandError("negative BDAT size")
    return f"BDAT {size}{' LAST' if last else ''}\r\n".encode("ascii")


def rset() -> bytes:
    return b"RSET\r\n"


def noop() -> bytes:
    return b"NOOP\r\n"


def quit() -> bytes:
    return b"QUIT\r\n"


def starttls() -> bytes:
    return b"STARTTLS\r\n"


def _b64(value: bytes) -> str:
    return base64.b64encode(value).decode("ascii") or "="


def auth_plain(user: str, password: str) -> bytes:
    """AUTH PLAIN with the initial response (RFC 4616): empty authzid, authcid, password."""
    for value, what in ((user, "user name"), (password, "password")):
        if "\x00" in value:
            raise CommandError(f"NUL in {what}")
    return _line("AUTH", "PLAIN", _b64(b"\0" + user.encode("utf-8") + b"\0" + password.encode("utf-8")))


def auth_login_start() -> bytes:
    return b"AUTH LOGIN\r\n"


def auth_login_response(value: str) -> bytes:
    """The answer to one AUTH LOGIN challenge (334): the user name, then the password, base64."""
    if "\x00" in value:
        raise CommandError("NUL in AUTH LOGIN response")
    return _line(_b64(value.encode("utf-8")))
