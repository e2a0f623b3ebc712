"""Rate limits: every key x counter, the sliding window on a stepped clock, IPv6 /64, exemptions, refunds."""

from __future__ import annotations

import logging
import socket
from collections.abc import AsyncIterator, Callable
from typing import Literal

import pytest

from mailhop.checks.api import Action, CheckContext, Phase, Verdict
from mailhop.checks.chain import PolicyChain
from mailhop.checks.ratelimit import (
    MemoryRateBackend,
    RateBackend,
    RateDecision,
    RateLimitCheck,
    RedisRateBackend,
    sliding_window,
)
from mailhop.config.checks import RateLimitConfig, RateRuleConfig
from tests.support.redisserver import REDIS_URL, delete_prefix, fresh_prefix, redis_or_skip

pytestmark = pytest.mark.anyio

Key = Literal["client_ip", "sender_domain", "recipient_domain"]
Counter = Literal["connections", "messages", "recipients"]
T0 = 60_000.0  # a multiple of every window used, so fixed windows start at T0


class Clock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class Rig:
    def __init__(self, *rules: tuple[Key, Counter, int, float], exempt_authenticated: bool = False,
                 max_keys: int = 100_000) -> None:
        self.clock = Clock()
        self.backend = MemoryRateBackend(max_keys=max_keys, clock=self.clock)
        cfg = RateLimitConfig(enabled=True, exempt_authenticated=exempt_authenticated,
                              rules=[RateRuleConfig(key=k, counter=c, limit=n, window=w) for k, c, n, w in rules])
        self.check = RateLimitCheck(cfg, self.backend)

    async def connect(self, ip: str = "192.0.2.1", trusted: bool = False) -> Verdict | None:
        return await self.check.connect(CheckContext(client_ip=ip, trusted=trusted))

    async def mail(self, ip: str = "192.0.2.1", sender: str = "a@sender.test", user: str | None = None
                   ) -> Verdict | None:
        return await self.check.mail(CheckContext(client_ip=ip, sender=sender, user=user))

    async def transaction(self, *rcpts: str, ip: str = "192.0.2.1", sender: str = "a@sender.test",
                          user: str | None = None) -> list[Verdict | None]:
        """RCPT after RCPT in one transaction, as the session runs them (accepted ones join ctx.recipients)."""
        ctx = CheckContext(client_ip=ip, sender=sender, user=user)
        out = []
        for rcpt in rcpts:
            ctx.recipient = rcpt
            verdict = await self.check.rcpt(ctx)
            if verdict is None:
                ctx.recipients.append(rcpt)
            out.append(verdict)
        return out


def refused(verdict: Verdict | None, code: int, enhanced: str, text: str) -> bool:
    if verdict is None:
        return False
    assert verdict.action is Action.TEMPFAIL and verdict.reply is not None
    assert (verdict.reply.code, verdict.reply.enhanced, verdict.reply.text) == (code, enhanced, text)
    return True


CONN = (421, "4.7.0", "Too many connections from your address; try again later")
RCPTS = (451, "4.7.1", "Recipient rate limit exceeded")


def msgs(key: str) -> tuple[int, str, str]:
    return 451, "4.7.1", f"Message rate limit exceeded for {key}"


async def test_connections_per_client_ip() -> None:
    r = Rig(("client_ip", "connections", 2, 60))
    assert await r.connect() is None and await r.connect() is None
    assert refused(await r.connect(), *CONN)
    assert await r.connect("192.0.2.2") is None  # IPv4 is counted per address, not per /24
    assert refused(await r.connect(trusted=True), *CONN)  # trusted clients are not exempt


async def test_connections_are_counted_even_with_exempt_authenticated() -> None:
    r = Rig(("client_ip", "connections", 1, 60), exempt_authenticated=True)
    assert await r.connect() is None
    assert refused(await r.connect(), *CONN)


async def test_messages_per_client_ip() -> None:
    r = Rig(("client_ip", "messages", 2, 3600))
    assert await r.mail() is None and await r.mail(sender="") is None
    assert refused(await r.mail(sender="x@other.test"), *msgs("192.0.2.1"))
    assert await r.mail("192.0.2.2") is None


async def test_messages_per_sender_domain() -> None:
    r = Rig(("sender_domain", "messages", 2, 3600))
    assert await r.mail("192.0.2.1", "a@Sender.test") is None
    assert await r.mail("192.0.2.2", "b@sender.TEST") is None  # any client, any user of the domain
    assert refused(await r.mail("192.0.2.3", "c@sender.test"), *msgs("sender.test"))
    assert await r.mail(sender="a@other.test") is None
    for _ in range(5):
        assert await r.mail(sender="") is None  # the null sender has no domain to count


async def test_messages_per_recipient_domain_count_once_per_transaction() -> None:
    r = Rig(("recipient_domain", "messages", 2, 3600))
    assert await r.transaction("a@dest.test", "b@dest.test", "c@DEST.test", "x@other.test") == [None] * 4
    assert await r.transaction("d@dest.test", "e@dest.test") == [None, None]
    third = await r.transaction("f@dest.test", "y@other.test")
    assert refused(third[0], *msgs("dest.test")) and third[1] is None


async def test_recipients_per_client_ip() -> None:
    r = Rig(("client_ip", "recipients", 3, 3600))
    assert await r.transaction("a@d1.test", "b@d2.test") == [None, None]
    out = await r.transaction("c@d3.test", "d@d4.test", ip="192.0.2.1")
    assert out[0] is None and refused(out[1], *RCPTS)
    assert await r.transaction("e@d1.test", ip="192.0.2.9") == [None]


async def test_recipients_per_sender_domain() -> None:
    r = Rig(("sender_domain", "recipients", 2, 3600))
    out = await r.transaction("a@d.test", "b@d.test", "c@d.test", sender="x@bulk.test")
    assert out[:2] == [None, None] and refused(out[2], *RCPTS)
    assert await r.transaction("a@d.test", sender="x@small.test") == [None]
    assert await r.transaction("a@d.test", "b@d.test", "c@d.test", sender="") == [None] * 3


async def test_recipients_per_recipient_domain() -> None:
    r = Rig(("recipient_domain", "recipients", 2, 3600))
    out = await r.transaction("a@big.test", "b@other.test", "c@big.test", "d@BIG.test")
    assert out[:3] == [None, None, None] and refused(out[3], *RCPTS)
    assert refused((await r.transaction("e@big.test", ip="198.51.100.1"))[0], *RCPTS)  # shared across clients


async def test_window_slides() -> None:
    r = Rig(("client_ip", "connections", 10, 60))
    for _ in range(10):
        assert await r.connect() is None
    assert refused(await r.connect(), *CONN)
    r.clock.t = T0 + 60  # a new fixed window, but the previous one still weighs fully: 10
    assert refused(await r.connect(), *CONN)
    r.clock.t = T0 + 90  # halfway: the previous window weighs 5, so 5 more fit
    for _ in range(5):
        assert await r.connect() is None
    assert refused(await r.connect(), *CONN)
    r.clock.t = T0 + 120  # previous window (5) weighs fully again
    for _ in range(5):
        assert await r.connect() is None
    assert refused(await r.connect(), *CONN)
    r.clock.t = T0 + 240  # two idle windows: all forgotten
    for _ in range(10):
        assert await r.connect() is None


async def test_refused_attempts_are_not_counted() -> None:
    r = Rig(("client_ip", "connections", 2, 60))
    assert await r.connect() is None and await r.connect() is None
    r.clock.t = T0 + 10
    for _ in range(20):
        assert refused(await r.connect(), *CONN)
    r.clock.t = T0 + 90  # counting the 20 refusals would make this 11 of 2
    assert await r.connect() is None


async def test_a_refusal_by_one_rule_is_refunded_to_the_others() -> None:
    r = Rig(("client_ip", "recipients", 2, 3600), ("recipient_domain", "recipients", 1, 3600))
    out = await r.transaction("a@one.test", "b@one.test", "c@two.test", "d@three.test")
    assert out[0] is None
    assert refused(out[1], *RCPTS)  # the domain rule refuses; the client_ip count it took is given back
    assert out[2] is None  # so this is only the client's second recipient
    assert refused(out[3], *RCPTS)


async def test_ipv6_clients_are_counted_per_slash_64() -> None:
    r = Rig(("client_ip", "messages", 2, 3600))
    assert await r.mail("2001:db8:1:2::1") is None
    assert await r.mail("2001:db8:1:2:ffff::99") is None
    assert refused(await r.mail("2001:db8:1:2::abcd"), *msgs("2001:db8:1:2::/64"))
    assert await r.mail("2001:db8:1:3::1") is None
    assert await r.mail("::ffff:192.0.2.50") is None
    assert await r.mail("192.0.2.50") is None
    assert refused(await r.mail("::ffff:192.0.2.50"), *msgs("192.0.2.50"))  # mapped = the same IPv4 client


async def test_exempt_authenticated() -> None:
    rules: tuple[tuple[Key, Counter, int, float], ...] = (("client_ip", "messages", 1, 3600),
                                                         ("client_ip", "recipients", 1, 3600))
    exempt = Rig(*rules, exempt_authenticated=True)
    for _ in range(3):
        assert await exempt.mail(user="alice") is None
        assert await exempt.transaction("a@d.test", "b@d.test", user="alice") == [None, None]
    assert await exempt.mail() is None  # the exempt attempts were not counted either
    assert refused(await exempt.mail(), *msgs("192.0.2.1"))
    counted = Rig(*rules)
    assert await counted.mail(user="alice") is None
    assert refused(await counted.mail(user="alice"), *msgs("192.0.2.1"))


async def test_backend_state_is_bounded() -> None:
    r = Rig(("sender_domain", "messages", 1, 3600), max_keys=3)
    for n in range(10):
        assert await r.mail(sender=f"a@d{n}.test") is None
    assert len(r.backend) == 3
    assert await r.mail(sender="a@d0.test") is None  # evicted: a forgotten counter starts at zero
    assert refused(await r.mail(sender="a@d9.test"), *msgs("d9.test"))


def test_sliding_window_retry_after() -> None:
    assert sliding_window(0, 0, 0.0, 60, 1, 1) == RateDecision(True)
    # Room in this window once the previous window's 8 weigh 3 or less: at 37.5 s, 22.5 s from now.
    assert sliding_window(8, 2, 15.0, 60, 6, 1).retry_after == pytest.approx(22.5)
    # The current window is full: wait for the next, then until 10 * (1 - x/60) + 1 <= 10, x = 6.
    assert sliding_window(0, 10, 20.0, 60, 10, 1).retry_after == pytest.approx(46.0)
    assert not sliding_window(0, 10, 20.0, 60, 10, 1).allowed
    assert sliding_window(0, 0, 0.0, 60, 1, 2) == RateDecision(False, 60)  # more than the limit at once


async def test_retry_after_is_exact() -> None:
    backend = MemoryRateBackend(clock=Clock())
    assert (await backend.hit("k", 60, 1)).allowed
    decision = await backend.hit("k", 60, 1)
    assert not decision.allowed and decision.retry_after == pytest.approx(120.0)
    backend.clock = Clock(T0 + 119.9)
    assert not (await backend.hit("k", 60, 1)).allowed
    backend.clock = Clock(T0 + 120.0)
    assert (await backend.hit("k", 60, 1)).allowed


async def test_runs_in_the_chain() -> None:
    r = Rig(("client_ip", "connections", 1, 60))
    chain = PolicyChain([r.check])
    assert chain.has(Phase.CONNECT) and chain.has(Phase.MAIL) and chain.has(Phase.RCPT)
    assert (await chain.run(Phase.CONNECT, CheckContext(client_ip="192.0.2.1"))).action is Action.CONTINUE
    verdict = await chain.run(Phase.CONNECT, CheckContext(client_ip="192.0.2.1"))
    assert verdict.action is Action.TEMPFAIL and verdict.reply is not None and verdict.reply.code == 421


# -- the backend contract, on memory and on a real Redis -------------------------------------------------------------

@pytest.fixture(params=["memory", "redis"])
async def make_backend(request: pytest.FixtureRequest) -> AsyncIterator[Callable[[Clock], RateBackend]]:
    """Builds backends of one kind on a given clock; Redis ones under a fresh key prefix, removed afterwards."""
    made: list[RateBackend] = []
    prefix = fresh_prefix()

    def make(clock: Clock) -> RateBackend:
        backend: RateBackend
        if request.param == "memory":
            backend = MemoryRateBackend(clock=clock)
        else:
            backend = RedisRateBackend(REDIS_URL, prefix=prefix, clock=clock)
        made.append(backend)
        return backend

    if request.param == "redis":
        redis_or_skip()
    yield make
    if request.param == "redis":
        await delete_prefix(prefix)
    for backend in made:
        await backend.aclose()


async def test_backend_contract(make_backend: Callable[[Clock], RateBackend]) -> None:
    """One scripted sequence; every backend must give the memory backend's (the reference's) answers."""
    clock = Clock()
    backend = make_backend(clock)
    script: list[tuple[float, str, int, bool]] = [  # (time, key, amount, expected allowed)
        (0, "a", 1, True), (1, "a", 1, True), (2, "a", 1, True), (3, "a", 1, False), (3, "b", 3, True),
        (4, "b", 1, False), (60, "a", 1, False), (79, "a", 1, False), (80, "a", 1, True), (85, "a", 1, False),
        (85, "c", 4, False),
        (200, "a", 3, True), (200, "a", 1, False),
    ]
    for at, key, amount, expected in script:
        clock.t = T0 + at
        decision = await backend.hit(key, 60, 3, amount)
        assert decision.allowed is expected, (at, key, amount)
        assert (decision.retry_after == 0) is expected
    # retry_after is exact: 3 hits at 200 s fill the window [180, 240); the next passes at 240 + 60 * (1 - 2/3).
    clock.t = T0 + 201
    assert (await backend.hit("a", 60, 3)).retry_after == pytest.approx(59.0)
    clock.t = T0 + 259.9
    assert not (await backend.hit("a", 60, 3)).allowed
    clock.t = T0 + 260.01
    assert (await backend.hit("a", 60, 3)).allowed


async def test_backend_refund(make_backend: Callable[[Clock], RateBackend]) -> None:
    clock = Clock()
    backend = make_backend(clock)
    assert (await backend.hit("k", 3600, 2)).allowed and (await backend.hit("k", 3600, 2)).allowed
    await backend.refund("k", 3600)
    assert (await backend.hit("k", 3600, 2)).allowed
    assert not (await backend.hit("k", 3600, 2)).allowed
    for _ in range(3):
        await backend.refund("k", 3600)  # never below zero
    assert (await backend.hit("k", 3600, 2, amount=2)).allowed
    await backend.refund("unknown", 3600)  # refunding nothing is harmless
    assert (await backend.hit("k", 60, 2)).allowed  # the window is part of the counter's identity


@pytest.mark.parametrize("make_backend", ["redis"], indirect=True)
async def test_redis_counters_are_shared_between_relays(make_backend: Callable[[Clock], RateBackend]) -> None:
    clock = Clock()
    relay1, relay2 = make_backend(clock), make_backend(clock)
    rule = ("client_ip", "connections", 2, 60.0)
    check1 = RateLimitCheck(RateLimitConfig(enabled=True, rules=[RateRuleConfig(key=rule[0], counter=rule[1],
                                                                                 limit=rule[2], window=rule[3])]),
                            relay1)
    check2 = RateLimitCheck(check1.config, relay2)
    assert await check1.connect(CheckContext(client_ip="192.0.2.1")) is None
    assert await check2.connect(CheckContext(client_ip="192.0.2.1")) is None
    assert refused(await check1.connect(CheckContext(client_ip="192.0.2.1")), *CONN)
    assert refused(await check2.connect(CheckContext(client_ip="192.0.2.1")), *CONN)


async def test_redis_down_fails_open(caplog: pytest.LogCaptureFixture) -> None:
    pytest.importorskip("redis")
    with socket.socket() as s:  # a loopback port with nobody listening: connection refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = RedisRateBackend(f"redis://127.0.0.1:{port}/0", clock=Clock())
    try:
        with caplog.at_level(logging.WARNING, "mailhop.checks.ratelimit"):
            for _ in range(3):
                assert await backend.hit("k", 60, 1) == RateDecision(True)
            await backend.refund("k", 60)
    finally:
        await backend.aclose()
    assert caplog.text.count("redis unavailable") == 1  # warned once, not once per hit
