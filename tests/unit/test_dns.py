"""mailhop.dns against a real DNS server on loopback (dnslib): answers, NXDOMAIN, SERVFAIL, timeouts, TCP fallback."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import pytest

from mailhop.dns import DnsPermanentError, DnsTemporaryError, MxRecord, Resolver
from tests.support.dnsserver import TestDns


@pytest.fixture(scope="module")
def dns_server() -> Iterator[TestDns]:
    with TestDns(origins=["example.test", "fail.test"]) as server:
        server.add(
            "example.test. 300 IN MX 10 mx1.example.test.",
            "example.test. 300 IN MX 20 mx2.example.test.",
            "mx1.example.test. 300 IN A 127.0.0.11",
            "mx1.example.test. 300 IN AAAA ::1",
            "nomx.example.test. 300 IN A 127.0.0.12",
            "null.example.test. 300 IN MX 0 .",
            "big.example.test. 300 IN A 127.0.0.13",
        )
        server.zone.servfail.add("broken.fail.test")
        server.zone.drop.add("slow.fail.test")
        server.zone.truncate.add("big.example.test")
        yield server


T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def test_mx_records(dns_server: TestDns) -> None:
    r = Resolver([dns_server.nameserver])
    got = run(r.mx("example.test"))
    assert sorted(got, key=lambda m: m.preference) == [MxRecord(10, "mx1.example.test"), MxRecord(20, "mx2.example.test")]


def test_null_mx(dns_server: TestDns) -> None:
    assert run(Resolver([dns_server.nameserver]).mx("null.example.test")) == [MxRecord(0, "")]


def test_no_mx_is_empty_not_error(dns_server: TestDns) -> None:
    assert run(Resolver([dns_server.nameserver]).mx("nomx.example.test")) == []


def test_addresses_v6_then_v4(dns_server: TestDns) -> None:
    assert run(Resolver([dns_server.nameserver]).addresses("mx1.example.test")) == ["::1", "127.0.0.11"]


def test_nxdomain_is_permanent(dns_server: TestDns) -> None:
    with pytest.raises(DnsPermanentError):
        run(Resolver([dns_server.nameserver]).mx("missing.example.test"))


def test_servfail_is_temporary(dns_server: TestDns) -> None:
    with pytest.raises(DnsTemporaryError):
        run(Resolver([dns_server.nameserver]).mx("broken.fail.test"))


def test_timeout_is_temporary(dns_server: TestDns) -> None:
    with pytest.raises(DnsTemporaryError):
        run(Resolver([dns_server.nameserver], timeout=0.3, lifetime=0.6).mx("slow.fail.test"))


def test_truncated_answer_retried_over_tcp(dns_server: TestDns) -> None:
    assert run(Resolver([dns_server.nameserver]).addresses("big.example.test")) == ["127.0.0.13"]
