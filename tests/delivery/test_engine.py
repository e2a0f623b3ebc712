"""Delivery engine end to end on real parts (DNS server, SMTP receivers, SQLite queue), with a fake clock.

Each case named in the delivery issue is a test here: MX preference and fallback, implicit MX, null MX,
NXDOMAIN, SERVFAIL then success, 4xx then success, 5xx bounce fields, expiry, delay warning, mixed outcomes,
connection reuse, pipelining, smuggling-safe output and bounce-loop prevention.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import pytest

from mailhop.queue.model import QueuedMessage
from mailhop.queue.schedule import RetryPolicy
from tests.support.receiver import Receiver

from .engine_harness import Rig, dsn_fields, envelope, rig

BODY = b"From: a@sender.test\r\nTo: x@dest.test\r\nSubject: test\r\nMessage-ID: <1@sender.test>\r\n\r\nhello\r\n"


@pytest.fixture
def r(tmp_path: Path) -> Iterator[Rig]:
    with rig(tmp_path) as the_rig:
        the_rig.dns.add(
            "sender.test. 60 IN MX 10 mx.sender.test.",
            "mx.sender.test. 60 IN A 127.0.0.40",
        )
        yield the_rig


@pytest.fixture
def bounces(r: Rig) -> Iterator[Receiver]:
    """The sender's own MX: where DSNs arrive."""
    with Receiver("127.0.0.40", r.port) as rx:
        yield rx


def test_mx_preference_and_fallback(r: Rig, bounces: Receiver) -> None:
    r.dns.add("dest.test. 60 IN MX 10 dead.dest.test.", "dest.test. 60 IN MX 20 live.dest.test.",
              "dead.dest.test. 60 IN A 127.0.0.49", "live.dest.test. 60 IN A 127.0.0.41")
    with Receiver("127.0.0.41", r.port) as live:
        r.send(envelope("a@sender.test", "x@dest.test"), BODY)
        [tx] = live.wait_for(1)
        assert tx.rcpts[0][0] == "x@dest.test" and tx.mail_from == "a@sender.test"
    r.wait_idle()
    assert r.queued() == [] and bounces.transactions == []


def test_mx_equal_preference_both_used(r: Rig) -> None:
    r.dns.add("eq.test. 60 IN MX 10 a.eq.test.", "eq.test. 60 IN MX 10 b.eq.test.",
              "a.eq.test. 60 IN A 127.0.0.42", "b.eq.test. 60 IN A 127.0.0.43")
    with Receiver("127.0.0.42", r.port) as a, Receiver("127.0.0.43", r.port) as b:
        for i in range(12):
            r.send(envelope("a@sender.test", f"x{i}@eq.test"), BODY)
        r.wait_idle()
        assert len(a.transactions) + len(b.transactions) == 12


def test_implicit_mx(r: Rig) -> None:
    r.dns.add("implicit.test. 60 IN A 127.0.0.44")
    with Receiver("127.0.0.44", r.port) as rx:
        r.send(envelope("a@sender.test", "x@implicit.test"), BODY)
        rx.wait_for(1)


def test_null_mx_bounces_5_1_10(r: Rig, bounces: Receiver) -> None:
    r.dns.add("nullmx.test. 60 IN MX 0 .")
    qid = r.send(envelope("a@sender.test", "x@nullmx.test"), BODY)
    [tx] = bounces.wait_for(1)
    assert tx.mail_from == "" and tx.rcpts[0][0] == "a@sender.test"
    msg, blocks = dsn_fields(tx.data)
    assert blocks[0]["Status"] == "5.1.10" and blocks[0]["Action"] == "failed"
    assert qid in msg["Message-ID"]  # the notice names the message it is about
    r.wait_idle()
    assert r.queued() == []


def test_nxdomain_bounces_5_1_2(r: Rig, bounces: Receiver) -> None:
    r.send(envelope("a@sender.test", "x@nonexistent.test"), BODY)
    [tx] = bounces.wait_for(1)
    _, blocks = dsn_fields(tx.data)
    assert blocks[0]["Status"] == "5.1.2"
    assert blocks[0]["Final-Recipient"] == "rfc822; x@nonexistent.test"


def test_servfail_defers_then_succeeds(r: Rig, bounces: Receiver) -> None:
    r.dns.add("flaky.test. 60 IN MX 10 mx.flaky.test.", "mx.flaky.test. 60 IN A 127.0.0.45")
    r.dns.zone.servfail.add("flaky.test")
    with Receiver("127.0.0.45", r.port) as rx:
        qid = r.send(envelope("a@sender.test", "x@flaky.test"), BODY)
        r.wait_idle()
        [m] = r.queued()
        assert m.id == qid and m.recipients[0].status == "deferred"
        assert m.recipients[0].last_reply.startswith("451 4.4.3")
        assert rx.transactions == []
        r.dns.zone.servfail.discard("flaky.test")
        r.advance(301)
        rx.wait_for(1)
    r.wait_idle()
    assert r.queued() == [] and bounces.transactions == []


def test_4xx_then_success_on_retry(r: Rig, bounces: Receiver) -> None:
    r.dns.add("retry.test. 60 IN A 127.0.0.46")
    replies = iter(["451 4.3.0 try later", None])
    with Receiver("127.0.0.46", r.port, on_rcpt=lambda addr: next(replies)) as rx:
        r.send(envelope("a@sender.test", "x@retry.test"), BODY)
        r.wait_idle()
        [m] = r.queued()
        assert m.recipients[0].status == "deferred" and m.recipients[0].attempts == 1
        assert m.recipients[0].next_attempt == pytest.approx(r.clock.now + 300)
        r.advance(299)
        r.wait_idle()
        assert rx.transactions == []
        r.advance(2)
        [tx] = rx.wait_for(1)
        assert tx.data.endswith(b"hello\r\n")
    r.wait_idle()
    assert r.queued() == [] and bounces.transactions == []


def test_5xx_bounce_has_the_right_dsn_fields(r: Rig, bounces: Receiver) -> None:
    r.dns.add("hard.test. 60 IN MX 5 mx.hard.test.", "mx.hard.test. 60 IN A 127.0.0.47")
    with Receiver("127.0.0.47", r.port, on_rcpt=lambda a: "550 5.1.1 <x@hard.test>: no such user"):
        env = envelope("a@sender.test", "x@hard.test", orcpt="rfc822;X@Hard.Test")
        r.send(env, BODY)
        [tx] = bounces.wait_for(1)
    msg, blocks = dsn_fields(tx.data)
    assert msg["From"].startswith("Mail Delivery System") and msg["Auto-Submitted"] == "auto-replied"
    b = blocks[0]
    assert b["Action"] == "failed" and b["Status"] == "5.1.1"
    assert b["Remote-MTA"] == "dns; mx.hard.test"
    assert "550 5.1.1" in b["Diagnostic-Code"] and b["Diagnostic-Code"].startswith("smtp;")
    assert b["Original-Recipient"] == "rfc822;X@Hard.Test"
    assert b"Subject: test" in tx.data  # the original comes back (RET not given: full for failures)


def test_expiry_bounces_with_4_4_7(tmp_path: Path) -> None:
    with rig(tmp_path, policy=RetryPolicy(jitter=0.0, lifetime=3600, delay_warning=0)) as r:
        r.dns.add("sender.test. 60 IN A 127.0.0.40", "slow.test. 60 IN A 127.0.0.48")
        with Receiver("127.0.0.40", r.port) as bounces, \
                Receiver("127.0.0.48", r.port, on_rcpt=lambda a: "452 4.2.2 mailbox full") as rx:
            r.send(envelope("a@sender.test", "x@slow.test"), BODY)
            r.wait_idle()
            for _ in range(6):
                r.advance(1200)
                r.wait_idle()
            [tx] = bounces.wait_for(1)
            _, blocks = dsn_fields(tx.data)
            assert blocks[0]["Action"] == "failed" and blocks[0]["Status"] == "4.4.7"
            assert "452 4.2.2" in blocks[0]["Diagnostic-Code"]
            mails = [c for sess in rx.sessions for c in sess.commands if c.startswith("MAIL")]
            assert len(mails) >= 2  # retried before expiring
            assert r.queued() == []


def test_delay_warning_once(tmp_path: Path) -> None:
    with rig(tmp_path, policy=RetryPolicy(jitter=0.0, delay_warning=3600, max_interval=1800)) as r:
        r.dns.add("sender.test. 60 IN A 127.0.0.40", "slow.test. 60 IN A 127.0.0.48")
        with Receiver("127.0.0.40", r.port) as bounces, \
                Receiver("127.0.0.48", r.port, on_rcpt=lambda a: "451 4.3.0 later"):
            r.send(envelope("a@sender.test", "x@slow.test", notify=("DELAY", "FAILURE")), BODY)
            r.wait_idle()
            for _ in range(6):
                r.advance(1801)
                r.wait_idle()
            [tx] = bounces.wait_for(1)
            msg, blocks = dsn_fields(tx.data)
            assert blocks[0]["Action"] == "delayed" and blocks[0]["Status"] == "4.3.0"
            assert "Will-Retry-Until" in blocks[0]
            assert "Delayed" in msg["Subject"]
            [m] = r.queued()
            assert m.warned and m.recipients[0].status == "deferred"
            assert len(bounces.transactions) == 1  # once, not at every retry


def test_delay_warning_respects_notify(tmp_path: Path) -> None:
    with rig(tmp_path, policy=RetryPolicy(jitter=0.0, delay_warning=3600, max_interval=1800)) as r:
        r.dns.add("sender.test. 60 IN A 127.0.0.40", "slow.test. 60 IN A 127.0.0.48")
        with Receiver("127.0.0.40", r.port) as bounces, \
                Receiver("127.0.0.48", r.port, on_rcpt=lambda a: "451 4.3.0 later"):
            r.send(envelope("a@sender.test", "x@slow.test", notify=("FAILURE",)), BODY)
            for _ in range(4):
                r.advance(1801)
                r.wait_idle()
            assert bounces.transactions == []


def test_mixed_outcomes_in_one_transaction(r: Rig, bounces: Receiver) -> None:
    r.dns.add("mixed.test. 60 IN A 127.0.0.50")
    calls: dict[str, int] = {}

    def on_rcpt(addr: str) -> str | None:
        calls[addr] = calls.get(addr, 0) + 1
        if addr.startswith("bad"):
            return "550 5.1.1 no such user"
        if addr.startswith("later") and calls[addr] == 1:
            return "450 4.2.0 greylisted"
        return None

    with Receiver("127.0.0.50", r.port, on_rcpt=on_rcpt) as rx:
        r.send(envelope("a@sender.test", "good@mixed.test", "later@mixed.test", "bad@mixed.test"), BODY)
        [tx] = rx.wait_for(1)
        assert [a for a, _ in tx.rcpts] == ["good@mixed.test"]
        [bounce] = bounces.wait_for(1)
        _, blocks = dsn_fields(bounce.data)
        assert [b["Final-Recipient"] for b in blocks] == ["rfc822; bad@mixed.test"]
        r.wait_idle()
        [m] = r.queued()
        assert [str(x.status) for x in m.recipients] == ["delivered", "deferred", "failed"]
        r.advance(301)
        txs = rx.wait_for(2)
        assert [a for a, _ in txs[1].rcpts] == ["later@mixed.test"]  # never again to the delivered one
    r.wait_idle()
    assert r.queued() == [] and len(bounces.transactions) == 1
    assert calls == {"good@mixed.test": 1, "later@mixed.test": 2, "bad@mixed.test": 1}


def test_connection_reuse_and_pipelining(r: Rig) -> None:
    r.dns.add("reuse.test. 60 IN A 127.0.0.51")
    with Receiver("127.0.0.51", r.port) as rx:
        for i in range(3):
            r.send(envelope("a@sender.test", f"x{i}@reuse.test", f"y{i}@reuse.test"), BODY)
            rx.wait_for(i + 1)
        assert rx.connections == 1
        batches = rx.sessions[0].batches()
        assert ["MAIL FROM:<a@sender.test>", "RCPT TO:<x0@reuse.test>", "RCPT TO:<y0@reuse.test>", "DATA"] in [
            [c.split(" ", 2)[0] + " " + c.split(" ", 2)[1] if c.startswith(("MAIL", "RCPT")) else c for c in b]
            for b in batches
        ]


def test_recipients_of_one_domain_share_a_transaction(r: Rig) -> None:
    r.dns.add("many.test. 60 IN A 127.0.0.52")
    with Receiver("127.0.0.52", r.port) as rx:
        r.send(envelope("a@sender.test", *(f"u{i}@many.test" for i in range(30))), BODY)
        [tx] = rx.wait_for(1)
        assert len(tx.rcpts) == 30


def test_smuggling_safe_output(r: Rig) -> None:
    r.dns.add("exact.test. 60 IN A 127.0.0.53")
    body = (b"Subject: dots\r\n\r\n.\r\n..\r\n.leading\r\n" + b"L" * 2000 + b"\r\n"
            b"\r\n.\r\nMAIL FROM:<x@y>\r\n.")
    with Receiver("127.0.0.53", r.port) as rx:
        r.send(envelope("a@sender.test", "x@exact.test"), body)
        [tx] = rx.wait_for(1)
    assert tx.data == body + b"\r\n"  # the only change: the missing final CRLF is added
    assert tx.bare_newlines == 0
    assert len(rx.transactions) == 1


def test_bounce_loop_prevention(r: Rig) -> None:
    """A bounce (null sender) that fails goes to the postmaster once; if that fails too, it is dropped."""
    r.dns.add("gone.test. 60 IN A 127.0.0.54", "relay.example.test. 60 IN A 127.0.0.55")
    with Receiver("127.0.0.54", r.port, on_rcpt=lambda a: "550 5.1.1 gone"), \
            Receiver("127.0.0.55", r.port, on_rcpt=lambda a: "550 5.1.1 no postmaster either") as pm:
        r.send(envelope(None, "x@gone.test"), b"Subject: a bounce\r\n\r\nbody\r\n")
        pm.wait_until(lambda: any(c.startswith("RCPT") for s in pm.sessions for c in s.commands), timeout=10)
        r.wait_idle()
        assert r.queued() == []
        r.advance(3600)
        r.wait_idle()
    rcpts = [c for s in pm.sessions for c in s.commands if c.startswith("RCPT")]
    assert rcpts == ["RCPT TO:<postmaster@relay.example.test>"]  # once, then dropped: no notice about the notice


def test_success_notice_when_next_hop_lacks_dsn(r: Rig, bounces: Receiver) -> None:
    r.dns.add("nodsn.test. 60 IN A 127.0.0.56")
    with Receiver("127.0.0.56", r.port, drop_capabilities=["DSN"]) as rx:
        r.send(envelope("a@sender.test", "x@nodsn.test", notify=("SUCCESS",)), BODY)
        rx.wait_for(1)
        [tx] = bounces.wait_for(1)
    _, blocks = dsn_fields(tx.data)
    assert blocks[0]["Action"] == "relayed"


def test_no_success_notice_when_next_hop_takes_dsn(r: Rig, bounces: Receiver) -> None:
    r.dns.add("dsn.test. 60 IN A 127.0.0.57")
    with Receiver("127.0.0.57", r.port) as rx:
        r.send(envelope("a@sender.test", "x@dsn.test", notify=("SUCCESS",), orcpt="rfc822;x@dsn.test"), BODY)
        [tx] = rx.wait_for(1)
        assert any(p.upper().startswith("NOTIFY=SUCCESS") for p in tx.rcpts[0][1])
    r.wait_idle()
    assert bounces.transactions == []


def test_mx_pointing_at_ourselves_is_a_loop(tmp_path: Path) -> None:
    with rig(tmp_path, local_endpoints=(("127.0.0.58", 0),)) as r:
        r.dns.add("sender.test. 60 IN A 127.0.0.40", "loop.test. 60 IN A 127.0.0.58")
        r.engine.local_endpoints = (("127.0.0.58", r.port),)
        with Receiver("127.0.0.40", r.port) as bounces:
            r.send(envelope("a@sender.test", "x@loop.test"), BODY)
            [tx] = bounces.wait_for(1)
        _, blocks = dsn_fields(tx.data)
        assert blocks[0]["Status"] == "5.4.6"


def test_ipv6_mx_host(r: Rig) -> None:
    r.dns.add("six.test. 60 IN MX 10 mx.six.test.", "mx.six.test. 60 IN AAAA ::1")
    with Receiver("::1", r.port) as rx:
        r.send(envelope("a@sender.test", "x@six.test"), BODY)
        [tx] = rx.wait_for(1)
        assert tx.rcpts[0][0] == "x@six.test"


def test_ipv6_unreachable_falls_back_to_ipv4(r: Rig) -> None:
    # ::1 on this port has no listener (connection refused): the IPv4 address of the same host is next.
    r.dns.add("dual.test. 60 IN MX 10 mx.dual.test.", "mx.dual.test. 60 IN AAAA ::1",
              "mx.dual.test. 60 IN A 127.0.0.59")
    with Receiver("127.0.0.59", r.port) as rx:
        r.send(envelope("a@sender.test", "x@dual.test"), BODY)
        rx.wait_for(1)


def test_a_fast_destination_is_recorded_before_a_slow_sibling_finishes(r: Rig) -> None:
    # One message, two destinations: the fast one's 250 must be on disk while the slow one is still talking,
    # so a crash or a shutdown in between cannot send the fast one's copy again.
    r.dns.add("fast.test. 60 IN A 127.0.0.52", "slow.test. 60 IN A 127.0.0.53")
    with Receiver("127.0.0.52", r.port) as fast, \
            Receiver("127.0.0.53", r.port, reply_delay=3.0, slow_on=(".",)) as slow:
        r.send(envelope("a@sender.test", "x@fast.test", "y@slow.test"), BODY)
        fast.wait_for(1)
        deadline = time.monotonic() + 2.5
        states: list[str] = []
        while time.monotonic() < deadline:
            [m] = r.queued()
            states = [str(x.status) for x in m.recipients]
            if states[0] == "delivered":
                break
            time.sleep(0.02)
        assert states == ["delivered", "pending"], states  # recorded while the slow one is still in DATA
        slow.wait_for(1)
        r.wait_idle()
    assert r.queued() == []


class _Counting:
    """Counts the engine's reads of the queue (wraps the real methods; the queue stays real)."""

    def __init__(self, r: Rig) -> None:
        self.due = 0
        self.open_body = 0
        real_due, real_open = r.queue.due, r.queue.open_body

        async def due(**kw: Any) -> list[QueuedMessage]:
            self.due += 1
            return await real_due(**kw)

        async def open_body(queue_id: str) -> BinaryIO:
            self.open_body += 1
            return await real_open(queue_id)

        r.queue.due = due  # type: ignore[method-assign]
        r.queue.open_body = open_body  # type: ignore[method-assign]


def test_accepted_mail_is_handed_to_delivery_without_reading_the_queue(r: Rig) -> None:
    r.dns.add("handoff.test. 60 IN A 127.0.0.54")
    with Receiver("127.0.0.54", r.port) as rx:
        counting = _Counting(r)
        for i in range(20):
            r.send(envelope("a@sender.test", f"x{i}@handoff.test"), BODY + b"n%d\r\n" % i, wake=False)
        txs = rx.wait_for(20)
        r.wait_idle()
    assert sorted(tx.data.rsplit(b"n", 1)[1] for tx in txs) == sorted(b"%d\r\n" % i for i in range(20))
    assert counting.open_body == 0  # the inline body came with the hand-off
    assert counting.due <= 2, counting.due  # no queue scan per message
    assert r.queued() == []


def test_a_scan_racing_a_hand_off_delivers_once(r: Rig) -> None:
    # A scan that started before a message was accepted, but whose snapshot shows it pending, must not
    # start it again after the hand-off delivered and recorded it. One recipient defers, so the message is
    # still queued when the stale snapshot comes back (otherwise its missing row would stop a second copy).
    r.dns.add("race.test. 60 IN A 127.0.0.55", "later.test. 60 IN A 127.0.0.56")
    real_due = r.queue.due
    gate: dict[str, Any] = {}

    async def due(**kw: Any) -> Any:
        if "release" not in gate:
            return await real_due(**kw)
        gate["scanning"].set()
        await gate["release"].wait()  # exclude= was computed before the message existed
        snapshot = await real_due(**kw)  # the message is committed and pending in this snapshot ...
        gate.pop("release")
        attempts = list(r.engine._inflight.values())
        if attempts:  # ... and attempted and recorded before the scan returns
            await asyncio.wait(attempts)
        assert not r.engine._inflight
        return snapshot

    async def arm() -> None:
        gate["scanning"], gate["release"] = asyncio.Event(), asyncio.Event()

    r.call(arm())
    r.queue.due = due  # type: ignore[method-assign]
    with Receiver("127.0.0.55", r.port, reply_delay=0.2, slow_on=(".",)) as rx, \
            Receiver("127.0.0.56", r.port, on_rcpt=lambda addr: "451 4.3.0 later") as later:
        r.loop.call_soon_threadsafe(r.engine.wake)
        r.call(asyncio.wait_for(gate["scanning"].wait(), 5))
        r.send(envelope("a@sender.test", "x@race.test", "y@later.test"), BODY, wake=False)
        r.loop.call_soon_threadsafe(gate["release"].set)
        rx.wait_for(1)
        time.sleep(1.0)  # a second delivery would have arrived by now
        r.wait_idle()
        assert len(rx.transactions) == 1
        assert later.transactions == []
    [m] = r.queued()
    assert [str(x.status) for x in m.recipients] == ["delivered", "deferred"]


def test_a_canonical_hand_off_is_dot_stuffed_and_arrives_intact(r: Rig) -> None:
    # The server vouched for CRLF-only content: delivery only dot-stuffs it, over chunk boundaries too.
    r.dns.add("canon.test. 60 IN A 127.0.0.57")
    body = BODY + b".starts with a dot\r\n..two\r\n.\r\n" + b"x" * 70_000 + b"\r\n.\r\nend\r\n"
    with Receiver("127.0.0.57", r.port) as rx:
        r.send(envelope("a@sender.test", "x@canon.test"), body, wake=False, canonical=True)
        [tx] = rx.wait_for(1)
    assert tx.data == body
    assert tx.bare_newlines == 0
