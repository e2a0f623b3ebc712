"""``mailhop-sendmail`` as a subprocess against a real ``mailhop serve``: what is queued, and the exit statuses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .harness import Relay, free_port, run_relay, start_relay, write_config

ENTRY = [sys.executable, "-c", "from mailhop.cli.sendmail import main; main()"]


def sendmail(config: Path, *args: str, stdin: bytes, entry: list[str] = ENTRY,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*entry, "-C", str(config), *args], input=stdin, capture_output=True, timeout=60,
                          env={**os.environ, **(env or {})})


def show(relay: Relay, queue_id: str) -> tuple[dict[str, Any], bytes]:
    out = subprocess.run([sys.executable, "-m", "mailhop.cli", "queue", "show", queue_id, "--body", "--config",
                          str(relay.config)], capture_output=True, check=True, timeout=60).stdout
    meta, _, body = out.partition(b"\n\n")
    return json.loads(meta), body


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Relay]:
    with run_relay(tmp_path_factory.mktemp("sendmail"), extra="[limits]\nmax_message_size = 20000\n") as r:
        yield r


def submit_one(relay: Relay, *args: str, stdin: bytes, **kw: Any) -> tuple[str, dict[str, Any], bytes]:
    """Run sendmail; on exit 0 the message must already be in the queue (no waiting)."""
    before = set(relay.queue_ids())
    done = sendmail(relay.config, *args, stdin=stdin, **kw)
    assert done.returncode == 0, done.stderr.decode()
    [new] = set(relay.queue_ids()) - before
    meta, body = show(relay, new)
    return new, meta, body


def test_t_with_bcc_queues_for_all_and_stores_no_bcc(relay: Relay) -> None:
    message = (
        b"From: App <app@example.test>\n"
        b"To: Ann <ann@example.test>,\n"
        b"  bob@other.test\n"
        b"Cc: carol@example.test\n"
        b"Bcc: dave@example.test,\n"
        b"\tErin <erin@other.test>\n"
        b"Subject: report\n"
        b"\n"
        b"The report.\n"
        b".\n"
        b"Still the report: -i given.\n"
    )
    _, meta, body = submit_one(relay, "-t", "-i", "-f", "app@example.test", stdin=message)
    assert meta["sender"] == "app@example.test"
    assert sorted(r["address"] for r in meta["recipients"]) == [
        "ann@example.test", "bob@other.test", "carol@example.test", "dave@example.test", "erin@other.test",
    ]
    assert b"Bcc" not in body and b"dave" not in body and b"erin" not in body.lower()
    assert b"\r\nTo: Ann <ann@example.test>,\r\n  bob@other.test\r\nCc: carol@example.test\r\nSubject: report\r\n" in body
    assert b"Message-ID: <" in body and b"@relay.example.test>" in body and b"\r\nDate: " in body
    assert body.endswith(b"\r\n\r\nThe report.\r\n.\r\nStill the report: -i given.\r\n")
    assert body.startswith(b"Received: ")  # added by the relay, which took it over SMTP


def test_f_sender_and_dot_line(relay: Relay) -> None:
    _, meta, body = submit_one(relay, "-oi", "-odi", "-oem", "-f", "bounces@example.test", "-F", "Ops Team",
                               "--", "ops@example.test", stdin=b"Subject: s\n\nhello\n")
    assert meta["sender"] == "bounces@example.test"
    assert [r["address"] for r in meta["recipients"]] == ["ops@example.test"]
    assert b'\r\nFrom: "Ops Team" <bounces@example.test>\r\n' in body
    _, meta, body = submit_one(relay, "-fnull@example.test", "x@example.test", stdin=b"\nfirst\n.\nnever read\n")
    assert body.endswith(b"\r\n\r\nfirst\r\n") and b"never read" not in body


def test_default_sender_and_installed_entry_point(relay: Relay) -> None:
    script = Path(sys.executable).parent / "mailhop-sendmail"
    if not script.exists():
        pytest.skip("mailhop-sendmail not installed: pip install -e .")
    _, meta, body = submit_one(relay, "root", stdin="Subject: ünïcode\n\nbody ✓\n".encode(),
                               entry=[str(script)], env={"LOGNAME": "cron", "USER": "cron"})
    assert meta["sender"] == "cron@relay.example.test"
    assert [r["address"] for r in meta["recipients"]] == ["root@relay.example.test"]
    assert meta["body_type"] == "8BITMIME"
    assert "body ✓".encode() in body


def test_no_recipients_is_64_and_nothing_queued(relay: Relay) -> None:
    before = relay.queue_ids()
    done = sendmail(relay.config, "-t", "-f", "a@example.test", stdin=b"Subject: nobody\n\nx\n")
    assert done.returncode == 64 and b"sendmail: no recipients" in done.stderr
    done = sendmail(relay.config, "-f", "a@example.test", stdin=b"Subject: nobody\n\nx\n")
    assert done.returncode == 64
    assert sendmail(relay.config, "-bs", stdin=b"").returncode == 64
    assert relay.queue_ids() == before


def test_too_big_is_65(relay: Relay) -> None:
    before = relay.queue_ids()
    done = sendmail(relay.config, "-f", "a@example.test", "b@example.test", stdin=b"x" * 100 + b"\n" * 20000)
    assert done.returncode == 65 and b"limits.max_message_size" in done.stderr
    assert relay.queue_ids() == before


def test_bad_or_missing_config_is_78(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[[listener]]\naddress = 'nowhere'\n")
    done = sendmail(bad, "a@example.test", stdin=b"x\n")
    assert done.returncode == 78 and b"listener[0].address" in done.stderr
    assert sendmail(tmp_path / "missing.toml", "a@example.test", stdin=b"x\n").returncode == 78


def test_stopped_relay_is_75(tmp_path: Path) -> None:
    with run_relay(tmp_path) as relay:
        done = sendmail(relay.config, "-f", "a@example.test", "b@example.test", stdin=b"Subject: up\n\nx\n")
        assert done.returncode == 0, done.stderr
        config = relay.config
        assert relay.stop() == 0
        done = sendmail(config, "-f", "a@example.test", "b@example.test", stdin=b"Subject: down\n\nx\n")
        assert done.returncode == 75
        assert b"sendmail: cannot reach the relay at 127.0.0.1:" in done.stderr and b"try again later" in done.stderr
        assert len(relay.queue_ids()) == 1  # only the first


def test_untrusted_host_is_refused_with_77(tmp_path: Path) -> None:
    with run_relay(tmp_path, trusted='["192.0.2.0/24"]', domains='["example.test"]') as relay:
        done = sendmail(relay.config, "-f", "a@example.test", "b@elsewhere.test", stdin=b"x\n")
        assert done.returncode == 77, done.stderr
        assert b"sendmail: <b@elsewhere.test>: 554 5.7.1 Relay access denied" in done.stderr
        assert relay.queue_ids() == []


def test_listener_on_wildcard_address(tmp_path: Path) -> None:
    port = free_port()
    cfg = write_config(tmp_path, port, host="0.0.0.0")
    relay = start_relay(cfg, "127.0.0.1", port, tmp_path / "spool")
    try:
        assert sendmail(cfg, "-f", "a@example.test", "b@example.test", stdin=b"x\n").returncode == 0
        assert len(relay.queue_ids()) == 1
    finally:
        assert relay.stop() == 0
