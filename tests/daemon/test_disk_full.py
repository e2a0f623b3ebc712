"""A real full disk (a small tmpfs under the spool): 452 4.3.1, never 250; the daemon keeps serving and recovers."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from .harness import Client, free_port, start_relay, write_config


@pytest.fixture
def small_spool(tmp_path: Path) -> Iterator[Path]:
    spool = tmp_path / "spool"
    spool.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(spool)], capture_output=True)
    if done.returncode != 0:
        if os.environ.get("CI") == "true":
            pytest.fail(f"cannot mount tmpfs: {done.stderr!r}")
        pytest.skip(f"cannot mount tmpfs: {done.stderr!r}")
    try:
        yield spool
    finally:
        subprocess.run(["umount", "-l", str(spool)], check=False)


def _send(port: int, body: bytes) -> str:
    c = Client("127.0.0.1", port, timeout=30)
    assert c.reply().startswith("220")
    c.send(b"EHLO t\r\nMAIL FROM:<a@t.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n")
    assert [c.reply()[:3] for _ in range(4)] == ["250", "250", "250", "354"]
    c.send(body + b".\r\n")
    reply = c.reply()
    c.line("QUIT")
    c.reply()
    c.close()
    return reply


def test_enospc_gives_452_and_recovers(tmp_path: Path, small_spool: Path) -> None:
    port = free_port()
    cfg = write_config(tmp_path, port, extra="[limits]\nmax_message_size = 20000000\n")
    relay = start_relay(cfg, "127.0.0.1", port, small_spool)
    try:
        assert _send(port, b"Subject: small\r\n\r\nfits\r\n").startswith("250 ")
        big = b"Subject: big\r\n\r\n" + (b"y" * 998 + b"\r\n") * 5000  # ~5 MB on a 3 MB disk
        assert _send(port, big).startswith("452 4.3.1")
        # Nothing half-written is left behind, and the daemon goes on accepting.
        assert _send(port, b"Subject: again\r\n\r\nfits\r\n").startswith("250 ")
        filler = small_spool / "filler"
        with open(filler, "wb") as fh:
            try:
                while True:
                    fh.write(b"\0" * 65536)
                    fh.flush()
            except OSError:
                pass
        reply = _send(port, b"Subject: full\r\n\r\n" + (b"z" * 98 + b"\r\n") * 3000)
        assert reply.startswith(("452 4.3.1", "451 4.3.0")), reply
        filler.unlink()
        assert _send(port, b"Subject: recovered\r\n\r\nok\r\n").startswith("250 ")
    finally:
        code = relay.stop()
    assert code == 0, relay.log()
    assert len(relay.queue_ids()) == 3
