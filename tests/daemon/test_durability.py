"""Durability under kill -9: every message that got a 250 is in the queue after restart; nothing else counts.

Three client threads send messages continuously, each carrying a unique token. The daemon is killed with
SIGKILL at random moments (at least 20 times) and restarted. Oracle, checked on the final spool:
  - every token acknowledged with 250 is queued (at least once), with its whole body;
  - every queued token was at least fully sent by a client (the crash window between commit and the 250
    reaching the client may leave a committed message the client never saw acknowledged: a possible duplicate,
    never a phantom);
  - no queued message is truncated.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import socket
import threading
from pathlib import Path

from mailhop.queue.sqlite import SqliteQueue

from .harness import free_port, start_relay, write_config

KILLS = int(os.environ.get("MAILHOP_DURABILITY_KILLS", "22"))


class Sender(threading.Thread):
    def __init__(self, name: str, port: int, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.name_, self.port, self.stop = name, port, stop
        self.sent: set[str] = set()  # whole message sent, reply maybe lost
        self.acked: dict[str, str] = {}  # token -> queue id
        self.n = 0

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.session()
            except (OSError, ConnectionError, AssertionError):
                continue

    def session(self) -> None:
        s = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        f = s.makefile("rb")

        def reply() -> bytes:
            while True:
                line = f.readline()
                if not line:
                    raise ConnectionError("closed")
                if line[3:4] != b"-":
                    return line

        try:
            assert reply().startswith(b"220")
            s.sendall(b"EHLO t\r\n")
            assert reply().startswith(b"250")
            for _ in range(20):
                if self.stop.is_set():
                    return
                self.n += 1
                token = f"{self.name_}-{self.n}"
                body = f"Subject: {token}\r\nX-Token: {token}\r\n\r\n" + ("line of body text\r\n" * 50) + f"END {token}\r\n"
                s.sendall(b"MAIL FROM:<a@t.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n")
                assert reply().startswith(b"250") and reply().startswith(b"250") and reply().startswith(b"354")
                s.sendall(body.encode() + b".\r\n")
                self.sent.add(token)
                r = reply()
                if r.startswith(b"250"):
                    m = re.search(rb"queued as (\S+)", r)
                    assert m
                    self.acked[token] = m.group(1).decode()
        finally:
            f.close()
            s.close()


def read_spool(spool: Path) -> dict[str, list[bytes]]:
    async def go() -> dict[str, list[bytes]]:
        q = SqliteQueue(spool)
        await q.start(recover=True)
        try:
            out: dict[str, list[bytes]] = {}
            for msg in await q.list():
                with await q.open_body(msg.id) as fh:
                    body = fh.read()
                m = re.search(rb"X-Token: (\S+)", body)
                assert m, body[:200]
                out.setdefault(m.group(1).decode(), []).append(body)
            return out
        finally:
            await q.stop()

    return asyncio.run(go())


def test_kill_9_loses_no_acknowledged_message(tmp_path: Path) -> None:
    port = free_port()
    cfg = write_config(tmp_path, port)
    spool = tmp_path / "spool"
    stop = threading.Event()
    senders = [Sender(f"s{i}", port, stop) for i in range(3)]
    relay = start_relay(cfg, "127.0.0.1", port, spool)
    for s in senders:
        s.start()
    rng = random.Random(int(os.environ.get("MAILHOP_SEED", "1")))
    kills = 0
    try:
        while kills < KILLS:
            # Kill only after some traffic since the last restart, at a random moment.
            stop.wait(rng.uniform(0.05, 0.4))
            relay.stop(signal.SIGKILL)
            kills += 1
            relay = start_relay(cfg, "127.0.0.1", port, spool)
    finally:
        stop.set()
        for s in senders:
            s.join(timeout=10)
        relay.stop()

    queued = read_spool(spool)
    acked = {t: qid for s in senders for t, qid in s.acked.items()}
    sent = set().union(*(s.sent for s in senders))
    assert kills >= 20
    assert len(acked) > 50, f"too little traffic to mean anything: {len(acked)} acknowledged"
    lost = sorted(set(acked) - set(queued))
    assert not lost, f"acknowledged but lost: {lost[:10]}"
    phantoms = sorted(set(queued) - sent)
    assert not phantoms, f"queued but never fully sent: {phantoms[:10]}"
    for token, bodies in queued.items():
        for body in bodies:
            assert body.endswith(f"END {token}\r\n".encode()), f"truncated body for {token}"
    unacked_committed = set(queued) - set(acked)
    print(f"kills={kills} acked={len(acked)} sent={len(sent)} queued={len(queued)} "
          f"committed-unacked={len(unacked_committed)} duplicates={sum(len(b) - 1 for b in queued.values())}")
