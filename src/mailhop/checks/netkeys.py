"""Client address -> the network that stands for "one client" in policy state (greylisting, rate limits).

One place for this rule so every check aggregates alike: an IPv6 client usually owns a whole /64 (SLAAC, privacy
addresses), so counting single IPv6 addresses would let it rotate through 2**64 identities; an IPv4 sender's
outbound pool commonly spans a /24, so greylisting keys by /24 (a retry from a sibling address still passes) while
rate limits key IPv4 by the single address (a /24 can be many unrelated customers). IPv4-mapped IPv6 addresses
(``::ffff:192.0.2.1``, what a dual-stack socket reports) are treated as the IPv4 address they carry.

Untrusted input: the client address string (from the socket, but parsed defensively: a zone suffix such as
``%eth0`` is dropped, and anything unparsable yields None rather than an exception).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

__all__ = [
    "GREYLIST_V4_PREFIX",
    "RATE_V4_PREFIX",
    "V6_PREFIX",
    "IPAddress",
    "IPNetwork",
    "client_ip",
    "in_networks",
    "network_key",
    "parse_networks",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

GREYLIST_V4_PREFIX = 24
RATE_V4_PREFIX = 32
V6_PREFIX = 64


def client_ip(text: str) -> IPAddress | None:
    """The client's address, IPv4-mapped IPv6 unwrapped; None when ``text`` is not an address."""
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0].strip("[]"))
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def network_key(text: str, v4_prefix: int = GREYLIST_V4_PREFIX, v6_prefix: int = V6_PREFIX) -> str | None:
    """The client's network in CIDR form ("192.0.2.0/24", "2001:db8:1:2::/64"); None for a non-address.

    Defaults are the greylisting key; rate limits pass ``v4_prefix=RATE_V4_PREFIX`` (see the module docstring).
    """
    ip = client_ip(text)
    if ip is None:
        return None
    prefix = v4_prefix if ip.version == 4 else v6_prefix
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))


def parse_networks(items: Iterable[str], setting: str) -> tuple[IPNetwork, ...]:
    """CIDR strings from the configuration; a ValueError naming ``setting`` for a bad one."""
    out: list[IPNetwork] = []
    for item in items:
        try:
            out.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"{setting}: {item!r} is not an address or network, e.g. \"192.0.2.0/24\"") from None
    return tuple(out)


def in_networks(ip: IPAddress, networks: Iterable[IPNetwork]) -> bool:
    """Whether ``ip`` lies in any of ``networks`` (an address family mismatch is simply no match)."""
    return any(ip.version == net.version and ip in net for net in networks)
