"""Authentication end to end through ``mailhop serve``: SPF, DKIM and DMARC decided over real sockets with the
records in a loopback DNS server, one Authentication-Results field in the stored message; and outbound DKIM
signing by the daemon, delivered to Postfix's smtp-sink and verified there by independent verifiers."""

from __future__ import annotations

import base64
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.delivery.engine_harness import mx_port
from tests.signing import dkimpy_verify, dkimverify, opendkim_verify
from tests.support.dnsserver import TestDns
from tests.support.sink import SmtpSink

from .harness import Client, Relay, run_relay
from .test_checks_e2e import queued_id, send, stored

SELECTOR = "s1"


@pytest.fixture(scope="module")
def sender_key() -> tuple[bytes, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption())
    der = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return pem, base64.b64encode(der).decode()


def txt(name: str, value: str) -> str:
    chunks = " ".join(f'"{value[i:i + 200]}"' for i in range(0, len(value), 200))
    return f"{name}. 300 IN TXT {chunks}"


@pytest.fixture
def auth_relay(tmp_path: Path, sender_key: tuple[bytes, str]) -> Iterator[tuple[Relay, TestDns]]:
    with TestDns(origins=("test",)) as dns:
        dns.add(txt("sender.test", "v=spf1 ip4:127.0.0.0/8 -all"),
                txt("_dmarc.sender.test", "v=DMARC1; p=reject"),
                txt(f"{SELECTOR}._domainkey.sender.test", f"v=DKIM1; k=rsa; p={sender_key[1]}"),
                txt("forger.test", "v=spf1 ip4:192.0.2.0/24 -all"),
                "sender.test. 300 IN A 192.0.2.1")
        extra = f"""
        [dns]
        nameservers = ["{dns.nameserver}"]
        timeout = 1.0
        lifetime = 2.0
        [checks.spf]
        enabled = true
        [checks.dkim]
        enabled = true
        [checks.dmarc]
        enabled = true
        """
        # Loopback is not trusted here: the checks judge strangers only.
        with run_relay(tmp_path, extra=extra, trusted='["10.0.0.0/8"]') as relay:
            yield relay, dns


def signed_message(pem: bytes, subject: str, from_domain: str = "sender.test") -> str:
    msg = (f"From: <news@{from_domain}>\r\nTo: <user@example.test>\r\nSubject: {subject}\r\n"
           "Message-ID: <m1@sender.test>\r\n\r\nHello there.\r\n").encode()
    sig: bytes = dkim.sign(msg, SELECTOR.encode(), from_domain.encode(), pem,
                           include_headers=[b"from", b"to", b"subject"])
    return (sig + msg).decode()


def send_raw(relay: Relay, message: str, sender: str) -> str:
    """One transaction with a complete message (headers included); the final (or first refusing) reply."""
    c = Client(relay.host, relay.port)
    try:
        c.reply()
        c.line("EHLO client.test")
        c.reply()
        c.line(f"MAIL FROM:<{sender}>")
        reply = c.reply()
        if not reply.startswith("250"):
            return reply
        c.line("RCPT TO:<user@example.test>")
        reply = c.reply()
        if not reply.startswith("250"):
            return reply
        c.line("DATA")
        assert c.reply().startswith("354")
        c.send(message.encode() + b".\r\n")
        return c.reply()
    finally:
        c.close()


def auth_results(body: bytes) -> list[str]:
    unfolded = re.sub(rb"\r\n[ \t]+", b" ", body.partition(b"\r\n\r\n")[0]).decode()
    return [line for line in unfolded.split("\r\n") if line.lower().startswith("authentication-results:")]


def test_signed_aligned_mail_passes_with_one_authentication_results(
        auth_relay: tuple[Relay, TestDns], sender_key: tuple[bytes, str]) -> None:
    relay, _ = auth_relay
    final = send_raw(relay, signed_message(sender_key[0], "hello"), "news@sender.test")
    body = stored(relay, queued_id(final))
    fields = auth_results(body)
    assert len(fields) == 1, fields
    ar = fields[0]
    assert ar.startswith("Authentication-Results: relay.example.test;")
    assert "spf=pass smtp.mailfrom=news@sender.test" in ar
    assert "dkim=pass" in ar and "header.d=sender.test" in ar and "header.s=s1" in ar
    assert "dmarc=pass" in ar and "header.from=sender.test" in ar
    # Still verifiable after our edits: the signed fields and the body are untouched.
    assert dkimpy_verify(body, {"s1._domainkey.sender.test": f"v=DKIM1; k=rsa; p={sender_key[1]}".encode()})


def test_spf_fail_is_refused_at_mail_from(auth_relay: tuple[Relay, TestDns]) -> None:
    relay, _ = auth_relay
    replies, final = send(relay, "hi", sender="someone@forger.test")
    assert replies == [] and final.startswith("550 5.7.23"), final


def test_dmarc_reject_for_unaligned_unsigned_mail(auth_relay: tuple[Relay, TestDns]) -> None:
    relay, _ = auth_relay
    # SPF passes for the envelope domain example.test? No record: spf=none; From: sender.test is unsigned.
    message = "From: <ceo@sender.test>\r\nTo: <user@example.test>\r\nSubject: wire money\r\n\r\nNow.\r\n"
    final = send_raw(relay, message, "bounce@elsewhere.test")
    assert final.startswith("550 5.7.1") and "DMARC" in final, final
    assert relay.queue_ids() == []


def test_tampered_signature_fails_dkim_and_dmarc(auth_relay: tuple[Relay, TestDns],
                                                  sender_key: tuple[bytes, str]) -> None:
    relay, _ = auth_relay
    message = signed_message(sender_key[0], "hello").replace("Hello there.", "Hello there!")
    # The envelope is another domain, so SPF cannot align: only DKIM could have saved it.
    final = send_raw(relay, message, "bounce@elsewhere.test")
    assert final.startswith("550 5.7.1"), final


# -- outbound signing ---------------------------------------------------------------------------------------------

def keygen(tmp: Path, domain: str, selector: str) -> tuple[Path, str]:
    out = subprocess.run([sys.executable, "-m", "mailhop.cli", "dkim", "keygen", "--domain", domain, "--selector",
                          selector, "--out", str(tmp)], capture_output=True, text=True, timeout=60, check=True)
    record = next(line for line in out.stdout.splitlines() if "._domainkey." in line and " TXT " in line)
    value = "".join(re.findall(r'"([^"]*)"', record))
    return tmp / f"{domain}.{selector}.key", value


def test_daemon_signs_trusted_mail_and_the_sink_copy_verifies(tmp_path: Path) -> None:
    key_file, record = keygen(tmp_path, "example.org", "mh2026")
    port = mx_port()
    with TestDns(origins=("test",)) as dns, \
            SmtpSink("127.0.0.64", port, dump_dir=tmp_path / "dump") as sink:
        dns.add("sink.test. 300 IN MX 10 mx.sink.test.", "mx.sink.test. 300 IN A 127.0.0.64")
        extra = textwrap.dedent(f"""
        [delivery]
        mx_port = {port}
        [dns]
        nameservers = ["{dns.nameserver}"]
        timeout = 1.0
        lifetime = 2.0
        [[dkim.sign]]
        domain = "example.org"
        selector = "mh2026"
        key_file = "{key_file}"
        """)
        with run_relay(tmp_path, extra=extra) as relay:  # loopback is trusted: its mail is signed
            message = ("From: Alice <alice@example.org>\r\nTo: <bob@sink.test>\r\nSubject: signed by mailhop\r\n"
                       "Date: Mon, 30 Nov 2026 10:00:00 +0000\r\n\r\nLine one.\r\n\r\n\r\n")
            c = Client(relay.host, relay.port)
            try:
                c.reply()
                for cmd in ("EHLO app.test", "MAIL FROM:<alice@example.org>", "RCPT TO:<bob@sink.test>", "DATA"):
                    c.line(cmd)
                    c.reply()
                c.send(message.encode() + b".\r\n")
                assert c.reply().startswith("250")
            finally:
                c.close()
            sink.wait_for(1, timeout=20)
        got = sink.messages()[0].content.replace(b"\n", b"\r\n")  # smtp-sink drops every CR
    assert got.startswith(b"DKIM-Signature: ") or b"\r\nDKIM-Signature: " in got
    records = {"mh2026._domainkey.example.org": record.encode()}
    assert dkimpy_verify(got, records)
    (tmp_path / "opendkim").mkdir()
    report = opendkim_verify(got, records, tmp_path / "opendkim")
    assert "dkim=pass" in report, report
    (tmp_path / "dv").mkdir()
    code, output = dkimverify(got, [txt("mh2026._domainkey.example.org", record)], tmp_path / "dv")
    assert code == 0, output
    # The verifiers are not blind: the same copy with one body byte changed fails.
    assert not dkimpy_verify(got.replace(b"Line one.", b"Line 1.."), records)
