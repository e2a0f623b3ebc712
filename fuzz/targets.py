"""Fuzz targets: each takes arbitrary bytes, drives one untrusted-input parser of mailhop, and asserts only
that nothing but the documented exceptions escapes and that output stays bounded.

Every target is a plain ``def target(data: bytes) -> None`` so atheris (``fuzz/run.py``) and hypothesis
(``tests/fuzz/test_fuzz_targets.py``) drive the same code. The first bytes of the input choose settings
(limits, flags, read boundaries) through ``Bytes``, a tiny deterministic consumer, so no atheris API is
needed here.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from mailhop.address import MAX_PATH, AddressError, Mailbox, parse_path
from mailhop.queue.model import QueuedMessage, RcptStatus
from mailhop.queue.rows import N_MESSAGE_COLUMNS, decode_message
from mailhop.reply import R, Reply
from mailhop.smtp import (
    NEED_DATA,
    AuthAborted,
    AuthResponse,
    AuthStart,
    BdatChunkEnd,
    BdatDecoder,
    CommandParser,
    ConnectionClosed,
    DataChunk,
    DataDecoder,
    DataEnd,
    DataStart,
    Ehlo,
    Limits,
    Mail,
    Quit,
    Rcpt,
    Reset,
    ServerConnection,
    ServerSettings,
    StartTls,
    challenge_reply,
)
from mailhop.smtp.client import Capabilities, ReplyError, ReplyParser, parse_ehlo
from mailhop.smtp.sasl import AuthReply

__all__ = ["TARGETS", "Bytes"]

MAX_INPUT = 1 << 16  # longer inputs are cut: the targets check logic, not throughput


class Bytes:
    """Consumes an input deterministically: small integers and flags from the front, the rest as data."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data[:MAX_INPUT]
        self.pos = 0

    def byte(self) -> int:
        if self.pos >= len(self.data):
            return 0
        self.pos += 1
        return self.data[self.pos - 1]

    def number(self, lo: int, hi: int) -> int:
        """An integer in [lo, hi] from up to 4 bytes."""
        span = hi - lo + 1
        n = 0
        for _ in range(min(4, max(1, (span.bit_length() + 7) // 8))):
            n = (n << 8) | self.byte()
        return lo + n % span

    def flag(self) -> bool:
        return bool(self.byte() & 1)

    def take(self, n: int) -> bytes:
        out = self.data[self.pos : self.pos + n]
        self.pos += len(out)
        return out

    def rest(self) -> bytes:
        out = self.data[self.pos :]
        self.pos = len(self.data)
        return out

    def chunks(self, payload: bytes, cuts_seed: int) -> list[bytes]:
        """Split ``payload`` into reads: whole when the seed is 0, else pieces of 1..seed octets."""
        if cuts_seed == 0 or not payload:
            return [payload] if payload else []
        out, i, k = [], 0, cuts_seed
        while i < len(payload):
            k = (k * 1103515245 + 12345) & 0x7FFFFFFF
            n = 1 + k % cuts_seed
            out.append(payload[i : i + n])
            i += n
        return out


# -- 1a. the command parser -------------------------------------------------------------------------------

_PARSERS: dict[tuple[bool, bool, bool, int], CommandParser] = {}


def target_commands(data: bytes) -> None:
    """``CommandParser.parse`` of one line: never raises, always a command or a Reply."""
    b = Bytes(data)
    flags = b.byte()
    key = (bool(flags & 1), bool(flags & 2), bool(flags & 4), 1 + (flags >> 4) % 20)
    parser = _PARSERS.get(key)
    if parser is None:
        limits = Limits(max_bdat_digits=key[3], max_message_size=1 + (flags << 10))
        parser = _PARSERS[key] = CommandParser(limits, dsn=key[0], smtputf8=key[1], auth=key[2])
    line = b.rest()
    result = parser.parse(line, bool(flags & 8))
    if isinstance(result, Reply):
        assert 400 <= result.code < 600, result
        assert len(result.text) < 512
        return
    assert type(result).__module__.startswith("mailhop.smtp"), result
    # Nothing parsed from a line can outgrow it.
    assert len(repr(result)) < 4 * len(line) + 512


# -- 1b. the whole server core ----------------------------------------------------------------------------

_LIMIT_CHOICES = (
    Limits(),
    Limits(max_command_line=64, max_text_line=20, max_message_size=50, max_recipients=3, max_errors=8,
           max_auth_line=64, recipient_overshoot=2, max_bdat_digits=3),
    Limits(max_command_line=16, max_text_line=3, max_message_size=1, max_recipients=1, max_errors=1,
           max_auth_line=16, recipient_overshoot=0, max_bdat_digits=1),
)


class _Responder:
    """A permissive session (after tests/smtp/helpers.py) that also completes STARTTLS and answers AUTH."""

    def __init__(self, conn: ServerConnection, choices: int) -> None:
        self.conn = conn
        self.choices = choices
        self.closed = False
        self.content = 0  # content octets of the current message
        self.events = 0

    def run(self) -> None:
        conn = self.conn
        limit = conn.settings.limits.max_message_size
        while True:
            event = conn.next_event()
            if event is NEED_DATA:
                return
            self.events += 1
            if isinstance(event, ConnectionClosed):
                self.closed = True
                return
            if isinstance(event, DataChunk):
                self.content += len(event.data)
                assert self.content <= limit, (self.content, limit)
                continue
            if isinstance(event, DataEnd):
                self.content = 0
            self.choices = (self.choices >> 1) | ((self.choices & 1) << 7)
            refuse = self.choices & 0x81 == 0x81  # one answer in four is a refusal
            self.answer(event, refuse)

    def answer(self, event: object, refuse: bool) -> None:
        conn = self.conn
        if isinstance(event, (AuthAborted, Reset)):
            return  # informational: no reply is owed
        if isinstance(event, (AuthStart, AuthResponse)):
            conn.send(AuthReply.FAILED if refuse else challenge_reply(b"go on") if self.choices & 2
                      else AuthReply.OK)
        elif isinstance(event, DataStart):
            if refuse:
                conn.send(Reply(554, "5.3.4", "Refused"))
            else:
                conn.accept_data()
        elif refuse and not isinstance(event, Quit):
            conn.send(Reply(550, "5.7.1", "Refused"))
        elif isinstance(event, Ehlo):
            conn.send(conn.ehlo_reply("hello"))
        elif isinstance(event, Mail):
            conn.send(R.SENDER_OK)
        elif isinstance(event, Rcpt):
            conn.send(R.RCPT_OK)
        elif isinstance(event, BdatChunkEnd):
            conn.send(Reply(250, "2.0.0", f"{event.size} octets received"))
        elif isinstance(event, DataEnd):
            conn.send(event.error or Reply(250, "2.0.0", "Queued"))
        elif isinstance(event, StartTls):
            conn.send(R.READY_TLS)
            if self.choices & 4:
                conn.tls_started()  # the handshake succeeded; otherwise bytes are discarded until EOF
        elif isinstance(event, Quit):
            conn.send(R.BYE)
        else:
            raise AssertionError(f"fuzz harness does not know {event!r}")


def target_server(data: bytes) -> None:
    """A whole ``ServerConnection`` fed arbitrary bytes in arbitrary reads, then EOF."""
    b = Bytes(data)
    flags = b.byte()
    limits = _LIMIT_CHOICES[flags % 3]
    auth = ("PLAIN", "LOGIN") if flags & 4 else ()
    settings = ServerSettings("mx.fuzz.test", limits, tls_available=bool(flags & 8), tls_active=bool(flags & 16),
                              auth_mechanisms=auth, auth_plaintext_ok=bool(flags & 32),
                              advertise_chunking=not flags & 64)
    cuts = b.byte() % 17
    choices = b.byte()
    payload = b.rest()
    conn = ServerConnection(settings)
    conn.send_greeting(Reply(220, "", "mx.fuzz.test ESMTP"))
    out = len(conn.data_to_send())
    session = _Responder(conn, choices)
    for chunk in b.chunks(payload, cuts):
        if session.closed:
            break
        conn.receive_data(chunk)
        session.run()
        out += len(conn.data_to_send())
    if not session.closed:
        conn.receive_data(b"")
        session.run()
        out += len(conn.data_to_send())
    assert session.closed, "EOF must close the connection"
    # Bounded: replies are at most a few per input octet, each short (EHLO's is the longest).
    assert out <= 512 * (len(payload) + 2), (out, len(payload))
    assert session.events <= 2 * len(payload) + 4


# -- 2. DATA and BDAT content -----------------------------------------------------------------------------


def target_data(data: bytes) -> None:
    """``DataDecoder`` driven as the server drives it: a growing buffer, reads split anywhere."""
    b = Bytes(data)
    max_line = b.number(3, 1100)
    max_size = b.number(1, 1 << 16)
    cuts = b.byte() % 33
    payload = b.rest()
    dec = DataDecoder(max_line, max_size)
    buf = bytearray()
    pos = 0
    total = 0
    done = False
    for chunk in b.chunks(payload, cuts):
        buf += chunk
        while True:
            content, new, done = dec.decode(buf, pos)
            assert pos <= new <= len(buf), (pos, new, len(buf))
            total += len(content)
            assert len(content) <= new - pos  # unstuffing only removes octets
            progressed = new > pos
            pos = new
            if done or not progressed:
                break
        if done:
            break
        if pos > 4096:  # compact as the server does
            del buf[:pos]
            pos = 0
    assert total <= max_size and total <= len(payload)
    assert dec.size <= len(payload)
    assert len(buf) - pos <= (len(payload) if not done else len(buf))
    if not done:
        assert len(buf) - pos <= 4  # at most the octets that could begin the end marker are held back
    else:
        try:
            dec.decode(buf, pos)
        except RuntimeError:  # documented: decoding after the end marker
            pass
        else:
            raise AssertionError("decode() after the end must raise RuntimeError")


def target_bdat(data: bytes) -> None:
    """``BdatDecoder`` over chunks whose sizes come from the input."""
    b = Bytes(data)
    max_line = b.number(3, 1100)
    max_size = b.number(1, 1 << 16)
    cuts = b.byte() % 33
    sizes = [b.number(0, 300) for _ in range(b.byte() % 6 + 1)]
    payload = b.rest()
    dec = BdatDecoder(max_line, max_size)
    reads = b.chunks(payload, cuts)
    buf = bytearray()
    pos = 0
    total = 0
    for size in sizes:
        dec.start_chunk(size)
        got = 0
        complete = size == 0
        while not complete:
            if pos >= len(buf):
                if not reads:
                    break
                buf += reads.pop(0)
            content, new, complete = dec.decode(buf, pos)
            assert pos <= new <= len(buf)
            got += new - pos
            total += len(content)
            pos = new
        if not complete:
            assert dec.remaining == size - got > 0
            try:
                dec.start_chunk(1)
            except RuntimeError:  # documented: previous chunk not fully read
                pass
            else:
                raise AssertionError("start_chunk() over an unfinished chunk must raise")
            break
        assert dec.remaining == 0 and got == size
    dec.finish()
    assert total <= max_size and total <= len(payload) and dec.size <= len(payload)


# -- 3. the client's reply parser -------------------------------------------------------------------------


def target_reply(data: bytes) -> None:
    """``ReplyParser.feed`` on server bytes (ReplyError documented), then ``parse_ehlo`` on 250 replies."""
    b = Bytes(data)
    small = b.flag()
    max_line = b.number(4, 80) if small else 2048
    max_lines = b.number(1, 8) if small else 100
    cuts = b.byte() % 33
    parser = ReplyParser(max_line=max_line, max_lines=max_lines)
    for chunk in b.chunks(b.rest(), cuts):
        try:
            replies = parser.feed(chunk)
        except ReplyError:
            return  # documented; the connection is dropped, so parser state after it does not matter
        assert parser.buffered <= (max_lines + 1) * (max_line + 2), (parser.buffered, max_line, max_lines)
        for reply in replies:
            assert 200 <= reply.code <= 599
            assert len(reply.extra) < max_lines
            for line in (reply.text, *reply.extra):
                assert len(line) <= max_line
                assert not any((ord(c) < 0x20 and c != "\t") or c == "\x7f" for c in line), line
            if reply.code == 250:
                caps = parse_ehlo(reply)
                assert isinstance(caps, Capabilities)
                assert caps.size is None or 0 <= caps.size < 10**20


# -- 4. SMTP paths ----------------------------------------------------------------------------------------


def target_address(data: bytes) -> None:
    """``parse_path``; AddressError is the documented failure."""
    b = Bytes(data)
    flags = b.byte()
    raw = b.rest()
    # The server decodes paths as strict UTF-8, so lone surrogates never reach parse_path from the wire
    # (given one, it raises UnicodeEncodeError: a caller contract, not a wire-reachable crash).
    text = raw.decode("utf-8", "replace")
    if flags & 4:
        text = f"<{text}>"
    try:
        mailbox = parse_path(text, smtputf8=bool(flags & 1), allow_null=bool(flags & 2))
    except AddressError as exc:
        assert exc.reason
        return
    if mailbox is None:
        assert flags & 2 and text == "<>"
        return
    assert isinstance(mailbox, Mailbox)
    assert len(mailbox.local.encode("utf-8", "surrogatepass")) <= 64
    assert len(mailbox.domain) <= 255 + 7  # "[IPv6:...]" literals carry their tag
    assert len(str(mailbox)) <= 4 * MAX_PATH
    assert mailbox.domain == mailbox.domain.lower() or mailbox.is_literal


# -- 5. queue rows ----------------------------------------------------------------------------------------

_STATUSES = [s.value for s in RcptStatus]


def _value(b: Bytes) -> object:
    """One SQLite column value: NULL, INTEGER, REAL, TEXT or BLOB."""
    kind = b.byte() % 8
    if kind == 0:
        return None
    if kind == 1:
        return b.number(-(1 << 63), (1 << 63) - 1)
    if kind == 2:
        return b.number(0, 10**10)
    if kind == 3:
        return (math.nan, math.inf, -math.inf, 0.0, -1.5, 1e300, 1.7e9)[b.byte() % 7]
    if kind == 4:
        return b.take(b.byte() % 32)
    if kind == 5:
        return _STATUSES[b.byte() % len(_STATUSES)]
    return b.take(b.byte() % 48).decode("utf-8", "replace")


def target_queue_row(data: bytes) -> None:
    """``decode_message(row, rcpt_rows)`` on garbage rows: never raises, returns the problems."""
    b = Bytes(data)
    row = [_value(b) for _ in range(N_MESSAGE_COLUMNS)]
    if b.flag():  # params as free JSON-ish text
        row[2] = b.take(b.number(0, 4096)).decode("utf-8", "replace")
    rcpt_rows = [tuple(_value(b) for _ in range(11)) for _ in range(b.byte() % 4)]
    message, problems = decode_message(tuple(row), rcpt_rows)
    assert isinstance(message, QueuedMessage)
    assert isinstance(problems, list) and all(isinstance(p, str) for p in problems)
    assert len(message.recipients) + len(problems) >= 1
    assert len(problems) <= len(rcpt_rows) + 4


TARGETS: dict[str, Callable[[bytes], None]] = {
    "commands": target_commands,
    "server": target_server,
    "data": target_data,
    "bdat": target_bdat,
    "reply": target_reply,
    "address": target_address,
    "queue": target_queue_row,
}
