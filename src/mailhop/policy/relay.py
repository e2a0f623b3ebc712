"""Relay control: the open-relay guarantee lives here and only here.

Untrusted input: the client address and every RCPT TO mailbox. A recipient is accepted only if
  1. the client is in ``trusted_networks``, or
  2. the client authenticated (submission listeners; a later issue), or
  3. the recipient's domain is one we serve, and its local part carries no routing syntax.

Routing tricks are refused outright for untrusted clients rather than interpreted, because some next hop might
interpret them: ``user%other@served`` (the percent hack), ``other!user@served`` (UUCP bang paths) and
``"user@other"@served`` (a quoted @) all name another domain inside a served one. A source route
(``@a,@b:user@dom``) is ignored as RFC 5321 4.1.2/C.1 require, so only its final mailbox counts. Domains are
compared in one canonical form (lowercase A-labels after UTS #46 mapping); an address literal is never a served
domain; a trailing dot is refused by the parser. Every refusal is ``554 5.7.1 Relay access denied``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from ..address import Mailbox, canonical_domain
from ..reply import R, Reply

__all__ = ["RelayPolicy"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_ROUTING_CHARS = frozenset("%!@")
_TRUSTED_CACHE_MAX = 4096  # client addresses remembered by is_trusted; cleared whole when full


class RelayPolicy:
    """Decides, per recipient, whether this client may send to it."""

    def __init__(self, trusted_networks: Iterable[str], domains: Iterable[str]) -> None:
        self._v4: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        self._v6: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for text in trusted_networks:
            net = ipaddress.ip_network(text, strict=True)
            (self._v4 if net.version == 4 else self._v6).append(net)
        self._domains = frozenset(canonical_domain(d) for d in domains)
        self._trusted_cache: dict[str, bool] = {}

    def is_trusted(self, client_ip: str) -> bool:
        """True when the client address lies in a trusted network (IPv4-mapped IPv6 counts as IPv4)."""
        # Asked once per connection, and a busy relay sees the same few clients over and over: parsing the
        # address and walking the networks each time was ~2 % of the event loop under load.
        cached = self._trusted_cache.get(client_ip)
        if cached is None:
            if len(self._trusted_cache) >= _TRUSTED_CACHE_MAX:
                self._trusted_cache.clear()
            cached = self._trusted_cache[client_ip] = self._is_trusted(client_ip)
        return cached

    def _is_trusted(self, client_ip: str) -> bool:
        try:
            addr: IPAddress = ipaddress.ip_address(client_ip.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        nets = self._v4 if addr.version == 4 else self._v6
        return any(addr in net for net in nets)

    def is_served(self, mailbox: Mailbox) -> bool:
        """True when mail to this mailbox stays with us: a served domain and no routing syntax in the local part."""
        if mailbox.is_literal:
            return False
        if not mailbox.domain:
            # <postmaster> without a domain must be accepted (RFC 5321 4.5.1); it is ours by definition.
            return mailbox.local.lower() == "postmaster"
        if mailbox.domain not in self._domains:
            return False
        return not (_ROUTING_CHARS & set(mailbox.local_unquoted))

    def check(self, mailbox: Mailbox, *, trusted: bool, authenticated: bool = False) -> Reply | None:
        """None when the recipient may be accepted, else the refusal to send."""
        if trusted or authenticated or self.is_served(mailbox):
            return None
        return R.RELAY_DENIED
