"""Scripted SMTP dialogues against a real ``mailhop serve`` on loopback: every command, order, limits."""

from __future__ import annotations

import re

import pytest

from .harness import Client, Relay, run_transcript

HELLO = """
S: 220 relay\\.example\\.test ESMTP
C: EHLO client.test
S: 250-relay\\.example\\.test
"""


def test_ehlo_advertises_extensions(relay: Relay) -> None:
    c = Client(relay.host, relay.port)
    assert c.reply().startswith("220 ")
    c.line("EHLO client.test")
    ehlo = c.reply()
    lines = [line[4:] for line in ehlo.splitlines()]
    for ext in ("PIPELINING", "SIZE 100000", "8BITMIME", "ENHANCEDSTATUSCODES", "SMTPUTF8", "DSN", "CHUNKING"):
        assert ext in lines, ehlo
    assert "STARTTLS" not in lines  # no certificate configured
    c.close()


def test_helo_and_full_transaction(relay: Relay) -> None:
    before = len(relay.queue_ids())
    c = run_transcript(
        relay,
        """
        S: 220
        C: HELO client.test
        S: 250 relay\\.example\\.test
        C: MAIL FROM:<sender@client.test>
        S: 250 2\\.1\\.0
        C: RCPT TO:<someone@elsewhere.test>
        S: 250 2\\.1\\.5
        C: DATA
        S: 354
        B: b"Subject: hi\\r\\n\\r\\nbody\\r\\n.\\r\\n"
        S: 250 2\\.0\\.0 Ok: queued as \\S+
        C: QUIT
        S: 221 2\\.0\\.0
        CLOSED
        """,
    )
    c.close()
    assert len(relay.queue_ids()) == before + 1


@pytest.mark.parametrize(
    ("command", "pattern"),
    [
        ("NOOP", r"250 2\.0\.0"),
        ("NOOP anything", r"250 2\.0\.0"),
        ("HELP", r"214 2\.0\.0"),
        ("VRFY someone", r"252 2\.5\.0"),
        ("RSET", r"250 2\.0\.0"),
        ("FROBNICATE", r"500 5\.5\.2"),
        ("EXPN list", r"502 5\.5\.1"),
        ("TURN", r"502 5\.5\.1"),
        ("MAIL FROM:sender@client.test", r"501 5\.1\.7"),
        ("MAIL FROM:<sender@client.test> FOO=BAR", r"555 5\.5\.4"),
        ("RCPT TO:<x@example.test>", r"503 5\.5\.1"),
        ("DATA", r"503 5\.5\.1"),
        ("BDAT 0 LAST", r"503 5\.5\.1"),
        ("STARTTLS", r"5\d\d 5\.5\.1"),
    ],
    ids=lambda v: v if isinstance(v, str) and " " not in v else None,
)
def test_single_commands(relay: Relay, command: str, pattern: str) -> None:
    c = run_transcript(relay, HELLO + f"C: {command}\nS: {pattern}\nC: NOOP\nS: 250")
    c.close()


def test_commands_before_helo_are_out_of_order(relay: Relay) -> None:
    run_transcript(
        relay,
        """
        S: 220
        C: MAIL FROM:<a@client.test>
        S: 503 5\\.5\\.1
        C: NOOP
        S: 250
        C: QUIT
        S: 221
        """,
    ).close()


def test_wrong_order_in_transaction(relay: Relay) -> None:
    run_transcript(
        relay,
        HELLO
        + """
        C: MAIL FROM:<a@client.test>
        S: 250
        C: MAIL FROM:<b@client.test>
        S: 503 5\\.5\\.1
        C: DATA
        S: 503 5\\.5\\.1
        C: RSET
        S: 250
        C: RCPT TO:<x@example.test>
        S: 503 5\\.5\\.1
        """,
    ).close()


def test_pipelined_transaction_replies_in_order(relay: Relay) -> None:
    c = Client(relay.host, relay.port)
    assert c.reply().startswith("220")
    c.send(
        b"EHLO client.test\r\nMAIL FROM:<a@client.test>\r\nRCPT TO:<b@example.test>\r\n"
        b"RCPT TO:<bad-syntax>\r\nRCPT TO:<c@example.test>\r\nDATA\r\n"
    )
    codes = [c.reply()[:3] for _ in range(6)]
    assert codes == ["250", "250", "250", "501", "250", "354"]
    c.send(b"Subject: p\r\n\r\nx\r\n.\r\nMAIL FROM:<a@client.test>\r\nRCPT TO:<d@example.test>\r\nDATA\r\n")
    assert c.reply().startswith("250 2.0.0 Ok: queued as")
    assert [c.reply()[:3] for _ in range(3)] == ["250", "250", "354"]
    c.send(b"y\r\n.\r\nQUIT\r\n")
    assert c.reply().startswith("250 ")
    assert c.reply().startswith("221 ")
    c.close()


def test_long_pipelined_burst_mixing_commands_and_commits(relay: Relay) -> None:
    """Thousands of commands in one write, with message ends (a step that waits for the queue's commit) at
    varying distances: each gets its reply, in order, across the session's fair-turn hand-overs (after 32 events
    in a row), whichever event a hand-over lands on. RSET before each MAIL is the padding because it is an event
    of the core (NOOP is answered inside it): 28-39 of them move the 33rd event of a message over its DataEnd,
    DataChunk, DataStart, RCPT, MAIL and the RSETs."""
    before = len(relay.queue_ids())
    c = Client(relay.host, relay.port)
    assert c.reply().startswith("220")
    body = b"Subject: burst\r\n\r\nx\r\n"
    bdat = f"BDAT {len(body)} LAST\r\n".encode() + body
    script, expected = [b"EHLO client.test\r\n"], []
    for i in range(60):
        script.append(b"RSET\r\n" * (i % 40) + b"MAIL FROM:<a@client.test>\r\nRCPT TO:<b@example.test>\r\n" + bdat)
        expected.append(2 + i % 40)
    c.send(b"".join(script) + b"QUIT\r\n")
    assert c.reply().startswith("250-")
    for i, n in enumerate(expected):
        replies = [c.reply() for _ in range(n + 1)]
        assert all(r.startswith("250 2.") for r in replies[:n]), (i, replies)
        assert replies[n].startswith("250 2.0.0 Ok: queued as"), (i, replies)
    assert c.reply().startswith("221 ")
    assert c.closed()
    c.close()
    assert len(relay.queue_ids()) == before + 60


def test_bdat_transaction(relay: Relay) -> None:
    before = len(relay.queue_ids())
    run_transcript(
        relay,
        HELLO
        + """
        C: MAIL FROM:<a@client.test> BODY=8BITMIME
        S: 250
        C: RCPT TO:<b@example.test>
        S: 250
        B: b"BDAT 12\\r\\nSubject: x\\r\\n"
        S: 250 2\\.0\\.0 12 octets
        B: b"BDAT 8 LAST\\r\\n\\r\\nbody\\r\\n"
        S: 250 2\\.0\\.0 Ok: queued as
        """,
    ).close()
    assert len(relay.queue_ids()) == before + 1


def test_command_line_too_long_keeps_dialogue_in_sync(relay: Relay) -> None:
    run_transcript(
        relay,
        HELLO + f"C: NOOP {'x' * 2000}\nS: 500 5\\.5\\.2\nC: NOOP\nS: 250 2\\.0\\.0",
    ).close()


def test_too_many_recipients(relay: Relay) -> None:
    c = Client(relay.host, relay.port)
    c.reply()
    c.send(b"EHLO c\r\nMAIL FROM:<a@client.test>\r\n" + b"".join(b"RCPT TO:<r%d@example.test>\r\n" % i for i in range(101)))
    replies = [c.reply() for _ in range(103)]
    assert all(r.startswith("250") for r in replies[:102])
    assert replies[102].startswith("452 4.5.3"), replies[102]
    c.close()


def test_size_parameter_over_limit(relay: Relay) -> None:
    run_transcript(relay, HELLO + "C: MAIL FROM:<a@client.test> SIZE=100001\nS: 552 5\\.3\\.4").close()


def test_message_too_big_read_to_end_then_552(relay: Relay) -> None:
    before = len(relay.queue_ids())
    c = run_transcript(relay, HELLO + "C: MAIL FROM:<a@c.test>\nS: 250\nC: RCPT TO:<b@example.test>\nS: 250\nC: DATA\nS: 354")
    line = b"x" * 998 + b"\r\n"
    c.send(b"Subject: big\r\n\r\n" + line * 150 + b".\r\n")
    assert c.reply().startswith("552 5.3.4")
    c.line("NOOP")
    assert c.reply().startswith("250")
    c.close()
    assert len(relay.queue_ids()) == before


def test_too_many_errors_disconnects(relay: Relay) -> None:
    # max_errors = 5: the fifth error reply is followed by 421 and the close.
    c = run_transcript(relay, HELLO + "C: BOGUS\nS: 500\n" * 5 + "S: 421 4\\.7\\.0\nCLOSED")
    c.close()


def test_received_header_prepended_and_dsn_params_stored(relay: Relay) -> None:
    import json
    import subprocess
    import sys

    c = run_transcript(
        relay,
        HELLO
        + """
        C: MAIL FROM:<a@client.test> RET=HDRS ENVID=QQ+2B1
        S: 250
        C: RCPT TO:<b@example.test> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;b+2Bx@example.test
        S: 250
        C: DATA
        S: 354
        B: b"Subject: r\\r\\n\\r\\nhello\\r\\n.\\r\\n"
        """,
    )
    reply = c.reply()
    c.close()
    m = re.search(r"queued as (\S+)", reply)
    assert m, reply
    out = subprocess.run(
        [sys.executable, "-m", "mailhop.cli", "queue", "show", m.group(1), "--body", "--config", str(relay.config)],
        capture_output=True, check=True,
    ).stdout.decode()
    meta, _, body = out.partition("\n}\n")
    info = json.loads(meta + "}")
    assert info["ret"] == "HDRS" and info["envid"] == "QQ+1"
    rcpt = info["recipients"][0]
    assert rcpt["notify"] == ["SUCCESS", "DELAY"] and rcpt["orcpt"] == "rfc822;b+x@example.test"
    assert rcpt["status"] == "pending"
    assert body.lstrip("\n").startswith("Received: from client.test ([127.0.0.1])")
    assert f"id {m.group(1)}" in body and "for <b@example.test>;" in body
    assert body.endswith("Subject: r\r\n\r\nhello\r\n")


def test_mail_loop_refused(relay: Relay) -> None:
    before = len(relay.queue_ids())
    hops = b"".join(b"Received: from hop%d by hop%d; Mon, 1 Jan 2024 00:00:00 +0000\r\n" % (i, i) for i in range(51))
    c = run_transcript(relay, HELLO + "C: MAIL FROM:<a@c.test>\nS: 250\nC: RCPT TO:<b@example.test>\nS: 250\nC: DATA\nS: 354")
    c.send(hops + b"Subject: loop\r\n\r\nx\r\n.\r\n")
    assert c.reply().startswith("554 5.4.6")
    c.close()
    assert len(relay.queue_ids()) == before


def test_fifty_received_headers_still_accepted(relay: Relay) -> None:
    hops = b"".join(b"Received: from hop%d by hop%d; Mon, 1 Jan 2024 00:00:00 +0000\r\n" % (i, i) for i in range(50))
    c = run_transcript(relay, HELLO + "C: MAIL FROM:<a@c.test>\nS: 250\nC: RCPT TO:<b@example.test>\nS: 250\nC: DATA\nS: 354")
    c.send(hops + b"Subject: ok\r\n\r\nx\r\n.\r\n")
    assert c.reply().startswith("250 ")
    c.close()


def test_http_request_closed_immediately(relay: Relay) -> None:
    c = Client(relay.host, relay.port)
    c.reply()
    c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert c.closed()
    c.close()
