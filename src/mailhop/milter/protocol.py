"""The Sendmail milter protocol, version 6, MTA side, without I/O: packets, replies, negotiation.

Wire format: every packet is a 4-octet big-endian length (counting the command octet), one command octet and the
command's data. Strings are NUL-terminated C strings. Sources: Sendmail's libmilter ``mfdef.h``, Postfix's
``milter8.c`` and MILTER_README, and the protocol notes of go-milter and purepythonmilter. The order of commands
for one message and the meaning of the replies are in ``milter.conversation``; the socket is ``milter.client``.

Header values travel as Sendmail and Postfix send them (``split_message``): the one space after the colon removed
(not a tab), folds kept, each fold's line break a bare "\\n" (both MTAs hold header lines without CR; libmilter
milters such as OpenDKIM turn "\\n" back into CRLF before canonicalizing). Body chunks keep their CRLF line ends.

Untrusted input: everything the milter sends. Packets are bounded (``MAX_PACKET``), every field is checked, and
any malformed, unknown or un-negotiated reply raises ``ProtocolError`` (never another exception).
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import IntFlag, StrEnum

__all__ = [
    "CHUNK_SIZE",
    "MAX_PACKET",
    "OUR_ACTIONS",
    "OUR_PROTOCOL",
    "VERSION",
    "AddHeader",
    "ChangeHeader",
    "Cmd",
    "InsertHeader",
    "Negotiated",
    "OptNeg",
    "PacketReader",
    "ProtocolError",
    "Quarantine",
    "ReplyCode",
    "Response",
    "Simple",
    "SmfiFlag",
    "SmfiProto",
    "body",
    "connect",
    "decode_response",
    "encode",
    "header",
    "helo",
    "macro",
    "mail",
    "negotiate",
    "optneg",
    "rcpt",
    "split_message",
]

VERSION = 6
CHUNK_SIZE = 65535  # MILTER_CHUNK_SIZE: the largest body chunk libmilter accepts without SMFIP_MDS_* flags
# The largest reply we read. Real replies are small (a header, a reply text); 1 MiB leaves room for a long
# DKIM/ARC header while keeping a broken or hostile milter from making us buffer without end.
MAX_PACKET = 1024 * 1024
# A reply's text is shown to the SMTP client, a quarantine reason to operators; longer ones are cut (an SMTP line
# is at most 512 octets).
_MAX_REPLY_TEXT = 400


class ProtocolError(Exception):
    """The milter broke the protocol (malformed, oversized, unexpected or un-negotiated reply)."""


class Cmd:
    """Command octets, MTA to milter."""

    ABORT = b"A"
    BODY = b"B"
    CONNECT = b"C"
    MACRO = b"D"
    BODYEOB = b"E"
    HELO = b"H"
    HEADER = b"L"
    MAIL = b"M"
    EOH = b"N"
    OPTNEG = b"O"
    QUIT = b"Q"
    RCPT = b"R"
    DATA = b"T"


class SmfiFlag(IntFlag):
    """Actions a milter may take (SMFIF_*)."""

    ADDHDRS = 0x01
    CHGBODY = 0x02
    ADDRCPT = 0x04
    DELRCPT = 0x08
    CHGHDRS = 0x10
    QUARANTINE = 0x20
    CHGFROM = 0x40
    ADDRCPT_PAR = 0x80
    SETSYMLIST = 0x100


class SmfiProto(IntFlag):
    """Protocol steps a milter may skip or not answer (SMFIP_*)."""

    NOCONNECT = 0x01
    NOHELO = 0x02
    NOMAIL = 0x04
    NORCPT = 0x08
    NOBODY = 0x10
    NOHDRS = 0x20
    NOEOH = 0x40
    NR_HDR = 0x80
    NOUNKNOWN = 0x100
    NODATA = 0x200
    SKIP = 0x400
    RCPT_REJ = 0x800
    NR_CONN = 0x1000
    NR_HELO = 0x2000
    NR_MAIL = 0x4000
    NR_RCPT = 0x8000
    NR_DATA = 0x10000
    NR_UNKN = 0x20000
    NR_EOH = 0x40000
    NR_BODY = 0x80000
    HDR_LEADSPC = 0x100000


# What we offer. Header edits and quarantine are what a relay can apply after the fact; SETSYMLIST is offered
# because libmilter refuses the session when an MTA does not offer every action a filter registered, and
# filters register it only to send a macro wish list, which we read and ignore (we always send our macros).
OUR_ACTIONS = SmfiFlag.ADDHDRS | SmfiFlag.CHGHDRS | SmfiFlag.QUARANTINE | SmfiFlag.SETSYMLIST
_NR_ALL = (SmfiProto.NR_HDR | SmfiProto.NR_CONN | SmfiProto.NR_HELO | SmfiProto.NR_MAIL | SmfiProto.NR_RCPT
           | SmfiProto.NR_DATA | SmfiProto.NR_UNKN | SmfiProto.NR_EOH | SmfiProto.NR_BODY)
OUR_PROTOCOL = (SmfiProto.NOCONNECT | SmfiProto.NOHELO | SmfiProto.NOMAIL | SmfiProto.NORCPT | SmfiProto.NOBODY
                | SmfiProto.NOHDRS | SmfiProto.NOEOH | SmfiProto.NOUNKNOWN | SmfiProto.NODATA | SmfiProto.SKIP
                | _NR_ALL)

_LEN = struct.Struct(">I")
_OPTNEG = struct.Struct(">III")
_HEADER_NAME = re.compile(r"^[!-9;-~]+$")  # RFC 5322 ftext
_REPLY_LINE = re.compile(r"^([45]\d\d)(?:[ -]|$)(?:([245]\.\d{1,3}\.\d{1,3})(?: |$))?(.*)$")


# -- encoding (MTA -> milter) ---------------------------------------------------------------------------------------

def encode(cmd: bytes, data: bytes = b"") -> bytes:
    """One packet: length, command octet, data."""
    return _LEN.pack(len(data) + 1) + cmd + data


def _cstr(value: str | bytes) -> bytes:
    raw = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else value
    # A NUL would end the C string early and shift every later field: it cannot be sent, so it becomes a space.
    return raw.replace(b"\0", b" ") + b"\0"


def optneg(version: int = VERSION, actions: int = OUR_ACTIONS, protocol: int = OUR_PROTOCOL) -> bytes:
    """SMFIC_OPTNEG: what we speak and allow."""
    return encode(Cmd.OPTNEG, _OPTNEG.pack(version, actions, protocol))


def macro(stage: bytes, macros: Iterable[tuple[str, str]]) -> bytes:
    """SMFIC_MACRO for the command ``stage``; names as libmilter spells them ("j", "{auth_authen}")."""
    return encode(Cmd.MACRO, stage + b"".join(_cstr(k) + _cstr(v) for k, v in macros))


def connect(hostname: str, family: str, port: int, address: str) -> bytes:
    """SMFIC_CONNECT. ``family`` is "4", "6", "L" (unix) or "U" (unknown: no port, no address)."""
    data = _cstr(hostname) + family.encode("ascii")
    if family in ("4", "6"):
        data += struct.pack(">H", port & 0xFFFF)
    if family != "U":
        data += _cstr(address)
    return encode(Cmd.CONNECT, data)


def helo(name: str) -> bytes:
    return encode(Cmd.HELO, _cstr(name))


def mail(sender: str, args: Sequence[str] = ()) -> bytes:
    return encode(Cmd.MAIL, _cstr(f"<{sender}>") + b"".join(_cstr(a) for a in args))


def rcpt(recipient: str, args: Sequence[str] = ()) -> bytes:
    return encode(Cmd.RCPT, _cstr(f"<{recipient}>") + b"".join(_cstr(a) for a in args))


def header(name: bytes, value: bytes) -> bytes:
    return encode(Cmd.HEADER, _cstr(name) + _cstr(value))


def body(chunk: bytes) -> bytes:
    if len(chunk) > CHUNK_SIZE:
        raise ValueError(f"a body chunk is at most {CHUNK_SIZE} octets, got {len(chunk)}")
    return encode(Cmd.BODY, chunk)


def split_message(message: bytes) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """The header fields (name, value as milters expect it) and the body of a CRLF message.

    The value is what follows the colon with one leading space removed (Sendmail eats one space, not a tab);
    folds are kept with "\\n" line breaks, as Sendmail and Postfix send them. A line of the header section that
    is not a field (no colon) is not sent. A message without a blank line is all header.
    """
    if message.startswith(b"\r\n"):
        return [], message[2:]
    end = message.find(b"\r\n\r\n")
    block, rest = (message, b"") if end < 0 else (message[:end], message[end + 4:])
    fields: list[tuple[bytes, bytes]] = []
    for raw in re.split(rb"\r\n(?=[^ \t])", block):
        name, colon, value = raw.partition(b":")
        name = name.rstrip(b" \t")
        if not colon or not name or b"\n" in name:
            continue
        if value.startswith(b" "):
            value = value[1:]
        if value.endswith(b"\r\n"):
            value = value[:-2]  # a block ending in a lone CRLF (message without body) leaves one behind
        fields.append((name, value.replace(b"\r\n", b"\n")))
    return fields, rest


# -- decoding (milter -> MTA) ---------------------------------------------------------------------------------------

class PacketReader:
    """Splits a byte stream into (command, data) packets; refuses a length of 0 or over ``max_packet``."""

    def __init__(self, max_packet: int = MAX_PACKET) -> None:
        self._buf = bytearray()
        self._max = max_packet

    def feed(self, data: bytes) -> None:
        self._buf += data

    def needed(self) -> int:
        """Octets still missing for the next complete packet (0: one is ready)."""
        if len(self._buf) < 4:
            return 4 - len(self._buf)
        length = self._length()
        return max(0, 4 + length - len(self._buf))

    def _length(self) -> int:
        (length,) = _LEN.unpack_from(self._buf)
        if length == 0:
            raise ProtocolError("a packet of length 0")
        if length > self._max:
            raise ProtocolError(f"a packet of {length} octets (the limit is {self._max})")
        return int(length)

    def next_packet(self) -> tuple[bytes, bytes] | None:
        """The next complete packet, or None if more bytes are needed."""
        if self.needed():
            return None
        length = self._length()
        packet = bytes(self._buf[4:4 + length])
        del self._buf[:4 + length]
        return packet[:1], packet[1:]


@dataclass(frozen=True, slots=True)
class OptNeg:
    version: int
    actions: int
    protocol: int
    macro_lists: tuple[tuple[int, str], ...] = ()  # SETSYMLIST wishes (stage, "j {auth_authen}"); ignored


class Simple(StrEnum):
    """The replies without data."""

    CONTINUE = "continue"
    ACCEPT = "accept"
    REJECT = "reject"
    TEMPFAIL = "tempfail"
    DISCARD = "discard"
    PROGRESS = "progress"  # still working: the wait for the real reply starts again
    SKIP = "skip"  # no more body chunks, please


@dataclass(frozen=True, slots=True)
class ReplyCode:
    """A custom SMTP reply (first line only); a 4xx code means tempfail, 5xx reject."""

    code: int
    enhanced: str
    text: str


@dataclass(frozen=True, slots=True)
class Quarantine:
    reason: str


@dataclass(frozen=True, slots=True)
class AddHeader:
    name: str
    value: str


@dataclass(frozen=True, slots=True)
class InsertHeader:
    index: int
    name: str
    value: str


@dataclass(frozen=True, slots=True)
class ChangeHeader:
    index: int
    name: str
    value: str  # "" deletes the field


Response = Simple | OptNeg | ReplyCode | Quarantine | AddHeader | InsertHeader | ChangeHeader

_SIMPLE = {b"c": Simple.CONTINUE, b"a": Simple.ACCEPT, b"r": Simple.REJECT, b"t": Simple.TEMPFAIL,
           b"d": Simple.DISCARD, b"p": Simple.PROGRESS, b"s": Simple.SKIP,
           b"f": Simple.TEMPFAIL,  # SMFIR_CONN_FAIL: the connection is to fail; the client retries later
           b"4": Simple.TEMPFAIL}  # SMFIR_SHUTDOWN: the milter is going away
_NOT_NEGOTIATED = {b"+": "add recipient", b"-": "delete recipient", b"b": "replace body", b"e": "change sender",
                   b"2": "add recipient with arguments", b"l": "set macro list"}


def _cstrings(data: bytes, count: int, what: str) -> list[str]:
    parts = data.split(b"\0")
    if len(parts) < count + 1 or any(parts[count:]):
        raise ProtocolError(f"{what}: expected {count} NUL-terminated strings")
    return [p.decode("utf-8", "replace") for p in parts[:count]]


def _header_fields(data: bytes, what: str) -> tuple[str, str]:
    name, value = _cstrings(data, 2, what)
    if not _HEADER_NAME.match(name):
        raise ProtocolError(f"{what}: invalid header name {name[:60]!r}")
    # Folds come as bare "\n" (see the module docstring); the rest of mailhop writes CRLF.
    return name, value.replace("\r\n", "\n").replace("\n", "\r\n")


def _index(data: bytes, what: str) -> tuple[int, bytes]:
    if len(data) < 4:
        raise ProtocolError(f"{what}: missing index")
    (index,) = _LEN.unpack_from(data)
    return int(index), data[4:]


def _optneg(data: bytes) -> OptNeg:
    if len(data) < _OPTNEG.size:
        raise ProtocolError(f"option negotiation reply of {len(data)} octets (at least 12 needed)")
    version, actions, protocol = _OPTNEG.unpack_from(data)
    lists: list[tuple[int, str]] = []
    rest = data[_OPTNEG.size:]
    while rest:
        stage, rest = _index(rest, "macro list")
        names, nul, rest = rest.partition(b"\0")
        if not nul:
            raise ProtocolError("macro list: missing NUL")
        lists.append((stage, names.decode("ascii", "replace")))
    return OptNeg(version, actions, protocol, tuple(lists))


def _replycode(data: bytes) -> ReplyCode:
    (text,) = _cstrings(data, 1, "reply code")
    first = text.split("\r\n", 1)[0].split("\n", 1)[0]
    m = _REPLY_LINE.match(first)
    if not m:
        raise ProtocolError(f"reply code: not a 4xx/5xx SMTP reply: {first[:60]!r}")
    code, enhanced, rest = int(m.group(1)), m.group(2) or "", m.group(3)
    if enhanced and enhanced[0] != m.group(1)[0]:
        enhanced = ""  # a 5xx reply with a 4.x.x code (or the reverse) is inconsistent; the default replaces it
    clean = "".join(ch if ch.isprintable() else " " for ch in rest).strip()
    return ReplyCode(code, enhanced, clean[:_MAX_REPLY_TEXT])


def decode_response(cmd: bytes, data: bytes) -> Response:
    """One milter reply. Raises ProtocolError for anything malformed, unknown or not negotiated."""
    simple = _SIMPLE.get(cmd)
    if simple is not None:
        return simple
    if cmd == b"O":
        return _optneg(data)
    if cmd == b"y":
        return _replycode(data)
    if cmd == b"q":
        reason = _cstrings(data, 1, "quarantine")[0]
        # The reason is logged and shown to operators: no control characters, bounded.
        return Quarantine("".join(ch if ch.isprintable() else " " for ch in reason)[:_MAX_REPLY_TEXT])
    if cmd == b"h":
        return AddHeader(*_header_fields(data, "add header"))
    if cmd == b"i":
        index, rest = _index(data, "insert header")
        return InsertHeader(index, *_header_fields(rest, "insert header"))
    if cmd == b"m":
        index, rest = _index(data, "change header")
        return ChangeHeader(index, *_header_fields(rest, "change header"))
    if cmd in _NOT_NEGOTIATED:
        raise ProtocolError(f"the milter asked to {_NOT_NEGOTIATED[cmd]}, which we did not negotiate")
    raise ProtocolError(f"unknown reply {cmd!r}")


@dataclass(frozen=True, slots=True)
class Negotiated:
    version: int
    actions: SmfiFlag
    protocol: SmfiProto
    macro_lists: tuple[tuple[int, str], ...] = ()


def negotiate(reply: Response, offered_actions: int = OUR_ACTIONS,
              offered_protocol: int = OUR_PROTOCOL) -> Negotiated:
    """Check the milter's OPTNEG reply against what we offered.

    Actions: the effective set is the intersection (a milter asking for more is told no by omission; if it uses
    one anyway, ``decode_response`` or ``Conversation`` refuses it). Protocol: a skip we did not offer is ignored
    (we send the step anyway), but a no-reply flag we did not offer would leave us waiting for a reply the
    milter will never send, so it is an error.
    """
    if not isinstance(reply, OptNeg):
        raise ProtocolError(f"expected the option negotiation reply, got {type(reply).__name__}")
    if not 2 <= reply.version <= VERSION:
        raise ProtocolError(f"the milter speaks protocol version {reply.version}; we speak 2 to {VERSION}")
    stray = reply.protocol & ~offered_protocol & (_NR_ALL | SmfiProto.HDR_LEADSPC)
    if stray:
        raise ProtocolError(f"the milter wants protocol flags 0x{stray:x}, which we did not offer")
    return Negotiated(reply.version, SmfiFlag(reply.actions & offered_actions),
                      SmfiProto(reply.protocol & offered_protocol), reply.macro_lists)
