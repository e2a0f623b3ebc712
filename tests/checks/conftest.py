"""Fixtures for the check tests: anyio on asyncio, a loopback DNS server and mailhop's resolver pointed at it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from mailhop.dns import Resolver
from tests.support.dnsserver import TestDns


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def dns() -> Iterator[TestDns]:
    """An authoritative server for *.test names (add records with ``dns.add("name. 300 IN TXT ...")``)."""
    with TestDns(origins=("test",)) as server:
        yield server


@pytest.fixture
def resolver(dns: TestDns) -> Resolver:
    """The one resolver, asking only the loopback server (short timeouts keep fault tests quick)."""
    return Resolver([dns.nameserver], timeout=1.0, lifetime=2.0)


@pytest.fixture(scope="session")
def session_dns() -> Iterator[TestDns]:
    """One *.test server for the whole run: stopping a TestDns takes about a second (socketserver's poll), which
    adds up over many short tests. Use it through ``clean_dns``."""
    with TestDns(origins=("test",)) as server:
        yield server


@pytest.fixture
def clean_dns(session_dns: TestDns) -> TestDns:
    """The session server with an empty zone and no faults: ``dns`` without the start/stop cost."""
    zone = session_dns.zone
    zone.records.clear()
    zone.servfail.clear()
    zone.drop.clear()
    zone.truncate.clear()
    return session_dns


@pytest.fixture
def clean_resolver(clean_dns: TestDns) -> Resolver:
    """A fresh resolver (empty cache) asking ``clean_dns``."""
    return Resolver([clean_dns.nameserver], timeout=1.0, lifetime=2.0)
