"""Greylisting (RFC 6647) at RCPT: a first delivery attempt of an unknown (client network, sender, recipient)
triplet is refused with 451 4.7.1; a real MTA retries from its queue, fire-and-forget spamware usually does not.

The triplet is the client's network (IPv4 /24, IPv6 /64: a sending pool retries from a sibling address), the
sender and the recipient, lowercased. The sender is normalised the way Postgrey does it, so a sender whose
address changes with every message does not start over each time: a BATV tag (``prvs=TAG=user@``) is removed and
every run of digits in the local part becomes ``#`` (VERP bounce addresses, ticket numbers).

Lifecycle (``delay``, ``retry_window``, ``expire`` from the configuration):
  * first seen: 451 "Greylisted, please try again in N seconds" (N: what is left of the delay);
  * retried before ``delay`` has passed: the same 451 with the remaining N; the first-seen time is kept, so an
    impatient client is not pushed further back;
  * retried once ``delay`` has passed and less than ``retry_window`` after that: passes, and is remembered;
  * not retried within ``retry_window``: forgotten, the next attempt counts as new;
  * a remembered triplet passes at once, and each use keeps it ``expire`` seconds longer.
Auto-allow (Postgrey's auto-whitelist): once ``auto_allow_after`` triplets from one client network have passed
the delay, that network skips greylisting while it keeps sending (the count lapses after ``expire`` idle).

Never greylisted: authenticated users, trusted clients and ``skip_networks``. The null sender <> *is*
greylisted: bounces come from MTA queues that retry. (Sender-verification callouts, which use <> and do not
retry, therefore fail while their triplet is new; that is their caller's problem, as with any greylisting MTA.)

Stores: ``MemoryGreylistStore`` lives in the process (one worker; state is lost on restart); ``RedisGreylistStore``
keeps triplets in Redis, shared by every worker and every relay that uses it (a client's retry often reaches a
different process or host than its first attempt) and kept across restarts. When Redis is down or errs, the Redis
store raises ``StoreUnavailable`` and the check lets the recipient through without writing anything (fail-open:
greylisting is a spam heuristic, and stopping all mail because its store is down would be the worse outage); a
warning is logged at most once a minute, and for ``RedisGreylistStore.RETRY_AFTER`` seconds after an error the
store fails at once instead of making every RCPT wait for Redis's timeout again.

Memory: ``MemoryGreylistStore`` keeps at most ``max_entries`` triplets and ``max_entries`` networks, dropping the
oldest pending ones first, so a spammer rotating senders displaces other spammers' pending triplets before any
remembered (proven) one. Expired entries are purged a few at a time on each write, never in one long pass.
Keys are 128-bit digests of the triplet: fixed size whatever the addresses' length.

Untrusted input: the client address, sender and recipient (hashed, never stored as given; never echoed
to the client, only logged, truncated).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from ..config.checks import GreylistConfig
from .api import Check, CheckContext, Verdict, tempfail
from .netkeys import client_ip, in_networks, network_key, parse_networks
from .redisconn import RedisConnection

__all__ = [
    "GreylistCheck",
    "GreylistStore",
    "MemoryGreylistStore",
    "RedisGreylistStore",
    "StoreUnavailable",
    "Triplet",
    "normal_sender",
    "triplet_key",
]

log = logging.getLogger("mailhop.checks.greylist")

_BATV = re.compile(r"^prvs=[0-9a-z]+=", re.IGNORECASE)
_DIGITS = re.compile(r"\d+")


@dataclass(frozen=True, slots=True)
class Triplet:
    """What a store remembers of a triplet. Times are the check's clock (wall-clock seconds by default)."""

    first_seen: float  # the first refused attempt (pending) or the last use (passed)
    passed: bool  # retried in time and accepted since


class StoreUnavailable(Exception):
    """A shared store cannot answer now (its server is down or slow): the check lets mail through unrecorded."""


class GreylistStore(Protocol):
    """Where greylisting state lives. The check owns the logic and the clock; a store only remembers.

    Contract: ``get`` never returns an entry whose ``expires`` (as given to the last ``put``) is <= ``now``. An
    entry may vanish earlier (eviction under memory pressure); the check then treats the triplet as new, which
    only costs that client one more delay. ``get`` and ``network_passes`` raise ``StoreUnavailable`` when the
    store cannot answer, and nothing else; the writes never raise (a lost write costs a client one more delay).
    Keys are short ASCII strings. Races between concurrent sessions are tolerable (two firsts for one triplet
    both get a 451).
    """

    async def get(self, key: str, now: float) -> Triplet | None:
        """The triplet under ``key``, or None (unknown or expired)."""
        ...

    async def put(self, key: str, triplet: Triplet, expires: float, now: float) -> None:
        """Remember ``triplet`` until ``expires`` (replacing what was there)."""
        ...

    async def network_passes(self, network: str, now: float) -> int:
        """How many triplets from ``network`` have passed the delay (0 when unknown or lapsed)."""
        ...

    async def add_network_pass(self, network: str, amount: int, expires: float, now: float) -> int:
        """Add ``amount`` (0: only keep it alive) to the network's count, keep it until ``expires``; the new count."""
        ...

    async def aclose(self) -> None:
        """Release connections (at shutdown)."""
        ...


class MemoryGreylistStore:
    """The in-process store: bounded LRU tables, pending triplets evicted before passed ones."""

    PURGE_BUDGET = 16  # expired entries dropped per write: amortised O(1), no long pause on a big table

    def __init__(self, max_entries: int = 1_000_000) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        # key -> (triplet, expires). Within one table, expiry times grow in insertion order (pending: first seen +
        # a constant; passed: last use + a constant), so the front of each table is always the next to expire.
        self._pending: OrderedDict[str, tuple[Triplet, float]] = OrderedDict()
        self._passed: OrderedDict[str, tuple[Triplet, float]] = OrderedDict()
        self._networks: OrderedDict[str, tuple[int, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._pending) + len(self._passed)

    async def get(self, key: str, now: float) -> Triplet | None:
        for table in (self._passed, self._pending):
            item = table.get(key)
            if item is not None:
                if item[1] > now:
                    return item[0]
                del table[key]
        return None

    async def put(self, key: str, triplet: Triplet, expires: float, now: float) -> None:
        self._pending.pop(key, None)
        self._passed.pop(key, None)
        (self._passed if triplet.passed else self._pending)[key] = (triplet, expires)
        self._purge(now)
        while len(self._pending) + len(self._passed) > self.max_entries:
            (self._pending or self._passed).popitem(last=False)

    async def network_passes(self, network: str, now: float) -> int:
        item = self._networks.get(network)
        if item is None:
            return 0
        if item[1] <= now:
            del self._networks[network]
            return 0
        return item[0]

    async def add_network_pass(self, network: str, amount: int, expires: float, now: float) -> int:
        count = await self.network_passes(network, now) + amount
        self._networks.pop(network, None)
        self._networks[network] = (count, expires)
        self._purge(now)
        while len(self._networks) > self.max_entries:
            self._networks.popitem(last=False)
        return count

    async def aclose(self) -> None:
        return None

    def _purge(self, now: float) -> None:
        for table in (self._pending, self._passed, self._networks):
            for _ in range(self.PURGE_BUDGET):
                if not table:
                    break
                key, item = next(iter(table.items()))
                if item[1] > now:
                    break
                del table[key]


# Adds to a network's pass count atomically (two workers passing triplets of one network at once both count).
# KEYS[1]: the network's key; ARGV: amount, expires, now, TTL in ms. The value is "count|expires".
_ADD_NETWORK_PASS_LUA = """
local count = 0
local value = redis.call('GET', KEYS[1])
if value then
  local c, e = string.match(value, '^(%d+)|(.+)$')
  local expires = tonumber(e)
  if c and expires and expires > tonumber(ARGV[3]) then count = tonumber(c) end
end
count = count + tonumber(ARGV[1])
redis.call('SET', KEYS[1], count .. '|' .. ARGV[2], 'PX', ARGV[4])
return count
"""


class RedisGreylistStore:
    """Triplets and network counts in Redis (redis-py's asyncio client, imported only when this store is built:
    redis is an optional dependency), shared by every process that uses the same server and prefix.

    A value carries its own expiry time (the check's clock) and the key a Redis TTL a little past it, so an entry
    is never returned after its expiry whatever the server's clock says, and Redis drops it soon after. Relays
    sharing one Redis must keep NTP time, as for the rate limits. ``timeout`` bounds each command. Fail-open
    (see the module docstring): the reads raise ``StoreUnavailable`` on an error, and for ``RETRY_AFTER`` seconds
    after one every call fails at once without asking Redis, so a hung server costs one RCPT one timeout, not
    every RCPT several.

    Sizing: every new triplet is a key for ``delay + retry_window`` (a day by default), so a spammer rotating
    senders makes many. Give Redis a ``maxmemory`` with ``maxmemory-policy volatile-ttl`` (every key here has a
    TTL; the ones closest to expiring go first), or writes fail once it is full and mail goes ungreylisted.
    "Kept across restarts" holds as far as Redis's own persistence (RDB or AOF) is on.
    """

    RETRY_AFTER = 5.0  # seconds after an error during which calls fail at once
    TTL_SLACK = 60.0  # seconds the Redis TTL outlives an entry's own expiry (clock differences between hosts)

    def __init__(self, url: str = "redis://127.0.0.1:6379/0", *, prefix: str = "mailhop:grey:",
                 timeout: float = 1.0) -> None:
        self.prefix = prefix
        self._redis = RedisConnection(url, timeout=timeout, log=log, consequence="mail is not greylisted")
        self._add_pass: Any = self._redis.script(_ADD_NETWORK_PASS_LUA)
        self._down_until = -math.inf  # time.monotonic() until which calls fail without asking Redis

    def _ttl_ms(self, expires: float, now: float) -> int:
        return max(1, math.ceil((expires - now + self.TTL_SLACK) * 1000))

    async def _call(self, command: Any, *args: Any, **kwargs: Any) -> Any:
        """One Redis command, or StoreUnavailable (at once while a recent error says Redis is down)."""
        if time.monotonic() < self._down_until:
            raise StoreUnavailable("redis unavailable (recent error)")
        try:
            return await command(*args, **kwargs)
        except self._redis.errors as exc:
            self._down_until = time.monotonic() + self.RETRY_AFTER
            self._redis.warn(exc)
            raise StoreUnavailable(f"redis unavailable ({type(exc).__name__})") from exc

    async def get(self, key: str, now: float) -> Triplet | None:
        value = await self._call(self._redis.client.get, f"{self.prefix}t:{key}")
        if value is None:
            return None
        try:
            first_seen, passed, expires = value.split(b"|")
            if float(expires) <= now:
                return None
            return Triplet(float(first_seen), passed == b"1")
        except ValueError:  # not ours (another program's key under our prefix): treat the triplet as new
            return None

    async def put(self, key: str, triplet: Triplet, expires: float, now: float) -> None:
        value = f"{triplet.first_seen!r}|{int(triplet.passed)}|{expires!r}"
        with contextlib.suppress(StoreUnavailable):
            await self._call(self._redis.client.set, f"{self.prefix}t:{key}", value, px=self._ttl_ms(expires, now))

    async def network_passes(self, network: str, now: float) -> int:
        value = await self._call(self._redis.client.get, f"{self.prefix}n:{network}")
        if value is None:
            return 0
        try:
            count, expires = value.split(b"|")
            return int(count) if float(expires) > now else 0
        except ValueError:
            return 0

    async def add_network_pass(self, network: str, amount: int, expires: float, now: float) -> int:
        try:
            count = await self._call(self._add_pass, keys=[f"{self.prefix}n:{network}"],
                                     args=[amount, repr(expires), repr(now), self._ttl_ms(expires, now)])
        except StoreUnavailable:
            return 0
        return int(count)

    async def aclose(self) -> None:
        await self._redis.aclose()


def normal_sender(sender: str) -> str:
    """The sender as greylisting compares it: lowercased, BATV tag removed, digit runs in the local part -> '#'."""
    local, at, domain = sender.lower().rpartition("@")
    if not at:
        return _DIGITS.sub("#", _BATV.sub("", sender.lower()))
    return _DIGITS.sub("#", _BATV.sub("", local)) + "@" + domain


def triplet_key(network: str, sender: str, recipient: str) -> str:
    """A fixed-size key for the triplet (hex of a 128-bit BLAKE2b digest; NUL separators cannot occur in SMTP)."""
    data = "\0".join((network, normal_sender(sender), recipient.lower())).encode("utf-8", "surrogateescape")
    return hashlib.blake2b(data, digest_size=16).hexdigest()


class GreylistCheck(Check):
    """Refuses the first attempt of each new triplet with 451 4.7.1 (see the module docstring)."""

    name = "greylist"

    def __init__(self, config: GreylistConfig, store: GreylistStore, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.store = store
        self.clock = clock  # wall clock by default: a persistent store's times must survive a restart
        self._skip = parse_networks(config.skip_networks, "checks.greylist.skip_networks")

    async def aclose(self) -> None:
        await self.store.aclose()

    async def rcpt(self, ctx: CheckContext) -> Verdict | None:
        if ctx.authenticated or ctx.trusted or ctx.recipient is None:
            return None
        try:
            return await self._rcpt(ctx, ctx.recipient)
        except StoreUnavailable:
            return None  # fail-open, and nothing written: the store warned already

    async def _rcpt(self, ctx: CheckContext, recipient: str) -> Verdict | None:
        ip = client_ip(ctx.client_ip)
        if ip is None:
            log.warning("greylist: client address %r is not an IP address; not greylisted", ctx.client_ip[:64])
            return None
        if in_networks(ip, self._skip):
            return None
        network = network_key(str(ip))
        assert network is not None  # ip is an address
        cfg = self.config
        now = self.clock()
        if cfg.auto_allow_after > 0 and await self.store.network_passes(network, now) >= cfg.auto_allow_after:
            await self.store.add_network_pass(network, 0, now + cfg.expire, now)
            return None
        key = triplet_key(network, ctx.sender or "", recipient)
        known = await self.store.get(key, now)
        if known is not None and known.passed:
            await self.store.put(key, Triplet(now, True), now + cfg.expire, now)
            return None
        if known is None or now >= known.first_seen + cfg.delay + cfg.retry_window:
            await self.store.put(key, Triplet(now, False), now + cfg.delay + cfg.retry_window, now)
            return self._refuse(cfg.delay, network, ctx, "new")
        wait = known.first_seen + cfg.delay - now
        if wait > 0:
            return self._refuse(wait, network, ctx, "early retry")
        await self.store.put(key, Triplet(now, True), now + cfg.expire, now)
        if cfg.auto_allow_after > 0:
            await self.store.add_network_pass(network, 1, now + cfg.expire, now)
        log.info("greylist: passed after %.0fs: client=%s", now - known.first_seen, ctx.client_ip)
        return None

    @staticmethod
    def _refuse(wait: float, network: str, ctx: CheckContext, why: str) -> Verdict:
        seconds = max(math.ceil(wait), 0)
        return tempfail(f"Greylisted, please try again in {seconds} seconds", code=451, enhanced="4.7.1",
                        reason=f"greylisted ({why}, {seconds}s left): network={network} "
                               f"sender=<{(ctx.sender or '')[:256]}> rcpt=<{(ctx.recipient or '')[:256]}>")
