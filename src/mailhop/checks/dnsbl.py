"""DNS block and allow lists at connect, scored the way Postfix postscreen scores ``postscreen_dnsbl_sites``.

For the client address every configured zone is asked, concurrently, for the A records of the reversed address
under the zone (RFC 5782 2.1: ``4.3.2.1.zone`` for 1.2.3.4; IPv6 as 32 reversed nibbles, RFC 5782 2.4). A zone
lists the client when it answers an address in 127.0.0.0/8 and, when the zone has ``answers``, one of those
addresses or networks. The weights of the listing zones are summed (allow lists carry negative weights, so a
DNSWL listing offsets a DNSBL one); a total at or above ``threshold`` refuses the client with 554 5.7.1. The
session enforces a connect-phase refusal at MAIL for unauthenticated clients (postscreen's "enforce"), so a
listed user can still authenticate and submit.

Failure policy: a list that is down (SERVFAIL, timeout) counts as "not listed" and is logged; a client is never
refused or delayed because a list is unavailable. An answer outside 127.0.0.0/8 means the list is broken (or the
zone has lapsed and a wildcard now answers everything), so it is ignored and logged. Without ``answers``, the
127.255.255.0/24 answers are ignored too: Spamhaus and others use them for error codes ("query refused: you ask
through a public resolver"), and counting them would block every client the day a list starts refusing us; an
operator who lists them in ``answers`` gets what they asked for.

Results are cached per client address for ``cache_ttl`` seconds in a bounded LRU table, except results that miss
a zone because of a DNS error: those are asked again on the next connection.

Untrusted input: the client address (parsed; an unparsable one is skipped) and the DNS answers (parsed as IPv4
addresses; anything else is ignored). Sets ``ctx.session["dnsbl"]`` to a ``DnsblResult``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from ..config.checks import DnsblConfig
from ..dns import DnsPermanentError, DnsTemporaryError, Resolver
from .api import Check, CheckContext, Verdict, reject
from .netkeys import IPAddress, IPNetwork, client_ip

__all__ = ["DnsblCheck", "DnsblListing", "DnsblResult", "query_name"]

log = logging.getLogger("mailhop.checks.dnsbl")

_LISTED = ipaddress.IPv4Network("127.0.0.0/8")
_ERROR_CODES = ipaddress.IPv4Network("127.255.255.0/24")


@dataclass(frozen=True, slots=True)
class DnsblListing:
    """One zone that lists the client."""

    zone: str
    weight: float
    answers: tuple[str, ...]  # the answers that counted, e.g. ("127.0.0.2",)


@dataclass(frozen=True, slots=True)
class DnsblResult:
    """The client's score: ``ctx.session["dnsbl"]``."""

    score: float
    listings: tuple[DnsblListing, ...] = ()
    complete: bool = True  # False when some zone could not be asked (DNS error): counted as not listed
    blocked: bool = False  # score >= threshold with at least one block list (positive weight) listing the client

    @property
    def zones(self) -> tuple[str, ...]:
        """The zones that list the client (allow lists included)."""
        return tuple(item.zone for item in self.listings)


@dataclass(frozen=True, slots=True)
class _Zone:
    name: str
    weight: float
    answers: tuple[IPNetwork, ...]


def query_name(ip: IPAddress, zone: str) -> str:
    """The name to look up: reversed octets (IPv4) or reversed nibbles (IPv6) under ``zone`` (RFC 5782 2.1, 2.4)."""
    if ip.version == 4:
        return ".".join(reversed(str(ip).split("."))) + "." + zone
    return ".".join(reversed(ip.exploded.replace(":", ""))) + "." + zone


class DnsblCheck(Check):
    """Scores the client against DNS lists at connect; refuses (554 5.7.1) at or above the threshold."""

    name = "dnsbl"

    def __init__(
        self,
        config: DnsblConfig,
        resolver: Resolver,
        *,
        clock: Callable[[], float] = time.monotonic,
        cache_size: int = 10_000,
    ) -> None:
        self.config = config
        self.resolver = resolver
        self.clock = clock
        self.cache_size = cache_size
        self._zones = tuple(
            _Zone(z.zone.strip().rstrip(".").lower(), z.weight,
                  tuple(ipaddress.ip_network(a, strict=False) for a in z.answers))
            for z in config.zones
        )
        self._cache: OrderedDict[str, tuple[float, DnsblResult]] = OrderedDict()

    async def connect(self, ctx: CheckContext) -> Verdict | None:
        if ctx.trusted or not self._zones:
            return None
        ip = client_ip(ctx.client_ip)
        if ip is None:
            log.warning("dnsbl: client address %r is not an IP address; not checked", ctx.client_ip[:64])
            return None
        result = await self.score(ip)
        ctx.session["dnsbl"] = result
        if not result.blocked:
            return None
        blockers = ", ".join(item.zone for item in result.listings if item.weight > 0)
        detail = "; ".join(f"{item.zone}={','.join(item.answers)} ({item.weight:+g})" for item in result.listings)
        return reject(f"Service unavailable; client [{ip}] blocked using {blockers}", code=554, enhanced="5.7.1",
                      reason=f"dnsbl score {result.score:g} >= {self.config.threshold:g}: {detail}")

    async def score(self, ip: IPAddress) -> DnsblResult:
        """The client's result, from the cache or by asking every zone at once."""
        key = str(ip)
        now = self.clock()
        hit = self._cache.get(key)
        if hit is not None:
            if hit[0] > now:
                self._cache.move_to_end(key)
                return hit[1]
            del self._cache[key]
        outcomes = await asyncio.gather(*(self._ask(zone, ip) for zone in self._zones))
        listings = tuple(
            DnsblListing(zone.name, zone.weight, answers)
            for zone, (answers, _) in zip(self._zones, outcomes, strict=True)
            if answers
        )
        total = sum(item.weight for item in listings)
        result = DnsblResult(
            score=total,
            listings=listings,
            complete=all(ok for _, ok in outcomes),
            # An unlisted client is never refused, whatever the threshold (a threshold <= 0 would otherwise
            # block everyone); an allow-list hit alone never refuses either.
            blocked=total >= self.config.threshold and any(item.weight > 0 for item in listings),
        )
        if result.complete and self.config.cache_ttl > 0:
            self._cache[key] = (now + self.config.cache_ttl, result)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return result

    async def _ask(self, zone: _Zone, ip: IPAddress) -> tuple[tuple[str, ...], bool]:
        """(the answers that count, whether the zone answered at all)."""
        name = query_name(ip, zone.name)
        try:
            records = await self.resolver.records(name, "A")
        except DnsPermanentError:  # NXDOMAIN: the normal "not listed"
            return (), True
        except DnsTemporaryError as exc:
            log.warning("dnsbl: %s unavailable (%s); client %s counted as not listed there", zone.name, exc, ip)
            return (), False
        counted: list[str] = []
        for text in records:
            try:
                answer = ipaddress.IPv4Address(text)
            except ValueError:
                log.warning("dnsbl: %s answered %r for %s: not an address; ignored", zone.name, text[:64], ip)
                continue
            if answer not in _LISTED:
                log.warning("dnsbl: %s answered %s for %s, outside 127.0.0.0/8 (RFC 5782 2.1): the list is broken "
                            "or gone; ignored", zone.name, answer, ip)
            elif zone.answers:
                if any(answer in net for net in zone.answers):
                    counted.append(str(answer))
            elif answer in _ERROR_CODES:
                log.warning("dnsbl: %s answered %s for %s: an error code, not a listing (is the list refusing our "
                            "resolver?); ignored", zone.name, answer, ip)
            else:
                counted.append(str(answer))
        return tuple(counted), True
