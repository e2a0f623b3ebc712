"""ServerConnection dialogue: replies the core sends itself, events, pipelining, limits and errors."""

from __future__ import annotations

import pytest

from mailhop.envelope import MailParams
from mailhop.reply import R, Reply
from mailhop.smtp import (
    NEED_DATA,
    ConnectionClosed,
    DataChunk,
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
    State,
    Transaction,
)

from .helpers import EHLO, MAIL, OPEN_TX, RCPT, Harness, codes, in_transaction, ready, replies

# -- greeting --------------------------------------------------------------------------------------


def test_greeting_220_opens_dialogue() -> None:
    conn = ServerConnection(ServerSettings("mx.example.test"))
    conn.send_greeting(Reply(220, "", "mx.example.test ESMTP"))
    assert conn.state is State.NEED_HELO
    assert conn.data_to_send() == b"220 mx.example.test ESMTP\r\n"
    assert conn.data_to_send() == b""


def test_next_event_before_greeting_is_an_error() -> None:
    conn = ServerConnection(ServerSettings("mx.example.test"))
    with pytest.raises(RuntimeError):
        conn.next_event()


def test_greeting_twice_or_with_wrong_code() -> None:
    conn = ServerConnection(ServerSettings("mx.example.test"))
    with pytest.raises(ValueError):
        conn.send_greeting(R.OK)
    conn.send_greeting(Reply(220, "", "hi"))
    with pytest.raises(RuntimeError):
        conn.send_greeting(Reply(220, "", "hi"))


def test_554_greeting_allows_only_quit() -> None:
    h = Harness(greet=False)
    h.conn.send_greeting(R.NO_SERVICE)
    assert h.conn.state is State.REJECTING
    out = h.feed(b"EHLO x\r\nNOOP\r\nMAIL FROM:<a@b.test>\r\nXYZZY\r\nRSET\r\nBDAT 3\r\nabcQUIT\r\n")
    assert codes(out) == ["554 5.3.2"] + ["503 5.5.1"] * 6 + ["221 2.0.0"]
    assert h.of_type(Ehlo) == [] and h.of_type(Mail) == []
    assert isinstance(h.events[-1], ConnectionClosed)


def test_421_greeting_closes() -> None:
    h = Harness(greet=False)
    h.conn.send_greeting(R.SHUTTING_DOWN)
    assert h.conn.state is State.CLOSED
    assert h.conn.next_event() == ConnectionClosed("421 greeting")


# -- EHLO / HELO -----------------------------------------------------------------------------------


def test_ehlo_reply_lists_extensions() -> None:
    h = Harness()
    out = h.feed(EHLO)
    assert out.decode().split("\r\n")[:-1] == [
        "250-mx.example.test hello", "250-PIPELINING", "250-SIZE 52428800", "250-8BITMIME",
        "250-ENHANCEDSTATUSCODES", "250-SMTPUTF8", "250-DSN", "250-CHUNKING", "250 STARTTLS",
    ]
    assert h.events == [Ehlo("client.example.test", True)]
    assert h.conn.helo == "client.example.test" and h.conn.state is State.READY


def test_ehlo_reply_respects_settings() -> None:
    settings = ServerSettings("mx.test", Limits(max_message_size=1000), tls_available=False,
                              advertise_dsn=False, advertise_smtputf8=False, advertise_chunking=False)
    out = Harness(settings).feed(EHLO)
    assert out == b"250-mx.test hello\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250-8BITMIME\r\n250 ENHANCEDSTATUSCODES\r\n"


def test_no_starttls_advertised_when_tls_already_active() -> None:
    settings = ServerSettings("mx.test", tls_available=True, tls_active=True)
    assert b"STARTTLS" not in Harness(settings).feed(EHLO)


def test_helo_gets_one_line() -> None:
    h = Harness()
    assert h.feed(b"HELO client.test\r\n") == b"250 mx.example.test hello\r\n"
    assert h.events == [Ehlo("client.test", False)]


def test_ehlo_refused_by_session_keeps_need_helo() -> None:
    h = Harness(responses={Ehlo: Reply(550, "5.7.1", "go away")})
    assert codes(h.feed(EHLO + MAIL)) == ["550 5.7.1", "503 5.5.1"]
    assert h.conn.state is State.NEED_HELO


def test_ehlo_missing_argument() -> None:
    assert codes(Harness().feed(b"EHLO\r\n")) == ["501 5.5.4"]


# -- commands answered by the core -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "expected"),
    [(b"NOOP\r\n", "250 2.0.0"), (b"NOOP hi\r\n", "250 2.0.0"), (b"HELP\r\n", "214 2.0.0"),
     (b"VRFY bob\r\n", "252 2.5.0"), (b"VRFY\r\n", "501 5.5.4"), (b"XYZZY\r\n", "500 5.5.2"),
     (b"AUTH PLAIN\r\n", "502 5.5.1"), (b"EXPN staff\r\n", "502 5.5.1"), (b"MAIL FROM:<a@b.test> FOO\r\n", "555 5.5.4"),
     (b"MAIL FROM:<a@b.test> SIZE=x\r\n", "501 5.5.4"), (b"MAIL FROM:<a@b.test> SIZE=99999999999\r\n", "552 5.3.4"),
     (b"MAIL FROM:<bad>\r\n", "501 5.1.7"), ("MAIL FROM:<ä@b.test>\r\n".encode(), "553 5.6.7")],
)
def test_core_replies(line: bytes, expected: str) -> None:
    h = ready()
    assert codes(h.feed(line)) == [expected]
    assert h.events == [Ehlo("client.example.test", True)]


@pytest.mark.parametrize("line", [b"NOOP\r\n", b"HELP\r\n", b"VRFY x\r\n", b"RSET\r\n"])
def test_any_time_commands_work_before_ehlo(line: bytes) -> None:
    assert codes(Harness().feed(line))[0].startswith("2")


def test_full_transaction_wire_output() -> None:
    h = Harness()
    out = h.feed(OPEN_TX + b"DATA\r\nSubject: hi\r\n\r\nbody\r\n.\r\nQUIT\r\n")
    assert codes(out) == ["250", "250 2.1.0", "250 2.1.5", "354", "250 2.0.0", "221 2.0.0"]
    assert h.messages == [b"Subject: hi\r\n\r\nbody\r\n"]
    assert h.ends == [DataEnd(None, False, False, False, 21)]
    assert [type(e) for e in h.events] == [Ehlo, Mail, Rcpt, DataStart, DataChunk, DataEnd, Quit, ConnectionClosed]
    assert h.closed == ConnectionClosed("quit")


def test_transaction_tracking() -> None:
    h = in_transaction()
    h.feed(b"RCPT TO:<second@example.net> NOTIFY=NEVER\r\n")
    tx = h.conn.transaction
    assert h.conn.in_transaction and tx.sender is not None
    assert str(tx.sender) == "sender@example.test"
    assert [r.address for r in tx.recipients] == ["rcpt@example.net", "second@example.net"]
    assert tx.recipients[1].params.notify == ("NEVER",)
    seen = []
    h.responses[DataEnd] = lambda e: seen.append(h.conn.transaction)
    h.feed(b"DATA\r\nx\r\n.\r\n")
    assert seen[0] == tx
    assert h.conn.transaction == Transaction(None, MailParams(), ()) and h.conn.state is State.READY
    assert not h.conn.in_transaction


def test_refused_mail_and_rcpt_change_nothing() -> None:
    h = ready(responses={Mail: R.RELAY_DENIED})
    assert codes(h.feed(MAIL + RCPT + b"DATA\r\n")) == ["554 5.7.1", "503 5.5.1", "503 5.5.1"]
    assert not h.conn.in_transaction
    h = ready(responses={Rcpt: R.RELAY_DENIED})
    assert codes(h.feed(MAIL + RCPT + b"DATA\r\n")) == ["250 2.1.0", "554 5.7.1", "503 5.5.1"]
    assert h.conn.in_transaction and h.conn.transaction.recipients == ()
    assert h.of_type(DataStart) == []


def test_rset_replies_then_emits_reset() -> None:
    h = in_transaction()
    conn = h.conn
    conn.receive_data(b"RSET\r\n")
    assert conn.next_event() == Reset()
    assert conn.data_to_send() == b"250 2.0.0 Reset OK\r\n"
    assert not conn.in_transaction and conn.state is State.READY
    assert conn.next_event() is NEED_DATA


def test_rset_before_helo_stays_need_helo() -> None:
    h = Harness()
    h.feed(b"RSET\r\n")
    assert h.conn.state is State.NEED_HELO and h.events == [Reset()]


def test_second_ehlo_resets_transaction() -> None:
    h = in_transaction()
    h.feed(EHLO)
    assert not h.conn.in_transaction and h.conn.state is State.READY
    assert codes(h.feed(RCPT)) == ["503 5.5.1"]


def test_session_data_refusal_leaves_transaction() -> None:
    h = in_transaction(responses={DataStart: R.LOCAL_ERROR})
    out = h.feed(b"DATA\r\nNOOP\r\n")
    assert codes(out) == ["451 4.3.0", "250 2.0.0"]
    assert h.conn.state is State.HAVE_RCPT


def test_accept_data_and_send_misuse() -> None:
    h = in_transaction()
    conn = h.conn
    with pytest.raises(RuntimeError):
        conn.send(R.OK)
    with pytest.raises(RuntimeError):
        conn.accept_data()
    conn.receive_data(b"DATA\r\nNOOP\r\n")
    assert conn.next_event() == DataStart(False)
    with pytest.raises(RuntimeError, match="DataStart"):
        conn.next_event()
    with pytest.raises(ValueError):
        conn.send(R.START_DATA)
    conn.accept_data()
    assert conn.state is State.IN_DATA


def test_next_event_refuses_to_run_ahead_of_replies() -> None:
    h = ready()
    conn = h.conn
    conn.receive_data(MAIL + RCPT)
    assert isinstance(conn.next_event(), Mail)
    with pytest.raises(RuntimeError, match="Mail event still awaits its reply"):
        conn.next_event()
    conn.send(R.SENDER_OK)
    assert isinstance(conn.next_event(), Rcpt)


# -- pipelining ------------------------------------------------------------------------------------

BATCH = OPEN_TX + b"RCPT TO:<b@example.net>\r\nNOOP\r\nDATA\r\nhello\r\n.\r\n" + MAIL + RCPT + b"DATA\r\n.x\r\n.\r\nQUIT\r\n"
BATCH_CODES = ["250", "250 2.1.0", "250 2.1.5", "250 2.1.5", "250 2.0.0", "354", "250 2.0.0",
               "250 2.1.0", "250 2.1.5", "354", "250 2.0.0", "221 2.0.0"]


def test_pipelined_batch_in_one_read() -> None:
    h = Harness()
    conn = h.conn
    conn.receive_data(BATCH)
    h.run()
    assert codes(conn.data_to_send()) == BATCH_CODES  # all replies available in one write
    assert h.messages == [b"hello\r\n", b"x\r\n"]


def test_pipelined_batch_bytewise_gives_identical_output() -> None:
    h = Harness()
    assert codes(h.feed_bytewise(BATCH)) == BATCH_CODES
    assert h.messages == [b"hello\r\n", b"x\r\n"]


def test_bytes_after_quit_are_ignored() -> None:
    h = ready()
    assert codes(h.feed(b"QUIT\r\nNOOP\r\n")) == ["221 2.0.0"]
    h.conn.receive_data(b"NOOP\r\n")
    assert h.conn.next_event() == ConnectionClosed("quit")
    assert h.conn.data_to_send() == b""


# -- limits ----------------------------------------------------------------------------------------


def test_command_line_limit_is_512_with_crlf() -> None:
    h = ready()
    ok = b"NOOP " + b"x" * 505 + b"\r\n"
    assert len(ok) == 512
    assert codes(h.feed(ok)) == ["250 2.0.0"]
    assert codes(h.feed(b"NOOP " + b"x" * 506 + b"\r\n")) == ["500 5.5.2"]


def test_overlong_line_is_read_to_its_end_and_answered_once() -> None:
    h = ready()
    out = h.feed(b"MAIL FROM:<" + b"a" * 3000, b"a" * 3000, b"@b.test>\r\nNOOP\r\n")
    assert replies(out) == ["500 5.5.2 Line too long", "250 2.0.0 OK"]
    assert h.of_type(Mail) == []


def test_overlong_line_is_never_buffered() -> None:
    h = ready()
    for _ in range(100):
        h.feed(b"x" * 65536)
        assert len(h.conn._in) - h.conn._pos < 512  # white-box: nothing of the line is kept
    assert codes(h.feed(b"\r\nNOOP\r\n")) == ["500 5.5.2", "250 2.0.0"]


@pytest.mark.parametrize("line", [b"NOOP\n", b"NO\rOP\r\n", b"NOOP\r\r\n", b"\n", b"MAIL FROM:<a@b.test>\rRCPT TO:<c@d.test>\r\n"])
def test_bare_cr_or_lf_in_command_line(line: bytes) -> None:
    h = ready()
    assert replies(h.feed(line + b"NOOP\r\n")) == ["500 5.5.2 Bare CR or LF in command line", "250 2.0.0 OK"]
    assert h.of_type(Mail) == []


def test_too_many_recipients() -> None:
    h = ready(max_recipients=3)
    rcpts = b"".join(b"RCPT TO:<r%d@example.net>\r\n" % i for i in range(5))
    out = h.feed(MAIL + rcpts)
    assert codes(out) == ["250 2.1.0"] + ["250 2.1.5"] * 3 + ["452 4.5.3"] * 2
    assert len(h.of_type(Rcpt)) == 3
    h.feed(b"RSET\r\n" + MAIL)
    assert codes(h.feed(rcpts)) == ["250 2.1.5"] * 3 + ["452 4.5.3"] * 2


def test_refused_recipients_do_not_count_toward_the_limit() -> None:
    h = ready(max_recipients=2, responses={Rcpt: lambda e: R.RELAY_DENIED if "bad" in e.recipient.address else None})
    out = h.feed(MAIL + b"RCPT TO:<bad@x.test>\r\n" * 3 + RCPT + RCPT + RCPT)
    assert codes(out) == ["250 2.1.0"] + ["554 5.7.1"] * 3 + ["250 2.1.5"] * 2 + ["452 4.5.3"]


def test_max_errors_closes_with_421() -> None:
    h = ready(max_errors=5)
    out = h.feed(b"XYZZY\r\n" * 10)
    assert codes(out) == ["500 5.5.2"] * 5 + ["421 4.7.0"]
    assert h.closed == ConnectionClosed("too many errors")
    assert h.conn.state is State.CLOSED


def test_max_errors_counts_session_replies() -> None:
    h = ready(max_errors=4, responses={Rcpt: R.RELAY_DENIED})
    out = h.feed(MAIL + RCPT + RCPT + b"XYZZY\r\n" + RCPT + RCPT)
    assert codes(out) == ["250 2.1.0", "554 5.7.1", "554 5.7.1", "500 5.5.2", "554 5.7.1", "421 4.7.0"]
    assert len(h.of_type(Rcpt)) == 3


def test_session_421_closes() -> None:
    h = ready(responses={Mail: R.SPOOL_UNAVAILABLE})
    assert codes(h.feed(MAIL + RCPT)) == ["421 4.3.2"]
    assert h.closed is not None and h.conn.state is State.CLOSED


def test_size_too_big_content_is_consumed_to_the_end_marker() -> None:
    h = in_transaction(max_message_size=100)
    body = (b"x" * 50 + b"\r\n") * 10
    out = h.feed(b"DATA\r\n", body[:200], body[200:] + b".\r\nNOOP\r\n")
    assert codes(out) == ["354", "552 5.3.4", "250 2.0.0"]
    assert h.ends[0].too_big and h.ends[0].size == len(body)
    assert h.messages == [body[:100]]


@pytest.mark.parametrize(
    ("body", "error"),
    [(b"a\nb\r\n", R.BARE_NEWLINE_DATA), (b"x" * 1000 + b"\r\n", R.DATA_LINE_TOO_LONG),
     (b"x" * 1000 + b"\n\r\n", R.BARE_NEWLINE_DATA), (b"fine\r\n", None)],
)
def test_data_end_recommended_error(body: bytes, error: Reply | None) -> None:
    h = in_transaction()
    h.feed(b"DATA\r\n" + body + b".\r\n")
    assert h.ends[0].error is error


def test_eof_after_pipelined_commands() -> None:
    h = ready()
    out = h.feed(b"NOOP\r\nNOOP", b"")
    assert codes(out) == ["250 2.0.0"]
    assert h.closed == ConnectionClosed("peer closed the connection")
    h.conn.receive_data(b"")  # eof_received and then connection_lost may both report it
    with pytest.raises(RuntimeError):
        h.conn.receive_data(b"more")


def test_eof_during_data_gives_no_data_end() -> None:
    h = in_transaction()
    h.feed(b"DATA\r\npartial\r\n", b"")
    assert h.ends == [] and h.closed == ConnectionClosed("peer closed the connection during DATA")


def test_timeouts() -> None:
    h = in_transaction(command_timeout=30.0, data_timeout=20.0)
    assert h.conn.wants_timeout() == 30.0
    h.feed(b"DATA\r\n")
    assert h.conn.wants_timeout() == 20.0
    assert h.conn.timeout_reply() is R.TIMEOUT  # returned for the session to write, not queued
    assert h.conn.data_to_send() == b""
    assert h.conn.next_event() == ConnectionClosed("timeout")


@pytest.mark.parametrize("line", [b"GET / HTTP/1.1\r\nHost: mx\r\n\r\n", b"POST / HTTP/1.0\r\n", b"CONNECT x:25 HTTP/1.1\r\n", b"USER root\r\n"])
def test_forbidden_command_closes_without_reply(line: bytes) -> None:
    h = Harness()
    assert h.feed(line) == b""
    assert h.closed is not None and h.closed.reason.startswith("forbidden command")
    assert h.conn.state is State.CLOSED


def test_smtputf8_transaction_allows_utf8_recipient() -> None:
    h = ready()
    out = h.feed("MAIL FROM:<jö@b.test> SMTPUTF8\r\nRCPT TO:<ü@c.test>\r\nRSET\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<ü@c.test>\r\n".encode())
    assert codes(out) == ["250 2.1.0", "250 2.1.5", "250 2.0.0", "250 2.1.0", "553 5.6.7"]


def test_limits_validation() -> None:
    with pytest.raises(ValueError):
        Limits(max_command_line=3)
    with pytest.raises(ValueError):
        Limits(max_bdat_digits=21)
    with pytest.raises(ValueError):
        Limits(data_timeout=0)
    assert Limits().max_recipients == 1000


def test_ehlo_reply_without_pending_event_is_extended() -> None:
    conn = ServerConnection(ServerSettings("mx.test"))
    reply = conn.ehlo_reply()
    assert reply.code == 250 and reply.text == "mx.test" and "PIPELINING" in reply.extra


def test_public_names() -> None:
    import mailhop.smtp as smtp

    for name in smtp.__all__:
        assert hasattr(smtp, name), name
