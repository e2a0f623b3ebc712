"""Real clients against the daemon: swaks (Debian), Python's smtplib, aiosmtplib."""

from __future__ import annotations

import asyncio
import smtplib
import subprocess
from email.message import EmailMessage

from tests.conftest import require_program

from .harness import Relay


def test_swaks_sends_and_is_queued(relay: Relay) -> None:
    swaks = require_program("swaks")
    before = len(relay.queue_ids())
    out = subprocess.run(
        [swaks, "--server", f"{relay.host}:{relay.port}", "--from", "app@client.test", "--to", "ops@example.test",
         "--header", "Subject: swaks test", "--body", "hello from swaks", "--pipeline"],
        capture_output=True, text=True, timeout=30,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "queued as" in out.stdout
    assert len(relay.queue_ids()) == before + 1


def test_swaks_dot_lines_and_8bit(relay: Relay) -> None:
    swaks = require_program("swaks")
    out = subprocess.run(
        [swaks, "--server", f"{relay.host}:{relay.port}", "--from", "a@client.test", "--to", "b@example.test",
         "--body", ".leading dot\n..two dots\n.\nnot the end\nünïcödé"],
        capture_output=True, text=True, timeout=30,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_smtplib_send_message(relay: Relay) -> None:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "a@client.test", "b@example.test, c@example.test", "smtplib"
    msg.set_content("hello\n.\n..\nbye\n")
    with smtplib.SMTP(relay.host, relay.port, timeout=10) as s:
        code, _caps = s.ehlo("client.test")
        assert code == 250 and s.has_extn("pipelining") and s.has_extn("chunking")
        refused = s.send_message(msg)
        assert refused == {}


def test_smtplib_refused_recipient_reported(relay: Relay) -> None:
    with smtplib.SMTP(relay.host, relay.port, timeout=10) as s:
        s.ehlo("client.test")
        refused = s.sendmail("a@client.test", ["ok@example.test", "bad@example.test."], b"Subject: x\r\n\r\ny\r\n")
        assert list(refused) == ["bad@example.test."]
        assert refused["bad@example.test."][0] == 501


def test_aiosmtplib_send(relay: Relay) -> None:
    import aiosmtplib

    async def go() -> None:
        msg = EmailMessage()
        msg["From"], msg["To"], msg["Subject"] = "a@client.test", "b@example.test", "aiosmtplib"
        msg.set_content("hi")
        errors, response = await aiosmtplib.send(msg, hostname=relay.host, port=relay.port, start_tls=False)
        assert errors == {} and "queued as" in response

    asyncio.run(go())
