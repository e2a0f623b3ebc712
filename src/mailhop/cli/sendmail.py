"""``mailhop sendmail`` / ``mailhop-sendmail``: the sendmail-compatible submission command.

    mailhop-sendmail [-t] [-i | -oi] [-f sender] [-F name] [-C config] [-N dsn] [-R ret] [-V envid]
                     [--] [recipient ...]

Reads one message on standard input and submits it over SMTP to the local relay (the first ``[[listener]]``
of the configuration; a wildcard listener address is reached on loopback), which trusts loopback through
``relay.trusted_networks``. The daemon stays the only writer of the spool. Exit status 0 means the relay
answered 250 to the end of data, i.e. the message is durably queued; any other status means it is not
queued (but see "some recipients refused" below) and the caller should keep its copy.

Options are parsed like sendmail/Postfix do (POSIX getopt: combined flags, ``-fsender`` or ``-f sender``,
options end at the first recipient or at ``--``):

* ``-t``: recipients also come from the To:, Cc: and Bcc: header fields (from Resent-To:/-Cc:/-Bcc: instead
  when the message has any of those). As Postfix does, they are *added* to the command-line recipients
  (sendmail 8 would subtract them).
* ``-i``, ``-oi`` (also ``-O IgnoreDots``): only end of file ends the message. Without it a line holding
  just "." ends it, as in classic sendmail; no other line is changed (no dot unstuffing, as Postfix).
* ``-f sender`` / ``-r sender``: envelope sender; ``-f ''`` or ``-f '<>'`` is the null sender. Default:
  the login name (getpass.getuser()) at the configured hostname.
* ``-F name``: full name, used only when the message has no From: field: ``From: "name" <sender>``.
* ``-C file``: configuration file (else the caller's, then $MAILHOP_CONFIG, then /etc/mailhop/mailhop.toml).
* ``-N never|success,delay,failure``, ``-R full|hdrs``, ``-V envid``: DSN parameters, passed on (RFC 3461).
* Accepted and ignored: ``-bm`` (the only mode), ``-o<x>`` other than ``-oi`` (``-odi``, ``-odb``,
  ``-oem``, ...), ``-B``, ``-e``, ``-h``, ``-L``, ``-O``, ``-p``, ``-X``, ``-A``, ``-4 -6 -G -U -c -m -n -v -x``.
* Not supported (exit 64 with a hint): ``-bs``, ``-bp``, ``-bd``, ``-bi``/``-I``, any other ``-b`` mode, ``-q``.

Each recipient argument (and each header field with -t) is an RFC 5322 address list, so
``"Ann <a@x>, b@y"`` names two recipients (as Postfix does). Addresses without a domain get
``@hostname``. Duplicates are sent once.

The message: line ends (LF, CRLF, lone CR) become CRLF; a first line "From " (mbox separator) is dropped;
Bcc: and Resent-Bcc: fields are removed, folded continuation lines included, with or without -t (as
Postfix's cleanup does); From:, Date: and Message-ID: <...@hostname> are added when missing. A message larger
than ``limits.max_message_size`` or with a line longer than ``limits.max_text_line`` (CRLF included) is
refused here with 65: the relay would refuse it anyway.

SMTP: EHLO (HELO fallback), commands pipelined when the relay offers PIPELINING, SIZE, BODY=8BITMIME when
the content has 8-bit octets, SMTPUTF8 when an address is non-ASCII. Recipients refused with 4xx after the
message was queued for others (452 too many recipients) are retried in a further transaction.

Some recipients refused, the message queued for the others: exit 0 with a warning per refused recipient on
stderr, as Postfix's sendmail (the message *was* queued; a non-zero status would make the caller resubmit it
to everyone). Exit statuses (sysexits.h):

====  ==============  =========================================================================
 0    EX_OK           queued (the relay answered 250 to the end of data)
 64   EX_USAGE        bad or unsupported option, bad -f address, no recipients at all
 65   EX_DATAERR      message too large, line too long, or the relay refused the content (5.3.4, 5.6.x)
 67   EX_NOUSER       every recipient refused permanently (or not a valid address); no login name
 69   EX_UNAVAILABLE  the relay refused the session, MAIL or DATA permanently (5xx)
 75   EX_TEMPFAIL     relay not running / connection refused / timeout / dropped / any 4xx: retry later
 77   EX_NOPERM       refused by policy (5.7.x, 530): e.g. this host is not in relay.trusted_networks
 78   EX_CONFIG       configuration missing or invalid
====  ==============  =========================================================================
"""

from __future__ import annotations

import getopt
import getpass
import ipaddress
import os
import re
import socket
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from email.header import Header
from email.utils import formatdate, getaddresses, make_msgid
from pathlib import Path
from typing import BinaryIO

from ..address import AddressError, canonical_domain, parse_path
from ..config import load_config
from ..config.schema import Config
from ..errors import ConfigError
from ..reply import Reply
from ..smtp import client as smtp
from ..smtp.encode import encode_data

__all__ = [
    "EX_CONFIG",
    "EX_DATAERR",
    "EX_NOPERM",
    "EX_NOUSER",
    "EX_OK",
    "EX_TEMPFAIL",
    "EX_UNAVAILABLE",
    "EX_USAGE",
    "DataError",
    "Options",
    "Prepared",
    "UsageError",
    "main",
    "parse_options",
    "prepare",
    "read_input",
    "run",
]

EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_NOUSER = 67
EX_UNAVAILABLE = 69
EX_TEMPFAIL = 75
EX_NOPERM = 77
EX_CONFIG = 78

DEFAULT_CONFIG = "/etc/mailhop/mailhop.toml"
CONNECT_TIMEOUT = 30.0
REPLY_TIMEOUT = 300.0  # per reply, the end of data included (the relay fsyncs before answering)
PIPELINE_WINDOW = 100  # commands written before reading their replies (bounded: no write/write deadlock)

USAGE = "usage: sendmail [-t] [-i|-oi] [-f sender] [-F name] [-C config] [-N dsn] [-R ret] [-V envid] [--] [recipient ...]"

# Postfix sendmail's option letters; a ":" marks an option taking an argument.
_OPTSTRING = "46A:B:C:F:GIL:N:O:R:UV:X:b:ce:f:h:imno:p:q:r:tvx"
_UNSUPPORTED_MODE = {
    "s": "-bs (SMTP on standard input) is not supported; connect an SMTP client to the relay's listener",
    "p": "-bp (list the queue) is not supported; use 'mailhop queue list'",
    "d": "-bd (run as a daemon) is not supported; use 'mailhop serve'",
    "i": "-bi (rebuild the alias database) is not supported: mailhop has no aliases",
}
_NOTIFY = frozenset({"never", "success", "delay", "failure"})
_ENVID = re.compile(r"[\x21-\x7e]{1,100}")
_FIELD = re.compile(rb"[\x21-\x39\x3b-\x7e]+[ \t]*:")  # RFC 5322 field name (obs: WSP before the colon)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
_RECIPIENT_FIELDS = ("to", "cc", "bcc")
_RESENT_FIELDS = ("resent-to", "resent-cc", "resent-bcc")
_REMOVED_FIELDS = frozenset({"bcc", "resent-bcc"})


class UsageError(Exception):
    """A bad or unsupported command line (exit 64)."""


class DataError(Exception):
    """The message cannot be submitted as it is (exit 65)."""


@dataclass
class Options:
    recipients: list[str] = field(default_factory=list)
    extract: bool = False  # -t
    ignore_dots: bool = False  # -i, -oi
    sender: str | None = None  # -f, -r; "" is the null sender
    full_name: str | None = None  # -F
    config: Path | None = None  # -C
    notify: tuple[str, ...] = ()  # -N
    ret: str | None = None  # -R
    envid: str | None = None  # -V


def _flag_value(text: str) -> bool:
    return text.strip().lower() not in ("f", "false", "n", "no", "0")


def parse_options(argv: Sequence[str]) -> Options:
    """Parse a sendmail command line; raise UsageError with the reason."""
    try:
        pairs, args = getopt.getopt(list(argv), _OPTSTRING)
    except getopt.GetoptError as exc:
        if exc.opt == "q":
            raise UsageError("-q (process the queue) is not supported; use 'mailhop queue flush'") from None
        raise UsageError(str(exc)) from None
    opts = Options()
    for opt, value in pairs:
        letter = opt[1]
        if letter == "t":
            opts.extract = True
        elif letter == "i":
            opts.ignore_dots = True
        elif letter == "o":
            if value[:1] == "i":
                opts.ignore_dots = _flag_value(value[1:])
        elif letter == "O":
            name, _, setting = value.partition("=")
            if name.strip().lower() == "ignoredots":
                opts.ignore_dots = _flag_value(setting) if setting else True
        elif letter in "fr":
            sender = value.strip()
            if len(sender) >= 2 and sender[0] == "<" and sender[-1] == ">":
                sender = sender[1:-1]
            opts.sender = sender
        elif letter == "F":
            opts.full_name = value
        elif letter == "C":
            if not value:
                raise UsageError("-C needs a configuration file name")
            opts.config = Path(value)
        elif letter == "b":
            if value != "m":
                raise UsageError(_UNSUPPORTED_MODE.get(value, f"-b{value} is not supported; only -bm (read a message "
                                                               "from standard input) is"))
        elif letter == "I":
            raise UsageError(_UNSUPPORTED_MODE["i"])
        elif letter == "q":
            raise UsageError("-q (process the queue) is not supported; use 'mailhop queue flush'")
        elif letter == "N":
            words = tuple(w.strip().lower() for w in value.split(","))
            if not words or not set(words) <= _NOTIFY or ("never" in words and len(words) > 1):
                raise UsageError(f"-N {value!r}: write never, or some of success,delay,failure")
            opts.notify = tuple(w.upper() for w in words)
        elif letter == "R":
            if value.strip().lower() not in ("full", "hdrs"):
                raise UsageError(f"-R {value!r}: write full or hdrs")
            opts.ret = value.strip().upper()
        elif letter == "V":
            if not _ENVID.fullmatch(value):
                raise UsageError("-V: the envelope id is 1-100 printable ASCII characters without spaces")
            opts.envid = value
        # Everything else in _OPTSTRING is accepted for compatibility and has no effect.
    opts.recipients = list(args)
    return opts


def read_input(stdin: BinaryIO, *, ignore_dots: bool, max_size: int, max_line: int) -> list[bytes]:
    """The message's lines without line ends. LF, CRLF and lone CR all end a line.

    Without ``ignore_dots`` a line holding only "." ends the input. ``max_size`` bounds the content with CRLF
    line ends; ``max_line`` bounds a line with its CRLF (the relay's limits). Raises DataError.
    """
    lines: list[bytes] = []
    size = 0
    cap = max_line + 1
    while True:
        raw = stdin.readline(cap)
        if not raw:
            return lines
        if len(raw) == cap and not raw.endswith(b"\n"):
            raise DataError(f"a line is longer than {max_line - 2} characters (limits.max_text_line)")
        text = raw[:-1] if raw.endswith(b"\n") else raw
        if text.endswith(b"\r"):
            text = text[:-1]
        if not ignore_dots and text == b".":
            return lines
        for piece in text.split(b"\r"):
            if len(piece) + 2 > max_line:
                raise DataError(f"a line is longer than {max_line - 2} characters (limits.max_text_line)")
            size += len(piece) + 2
            if size > max_size:
                raise DataError(f"the message is larger than the relay accepts ({max_size} bytes, limits.max_message_size)")
            lines.append(piece)


@dataclass
class Prepared:
    data: bytes  # the message as it will be stored, CRLF line ends
    header_recipients: list[str]  # addresses from the recipient fields (only with extract)


def _field_name(first_line: bytes) -> str:
    return first_line.split(b":", 1)[0].strip().decode("ascii").lower()


def _field_value(lines: list[bytes]) -> str:
    # Unfolding (RFC 5322 2.2.3) is removing the CRLFs, which the stored lines no longer have.
    return b"".join(lines).split(b":", 1)[1].decode("utf-8", "replace")


def _from_field(address: str, full_name: str | None) -> list[bytes]:
    name = _CONTROL.sub(" ", full_name or "").strip()
    if not name:
        return [f"From: {address}".encode()]
    if name.isascii():
        quoted = name.replace("\\", "\\\\").replace('"', '\\"')
        return [f'From: "{quoted}" <{address}>'.encode()]
    encoded = Header(name, "utf-8", header_name="From").encode(linesep="\r\n")
    return f"From: {encoded} <{address}>".encode().split(b"\r\n")


def prepare(lines: list[bytes], *, extract: bool, sender: str, full_name: str | None, hostname: str) -> Prepared:
    """Split off the header, take the recipients (-t), drop Bcc, add From:/Date:/Message-ID: when missing."""
    if lines and lines[0].startswith(b"From "):
        lines = lines[1:]
    fields: list[list[bytes]] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if _FIELD.match(line):
            fields.append([line])
        elif fields and line[:1] in (b" ", b"\t"):
            fields[-1].append(line)
        else:
            break
        i += 1
    body = lines[i:]
    if body and body[0] == b"":
        body = body[1:]  # the separator; a body that starts without one gets one below
    named = [(_field_name(f[0]), f) for f in fields]
    recipients: list[str] = []
    if extract:
        wanted = _RESENT_FIELDS if any(name in _RESENT_FIELDS for name, _ in named) else _RECIPIENT_FIELDS
        values = [_field_value(f) for name, f in named if name in wanted]
        recipients = [addr for _, addr in getaddresses(values) if addr]
    kept = [f for name, f in named if name not in _REMOVED_FIELDS]
    present = {name for name, _ in named}
    if "from" not in present:
        kept.append(_from_field(sender or f"MAILER-DAEMON@{hostname}", full_name))
    if "date" not in present:
        kept.append([f"Date: {formatdate(localtime=True)}".encode()])
    if "message-id" not in present:
        kept.append([f"Message-ID: {make_msgid(domain=hostname)}".encode()])
    out = [line for f in kept for line in f]
    out.append(b"")
    out.extend(body)
    return Prepared(b"".join(line + b"\r\n" for line in out), recipients)


def _qualify(address: str, domain: str) -> str:
    return address if "@" in address.rsplit('"', 1)[-1] else f"{address}@{domain}"


def _addresses(items: Iterable[str], domain: str) -> list[str]:
    """Qualified, de-duplicated addresses, in order."""
    seen: dict[str, None] = {}
    for addr in items:
        seen.setdefault(_qualify(addr.strip(), domain), None)
    return list(seen)


def _check_address(address: str) -> str | None:
    """None if ``address`` is a valid RFC 5321 mailbox, else the reason."""
    try:
        parse_path(f"<{address}>", smtputf8=True)
    except AddressError as exc:
        return exc.reason
    return None


def _err(text: str) -> None:
    sys.stderr.write(f"sendmail: {text}\n")
    sys.stderr.flush()


# --- SMTP submission -------------------------------------------------------------------------------------


class _Lost(Exception):
    """The relay closed the connection (421 included), timed out or sent something that is not a reply."""


class _Connection:
    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._parser = smtp.ReplyParser()
        self._ready: list[Reply] = []

    def send(self, data: bytes) -> None:
        self._sock.settimeout(REPLY_TIMEOUT)
        self._sock.sendall(data)

    def reply(self) -> Reply:
        deadline = time.monotonic() + REPLY_TIMEOUT
        while not self._ready:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _Lost(f"no reply from the relay within {REPLY_TIMEOUT:g} s")
            self._sock.settimeout(remaining)
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                raise _Lost(f"no reply from the relay within {REPLY_TIMEOUT:g} s") from None
            if not chunk:
                raise _Lost("the relay closed the connection")
            try:
                self._ready.extend(self._parser.feed(chunk))
            except smtp.ReplyError as exc:
                raise _Lost(f"unreadable reply from the relay: {exc}") from None
        reply = self._ready.pop(0)
        if reply.code == 421:
            raise _Lost(f"the relay is closing the connection: {reply}")
        return reply

    def close(self) -> None:
        self._sock.close()


@dataclass
class _Tx:
    accepted: list[str]
    refused: dict[str, Reply]
    failure: Reply | None  # the MAIL, DATA or end-of-data reply that stopped it

    @property
    def queued(self) -> bool:
        return self.failure is None and bool(self.accepted)


def _is_2xx(reply: Reply) -> bool:
    return 200 <= reply.code < 300


def _transaction(conn: _Connection, caps: smtp.Capabilities, sender: str, rcpts: list[str], message: bytes,
                 *, utf8: bool, body: str | None, opts: Options) -> _Tx:
    cmds = [smtp.mail(sender, caps=caps, size=len(message), body=body, smtputf8=utf8, ret=opts.ret, envid=opts.envid)]
    cmds += [smtp.rcpt(r, caps=caps, smtputf8=utf8, notify=opts.notify) for r in rcpts]
    cmds.append(smtp.data())
    window = PIPELINE_WINDOW if caps.pipelining else 1
    replies: list[Reply] = []
    while len(replies) < len(cmds):
        batch = cmds[len(replies) : len(replies) + window]
        conn.send(b"".join(batch))
        replies.extend(conn.reply() for _ in batch)
        if not _is_2xx(replies[0]):
            break  # MAIL refused (pipelined: the RCPTs and DATA were answered 503 and read above)
        if len(replies) == len(cmds) - 1 and not any(_is_2xx(r) for r in replies[1:]):
            break  # not pipelined and no recipient: DATA is not sent
    rcpt_replies = replies[1 : 1 + len(rcpts)]
    accepted = [r for r, reply in zip(rcpts, rcpt_replies, strict=False) if _is_2xx(reply)]
    refused = {r: reply for r, reply in zip(rcpts, rcpt_replies, strict=False) if not _is_2xx(reply)}
    data_reply = replies[1 + len(rcpts)] if len(replies) == len(cmds) else None
    if not _is_2xx(replies[0]) or not accepted:
        if data_reply is not None and data_reply.code == 354:
            conn.send(b".\r\n")  # RFC 2920 3.1: an accepted DATA without recipients gets an empty message
            conn.reply()
        return _Tx([], refused, replies[0] if not _is_2xx(replies[0]) else None)
    assert data_reply is not None
    if data_reply.code != 354:
        return _Tx([], refused, data_reply)
    conn.send(b"".join(encode_data([message])))
    final = conn.reply()
    return _Tx(accepted, refused, None if _is_2xx(final) else final)


def _permanent_status(reply: Reply) -> int:
    if reply.enhanced == "5.3.4" or reply.enhanced.startswith("5.6.") or reply.code == 552:
        return EX_DATAERR
    if reply.enhanced.startswith("5.7.") or reply.code == 530:
        return EX_NOPERM
    return EX_UNAVAILABLE


def _target(config: Config) -> tuple[str, int]:
    host, port = config.listener[0].host_port
    if host != "localhost" and ipaddress.ip_address(host).is_unspecified:
        host = "::1" if ":" in host else "127.0.0.1"
    return host, port


def submit(config: Config, message: bytes, sender: str, rcpts: list[str], opts: Options,
           refused: dict[str, Reply] | None = None) -> int:
    """Send ``message`` to the relay; print what happened; return the exit status."""
    refused = dict(refused or {})
    host, port = _target(config)
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        sock = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT)
    except OSError as exc:
        _err(f"cannot reach the relay at {where} ({exc.strerror or exc}); is mailhop running? "
             "Message not sent; try again later")
        return EX_TEMPFAIL
    conn = _Connection(sock)
    queued: list[str] = []
    failure: Reply | None = None
    lost: str | None = None
    pending = list(rcpts)
    utf8 = not (sender.isascii() and all(r.isascii() for r in rcpts))
    try:
        greeting = conn.reply()
        if greeting.code != 220:
            failure = greeting
        else:
            name = canonical_domain(config.hostname)
            conn.send(smtp.ehlo(name))
            hello = conn.reply()
            caps = smtp.NO_CAPABILITIES
            if _is_2xx(hello):
                caps = smtp.parse_ehlo(hello)
            elif hello.is_permanent:
                conn.send(smtp.helo(name))
                hello = conn.reply()
            if not _is_2xx(hello):
                failure = hello
            elif utf8 and not caps.smtputf8:
                _err(f"the relay at {where} does not offer SMTPUTF8, needed for the non-ASCII addresses")
                return EX_UNAVAILABLE
            else:
                body = None if message.isascii() else "8BITMIME"
                while pending:
                    tx = _transaction(conn, caps, sender, pending, message, utf8=utf8, body=body, opts=opts)
                    refused.update(tx.refused)
                    if not tx.queued:
                        failure = tx.failure
                        if failure is not None:
                            refused.update({r: failure for r in pending if r not in tx.refused})
                        break
                    queued.extend(tx.accepted)
                    for r in tx.accepted:
                        refused.pop(r, None)
                    # Temporarily refused (e.g. 452 too many recipients): another transaction may take them.
                    pending = [r for r, reply in tx.refused.items() if reply.is_transient]
                try:
                    conn.send(smtp.quit())
                    conn.reply()
                except (OSError, _Lost):
                    pass  # the message is queued (or not) already: QUIT is a courtesy
    except (OSError, _Lost) as exc:
        lost = str(exc) if isinstance(exc, _Lost) else f"connection to the relay failed: {exc}"
    except smtp.CommandError as exc:
        _err(f"cannot send the message: {exc}")
        return EX_DATAERR
    finally:
        conn.close()
    if queued:
        reasons = {r: str(reply) for r, reply in refused.items()}
        if lost is not None:
            reasons.update({r: lost for r in pending if r not in queued})
        for r, reason in reasons.items():
            _err(f"warning: message queued, but not for <{r}>: {reason}")
        return EX_OK
    if lost is not None:
        _err(f"{lost}; message not sent, try again later")
        return EX_TEMPFAIL
    if failure is not None:
        if failure.is_transient:
            _err(f"the relay deferred the message: {failure}; try again later")
            return EX_TEMPFAIL
        _err(f"the relay refused the message: {failure}")
        return _permanent_status(failure)
    for r, reply in refused.items():
        _err(f"<{r}>: {reply}")
    if any(reply.is_transient for reply in refused.values()):
        _err("no recipient accepted now; message not sent, try again later")
        return EX_TEMPFAIL
    _err("no recipient accepted; message not sent")
    if refused and all(reply.enhanced.startswith("5.7.") or reply.code == 530 for reply in refused.values()):
        return EX_NOPERM
    return EX_NOUSER


# --- the command -----------------------------------------------------------------------------------------


def _default_sender(domain: str) -> str | None:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        return None
    if not re.fullmatch(r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+(?:\.[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+)*", user):
        user = '"' + user.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return f"{user}@{domain}"


def run(argv: list[str], stdin: BinaryIO, *, config_path: Path | None) -> int:
    """The whole command: parse ``argv``, read the message from ``stdin``, submit it; the exit status."""
    try:
        opts = parse_options(argv)
    except UsageError as exc:
        _err(str(exc))
        sys.stderr.write(USAGE + "\n")
        return EX_USAGE
    if not opts.extract and not opts.recipients:
        _err("no recipients given: name them as arguments, or use -t to take them from the message")
        return EX_USAGE
    path = opts.config or config_path or Path(os.environ.get("MAILHOP_CONFIG") or DEFAULT_CONFIG)
    try:
        config = load_config(path)
    except ConfigError as exc:
        _err(f"configuration error\n{exc.detail}")
        return EX_CONFIG
    domain = canonical_domain(config.hostname)
    if opts.sender is None:
        default = _default_sender(domain)
        if default is None:
            _err("cannot tell who you are (no login name); give the sender with -f")
            return EX_NOUSER
        sender = default
    else:
        sender = _qualify(opts.sender, domain) if opts.sender else ""
    if sender and (reason := _check_address(sender)) is not None:
        _err(f"sender <{sender}>: not a valid address ({reason})")
        return EX_USAGE
    try:
        lines = read_input(stdin, ignore_dots=opts.ignore_dots, max_size=config.limits.max_message_size,
                           max_line=config.limits.max_text_line)
        prepared = prepare(lines, extract=opts.extract, sender=sender, full_name=opts.full_name, hostname=domain)
        if len(prepared.data) > config.limits.max_message_size:
            raise DataError(f"the message is larger than the relay accepts ({config.limits.max_message_size} "
                            "bytes, limits.max_message_size)")
    except DataError as exc:
        _err(f"{exc}; message not sent")
        return EX_DATAERR
    named = [addr for _, addr in getaddresses(opts.recipients) if addr]
    rcpts = _addresses([*named, *prepared.header_recipients], domain)
    if not rcpts:
        _err("no recipients: none on the command line" + (" and none in To:, Cc: or Bcc:" if opts.extract else ""))
        return EX_USAGE
    invalid: dict[str, Reply] = {}
    for r in rcpts:
        if (reason := _check_address(r)) is not None:
            invalid[r] = Reply(553, "5.1.3", f"not a valid address ({reason})")
    valid = [r for r in rcpts if r not in invalid]
    if not valid:
        for r, reply in invalid.items():
            _err(f"<{r}>: {reply}")
        _err("no valid recipient; message not sent")
        return EX_NOUSER
    return submit(config, prepared.data, sender, valid, opts, refused=invalid)


def main() -> None:
    """Entry point of ``mailhop-sendmail``."""
    sys.exit(run(sys.argv[1:], sys.stdin.buffer, config_path=None))
