"""A scriptable, byte-exact SMTP/LMTP receiver on loopback, for testing mailhop's delivery engine.

It runs its own asyncio loop in a background thread, so synchronous tests and async code (on another loop)
can both drive it. Written directly on asyncio streams, not aiosmtpd, to control every byte it sends and
to record exactly what it receives: per connection the command lines with the index of the read chunk each
arrived in (to tell pipelined commands apart), per message the envelope, the dot-unstuffed data and the raw
wire bytes. Replies are scripted by hooks; faults (disconnects, slow or overlong replies, STARTTLS response
injection, failing TLS handshakes) by options. See ``Options`` for the full list.

    with Receiver("127.0.0.31", 0, on_rcpt=lambda a: "550 5.1.1 No such user" if a.startswith("bad") else None) as r:
        ...  # point the client at r.host, r.port
        [tx] = r.wait_for(1)
        assert tx.rcpts == [("good@example.test", [])] and tx.bare_newlines == 0
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import re
import ssl
import threading
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

__all__ = [
    "DEFAULT_CAPABILITIES",
    "DISCONNECT",
    "Options",
    "Receiver",
    "Reply",
    "Session",
    "Transaction",
]


class _Disconnect:
    """Type of ``DISCONNECT``."""

    def __repr__(self) -> str:
        return "DISCONNECT"


#: Returned by a hook: close the connection at once, without replying.
DISCONNECT: Final = _Disconnect()

#: What a hook returns: a reply (str: one line or several separated by "\n", CRLF added; bytes: sent
#: verbatim), None for the default reply, or DISCONNECT.
Reply = str | bytes | _Disconnect | None

AddrHook = Callable[[str], Reply] | Mapping[str, Reply]
CommandHook = Callable[[str], Reply] | Mapping[str, Reply]
DataEndHook = Callable[["Transaction"], Reply] | Sequence[Reply]
LmtpRcptHook = Callable[[str, "Transaction"], Reply] | Mapping[str, Reply]

DEFAULT_CAPABILITIES: Final = (
    "PIPELINING",
    "SIZE 10240000",
    "8BITMIME",
    "ENHANCEDSTATUSCODES",
    "DSN",
    "SMTPUTF8",
    "CHUNKING",
)
STARTTLS_INJECTION: Final = b"220 Ready\r\n250-evil\r\n"
TLS_GARBAGE: Final = b"this is not a TLS handshake\r\n" * 8
# Commands allowed before STARTTLS when require_tls is set.
_PRE_TLS: Final = frozenset({"EHLO", "HELO", "LHLO", "STARTTLS", "NOOP", "RSET", "QUIT"})
_READ_SIZE: Final = 65536
_LINE_START_DOT = re.compile(rb"(\A|\r\n)\.")


@dataclass
class Options:
    """Behaviour of a Receiver; read at each use, so a test may change ``receiver.options`` between steps.

    Hooks run on the receiver's thread; a hook that raises is recorded in ``Receiver.errors`` (and the
    client gets ``451 4.3.0``), and leaving the ``with`` block then raises.
    """

    hostname: str = "receiver.test"
    #: EHLO keywords (with parameters); STARTTLS and AUTH are added from tls_context / auth_users.
    capabilities: Sequence[str] = DEFAULT_CAPABILITIES
    #: Keywords to leave out of the EHLO reply, e.g. ("PIPELINING", "CHUNKING", "STARTTLS").
    drop_capabilities: Collection[str] = ()
    #: False: EHLO gets 502, so the client must fall back to HELO.
    ehlo_supported: bool = True
    #: LMTP: LHLO instead of EHLO/HELO, and one reply per accepted recipient after the data.
    lmtp: bool = False
    #: Greeting line instead of "220 <hostname> ESMTP". 421 closes at once; any other non-220 code
    #: answers 503 to everything but QUIT (RFC 5321 3.1).
    greeting: str | bytes | None = None
    #: Any command, by verb (a mapping keyed by upper-case verb, or a callable given the whole line). A reply
    #: replaces the command's processing altogether (no state change); None processes it normally.
    on_command: CommandHook | None = None
    #: MAIL: by reverse-path ("" for <>); a 2xx reply (the default "250 2.1.0 Ok") opens the transaction.
    on_mail: AddrHook | None = None
    #: RCPT: by forward-path; a 2xx reply (the default "250 2.1.5 Ok") adds the recipient.
    on_rcpt: AddrHook | None = None
    #: Reply after the message (DATA's final dot or BDAT LAST): a callable given the Transaction, or a
    #: sequence with one entry per message in the order received. In LMTP mode used for every recipient
    #: that on_lmtp_rcpt leaves at None.
    on_data_end: DataEndHook | None = None
    #: LMTP: the reply for one accepted recipient after the data, by address.
    on_lmtp_rcpt: LmtpRcptHook | None = None
    #: Close without replying on receiving this command ("MAIL", "RCPT", "DATA", ...), or "CONNECT" (no
    #: greeting) or "." (after the whole message, before the final reply; the transaction is recorded).
    disconnect_after: str | None = None
    #: Close once this many bytes of message data (after 354, or BDAT payload) have been received.
    disconnect_mid_data: int | None = None
    #: Seconds to wait before each reply (see slow_on).
    reply_delay: float = 0.0
    #: Dribble replies at this rate, one byte per write (see slow_on).
    bytes_per_second: float | None = None
    #: Verbs whose replies reply_delay / bytes_per_second apply to ("CONNECT" = greeting, "." = the reply
    #: after the message); None = all.
    slow_on: Collection[str] | None = None
    #: Prepend a continuation line of this many "x" to the reply for huge_reply_on.
    huge_reply_line: int = 0
    huge_reply_on: str = "EHLO"
    #: Offer STARTTLS with this server context.
    tls_context: ssl.SSLContext | None = None
    #: STARTTLS response injection: True sends b"220 Ready\r\n250-evil\r\n" in one write (bytes: these);
    #: a correct client discards whatever follows the 220 before its handshake.
    starttls_inject: bool | bytes = False
    #: Offer STARTTLS, answer 220, then close ("close") or send non-TLS bytes and close ("garbage").
    tls_handshake_fail: Literal["close", "garbage"] | None = None
    #: Offer AUTH PLAIN LOGIN against this user -> password table.
    auth_users: Mapping[str, str] | None = None
    #: MAIL before a successful AUTH gets "530 5.7.0".
    require_auth: bool = False
    #: Anything but EHLO/HELO/STARTTLS/NOOP/RSET/QUIT before TLS gets "530 5.7.0"; AUTH only offered in TLS.
    require_tls: bool = False
    #: Longest command line accepted (and longest data line: the receiver holds at most this much unparsed).
    max_line_length: int = 4 * 1024 * 1024
    #: Larger messages get "552 5.3.4" and the connection is closed.
    max_message_size: int = 64 * 1024 * 1024
    #: Close with "421 4.4.2" after this many seconds without input; None waits forever.
    idle_timeout: float | None = None


@dataclass
class Transaction:
    """One message that reached its end (DATA's dot or BDAT LAST), as received."""

    mail_from: str
    mail_params: list[str]
    rcpts: list[tuple[str, list[str]]]
    data: bytes = b""
    """Message content: up to and including the CRLF before the final dot, dot-unstuffed; BDAT payloads."""
    raw: bytes = b""
    """Undecoded wire bytes: after 354 through the final CRLF.CRLF inclusive; for BDAT the payloads."""
    via: Literal["DATA", "BDAT"] = "DATA"
    tls: bool = False
    helo: str = ""
    ehlo: bool = False
    auth: str | None = None
    bare_newlines: int = 0
    """Bare CR and bare LF in the data (each not part of a CRLF pair)."""
    session: int = 0
    """Index of the connection (Receiver.sessions) it arrived on."""
    rejected_rcpts: list[str] = field(default_factory=list)
    bdat_sizes: list[int] = field(default_factory=list)
    early_data: bool = False
    """Bytes had arrived after DATA before the receiver sent 354 (a client must wait for 354)."""
    replies: list[str] = field(default_factory=list)
    """Replies sent after the message: one in SMTP, one per recipient in LMTP, none if disconnected."""


@dataclass
class Session:
    """One connection: what it said, in order, and how it ended."""

    index: int
    peer: tuple[Any, ...] | None
    commands: list[str] = field(default_factory=list)
    """Command lines as received (without CRLF), including AUTH but not SASL continuation lines."""
    chunks: list[int] = field(default_factory=list)
    """For each command, the index of the read chunk its terminating CRLF arrived in."""
    replies: list[str] = field(default_factory=list)
    tls: bool = False
    tls_version: str | None = None
    tls_error: str | None = None
    helo: str = ""
    ehlo: bool = False
    auth: str | None = None
    starttls_leftover: bytes = b""
    """Plaintext read along with STARTTLS, before the 220 (discarded; a correct client sends none)."""
    bare_newlines_in_commands: int = 0
    closed: bool = False
    closed_by: Literal["client", "server"] | None = None

    def batches(self) -> list[list[str]]:
        """Commands grouped by the read chunk they arrived in: pipelined commands share a group."""
        groups: dict[int, list[str]] = {}
        for command, chunk in zip(self.commands, self.chunks, strict=True):
            groups.setdefault(chunk, []).append(command)
        return list(groups.values())

    def verbs(self) -> list[str]:
        """Upper-case verbs of the commands, in order."""
        return [c.split(" ", 1)[0].upper() for c in self.commands]


class Receiver:
    """The receiver; ``with Receiver(host, port, **options) as r`` starts it (port 0: a free port)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, **options: Any) -> None:
        self.host = host
        self.port = port
        self.options = Options(**options)
        self.errors: list[str] = []
        self._cond = threading.Condition()
        self._sessions: list[Session] = []
        self._transactions: list[Transaction] = []
        self._messages_ended = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._ready = threading.Event()
        self._start_error: BaseException | None = None

    # -- records -------------------------------------------------------------------------------------

    @property
    def transactions(self) -> list[Transaction]:
        with self._cond:
            return list(self._transactions)

    @property
    def sessions(self) -> list[Session]:
        with self._cond:
            return list(self._sessions)

    @property
    def connections(self) -> int:
        with self._cond:
            return len(self._sessions)

    @property
    def commands(self) -> list[list[str]]:
        """Command lines per connection."""
        return [list(s.commands) for s in self.sessions]

    def clear(self) -> None:
        """Forget what was recorded so far (connections still open keep recording into their Session)."""
        with self._cond:
            self._sessions.clear()
            self._transactions.clear()
            self._messages_ended = 0

    def wait_until(
        self, predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition"
    ) -> None:
        """Block until predicate() holds, re-checked on every event (connection, command, message, close)."""
        with self._cond:
            if not self._cond.wait_for(predicate, timeout):
                raise TimeoutError(
                    f"receiver: timed out after {timeout}s waiting for {what}; {self._summary()}"
                )

    def wait_for(self, n_messages: int, timeout: float = 10.0) -> list[Transaction]:
        """Block until at least n messages were received (and answered); the transactions so far."""
        self.wait_until(lambda: len(self._transactions) >= n_messages, timeout, f"{n_messages} message(s)")
        return self.transactions

    def wait_for_connections(self, n: int, timeout: float = 10.0, *, closed: bool = False) -> list[Session]:
        """Block until n connections were accepted (with closed=True: and have ended)."""

        def done() -> bool:
            sessions = self._sessions
            return len(sessions) >= n and (not closed or all(s.closed for s in sessions[:n]))

        self.wait_until(done, timeout, f"{n} {'closed ' if closed else ''}connection(s)")
        return self.sessions

    async def wait_for_async(self, n_messages: int, within: float = 10.0) -> list[Transaction]:
        """wait_for without blocking the caller's event loop (within: its timeout in seconds)."""
        return await asyncio.to_thread(self.wait_for, n_messages, within)

    def _summary(self) -> str:
        parts = [f"{len(self._transactions)} message(s)"]
        for s in self._sessions:
            parts.append(f"conn {s.index}: {s.verbs()}{' closed' if s.closed else ''}")
        if self.errors:
            parts.append(f"errors: {self.errors}")
        return "; ".join(parts)

    def _notify(self) -> None:
        with self._cond:
            self._cond.notify_all()

    # -- lifecycle -----------------------------------------------------------------------------------

    def start(self) -> Receiver:
        """Bind and serve on a background thread; returns once the port accepts connections."""
        if self._thread is not None:
            raise RuntimeError("receiver already started")
        self._thread = threading.Thread(target=self._run, name=f"receiver-{self.host}", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._start_error is not None:
            self._thread.join()
            self._thread = None
            raise self._start_error
        return self

    def stop(self) -> None:
        """Close the listener and every connection, stop the loop and join the thread."""
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return
        if not loop.is_closed():
            future = asyncio.run_coroutine_threadsafe(self._shutdown(), loop)
            with contextlib.suppress(Exception):
                future.result(timeout=10)
            loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        self._thread = None

    def __enter__(self) -> Receiver:
        return self.start()

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.stop()
        if exc_type is None and self.errors:
            raise AssertionError(f"receiver errors: {self.errors}")

    async def __aenter__(self) -> Receiver:
        return await asyncio.to_thread(self.start)

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None:
        await asyncio.to_thread(self.__exit__, exc_type, exc, tb)

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        loop.set_exception_handler(self._loop_exception)
        try:
            try:
                self._server = loop.run_until_complete(
                    asyncio.start_server(self._handle, self.host, self.port, limit=_READ_SIZE)
                )
                self.port = self._server.sockets[0].getsockname()[1]
            except BaseException as exc:
                self._start_error = exc
                return
            finally:
                self._ready.set()
            loop.run_forever()
        finally:
            with contextlib.suppress(Exception):
                loop.run_until_complete(self._cancel_all())
                loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def _loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        # Peers vanishing mid-TLS and the like are expected here; keep them out of the test's output.
        exc = context.get("exception")
        if isinstance(exc, OSError | ssl.SSLError | asyncio.CancelledError):
            return
        self.errors.append(f"loop: {context.get('message')} {exc!r}")

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
            await asyncio.sleep(0)
        await self._cancel_all()
        if self._server is not None:
            await self._server.wait_closed()

    async def _cancel_all(self) -> None:
        current = asyncio.current_task()
        for _ in range(10):
            pending = {t for t in asyncio.all_tasks() if t is not current and not t.done()}
            if not pending:
                return
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with self._cond:
            session = Session(len(self._sessions), writer.get_extra_info("peername"))
            self._sessions.append(session)
            self._cond.notify_all()
        conn = _Connection(self, session, reader, writer)
        try:
            await conn.run()
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError, TimeoutError):
            session.closed_by = session.closed_by or "client"
        except asyncio.CancelledError:
            writer.transport.abort()
            raise
        except Exception as exc:
            self.errors.append(f"connection {session.index}: {exc!r}")
        finally:
            await conn.close()
            with self._cond:
                session.closed = True
                self._cond.notify_all()

    def _record(self, tx: Transaction) -> None:
        with self._cond:
            self._transactions.append(tx)
            self._cond.notify_all()


class _Closed(Exception):
    """Internal: the client closed the connection."""


class _Input:
    """Bytes received and not yet parsed, with the read chunk each byte arrived in."""

    def __init__(self, reader: asyncio.StreamReader, idle_timeout: Callable[[], float | None]) -> None:
        self.reader = reader
        self.buf = bytearray()
        self.base = 0  # absolute stream offset of buf[0]
        self.chunks = 0
        self._ends: list[tuple[int, int]] = []  # (absolute end offset, chunk index)
        self._idle_timeout = idle_timeout

    async def fill(self) -> None:
        """Read one more chunk; _Closed at EOF, TimeoutError after the idle timeout."""
        data = await asyncio.wait_for(self.reader.read(_READ_SIZE), self._idle_timeout())
        if not data:
            raise _Closed
        self.buf += data
        self._ends.append((self.base + len(self.buf), self.chunks))
        self.chunks += 1

    def chunk_of(self, pos: int) -> int:
        """Chunk index of buf[pos]."""
        absolute = self.base + pos
        for end, chunk in self._ends:
            if absolute < end:
                return chunk
        return self.chunks - 1

    def consume(self, n: int) -> bytes:
        out = bytes(self.buf[:n])
        del self.buf[:n]
        self.base += n
        while self._ends and self._ends[0][0] <= self.base:
            self._ends.pop(0)
        return out


@dataclass
class _Tx:
    mail_from: str
    mail_params: list[str]
    rcpts: list[tuple[str, list[str]]] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    bdat: bytearray = field(default_factory=bytearray)
    bdat_sizes: list[int] = field(default_factory=list)


def _code(reply: Reply) -> int | None:
    if isinstance(reply, _Disconnect) or reply is None:
        return None
    text = reply[:3].decode("ascii", "replace") if isinstance(reply, bytes) else reply[:3]
    return int(text) if text.isdigit() else None


def _encode(reply: str | bytes) -> bytes:
    if isinstance(reply, bytes):
        return reply
    return "".join(line + "\r\n" for line in reply.split("\n")).encode("utf-8")


def _positive(reply: Reply) -> bool:
    code = _code(reply)
    return code is not None and 200 <= code < 300


def _parse_path(args: str, keyword: str) -> tuple[str, list[str]] | None:
    """Parse "FROM:<addr> PARAMS" / "TO:<addr> PARAMS"; None on a syntax error."""
    if args[: len(keyword)].upper() != keyword:
        return None
    rest = args[len(keyword) :].lstrip(" ")
    if not rest.startswith("<"):
        return None
    quoted = False
    for i, ch in enumerate(rest[1:], 1):
        if ch == '"' and rest[i - 1] != "\\":
            quoted = not quoted
        elif ch == ">" and not quoted:
            addr, params = rest[1:i], rest[i + 1 :]
            if params and not params.startswith(" "):
                return None
            return addr, params.split()
    return None


def _bare_newlines(data: bytes) -> int:
    crlf = data.count(b"\r\n")
    return data.count(b"\r") - crlf + data.count(b"\n") - crlf


class _Connection:
    """The protocol for one connection."""

    def __init__(
        self, owner: Receiver, session: Session, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.owner = owner
        self.session = session
        self.writer = writer
        self.input = _Input(reader, lambda: owner.options.idle_timeout)
        self.tx: _Tx | None = None

    @property
    def opts(self) -> Options:
        return self.owner.options

    async def close(self) -> None:
        transport = self.writer.transport
        if self.session.closed_by is None:
            self.session.closed_by = "server"
        if not transport.is_closing():
            self.writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.writer.wait_closed(), 2)

    # -- output --------------------------------------------------------------------------------------

    async def reply(self, reply: str | bytes, verb: str) -> None:
        """Send one reply (applying the slow and huge-line faults scripted for verb)."""
        opts = self.opts
        data = _encode(reply)
        if opts.huge_reply_line and verb == opts.huge_reply_on.upper():
            data = data[:3] + b"-" + b"x" * opts.huge_reply_line + b"\r\n" + data
        slow = opts.slow_on is None or verb in {v.upper() for v in opts.slow_on}
        self.session.replies.append(data.decode("utf-8", "replace"))
        if slow and opts.reply_delay:
            await asyncio.sleep(opts.reply_delay)
        if slow and opts.bytes_per_second:
            interval = 1.0 / opts.bytes_per_second
            for i in range(len(data)):
                if i:
                    await asyncio.sleep(interval)
                self.writer.write(data[i : i + 1])
                await self.writer.drain()
        else:
            self.writer.write(data)
            await self.writer.drain()
        self.owner._notify()

    def _hook(self, hook: Any, key: str, *args: Any) -> Reply:
        if hook is None:
            return None
        try:
            if isinstance(hook, Mapping):
                return hook.get(key)
            return hook(*args)  # type: ignore[no-any-return]
        except Exception as exc:
            self.owner.errors.append(f"hook for {key!r} raised {exc!r}")
            return "451 4.3.0 receiver hook failed"

    # -- input ---------------------------------------------------------------------------------------

    async def read_line(self) -> tuple[bytes, int]:
        """Next line ending in CRLF (without it) and the chunk its CRLF arrived in."""
        inp = self.input
        scanned = 0
        while True:
            i = inp.buf.find(b"\r\n", scanned)
            if i >= 0:
                chunk = inp.chunk_of(i + 1)
                return inp.consume(i + 2)[:-2], chunk
            if len(inp.buf) > self.opts.max_line_length:
                await self.reply("500 5.5.2 Error: line too long", "")
                raise _Closed
            scanned = max(0, len(inp.buf) - 1)
            await inp.fill()

    # -- session -------------------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            await self._run()
        except _Closed:
            self.session.closed_by = self.session.closed_by or "client"
        except TimeoutError:
            with contextlib.suppress(Exception):
                await self.reply("421 4.4.2 Error: timeout exceeded", "")
            self.session.closed_by = "server"

    async def _run(self) -> None:
        opts, session = self.opts, self.session
        if opts.disconnect_after and opts.disconnect_after.upper() == "CONNECT":
            return
        greeting = opts.greeting if opts.greeting is not None else f"220 {opts.hostname} ESMTP test receiver"
        await self.reply(greeting, "CONNECT")
        code = _code(greeting)
        if code == 421:
            return
        refusing = code != 220
        while True:
            line, chunk = await self.read_line()
            text = line.decode("utf-8", "surrogateescape")
            session.commands.append(text)
            session.chunks.append(chunk)
            self.owner._notify()
            verb, _, args = text.partition(" ")
            verb = verb.upper()
            opts = self.opts
            if refusing:
                if verb == "QUIT":
                    await self.reply("221 2.0.0 Bye", verb)
                    return
                await self.reply("503 5.5.1 Error: no service here", verb)
                continue
            if opts.disconnect_after and verb == opts.disconnect_after.upper():
                return
            if b"\r" in line or b"\n" in line:
                session.bare_newlines_in_commands += 1
                await self.reply("500 5.5.2 Error: bare <CR> or <LF> received", verb)
                continue
            reply = self._hook(opts.on_command, verb, text)
            if reply is not None:
                if not await self.send_or_close(reply, verb):
                    return
                continue
            if opts.require_tls and not session.tls and verb not in _PRE_TLS:
                await self.reply("530 5.7.0 Must issue a STARTTLS command first", verb)
                continue
            handler = self._handlers.get(verb)
            if handler is None:
                await self.reply("500 5.5.2 Error: command not recognized", verb)
                continue
            if not await handler(self, args):
                return

    async def send_or_close(self, reply: Reply, verb: str) -> bool:
        """Send a hook's reply; False if the connection is to close (DISCONNECT or a 421)."""
        if isinstance(reply, _Disconnect) or reply is None:
            return False
        await self.reply(reply, verb)
        return _code(reply) != 421

    # -- commands: each returns False to close the connection ---------------------------------------------

    def _capabilities(self) -> list[str]:
        opts, session = self.opts, self.session
        caps = list(opts.capabilities)
        offers_tls = opts.tls_context is not None or opts.tls_handshake_fail or opts.starttls_inject
        if offers_tls and not session.tls:
            caps.append("STARTTLS")
        if opts.auth_users is not None and (session.tls or not opts.require_tls):
            caps.append("AUTH PLAIN LOGIN")
        dropped = {d.upper() for d in opts.drop_capabilities}
        return [c for c in caps if c.split(" ", 1)[0].upper() not in dropped]

    def _size_limit(self) -> int | None:
        for cap in self._capabilities():
            keyword, _, value = cap.partition(" ")
            if keyword.upper() == "SIZE":
                return int(value) if value.strip().isdigit() and int(value) > 0 else None
        return None

    async def _hello(self, args: str, verb: str) -> bool:
        opts, session = self.opts, self.session
        lmtp_verb = verb == "LHLO"
        if opts.lmtp != lmtp_verb:
            what = "this is LMTP: use LHLO" if opts.lmtp else "command not recognized"
            await self.reply(f"500 5.5.1 Error: {what}", verb)
            return True
        if verb == "EHLO" and not opts.ehlo_supported:
            await self.reply("502 5.5.2 Error: command not recognized", verb)
            return True
        if not args.strip():
            await self.reply(f"501 5.5.4 Syntax: {verb} hostname", verb)
            return True
        session.helo, session.ehlo = args.strip(), verb != "HELO"
        self.tx = None
        if verb == "HELO":
            await self.reply(f"250 {opts.hostname}", verb)
        else:
            lines = [opts.hostname, *self._capabilities()]
            text = "\n".join(f"250{'-' if i < len(lines) - 1 else ' '}{line}" for i, line in enumerate(lines))
            await self.reply(text, verb)
        return True

    async def _ehlo(self, args: str) -> bool:
        return await self._hello(args, "EHLO")

    async def _helo(self, args: str) -> bool:
        return await self._hello(args, "HELO")

    async def _lhlo(self, args: str) -> bool:
        return await self._hello(args, "LHLO")

    async def _mail(self, args: str) -> bool:
        opts, session = self.opts, self.session
        if not session.helo:
            await self.reply("503 5.5.1 Error: send HELO/EHLO first", "MAIL")
            return True
        if self.tx is not None:
            await self.reply("503 5.5.1 Error: nested MAIL command", "MAIL")
            return True
        if opts.require_auth and session.auth is None:
            await self.reply("530 5.7.0 Authentication required", "MAIL")
            return True
        parsed = _parse_path(args, "FROM:")
        if parsed is None:
            await self.reply("501 5.5.4 Syntax: MAIL FROM:<address>", "MAIL")
            return True
        addr, params = parsed
        limit = self._size_limit()
        for param in params:
            key, _, value = param.partition("=")
            if key.upper() == "SIZE" and limit is not None and value.isdigit() and int(value) > limit:
                await self.reply("552 5.3.4 Message size exceeds fixed limit", "MAIL")
                return True
        reply = self._hook(opts.on_mail, addr, addr)
        if reply is None:
            reply = "250 2.1.0 Ok"
        if _positive(reply):
            self.tx = _Tx(addr, params)
        return await self.send_or_close(reply, "MAIL")

    async def _rcpt(self, args: str) -> bool:
        if self.tx is None:
            await self.reply("503 5.5.1 Error: need MAIL command", "RCPT")
            return True
        parsed = _parse_path(args, "TO:")
        if parsed is None:
            await self.reply("501 5.5.4 Syntax: RCPT TO:<address>", "RCPT")
            return True
        addr, params = parsed
        reply = self._hook(self.opts.on_rcpt, addr, addr)
        if reply is None:
            reply = "250 2.1.5 Ok"
        if _positive(reply):
            self.tx.rcpts.append((addr, params))
        elif not isinstance(reply, _Disconnect):
            self.tx.rejected.append(addr)
        return await self.send_or_close(reply, "RCPT")

    async def _data(self, args: str) -> bool:
        tx = self.tx
        if tx is None:
            await self.reply("503 5.5.1 Error: need MAIL command", "DATA")
            return True
        if tx.bdat_sizes:
            await self.reply("503 5.5.1 Error: DATA after BDAT", "DATA")
            return True
        if not tx.rcpts:
            await self.reply("554 5.5.1 Error: no valid recipients", "DATA")
            return True
        if args:
            await self.reply("501 5.5.4 Syntax: DATA", "DATA")
            return True
        early = len(self.input.buf) > 0
        await self.reply("354 End data with <CR><LF>.<CR><LF>", "DATA")
        raw = await self._read_data()
        if raw is None:
            return False
        data = b"" if raw == b".\r\n" else _LINE_START_DOT.sub(rb"\1", raw[:-3])
        return await self._finish(tx, data, raw, "DATA", early)

    async def _read_data(self) -> bytes | None:
        """The raw data through CRLF.CRLF; None if the connection is to close."""
        opts, inp = self.opts, self.input
        scanned = 0
        while True:
            if inp.buf.startswith(b".\r\n"):
                end = 3
            else:
                i = inp.buf.find(b"\r\n.\r\n", scanned)
                end = i + 5 if i >= 0 else -1
            cut = opts.disconnect_mid_data
            if cut is not None and (len(inp.buf) >= cut if end < 0 else end > cut):
                return None
            if end >= 0:
                return inp.consume(end)
            if len(inp.buf) > opts.max_message_size:
                await self.reply("552 5.3.4 Error: message too large", ".")
                return None
            scanned = max(0, len(inp.buf) - 4)
            await inp.fill()

    async def _bdat(self, args: str) -> bool:
        opts, inp = self.opts, self.input
        parts = args.split()
        last = len(parts) == 2 and parts[1].upper() == "LAST"
        if not parts or not parts[0].isdigit() or len(parts) > 2 or (len(parts) == 2 and not last):
            await self.reply("501 5.5.4 Syntax: BDAT size [LAST]", "BDAT")
            return True
        if "CHUNKING" not in {c.split(" ", 1)[0].upper() for c in self._capabilities()}:
            await self.reply("500 5.5.2 Error: command not recognized", "BDAT")
            return True
        size = int(parts[0])
        tx = self.tx
        already = len(tx.bdat) if tx is not None else 0
        if already + size > opts.max_message_size:
            await self.reply("552 5.3.4 Error: message too large", "BDAT")
            return False
        while len(inp.buf) < size:
            cut = opts.disconnect_mid_data
            if cut is not None and already + len(inp.buf) >= cut:
                return False
            await inp.fill()
        cut = opts.disconnect_mid_data
        if cut is not None and already + size > cut:
            return False
        chunk = inp.consume(size)
        if tx is None or not tx.rcpts:
            error = (
                "503 5.5.1 Error: need MAIL command" if tx is None else "554 5.5.1 Error: no valid recipients"
            )
            await self.reply(error, "BDAT")
            return True
        tx.bdat += chunk
        tx.bdat_sizes.append(size)
        if not last:
            await self.reply(f"250 2.0.0 Ok: {size} octets received", "BDAT")
            return True
        data = bytes(tx.bdat)
        return await self._finish(tx, data, data, "BDAT", False)

    async def _finish(
        self, tx: _Tx, data: bytes, raw: bytes, via: Literal["DATA", "BDAT"], early: bool
    ) -> bool:
        """Reply to a complete message and record it; False to close."""
        opts, session = self.opts, self.session
        self.tx = None
        record = Transaction(
            mail_from=tx.mail_from,
            mail_params=tx.mail_params,
            rcpts=tx.rcpts,
            data=data,
            raw=raw,
            via=via,
            tls=session.tls,
            helo=session.helo,
            ehlo=session.ehlo,
            auth=session.auth,
            bare_newlines=_bare_newlines(data),
            session=session.index,
            rejected_rcpts=tx.rejected,
            bdat_sizes=tx.bdat_sizes,
            early_data=early,
        )
        try:
            if opts.disconnect_after == ".":
                return False
            ordinal = self.owner._messages_ended
            self.owner._messages_ended += 1
            default: Reply
            if isinstance(opts.on_data_end, Sequence) and not isinstance(opts.on_data_end, str | bytes):
                default = opts.on_data_end[ordinal] if ordinal < len(opts.on_data_end) else None
            else:
                default = self._hook(opts.on_data_end, ".", record)
            if not opts.lmtp:
                reply = default if default is not None else f"250 2.0.0 Ok: queued as R{ordinal:04d}"
                if isinstance(reply, _Disconnect):
                    return False
                record.replies.append(_encode(reply).decode("utf-8", "replace").rstrip("\r\n"))
                return await self.send_or_close(reply, ".")
            for addr, _params in tx.rcpts:
                scripted = self._hook(opts.on_lmtp_rcpt, addr, addr, record)
                if scripted is None:
                    scripted = default if default is not None else f"250 2.1.5 <{addr}> Ok"
                reply = scripted
                if isinstance(reply, _Disconnect):
                    return False
                record.replies.append(_encode(reply).decode("utf-8", "replace").rstrip("\r\n"))
                if not await self.send_or_close(reply, "."):
                    return False
            return True
        finally:
            self.owner._record(record)

    async def _rset(self, args: str) -> bool:
        self.tx = None
        await self.reply("250 2.0.0 Ok", "RSET")
        return True

    async def _noop(self, args: str) -> bool:
        await self.reply("250 2.0.0 Ok", "NOOP")
        return True

    async def _vrfy(self, args: str) -> bool:
        await self.reply("252 2.0.0 Cannot VRFY user", "VRFY")
        return True

    async def _quit(self, args: str) -> bool:
        await self.reply("221 2.0.0 Bye", "QUIT")
        self.session.closed_by = "client"
        return False

    async def _starttls(self, args: str) -> bool:
        opts, session = self.opts, self.session
        if "STARTTLS" not in self._capabilities():
            await self.reply("502 5.5.1 Error: command not implemented", "STARTTLS")
            return True
        if args:
            await self.reply("501 5.5.4 Syntax: STARTTLS", "STARTTLS")
            return True
        if opts.tls_handshake_fail is not None:
            await self.reply("220 2.0.0 Ready to start TLS", "STARTTLS")
            if opts.tls_handshake_fail == "garbage":
                self.writer.write(TLS_GARBAGE)
                await self.writer.drain()
            return False
        if opts.tls_context is None:
            await self.reply("454 4.7.0 TLS not available (no tls_context)", "STARTTLS")
            return True
        if self.input.buf:
            session.starttls_leftover += self.input.consume(len(self.input.buf))
        if opts.starttls_inject:
            injected = opts.starttls_inject if isinstance(opts.starttls_inject, bytes) else STARTTLS_INJECTION
            await self.reply(injected, "STARTTLS")
        else:
            await self.reply("220 2.0.0 Ready to start TLS", "STARTTLS")
        # No await may yield between the 220 and start_tls: the client's hello must reach the TLS layer.
        try:
            await self.writer.start_tls(opts.tls_context, ssl_handshake_timeout=10)
        except (ssl.SSLError, OSError, TimeoutError) as exc:
            session.tls_error = repr(exc)
            return False
        ssl_object = self.writer.get_extra_info("ssl_object")
        session.tls = True
        session.tls_version = ssl_object.version() if ssl_object is not None else None
        session.helo, session.ehlo, session.auth = "", False, None
        self.tx = None
        self.owner._notify()
        return True

    async def _auth(self, args: str) -> bool:
        opts, session = self.opts, self.session
        if opts.auth_users is None or "AUTH" not in {c.split(" ", 1)[0] for c in self._capabilities()}:
            await self.reply("502 5.5.1 Error: command not implemented", "AUTH")
            return True
        if not session.helo:
            await self.reply("503 5.5.1 Error: send HELO/EHLO first", "AUTH")
            return True
        if session.auth is not None:
            await self.reply("503 5.5.1 Error: already authenticated", "AUTH")
            return True
        if self.tx is not None:
            await self.reply("503 5.5.1 Error: MAIL transaction in progress", "AUTH")
            return True
        mechanism, _, initial = args.partition(" ")
        mechanism = mechanism.upper()
        try:
            if mechanism == "PLAIN":
                response = await self._sasl_response(initial.strip() or None, "")
                if response is None:
                    return True
                _authzid, user, password = response.split(b"\0", 2)
            elif mechanism == "LOGIN":
                user_b = await self._sasl_response(initial.strip() or None, "VXNlcm5hbWU6")
                if user_b is None:
                    return True
                password_b = await self._sasl_response(None, "UGFzc3dvcmQ6")
                if password_b is None:
                    return True
                user, password = user_b, password_b
            else:
                await self.reply("504 5.5.4 Unrecognized authentication type", "AUTH")
                return True
        except ValueError:
            await self.reply("501 5.5.2 Cannot decode response", "AUTH")
            return True
        name, secret = user.decode("utf-8", "replace"), password.decode("utf-8", "replace")
        if opts.auth_users.get(name) == secret:
            session.auth = name
            await self.reply("235 2.7.0 Authentication successful", "AUTH")
        else:
            await self.reply("535 5.7.8 Error: authentication failed", "AUTH")
        return True

    async def _sasl_response(self, initial: str | None, challenge: str) -> bytes | None:
        """Decoded client response (the initial one, or after a 334 challenge); None if cancelled."""
        if initial is None:
            await self.reply(f"334 {challenge}", "AUTH")
            line, _chunk = await self.read_line()
            text = line.decode("ascii", "replace").strip()
        else:
            text = initial
        if text == "*":
            await self.reply("501 5.7.0 Authentication aborted", "AUTH")
            return None
        if text == "=":
            return b""
        try:
            return base64.b64decode(text, validate=True)
        except binascii.Error as exc:
            raise ValueError(str(exc)) from exc

    _handlers: Final[dict[str, Callable[[_Connection, str], Any]]] = {
        "EHLO": _ehlo,
        "HELO": _helo,
        "LHLO": _lhlo,
        "MAIL": _mail,
        "RCPT": _rcpt,
        "DATA": _data,
        "BDAT": _bdat,
        "RSET": _rset,
        "NOOP": _noop,
        "VRFY": _vrfy,
        "QUIT": _quit,
        "STARTTLS": _starttls,
        "AUTH": _auth,
    }
