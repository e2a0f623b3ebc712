"""Retry schedule (pure): growth, cap, jitter bounds, expiry, warning time."""

from __future__ import annotations

import random

import pytest

from mailhop.queue.schedule import RetryPolicy, next_attempt_time, should_warn

P = RetryPolicy(jitter=0)


@pytest.mark.parametrize(
    ("attempts", "interval"), [(1, 300), (2, 600), (3, 1200), (5, 4800), (6, 9600), (7, 14400), (30, 14400)]
)
def test_backoff_grows_to_cap(attempts: int, interval: float) -> None:
    assert next_attempt_time(P, attempts=attempts, received_at=0, now=1000) == 1000 + interval


def test_expiry() -> None:
    assert next_attempt_time(P, attempts=3, received_at=0, now=5 * 86400) is None
    assert next_attempt_time(P, attempts=30, received_at=0, now=5 * 86400 - 60) == 5 * 86400


def test_jitter_bounded() -> None:
    rng = random.Random(7)
    policy = RetryPolicy(jitter=0.1)
    for _ in range(200):
        t = next_attempt_time(policy, attempts=1, received_at=0, now=0, rng=rng)
        assert t is not None and 270 <= t <= 330


def test_delay_warning() -> None:
    assert not should_warn(P, received_at=0, now=3 * 3600, already_warned=False)
    assert should_warn(P, received_at=0, now=4 * 3600, already_warned=False)
    assert not should_warn(P, received_at=0, now=5 * 3600, already_warned=True)
    assert not should_warn(RetryPolicy(delay_warning=0), received_at=0, now=10**6, already_warned=False)
