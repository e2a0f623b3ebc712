"""STARTTLS (RFC 3207): handshake via the public loop.start_tls, injection defence, state reset."""

from __future__ import annotations

import contextlib
import socket
import ssl
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from tests.daemon.harness import Relay, run_relay
from tests.support.certs import dns_names


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module", params=["uvloop", "asyncio"])
def tls_relay(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
              ca: trustme.CA) -> Iterator[Relay]:
    """STARTTLS on both event loops: they hand decrypted bytes to the protocol at different moments."""
    tmp: Path = tmp_path_factory.mktemp("tls")
    cert = ca.issue_cert("relay.example.test")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp / "cert.pem"))
    cert.private_key_pem.write_to_path(str(tmp / "key.pem"))
    with run_relay(tmp, extra='[tls]\ncertificate = "cert.pem"\nkey = "key.pem"\n', loop=request.param) as r:
        yield r


def client_ctx(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


class Raw:
    def __init__(self, relay: Relay) -> None:
        self.sock: socket.socket | ssl.SSLSocket = socket.create_connection((relay.host, relay.port), timeout=5)
        self.buf = b""

    def reply(self) -> str:
        lines = []
        while True:
            while b"\r\n" not in self.buf:
                data = self.sock.recv(65536)
                if not data:
                    raise ConnectionError("closed")
                self.buf += data
            line, self.buf = self.buf.split(b"\r\n", 1)
            lines.append(line.decode())
            if line[3:4] != b"-":
                return "\n".join(lines)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        self.sock.close()

    def upgrade(self, ctx: ssl.SSLContext) -> None:
        assert not self.buf, f"plaintext left over before TLS: {self.buf!r}"
        self.sock = ctx.wrap_socket(self.sock, server_hostname="relay.example.test")

    def starttls(self, ctx: ssl.SSLContext) -> None:
        """Greeting, EHLO, STARTTLS (220 expected), then the handshake with ``ctx``."""
        self.reply()
        self.send(b"EHLO t\r\nSTARTTLS\r\n")
        self.reply()
        assert self.reply().startswith("220 2.0.0")
        self.upgrade(ctx)

    def peer_name(self) -> str:
        """The DNS name in the certificate the server presented."""
        assert isinstance(self.sock, ssl.SSLSocket)
        cert = self.sock.getpeercert()
        return dns_names(cert)[0]


def test_starttls_advertised_and_works(tls_relay: Relay, ca: trustme.CA) -> None:
    c = Raw(tls_relay)
    c.reply()
    c.send(b"EHLO t\r\n")
    assert "STARTTLS" in [line[4:] for line in c.reply().splitlines()]
    c.close()


def test_starttls_transaction_and_no_readvertise(tls_relay: Relay, ca: trustme.CA) -> None:
    c = Raw(tls_relay)
    c.starttls(client_ctx(ca))
    c.send(b"EHLO t\r\n")
    ehlo = c.reply()
    assert "STARTTLS" not in ehlo
    c.send(b"STARTTLS\r\n")
    assert c.reply().startswith("5")
    c.send(b"MAIL FROM:<a@t.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n")
    assert [c.reply()[:3] for _ in range(3)] == ["250", "250", "354"]
    c.send(b"Subject: tls\r\n\r\nx\r\n.\r\n")
    assert c.reply().startswith("250 2.0.0 Ok: queued as")
    c.close()


def test_starttls_command_injection_is_discarded(tls_relay: Relay, ca: trustme.CA) -> None:
    c = Raw(tls_relay)
    c.reply()
    c.send(b"EHLO t\r\n")
    c.reply()
    injected = b"EHLO injected\r\nMAIL FROM:<evil@x.test>\r\n"
    c.send(b"STARTTLS\r\n" + injected)
    assert c.reply().startswith("220 2.0.0")
    c.upgrade(client_ctx(ca))
    # Nothing must answer the injected commands; the first reply we see is to our own NOOP.
    c.send(b"NOOP\r\n")
    first = c.reply()
    assert first.startswith("250 2.0.0"), first
    assert not c.buf
    # And the injected EHLO did not count: state was reset, so MAIL before EHLO is out of order.
    c.send(b"MAIL FROM:<a@t.test>\r\n")
    assert c.reply().startswith("503 5.5.1")
    c.close()
    assert f"discarded {len(injected)} bytes pipelined after STARTTLS" in tls_relay.log()


def test_starttls_refused_inside_a_transaction(tls_relay: Relay, ca: trustme.CA) -> None:
    c = Raw(tls_relay)
    c.reply()
    c.send(b"EHLO t\r\nMAIL FROM:<a@t.test>\r\nSTARTTLS\r\n")
    assert [c.reply()[:3] for _ in range(3)] == ["250", "250", "503"]
    c.close()


def test_state_reset_after_tls(tls_relay: Relay, ca: trustme.CA) -> None:
    c = Raw(tls_relay)
    c.starttls(client_ctx(ca))
    # The EHLO before TLS no longer counts: RFC 3207 4.2.
    c.send(b"MAIL FROM:<a@t.test>\r\n")
    assert c.reply().startswith("503 5.5.1")
    c.send(b"EHLO t\r\nMAIL FROM:<a@t.test>\r\n")
    assert c.reply().startswith("250")
    assert c.reply().startswith("250")
    c.close()


def test_tls_below_1_2_refused(tls_relay: Relay, ca: trustme.CA) -> None:
    c = Raw(tls_relay)
    c.reply()
    c.send(b"EHLO t\r\nSTARTTLS\r\n")
    c.reply()
    assert c.reply().startswith("220")
    ctx = client_ctx(ca)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    with contextlib.suppress(ssl.SSLError):
        ctx.set_ciphers("ALL:@SECLEVEL=0")
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        c.upgrade(ctx)
        c.send(b"NOOP\r\n")
        c.reply()
    c.close()


def test_starttls_many_handshakes_none_stall(tls_relay: Relay, ca: trustme.CA) -> None:
    """Regression: the ClientHello raced our switch to TLS (reading was not paused before the 220), so on uvloop
    about a third of handshakes stalled until the timeout. 60 in a row must all complete promptly."""
    ctx = client_ctx(ca)
    for _ in range(60):
        c = Raw(tls_relay)
        c.sock.settimeout(3)
        c.starttls(ctx)
        c.send(b"NOOP\r\n")
        assert c.reply().startswith("250")
        c.close()


def _peer_name(relay: Relay, ca: trustme.CA) -> str:
    c = Raw(relay)
    c.starttls(_unverified(ca))
    name = c.peer_name()
    c.close()
    return name


def test_certificate_reload_on_sighup_keeps_connections(tmp_path: Path, ca: trustme.CA) -> None:
    import os
    import signal

    def write(name: str) -> None:
        cert = ca.issue_cert(name)
        cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "cert.pem"))
        cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))

    write("old.example.test")
    extra = '[tls]\ncertificate = "cert.pem"\nkey = "key.pem"\nreload_interval = 0\n'
    with run_relay(tmp_path, extra=extra) as relay:
        assert _peer_name(relay, ca) == "old.example.test"
        kept = Raw(relay)
        kept.starttls(_unverified(ca))
        write("new.example.test")
        assert _peer_name(relay, ca) == "old.example.test"  # no reload without SIGHUP (interval 0)
        os.kill(relay.proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + 5
        while "TLS certificate reloaded" not in relay.log() and time.monotonic() < deadline:
            time.sleep(0.02)  # the log line is the signal that the reload ran
        assert _peer_name(relay, ca) == "new.example.test"
        kept.send(b"NOOP\r\n")  # the connection made before the reload still works
        assert kept.reply().startswith("250")
        kept.close()


def _unverified(ca: trustme.CA) -> ssl.SSLContext:
    ctx = client_ctx(ca)
    ctx.check_hostname = False
    return ctx
