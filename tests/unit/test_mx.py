"""MX planning through a real DNS server on loopback: RFC 5321 section 5 and RFC 7505 cases."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator

import pytest

from mailhop.delivery.mx import MxFailure, MxPlan, plan_mx
from mailhop.dns import Resolver
from tests.support.dnsserver import TestDns


@pytest.fixture(scope="module")
def dns_server() -> Iterator[TestDns]:
    with TestDns(origins=["mx.test"]) as s:
        s.add(
            "multi.mx.test. 60 IN MX 20 b.mx.test.",
            "multi.mx.test. 60 IN MX 10 a1.mx.test.",
            "multi.mx.test. 60 IN MX 10 a2.mx.test.",
            "a1.mx.test. 60 IN A 127.0.0.21",
            "a2.mx.test. 60 IN A 127.0.0.22",
            "b.mx.test. 60 IN A 127.0.0.23",
            "b.mx.test. 60 IN AAAA ::1",
            "implicit.mx.test. 60 IN A 127.0.0.24",
            "null.mx.test. 60 IN MX 0 .",
            "noaddr.mx.test. 60 IN MX 10 ghost.mx.test.",
            "ghost.mx.test. 60 IN TXT \"no address here\"",
            "partial.mx.test. 60 IN MX 10 broken.mx.test.",
            "partial.mx.test. 60 IN MX 20 a1.mx.test.",
            "selfish.mx.test. 60 IN MX 10 me.mx.test.",
            "selfish.mx.test. 60 IN MX 20 b.mx.test.",
            "backup.mx.test. 60 IN MX 5 a1.mx.test.",
            "backup.mx.test. 60 IN MX 10 me.mx.test.",
            "backup.mx.test. 60 IN MX 20 b.mx.test.",
            "me.mx.test. 60 IN A 127.0.0.99",
        )
        s.zone.servfail.update({"servfail.mx.test", "broken.mx.test"})
        yield s


def plan(server: TestDns, domain: str, seed: int = 0, local: tuple[tuple[str, int], ...] = ()) -> MxPlan | MxFailure:
    return asyncio.run(
        plan_mx(Resolver([server.nameserver]), domain, port=25, local_endpoints=local, rng=random.Random(seed))
    )


def test_preference_order_with_shuffle_among_equals(dns_server: TestDns) -> None:
    firsts = set()
    for seed in range(20):
        p = plan(dns_server, "multi.mx.test", seed)
        assert isinstance(p, MxPlan)
        names = [h.name for h in p.hosts]
        assert set(names[:2]) == {"a1.mx.test", "a2.mx.test"} and names[2] == "b.mx.test"
        firsts.add(names[0])
        assert p.hosts[2].addresses == ("::1", "127.0.0.23")
    assert firsts == {"a1.mx.test", "a2.mx.test"}


def test_implicit_mx(dns_server: TestDns) -> None:
    p = plan(dns_server, "implicit.mx.test")
    assert isinstance(p, MxPlan) and p.implicit and p.hosts[0].addresses == ("127.0.0.24",)


def test_null_mx_fails_5_1_10(dns_server: TestDns) -> None:
    p = plan(dns_server, "null.mx.test")
    assert isinstance(p, MxFailure) and (p.reply.code, p.reply.enhanced) == (556, "5.1.10")


def test_nxdomain_fails_5_1_2(dns_server: TestDns) -> None:
    p = plan(dns_server, "nothere.mx.test")
    assert isinstance(p, MxFailure) and p.reply.enhanced == "5.1.2" and p.reply.is_permanent


def test_servfail_defers(dns_server: TestDns) -> None:
    p = plan(dns_server, "servfail.mx.test")
    assert isinstance(p, MxFailure) and p.reply.is_transient


def test_mx_host_without_address_defers(dns_server: TestDns) -> None:
    p = plan(dns_server, "noaddr.mx.test")
    assert isinstance(p, MxFailure) and p.reply.is_transient and p.reply.enhanced == "4.4.4"


def test_failed_mx_name_keeps_healthy_ones(dns_server: TestDns) -> None:
    p = plan(dns_server, "partial.mx.test")
    assert isinstance(p, MxPlan) and [h.name for h in p.hosts] == ["a1.mx.test"]


def test_best_mx_is_ourselves_is_a_loop(dns_server: TestDns) -> None:
    p = plan(dns_server, "selfish.mx.test", local=(("127.0.0.99", 25),))
    assert isinstance(p, MxFailure) and (p.reply.code, p.reply.enhanced) == (554, "5.4.6")


def test_backup_mx_drops_hosts_not_better_than_us(dns_server: TestDns) -> None:
    p = plan(dns_server, "backup.mx.test", local=(("127.0.0.99", 25),))
    assert isinstance(p, MxPlan) and [h.name for h in p.hosts] == ["a1.mx.test"]


def test_same_address_other_port_is_not_us(dns_server: TestDns) -> None:
    p = plan(dns_server, "selfish.mx.test", local=(("127.0.0.99", 2525),))
    assert isinstance(p, MxPlan) and p.hosts[0].name == "me.mx.test"


def test_address_literal(dns_server: TestDns) -> None:
    p = plan(dns_server, "[127.0.0.5]")
    assert isinstance(p, MxPlan) and p.hosts[0].addresses == ("127.0.0.5",)
