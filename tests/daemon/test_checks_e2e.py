"""The policy chain in the running daemon: the Python check API, verdicts as SMTP replies, header edits in the
stored message, forged Authentication-Results removal, quarantine with its CLI, connect-phase checks (rate
limits, DNSBL) and greylisting — over real sockets, with DNS from a loopback server."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.dnsserver import TestDns

from .harness import Client, Relay, run_relay

CHECKS_MODULE = '''
from mailhop.checks.api import CheckContext, Verdict, add_header, discard, quarantine, reject, tempfail

async def data(ctx: CheckContext) -> Verdict | None:
    subject = " ".join(ctx.header("Subject"))
    if "reject me" in subject:
        return reject("Not this one", enhanced="5.7.1")
    if "later" in subject:
        return tempfail("Come back later")
    if "hold me" in subject:
        return quarantine("looks odd")
    if "drop me" in subject:
        return discard("dropped by test")
    if "explode" in subject:
        raise RuntimeError("a bug in a user check")
    assert ctx.message is not None and ctx.message.startswith(b"Subject:")
    return add_header("X-Checked", f"size={ctx.size} rcpts={len(ctx.recipients)}")

async def rcpt(ctx: CheckContext) -> Verdict | None:
    if ctx.recipient and ctx.recipient.startswith("blocked@"):
        return reject("No mail for this one", enhanced="5.7.1")
    return None
'''


def send(relay: Relay, subject: str, *, rcpts: tuple[str, ...] = ("user@example.test",),
         extra_headers: str = "", sender: str = "alice@sender.test") -> tuple[list[str], str]:
    """One transaction; the RCPT replies and the final reply (or the first refusal)."""
    c = Client(relay.host, relay.port)
    try:
        assert c.reply().startswith("220")
        c.line("EHLO client.test")
        c.reply()
        c.line(f"MAIL FROM:<{sender}>")
        mail = c.reply()
        if not mail.startswith("250"):
            return [], mail
        replies = []
        for r in rcpts:
            c.line(f"RCPT TO:<{r}>")
            replies.append(c.reply())
        if not any(r.startswith("250") for r in replies):
            return replies, replies[-1]
        c.line("DATA")
        assert c.reply().startswith("354")
        c.send(f"Subject: {subject}\r\n{extra_headers}From: <{sender}>\r\n\r\nbody\r\n.\r\n".encode())
        final = c.reply()
        c.line("QUIT")
        return replies, final
    finally:
        c.close()


def cli(relay: Relay, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mailhop.cli", *args, "--config", str(relay.config)],
                          capture_output=True, text=True, timeout=60)


def stored(relay: Relay, queue_id: str) -> bytes:
    out = subprocess.run([sys.executable, "-m", "mailhop.cli", "queue", "show", queue_id, "--body", "--config",
                          str(relay.config)], capture_output=True, timeout=60, check=True)
    return out.stdout.split(b"\n}\n\n", 1)[1]  # the JSON envelope (indented), a blank line, the message


def queued_id(final: str) -> str:
    assert final.startswith("250"), final
    return final.rsplit(" ", 1)[1]


@pytest.fixture
def custom_relay(tmp_path: Path) -> Iterator[Relay]:
    (tmp_path / "mhchecks.py").write_text(CHECKS_MODULE)
    extra = """
    [checks]
    on_error = "tempfail"
    [[checks.custom]]
    name = "content"
    callable = "mhchecks:data"
    phase = "data"
    [[checks.custom]]
    name = "recipients"
    callable = "mhchecks:rcpt"
    phase = "rcpt"
    """
    with run_relay(tmp_path, extra=extra, env={"PYTHONPATH": str(tmp_path)}) as relay:
        yield relay


def test_custom_checks_turn_verdicts_into_replies(custom_relay: Relay) -> None:
    relay = custom_relay
    _, final = send(relay, "reject me")
    assert final.startswith("550 5.7.1 Not this one")
    _, final = send(relay, "later")
    assert final.startswith("451 4.7.1 Come back later")
    _, final = send(relay, "explode")  # a failing check: on_error = tempfail, the session goes on
    assert final.startswith("451 4.7.0")
    replies, final = send(relay, "fine", rcpts=("blocked@example.test", "ok@example.test"))
    assert replies[0].startswith("550 5.7.1 No mail") and replies[1].startswith("250")
    qid = queued_id(final)
    body = stored(relay, qid)
    assert b"\r\nX-Checked: size=" in body and b"rcpts=1" in body
    assert body.index(b"X-Checked") > body.index(b"Subject: fine")  # "add" appends to the header section
    assert body.endswith(b"\r\n\r\nbody\r\n")
    assert len(relay.queue_ids()) == 1  # the refused ones left nothing behind


def test_discard_answers_250_and_keeps_nothing(custom_relay: Relay) -> None:
    _, final = send(custom_relay, "drop me")
    assert final.startswith("250 2.0.0")
    assert custom_relay.queue_ids() == []
    assert "discarded" in custom_relay.log()


def test_quarantine_holds_and_the_cli_lists_releases_and_deletes(custom_relay: Relay) -> None:
    relay = custom_relay
    held = [queued_id(send(relay, "hold me")[1]) for _ in range(2)]
    normal = queued_id(send(relay, "fine")[1])
    out = cli(relay, "quarantine", "list", "--json")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["id"] for r in rows] == held
    assert all(r["held"] and r["hold_reason"] == "quarantine: content: looks odd" for r in rows)
    table = cli(relay, "quarantine", "list")
    assert "looks odd" in table.stdout and "2 message(s) in quarantine" in table.stdout
    shown = cli(relay, "quarantine", "show", held[0], "--body")
    assert shown.returncode == 0 and "Subject: hold me" in shown.stdout
    assert cli(relay, "quarantine", "release", normal).returncode == 1  # not quarantined: refused
    assert cli(relay, "quarantine", "release", held[0]).returncode == 0
    assert cli(relay, "quarantine", "delete", held[1]).returncode == 0
    assert cli(relay, "quarantine", "list", "--json").stdout == ""
    listing = {json.loads(line)["id"]: json.loads(line) for line in
               cli(relay, "queue", "list", "--json").stdout.splitlines()}
    assert set(listing) == {held[0], normal} and not listing[held[0]]["held"]


def test_failing_check_can_fail_open(tmp_path: Path) -> None:
    (tmp_path / "mhchecks.py").write_text(CHECKS_MODULE)
    extra = """
    [checks]
    on_error = "accept"
    [[checks.custom]]
    name = "content"
    callable = "mhchecks:data"
    phase = "data"
    """
    with run_relay(tmp_path, extra=extra, env={"PYTHONPATH": str(tmp_path)}) as relay:
        _, final = send(relay, "explode")
        assert final.startswith("250")
        assert "check content failed at data" in relay.log()


def test_unimportable_custom_check_is_a_config_error(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(textwrap.dedent("""
        hostname = "relay.example.test"
        [[checks.custom]]
        name = "x"
        callable = "no_such_module_here:check"
        phase = "data"
    """))
    out = subprocess.run([sys.executable, "-m", "mailhop.cli", "check-config", "--config", str(cfg)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 78
    assert "checks.custom[0].callable" in out.stderr and "no_such_module_here" in out.stderr


def test_unreadable_dkim_key_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "not-a-key.pem").write_text("hello\n")
    cfg = tmp_path / "bad.toml"
    cfg.write_text(textwrap.dedent(f"""
        hostname = "relay.example.test"
        [[dkim.sign]]
        domain = "example.org"
        selector = "s1"
        key_file = "{tmp_path / 'not-a-key.pem'}"
    """))
    out = subprocess.run([sys.executable, "-m", "mailhop.cli", "check-config", "--config", str(cfg)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 78 and "dkim.sign[0].key_file" in out.stderr and "PEM" in out.stderr


def test_forged_authentication_results_with_our_id_are_removed(tmp_path: Path) -> None:
    # No checks configured: the forged field claiming our authserv-id (the hostname) still goes.
    with run_relay(tmp_path) as relay:
        forged = ("Authentication-Results: Relay.Example.Test;\r\n\tdkim=pass header.d=bank.test\r\n"
                  "Authentication-Results: other.test; spf=pass\r\n")
        qid = queued_id(send(relay, "hello", extra_headers=forged)[1])
        body = stored(relay, qid)
        assert b"Relay.Example.Test" not in body and b"bank.test" not in body
        assert b"Authentication-Results: other.test; spf=pass\r\n" in body
        assert b"Subject: hello\r\n" in body


def test_connection_rate_limit_answers_421_at_greeting(tmp_path: Path) -> None:
    extra = """
    [checks.ratelimit]
    enabled = true
    [[checks.ratelimit.rules]]
    key = "client_ip"
    counter = "connections"
    limit = 2
    window = 3600
    """
    with run_relay(tmp_path, extra=extra) as relay:
        for _ in range(2):
            c = Client(relay.host, relay.port)
            assert c.reply().startswith("220")
            c.close()
        c = Client(relay.host, relay.port)
        try:
            assert c.reply().startswith("421 4.7.0")
            assert c.closed()
        finally:
            c.close()


def test_message_rate_limit_per_sender_domain(tmp_path: Path) -> None:
    extra = """
    [checks.ratelimit]
    enabled = true
    [[checks.ratelimit.rules]]
    key = "sender_domain"
    counter = "messages"
    limit = 2
    window = 3600
    """
    with run_relay(tmp_path, extra=extra) as relay:
        assert send(relay, "one")[1].startswith("250")
        assert send(relay, "two")[1].startswith("250")
        assert send(relay, "three")[1].startswith("451 4.7.1")
        assert send(relay, "other", sender="bob@elsewhere.test")[1].startswith("250")


def test_dnsbl_listing_refuses_mail_at_mail_from(tmp_path: Path) -> None:
    with TestDns(origins=("bl.test", "wl.test")) as dns:
        dns.add("1.0.0.127.bl.test. 300 IN A 127.0.0.2")
        extra = f"""
        [dns]
        nameservers = ["{dns.nameserver}"]
        [checks.dnsbl]
        enabled = true
        threshold = 2
        [[checks.dnsbl.zones]]
        zone = "bl.test"
        weight = 2
        """
        with run_relay(tmp_path, extra=extra, trusted='["10.0.0.0/8"]') as relay:
            _, reply = send(relay, "hi")
            assert reply.startswith("554 5.7.1") and "bl.test" in reply
            assert relay.queue_ids() == []


def test_greylisting_then_pass_on_retry(tmp_path: Path) -> None:
    extra = """
    [checks.greylist]
    enabled = true
    delay = 0
    """
    with run_relay(tmp_path, extra=extra, trusted='["10.0.0.0/8"]') as relay:
        replies, _ = send(relay, "hi")
        assert replies[0].startswith("451 4.7.1") and "Greylisted" in replies[0]
        replies, final = send(relay, "hi")
        assert replies[0].startswith("250") and final.startswith("250")


# -- real content filters through the daemon ----------------------------------------------------------------------

GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


def send_body(relay: Relay, body: str) -> str:
    c = Client(relay.host, relay.port)
    try:
        c.reply()
        for cmd in ("EHLO client.test", "MAIL FROM:<alice@sender.test>", "RCPT TO:<user@example.test>", "DATA"):
            c.line(cmd)
            c.reply()
        c.send(("From: <alice@sender.test>\r\nTo: <user@example.test>\r\nSubject: test\r\n"
                f"Message-ID: <{abs(hash(body))}@sender.test>\r\n\r\n{body}\r\n.\r\n").encode())
        return c.reply()
    finally:
        c.close()


@pytest.fixture(scope="module")
def rspamd() -> Iterator[object]:
    from tests.conftest import require_program
    from tests.support.rspamd import Rspamd

    with Rspamd(require_program("rspamd")) as server:
        yield server


@pytest.mark.parametrize("integration", ["http", "milter"])
def test_rspamd_rejects_gtube_and_scores_clean_mail(tmp_path: Path, rspamd: object, integration: str) -> None:
    from tests.support.rspamd import Rspamd

    assert isinstance(rspamd, Rspamd)
    if integration == "http":
        extra = f'[checks.rspamd]\nenabled = true\nurl = "{rspamd.url}"\n'
    else:
        extra = f'[[checks.milter]]\nname = "rspamd-milter"\naddress = "{rspamd.milter}"\n'
    with run_relay(tmp_path, extra=extra) as relay:
        final = send_body(relay, f"This is spam.\r\n{GTUBE}")
        assert final.startswith("554 5.7.1"), final
        final = send_body(relay, "Hello Bob, the meeting moved to Tuesday at ten. See you there.")
        body = stored(relay, queued_id(final))
        head = body.partition(b"\r\n\r\n")[0]
        if integration == "http":
            assert b"\r\nX-Spam-Score: " in head and b"\r\nX-Spam-Action: no action" in head
        else:
            assert b"\r\nX-Spamd-Result: " in head or b"\r\nX-Spam-Status: " in head, head
        assert len(relay.queue_ids()) == 1
