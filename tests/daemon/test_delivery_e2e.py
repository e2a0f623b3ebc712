"""Delivery end to end through a real ``mailhop serve``: submit with a real client, resolve through a loopback
DNS server, deliver to real receivers (Postfix, smtp-sink, the scriptable Receiver) on 127.0.0.6x.

Every peer listens on the MX port (25 as root, as in production); the daemon asks only the test DNS server.
Readiness is always a probe or a wait on an observed event, never a fixed sleep.

The daemons here run on mailhop's default loop (uvloop when installed); the volume test runs on both loops and
``test_mx_delivery_on_uvloop`` pins uvloop explicitly (delivery once failed there on a transport type check).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import smtplib
import ssl
import subprocess
import textwrap
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import trustme
from click.testing import CliRunner

from mailhop.cli.main import main as mailhop_main
from tests.conftest import require_program
from tests.delivery.engine_harness import dsn_fields, mx_port
from tests.support.dnsserver import TestDns
from tests.support.receiver import Receiver
from tests.support.sink import PostfixMaildir, SmtpSink, strip_trace_headers

from .harness import Relay, free_port, run_relay, start_relay, write_config

QueueListing = list[dict[str, Any]]
LOOP = "auto"  # uvloop when installed, as `mailhop serve` runs by default


# -- helpers -------------------------------------------------------------------------------------------------


@pytest.fixture
def dns() -> Iterator[TestDns]:
    with TestDns(origins=["test"]) as server:
        yield server


@pytest.fixture(scope="module")
def port() -> int:
    """The MX port every receiver listens on (25 as root)."""
    return mx_port()


def delivery_extra(dns: TestDns, port: int, delivery: str = "", routes: str = "") -> str:
    """Config tables turning delivery on, against the test DNS server only."""
    return (
        f"[delivery]\nmx_port = {port}\n{textwrap.dedent(delivery)}"
        f'[dns]\nnameservers = ["{dns.nameserver}"]\ntimeout = 1.0\nlifetime = 2.0\n'
        f"{textwrap.dedent(routes)}"
    )


def mailhop(cfg: Path, *args: str) -> str:
    """``mailhop ARGS --config CFG``: the real command, run in-process (no Python start-up per poll); its stdout."""
    result = CliRunner().invoke(mailhop_main, [*args, "--config", str(cfg)], catch_exceptions=False)
    assert result.exit_code == 0, f"mailhop {' '.join(args)} exited {result.exit_code}: {result.stderr}"
    return result.stdout


def queue_list(cfg: Path) -> QueueListing:
    return [json.loads(line) for line in mailhop(cfg, "queue", "list", "--json").splitlines() if line.strip()]


def wait_queue(cfg: Path, predicate: Callable[[QueueListing], bool], what: str,
               timeout: float = 20.0) -> QueueListing:
    """Poll ``mailhop queue list --json`` until predicate(listing) holds; the listing."""
    deadline = time.monotonic() + timeout
    while True:
        listing = queue_list(cfg)
        if predicate(listing):
            return listing
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; queue: {listing}")
        time.sleep(0.1)


def statuses(listing: QueueListing) -> dict[str, str]:
    """Recipient address -> status over the whole queue."""
    return {r["address"]: r["status"] for m in listing for r in m["recipients"]}


def submit(relay: Relay, sender: str, rcpts: Sequence[str], *bodies: bytes,
           mail_options: Sequence[str] = ()) -> None:
    """Send each body as its own transaction over one smtplib session; every recipient must be accepted."""
    with smtplib.SMTP(relay.host, relay.port, timeout=10) as smtp:
        smtp.ehlo("client.test")
        for body in bodies:
            assert smtp.sendmail(sender, list(rcpts), body, mail_options=list(mail_options)) == {}


def message(subject: str, to: str, text: str = "hello\r\n") -> bytes:
    return (f"From: a@client.test\r\nTo: {to}\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject.replace(' ', '.')}@client.test>\r\n\r\n{text}").encode()


def mx(dns: TestDns, domain: str, address: str) -> None:
    dns.add(f"{domain}. 60 IN MX 10 mx.{domain}.", f"mx.{domain}. 60 IN A {address}")


# -- 1. byte-identical through a real Postfix ----------------------------------------------------------------


def test_postfix_maildir_receives_byte_identical(tmp_path: Path, dns: TestDns, port: int) -> None:
    require_program("postfix")
    if os.geteuid() != 0:
        pytest.skip("a private Postfix needs root")
    mx(dns, "dest.test", "127.0.0.61")
    sent = (
        "From: Sender <sender@client.test>\r\n"
        "To: rcpt@dest.test\r\n"
        "Subject: byte identical\r\n"
        "Date: Thu, 01 Jan 2026 00:00:00 +0000\r\n"
        "Message-ID: <byte-identical@client.test>\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n"
        "\r\n"
        ".leading dot\r\n"
        "..two leading dots\r\n"
        ".\r\n"
        "a lone dot above, not the end\r\n"
        f"{'x' * 900}\r\n"
        "Grüße, ünïcödé, 日本語, emoji \U0001f4e8\r\n"
        "\tindented with a tab; trailing spaces   \r\n"
        "\r\n"
        "last line\r\n"
    ).encode()
    with PostfixMaildir("127.0.0.61", port, domains=["dest.test"]) as mta, \
            run_relay(tmp_path, extra=delivery_extra(dns, port), loop=LOOP) as relay:
        submit(relay, "sender@client.test", ["rcpt@dest.test"], sent, mail_options=["BODY=8BITMIME"])
        [stored] = mta.wait_for(1)
        wait_queue(relay.config, lambda q: q == [], "an empty queue")
    assert b"by relay.example.test (mailhop)" in stored  # mailhop's Received: is among the stripped fields
    assert b"\r" not in stored  # Maildir files have LF line ends: compare with the submission converted
    assert strip_trace_headers(stored) == sent.replace(b"\r\n", b"\n")


# -- 2. smarthost with required STARTTLS and AUTH ------------------------------------------------------------


@pytest.fixture(scope="module")
def smarthost_tls() -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    trustme.CA().issue_cert("smarthost.test", "127.0.0.62").configure_cert(context)
    return context


def smarthost_route(rx: Receiver) -> str:
    return f"""
    [[route]]
    domains = ["*"]
    via = "smtp://{rx.host}:{rx.port}"
    tls = "required"
    username = "relay"
    password_file = "secret"
    """


def test_smarthost_requires_starttls_and_auth(tmp_path: Path, dns: TestDns, port: int,
                                              smarthost_tls: ssl.SSLContext) -> None:
    with Receiver("127.0.0.62", 0, tls_context=smarthost_tls, require_tls=True, require_auth=True,
                  auth_users={"relay": "s3cret"}) as rx:
        extra = delivery_extra(dns, port, routes=smarthost_route(rx))
        good, bad = tmp_path / "good", tmp_path / "bad"
        good.mkdir()
        bad.mkdir()
        (good / "secret").write_text("s3cret\n")
        (bad / "secret").write_text("wrong\n")

        with run_relay(good, extra=extra, loop=LOOP) as relay:
            submit(relay, "a@client.test", ["b@anywhere.test"], message("via smarthost", "b@anywhere.test"))
            [tx] = rx.wait_for(1)
            wait_queue(relay.config, lambda q: q == [], "an empty queue")
        session = rx.sessions[tx.session]
        assert session.tls and tx.tls and session.tls_version is not None
        assert session.auth == "relay" and tx.auth == "relay"
        assert tx.mail_from == "a@client.test" and [r for r, _ in tx.rcpts] == ["b@anywhere.test"]
        verbs = session.verbs()
        assert verbs.index("STARTTLS") < verbs.index("AUTH") < verbs.index("MAIL")

        rx.clear()
        with run_relay(bad, extra=extra, loop=LOOP) as relay:
            submit(relay, "a@client.test", ["c@anywhere.test"], message("wrong password", "c@anywhere.test"))
            [queued] = wait_queue(relay.config, lambda q: statuses(q).get("c@anywhere.test") == "deferred",
                                  "the recipient to be deferred")
            assert queued["sender"] == "a@client.test"  # the only message: no bounce was queued
            [rcpt] = queued["recipients"]
            assert rcpt["status"] == "deferred" and rcpt["attempts"] == 1
            assert "535" in rcpt["last_reply"] and rcpt["last_reply"].startswith("4"), rcpt["last_reply"]
        assert rx.transactions == []
        assert any("AUTH" in s.verbs() and s.tls for s in rx.sessions)


# -- 3. volume through smtp-sink -----------------------------------------------------------------------------


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_volume_through_smtp_sink(tmp_path: Path, dns: TestDns, port: int, loop: str) -> None:
    require_program("smtp-sink")
    source = require_program("smtp-source")
    mx(dns, "sink.test", "127.0.0.63")
    with SmtpSink("127.0.0.63", port) as sink, \
            run_relay(tmp_path, extra=delivery_extra(dns, port), loop=loop) as relay:
        out = subprocess.run(
            [source, "-s", "10", "-m", "300", "-f", "a@client.test", "-t", "b@sink.test",
             f"{relay.host}:{relay.port}"],
            capture_output=True, text=True, timeout=60,
        )
        assert out.returncode == 0, out.stdout + out.stderr
        assert sink.wait_for(300, timeout=60) == 300
        wait_queue(relay.config, lambda q: q == [], "an empty queue")
        assert sink.count() == 300


# -- 4. crash and restart around delivery --------------------------------------------------------------------


def test_restart_mid_delivery_redelivers_only_unrecorded(tmp_path: Path, dns: TestDns, port: int) -> None:
    mx(dns, "ok.test", "127.0.0.64")
    mx(dns, "later.test", "127.0.0.65")
    mx(dns, "crash.test", "127.0.0.68")
    extra = delivery_extra(dns, port)

    # (a) SIGKILL after a recorded partial delivery: only the deferred recipient is sent after the restart.
    with Receiver("127.0.0.64", port) as ok, \
            Receiver("127.0.0.65", port, on_rcpt=lambda _: "451 4.3.0 Try again later") as later:
        tmp = tmp_path / "a"
        tmp.mkdir()
        relay_port = free_port()
        cfg = write_config(tmp, relay_port, extra)
        relay = start_relay(cfg, "127.0.0.1", relay_port, tmp / "spool", loop=LOOP)
        try:
            body = message("partial", "x@ok.test, y@later.test")
            submit(relay, "a@client.test", ["x@ok.test", "y@later.test"], body)
            wait_queue(cfg, lambda q: statuses(q) == {"x@ok.test": "delivered", "y@later.test": "deferred"},
                       "the first attempt to be recorded")
            assert relay.stop(signal.SIGKILL) == -signal.SIGKILL
            later.options.on_rcpt = None
            # The daemon is down: flush marks the deferred recipient due, the restarted engine finds it at once.
            # (A flush while the daemon sleeps takes effect only at its next look, up to 60 s later.)
            assert "1 recipient(s)" in mailhop(cfg, "queue", "flush")
            relay = start_relay(cfg, "127.0.0.1", relay_port, tmp / "spool", loop=LOOP)
            [tx] = later.wait_for(1)
            wait_queue(cfg, lambda q: q == [], "an empty queue")
        finally:
            code = relay.stop()
        assert code == 0, relay.log()
        assert [r for r, _ in tx.rcpts] == ["y@later.test"] and tx.data.endswith(body)
        assert len(later.transactions) == 1
        assert [[r for r, _ in t.rcpts] for t in ok.transactions] == [["x@ok.test"]]  # never resent

    # (b) death after the remote 250 but before the outcome is recorded (or while recording): the documented
    # duplicate window, one extra delivery after the restart and no more.
    for point in ("after_delivery_before_record", "during_record"):
        with Receiver("127.0.0.68", port) as rx:
            tmp = tmp_path / point
            tmp.mkdir()
            relay_port = free_port()
            cfg = write_config(tmp, relay_port, extra)
            relay = start_relay(cfg, "127.0.0.1", relay_port, tmp / "spool", env={"MAILHOP_CRASH_AT": point},
                                loop=LOOP)
            try:
                body = message(f"crash {point}", "z@crash.test")
                submit(relay, "a@client.test", ["z@crash.test"], body)
                [first] = rx.wait_for(1)
                assert first.replies[0].startswith("250")  # the remote side took it...
                assert relay.proc.wait(timeout=20) == 137, relay.log()
                assert relay.stop() == 137
                [queued] = queue_list(cfg)  # ...and the queue never heard of it
                assert [(r["status"], r["attempts"]) for r in queued["recipients"]] == [("pending", 0)], queued
                relay = start_relay(cfg, "127.0.0.1", relay_port, tmp / "spool", loop=LOOP)
                rx.wait_for(2)
                wait_queue(cfg, lambda q: q == [], "an empty queue")
            finally:
                code = relay.stop()
            assert code == 0, relay.log()
            assert len(rx.transactions) == 2, point
            assert all(t.data.endswith(body) for t in rx.transactions)


# -- 5. per-destination concurrency --------------------------------------------------------------------------


class PeakReceiver(Receiver):
    """A Receiver that counts its open connections, on its own loop thread (so the peak is exact)."""

    def __init__(self, host: str, port: int, **options: Any) -> None:
        super().__init__(host, port, **options)
        self.open_now = 0
        self.peak = 0

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open_now += 1
        self.peak = max(self.peak, self.open_now)
        try:
            await super()._handle(reader, writer)
        finally:
            self.open_now -= 1


def test_per_destination_concurrency_limit(tmp_path: Path, dns: TestDns, port: int) -> None:
    mx(dns, "slow.test", "127.0.0.66")
    extra = delivery_extra(dns, port, delivery="max_connections_per_destination = 3\n")
    rx = PeakReceiver("127.0.0.66", port, reply_delay=0.3)
    with rx, run_relay(tmp_path, extra=extra, loop=LOOP) as relay:
        bodies = [message(f"slow {i}", "r@slow.test") for i in range(12)]
        submit(relay, "a@client.test", ["r@slow.test"], *bodies)
        arrived = rx.wait_for(12, timeout=40)
        wait_queue(relay.config, lambda q: q == [], "an empty queue")
        assert sorted(t.data.split(b"Subject: ")[1].split(b"\r\n")[0] for t in arrived) == sorted(
            f"slow {i}".encode() for i in range(12))
        assert rx.peak <= 3, f"{rx.peak} connections open at once"
        assert rx.peak == 3  # the limit was reached, so the test exercised it


# -- 6. null MX and NXDOMAIN bounce through the daemon -------------------------------------------------------


def test_null_mx_and_nxdomain_bounce_through_daemon(tmp_path: Path, dns: TestDns, port: int) -> None:
    mx(dns, "from.test", "127.0.0.67")
    dns.add("nullmx.test. 60 IN MX 0 .")
    with Receiver("127.0.0.67", port) as bounces, \
            run_relay(tmp_path, extra=delivery_extra(dns, port), loop=LOOP) as relay:
        submit(relay, "sender@from.test", ["x@nullmx.test"], message("to null mx", "x@nullmx.test"))
        submit(relay, "sender@from.test", ["y@nosuch.test"], message("to nxdomain", "y@nosuch.test"))
        dsns = bounces.wait_for(2, timeout=20)
        wait_queue(relay.config, lambda q: q == [], "an empty queue")
    assert len(dsns) == 2
    found = {}
    for tx in dsns:
        assert tx.mail_from == "" and [r for r, _ in tx.rcpts] == ["sender@from.test"]
        _, [block] = dsn_fields(tx.data)
        assert block["Action"] == "failed"
        found[block["Final-Recipient"]] = block["Status"]
    assert found == {"rfc822; x@nullmx.test": "5.1.10", "rfc822; y@nosuch.test": "5.1.2"}


# -- 7. flush with the daemon running -----------------------------------------------------------------------


def test_flush_while_running_delivers_promptly(tmp_path: Path, dns: TestDns, port: int) -> None:
    mx(dns, "flush.test", "127.0.0.60")
    with Receiver("127.0.0.60", port, on_rcpt=lambda _: "451 4.3.0 Try again later") as rx, \
            run_relay(tmp_path, extra=delivery_extra(dns, port), loop=LOOP) as relay:
        submit(relay, "a@client.test", ["x@flush.test"], message("flush", "x@flush.test"))
        wait_queue(relay.config, lambda q: statuses(q) == {"x@flush.test": "deferred"}, "a deferral")
        rx.options.on_rcpt = None
        assert "1 recipient(s) scheduled for immediate delivery" in mailhop(relay.config, "queue", "flush")
        rx.wait_for(1, timeout=10)


# -- 8. the default event loop -------------------------------------------------------------------------------


def test_mx_delivery_on_uvloop(tmp_path: Path, dns: TestDns, port: int) -> None:
    pytest.importorskip("uvloop")
    mx(dns, "uv.test", "127.0.0.69")
    # Short timeouts so the failure costs seconds: a stuck attempt is deferred quickly and SIGTERM waits little.
    extra = delivery_extra(dns, port, delivery="command_timeout = 3.0\n") + "[limits]\nshutdown_grace = 2.0\n"
    with Receiver("127.0.0.69", port) as rx, run_relay(tmp_path, extra=extra, loop="uvloop") as relay:
        submit(relay, "a@client.test", ["x@uv.test"], message("on uvloop", "x@uv.test"))
        rx.wait_for(1, timeout=8)
        wait_queue(relay.config, lambda q: q == [], "an empty queue")
