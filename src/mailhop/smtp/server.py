"""The sans-IO SMTP server connection: bytes in, events out, replies in, bytes out (h11 style).

Untrusted input: everything passed to ``receive_data`` — command lines, message content and BDAT
chunks from the client, in any split and any amount. The core frames and bounds it (command lines
never buffer beyond the limit, content is scanned in C), answers what it can alone, and hands the
session one event at a time; ``next_event`` refuses to run ahead while an event awaits its reply, which
keeps replies in command order and makes pipelining (RFC 2920) safe.

AUTH (RFC 4954): the core checks order, mechanism and encryption, decodes base64 and frames the
exchange; the session runs the SASL mechanism (sasl.py) and answers each AuthStart/AuthResponse with
334 (continue: the next line is a response, bounded by max_auth_line), 235 (success) or an error.
Credentials are never checked here.
"""

from __future__ import annotations

import binascii
import functools

from ..address import Mailbox
from ..envelope import Recipient
from ..reply import R, Reply
from .commands import Bdat, CommandParser, Data, Forbidden, Help, Noop, Rset, Vrfy
from .data import BdatDecoder, DataDecoder, take
from .events import (
    NEED_DATA,
    AuthAborted,
    AuthResponse,
    AuthStart,
    BdatChunkEnd,
    ConnectionClosed,
    DataChunk,
    DataEnd,
    DataStart,
    Ehlo,
    Event,
    Mail,
    NeedData,
    Quit,
    Rcpt,
    Reset,
    StartTls,
    Transaction,
)
from .params import NO_MAIL_PARAMS
from .sasl import AuthReply
from .settings import ServerSettings
from .state import AUTH_SEQUENCE, SEQUENCE, State

__all__ = ["ServerConnection"]

# Module-level aliases: the hot loop compares states by identity without attribute lookups.
_GREETING = State.GREETING
_NEED_HELO = State.NEED_HELO
_READY = State.READY
_HAVE_MAIL = State.HAVE_MAIL
_HAVE_RCPT = State.HAVE_RCPT
_IN_DATA = State.IN_DATA
_IN_BDAT_CHUNK = State.IN_BDAT_CHUNK
_BDAT_ACTIVE = State.BDAT_ACTIVE
_BDAT_FAILED = State.BDAT_FAILED
_TLS_PENDING = State.TLS_PENDING
_REJECTING = State.REJECTING
_AUTH_RESPONSE = State.AUTH_RESPONSE
_CLOSED = State.CLOSED

_RESET = Reset()
_NO_TRANSACTION = Transaction(None, NO_MAIL_PARAMS, ())
_DATA_START = DataStart(False)
_BDAT_START = DataStart(True)

# Wire bytes of the catalogue replies, keyed by identity: they live as long as the process, so an id
# can never be reused by another object, and the lookup avoids hashing a dataclass per reply.
_CATALOGUE_WIRE = {
    id(r): r.to_bytes() for r in (*vars(R).values(), *vars(AuthReply).values()) if isinstance(r, Reply)
}


def _check_auth_reply(reply: Reply) -> None:
    """A step of an AUTH exchange is answered 334 (bare base64 text), 235 or an error (RFC 4954 4, 6)."""
    code = reply.code
    if code == 334:
        if reply.enhanced or reply.extra:
            raise ValueError("a 334 carries only the base64 challenge: use sasl.challenge_reply()")
    elif code != 235 and code < 400:
        raise ValueError(f"answer an AUTH step with 334, 235 or a 4xx/5xx, not {code}")


@functools.lru_cache(maxsize=64)
def _wire_multiline(reply: Reply) -> bytes:
    return reply.to_bytes()


def _wire(reply: Reply) -> bytes:
    wire = _CATALOGUE_WIRE.get(id(reply))
    if wire is not None:
        return wire
    # The EHLO reply, the one multi-line reply, is equal for every session of a listener: encoded once.
    return _wire_multiline(reply) if reply.extra else reply.to_bytes()


class ServerConnection:
    """One SMTP server dialogue without I/O. See the module docstring for the calling pattern."""

    __slots__ = (
        "_auth_aborted",
        "_auth_limit",
        "_authenticated",
        "_bdat",
        "_chunk_last",
        "_chunk_refusal",
        "_chunk_remaining",
        "_chunk_return",
        "_chunk_size",
        "_closed",
        "_data",
        "_eof",
        "_errors",
        "_extended",
        "_has_mail",
        "_in",
        "_limits",
        "_mail_params",
        "_out",
        "_overshoot",
        "_parser",
        "_pending",
        "_pos",
        "_recipients",
        "_sender",
        "_skipping",
        "_state",
        "_tls_active",
        "discarded_after_starttls",
        "helo",
        "settings",
    )

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self._limits = settings.limits
        self._parser = CommandParser(
            settings.limits,
            dsn=settings.advertise_dsn,
            smtputf8=settings.advertise_smtputf8,
            auth=bool(settings.auth_mechanisms),
        )
        self._in = bytearray()
        self._pos = 0  # consumed prefix of _in; compacted once per receive_data, not per command
        self._out = bytearray()
        self._state = _GREETING
        self._pending: Event | None = None
        self._errors = 0
        self._overshoot = 0  # RCPTs refused for the recipient limit in this transaction
        self._eof = False
        self._closed: ConnectionClosed | None = None
        self._skipping = False  # discarding the rest of an overlong command line
        self._tls_active = settings.tls_active
        #: Octets received after our 220 to STARTTLS and before tls_started(): thrown away (RFC 3207 5).
        self.discarded_after_starttls = 0
        #: The name from the last accepted EHLO/HELO, None before one.
        self.helo: str | None = None
        self._extended = False  # the accepted greeting was EHLO (AUTH needs it)
        self._authenticated = False
        self._auth_limit = max(settings.limits.max_auth_line, settings.limits.max_command_line)
        self._auth_aborted: AuthAborted | None = None  # set when line framing ended an exchange
        self._has_mail = False
        self._sender: Mailbox | None = None
        self._mail_params = NO_MAIL_PARAMS
        self._recipients: list[Recipient] = []
        self._data: DataDecoder | None = None
        self._bdat: BdatDecoder | None = None
        self._chunk_size = 0
        self._chunk_last = False
        self._chunk_remaining = 0  # octets still to skip of a refused chunk
        self._chunk_refusal: Reply | None = None  # set while skipping a refused chunk
        self._chunk_return = _READY  # state after the refused chunk

    # -- public API ----------------------------------------------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    @property
    def tls_active(self) -> bool:
        return self._tls_active

    @property
    def authenticated(self) -> bool:
        """True after the session answered an AUTH exchange with 235, until STARTTLS (RFC 3207 4.2)."""
        return self._authenticated

    @property
    def in_transaction(self) -> bool:
        """True once a MAIL was accepted, until the message ends or the transaction is reset."""
        return self._has_mail

    @property
    def transaction(self) -> Transaction:
        """The current transaction's accepted MAIL and RCPTs; empty (no sender, no recipients) outside one."""
        if not self._has_mail:
            return _NO_TRANSACTION
        return Transaction(self._sender, self._mail_params, tuple(self._recipients))

    def receive_data(self, data: bytes) -> None:
        """Feed bytes read from the peer; ``b""`` means the peer closed its side (EOF; repeating it is harmless)."""
        if not data:
            self._eof = True
            return
        if self._eof:
            raise RuntimeError("receive_data() after EOF")
        state = self._state
        if state is _TLS_PENDING:
            self.discarded_after_starttls += len(data)
            return
        if state is _CLOSED:
            return
        if self._pos:
            del self._in[: self._pos]
            self._pos = 0
        self._in += data

    def data_to_send(self) -> bytes:
        """Take all queued reply bytes (write them in one go: a pipelined batch's replies together)."""
        out = bytes(self._out)
        self._out.clear()
        return out

    def send_greeting(self, reply: Reply) -> None:
        """Queue the greeting: 220 opens the dialogue, 554 only accepts QUIT, 421 closes."""
        if self._state is not _GREETING:
            raise RuntimeError("greeting already sent")
        if reply.code == 220:
            self._state = _NEED_HELO
        elif reply.code == 554:
            self._state = _REJECTING
        elif reply.code == 421:
            self._close("421 greeting")
        else:
            raise ValueError(f"a greeting is 220, 554 or 421, not {reply.code}")
        self._out += _wire(reply)

    def ehlo_reply(self, text: str = "") -> Reply:
        """The 250 reply to the pending EHLO (with our extensions) or HELO (one line)."""
        first = f"{self.settings.hostname} {text}" if text else self.settings.hostname
        pending = self._pending
        if isinstance(pending, Ehlo) and not pending.extended:
            return Reply(250, "", first)
        s = self.settings
        ext = ["PIPELINING", f"SIZE {self._limits.max_message_size}", "8BITMIME", "ENHANCEDSTATUSCODES"]
        if s.advertise_smtputf8:
            ext.append("SMTPUTF8")
        if s.advertise_dsn:
            ext.append("DSN")
        if s.advertise_chunking:
            ext.append("CHUNKING")
        if s.auth_mechanisms and (self._tls_active or s.auth_plaintext_ok):
            # RFC 4954 4 / common practice: offer AUTH only where the credentials cannot be sniffed.
            ext.append("AUTH " + " ".join(s.auth_mechanisms))
        if s.tls_available and not self._tls_active:
            ext.append("STARTTLS")
        return Reply(250, "", first, tuple(ext))

    def wants_timeout(self) -> float:
        """Seconds the session should wait for the next read."""
        if self._state is _IN_DATA or self._state is _IN_BDAT_CHUNK:
            return self._limits.data_timeout
        return self._limits.command_timeout

    def timeout_reply(self) -> Reply:
        """The read timed out: close the dialogue and return the 421 4.4.2 for the session to write.

        Not queued: the session writes it after flushing ``data_to_send()`` and then closes.
        """
        if self._state is not _CLOSED:
            self._close("timeout")
        return R.TIMEOUT

    def tls_started(self) -> None:
        """The TLS handshake after our 220 succeeded: start afresh (RFC 3207 4.2), expecting EHLO."""
        if self._state is not _TLS_PENDING:
            raise RuntimeError("tls_started() without an accepted STARTTLS")
        self._tls_active = True
        self.helo = None
        self._extended = False
        self._authenticated = False  # RFC 3207 4.2: forget everything learned before TLS
        self._skipping = False
        self._clear_transaction()
        self._state = _NEED_HELO

    def accept_data(self) -> None:
        """Accept the pending DataStart: queues 354 for DATA; for BDAT the chunk is read next."""
        pending = self._pending
        if not isinstance(pending, DataStart):
            raise RuntimeError("accept_data() without a pending DataStart")
        self._pending = None
        if pending.bdat:
            self._state = _IN_BDAT_CHUNK
        else:
            self._data = DataDecoder(self._limits.max_text_line, self._limits.max_message_size)
            self._state = _IN_DATA
            self._out += _wire(R.START_DATA)

    def send(self, reply: Reply) -> None:
        """Reply to the pending event and apply its state transition."""
        event = self._pending
        if event is None:
            raise RuntimeError("send() but no event awaits a reply")
        if isinstance(event, DataStart) and reply.code < 400:
            raise ValueError("accept a DataStart with accept_data(), refuse it with a 4xx/5xx")
        if isinstance(event, (AuthStart, AuthResponse)):
            _check_auth_reply(reply)
        self._pending = None
        ok = 200 <= reply.code < 300
        if isinstance(event, Mail):
            if ok:
                self._has_mail = True
                self._sender = event.sender
                self._mail_params = event.params
                self._state = _HAVE_MAIL
        elif isinstance(event, Rcpt):
            if ok:
                self._recipients.append(event.recipient)
                self._state = _HAVE_RCPT
        elif isinstance(event, DataEnd):
            self._clear_transaction()
            self._state = _READY
        elif isinstance(event, BdatChunkEnd):
            self._state = _BDAT_ACTIVE if ok else _BDAT_FAILED
            if not ok:
                self._bdat = None
        elif isinstance(event, DataStart):
            if event.bdat and reply.code != 421:
                # The chunk's octets are on their way: skip them, then send this refusal (RFC 3030).
                self._refuse_chunk(reply, _READY if self._chunk_last else _BDAT_FAILED, self._chunk_size)
                self._bdat = None
                return
        elif isinstance(event, Ehlo):
            if ok:
                self.helo = event.hostname
                self._extended = event.extended
                self._state = _READY
        elif isinstance(event, StartTls):
            if ok:
                self.discarded_after_starttls += len(self._in) - self._pos
                self._in.clear()
                self._pos = 0
                self._state = _TLS_PENDING
        elif isinstance(event, Quit):
            self._write(reply)
            self._close("quit")
            return
        elif isinstance(event, (AuthStart, AuthResponse)):
            if reply.code == 334:
                self._state = _AUTH_RESPONSE  # the next line is the client's response
            else:
                self._state = _READY  # 235 or an error (counted by _write) ends the exchange
                if reply.code == 235:
                    self._authenticated = True
        self._write(reply)

    def next_event(self) -> Event | NeedData:
        """The next event for the session, or NEED_DATA. Raises RuntimeError while a reply is owed."""
        if self._pending is not None:
            raise RuntimeError(f"{type(self._pending).__name__} event still awaits its reply")
        while True:
            state = self._state
            if state is _IN_DATA:
                return self._data_event()
            if state is _IN_BDAT_CHUNK:
                bdat_event = self._bdat_event()
                if bdat_event is not None:
                    return bdat_event
            elif state is _CLOSED:
                assert self._closed is not None
                return self._closed
            elif state is _TLS_PENDING:
                self.discarded_after_starttls += len(self._in) - self._pos
                self._in.clear()
                self._pos = 0
                return self._close("peer closed the connection") if self._eof else NEED_DATA
            elif state is _GREETING:
                raise RuntimeError("send_greeting() before next_event()")
            else:
                line = self._read_line()
                if line is None:
                    if self._state is _CLOSED:
                        continue
                    aborted = self._auth_aborted
                    if aborted is not None:
                        self._auth_aborted = None
                        return aborted
                    return self._close("peer closed the connection") if self._eof else NEED_DATA
                if self._state is _AUTH_RESPONSE:
                    return self._auth_response(line)
                event = self._command(line)
                if event is not None:
                    return event

    # -- command mode --------------------------------------------------------------------------------

    def _read_line(self) -> bytes | None:
        """The next complete command line without its CRLF; None when more input is needed.

        Framing errors are answered here: an overlong line is skipped to its LF and answered once,
        a line with a bare CR or LF is dropped and answered, so the dialogue stays in step. In an AUTH
        exchange the line may be up to max_auth_line long, and a framing error also ends the exchange
        (returning None with ``_auth_aborted`` set).
        """
        buf = self._in
        while self._state is not _CLOSED:
            pos = self._pos
            auth = self._state is _AUTH_RESPONSE
            if self._skipping:
                nl = buf.find(b"\n", pos)
                if nl < 0:
                    buf.clear()  # never buffer an overlong line
                    self._pos = 0
                    return None
                self._pos = nl + 1
                self._skipping = False
                if auth:
                    self._auth_aborted = self._abort_auth(AuthReply.LINE_TOO_LONG, "line too long")
                    return None
                self._write(R.LINE_TOO_LONG)
                continue
            limit = self._auth_limit if auth else self._limits.max_command_line
            nl = buf.find(b"\n", pos, pos + limit)
            if nl < 0:
                if len(buf) - pos >= limit:
                    self._skipping = True
                    continue
                return None
            self._pos = nl + 1
            # LF without CR, or a CR inside the line.
            line = None if nl == pos or buf[nl - 1] != 0x0D else take(buf, pos, nl - 1)
            if line is None or b"\r" in line:
                if auth:
                    self._auth_aborted = self._abort_auth(R.BARE_NEWLINE_CMD, "bare newline")
                    return None
                self._write(R.BARE_NEWLINE_CMD)
                continue
            return line
        return None

    def _command(self, line: bytes) -> Event | None:
        """Handle one command line: return the event for the session, or None if answered here."""
        state = self._state
        cmd = self._parser.parse(line, self._mail_params.smtputf8)
        if isinstance(cmd, Reply):
            self._write(R.BAD_SEQUENCE if state is _REJECTING else cmd)
            return None
        if isinstance(cmd, Forbidden):
            return self._close(f"forbidden command {cmd.verb}")
        kind = type(cmd)
        if kind is StartTls and state is not _REJECTING:
            if not self.settings.tls_available:
                self._write(R.NOT_IMPLEMENTED)
                return None
            if self._tls_active:
                self._write(R.BAD_SEQUENCE)
                return None
        error = SEQUENCE[state].get(kind, R.BAD_SEQUENCE)
        if isinstance(cmd, Bdat):
            return self._bdat_command(cmd, error)
        if isinstance(cmd, AuthStart):
            return self._auth_command(cmd)
        if error is not None:
            self._write(error)
            return None
        if isinstance(cmd, Rcpt):
            if len(self._recipients) >= self._limits.max_recipients:
                self._overshoot += 1
                self._write(R.TOO_MANY_RECIPIENTS, counts=self._overshoot > self._limits.recipient_overshoot)
                return None
            self._pending = cmd
            return cmd
        if isinstance(cmd, (Mail, StartTls, Quit)):
            self._pending = cmd
            return cmd
        if kind is Data:
            self._pending = _DATA_START
            return _DATA_START
        if isinstance(cmd, Ehlo):
            # RFC 5321 4.1.4: EHLO/HELO resets the transaction exactly as RSET would.
            self._clear_transaction()
            self._state = _NEED_HELO if self.helo is None else _READY
            self._pending = cmd
            return cmd
        if kind is Rset:
            self._clear_transaction()
            self._state = _NEED_HELO if self.helo is None else _READY
            self._write(R.RESET_OK)
            return _RESET
        if kind is Noop:
            self._write(R.NOOP_OK)
        elif kind is Help:
            self._write(R.HELP)
        elif kind is Vrfy:
            self._write(R.VRFY)
        return None

    def _bdat_command(self, cmd: Bdat, error: Reply | None) -> Event | None:
        state = self._state
        if error is None and not self.settings.advertise_chunking:
            error = R.NOT_IMPLEMENTED
        if error is not None:
            # A refused BDAT still has its octets coming: skip them, then reply, or they would be
            # read as commands. A refused LAST chunk ends a failed BDAT message.
            back = _READY if state is _BDAT_FAILED and cmd.last else state
            self._refuse_chunk(error, back, cmd.size)
            return None
        self._chunk_size = cmd.size
        self._chunk_last = cmd.last
        if state is _HAVE_RCPT:
            self._bdat = BdatDecoder(self._limits.max_text_line, self._limits.max_message_size)
            self._bdat.start_chunk(cmd.size)
            self._pending = _BDAT_START
            return _BDAT_START
        assert self._bdat is not None  # BDAT_ACTIVE always has a decoder
        self._bdat.start_chunk(cmd.size)
        self._state = _IN_BDAT_CHUNK
        return None

    def _auth_command(self, cmd: AuthStart) -> Event | None:
        """AUTH: the order (state.py), then RFC 4954 4's rules, mechanism (504) and encryption (538)."""
        s = self.settings
        error = AUTH_SEQUENCE.get(self._state, R.BAD_SEQUENCE)
        if error is None:
            if not self._extended:
                error = AuthReply.NEED_EHLO  # after HELO: AUTH is an ESMTP extension
            elif self._authenticated:
                error = AuthReply.ALREADY_AUTHENTICATED
            elif cmd.mechanism not in s.auth_mechanisms:
                error = AuthReply.UNKNOWN_MECHANISM
            elif not (self._tls_active or s.auth_plaintext_ok):
                error = AuthReply.ENCRYPTION_REQUIRED
        if error is not None:
            self._write(error)
            return None
        self._pending = cmd
        return cmd

    def _auth_response(self, line: bytes) -> Event:
        """One client line of a running exchange (RFC 4954 4): "*" cancels, else base64 ("=" is empty)."""
        line = line.rstrip(b" \t")
        if line == b"*":
            return self._abort_auth(AuthReply.CANCELLED, "cancelled")
        if line == b"=":  # only defined for the initial response; our own client sends it here too
            data = b""
        else:
            try:
                data = binascii.a2b_base64(line, strict_mode=True)
            except binascii.Error:
                return self._abort_auth(AuthReply.BAD_BASE64, "bad base64")
        event = AuthResponse(data)
        self._pending = event
        return event

    def _abort_auth(self, reply: Reply, reason: str) -> AuthAborted:
        """End the exchange from the core's side: back to READY, then the (counted) error reply."""
        self._state = _READY
        self._write(reply)
        return AuthAborted(reason)

    def _refuse_chunk(self, reply: Reply, back: State, size: int) -> None:
        self._chunk_refusal = reply
        self._chunk_return = back
        self._chunk_remaining = size
        self._state = _IN_BDAT_CHUNK

    # -- content mode --------------------------------------------------------------------------------

    def _data_event(self) -> Event | NeedData:
        decoder = self._data
        assert decoder is not None
        if not decoder.done:
            content, self._pos, _ = decoder.decode(self._in, self._pos)
            if content:
                return DataChunk(content)
            if not decoder.done:
                return self._close("peer closed the connection during DATA") if self._eof else NEED_DATA
        return self._end_event(decoder)

    def _bdat_event(self) -> Event | NeedData | None:
        """Read BDAT octets; None when a refused chunk was skipped and answered (keep going)."""
        refusal = self._chunk_refusal
        if refusal is not None:
            n = min(self._chunk_remaining, len(self._in) - self._pos)
            self._pos += n
            self._chunk_remaining -= n
            if self._chunk_remaining:
                return self._close("peer closed the connection during BDAT") if self._eof else NEED_DATA
            self._chunk_refusal = None
            if self._chunk_return is _READY:
                self._clear_transaction()
            self._state = self._chunk_return
            self._write(refusal)
            return None
        decoder = self._bdat
        assert decoder is not None
        content, self._pos, done = decoder.decode(self._in, self._pos)
        if content:
            return DataChunk(content)
        if not done:
            return self._close("peer closed the connection during BDAT") if self._eof else NEED_DATA
        if self._chunk_last:
            decoder.finish()
            return self._end_event(decoder)
        event = BdatChunkEnd(self._chunk_size)
        self._pending = event
        return event

    def _end_event(self, decoder: DataDecoder | BdatDecoder) -> DataEnd:
        if decoder.too_big:
            error: Reply | None = R.MESSAGE_TOO_BIG
        elif decoder.bare_newline:
            error = R.BARE_NEWLINE_DATA
        elif decoder.line_too_long:
            error = R.DATA_LINE_TOO_LONG
        else:
            error = None
        event = DataEnd(error, decoder.bare_newline, decoder.line_too_long, decoder.too_big, decoder.size)
        self._data = None
        self._bdat = None
        self._pending = event
        return event

    # -- helpers -------------------------------------------------------------------------------------

    def _clear_transaction(self) -> None:
        self._has_mail = False
        self._sender = None
        self._mail_params = NO_MAIL_PARAMS
        if self._recipients:
            self._recipients = []
            self._overshoot = 0
        self._data = None
        self._bdat = None

    def _write(self, reply: Reply, *, counts: bool = True) -> None:
        """Queue a reply; count errors and close after max_errors of them or after any 421."""
        self._out += _wire(reply)
        code = reply.code
        if code < 400 or self._state is _CLOSED or not counts:
            return
        if code == 421:
            self._close(f"sent {reply}")
            return
        self._errors += 1
        if self._errors >= self._limits.max_errors:
            self._out += _wire(R.TOO_MANY_ERRORS)
            self._close("too many errors")

    def _close(self, reason: str) -> ConnectionClosed:
        self._state = _CLOSED
        self._pending = None
        self._in.clear()
        self._pos = 0
        self._closed = ConnectionClosed(reason)
        return self._closed
