"""BDAT (RFC 3030): chunks, LAST, refusals that still consume octets, and sequence rules."""

from __future__ import annotations

from mailhop.reply import R, Reply
from mailhop.smtp import (
    BdatChunkEnd,
    ConnectionClosed,
    DataChunk,
    DataEnd,
    DataStart,
    Mail,
    Reset,
    ServerSettings,
    State,
)

from .helpers import EHLO, MAIL, RCPT, Harness, codes, in_transaction, ready, replies


def test_single_last_chunk() -> None:
    h = in_transaction()
    out = h.feed(b"BDAT 5 LAST\r\nhelloNOOP\r\n")
    assert codes(out) == ["250 2.0.0", "250 2.0.0"]
    assert h.events[3:] == [DataStart(True), DataChunk(b"hello"), DataEnd(None, False, False, False, 5)]
    assert h.conn.state is State.READY and not h.conn.in_transaction


def test_several_chunks() -> None:
    h = in_transaction()
    out = h.feed(b"BDAT 3\r\nab\r", b"BDAT 4\r\n\nc\r\n", b"BDAT 0 LAST\r\n")
    assert replies(out) == ["250 2.0.0 3 octets received", "250 2.0.0 4 octets received", "250 2.0.0 Queued"]
    assert h.messages == [b"ab\r\nc\r\n"]
    assert h.of_type(BdatChunkEnd) == [BdatChunkEnd(3), BdatChunkEnd(4)]
    assert h.of_type(DataStart) == [DataStart(True)]  # only the first chunk asks
    assert h.ends == [DataEnd(None, False, False, False, 7)]


def test_zero_size_last_only_chunk() -> None:
    h = in_transaction()
    assert codes(h.feed(b"BDAT 0 LAST\r\n")) == ["250 2.0.0"]
    assert h.ends == [DataEnd(None, False, False, False, 0)]


def test_chunk_fed_bytewise() -> None:
    h = in_transaction()
    out = h.feed_bytewise(b"BDAT 10\r\n0123456789BDAT 2 LAST\r\n\r\nQUIT\r\n")
    assert codes(out) == ["250 2.0.0", "250 2.0.0", "221 2.0.0"]
    assert h.messages == [b"0123456789\r\n"]


def test_session_refusal_of_first_chunk_consumes_octets() -> None:
    h = in_transaction(responses={DataStart: R.LOCAL_ERROR})
    out = h.feed(b"BDAT 9\r\nMAIL FROM", b"BDAT 4 LAST\r\nabcd" + MAIL)
    assert codes(out) == ["451 4.3.0", "503 5.5.1", "250 2.1.0"]
    assert h.of_type(DataChunk) == [] and len(h.of_type(Mail)) == 2
    assert h.conn.state is State.HAVE_MAIL


def test_session_refusal_of_last_chunk_ends_transaction() -> None:
    h = in_transaction(responses={DataStart: R.NO_SERVICE})
    assert codes(h.feed(b"BDAT 3 LAST\r\nabcNOOP\r\n")) == ["554 5.3.2", "250 2.0.0"]
    assert h.conn.state is State.READY and not h.conn.in_transaction


def test_error_on_chunk_end_aborts_the_message() -> None:
    h = in_transaction(responses={BdatChunkEnd: R.INSUFFICIENT_STORAGE})
    out = h.feed(b"BDAT 2\r\nabBDAT 2\r\ncdBDAT 2 LAST\r\nef" + MAIL)
    assert codes(out) == ["452 4.3.1", "503 5.5.1", "503 5.5.1", "250 2.1.0"]
    assert h.ends == [] and h.messages == []


def test_rset_between_chunks() -> None:
    h = in_transaction()
    out = h.feed(b"BDAT 2\r\nabRSET\r\nBDAT 1 LAST\r\nx")
    assert codes(out) == ["250 2.0.0", "250 2.0.0", "503 5.5.1"]
    assert Reset() in h.events and h.ends == []


def test_commands_between_chunks() -> None:
    h = in_transaction()
    out = h.feed(b"BDAT 1\r\nx" + MAIL + RCPT + b"DATA\r\nSTARTTLS\r\nNOOP\r\nBDAT 1 LAST\r\ny")
    assert codes(out) == ["250 2.0.0", "503 5.5.1", "503 5.5.1", "503 5.5.1", "503 5.5.1", "250 2.0.0", "250 2.0.0"]
    assert h.messages == [b"xy"]


def test_bdat_out_of_sequence_consumes_octets() -> None:
    h = Harness()
    out = h.feed(b"BDAT 4\r\nNOOP" + EHLO + b"BDAT 6 LAST\r\nQUIT\r\n" + MAIL + b"BDAT 3\r\nabc")
    assert codes(out) == ["503 5.5.1", "250", "503 5.5.1", "250 2.1.0", "503 5.5.1"]
    assert replies(out)[0] == "503 5.5.1 Send EHLO or HELO first"
    assert replies(out)[2] == "503 5.5.1 Need MAIL command first"
    assert replies(out)[4] == "503 5.5.1 Need RCPT command first"
    assert h.conn.state is State.HAVE_MAIL


def test_bdat_after_data_message_needs_new_mail() -> None:
    h = in_transaction()
    out = h.feed(b"DATA\r\nx\r\n.\r\nBDAT 3 LAST\r\nabc")
    assert codes(out) == ["354", "250 2.0.0", "503 5.5.1"]
    assert len(h.ends) == 1


def test_bdat_inside_data_is_content() -> None:
    h = in_transaction()
    h.feed(b"DATA\r\nBDAT 3 LAST\r\nabc\r\n.\r\n")
    assert h.messages == [b"BDAT 3 LAST\r\nabc\r\n"]


def test_bdat_syntax_error() -> None:
    h = in_transaction()
    assert replies(h.feed(b"BDAT x\r\nBDAT " + b"9" * 21 + b"\r\n")) == ["500 5.5.2 Syntax error in BDAT command"] * 2


def test_bdat_flags_and_too_big() -> None:
    h = in_transaction(max_message_size=8)
    out = h.feed(b"BDAT 6\r\nab\rcd\r", b"BDAT 6 LAST\r\nxyz\r\n\n")
    assert codes(out) == ["250 2.0.0", "552 5.3.4"]
    end = h.ends[0]
    assert (end.bare_newline, end.too_big, end.size) == (True, True, 12)
    assert h.messages == [b"ab\rcd\rxy"]


def test_bdat_crlf_across_chunks_is_not_bare() -> None:
    h = in_transaction()
    h.feed(b"BDAT 2\r\na\r", b"BDAT 1 LAST\r\n\n")
    assert h.ends[0].error is None and h.messages == [b"a\r\n"]


def test_chunking_disabled_still_consumes_octets() -> None:
    h = Harness(ServerSettings("mx.test", advertise_chunking=False))
    assert b"CHUNKING" not in h.feed(EHLO)
    out = h.feed(MAIL + RCPT + b"BDAT 4 LAST\r\nNOOPQUIT\r\n")
    assert codes(out) == ["250 2.1.0", "250 2.1.5", "502 5.5.1", "221 2.0.0"]


def test_eof_mid_chunk() -> None:
    h = in_transaction()
    h.feed(b"BDAT 10\r\nabc", b"")
    assert h.closed == ConnectionClosed("peer closed the connection during BDAT") and h.ends == []


def test_data_timeout_applies_inside_chunk() -> None:
    h = in_transaction(command_timeout=30.0, data_timeout=20.0)
    h.feed(b"BDAT 10\r\nabc")
    assert h.conn.wants_timeout() == 20.0
    h.feed(b"defghij")
    assert h.conn.wants_timeout() == 30.0


def test_bdat_chunk_reply_text_is_the_sessions() -> None:
    h = in_transaction(responses={BdatChunkEnd: lambda e: Reply(250, "2.0.0", f"got {e.size}")})
    assert replies(h.feed(b"BDAT 2\r\nab")) == ["250 2.0.0 got 2"]


def test_ready_helper_state() -> None:
    assert ready().conn.state is State.READY


def test_421_refusal_of_first_chunk_closes_at_once() -> None:
    h = in_transaction(responses={DataStart: R.SHUTTING_DOWN})
    assert codes(h.feed(b"BDAT 100\r\nabc")) == ["421 4.3.2"]
    assert h.conn.state is State.CLOSED and h.closed is not None
