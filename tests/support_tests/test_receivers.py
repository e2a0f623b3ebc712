"""The test receivers themselves, driven by Python's smtplib (and raw sockets where smtplib can't)."""

from __future__ import annotations

import asyncio
import os
import smtplib
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from tests.conftest import require_program
from tests.support.receiver import DISCONNECT, Receiver
from tests.support.sink import PostfixMaildir, SmtpSink, strip_trace_headers

MESSAGE = (
    b"From: a@example.test\r\nTo: b@example.test\r\nSubject: exact\r\n\r\n"
    b"first line\r\n.starts with a dot\r\n..two dots\r\n\r\nlast line\r\n"
)


class RawClient:
    """A byte-level client: send exactly these bytes, read replies line by line."""

    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.create_connection((host, port), timeout=5)
        self.file = self.sock.makefile("rb")

    def reply(self) -> list[bytes]:
        lines = []
        while True:
            line = self.file.readline()
            if not line:
                raise ConnectionError("closed")
            lines.append(line)
            if line[3:4] != b"-":
                return lines

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        self.file.close()
        self.sock.close()


@pytest.fixture
def raw() -> Iterator[list[RawClient]]:
    clients: list[RawClient] = []
    yield clients
    for client in clients:
        client.close()


def connect(r: Receiver, clients: list[RawClient]) -> RawClient:
    client = RawClient(r.host, r.port)
    clients.append(client)
    assert client.reply()[0].startswith(b"220 ")
    return client


# -- Receiver --------------------------------------------------------------------------------------------


def test_transaction_recorded_exactly() -> None:
    with Receiver("127.0.0.31", 0) as r, smtplib.SMTP(r.host, r.port) as client:
        client.sendmail("a@example.test", ["b@example.test", "c@example.test"], MESSAGE)
        [tx] = r.wait_for(1)
    assert (tx.mail_from, tx.mail_params) == ("a@example.test", [f"size={len(MESSAGE)}"])
    assert tx.rcpts == [("b@example.test", []), ("c@example.test", [])]
    assert tx.data == MESSAGE
    assert tx.raw == MESSAGE.replace(b"\r\n.", b"\r\n..") + b".\r\n"
    assert (tx.via, tx.tls, tx.ehlo, tx.auth, tx.bare_newlines) == ("DATA", False, True, None, 0)
    assert tx.helo == client.local_hostname or tx.helo.startswith("[")
    assert r.connections == 1
    assert r.sessions[0].verbs() == ["EHLO", "MAIL", "RCPT", "RCPT", "DATA", "QUIT"]


def test_bare_newlines_and_bdat(raw: list[RawClient]) -> None:
    with Receiver("127.0.0.31", 0) as r:
        c = connect(r, raw)
        c.send(b"EHLO raw.test\r\n")
        assert c.reply()[-1] == b"250 CHUNKING\r\n"
        for command in (
            b"MAIL FROM:<> SMTPUTF8\r\n",
            b"RCPT TO:<b@example.test> NOTIFY=NEVER\r\n",
            b"DATA\r\n",
        ):
            c.send(command)
            c.reply()
        # A bare LF before a dot does not end the data; only CRLF.CRLF does.
        c.send(b"one\ntwo\rthree\r\n\n.\nfour\r\n.\r\n")
        assert c.reply()[0].startswith(b"250 ")
        c.send(b"MAIL FROM:<a@example.test>\r\nRCPT TO:<b@example.test>\r\n")
        c.reply()
        c.reply()
        c.send(b"BDAT 5\r\nhelloBDAT 2 LAST\r\n\r\n")
        assert c.reply() == [b"250 2.0.0 Ok: 5 octets received\r\n"]
        assert c.reply()[0].startswith(b"250 ")
        first, second = r.wait_for(2)
    assert first.data == b"one\ntwo\rthree\r\n\n.\nfour\r\n"
    assert (first.bare_newlines, first.mail_from, first.mail_params) == (4, "", ["SMTPUTF8"])
    assert first.rcpts == [("b@example.test", ["NOTIFY=NEVER"])]
    assert (second.via, second.data, second.bdat_sizes, second.bare_newlines) == (
        "BDAT",
        b"hello\r\n",
        [5, 2],
        0,
    )


def test_pipelined_commands_share_a_read_chunk(raw: list[RawClient]) -> None:
    with Receiver("127.0.0.31", 0) as r:
        c = connect(r, raw)
        c.send(b"EHLO raw.test\r\n")
        c.reply()
        c.send(b"MAIL FROM:<a@example.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n")
        assert [c.reply()[0][:3] for _ in range(3)] == [b"250", b"250", b"354"]
        c.send(b"body\r\n.\r\n")
        c.reply()
        r.wait_for(1)
        with smtplib.SMTP(r.host, r.port) as client:  # smtplib never pipelines
            client.sendmail("a@example.test", ["b@example.test"], b"x\r\n")
        r.wait_for(2)
    pipelined, lockstep = r.sessions
    assert pipelined.batches() == [
        ["EHLO raw.test"],
        ["MAIL FROM:<a@example.test>", "RCPT TO:<b@example.test>", "DATA"],
    ]
    assert all(len(batch) == 1 for batch in lockstep.batches())


def test_per_recipient_reply_hook() -> None:
    hook = lambda addr: "550 5.1.1 No such user" if addr.startswith("bad") else None  # noqa: E731
    with Receiver("127.0.0.31", 0, on_rcpt=hook) as r, smtplib.SMTP(r.host, r.port) as client:
        refused = client.sendmail("a@example.test", ["good@example.test", "bad@example.test"], MESSAGE)
        [tx] = r.wait_for(1)
    assert refused == {"bad@example.test": (550, b"5.1.1 No such user")}
    assert tx.rcpts == [("good@example.test", [])]
    assert tx.rejected_rcpts == ["bad@example.test"]


def test_421_greeting_closes() -> None:
    with Receiver("127.0.0.31", 0, greeting="421 4.3.2 busy") as r:
        with pytest.raises(smtplib.SMTPConnectError) as excinfo:
            smtplib.SMTP(r.host, r.port)
        assert excinfo.value.smtp_code == 421
        [session] = r.wait_for_connections(1, closed=True)
    assert session.commands == [] and session.closed_by == "server"


def test_disconnect_after_rcpt() -> None:
    with Receiver("127.0.0.31", 0, disconnect_after="RCPT") as r, smtplib.SMTP(r.host, r.port) as client:
        with pytest.raises(smtplib.SMTPServerDisconnected):
            client.sendmail("a@example.test", ["b@example.test"], MESSAGE)
        [session] = r.wait_for_connections(1, closed=True)
    assert session.verbs() == ["EHLO", "MAIL", "RCPT"]
    assert r.transactions == []


def test_disconnect_mid_data_and_after_dot() -> None:
    big = b"x" * 5000 + b"\r\n"
    with Receiver("127.0.0.31", 0, disconnect_mid_data=1000) as r, smtplib.SMTP(r.host, r.port) as client:
        with pytest.raises((smtplib.SMTPServerDisconnected, ConnectionError)):
            client.sendmail("a@example.test", ["b@example.test"], big)
        r.wait_for_connections(1, closed=True)
        assert r.transactions == []
        # Faults are read at each use: now drop the connection after the whole message instead.
        r.options.disconnect_mid_data = None
        r.options.disconnect_after = "."
        with smtplib.SMTP(r.host, r.port) as second, pytest.raises(smtplib.SMTPServerDisconnected):
            second.sendmail("a@example.test", ["b@example.test"], big)
        [tx] = r.wait_for(1)
    assert tx.data == big and tx.replies == []


def test_lmtp_replies_per_recipient() -> None:
    replies = {"full@example.test": "452 4.2.2 Mailbox full"}
    with Receiver("127.0.0.31", 0, lmtp=True, on_lmtp_rcpt=replies) as r:
        client = smtplib.LMTP(r.host, r.port)
        try:
            assert client.ehlo()[0] == 250  # smtplib sends LHLO
            client.mail("a@example.test")
            client.rcpt("ok@example.test")
            client.rcpt("full@example.test")
            assert client.data(MESSAGE) == (250, b"2.1.5 <ok@example.test> Ok")
            assert client.getreply() == (452, b"4.2.2 Mailbox full")
        finally:
            client.close()
        [tx] = r.wait_for(1)
    assert tx.replies == ["250 2.1.5 <ok@example.test> Ok", "452 4.2.2 Mailbox full"]
    assert r.sessions[0].verbs()[0] == "LHLO"


def test_ehlo_unsupported_falls_back_to_helo() -> None:
    with Receiver("127.0.0.31", 0, ehlo_supported=False) as r, smtplib.SMTP(r.host, r.port) as client:
        client.sendmail("a@example.test", ["b@example.test"], MESSAGE)
        [tx] = r.wait_for(1)
    assert not tx.ehlo and tx.helo
    assert r.sessions[0].verbs()[:2] == ["EHLO", "HELO"]


@pytest.fixture(scope="module")
def tls() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server context, client context) from a throw-away CA, for receiver.test and 127.0.0.31."""
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("receiver.test", "127.0.0.31").configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return server, client


def test_starttls(tls: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    server, client_context = tls
    with Receiver("127.0.0.31", 0, tls_context=server) as r, smtplib.SMTP(r.host, r.port) as client:
        client.ehlo()
        assert client.has_extn("starttls")
        client.starttls(context=client_context)
        client.ehlo()
        assert not client.has_extn("starttls")
        client.sendmail("a@example.test", ["b@example.test"], MESSAGE)
        [tx] = r.wait_for(1)
    assert tx.tls and tx.data == MESSAGE
    assert (r.sessions[0].tls_version or "").startswith("TLSv1.")


def test_starttls_injection_is_sent_in_one_write(tls: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    server, client_context = tls
    with Receiver("127.0.0.31", 0, tls_context=server, starttls_inject=True) as r:
        with smtplib.SMTP(r.host, r.port) as client:
            client.starttls(context=client_context)  # smtplib discards what follows the 220: a correct client
            client.sendmail("a@example.test", ["b@example.test"], MESSAGE)
        [tx] = r.wait_for(1)
    assert tx.tls
    assert "220 Ready\r\n250-evil\r\n" in r.sessions[0].replies


def test_tls_handshake_failure(tls: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    _server, client_context = tls
    for mode in ("close", "garbage"):
        with Receiver("127.0.0.31", 0, tls_handshake_fail=mode) as r, smtplib.SMTP(r.host, r.port) as client:
            with pytest.raises((ssl.SSLError, OSError)):
                client.starttls(context=client_context)
            r.wait_for_connections(1, closed=True)


def test_auth_plain_and_login() -> None:
    options = {"auth_users": {"u": "p"}, "require_auth": True}
    with Receiver("127.0.0.31", 0, **options) as r:
        with smtplib.SMTP(r.host, r.port) as client:
            client.ehlo()
            assert client.mail("a@example.test")[0] == 530
            with pytest.raises(smtplib.SMTPAuthenticationError):
                client.login("u", "wrong")
            client.login("u", "p")  # smtplib picks PLAIN
            client.sendmail("a@example.test", ["b@example.test"], MESSAGE)
        with smtplib.SMTP(r.host, r.port) as client:
            client.ehlo()
            client.user, client.password = "u", "p"
            assert client.auth("LOGIN", client.auth_login)[0] == 235
            client.sendmail("a@example.test", ["b@example.test"], MESSAGE)
        first, second = r.wait_for(2)
    assert first.auth == second.auth == "u"
    assert r.sessions[0].commands[2].startswith("AUTH PLAIN ")


def test_require_tls_refuses_mail_before_starttls() -> None:
    options = {"require_tls": True, "tls_context": ssl.create_default_context()}
    with Receiver("127.0.0.31", 0, **options) as r, smtplib.SMTP(r.host, r.port) as client:
        client.ehlo()
        assert client.mail("a@example.test") == (530, b"5.7.0 Must issue a STARTTLS command first")


def test_slow_and_huge_replies() -> None:
    greeting = "220 slow.test ESMTP"
    with Receiver("127.0.0.31", 0, greeting=greeting, bytes_per_second=200, slow_on=["CONNECT"]) as r:
        started = time.monotonic()
        with smtplib.SMTP(r.host, r.port) as client:
            elapsed = time.monotonic() - started
            assert client.noop()[0] == 250
    assert elapsed >= (len(greeting) + 1) / 200
    with Receiver("127.0.0.31", 0, huge_reply_line=1_000_000) as r, smtplib.SMTP(r.host, r.port) as client:
        with pytest.raises(smtplib.SMTPResponseException) as excinfo:
            client.ehlo()
        assert excinfo.value.smtp_code == 500 and "Line too long" in str(excinfo.value)


def test_hooks_can_disconnect_and_errors_surface() -> None:
    def on_mail(addr: str) -> object:
        if addr == "boom@example.test":
            raise ValueError("hook bug")
        return DISCONNECT if addr == "drop@example.test" else None

    r = Receiver("127.0.0.31", 0, on_mail=on_mail)
    with pytest.raises(AssertionError, match="hook bug"), r:
        with smtplib.SMTP(r.host, r.port) as client:
            client.ehlo()
            assert client.mail("boom@example.test")[0] == 451
        with smtplib.SMTP(r.host, r.port) as client, pytest.raises(smtplib.SMTPServerDisconnected):
            client.ehlo()
            client.mail("drop@example.test")


def test_async_use() -> None:
    async def main() -> list[str]:
        async with Receiver("127.0.0.31", 0) as r:
            await asyncio.to_thread(_send_one, r.host, r.port)
            return [tx.mail_from for tx in await r.wait_for_async(1)]

    assert asyncio.run(main()) == ["a@example.test"]


def _send_one(host: str, port: int) -> None:
    with smtplib.SMTP(host, port) as client:
        client.sendmail("a@example.test", ["b@example.test"], MESSAGE)


# -- Postfix ---------------------------------------------------------------------------------------------


@pytest.mark.peer
def test_smtp_sink_counts_and_dumps(tmp_path: Path) -> None:
    require_program("smtp-sink")
    with SmtpSink("127.0.0.32", 0, dump_dir=tmp_path / "dump") as sink:
        with smtplib.SMTP(sink.host, sink.port) as client:
            for i in range(3):
                client.sendmail(f"a{i}@example.test", ["b@example.test", "c@example.test"], MESSAGE)
        assert sink.wait_for(3) == 3
        messages = sink.messages()
    # Dump files finished within one clock tick have no order.
    assert sorted(m.mail_from for m in messages) == ["a0@example.test", "a1@example.test", "a2@example.test"]
    assert all(m.rcpts == ["b@example.test", "c@example.test"] for m in messages)
    assert messages[0].content == MESSAGE.replace(b"\r\n", b"\n")


@pytest.mark.peer
def test_postfix_maildir_delivers_byte_for_byte() -> None:
    require_program("postfix")
    if os.geteuid() != 0:
        pytest.skip("a private Postfix needs root (postfix -c DIR)")
    with PostfixMaildir("127.0.0.33", 0) as mta:
        with smtplib.SMTP(mta.host, mta.port) as client:
            client.sendmail("a@example.test", ["b@example.test", "c@other.test"], MESSAGE)
        delivered = mta.wait_for(2)
    assert sorted(m.split(b"Delivered-To: ")[1].split(b"\n")[0] for m in delivered) == [
        b"b@example.test",
        b"c@other.test",
    ]
    for message in delivered:
        assert message.startswith(b"Return-Path: <a@example.test>\n")
        assert strip_trace_headers(message) == MESSAGE.replace(b"\r\n", b"\n")
