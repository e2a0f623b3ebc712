"""The one DNS resolver every part of mailhop uses (dnspython's async resolver).

Untrusted input: DNS answers. Timeouts and retries are bounded; answers are classified into three outcomes the
callers can act on without knowing DNS: an answer (possibly empty), a permanent failure (NXDOMAIN: the name does
not exist) and a temporary failure (SERVFAIL, timeouts, refused, malformed answers: try later). Nameservers are
configurable (``[dns] nameservers = ["127.0.0.1:5353"]``) so tests resolve through a loopback server they start;
an empty list means the system resolver configuration.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.rdatatype
import dns.resolver

__all__ = ["DnsPermanentError", "DnsTemporaryError", "MxRecord", "Resolver", "split_nameserver"]


NEGATIVE_TTL = 60.0  # seconds an NXDOMAIN answer is remembered
_NXDOMAIN: list[str] = []  # the cache's marker for a name that does not exist (compared by identity)


class DnsTemporaryError(Exception):
    """SERVFAIL, timeout or another failure a later retry may cure."""


class DnsPermanentError(Exception):
    """The name does not exist (NXDOMAIN)."""


@dataclass(frozen=True, slots=True)
class MxRecord:
    preference: int
    host: str  # lowercase, no trailing dot; "" for the null MX target "."


def split_nameserver(text: str) -> tuple[str, int]:
    """ "IP", "IP:PORT" or "[V6]:PORT" -> (address, port); the port defaults to 53. Does not validate the IP."""
    host, sep, port = text.rpartition(":")
    if sep and port.isdigit() and (host.startswith("[") or host.count(":") == 0):
        return host.strip("[]"), int(port)
    return text.strip("[]"), 53


class Resolver:
    """Async lookups with a bounded, TTL-respecting cache."""

    def __init__(
        self,
        nameservers: Sequence[str] = (),
        *,
        timeout: float = 5.0,
        lifetime: float = 10.0,
        cache_size: int = 10000,
    ) -> None:
        if nameservers:
            self._resolver = dns.asyncresolver.Resolver(configure=False)
            self._resolver.nameservers = [
                dns.nameserver.Do53Nameserver(host, port) for host, port in map(split_nameserver, nameservers)
            ]
        else:
            self._resolver = dns.asyncresolver.Resolver()
        self._resolver.timeout = timeout
        self._resolver.lifetime = lifetime
        self._cache: OrderedDict[tuple[str, str], tuple[float, list[str]]] = OrderedDict()
        self._cache_size = cache_size

    async def _query(self, name: str, rdtype: str) -> list[str]:
        """Text form of each record; [] for NODATA; raises DnsPermanentError / DnsTemporaryError."""
        key = (name.lower(), rdtype)
        hit = self._cache.get(key)
        now = time.monotonic()
        if hit is not None and hit[0] > now and hit[1] is not _NXDOMAIN:
            self._cache.move_to_end(key)
            return hit[1]
        if hit is not None and hit[0] > now and hit[1] is _NXDOMAIN:
            raise DnsPermanentError(f"{name}: no such domain")
        try:
            answer = await self._resolver.resolve(name, rdtype, search=False, raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN:
            # Negative answers are cached too (RFC 2308), briefly: a spammer's random HELO names and missing
            # DKIM keys would otherwise cost a query per message.
            self._store(key, now + NEGATIVE_TTL, _NXDOMAIN)
            raise DnsPermanentError(f"{name}: no such domain") from None
        except dns.resolver.NoNameservers as exc:
            raise DnsTemporaryError(f"{name} {rdtype}: servers failed ({exc})") from None
        except (dns.exception.Timeout, dns.resolver.LifetimeTimeout):
            raise DnsTemporaryError(f"{name} {rdtype}: timeout") from None
        except dns.exception.DNSException as exc:
            raise DnsTemporaryError(f"{name} {rdtype}: {exc.__class__.__name__}") from None
        if answer.rrset is None:
            records: list[str] = []
        elif rdtype == "TXT":  # joined raw strings: to_text() would quote and escape them
            records = [b"".join(rr.strings).decode("latin-1") for rr in answer.rrset]
        else:
            records = [rr.to_text() for rr in answer.rrset]
        ttl = answer.rrset.ttl if answer.rrset is not None else 60
        self._store(key, now + min(max(ttl, 0), 3600), records)
        return records

    def _store(self, key: tuple[str, str], expires: float, records: list[str]) -> None:
        self._cache[key] = (expires, records)
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    async def records(self, name: str, rdtype: str) -> list[str]:
        """Any record type in presentation form (cached); [] for NODATA. For checks that need e.g. PTR."""
        return await self._query(name, rdtype)

    async def txt(self, name: str) -> list[bytes]:
        """TXT records, each record's character-strings joined (RFC 7208 3.3, RFC 6376 3.6.2.2); [] for NODATA."""
        return [rec.encode("latin-1") for rec in await self._query(name, "TXT")]

    async def mx(self, domain: str) -> list[MxRecord]:
        """MX records of a domain, unsorted; [] when it has none."""
        out = []
        for text in await self._query(domain, "MX"):
            pref, _, host = text.partition(" ")
            out.append(MxRecord(int(pref), host.rstrip(".").lower()))
        return out

    async def addresses(self, host: str) -> list[str]:
        """IPv6 and IPv4 addresses of a host ([] when it has none). NXDOMAIN raises DnsPermanentError."""
        v6: list[str] = []
        v4: list[str] = []
        errors: list[Exception] = []
        for rdtype, bucket in (("AAAA", v6), ("A", v4)):
            try:
                bucket.extend(await self._query(host, rdtype))
            except DnsTemporaryError as exc:
                errors.append(exc)
        if not v6 and not v4 and errors:
            raise DnsTemporaryError(str(errors[0]))
        return v6 + v4
