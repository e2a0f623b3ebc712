"""Rate limits on connections, messages and recipients, per client address, sender domain or recipient domain.

Each ``[[checks.ratelimit.rules]]`` is (key, counter, limit, window):
  * connections, counted at connect, per client_ip: over the limit the session answers 421 4.7.0 at the greeting
    and closes;
  * messages, counted once per MAIL, per client_ip or sender_domain: 451 4.7.1 at MAIL. Per recipient_domain a
    message is counted at the first RCPT of that domain in the transaction (MAIL does not know the recipients);
  * recipients, counted per RCPT, per client_ip, sender_domain or the recipient's own domain: 451 4.7.1 at RCPT.
The client_ip key is the address for IPv4 and the /64 for IPv6 (``netkeys``). The null sender has no domain, so
sender_domain rules do not apply to it (bounces from everywhere would otherwise share one global budget); the
client_ip rules still do.

Who is exempt: with ``exempt_authenticated``, authenticated users skip the message and recipient limits (they
have per-user limits in ``policy.userlimits``); connections are counted before anyone can authenticate, so they
always count. Trusted clients are *not* exempt: an internal application gone wild is exactly what a limit is for.

Algorithm: a sliding window approximated from two fixed windows (Cloudflare's "sliding window counter"): the
estimate at time t is ``previous_count * (1 - elapsed/window) + current_count``. Chosen over a token bucket /
GCRA because it keeps the operator's meaning of "at most N per window" (GCRA with a burst of N lets almost 2N
through in one window), it needs two integers per key (bounded memory), and a shared backend is two INCRs with an
expiry (or one short Lua script), with no read-modify-write of floating-point state. It assumes the previous
window's events were evenly spread; the error is small for realistic limits, coarse only for tiny ones (with a
limit of 1, a burst at the start of a window waits up to two windows).

Counting refusals: only allowed attempts are counted. A refused attempt costs the client nothing, so a client
that keeps retrying is let through as soon as its real rate allows (and ``retry_after`` is exact), instead of
being locked out for as long as it keeps knocking. When several rules apply to one attempt and a later rule
refuses it, the earlier rules' counts are refunded: a refused attempt is counted against no rule.

Backends: ``MemoryRateBackend`` (this process; at most ``max_keys`` counters, the least recently used dropped)
and ``RedisRateBackend`` (shared by several relays; one Lua script per hit; fails open when Redis is down).

Untrusted input: the client address and the sender and recipient domains (keys are truncated to 255 characters;
backend state is bounded: LRU in memory, a two-window expiry in Redis).
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from ..config.checks import RateLimitConfig, RateRuleConfig
from .api import Check, CheckContext, Verdict, tempfail
from .netkeys import RATE_V4_PREFIX, network_key
from .redisconn import RedisConnection

__all__ = [
    "MemoryRateBackend",
    "RateBackend",
    "RateDecision",
    "RateLimitCheck",
    "RedisRateBackend",
    "sliding_window",
]

log = logging.getLogger("mailhop.checks.ratelimit")

_MAX_VALUE = 255


@dataclass(frozen=True, slots=True)
class RateDecision:
    allowed: bool
    retry_after: float = 0.0  # seconds until the same attempt would be allowed (0 when allowed)


class RateBackend(Protocol):
    """Where counters live. Contract: ``hit`` is atomic per key (check and count in one step: a Redis backend
    runs it as one Lua script) and counts ``amount`` only when the answer is "allowed"; ``refund`` takes back an
    allowed hit (best effort: never below zero). Keys are strings up to ~330 characters; ``window`` is part of
    the counter's identity. Neither method raises for any key."""

    async def hit(self, key: str, window: float, limit: int, amount: int = 1) -> RateDecision:
        """Count ``amount`` against ``key`` if that keeps it within ``limit`` per ``window`` seconds."""
        ...

    async def refund(self, key: str, window: float, amount: int = 1) -> None:
        """Take back ``amount`` counted by an allowed ``hit`` moments ago."""
        ...

    async def aclose(self) -> None:
        """Release connections at shutdown."""
        ...


def sliding_window(previous: int, current: int, elapsed: float, window: float, limit: int,
                   amount: int) -> RateDecision:
    """The decision for ``amount`` more, ``elapsed`` seconds into the current fixed window (pure).

    ``retry_after`` assumes nothing else is counted meanwhile, which holds for the client that was refused: its
    refused attempts are not counted. An ``amount`` over ``limit`` can never pass; it answers one window.
    """
    if previous * (1.0 - elapsed / window) + current + amount <= limit:
        return RateDecision(True)
    if amount > limit:
        return RateDecision(False, window)
    if current + amount <= limit:
        # This window has room once the previous window's share decays: previous * (1 - x/window) <= room.
        room = limit - current - amount
        return RateDecision(False, max(window * (1.0 - room / previous) - elapsed, 0.0))
    # Wait for the next window, where the current count becomes the decaying one (current > 0 here).
    return RateDecision(False, window - elapsed + window * (1.0 - (limit - amount) / current))


class MemoryRateBackend:
    """Counters in this process: per (key, window) the fixed window's index and the two counts, LRU-bounded."""

    def __init__(self, max_keys: int = 100_000, clock: Callable[[], float] = time.monotonic) -> None:
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        self.max_keys = max_keys
        self.clock = clock
        self._state: OrderedDict[tuple[str, float], tuple[int, int, int]] = OrderedDict()  # (index, prev, curr)

    def __len__(self) -> int:
        return len(self._state)

    def _rolled(self, key: tuple[str, float], index: int) -> tuple[int, int]:
        """(previous, current) counts as of fixed window ``index``."""
        state = self._state.get(key)
        if state is None:
            return 0, 0
        last, prev, curr = state
        if last == index:
            return prev, curr
        if last == index - 1:
            return curr, 0
        return 0, 0

    async def hit(self, key: str, window: float, limit: int, amount: int = 1) -> RateDecision:
        now = self.clock()
        index = math.floor(now / window)
        prev, curr = self._rolled((key, window), index)
        decision = sliding_window(prev, curr, now - index * window, window, limit, amount)
        if decision.allowed:
            curr += amount
        self._state[(key, window)] = (index, prev, curr)
        self._state.move_to_end((key, window))
        while len(self._state) > self.max_keys:
            self._state.popitem(last=False)
        return decision

    async def refund(self, key: str, window: float, amount: int = 1) -> None:
        state = self._state.get((key, window))
        if state is not None:
            # The hit being refunded was counted in the window this state was last written in.
            index, prev, curr = state
            self._state[(key, window)] = (index, prev, max(curr - amount, 0))

    async def aclose(self) -> None:
        pass


# One hit, atomic on the server. KEYS[1]: the current fixed window's count; KEYS[2]: the previous window's (both
# carry one {hash tag}, so they live in one Redis Cluster slot). ARGV: seconds into the current window, the window,
# the limit, the amount. The test is sliding_window's first line; returns {allowed, previous, current}.
_HIT_LUA = """
local prev = tonumber(redis.call('GET', KEYS[2]) or '0')
local curr = tonumber(redis.call('GET', KEYS[1]) or '0')
local elapsed, window = tonumber(ARGV[1]), tonumber(ARGV[2])
local limit, amount = tonumber(ARGV[3]), tonumber(ARGV[4])
if prev * (1.0 - elapsed / window) + curr + amount <= limit then
  redis.call('INCRBY', KEYS[1], amount)
  redis.call('PEXPIRE', KEYS[1], math.ceil(window * 2000))
  return {1, prev, curr}
end
return {0, prev, curr}
"""

_REFUND_LUA = """
local curr = tonumber(redis.call('GET', KEYS[1]) or '0')
if curr > 0 then redis.call('DECRBY', KEYS[1], math.min(curr, tonumber(ARGV[1]))) end
return 0
"""


class RedisRateBackend:
    """Counters in Redis, shared by every mailhop process that uses the same server (redis-py's asyncio client,
    imported only when this backend is built: redis is an optional dependency).

    Each hit is one Lua script (atomic on the server); a counter key lives two windows (it is the "previous"
    count during the next one). Times come from this host's ``clock``: relays sharing one Redis must keep NTP
    time (a skew of s seconds moves their window edges by s). Fail-open: when Redis is down or errs, hits are
    allowed and a warning is logged at most once a minute; rate limits protect the relay, they must not stop
    mail. ``timeout`` bounds each command, so a hung server delays a session by at most that much.
    """

    def __init__(self, url: str = "redis://127.0.0.1:6379/0", *, prefix: str = "mailhop:rate:",
                 timeout: float = 1.0, clock: Callable[[], float] = time.time) -> None:
        self.prefix = prefix
        self.clock = clock
        self._redis = RedisConnection(url, timeout=timeout, log=log, consequence="limits are not enforced")
        self._hit: Any = self._redis.script(_HIT_LUA)
        self._refund: Any = self._redis.script(_REFUND_LUA)

    def _key(self, key: str, window: float, index: int) -> str:
        return f"{self.prefix}{{{key}|{window:g}}}:{index}"

    async def hit(self, key: str, window: float, limit: int, amount: int = 1) -> RateDecision:
        now = self.clock()
        index = math.floor(now / window)
        elapsed = now - index * window
        try:
            allowed, prev, curr = await self._hit(
                keys=[self._key(key, window, index), self._key(key, window, index - 1)],
                args=[repr(elapsed), repr(float(window)), limit, amount],
            )
        except self._redis.errors as exc:
            self._redis.warn(exc)
            return RateDecision(True)
        if allowed:
            return RateDecision(True)
        return RateDecision(False, sliding_window(int(prev), int(curr), elapsed, window, limit, amount).retry_after)

    async def refund(self, key: str, window: float, amount: int = 1) -> None:
        index = math.floor(self.clock() / window)
        try:
            await self._refund(keys=[self._key(key, window, index)], args=[amount])
        except self._redis.errors as exc:
            self._redis.warn(exc)

    async def aclose(self) -> None:
        await self._redis.aclose()


@dataclass(frozen=True, slots=True)
class _Hit:
    rule: RateRuleConfig
    key: str
    value: str


class RateLimitCheck(Check):
    """Applies the configured rate rules at connect, MAIL and RCPT (see the module docstring)."""

    name = "ratelimit"

    def __init__(self, config: RateLimitConfig, backend: RateBackend) -> None:
        self.config = config
        self.backend = backend
        rules = config.rules
        self._connect = [r for r in rules if r.counter == "connections"]
        self._mail = [r for r in rules if r.counter == "messages" and r.key != "recipient_domain"]
        self._rcpt = [r for r in rules if r.counter == "recipients"]
        self._rcpt_messages = [r for r in rules if r.counter == "messages" and r.key == "recipient_domain"]

    async def connect(self, ctx: CheckContext) -> Verdict | None:
        return await self._apply(ctx, self._connect)

    async def aclose(self) -> None:
        await self.backend.aclose()

    async def mail(self, ctx: CheckContext) -> Verdict | None:
        if self.config.exempt_authenticated and ctx.authenticated:
            return None
        return await self._apply(ctx, self._mail)

    async def rcpt(self, ctx: CheckContext) -> Verdict | None:
        if (self.config.exempt_authenticated and ctx.authenticated) or ctx.recipient is None:
            return None
        rules = list(self._rcpt)
        domain = _domain(ctx.recipient)
        counted: set[str] = ctx.results.setdefault("ratelimit.message_domains", set())
        if self._rcpt_messages and domain and domain not in counted:
            rules += self._rcpt_messages
        verdict = await self._apply(ctx, rules)
        if verdict is None and domain:
            counted.add(domain)
        return verdict

    async def _apply(self, ctx: CheckContext, rules: list[RateRuleConfig]) -> Verdict | None:
        done: list[_Hit] = []
        for rule in rules:
            value = _value(rule, ctx)
            if not value:
                continue
            hit = _Hit(rule, f"{rule.counter}:{rule.key}:{rule.limit}/{rule.window:g}:{value}", value)
            decision = await self.backend.hit(hit.key, rule.window, rule.limit)
            if decision.allowed:
                done.append(hit)
                continue
            for earlier in done:
                await self.backend.refund(earlier.key, earlier.rule.window)
            return _refusal(rule, value, decision.retry_after)
        return None


def _domain(address: str) -> str:
    local, at, domain = address.rpartition("@")
    return domain.lower()[:_MAX_VALUE] if at and local else ""


def _value(rule: RateRuleConfig, ctx: CheckContext) -> str:
    """What ``rule`` counts this attempt against ('' when it does not apply)."""
    if rule.key == "client_ip":
        net = network_key(ctx.client_ip, v4_prefix=RATE_V4_PREFIX)
        return net.removesuffix("/32") if net is not None else ctx.client_ip[:_MAX_VALUE]
    if rule.key == "sender_domain":
        return _domain(ctx.sender or "")
    return _domain(ctx.recipient or "")


def _refusal(rule: RateRuleConfig, value: str, retry_after: float) -> Verdict:
    reason = (f"{rule.counter} per {rule.key} {value}: over {rule.limit} per {rule.window:g}s, "
              f"allowed again in {math.ceil(retry_after)}s")
    if rule.counter == "connections":
        return tempfail("Too many connections from your address; try again later", code=421, enhanced="4.7.0",
                        reason=reason)
    if rule.counter == "messages":
        return tempfail(f"Message rate limit exceeded for {value}", code=451, enhanced="4.7.1", reason=reason)
    return tempfail("Recipient rate limit exceeded", code=451, enhanced="4.7.1", reason=reason)
