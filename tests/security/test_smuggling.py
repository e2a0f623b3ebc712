"""SMTP smuggling (CVE-2023-51764 family) against the running daemon: each variant is a named test.

Each test sends one DATA (or BDAT) whose content carries a fake end of data followed by a second, smuggled
transaction, then the real CRLF.CRLF. The oracle: the server answers exactly one reply for the whole data, and
no second message is ever queued (the smuggled MAIL/RCPT never reach the command parser).
"""

from __future__ import annotations

import pytest

from tests.daemon.harness import Client, Relay

SMUGGLED = b"MAIL FROM:<admin@example.test>\r\nRCPT TO:<victim@example.test>\r\nDATA\r\nSubject: smuggled\r\n\r\nevil\r\n"

# name -> (fake end, contains a bare CR or LF)
VARIANTS = {
    "lf_dot_lf": (b"\n.\n", True),
    "lf_dot_crlf": (b"\n.\r\n", True),
    "crlf_dot_lf": (b"\r\n.\n", True),
    "cr_dot_crlf": (b"\r.\r\n", True),
    "cr_dot_cr": (b"\r.\r", True),
    "crlf_dot_cr": (b"\r\n.\r", True),
    "lf_nul_dot_lf": (b"\n\x00.\n", True),
    "crlf_nul_dot_crlf": (b"\r\n\x00.\r\n", False),
    "crlf_dot_nul_crlf": (b"\r\n.\x00\r\n", False),
}


def _open_transaction(relay: Relay) -> Client:
    c = Client(relay.host, relay.port)
    assert c.reply().startswith("220")
    c.send(b"EHLO c.test\r\nMAIL FROM:<a@c.test>\r\nRCPT TO:<b@example.test>\r\n")
    for _ in range(3):
        assert c.reply().startswith("250")
    return c


@pytest.mark.parametrize(("fake_end", "bare"), list(VARIANTS.values()), ids=list(VARIANTS))
def test_smuggling_variant_creates_no_second_message(relay: Relay, fake_end: bytes, bare: bool) -> None:
    before = set(relay.queue_ids())
    c = _open_transaction(relay)
    c.line("DATA")
    assert c.reply().startswith("354")
    c.send(b"Subject: first\r\n\r\nhello" + fake_end + SMUGGLED + b".\r\n")
    final = c.reply()
    # Content with a bare CR or LF is refused as a whole (our documented policy); a NUL alone is just content.
    assert final.startswith("550 5.6.0" if bare else "250 2.0.0"), final
    c.line("NOOP")
    assert c.reply().startswith("250 2.0.0"), "an extra reply means the smuggled commands were parsed"
    c.line("QUIT")
    assert c.reply().startswith("221")
    c.close()
    new = set(relay.queue_ids()) - before
    assert len(new) == (0 if bare else 1)


def test_smuggling_bdat_chunk_carrying_fake_end(relay: Relay) -> None:
    before = set(relay.queue_ids())
    c = _open_transaction(relay)
    chunk = b"Subject: first\r\n\r\nhello\r\n.\r\n" + SMUGGLED + b".\r\n"
    c.send(b"BDAT %d\r\n" % len(chunk) + chunk)
    assert c.reply().startswith(f"250 2.0.0 {len(chunk)} octets")
    c.send(b"BDAT 0 LAST\r\n")
    assert c.reply().startswith("250 2.0.0 Ok: queued as")
    c.line("NOOP")
    assert c.reply().startswith("250 2.0.0")
    c.close()
    new = set(relay.queue_ids()) - before
    assert len(new) == 1, "exactly one message: the fake end and smuggled commands are content"


def test_smuggling_bdat_last_with_crlf_dot_crlf_inside(relay: Relay) -> None:
    before = set(relay.queue_ids())
    c = _open_transaction(relay)
    chunk = b"Subject: x\r\n\r\n.\r\n" + SMUGGLED
    c.send(b"BDAT %d LAST\r\n" % len(chunk) + chunk)
    assert c.reply().startswith("250 2.0.0 Ok: queued as")
    c.line("NOOP")
    assert c.reply().startswith("250 2.0.0")
    c.close()
    assert len(set(relay.queue_ids()) - before) == 1


def test_smuggling_bare_lf_in_command_is_not_a_line_end(relay: Relay) -> None:
    before = set(relay.queue_ids())
    c = _open_transaction(relay)
    c.send(b"RSET\nMAIL FROM:<admin@example.test>\r\n")
    got = c.reply()
    assert got.startswith("500 5.5.2"), got  # "RSET\n" is refused, not executed ...
    got = c.reply()
    assert got.startswith("503 5.5.1"), got  # ... so the transaction is still open
    c.line("NOOP")
    assert c.reply().startswith("250 2.0.0")
    c.close()
    assert set(relay.queue_ids()) == before
