"""SMTP smuggling: no end-of-data look-alike may end a message; only CRLF "." CRLF does.

Each test hides a second transaction behind a fake end marker. A vulnerable server would see the
message end early and then run the smuggled MAIL/RCPT/DATA as commands; we must see one message that
contains the smuggled text, and flag the bare CR/LF that make up most of the look-alikes.
"""

from __future__ import annotations

import pytest

from mailhop.smtp import DataEnd, Mail, Rcpt

from .helpers import OPEN_TX, Harness, codes

BODY = b"Subject: test\r\n\r\nhello"
SMUGGLED = b"MAIL FROM:<evil@attacker.test>\r\nRCPT TO:<victim@example.net>\r\nDATA\r\nFrom: ceo\r\n\r\nwire money\r\n"


def smuggle(variant: bytes, *, bytewise: bool = False) -> tuple[Harness, DataEnd, bytes]:
    wire = OPEN_TX + b"DATA\r\n" + BODY + variant + SMUGGLED + b".\r\nQUIT\r\n"
    h = Harness()
    out = h.feed_bytewise(wire) if bytewise else h.feed(wire)
    assert len(h.ends) == 1, "the fake marker ended the message"
    assert len(h.of_type(Mail)) == 1 and len(h.of_type(Rcpt)) == 1, "smuggled commands were executed"
    assert SMUGGLED in h.messages[0]
    assert codes(out)[-1] == "221 2.0.0"
    return h, h.ends[0], out


def test_smuggle_lf_dot_lf() -> None:
    _, end, out = smuggle(b"\n.\n")
    assert end.bare_newline and codes(out)[-2] == "550 5.6.0"


def test_smuggle_lf_dot_crlf() -> None:
    _, end, _ = smuggle(b"\n.\r\n")
    assert end.bare_newline


def test_smuggle_crlf_dot_lf() -> None:
    h, end, _ = smuggle(b"\r\n.\n")
    assert end.bare_newline
    assert h.messages[0].startswith(BODY + b"\r\n\nMAIL")  # the line began with "." so it lost the dot


def test_smuggle_cr_dot_crlf() -> None:
    _, end, _ = smuggle(b"\r.\r\n")
    assert end.bare_newline


def test_smuggle_cr_dot_cr() -> None:
    _, end, _ = smuggle(b"\r.\r")
    assert end.bare_newline


def test_smuggle_crlf_dot_cr() -> None:
    _, end, _ = smuggle(b"\r\n.\r")
    assert end.bare_newline


def test_smuggle_crlf_nul_dot_crlf() -> None:
    h, end, _ = smuggle(b"\r\n\x00.\r\n")
    assert not end.bare_newline and end.error is None
    assert h.messages[0].startswith(BODY + b"\r\n\x00.\r\nMAIL")


def test_smuggle_crlf_dot_nul_crlf() -> None:
    h, end, _ = smuggle(b"\r\n.\x00\r\n")
    assert not end.bare_newline
    assert h.messages[0].startswith(BODY + b"\r\n\x00\r\nMAIL")


def test_smuggle_nul_between_cr_and_lf() -> None:
    _, end, _ = smuggle(b"\r\x00\n.\r\x00\n")
    assert end.bare_newline


def test_smuggle_nul_before_bare_lf_dot() -> None:
    _, end, _ = smuggle(b"\x00\n.\x00\n")
    assert end.bare_newline


def test_smuggle_lf_nul_dot_crlf() -> None:
    _, end, _ = smuggle(b"\n\x00.\r\n")
    assert end.bare_newline


def test_smuggle_crlf_dot_dot_crlf_is_stuffing_not_end() -> None:
    h, end, _ = smuggle(b"\r\n..\r\n")
    assert not end.bare_newline
    assert h.messages[0].startswith(BODY + b"\r\n.\r\nMAIL")


VARIANTS = [b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n", b"\r.\r", b"\r\n.\r", b"\r\n\x00.\r\n", b"\r\n.\x00\r\n",
            b"\r\x00\n.\r\x00\n", b"\n\x00.\r\n", b"\r\n..\r\n"]


@pytest.mark.parametrize("variant", VARIANTS, ids=repr)
def test_smuggle_variants_fed_one_byte_at_a_time(variant: bytes) -> None:
    smuggle(variant, bytewise=True)


def test_smuggle_in_bdat_chunk() -> None:
    chunk = b"Subject: x\r\n\r\nhi\r\n.\r\nMAIL FROM:<x@y.test>\r\nRCPT TO:<z@w.test>\r\nDATA\r\nevil\r\n.\r\n"
    h = Harness()
    out = h.feed(OPEN_TX + b"BDAT %d LAST\r\n" % len(chunk) + chunk + b"QUIT\r\n")
    assert codes(out) == ["250", "250 2.1.0", "250 2.1.5", "250 2.0.0", "221 2.0.0"]
    assert len(h.ends) == 1 and len(h.of_type(Mail)) == 1
    assert h.messages == [chunk] and not h.ends[0].bare_newline


def test_smuggle_bdat_chunk_split_across_reads() -> None:
    chunk = b"a\r\n.\r\nMAIL FROM:<x@y.test>\r\n"
    h = Harness()
    h.feed(OPEN_TX + b"BDAT %d LAST\r\n" % len(chunk))
    h.feed(*(chunk[i : i + 3] for i in range(0, len(chunk), 3)))
    assert len(h.ends) == 1 and len(h.of_type(Mail)) == 1 and h.messages == [chunk]
