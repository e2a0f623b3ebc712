"""Test harness: feeds bytes to a ServerConnection and answers its events like a permissive session."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mailhop.reply import R, Reply
from mailhop.smtp import (
    NEED_DATA,
    BdatChunkEnd,
    ConnectionClosed,
    DataChunk,
    DataEnd,
    DataStart,
    Ehlo,
    Event,
    Limits,
    Mail,
    NeedData,
    Quit,
    Rcpt,
    ServerConnection,
    ServerSettings,
    StartTls,
)

GREETING = Reply(220, "", "mx.example.test ESMTP")

Responder = Reply | Callable[[Any], Reply | None] | None


class Harness:
    """Runs the core against an auto-responder that accepts everything unless told otherwise.

    ``responses`` maps an event type to a Reply (sent instead of the default) or a callable taking the
    event and returning a Reply (or None for the default).
    """

    def __init__(
        self,
        settings: ServerSettings | None = None,
        *,
        greet: bool = True,
        responses: dict[type, Responder] | None = None,
        **limits: Any,
    ) -> None:
        if settings is None:
            settings = ServerSettings("mx.example.test", Limits(**limits), tls_available=True)
        self.conn = ServerConnection(settings)
        self.events: list[Event] = []
        self.messages: list[bytes] = []
        self.ends: list[DataEnd] = []
        self.closed: ConnectionClosed | None = None
        self.responses = responses or {}
        self._content = bytearray()
        if greet:
            self.conn.send_greeting(GREETING)
            self.conn.data_to_send()

    def feed(self, *chunks: bytes) -> bytes:
        """Feed each chunk in turn, running the event loop after each; return all output."""
        out = bytearray()
        for chunk in chunks:
            if self.closed is not None:
                break  # a real session has closed the socket by now
            self.conn.receive_data(chunk)
            self.run()
            out += self.conn.data_to_send()
        return bytes(out)

    def feed_bytewise(self, data: bytes) -> bytes:
        return self.feed(*(data[i : i + 1] for i in range(len(data))))

    def run(self) -> None:
        while True:
            event = self.conn.next_event()
            if event is NEED_DATA:
                return
            assert not isinstance(event, NeedData)
            self.events.append(event)
            if isinstance(event, ConnectionClosed):
                self.closed = event
                return
            self.respond(event)

    def respond(self, event: Event) -> None:
        conn = self.conn
        override = self.responses.get(type(event))
        reply = override(event) if callable(override) else override
        if isinstance(event, DataChunk):
            self._content += event.data
            return
        if isinstance(event, DataEnd):
            self.ends.append(event)
            self.messages.append(bytes(self._content))
            self._content.clear()
        if reply is not None:
            conn.send(reply)
        elif isinstance(event, Ehlo):
            conn.send(conn.ehlo_reply("hello"))
        elif isinstance(event, Mail):
            conn.send(R.SENDER_OK)
        elif isinstance(event, Rcpt):
            conn.send(R.RCPT_OK)
        elif isinstance(event, DataStart):
            conn.accept_data()
        elif isinstance(event, BdatChunkEnd):
            conn.send(Reply(250, "2.0.0", f"{event.size} octets received"))
        elif isinstance(event, DataEnd):
            conn.send(event.error or Reply(250, "2.0.0", "Queued"))
        elif isinstance(event, StartTls):
            conn.send(R.READY_TLS)
        elif isinstance(event, Quit):
            conn.send(R.BYE)

    def of_type(self, kind: type) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]


def replies(out: bytes) -> list[str]:
    """Split wire output into replies, each as its last line's 'code enhanced text' (multi-line joined)."""
    result: list[str] = []
    current: list[str] = []
    for line in out.decode("utf-8").split("\r\n"):
        if not line:
            continue
        current.append(line)
        if len(line) < 4 or line[3] == " ":
            result.append("\n".join(current))
            current = []
    assert not current, f"unterminated reply {current}"
    return result


def codes(out: bytes) -> list[str]:
    """The code (and enhanced code, when present) of each reply: e.g. ['250 2.1.0', '354']."""
    result = []
    for reply in replies(out):
        last = reply.split("\n")[-1]
        parts = last.split(" ")
        if len(parts) > 1 and parts[1][:1] in "245" and parts[1].count(".") == 2:
            result.append(f"{parts[0]} {parts[1]}")
        else:
            result.append(parts[0][:3])
    return result


EHLO = b"EHLO client.example.test\r\n"
MAIL = b"MAIL FROM:<sender@example.test>\r\n"
RCPT = b"RCPT TO:<rcpt@example.net>\r\n"
OPEN_TX = EHLO + MAIL + RCPT


def ready(**kwargs: Any) -> Harness:
    """A harness after a successful EHLO."""
    h = Harness(**kwargs)
    h.feed(EHLO)
    return h


def in_transaction(**kwargs: Any) -> Harness:
    """A harness after EHLO, MAIL and one RCPT were accepted."""
    h = Harness(**kwargs)
    h.feed(OPEN_TX)
    return h
