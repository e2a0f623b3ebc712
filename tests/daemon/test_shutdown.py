"""SIGTERM: idle sessions get 421, a transaction in flight completes with 250, one that stalls is cut off after
the grace period, the daemon exits 0."""

from __future__ import annotations

import signal
import time
from pathlib import Path

from .harness import Client, free_port, start_relay, write_config


def test_sigterm_finishes_transaction_in_flight(tmp_path: Path) -> None:
    port = free_port()
    relay = start_relay(write_config(tmp_path, port), "127.0.0.1", port, tmp_path / "spool")
    idle = Client("127.0.0.1", port)
    busy = Client("127.0.0.1", port)
    for c in (idle, busy):
        assert c.reply().startswith("220")
        c.line("EHLO t")
        c.reply()
    busy.send(b"MAIL FROM:<a@t.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n")
    assert [busy.reply()[:3] for _ in range(3)] == ["250", "250", "354"]
    busy.send(b"Subject: half\r\n\r\nfirst half\r\n")
    relay.proc.send_signal(signal.SIGTERM)
    assert idle.reply().startswith("421 4.3.2")
    busy.send(b"second half\r\n.\r\n")
    assert busy.reply().startswith("250 2.0.0 Ok: queued as")
    busy.line("NOOP")
    # After the transaction the busy session is closed too.
    assert busy.reply().startswith("421 4.3.2")
    idle.close()
    busy.close()
    assert relay.stop() == 0
    assert len(relay.queue_ids()) == 1


def test_sigterm_cuts_off_a_stalled_transaction_after_the_grace_period(tmp_path: Path) -> None:
    port = free_port()
    cfg = write_config(tmp_path, port, "[limits]\nshutdown_grace = 1.0\n")
    relay = start_relay(cfg, "127.0.0.1", port, tmp_path / "spool")
    stalled = Client("127.0.0.1", port)
    assert stalled.reply().startswith("220")
    stalled.send(b"EHLO t\r\nMAIL FROM:<a@t.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n")
    assert [stalled.reply()[:3] for _ in range(4)] == ["250", "250", "250", "354"]
    stalled.send(b"Subject: never ends\r\n\r\nhalf")
    started = time.monotonic()
    assert relay.stop() == 0
    # Cut off after the grace period, not at once, and not after the daemon's 5 s fallback wait for sessions that
    # failed to end (nor at the data timeout, minutes).
    assert 0.9 < time.monotonic() - started < 4.5
    assert stalled.closed()
    stalled.close()
    assert relay.queue_ids() == []
