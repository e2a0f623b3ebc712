"""STARTTLS (RFC 3207): command injection defence and the full reset after the handshake."""

from __future__ import annotations

import pytest

from mailhop.reply import R
from mailhop.smtp import NEED_DATA, ConnectionClosed, Ehlo, ServerConnection, ServerSettings, StartTls, State

from .helpers import EHLO, MAIL, Harness, codes, in_transaction, ready


def state_of(conn: ServerConnection) -> State:
    """The state now (a call: mypy narrows ``conn.state`` after an assert and would not see tls_started() change it)."""
    return conn.state


def test_starttls_injection_is_discarded() -> None:
    h = ready()
    conn = h.conn
    conn.receive_data(b"STARTTLS\r\nEHLO x\r\n")
    assert conn.next_event() == StartTls()
    conn.send(R.READY_TLS)
    assert conn.state is State.TLS_PENDING
    assert conn.next_event() is NEED_DATA
    assert conn.data_to_send() == b"220 2.0.0 Ready to start TLS\r\n"
    assert conn.discarded_after_starttls == len(b"EHLO x\r\n") == 8
    conn.receive_data(b"MAIL FROM:<a@b.test>\r\n")  # still plaintext, still before the handshake
    assert conn.next_event() is NEED_DATA
    assert conn.discarded_after_starttls == 30
    conn.tls_started()
    assert state_of(conn) is State.NEED_HELO and conn.tls_active
    assert conn.next_event() is NEED_DATA
    assert conn.data_to_send() == b""  # the injected EHLO and MAIL are never answered
    assert conn.helo is None and not conn.in_transaction
    assert codes(h.feed(MAIL)) == ["503 5.5.1"]
    out = h.feed(b"EHLO secure.test\r\n")
    assert b"STARTTLS" not in out and out.startswith(b"250-mx.example.test")
    assert h.of_type(Ehlo)[-1] == Ehlo("secure.test", True)


def test_starttls_twice_is_503() -> None:
    h = ready()
    h.feed(b"STARTTLS\r\n")
    h.conn.tls_started()
    h.feed(EHLO)
    assert codes(h.feed(b"STARTTLS\r\n")) == ["503 5.5.1"]


def test_starttls_not_available_is_502() -> None:
    h = Harness(ServerSettings("mx.test", tls_available=False))
    h.feed(EHLO)
    assert codes(h.feed(b"STARTTLS\r\n")) == ["502 5.5.1"]


def test_starttls_with_implicit_tls_is_503() -> None:
    h = Harness(ServerSettings("mx.test", tls_available=True, tls_active=True))
    h.feed(EHLO)
    assert codes(h.feed(b"STARTTLS\r\n")) == ["503 5.5.1"]


def test_starttls_sequence_rules() -> None:
    assert codes(Harness().feed(b"STARTTLS\r\n")) == ["503 5.5.1"]
    assert codes(in_transaction().feed(b"STARTTLS\r\n")) == ["503 5.5.1"]
    assert codes(ready().feed(b"STARTTLS now\r\n")) == ["501 5.5.4"]


def test_refused_starttls_keeps_pipeline() -> None:
    h = ready(responses={StartTls: R.TLS_NOT_AVAILABLE})
    assert codes(h.feed(b"STARTTLS\r\nNOOP\r\n")) == ["454 4.7.0", "250 2.0.0"]
    assert h.conn.state is State.READY and not h.conn.tls_active


def test_tls_started_without_starttls() -> None:
    with pytest.raises(RuntimeError):
        ready().conn.tls_started()


def test_eof_while_tls_pending() -> None:
    h = ready()
    h.feed(b"STARTTLS\r\n", b"")
    assert h.closed == ConnectionClosed("peer closed the connection")
