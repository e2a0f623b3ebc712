"""DSN building (pure): structure, delivery-status round trips, RET and truncation, SMTPUTF8, wire safety."""

from __future__ import annotations

import email
import email.policy
import io
import re
from collections.abc import Iterator
from email.message import EmailMessage, Message
from email.parser import BytesHeaderParser
from email.utils import parsedate_to_datetime
from typing import Any, BinaryIO

import pytest

from mailhop.message.dsn import MAX_HEADER_BYTES, DsnRecipient, build_dsn, is_bounceable, should_notify

NOW = 1_700_000_000.0
ARRIVAL = NOW - 4 * 3600
ORIGINAL = (
    b"Received: from client.example.test by relay.example.test; Tue, 14 Nov 2023 18:13:20 +0000\r\n"
    b"From: Alice <alice@example.test>\r\n"
    b"To: user@example.test\r\n"
    b"Subject: hello\r\n"
    b"Message-ID: <orig-1@example.test>\r\n"
    b"\r\n"
    b"First body line.\r\n"
    b"Second body line.\r\n"
)
ORIGINAL_HEADERS = ORIGINAL.split(b"\r\n\r\n")[0] + b"\r\n"


def rcpt(
    address: str = "user@example.test",
    action: Any = "failed",
    status: str = "5.1.1",
    *,
    orcpt: str | None = None,
    remote: str | None = "mx.example.test",
    diagnostic: str | None = "550 5.1.1 No such user",
    last_attempt: float | None = NOW - 60,
    until: float | None = None,
) -> DsnRecipient:
    return DsnRecipient(
        final_recipient=address,
        original_recipient=orcpt,
        action=action,
        status=status,
        remote_mta=remote,
        diagnostic=diagnostic,
        last_attempt=last_attempt,
        will_retry_until=until,
    )


def build(
    recipients: list[DsnRecipient] | None = None,
    original: bytes | BinaryIO | None = ORIGINAL,
    **kwargs: Any,
) -> bytes:
    args: dict[str, Any] = {
        "reporting_mta": "relay.example.test",
        "queue_id": "Q1A2B3",
        "envelope_sender": "alice@example.test",
        "envid": None,
        "arrival_date": ARRIVAL,
        "recipients": recipients if recipients is not None else [rcpt()],
        "original": io.BytesIO(original) if isinstance(original, bytes) else original,
        "ret": None,
        "postmaster": "postmaster@relay.example.test",
        "now": NOW,
    }
    args.update(kwargs)
    out = build_dsn(**args)
    assert_wire_safe(out)
    return out


def assert_wire_safe(out: bytes) -> None:
    """CRLF only, no line over 998 octets, a 7-bit top-level header block unless it is SMTPUTF8."""
    assert re.search(rb"(?<!\r)\n", out) is None, "bare LF"
    assert re.search(rb"\r(?!\n)", out) is None, "bare CR"
    assert out.endswith(b"\r\n")
    for number, line in enumerate(out.split(b"\r\n")):
        assert len(line) <= 998, f"line {number} is {len(line)} octets"
    header_block = out.split(b"\r\n\r\n", 1)[0]
    if b"report-type=global-delivery-status" not in header_block:
        assert header_block.isascii()


def parse(out: bytes) -> EmailMessage:
    msg = email.message_from_bytes(out, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    assert not msg.defects
    return msg


def parts(msg: Message) -> list[Message]:
    """The sub-messages of a multipart, or the field blocks of a message/delivery-status."""
    payload = msg.get_payload()
    assert isinstance(payload, list)
    return [item for item in payload if isinstance(item, Message)]


def boundary_of(out: bytes) -> bytes:
    found = re.search(rb'boundary="([^"]+)"', out)
    assert found is not None
    return found.group(1)


def raw_parts(out: bytes) -> list[tuple[bytes, bytes]]:
    """(header block, body) of each top-level part, split by hand (for the RFC 6533 types)."""
    delimiter = b"\r\n--" + boundary_of(out)
    pieces = out.split(delimiter)
    assert pieces[-1] == b"--\r\n"
    result = []
    for piece in pieces[1:-1]:
        assert piece.startswith(b"\r\n")
        head, _, body = piece[2:].partition(b"\r\n\r\n")
        result.append((head + b"\r\n", body))
    return result


def status_blocks(out: bytes) -> list[Message]:
    """The delivery-status field blocks, read from the raw second part."""
    _, body = raw_parts(out)[1]
    parser = BytesHeaderParser(policy=email.policy.default)
    return [parser.parsebytes(block + b"\r\n") for block in body.rstrip(b"\r\n").split(b"\r\n\r\n")]


def text_of(msg: Message) -> str:
    """The notification text with its line wrapping undone."""
    return " ".join(notification(msg).split())


def notification(msg: Message) -> str:
    content = parts(msg)[0]
    assert isinstance(content, EmailMessage)
    text = content.get_content()
    assert isinstance(text, str)
    return text


class Trickle(io.BytesIO):
    """Reads a few bytes at a time, so line ends fall across reads."""

    def read(self, size: int | None = -1) -> bytes:
        return super().read(3)


# --- structure --------------------------------------------------------------------------------------------


def test_structure_and_top_level_headers() -> None:
    out = build()
    msg = parse(out)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert [p.get_content_type() for p in parts(msg)] == [
        "text/plain",
        "message/delivery-status",
        "message/rfc822",
    ]
    assert parts(msg)[0].get_content_charset() == "utf-8"
    assert msg["From"] == "Mail Delivery System <MAILER-DAEMON@relay.example.test>"
    assert b"\r\nTo: <alice@example.test>\r\n" in out
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["MIME-Version"] == "1.0"
    assert parsedate_to_datetime(msg["Date"]).timestamp() == NOW
    message_id = msg["Message-ID"]
    assert re.fullmatch(r"<[^<>@\s]*Q1A2B3[^<>@\s]*@relay\.example\.test>", message_id)
    assert out.startswith(b"From: ")


def test_message_id_and_boundary_are_unique() -> None:
    one, two = parse(build()), parse(build())
    assert one["Message-ID"] != two["Message-ID"]
    assert one.get_boundary() != two.get_boundary()
    other = parse(build(message_id_domain="ids.example.test"))
    assert other["Message-ID"].endswith("@ids.example.test>")


def test_delivery_status_round_trip() -> None:
    out = build(
        [
            rcpt(orcpt="rfc822;User+Tag@Example.test"),
            rcpt(
                "late@example.test",
                "delayed",
                "4.4.1",
                remote="mx2.example.test",
                diagnostic="451 4.4.1 Try again later",
                until=NOW + 86400,
            ),
            rcpt("nomx@example.test", "failed", "5.4.4", remote=None, diagnostic=None, last_attempt=None),
        ],
        envid="ENV-42",
    )
    blocks = parts(parts(parse(out))[1])
    assert len(blocks) == 4
    per_message, first, second, third = blocks
    assert per_message["Reporting-MTA"] == "dns; relay.example.test"
    assert per_message["Original-Envelope-Id"] == "ENV-42"
    assert parsedate_to_datetime(per_message["Arrival-Date"]).timestamp() == ARRIVAL

    assert first["Original-Recipient"] == "rfc822;User+Tag@Example.test"
    assert first["Final-Recipient"] == "rfc822; user@example.test"
    assert (first["Action"], first["Status"]) == ("failed", "5.1.1")
    assert first["Remote-MTA"] == "dns; mx.example.test"
    assert first["Diagnostic-Code"] == "smtp; 550 5.1.1 No such user"
    assert parsedate_to_datetime(first["Last-Attempt-Date"]).timestamp() == NOW - 60
    assert first["Will-Retry-Until"] is None

    assert second["Original-Recipient"] is None
    assert (second["Action"], second["Status"]) == ("delayed", "4.4.1")
    assert second["Remote-MTA"] == "dns; mx2.example.test"
    assert parsedate_to_datetime(second["Will-Retry-Until"]).timestamp() == NOW + 86400

    assert (third["Action"], third["Status"]) == ("failed", "5.4.4")
    for absent in ("Remote-MTA", "Diagnostic-Code", "Last-Attempt-Date", "Will-Retry-Until"):
        assert third[absent] is None
    # The hand-split reading agrees with the email package's.
    assert [dict(b) for b in status_blocks(out)] == [dict(b) for b in blocks]


def test_no_envid_no_original_envelope_id() -> None:
    blocks = status_blocks(build())
    assert blocks[0]["Original-Envelope-Id"] is None


def test_will_retry_until_only_for_delayed() -> None:
    out = build([rcpt(until=NOW + 3600), rcpt("ok@example.test", "delivered", "2.0.0", until=NOW + 3600)])
    assert b"Will-Retry-Until" not in out


@pytest.mark.parametrize(
    ("actions", "subject"),
    [
        (["failed"], "Undelivered Mail Returned to Sender"),
        (["delayed"], "Delayed Mail (still being retried)"),
        (["delivered"], "Successful Mail Delivery Report"),
        (["relayed"], "Successful Mail Delivery Report"),
        (["expanded"], "Successful Mail Delivery Report"),
        (["delayed", "failed"], "Undelivered Mail Returned to Sender"),
        (["delivered", "delayed"], "Delayed Mail (still being retried)"),
        (["delivered", "failed"], "Undelivered Mail Returned to Sender"),
    ],
)
def test_subject(actions: list[str], subject: str) -> None:
    status = {"failed": "5.0.0", "delayed": "4.0.0"}
    recipients = [rcpt(f"r{i}@example.test", a, status.get(a, "2.0.0")) for i, a in enumerate(actions)]
    msg = parse(build(recipients))
    assert msg["Subject"] == subject
    blocks = parts(parts(msg)[1])
    assert [b["Action"] for b in blocks[1:]] == actions


def test_human_text_failed() -> None:
    text = text_of(parse(build()))
    assert "This is the mail system at host relay.example.test." in text
    assert "could not be delivered" in text
    assert "<user@example.test>: host mx.example.test said: 550 5.1.1 No such user" in text
    assert "<postmaster@relay.example.test>" in text


def test_human_text_delayed() -> None:
    out = build(
        [rcpt(action="delayed", status="4.4.1", diagnostic="451 4.4.1 Greylisted", until=NOW + 86400)]
    )
    text = text_of(parse(out))
    assert "THIS IS A WARNING ONLY" in text
    assert "No action is needed" in text
    assert "Wed, 15 Nov 2023 22:13:20 +0000" in text  # NOW + 1 day
    assert "451 4.4.1 Greylisted" in text


def test_human_text_success() -> None:
    out = build([rcpt(action="delivered", status="2.0.0", diagnostic="250 2.0.0 Ok queued")])
    text = text_of(parse(out))
    assert "successfully delivered" in text
    assert "<user@example.test>: delivered via mx.example.test: 250 2.0.0 Ok queued" in text


def test_long_human_text_lines_are_wrapped() -> None:
    out = build([rcpt(diagnostic="550 " + "word " * 300 + "x" * 2000)])
    for line in notification(parse(out)).splitlines():
        assert len(line) <= 76


# --- the returned original -------------------------------------------------------------------------------


def returned_part(out: bytes) -> Message:
    found = parts(parse(out))
    assert len(found) == 3
    return found[2]


@pytest.mark.parametrize(
    ("ret", "action", "full"),
    [
        ("FULL", "failed", True),
        ("FULL", "delayed", True),
        ("FULL", "delivered", True),
        ("HDRS", "failed", False),
        ("HDRS", "delivered", False),
        (None, "failed", True),
        (None, "delayed", False),
        (None, "delivered", False),
        (None, "relayed", False),
    ],
)
def test_ret(ret: str | None, action: str, full: bool) -> None:
    out = build([rcpt(action=action, status="5.0.0" if action == "failed" else "2.0.0")], ret=ret)
    part = returned_part(out)
    _, body = raw_parts(out)[2]
    if full:
        assert part.get_content_type() == "message/rfc822"
        assert body == ORIGINAL
    else:
        assert part.get_content_type() == "text/rfc822-headers"
        assert body == ORIGINAL_HEADERS
        assert b"First body line" not in out


def test_full_original_parses_as_a_message() -> None:
    inner = parts(returned_part(build(ret="FULL")))
    assert inner[0]["Subject"] == "hello"
    assert inner[0]["Message-ID"] == "<orig-1@example.test>"


def test_truncation_of_a_large_original() -> None:
    big = ORIGINAL + (b"x" * 1000 + b"\r\n") * 12_000  # ~12 MB
    out = build(original=big, ret="FULL", max_original_bytes=64 * 1024)
    part = returned_part(out)
    assert part.get_content_type() == "text/rfc822-headers"
    assert raw_parts(out)[2][1] == ORIGINAL_HEADERS
    assert len(out) < 16 * 1024
    assert "too large to return in full" in text_of(parse(out))


def test_truncation_limit_is_exact() -> None:
    at_limit = build(ret="FULL", max_original_bytes=len(ORIGINAL))
    assert returned_part(at_limit).get_content_type() == "message/rfc822"
    over = build(ret="FULL", max_original_bytes=len(ORIGINAL) - 1)
    assert returned_part(over).get_content_type() == "text/rfc822-headers"


def test_huge_header_block_is_bounded() -> None:
    header = b"X-Filler: " + b"y" * 900 + b"\r\n"
    big = header * (MAX_HEADER_BYTES // len(header) + 50) + b"\r\nbody\r\n"
    out = build(original=big, ret="HDRS")
    body = raw_parts(out)[2][1]
    assert 0 < len(body) <= MAX_HEADER_BYTES
    assert body.endswith(b"\r\n") and body.count(b"\r\n") == len(body) // len(header)


def test_headers_only_original_without_blank_line() -> None:
    out = build(original=b"Subject: no body\r\nFrom: a@example.test", ret="HDRS")
    assert raw_parts(out)[2][1] == b"Subject: no body\r\nFrom: a@example.test\r\n"


@pytest.mark.parametrize("original", [None, b""])
def test_no_original_no_third_part(original: bytes | None) -> None:
    msg = parse(build(original=original))
    assert [p.get_content_type() for p in parts(msg)] == ["text/plain", "message/delivery-status"]


def test_line_endings_normalised() -> None:
    messy = b"Subject: lf\nFrom: a@example.test\r\nX-Cr: one\rX-Two: two\n\nline1\nline2\r\nlast"
    expected = (
        b"Subject: lf\r\nFrom: a@example.test\r\nX-Cr: one\r\nX-Two: two\r\n\r\nline1\r\nline2\r\nlast\r\n"
    )
    assert raw_parts(build(original=messy, ret="FULL"))[2][1] == expected
    # The same with line ends split across reads.
    assert raw_parts(build(original=Trickle(ORIGINAL), ret="FULL"))[2][1] == ORIGINAL
    assert raw_parts(build(original=Trickle(messy), ret="FULL"))[2][1] == expected


def test_long_lines_of_the_original_are_cut() -> None:
    long_header = b"X-Long: " + b"h" * 3000
    long_body = b"b" * 5000
    out = build(original=long_header + b"\r\nSubject: s\r\n\r\n" + long_body + b"\r\n", ret="FULL")
    inner = parts(returned_part(out))
    # The cut header line goes on as a folded continuation, so it is still one header field.
    assert inner[0]["X-Long"].replace(" ", "") == "h" * 3000
    assert inner[0]["Subject"] == "s"
    body = raw_parts(out)[2][1].split(b"\r\n\r\n", 1)[1]
    assert body.replace(b"\r\n", b"") == long_body


def test_cut_does_not_split_utf8() -> None:
    out = build(original=b"Subject: s\r\n\r\n" + "é".encode() * 3000 + b"\r\n", ret="FULL", smtputf8=True)
    for line in raw_parts(out)[2][1].split(b"\r\n"):
        line.decode("utf-8")


def test_boundary_not_in_original() -> None:
    hostile = ORIGINAL + b"--=_mailhop_\r\n--" + b"=_mailhop_0123456789abcdef" * 20 + b"\r\n"
    out = build(original=hostile, ret="FULL")
    boundary = boundary_of(out)
    assert len(boundary) >= 40
    assert boundary not in hostile
    assert raw_parts(out)[2][1] == hostile


def test_boundary_redrawn_when_it_occurs(monkeypatch: pytest.MonkeyPatch) -> None:
    draws = iter(["a" * 48, "b" * 48])

    def token_hex(nbytes: int | None = None) -> str:
        return next(draws) if nbytes == 24 else "c" * 16

    monkeypatch.setattr("mailhop.message.dsn.secrets.token_hex", token_hex)
    out = build(original=ORIGINAL + b"=_mailhop_" + b"a" * 48 + b"\r\n", ret="FULL")
    assert boundary_of(out) == b"=_mailhop_" + b"b" * 48


# --- SMTPUTF8 and non-ASCII ------------------------------------------------------------------------------


def test_smtputf8_uses_global_types() -> None:
    original = "From: jürgen@example.test\r\nSubject: Grüße\r\n\r\nHallo\r\n".encode()
    out = build(
        [rcpt("用户@example.test", orcpt="utf-8;用户@example.test", diagnostic="550 5.1.1 Ünknown")],
        original=original,
        envelope_sender="jürgen@example.test",
        smtputf8=True,
        ret="FULL",
    )
    msg = parse(out)
    assert msg.get_param("report-type") == "global-delivery-status"
    assert "\r\nTo: <jürgen@example.test>\r\n".encode() in out
    assert msg["Content-Transfer-Encoding"] == "8bit"
    assert [p.get_content_type() for p in parts(msg)] == [
        "text/plain",
        "message/global-delivery-status",
        "message/global",
    ]
    block = status_blocks(out)[1]
    assert block["Final-Recipient"] == "utf-8; 用户@example.test"
    assert block["Original-Recipient"] == "utf-8;用户@example.test"
    assert block["Diagnostic-Code"] == "smtp; 550 5.1.1 Ünknown"
    assert raw_parts(out)[2][1] == original
    assert "<用户@example.test>" in text_of(msg)


def test_smtputf8_headers_only_is_global_headers() -> None:
    out = build(original="Subject: Grüße\r\n\r\nx\r\n".encode(), ret="HDRS", smtputf8=True)
    assert returned_part(out).get_content_type() == "message/global-headers"
    assert raw_parts(out)[2][1] == "Subject: Grüße\r\n".encode()


def test_non_ascii_recipient_without_smtputf8_is_7bit() -> None:
    out = build([rcpt("üser+x@example.test", orcpt="utf-8;üser\\x{2B}x@example.test")])
    assert out.isascii()
    msg = parse(out)
    assert msg["Content-Transfer-Encoding"] == "7bit"
    block = status_blocks(out)[1]
    # RFC 6533 utf-8-addr-xtext: non-ASCII and "+" as \x{HEX}.
    assert block["Final-Recipient"] == "utf-8; \\x{FC}ser\\x{2B}x@example.test"
    assert block["Original-Recipient"] == "utf-8;\\x{FC}ser\\x{2B}x@example.test"
    assert parts(msg)[0]["Content-Transfer-Encoding"] == "quoted-printable"
    assert "<üser+x@example.test>" in text_of(msg)


def test_eight_bit_original_is_labelled() -> None:
    out = build(original="Subject: x\r\n\r\nGrüße\r\n".encode(), ret="FULL")
    msg = parse(out)
    assert msg["Content-Transfer-Encoding"] == "8bit"
    assert parts(msg)[2]["Content-Transfer-Encoding"] == "8bit"
    assert parts(msg)[1]["Content-Transfer-Encoding"] is None
    assert raw_parts(out)[0][0].isascii() and raw_parts(out)[1][1].isascii()


def test_non_ascii_sender_needs_smtputf8() -> None:
    with pytest.raises(ValueError, match="smtputf8"):
        build(envelope_sender="jürgen@example.test")


# --- untrusted text --------------------------------------------------------------------------------------


def test_diagnostic_cannot_inject_fields_or_parts() -> None:
    evil = "550-5.1.1 first\r\n550 5.1.1 second\r\nX-Injected: yes\r\n\r\n--=_mailhop_x--\r\n"
    out = build([rcpt(diagnostic=evil, remote="mx.example.test\r\nX-Evil: 1")])
    assert b"\r\nX-Injected" not in out and b"\r\nX-Evil" not in out
    block = status_blocks(out)[1]
    assert (
        block["Diagnostic-Code"] == "smtp; 550-5.1.1 first 550 5.1.1 second X-Injected: yes --=_mailhop_x--"
    )
    assert block["Remote-MTA"] == "dns; mx.example.testX-Evil:1"
    assert len(parts(parse(out))) == 3


def test_long_diagnostic_is_folded() -> None:
    text = "550 5.7.1 " + " ".join(f"word{i}" for i in range(300)) + " " + "z" * 2500
    out = build([rcpt(diagnostic=text)])
    field = status_blocks(out)[1]["Diagnostic-Code"]
    assert field.startswith("smtp; 550 5.7.1 word0 word1")
    assert field.replace(" ", "") == ("smtp; " + text).replace(" ", "")


def test_non_smtp_diagnostic_type() -> None:
    block = status_blocks(build([rcpt(diagnostic="connection timed out", remote=None)]))[1]
    assert block["Diagnostic-Code"] == "X-mailhop; connection timed out"


def test_malformed_status_falls_back_to_class() -> None:
    out = build([rcpt(status="bogus"), rcpt("d@example.test", "delayed", "4.x")])
    assert [b["Status"] for b in status_blocks(out)[1:]] == ["5.0.0", "4.0.0"]


def test_refusals() -> None:
    with pytest.raises(ValueError, match="null"):
        build(envelope_sender="")
    with pytest.raises(ValueError, match="recipient"):
        build([])
    with pytest.raises(ValueError, match="action"):
        build([rcpt(action="bounced")])


# --- NOTIFY and the null sender ----------------------------------------------------------------------------


def test_is_bounceable() -> None:
    assert not is_bounceable("")
    assert is_bounceable("alice@example.test")
    assert is_bounceable("MAILER-DAEMON@example.test")


NOTIFY_TABLE: list[tuple[tuple[str, ...], str, bool]] = [
    ((), "failed", True),
    ((), "delayed", True),
    ((), "delivered", False),
    ((), "relayed", False),
    ((), "expanded", False),
    (("NEVER",), "failed", False),
    (("NEVER",), "delayed", False),
    (("NEVER",), "delivered", False),
    (("FAILURE",), "failed", True),
    (("FAILURE",), "delayed", False),
    (("FAILURE",), "delivered", False),
    (("DELAY",), "delayed", True),
    (("DELAY",), "failed", False),
    (("SUCCESS",), "delivered", True),
    (("SUCCESS",), "relayed", True),
    (("SUCCESS",), "expanded", True),
    (("SUCCESS",), "failed", False),
    (("SUCCESS", "FAILURE"), "failed", True),
    (("SUCCESS", "FAILURE"), "delayed", False),
    (("SUCCESS", "FAILURE", "DELAY"), "delayed", True),
    (("failure",), "failed", True),
]


@pytest.mark.parametrize(("notify", "action", "expected"), NOTIFY_TABLE)
def test_should_notify(notify: tuple[str, ...], action: str, expected: bool) -> None:
    assert should_notify(notify, action) is expected


def test_should_notify_unknown_action() -> None:
    with pytest.raises(ValueError):
        should_notify((), "bounced")


def _all_lines(out: bytes) -> Iterator[bytes]:
    yield from out.split(b"\r\n")


def test_every_line_of_a_big_mixed_report_is_short() -> None:
    recipients = [
        rcpt(
            f"user{i}@example.test",
            "failed" if i % 2 else "delayed",
            "5.1.1" if i % 2 else "4.2.2",
            diagnostic="550 " + "y" * 1500,
            until=NOW + 7200,
        )
        for i in range(20)
    ]
    original = b"X-Very-Long: " + b"v" * 4000 + b"\n\n" + (b"w" * 2500 + b"\r") * 10
    out = build(recipients, original=original, ret="FULL")
    assert max(len(line) for line in _all_lines(out)) <= 998
