"""An in-process delivery rig on real parts: SqliteQueue on disk, a dnslib DNS server, real SMTP receivers on
127.0.0.x, the real SmtpTransport and DeliveryEngine, and a fake clock so retries and expiry take no real time.

Receivers all listen on one port (25 when root, as in production; else one free port on every address) because
MX delivery uses a single port (``[delivery] mx_port``).
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path
from typing import Any

from mailhop.address import parse_path
from mailhop.delivery.bounce import Notifier
from mailhop.delivery.engine import DeliveryEngine
from mailhop.delivery.pool import ConnectionPool
from mailhop.delivery.smtp import SmtpTransport
from mailhop.dns import Resolver
from mailhop.envelope import Envelope, MailParams, RcptParams, Recipient
from mailhop.queue import SqliteQueue
from mailhop.queue.schedule import RetryPolicy
from mailhop.routing import Router
from tests.support.dnsserver import TestDns


class FakeClock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def mx_port() -> int:
    """25 as root (production's port); otherwise a port free on every 127.0.0.x we use."""
    if os.geteuid() == 0:
        return 25
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        ok = True
        for last in range(30, 70):
            with socket.socket() as t:
                try:
                    t.bind((f"127.0.0.{last}", port))
                except OSError:
                    ok = False
                    break
        if ok:
            return port
    raise RuntimeError("no common free port")


def envelope(sender: str | None, *rcpts: str, notify: tuple[str, ...] = (), orcpt: str | None = None,
             params: MailParams | None = None, kind: str = "") -> Envelope:
    return Envelope(
        sender=None if sender is None else parse_path(f"<{sender}>", smtputf8=True),
        mail_params=params or MailParams(),
        recipients=tuple(Recipient(parse_path(f"<{r}>", smtputf8=True), RcptParams(notify, orcpt))  # type: ignore[arg-type]
                         for r in rcpts),
        helo="client.test", client_ip="127.0.0.1", kind=kind,
    )


@dataclass
class Rig:
    """The running parts; the engine runs on ``loop`` in a background thread."""

    dns: TestDns
    port: int
    queue: SqliteQueue
    engine: DeliveryEngine
    clock: FakeClock
    loop: asyncio.AbstractEventLoop
    thread: threading.Thread
    transport: SmtpTransport
    extra: dict[str, Any] = field(default_factory=dict)

    def call(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def send(self, env: Envelope, body: bytes, *, wake: bool = True, canonical: bool = False) -> str:
        """Queue a message as the SMTP server would (``canonical``: vouch for CRLF-only content, as it does)."""

        async def go() -> str:
            writer = self.queue.body_writer()
            writer.write(body)
            writer.canonical = canonical
            qid = await self.queue.accept(env, writer)
            if wake:
                self.engine.wake()
            return qid

        return str(self.call(go()))

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.loop.call_soon_threadsafe(self.engine.wake)

    def queued(self) -> list[Any]:
        return list(self.call(self.queue.list()))

    def wait_idle(self, timeout: float = 20) -> None:
        """Until nothing is in flight and nothing is due at the current fake time."""
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            due = self.call(self.queue.due())
            if not due and not self.engine._inflight:
                return
            time.sleep(0.02)
        raise TimeoutError("engine did not settle")


@contextmanager
def rig(tmp: Path, *, policy: RetryPolicy | None = None, routes: list[Any] | None = None,
        local_endpoints: tuple[tuple[str, int], ...] = (), hand_off: bool = True,
        **transport_options: Any) -> Iterator[Rig]:
    """``hand_off``: wire the queue's on_accepted hook to the engine, as the daemon does."""
    port = mx_port()
    clock = FakeClock()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    with TestDns(origins=["test"]) as dns:
        queue = SqliteQueue(tmp / "spool", clock=clock)
        asyncio.run_coroutine_threadsafe(queue.start(), loop).result(30)
        pool = ConnectionPool(idle_timeout=30.0)
        transport = SmtpTransport(hostname="relay.example.test", pool=pool, connect_timeout=2.0,
                                  **transport_options)
        engine = DeliveryEngine(
            queue, Router(routes or []), Resolver([dns.nameserver], timeout=1.0, lifetime=2.0), transport,
            Notifier(hostname="relay.example.test", postmaster="postmaster@relay.example.test"),
            policy=policy or RetryPolicy(jitter=0.0), mx_port=port, local_endpoints=local_endpoints,
            clock=clock,
        )
        if hand_off:
            queue.on_accepted = engine.offer
        task = asyncio.run_coroutine_threadsafe(engine.run(), loop)
        r = Rig(dns, port, queue, engine, clock, loop, thread, transport)
        try:
            yield r
        finally:
            asyncio.run_coroutine_threadsafe(engine.stop(grace=2), loop).result(30)
            task.result(30)
            asyncio.run_coroutine_threadsafe(pool.close(), loop).result(30)
            asyncio.run_coroutine_threadsafe(queue.stop(), loop).result(30)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
            loop.close()


def parse(data: bytes) -> Message:
    return email.message_from_bytes(data, policy=email.policy.compat32)


def dsn_fields(data: bytes) -> tuple[Message, list[Message]]:
    """The top-level message and the per-recipient blocks of its message/delivery-status part."""
    msg = parse(data)
    assert msg.get_content_type() == "multipart/report", msg.get_content_type()
    parts = msg.get_payload()
    assert isinstance(parts, list)
    status = parts[1]
    assert isinstance(status, Message)
    blocks = status.get_payload()
    assert isinstance(blocks, list) and all(isinstance(block, Message) for block in blocks)
    return msg, [block for block in blocks[1:] if isinstance(block, Message)]
