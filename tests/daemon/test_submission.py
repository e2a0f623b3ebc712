"""Submission for people and applications against a real daemon: ports 587 (STARTTLS) and 465 (implicit TLS),
AUTH PLAIN/LOGIN/SCRAM-SHA-256, lockout, sender identity, per-user limits; real clients (swaks, smtplib,
openssl s_client)."""

from __future__ import annotations

import base64
import json
import smtplib
import socket
import ssl
import subprocess
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from tests.conftest import require_program
from tests.smtp.test_sasl import ScramClient

from .harness import Relay, free_port, start_relay, write_config


@dataclass
class Sub:
    relay: Relay
    submission: int  # STARTTLS port
    submissions: int  # implicit TLS port
    ca: trustme.CA
    cafile: Path

    def ctx(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        self.ca.configure_trust(ctx)
        return ctx


def add_user(cfg: Path, name: str, password: str, *args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "mailhop.cli", "users", "add", name, "--password-stdin",
                           "--config", str(cfg), *args], input=password + "\n", capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.fixture(scope="module")
def sub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sub]:
    tmp = tmp_path_factory.mktemp("sub")
    ca = trustme.CA()
    cert = ca.issue_cert("relay.example.test", "127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp / "cert.pem"))
    cert.private_key_pem.write_to_path(str(tmp / "key.pem"))
    ca.cert_pem.write_to_path(str(tmp / "ca.pem"))
    mx_port, p587, p465 = free_port(), free_port(), free_port()
    extra = f"""
[tls]
certificate = "cert.pem"
key = "key.pem"
[[listener]]
address = "127.0.0.1:{p587}"
role = "submission"
[[listener]]
address = "127.0.0.1:{p465}"
role = "submissions"
[auth]
failure_delay = 0.05
max_failures = 3
penalty = 600
enforce_from_header = true
[limits]
max_connections_per_ip = 200
"""
    # No trusted networks: relaying must come from AUTH alone.
    cfg = write_config(tmp, mx_port, extra, trusted="[]")
    add_user(cfg, "alice", "correct horse", "--address", "alice@example.org", "--address", "@alice.example")
    add_user(cfg, "bob", "bobs secret", "--address", "bob@example.org", "--max-recipients", "2",
             "--max-messages-per-hour", "2")
    add_user(cfg, "mallory", "mallory pw", "--address", "mallory@example.org")
    relay = start_relay(cfg, "127.0.0.1", mx_port, tmp / "spool")
    try:
        yield Sub(relay, p587, p465, ca, tmp / "ca.pem")
    finally:
        assert relay.stop() == 0, relay.log()


def smtp587(sub: Sub) -> smtplib.SMTP:
    s = smtplib.SMTP("127.0.0.1", sub.submission, timeout=10)
    s.ehlo("client.test")
    s.starttls(context=sub.ctx())
    s.ehlo("client.test")
    return s


def test_auth_not_offered_or_accepted_before_starttls(sub: Sub) -> None:
    with smtplib.SMTP("127.0.0.1", sub.submission, timeout=10) as s:
        s.ehlo("client.test")
        assert s.has_extn("starttls") and not s.has_extn("auth")
        code, msg = s.docmd("AUTH", "PLAIN " + base64.b64encode(b"\0alice\0correct horse").decode())
        assert (code, msg[:6]) == (538, b"5.7.11")
        code, msg = s.docmd("MAIL", "FROM:<alice@example.org>")
        assert (code, msg[:5]) == (530, b"5.7.0")


def test_plain_and_login_after_starttls(sub: Sub) -> None:
    for mech in ("PLAIN", "LOGIN"):
        with smtp587(sub) as s:
            assert "PLAIN" in s.esmtp_features["auth"] and "SCRAM-SHA-256" in s.esmtp_features["auth"]
            s.user, s.password = "alice", "correct horse"
            code, _ = s.auth(mech, s.auth_plain if mech == "PLAIN" else s.auth_login)
            assert code == 235
            refused = s.sendmail("alice@example.org", ["someone@elsewhere.test"],
                                 b"From: alice@example.org\r\nSubject: via " + mech.encode() + b"\r\n\r\nhi\r\n")
            assert refused == {}


def test_unauthenticated_relay_refused_on_mx(sub: Sub) -> None:
    with smtplib.SMTP("127.0.0.1", sub.relay.port, timeout=10) as s:
        s.ehlo("c")
        s.mail("x@y.test")
        code, msg = s.rcpt("someone@elsewhere.test")
        assert (code, msg[:5]) == (554, b"5.7.1")


def test_scram_sha_256_round_trip(sub: Sub) -> None:
    with smtp587(sub) as s:
        client = ScramClient("alice", "correct horse")
        code, challenge = s.docmd("AUTH", "SCRAM-SHA-256 " + base64.b64encode(client.first()).decode())
        assert code == 334
        final = client.final(base64.b64decode(challenge))
        code, server_final = s.docmd(base64.b64encode(final).decode())
        assert code == 334 and client.check(base64.b64decode(server_final))
        code, _ = s.docmd("")
        assert code == 235
        code, _ = s.docmd("MAIL", "FROM:<x@alice.example>")
        assert code == 250


def test_sender_identity_enforced(sub: Sub) -> None:
    with smtp587(sub) as s:
        s.login("mallory", "mallory pw")
        code, msg = s.docmd("MAIL", "FROM:<alice@example.org>")
        assert (code, msg[:5]) == (553, b"5.7.1")
        code, _ = s.docmd("MAIL", "FROM:<mallory@example.org>")
        assert code == 250
        s.rcpt("r@elsewhere.test")
        code, _ = s.docmd("DATA")
        assert code == 354
        s.send(b"From: alice@example.org\r\nSubject: forged\r\n\r\nx\r\n.\r\n")
        code, msg = s.getreply()
        assert (code, msg[:5]) == (553, b"5.7.1")  # the From: header is checked too (enforce_from_header)


def test_per_user_limits(sub: Sub) -> None:
    with smtp587(sub) as s:
        s.login("bob", "bobs secret")
        s.mail("bob@example.org")
        assert s.rcpt("a@x.test")[0] == 250 and s.rcpt("b@x.test")[0] == 250
        code, msg = s.rcpt("c@x.test")
        assert (code, msg[:5]) == (452, b"4.7.1")
        s.rset()
        for i in range(2):
            assert s.sendmail("bob@example.org", ["a@x.test"], f"From: bob@example.org\r\nSubject: {i}\r\n\r\n.\r\n") == {}
        code, msg = s.docmd("MAIL", "FROM:<bob@example.org>")
        assert (code, msg[:5]) == (450, b"4.7.1")


def test_wrong_password_then_lockout(sub: Sub) -> None:
    # A fresh client address so the lockout does not spill into the other tests.
    def attempt(password: str) -> int:
        s = smtplib.SMTP("127.0.0.1", sub.submission, timeout=10, source_address=("127.0.0.9", 0))
        s.ehlo("c")
        s.starttls(context=sub.ctx())
        s.ehlo("c")
        try:
            code, _ = s.docmd("AUTH", "PLAIN " + base64.b64encode(b"\0mallory\0" + password.encode()).decode())
        finally:
            s.close()
        return code

    assert attempt("wrong1") == 535
    assert attempt("wrong2") == 535
    assert attempt("wrong3") == 421  # the third failure locks the address and the user out
    assert attempt("mallory pw") == 421  # even the right password, during the penalty


def test_state_reset_after_starttls_drops_nothing_into_tls(sub: Sub) -> None:
    raw = socket.create_connection(("127.0.0.1", sub.submission), timeout=10)
    raw.recv(1000)
    raw.sendall(b"EHLO c\r\n")
    raw.recv(1000)
    raw.sendall(b"STARTTLS\r\nAUTH PLAIN " + base64.b64encode(b"\0alice\0correct horse") + b"\r\n")
    assert raw.recv(1000).startswith(b"220")
    tls = sub.ctx().wrap_socket(raw, server_hostname="relay.example.test")
    tls.sendall(b"EHLO c\r\nMAIL FROM:<alice@example.org>\r\n")
    data = b""
    while data.count(b"\r\n5") + data.count(b"\r\n2") < 1 or not data.endswith(b"\r\n") or b"530" not in data:
        chunk = tls.recv(4096)
        if not chunk:
            break
        data += chunk
    assert b"530 5.7.0" in data  # the injected AUTH was discarded: not authenticated
    tls.close()


def test_implicit_tls_465(sub: Sub) -> None:
    with smtplib.SMTP_SSL("127.0.0.1", sub.submissions, timeout=10, context=sub.ctx()) as s:
        s.ehlo("c")
        assert not s.has_extn("starttls") and "PLAIN" in s.esmtp_features["auth"]
        s.login("alice", "correct horse")
        assert s.sendmail("alice@example.org", ["z@elsewhere.test"], b"From: alice@example.org\r\n\r\nx\r\n") == {}


def test_plaintext_on_465_gets_no_smtp_reply(sub: Sub) -> None:
    raw = socket.create_connection(("127.0.0.1", sub.submissions), timeout=5)
    raw.sendall(b"EHLO plaintext\r\n")
    try:
        data = raw.recv(1000)
    except (ConnectionResetError, TimeoutError):
        data = b""
    raw.close()
    assert not data.startswith((b"220", b"250", b"5", b"4"))


@pytest.mark.parametrize("port_name", ["submission", "submissions"])
def test_tls_1_0_and_1_1_refused(sub: Sub, port_name: str) -> None:
    ctx = sub.ctx()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    with pytest.raises((ssl.SSLError, OSError, smtplib.SMTPException)):
        if port_name == "submissions":
            with smtplib.SMTP_SSL("127.0.0.1", sub.submissions, timeout=5, context=ctx):
                pass
        else:
            with smtplib.SMTP("127.0.0.1", sub.submission, timeout=5) as s:
                s.ehlo("c")
                s.starttls(context=ctx)


def test_received_header_records_tls_and_auth_but_not_the_user(sub: Sub) -> None:
    with smtp587(sub) as s:
        s.login("alice", "correct horse")
        s.sendmail("alice@example.org", ["p@elsewhere.test"], b"From: alice@example.org\r\nSubject: privacy\r\n\r\nx\r\n")
    out = subprocess.run([sys.executable, "-m", "mailhop.cli", "queue", "list", "--json", "--config",
                          str(sub.relay.config)], capture_output=True, text=True, check=True).stdout
    ids = [json.loads(line)["id"] for line in out.splitlines()]
    shown = subprocess.run([sys.executable, "-m", "mailhop.cli", "queue", "show", ids[-1], "--body", "--config",
                            str(sub.relay.config)], capture_output=True, text=True, check=True).stdout
    received = shown.split("Received:", 1)[1].split("\nFrom:", 1)[0]
    assert "with ESMTPSA id" in received and "alice" not in received


def test_swaks_starttls_and_implicit_tls_with_auth(sub: Sub) -> None:
    swaks = require_program("swaks")
    base = [swaks, "--server", "127.0.0.1", "--from", "alice@example.org", "--to", "t@elsewhere.test",
            "--header", "From: alice@example.org", "--auth-user", "alice", "--auth-password", "correct horse",
            "--tls-ca-path", str(sub.cafile), "--tls-verify"]
    for mech, args in (("PLAIN", ["--port", str(sub.submission), "--tls"]),
                       ("LOGIN", ["--port", str(sub.submission), "--tls"]),
                       ("PLAIN", ["--port", str(sub.submissions), "--tlsc"])):
        done = subprocess.run(base + args + ["--auth", mech], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0 and "235 2.7.0" in done.stdout, done.stdout + done.stderr


def test_openssl_s_client_starttls(sub: Sub) -> None:
    openssl = require_program("openssl")
    done = subprocess.run(
        [openssl, "s_client", "-starttls", "smtp", "-connect", f"127.0.0.1:{sub.submission}", "-CAfile",
         str(sub.cafile), "-verify_return_error", "-servername", "relay.example.test", "-quiet"],
        input="EHLO c\r\nQUIT\r\n", capture_output=True, text=True, timeout=30,
    )
    assert "250-AUTH" in done.stdout or "250 AUTH" in done.stdout, done.stdout + done.stderr
    assert "221 2.0.0" in done.stdout
