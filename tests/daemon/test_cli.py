"""``mailhop queue`` against a running daemon's spool: list, show, hold, release, delete, flush."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from .harness import Client, Relay, run_relay


def cli(relay: Relay, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mailhop.cli", "queue", *args, "--config", str(relay.config)],
                          capture_output=True, text=True, timeout=60)


def send(relay: Relay, rcpt: str) -> str:
    c = Client(relay.host, relay.port)
    c.reply()
    c.send(f"EHLO t\r\nMAIL FROM:<a@t.test>\r\nRCPT TO:<{rcpt}>\r\nDATA\r\n".encode())
    [c.reply() for _ in range(4)]
    c.send(b"Subject: cli\r\n\r\nbody\r\n.\r\n")
    reply = c.reply()
    c.close()
    return reply.rsplit(" ", 1)[1]


def test_queue_admin_commands(tmp_path: Path) -> None:
    with run_relay(tmp_path) as relay:
        one, two = send(relay, "x@example.test"), send(relay, "y@other.test")
        listed = [json.loads(line) for line in cli(relay, "list", "--json").stdout.splitlines()]
        assert [m["id"] for m in listed] == [one, two]
        assert listed[0]["recipients"][0]["status"] == "pending"
        by_domain = cli(relay, "list", "--json", "--domain", "other.test").stdout.splitlines()
        assert [json.loads(x)["id"] for x in by_domain] == [two]
        table = cli(relay, "list")
        assert table.returncode == 0 and "2 message(s)" in table.stdout

        shown = cli(relay, "show", one, "--body")
        assert shown.returncode == 0 and "Subject: cli" in shown.stdout
        assert cli(relay, "show", "NOSUCHID").returncode == 1

        assert cli(relay, "hold", one).stdout.strip() == f"{one}: held"
        assert json.loads(cli(relay, "show", one).stdout)["held"] is True
        assert cli(relay, "release", one).stdout.strip() == f"{one}: released"
        assert json.loads(cli(relay, "show", one).stdout)["held"] is False

        flushed = cli(relay, "flush")
        assert flushed.returncode == 0 and "0 recipient(s)" in flushed.stdout  # nothing deferred yet

        assert cli(relay, "delete", two).stdout.strip() == f"{two}: deleted"
        assert cli(relay, "delete", two).returncode == 1
        assert [json.loads(x)["id"] for x in cli(relay, "list", "--json").stdout.splitlines()] == [one]
