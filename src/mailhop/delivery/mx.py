"""Where to deliver a domain's mail: MX resolution per RFC 5321 section 5 and RFC 7505 (null MX).

Untrusted input: DNS answers (bounded by mailhop.dns). The outcome is a plan of hosts to try in order, or a
classified failure: permanent ones fail the recipient at once (no such domain, null MX), temporary ones defer.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Collection
from dataclasses import dataclass

from ..dns import DnsPermanentError, DnsTemporaryError, Resolver
from ..reply import Reply

__all__ = ["MxFailure", "MxHost", "MxPlan", "plan_mx"]


@dataclass(frozen=True, slots=True)
class MxHost:
    preference: int
    name: str
    addresses: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class MxPlan:
    """Hosts in the order to try them; each host's addresses in the order to try them (IPv6 first)."""

    domain: str
    hosts: tuple[MxHost, ...]
    implicit: bool = False


@dataclass(frozen=True, slots=True)
class MxFailure:
    """No host to try. ``reply.is_permanent`` decides between failing and deferring the recipients."""

    domain: str
    reply: Reply


def _order(records: list[tuple[int, str]], rng: random.Random) -> list[tuple[int, str]]:
    """Preference order; random among equal preference (RFC 5321 5.1) to spread load."""
    shuffled = list(records)
    rng.shuffle(shuffled)
    return sorted(shuffled, key=lambda r: r[0])


async def plan_mx(
    resolver: Resolver,
    domain: str,
    *,
    port: int,
    local_endpoints: Collection[tuple[str, int]] = (),
    rng: random.Random | None = None,
) -> MxPlan | MxFailure:
    """Resolve ``domain`` (canonical A-label form, or an ``[address literal]``) into a delivery plan."""
    rng = rng or random.Random()
    if domain.startswith("["):
        literal = domain[1:-1].removeprefix("IPv6:")
        return _check_loop(MxPlan(domain, (MxHost(0, literal, (str(ipaddress.ip_address(literal)),)),)),
                           port, local_endpoints)
    try:
        records = await resolver.mx(domain)
    except DnsPermanentError:
        return MxFailure(domain, Reply(550, "5.1.2", f"Domain {domain} does not exist"))
    except DnsTemporaryError:
        return MxFailure(domain, Reply(451, "4.4.3", f"Temporary DNS failure looking up MX for {domain}"))
    if any(r.host == "" for r in records):
        # RFC 7505: a null MX says the domain accepts no mail; a null MX mixed with others is an error too.
        return MxFailure(domain, Reply(556, "5.1.10", f"Domain {domain} does not accept mail (null MX)"))
    implicit = not records
    pairs = [(0, domain)] if implicit else _order([(r.preference, r.host) for r in records], rng)
    hosts: list[MxHost] = []
    temporary = False
    for preference, name in pairs:
        try:
            addresses = await resolver.addresses(name)
        except DnsTemporaryError:
            temporary = True
            continue
        except DnsPermanentError:
            if implicit:
                return MxFailure(domain, Reply(550, "5.1.2", f"Domain {domain} does not exist"))
            continue
        if addresses:
            hosts.append(MxHost(preference, name, tuple(addresses)))
    if not hosts:
        if implicit and not temporary:
            return MxFailure(domain, Reply(550, "5.1.2", f"Domain {domain} has no MX and no address"))
        # A domain whose MX hosts have no address is usually a DNS problem in progress: defer, don't bounce.
        return MxFailure(domain, Reply(451, "4.4.4", f"No address for any MX host of {domain}"))
    return _check_loop(MxPlan(domain, tuple(hosts), implicit), port, local_endpoints)


def _is_local(address: str, port: int, local: Collection[tuple[str, int]]) -> bool:
    for host, lport in local:
        if lport != port:
            continue
        if host == address or (host in ("0.0.0.0", "::") and _same_family(host, address)):
            return True
    return False


def _same_family(a: str, b: str) -> bool:
    return (":" in a) == (":" in b)


def _check_loop(plan: MxPlan, port: int, local: Collection[tuple[str, int]]) -> MxPlan | MxFailure:
    """RFC 5321 5.1: drop hosts at or below our own preference; if we are the best MX, that is a mail loop."""
    if not local:
        return plan
    ours = [h.preference for h in plan.hosts if any(_is_local(a, port, local) for a in h.addresses)]
    if not ours:
        return plan
    cutoff = min(ours)
    kept = tuple(h for h in plan.hosts if h.preference < cutoff)
    if not kept:
        return MxFailure(plan.domain, Reply(554, "5.4.6", f"Mail for {plan.domain} loops back to myself"))
    return MxPlan(plan.domain, kept, plan.implicit)
