"""Retry timing, expiry and delay-warning times: pure functions of the policy, the attempt count and the clock.

Defaults follow RFC 5321 4.5.4.1 (retry interval at least 30 minutes is the RFC's suggestion; operators expect
Postfix-like behaviour: first retry soon, then exponential backoff) and give up after 5 days.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

__all__ = ["RetryPolicy", "next_attempt_time", "should_warn"]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    first_retry: float = 300.0  # seconds after the first failed attempt
    max_interval: float = 4 * 3600.0  # the backoff never waits longer than this between attempts
    backoff: float = 2.0  # each interval is this many times the previous
    jitter: float = 0.1  # +/- this fraction, so deferred mail to one destination does not retry in lockstep
    lifetime: float = 5 * 86400.0  # after this long in the queue a deferred recipient fails (expires)
    delay_warning: float = 4 * 3600.0  # a delay DSN after this long, when NOTIFY allows it (0 disables)


def next_attempt_time(
    policy: RetryPolicy, *, attempts: int, received_at: float, now: float, rng: random.Random | None = None
) -> float | None:
    """When to try again after ``attempts`` failed attempts, or None when the message has expired.

    The last retry is placed at the expiry time rather than skipped, so a destination that recovers in the
    final hours still gets its mail.
    """
    expires = received_at + policy.lifetime
    if now >= expires:
        return None
    interval = min(policy.first_retry * policy.backoff ** max(attempts - 1, 0), policy.max_interval)
    if policy.jitter:
        interval *= 1 + (rng or random).uniform(-policy.jitter, policy.jitter)
    return min(now + max(interval, 1.0), expires)


def should_warn(policy: RetryPolicy, *, received_at: float, now: float, already_warned: bool) -> bool:
    """True once a deferred recipient has waited ``delay_warning`` seconds and has not been warned yet."""
    return bool(policy.delay_warning) and not already_warned and now - received_at >= policy.delay_warning
