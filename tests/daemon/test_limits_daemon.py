"""Limits that need a running daemon: idle timeouts, connection caps, memory with a 50 MB message."""

from __future__ import annotations

import socket
import time
from pathlib import Path

from .harness import Client, run_relay


def test_idle_timeout_gives_421_4_4_2(tmp_path: Path) -> None:
    with run_relay(tmp_path, extra="[limits]\ncommand_timeout = 1.0\n") as relay:
        c = Client(relay.host, relay.port)
        assert c.reply().startswith("220")
        started = time.monotonic()
        assert c.reply().startswith("421 4.4.2")
        assert 0.8 < time.monotonic() - started < 5
        assert c.closed()
        c.close()


def test_data_timeout_gives_421_and_nothing_queued(tmp_path: Path) -> None:
    with run_relay(tmp_path, extra="[limits]\ndata_timeout = 1.0\n") as relay:
        c = Client(relay.host, relay.port)
        c.reply()
        c.send(b"EHLO t\r\nMAIL FROM:<a@t.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n")
        assert [c.reply()[:3] for _ in range(4)] == ["250", "250", "250", "354"]
        c.send(b"Subject: stalled\r\n\r\nhalf a message")
        assert c.reply().startswith("421 4.4.2")
        c.close()
        assert relay.queue_ids() == []


def _client_from(relay_port: int, source: str) -> Client:
    c = Client.__new__(Client)
    c.sock = socket.create_connection(("127.0.0.1", relay_port), timeout=5, source_address=(source, 0))
    c.buf = b""
    return c


def test_connection_caps_per_ip_and_total(tmp_path: Path) -> None:
    with run_relay(tmp_path, extra="[limits]\nmax_connections_per_ip = 2\nmax_connections = 3\n") as relay:
        opened: list[Client] = []
        try:
            a, b = _client_from(relay.port, "127.0.0.1"), _client_from(relay.port, "127.0.0.1")
            opened += [a, b]
            assert a.reply().startswith("220") and b.reply().startswith("220")
            third = _client_from(relay.port, "127.0.0.1")
            opened.append(third)
            assert third.reply().startswith("421 4.7.0")
            # Another loopback address is another client: allowed until the overall cap.
            other = _client_from(relay.port, "127.0.0.7")
            opened.append(other)
            assert other.reply().startswith("220")
            fourth = _client_from(relay.port, "127.0.0.8")
            opened.append(fourth)
            assert fourth.reply().startswith("421 4.7.0")
        finally:
            for c in opened:
                c.close()
        # Slots are given back once the server has seen the clients leave (that takes a moment: poll briefly).
        deadline = time.monotonic() + 5
        while True:
            again = Client(relay.host, relay.port)
            reply = again.reply()
            again.close()
            if reply.startswith("220") or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert reply.startswith("220"), reply


def _rss_kb(pid: int, field: str = "VmHWM") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(field)


def test_50_mb_message_does_not_grow_rss_by_its_size(tmp_path: Path) -> None:
    with run_relay(tmp_path, extra="[limits]\nmax_message_size = 60000000\n") as relay:
        # Warm up: one small message so lazy imports and buffers are in place before we measure.
        c = Client(relay.host, relay.port, timeout=60)
        c.reply()
        c.send(b"EHLO t\r\nMAIL FROM:<a@t.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n")
        [c.reply() for _ in range(4)]
        c.send(b"Subject: warm\r\n\r\nx\r\n.\r\n")
        assert c.reply().startswith("250")
        before = _rss_kb(relay.proc.pid)
        c.send(b"MAIL FROM:<a@t.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n")
        [c.reply() for _ in range(3)]
        line = b"z" * 998 + b"\r\n"
        block = b"Subject: big\r\n\r\n" + line * 1000  # ~1 MB
        for _ in range(50):
            c.send(block if _ == 0 else line * 1000)
        c.send(b".\r\n")
        assert c.reply().startswith("250 ")
        c.close()
        growth_kb = _rss_kb(relay.proc.pid) - before
        print(f"peak RSS growth for a 50 MB message: {growth_kb} kB")
        assert growth_kb < 10 * 1024, f"peak RSS grew by {growth_kb} kB"


def test_per_listener_limits(tmp_path: Path) -> None:
    from .harness import free_port

    port2 = free_port()
    extra = f'[[listener]]\naddress = "127.0.0.1:{port2}"\nmax_message_size = 2000\nmax_connections = 1\n'
    with run_relay(tmp_path, extra=extra) as relay:
        first = Client(relay.host, port2)
        assert first.reply().startswith("220")
        first.line("EHLO t")
        assert "250-SIZE 2000" in first.reply()
        second = Client(relay.host, port2)
        assert second.reply().startswith("421 4.7.0")
        second.close()
        main = Client(relay.host, relay.port)  # the other listener keeps its own limits
        assert main.reply().startswith("220")
        main.line("EHLO t")
        assert "250-SIZE 52428800" in main.reply()
        main.close()
        first.close()
