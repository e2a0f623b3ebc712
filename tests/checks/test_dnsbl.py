"""DNSBL/DNSWL scoring through real DNS (the loopback TestDns serving the list zones under .test)."""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterator

import pytest

from mailhop.checks.api import Action, CheckContext, Phase, Verdict
from mailhop.checks.chain import PolicyChain
from mailhop.checks.dnsbl import DnsblCheck, DnsblResult, query_name
from mailhop.config.checks import DnsblConfig, DnsblZoneConfig
from mailhop.dns import Resolver
from tests.support.dnsserver import TestDns

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def dns_server() -> Iterator[TestDns]:
    # One server for the module: stopping a TestDns costs about a second (socketserver's shutdown poll).
    with TestDns(origins=("test",)) as server:
        yield server


@pytest.fixture
def dns(dns_server: TestDns) -> TestDns:
    """The module's server, emptied for this test (shadows conftest's per-test server)."""
    zone = dns_server.zone
    for table in (zone.records, zone.servfail, zone.drop, zone.truncate):
        table.clear()
    return dns_server

CLIENT = "192.0.2.99"
REVERSED = "99.2.0.192"


class CountingResolver(Resolver):
    """The real resolver, counting the lookups the check asks for (to prove the check's own cache answers)."""

    def __init__(self, nameserver: str) -> None:
        super().__init__([nameserver], timeout=1.0, lifetime=2.0)
        self.asked: list[str] = []

    async def records(self, name: str, rdtype: str) -> list[str]:
        self.asked.append(name)
        return await super().records(name, rdtype)


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def config(*zones: tuple[str, float] | DnsblZoneConfig, threshold: float = 1.0, cache_ttl: float = 300.0
           ) -> DnsblConfig:
    items = [z if isinstance(z, DnsblZoneConfig) else DnsblZoneConfig(zone=z[0], weight=z[1]) for z in zones]
    return DnsblConfig(enabled=True, threshold=threshold, zones=items, cache_ttl=cache_ttl)


async def connect(check: DnsblCheck, ip: str = CLIENT, trusted: bool = False) -> tuple[Verdict | None, CheckContext]:
    ctx = CheckContext(client_ip=ip, trusted=trusted)
    return await check.connect(ctx), ctx


def result(ctx: CheckContext) -> DnsblResult:
    value = ctx.session["dnsbl"]
    assert isinstance(value, DnsblResult)
    return value


async def test_listed_in_one_zone_at_threshold_is_refused(dns: TestDns, resolver: Resolver) -> None:
    dns.add(f"{REVERSED}.bl1.test. 300 IN A 127.0.0.2")
    verdict, ctx = await connect(DnsblCheck(config(("bl1.test", 1.0)), resolver))
    assert verdict is not None and verdict.action is Action.REJECT and verdict.reply is not None
    assert (verdict.reply.code, verdict.reply.enhanced) == (554, "5.7.1")
    assert verdict.reply.text == f"Service unavailable; client [{CLIENT}] blocked using bl1.test"
    assert result(ctx).score == 1.0 and result(ctx).zones == ("bl1.test",)
    assert result(ctx).listings[0].answers == ("127.0.0.2",)


async def test_listed_below_threshold_passes_with_score(dns: TestDns, resolver: Resolver) -> None:
    dns.add(f"{REVERSED}.bl1.test. 300 IN A 127.0.0.2")
    verdict, ctx = await connect(DnsblCheck(config(("bl1.test", 0.5)), resolver))
    assert verdict is None
    assert result(ctx).score == 0.5 and result(ctx).zones == ("bl1.test",) and not result(ctx).blocked


async def test_unlisted_client_scores_zero(dns: TestDns, resolver: Resolver) -> None:
    verdict, ctx = await connect(DnsblCheck(config(("bl1.test", 1.0)), resolver))
    assert verdict is None and result(ctx) == DnsblResult(score=0.0)


async def test_two_zones_sum_over_threshold(dns: TestDns, resolver: Resolver) -> None:
    dns.add(f"{REVERSED}.bl1.test. 300 IN A 127.0.0.2", f"{REVERSED}.bl2.test. 300 IN A 127.0.0.4")
    check = DnsblCheck(config(("bl1.test", 0.6), ("bl2.test", 0.6), ("bl3.test", 5.0)), resolver)
    verdict, ctx = await connect(check)
    assert verdict is not None and verdict.reply is not None
    assert verdict.reply.text.endswith("blocked using bl1.test, bl2.test")
    assert result(ctx).score == pytest.approx(1.2) and result(ctx).zones == ("bl1.test", "bl2.test")


async def test_allow_list_offsets_a_listing(dns: TestDns, resolver: Resolver) -> None:
    dns.add(f"{REVERSED}.bl1.test. 300 IN A 127.0.0.2", f"{REVERSED}.wl.test. 300 IN A 127.0.10.3")
    verdict, ctx = await connect(DnsblCheck(config(("bl1.test", 1.0), ("wl.test", -1.0)), resolver))
    assert verdict is None
    assert result(ctx).score == 0.0 and set(result(ctx).zones) == {"bl1.test", "wl.test"}


async def test_allow_list_alone_never_refuses_even_at_threshold_zero(dns: TestDns, resolver: Resolver) -> None:
    dns.add(f"{REVERSED}.wl.test. 300 IN A 127.0.10.3")
    check = DnsblCheck(config(("bl1.test", 1.0), ("wl.test", -1.0), threshold=-5.0), resolver)
    verdict, ctx = await connect(check)
    assert verdict is None and result(ctx).score == -1.0
    verdict, _ = await connect(check, "192.0.2.7")  # listed nowhere: score 0 >= -5 must not refuse either
    assert verdict is None


async def test_answers_filter(dns: TestDns, resolver: Resolver) -> None:
    dns.add("1.2.0.192.bl1.test. 300 IN A 127.0.0.2",
            "2.2.0.192.bl1.test. 300 IN A 127.0.0.10",
            "3.2.0.192.bl1.test. 300 IN A 127.0.1.77",
            "4.2.0.192.bl1.test. 300 IN A 127.0.0.10", "4.2.0.192.bl1.test. 300 IN A 127.0.0.2")
    zone = DnsblZoneConfig(zone="bl1.test", weight=1.0, answers=["127.0.0.2", "127.0.1.0/24"])
    check = DnsblCheck(config(zone), resolver)
    verdict, ctx = await connect(check, "192.0.2.1")
    assert verdict is not None and result(ctx).listings[0].answers == ("127.0.0.2",)
    verdict, ctx = await connect(check, "192.0.2.2")
    assert verdict is None and result(ctx).zones == ()
    verdict, ctx = await connect(check, "192.0.2.3")
    assert verdict is not None and result(ctx).listings[0].answers == ("127.0.1.77",)
    verdict, ctx = await connect(check, "192.0.2.4")
    assert verdict is not None and result(ctx).listings[0].answers == ("127.0.0.2",)


async def test_answer_outside_127_is_ignored_and_logged(dns: TestDns, resolver: Resolver,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    dns.add(f"{REVERSED}.broken.test. 300 IN A 10.0.0.2")
    with caplog.at_level(logging.WARNING, "mailhop.checks.dnsbl"):
        verdict, ctx = await connect(DnsblCheck(config(("broken.test", 1.0)), resolver))
    assert verdict is None and result(ctx).score == 0.0
    assert "outside 127.0.0.0/8" in caplog.text and "broken.test" in caplog.text


async def test_error_code_answers_ignored_unless_asked_for(dns: TestDns, resolver: Resolver) -> None:
    dns.add(f"{REVERSED}.bl1.test. 300 IN A 127.255.255.254")
    verdict, ctx = await connect(DnsblCheck(config(("bl1.test", 1.0)), resolver))
    assert verdict is None and result(ctx).score == 0.0
    zone = DnsblZoneConfig(zone="bl1.test", weight=1.0, answers=["127.255.255.254"])
    verdict, _ = await connect(DnsblCheck(config(zone), resolver))
    assert verdict is not None


def test_query_names_follow_rfc_5782() -> None:
    assert query_name(ipaddress.ip_address("192.0.2.99"), "bl.test") == "99.2.0.192.bl.test"
    # RFC 5782 section 2.4's example address.
    v6 = ipaddress.ip_address("2001:db8:1:2:3:4:567:89ab")
    assert query_name(v6, "ugly.example.com") == (
        "b.a.9.8.7.6.5.0.4.0.0.0.3.0.0.0.2.0.0.0.1.0.0.0.8.b.d.0.1.0.0.2.ugly.example.com")


async def test_ipv6_client_is_queried_by_nibbles(dns: TestDns) -> None:
    counting = CountingResolver(dns.nameserver)
    nibbles = "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2"
    dns.add(f"{nibbles}.bl1.test. 300 IN A 127.0.0.2")
    verdict, _ = await connect(DnsblCheck(config(("bl1.test", 1.0)), counting), "2001:db8::1")
    assert counting.asked == [f"{nibbles}.bl1.test"]
    assert verdict is not None and verdict.reply is not None and "client [2001:db8::1]" in verdict.reply.text


async def test_ipv4_mapped_client_is_queried_as_ipv4(dns: TestDns, resolver: Resolver) -> None:
    dns.add(f"{REVERSED}.bl1.test. 300 IN A 127.0.0.2")
    verdict, _ = await connect(DnsblCheck(config(("bl1.test", 1.0)), resolver), f"::ffff:{CLIENT}")
    assert verdict is not None


async def test_servfail_zone_counts_as_not_listed_and_is_not_cached(dns: TestDns,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    counting = CountingResolver(dns.nameserver)
    dns.add(f"{REVERSED}.bl2.test. 300 IN A 127.0.0.2")
    dns.zone.servfail.add(f"{REVERSED}.down.test")
    check = DnsblCheck(config(("down.test", 5.0), ("bl2.test", 0.5)), counting)
    with caplog.at_level(logging.WARNING, "mailhop.checks.dnsbl"):
        verdict, ctx = await connect(check)
    assert verdict is None
    assert result(ctx).score == 0.5 and result(ctx).zones == ("bl2.test",) and not result(ctx).complete
    assert "down.test unavailable" in caplog.text
    # Not cached: once the list is back, the next connection sees the listing.
    dns.zone.servfail.clear()
    dns.add(f"{REVERSED}.down.test. 300 IN A 127.0.0.2")
    verdict, ctx = await connect(check)
    assert verdict is not None and result(ctx).complete and result(ctx).score == 5.5
    assert counting.asked.count(f"{REVERSED}.down.test") == 2


async def test_score_is_cached_per_client_for_cache_ttl(dns: TestDns) -> None:
    counting = CountingResolver(dns.nameserver)
    clock = Clock()
    dns.add(f"{REVERSED}.bl1.test. 300 IN A 127.0.0.2")
    check = DnsblCheck(config(("bl1.test", 1.0), ("bl2.test", 1.0), cache_ttl=60), counting, clock=clock)
    first, _ = await connect(check)
    assert len(counting.asked) == 2
    clock.t += 59
    second, ctx = await connect(check)
    assert len(counting.asked) == 2, "the second connection within cache_ttl must not ask DNS"
    assert first == second and result(ctx).score == 1.0
    clock.t += 2
    await connect(check)
    assert len(counting.asked) == 4


async def test_cache_is_bounded(dns: TestDns) -> None:
    counting = CountingResolver(dns.nameserver)
    check = DnsblCheck(config(("bl1.test", 1.0)), counting, cache_size=2)
    for ip in ("192.0.2.1", "192.0.2.2", "192.0.2.3", "192.0.2.3", "192.0.2.2"):
        await connect(check, ip)
    assert len(counting.asked) == 3  # .3 and .2 were still cached
    await connect(check, "192.0.2.1")  # the oldest, evicted
    assert len(counting.asked) == 4


async def test_trusted_client_is_not_checked(dns: TestDns) -> None:
    counting = CountingResolver(dns.nameserver)
    dns.add(f"{REVERSED}.bl1.test. 300 IN A 127.0.0.2")
    verdict, ctx = await connect(DnsblCheck(config(("bl1.test", 1.0)), counting), trusted=True)
    assert verdict is None and "dnsbl" not in ctx.session and counting.asked == []


async def test_runs_in_the_chain_at_connect(dns: TestDns, resolver: Resolver) -> None:
    dns.add(f"{REVERSED}.bl1.test. 300 IN A 127.0.0.2")
    chain = PolicyChain([DnsblCheck(config(("bl1.test", 1.0)), resolver)])
    assert chain.has(Phase.CONNECT) and not chain.has(Phase.RCPT)
    ctx = CheckContext(client_ip=CLIENT)
    verdict = await chain.run(Phase.CONNECT, ctx)
    assert verdict.action is Action.REJECT and verdict.reply is not None and verdict.reply.code == 554
