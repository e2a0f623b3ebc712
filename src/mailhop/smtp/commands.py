"""Parse one SMTP command line into a typed command or the error Reply to send (RFC 5321 4.1).

Untrusted input: one client command line, raw bytes with the CRLF already removed and its length already
bounded by the framing in server.py. Parsing never raises: any byte string yields a command or a Reply.
"""

from __future__ import annotations

import binascii
import re
from collections.abc import Callable
from dataclasses import dataclass

from ..address import AddressError, Mailbox, parse_path
from ..envelope import Recipient
from ..reply import R, Reply
from .events import AuthStart, Ehlo, Mail, Quit, Rcpt, StartTls
from .limits import Limits
from .params import parse_mail_params, parse_rcpt_params
from .sasl import AuthReply

__all__ = [
    "FORBIDDEN_VERBS",
    "Bdat",
    "Command",
    "CommandParser",
    "Data",
    "Forbidden",
    "Help",
    "Noop",
    "Rset",
    "Vrfy",
]


@dataclass(frozen=True, slots=True)
class Data:
    """DATA."""


@dataclass(frozen=True, slots=True)
class Bdat:
    """BDAT <size> [LAST] (RFC 3030); exactly ``size`` raw octets follow the command line."""

    size: int
    last: bool


@dataclass(frozen=True, slots=True)
class Rset:
    """RSET."""


@dataclass(frozen=True, slots=True)
class Noop:
    """NOOP [arg]."""


@dataclass(frozen=True, slots=True)
class Vrfy:
    """VRFY arg; the argument is never looked up (we answer 252), so it is not kept."""


@dataclass(frozen=True, slots=True)
class Help:
    """HELP [arg]."""


@dataclass(frozen=True, slots=True)
class Forbidden:
    """A verb no SMTP client sends (HTTP, POP3): the peer is something else, so close without replying."""

    verb: str


Command = Ehlo | Mail | Rcpt | Data | Bdat | Rset | Noop | Quit | Vrfy | Help | StartTls | AuthStart | Forbidden

# Postfix's smtpd_forbidden_commands precedent, plus PUT/HEAD (HTTP) and USER (POP3).
FORBIDDEN_VERBS = frozenset((b"GET", b"POST", b"CONNECT", b"PUT", b"HEAD", b"USER"))
# Recognised so the client learns "not here" (502) rather than "not SMTP" (500). AUTH is parsed instead
# when the listener offers mechanisms.
_UNIMPLEMENTED = frozenset((b"TURN", b"ETRN", b"EXPN", b"SEND", b"SOML", b"SAML", b"AUTH"))

# Commands without fields are immutable singletons: no allocation per command.
_DATA = Data()
_RSET = Rset()
_NOOP = Noop()
_QUIT = Quit()
_VRFY = Vrfy()
_HELP = Help()
_STARTTLS = StartTls()

# A path in angle brackets; a quoted local part may contain ">" or spaces. Alternatives start with
# disjoint characters, so matching is linear.
_PATH = re.compile(rb'<(?:[^<>"\\]|\\.|"(?:[^"\\]|\\.)*")*>', re.S)
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")
# RFC 4422 3.1 / RFC 4954 4: sasl-mech = 1*20(UPPER-ALPHA / DIGIT / "-" / "_"); clients may use any case.
_SASL_MECH = re.compile(rb"[A-Za-z0-9_-]{1,20}")

# Parsed paths, shared by all connections: parse_path is a pure function and by far the costliest step
# of MAIL and RCPT, and relays see the same senders and recipients again and again. Values are immutable
# (Mailbox or a catalogue Reply); the cache is bounded by clearing it when full.
_PATH_CACHE: dict[tuple[bytes, bool, bool], Mailbox | Reply] = {}
_PATH_CACHE_MAX = 2048


def _parse_path(path: bytes, smtputf8: bool, sender: bool) -> Mailbox | Reply | None:
    """The mailbox for ``<path>`` (None for a null sender) or the error reply for MAIL/RCPT."""
    if path == b"<>":
        return None if sender else R.BAD_RCPT_SYNTAX
    key = (path, smtputf8, sender)
    result = _PATH_CACHE.get(key)
    if result is None:
        result = _parse_path_uncached(path, smtputf8, sender)
        if len(_PATH_CACHE) >= _PATH_CACHE_MAX:
            _PATH_CACHE.clear()
        _PATH_CACHE[key] = result
    return result


def _parse_path_uncached(path: bytes, smtputf8: bool, sender: bool) -> Mailbox | Reply:
    bad = R.BAD_SENDER_SYNTAX if sender else R.BAD_RCPT_SYNTAX
    if path.isascii():
        text = path.decode("ascii")
    elif not smtputf8:
        return R.SMTPUTF8_REQUIRED
    else:
        try:
            text = path.decode("utf-8")
        except UnicodeDecodeError:
            return bad
    try:
        mailbox = parse_path(text, smtputf8=smtputf8, allow_null=False)
    except AddressError:
        return bad
    return bad if mailbox is None else mailbox


class CommandParser:
    """Parses command lines for one connection; holds the limits and offered extensions it depends on."""

    __slots__ = ("_dispatch", "_dsn", "_max_digits", "_max_size", "_smtputf8")

    def __init__(self, limits: Limits, *, dsn: bool = True, smtputf8: bool = True, auth: bool = False) -> None:
        self._max_size = limits.max_message_size
        self._max_digits = limits.max_bdat_digits
        self._dsn = dsn
        self._smtputf8 = smtputf8
        self._dispatch: dict[bytes, Callable[[bytes, bool], Command | Reply]] = {
            b"EHLO": self._ehlo,
            b"HELO": self._helo,
            b"MAIL": self._mail,
            b"RCPT": self._rcpt,
            b"DATA": self._data,
            b"BDAT": self._bdat,
            b"RSET": self._rset,
            b"NOOP": self._noop,
            b"QUIT": self._quit,
            b"VRFY": self._vrfy,
            b"HELP": self._help,
            b"STARTTLS": self._starttls,
        }
        if auth:
            self._dispatch[b"AUTH"] = self._auth

    def parse(self, line: bytes, smtputf8_tx: bool = False) -> Command | Reply:
        """Parse ``line`` (no CRLF). ``smtputf8_tx``: the current MAIL FROM carried SMTPUTF8."""
        # Trailing blanks are common from hand-typed sessions and harmless to drop.
        line = line.rstrip(b" \t")
        sp = line.find(b" ")
        if sp < 0:
            verb, args = line.upper(), b""
        else:
            verb, args = line[:sp].upper(), line[sp + 1 :]
        handler = self._dispatch.get(verb)
        if handler is not None:
            return handler(args, smtputf8_tx)
        if verb in FORBIDDEN_VERBS:
            return Forbidden(verb.decode("ascii"))
        if verb in _UNIMPLEMENTED:
            return R.NOT_IMPLEMENTED
        return R.SYNTAX

    # -- HELO/EHLO ----------------------------------------------------------------------------------

    @staticmethod
    def _hostname(args: bytes) -> str | None:
        # Lenient: any printable argument is accepted (clients send bare hostnames, literals without
        # brackets, even words), but control characters would travel on into Received headers.
        text = args.strip(b" ")
        if not text or _CONTROL.search(text):
            return None
        try:
            return text.decode("utf-8")
        except UnicodeDecodeError:
            return None

    def _ehlo(self, args: bytes, _utf8: bool) -> Command | Reply:
        name = self._hostname(args)
        return R.BAD_ARGS if name is None else Ehlo(name, True)

    def _helo(self, args: bytes, _utf8: bool) -> Command | Reply:
        name = self._hostname(args)
        return R.BAD_ARGS if name is None else Ehlo(name, False)

    # -- MAIL/RCPT ----------------------------------------------------------------------------------

    @staticmethod
    def _split_path(args: bytes, prefix: bytes) -> tuple[bytes, list[bytes]] | None:
        """Split ``FROM:<path> params``; a space after the colon is tolerated, as Postfix does."""
        if args[: len(prefix)].upper() != prefix:
            return None
        rest = args[len(prefix) :].lstrip(b" ")
        m = _PATH.match(rest)
        if m is None:
            return None
        end = m.end()
        if end < len(rest) and rest[end] != 0x20:
            return None
        return m.group(), rest[end:].split()

    def _mail(self, args: bytes, _utf8: bool) -> Command | Reply:
        split = self._split_path(args, b"FROM:")
        if split is None:
            return R.BAD_SENDER_SYNTAX if args[:5].upper() == b"FROM:" else R.BAD_ARGS
        path, words = split
        params = parse_mail_params(
            words, max_size=self._max_size, max_digits=self._max_digits, dsn=self._dsn, smtputf8=self._smtputf8
        )
        if isinstance(params, Reply):
            return params
        sender = _parse_path(path, params.smtputf8, True)
        return sender if isinstance(sender, Reply) else Mail(sender, params)

    def _rcpt(self, args: bytes, smtputf8_tx: bool) -> Command | Reply:
        split = self._split_path(args, b"TO:")
        if split is None:
            return R.BAD_RCPT_SYNTAX if args[:3].upper() == b"TO:" else R.BAD_ARGS
        path, words = split
        params = parse_rcpt_params(words, dsn=self._dsn)
        if isinstance(params, Reply):
            return params
        mailbox = _parse_path(path, smtputf8_tx, False)
        if mailbox is None:  # pragma: no cover - the null path is refused for recipients
            return R.BAD_RCPT_SYNTAX
        return mailbox if isinstance(mailbox, Reply) else Rcpt(Recipient(mailbox, params))

    # -- the rest -----------------------------------------------------------------------------------

    def _bdat(self, args: bytes, _utf8: bool) -> Command | Reply:
        words = args.split()
        if not 1 <= len(words) <= 2:
            return R.BAD_BDAT_CHUNK
        size = words[0]
        # Bounded digit count before int(): a megabyte of digits must not cost a quadratic conversion.
        if not size.isdigit() or len(size) > self._max_digits:
            return R.BAD_BDAT_CHUNK
        if len(words) == 2 and words[1].upper() != b"LAST":
            return R.BAD_BDAT_CHUNK
        return Bdat(int(size), len(words) == 2)

    @staticmethod
    def _data(args: bytes, _utf8: bool) -> Command | Reply:
        return R.BAD_ARGS if args.strip(b" ") else _DATA

    @staticmethod
    def _rset(args: bytes, _utf8: bool) -> Command | Reply:
        return R.BAD_ARGS if args.strip(b" ") else _RSET

    @staticmethod
    def _quit(args: bytes, _utf8: bool) -> Command | Reply:
        return R.BAD_ARGS if args.strip(b" ") else _QUIT

    @staticmethod
    def _starttls(args: bytes, _utf8: bool) -> Command | Reply:
        # RFC 3207 4: "501 Syntax error (no parameters allowed)".
        return R.BAD_ARGS if args.strip(b" ") else _STARTTLS

    @staticmethod
    def _auth(args: bytes, _utf8: bool) -> Command | Reply:
        """AUTH mechanism [initial-response] (RFC 4954 4); "=" is an empty initial response."""
        words = args.split()
        if not 1 <= len(words) <= 2 or _SASL_MECH.fullmatch(words[0]) is None:
            return R.BAD_ARGS
        mechanism = words[0].upper().decode("ascii")
        if len(words) == 1:
            return AuthStart(mechanism, None)
        if words[1] == b"=":
            return AuthStart(mechanism, b"")
        try:
            # C-level and strict: no whitespace, no junk after padding, padding required.
            initial = binascii.a2b_base64(words[1], strict_mode=True)
        except binascii.Error:
            return AuthReply.BAD_BASE64
        return AuthStart(mechanism, initial)

    @staticmethod
    def _noop(args: bytes, _utf8: bool) -> Command | Reply:
        return _NOOP

    @staticmethod
    def _help(args: bytes, _utf8: bool) -> Command | Reply:
        return _HELP

    @staticmethod
    def _vrfy(args: bytes, _utf8: bool) -> Command | Reply:
        return _VRFY if args.strip(b" ") else R.BAD_ARGS
