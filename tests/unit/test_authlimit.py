"""AUTH brute-force limiter (pure, fake clock)."""

from __future__ import annotations

from mailhop.policy.authlimit import AuthLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_lockout_after_max_failures_then_penalty_expires() -> None:
    clock = Clock()
    lim = AuthLimiter(max_failures=3, window=60, penalty=120, clock=clock)
    keys = (lim.ip_key("192.0.2.1"), lim.user_key("Alice"))
    assert not lim.failure(*keys) and not lim.failure(*keys)
    assert lim.failure(*keys)
    assert lim.locked(lim.ip_key("192.0.2.1")) and lim.locked(lim.user_key("alice"))
    clock.now += 119
    assert lim.locked(*keys)
    clock.now += 2
    assert not lim.locked(*keys)


def test_failures_outside_window_do_not_count() -> None:
    clock = Clock()
    lim = AuthLimiter(max_failures=3, window=60, penalty=120, clock=clock)
    key = lim.ip_key("192.0.2.1")
    lim.failure(key)
    lim.failure(key)
    clock.now += 61
    assert not lim.failure(key)
    assert not lim.locked(key)


def test_user_lockout_spans_addresses() -> None:
    lim = AuthLimiter(max_failures=2, window=60, penalty=60, clock=Clock())
    lim.failure(lim.ip_key("192.0.2.1"), lim.user_key("bob"))
    assert lim.failure(lim.ip_key("198.51.100.7"), lim.user_key("bob"))
    assert lim.locked(lim.user_key("bob")) and not lim.locked(lim.ip_key("192.0.2.1"))


def test_ipv6_counted_per_64() -> None:
    lim = AuthLimiter(max_failures=2, window=60, penalty=60, clock=Clock())
    assert lim.ip_key("2001:db8:1:2::1") == lim.ip_key("2001:db8:1:2:ffff::9")
    assert lim.ip_key("2001:db8:1:2::1") != lim.ip_key("2001:db8:1:3::1")


def test_success_clears_user_not_address() -> None:
    lim = AuthLimiter(max_failures=2, window=60, penalty=60, clock=Clock())
    ip, user = lim.ip_key("192.0.2.1"), lim.user_key("carol")
    lim.failure(ip, user)
    lim.success(ip, user)
    assert not lim.failure(user)
    assert lim.failure(ip)


def test_bounded_memory() -> None:
    lim = AuthLimiter(max_failures=5, window=60, penalty=60, max_entries=100, clock=Clock())
    for i in range(1000):
        lim.failure(lim.user_key(f"spray{i}"))
    assert len(lim._failures) <= 100
