"""Greylisting: the triplet lifecycle on a stepped clock, network keys, bypasses, auto-allow and bounded memory; the
lifecycle on both stores (memory, and a real Redis), the Redis store shared by two checks (two workers) and
failing open."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from mailhop.checks.api import Action, CheckContext, Phase, Verdict
from mailhop.checks.chain import PolicyChain
from mailhop.checks.greylist import (
    GreylistCheck,
    GreylistStore,
    MemoryGreylistStore,
    RedisGreylistStore,
    StoreUnavailable,
    Triplet,
    normal_sender,
    triplet_key,
)
from mailhop.config.checks import GreylistConfig
from tests.support.redisserver import REDIS_URL, delete_prefix, fresh_prefix, redis_or_skip

pytestmark = pytest.mark.anyio

DELAY, WINDOW, EXPIRE = 300.0, 3600.0, 86400.0
IP = "192.0.2.10"
SENDER, RCPT = "alice@sender.test", "bob@dest.test"


class Clock:
    def __init__(self, t: float = 1_700_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class Rig:
    def __init__(self, *, auto_allow_after: int = 0, skip_networks: tuple[str, ...] = (),
                 max_entries: int = 1_000_000, store: GreylistStore | None = None) -> None:
        self.clock = Clock()
        self.store: Any = store if store is not None else MemoryGreylistStore(max_entries=max_entries)
        cfg = GreylistConfig(enabled=True, delay=DELAY, retry_window=WINDOW, expire=EXPIRE,
                             auto_allow_after=auto_allow_after, skip_networks=list(skip_networks))
        self.check = GreylistCheck(cfg, self.store, clock=self.clock)

    async def rcpt(self, ip: str = IP, sender: str = SENDER, rcpt: str = RCPT, *, user: str | None = None,
                   trusted: bool = False) -> Verdict | None:
        ctx = CheckContext(client_ip=ip, user=user, trusted=trusted, sender=sender, recipient=rcpt)
        return await self.check.rcpt(ctx)

    def step(self, seconds: float) -> None:
        self.clock.t += seconds


@pytest.fixture(params=["memory", "redis"])
async def make_rig(request: pytest.FixtureRequest) -> AsyncIterator[Callable[..., Rig]]:
    """Builds rigs on one kind of store; Redis ones under a fresh key prefix, removed afterwards."""
    prefix = fresh_prefix()
    stores: list[RedisGreylistStore] = []

    def make(**options: Any) -> Rig:
        if request.param == "memory":
            return Rig(**options)
        store = RedisGreylistStore(REDIS_URL, prefix=prefix + f"{len(stores)}:")
        stores.append(store)
        return Rig(store=store, **options)

    if request.param == "redis":
        redis_or_skip()
    yield make
    for store in stores:
        await store.aclose()
    if request.param == "redis":
        await delete_prefix(prefix)


def greylisted(verdict: Verdict | None, seconds: int | None = None) -> bool:
    if verdict is None or verdict.action is not Action.TEMPFAIL or verdict.reply is None:
        return False
    assert (verdict.reply.code, verdict.reply.enhanced) == (451, "4.7.1")
    if seconds is not None:
        assert verdict.reply.text == f"Greylisted, please try again in {seconds} seconds"
    return True


async def test_lifecycle(make_rig: Callable[..., Rig]) -> None:
    r = make_rig()
    assert greylisted(await r.rcpt(), 300)
    r.step(100)
    assert greylisted(await r.rcpt(), 200)  # an early retry keeps the first-seen time
    r.step(199.5)
    assert greylisted(await r.rcpt(), 1)
    r.step(0.5)
    assert await r.rcpt() is None  # exactly at the end of the delay
    r.step(EXPIRE - 1)
    assert await r.rcpt() is None  # remembered, and the use refreshes the expiry
    r.step(EXPIRE - 1)
    assert await r.rcpt() is None
    r.step(EXPIRE + 1)
    assert greylisted(await r.rcpt(), 300)  # unused for longer than expire: new again


async def test_missed_retry_window_starts_over(make_rig: Callable[..., Rig]) -> None:
    r = make_rig()
    assert greylisted(await r.rcpt(), 300)
    r.step(DELAY + WINDOW - 0.5)
    assert await r.rcpt() is None  # the window's last moments still count
    r2 = make_rig()
    assert greylisted(await r2.rcpt())
    r2.step(DELAY + WINDOW)
    assert greylisted(await r2.rcpt(), 300)  # treated as new: the full delay again
    r2.step(DELAY)
    assert await r2.rcpt() is None


async def test_triplet_parts_each_matter(make_rig: Callable[..., Rig]) -> None:
    r = make_rig()
    assert greylisted(await r.rcpt())
    r.step(DELAY)
    assert await r.rcpt() is None
    assert await r.rcpt(sender="ALICE@Sender.TEST", rcpt="Bob@DEST.test") is None  # compared lowercased
    assert greylisted(await r.rcpt(sender="carol@sender.test"), 300)
    assert greylisted(await r.rcpt(rcpt="dave@dest.test"), 300)
    assert greylisted(await r.rcpt(ip="192.0.3.10"), 300)  # another /24


async def test_retry_from_the_same_ipv4_slash_24_passes(make_rig: Callable[..., Rig]) -> None:
    r = make_rig()
    assert greylisted(await r.rcpt(ip="192.0.2.10"))
    r.step(DELAY)
    assert await r.rcpt(ip="192.0.2.200") is None
    assert await r.rcpt(ip="::ffff:192.0.2.77") is None  # a dual-stack socket's view of the same network


async def test_ipv6_is_keyed_by_slash_64(make_rig: Callable[..., Rig]) -> None:
    r = make_rig()
    assert greylisted(await r.rcpt(ip="2001:db8:1:2::1"))
    r.step(DELAY)
    assert await r.rcpt(ip="2001:db8:1:2:ffff:ee:dd:9") is None
    assert greylisted(await r.rcpt(ip="2001:db8:1:3::1"))


async def test_null_sender_is_greylisted_too(make_rig: Callable[..., Rig]) -> None:
    r = make_rig()
    assert greylisted(await r.rcpt(sender=""))
    r.step(DELAY)
    assert await r.rcpt(sender="") is None


async def test_per_message_sender_tags_do_not_defeat_the_triplet(make_rig: Callable[..., Rig]) -> None:
    assert normal_sender("prvs=0123abcd=Alice@Sender.test") == "alice@sender.test"
    assert normal_sender("bounce-12345-bob=dest.test@list.test") == "bounce-#-bob=dest.test@list.test"
    assert normal_sender("") == ""
    assert triplet_key("192.0.2.0/24", "bounce-1@list.test", RCPT) == triplet_key("192.0.2.0/24",
                                                                                 "bounce-99@list.test", RCPT)
    r = make_rig()
    assert greylisted(await r.rcpt(sender="prvs=1111aaaa=alice@sender.test"))
    r.step(DELAY)
    assert await r.rcpt(sender="prvs=2222bbbb=alice@sender.test") is None


async def test_authenticated_trusted_and_skip_networks_bypass() -> None:
    r = Rig(skip_networks=("198.51.100.0/24", "2001:db8:ffff::/48"))
    assert await r.rcpt(user="alice") is None
    assert await r.rcpt(trusted=True) is None
    assert await r.rcpt(ip="198.51.100.7") is None
    assert await r.rcpt(ip="2001:db8:ffff:1::5") is None
    assert len(r.store) == 0  # bypassed attempts leave no state
    assert greylisted(await r.rcpt(ip="198.51.101.7"))


def test_bad_skip_network_is_a_config_error() -> None:
    with pytest.raises(ValueError, match=r"(?s)skip_networks.*'nonsense' is not a network"):
        GreylistConfig(enabled=True, skip_networks=["192.0.2.0/24", "nonsense"])
    # The check still refuses one built around validation (model_construct skips validators).
    cfg = GreylistConfig.model_construct(enabled=True, skip_networks=["nonsense"], delay=300.0, retry_window=1.0,
                                         expire=1.0, auto_allow_after=0)
    with pytest.raises(ValueError, match=r"skip_networks.*nonsense"):
        GreylistCheck(cfg, MemoryGreylistStore())


async def test_auto_allow_after_n_passed_triplets(make_rig: Callable[..., Rig]) -> None:
    r = make_rig(auto_allow_after=2)
    for rcpt in ("a@dest.test", "b@dest.test"):
        assert greylisted(await r.rcpt(rcpt=rcpt))
    r.step(DELAY)
    assert await r.rcpt(rcpt="a@dest.test") is None
    assert greylisted(await r.rcpt(rcpt="c@dest.test"))  # one pass so far: not yet allowed
    assert await r.rcpt(rcpt="b@dest.test") is None
    assert await r.rcpt(ip="192.0.2.99", rcpt="new@dest.test") is None  # the whole /24 is allowed now
    assert greylisted(await r.rcpt(ip="192.0.3.1", rcpt="new@dest.test"))  # but not its neighbour
    r.step(EXPIRE - 1)
    assert await r.rcpt(rcpt="another@dest.test") is None  # sending keeps the allowance alive
    r.step(EXPIRE + 1)
    assert greylisted(await r.rcpt(rcpt="yet-another@dest.test"))  # idle for longer than expire: lapsed


async def test_repeated_passes_of_one_triplet_count_once(make_rig: Callable[..., Rig]) -> None:
    r = make_rig(auto_allow_after=2)
    assert greylisted(await r.rcpt())
    r.step(DELAY)
    for _ in range(5):
        assert await r.rcpt() is None
    assert greylisted(await r.rcpt(rcpt="other@dest.test"))


async def test_store_is_bounded_and_evicts_pending_before_passed() -> None:
    r = Rig(max_entries=3)
    assert greylisted(await r.rcpt(rcpt="proven@dest.test"))
    r.step(DELAY)
    assert await r.rcpt(rcpt="proven@dest.test") is None
    for n in range(5):  # a spammer rotating senders
        assert greylisted(await r.rcpt(sender=f"s{'abcde'[n]}@spam.test"))
    assert len(r.store) == 3
    r.step(DELAY)
    assert await r.rcpt(rcpt="proven@dest.test") is None  # the proven triplet survived
    assert greylisted(await r.rcpt(sender="sa@spam.test"), 300)  # the oldest pending one was evicted
    assert await r.rcpt(sender="se@spam.test") is None  # the newest pending one was kept


async def test_expired_entries_are_purged_on_write() -> None:
    store = MemoryGreylistStore()
    for n in range(10):
        await store.put(f"k{n}", Triplet(0.0, False), expires=100.0, now=0.0)
    assert len(store) == 10
    assert await store.get("k5", now=100.0) is None  # never returns an expired entry
    await store.put("fresh", Triplet(200.0, False), expires=500.0, now=200.0)
    assert len(store) == 1
    many = MemoryGreylistStore()
    for n in range(100):
        await many.put(f"k{n}", Triplet(0.0, True), expires=100.0, now=0.0)
    await many.put("fresh", Triplet(200.0, True), expires=500.0, now=200.0)
    assert len(many) == 101 - MemoryGreylistStore.PURGE_BUDGET  # a bounded amount of work per write


async def test_runs_in_the_chain_at_rcpt() -> None:
    r = Rig()
    chain = PolicyChain([r.check])
    assert chain.has(Phase.RCPT) and not chain.has(Phase.CONNECT)
    ctx = CheckContext(client_ip=IP, sender=SENDER, recipient=RCPT)
    verdict = await chain.run(Phase.RCPT, ctx)
    assert verdict.action is Action.TEMPFAIL and verdict.reply is not None and verdict.reply.code == 451


# -- the Redis store: shared between processes, atomic counts, fail-open ----------------------------------------------

@pytest.fixture
async def redis_prefix() -> AsyncIterator[str]:
    redis_or_skip()
    prefix = fresh_prefix()
    yield prefix
    await delete_prefix(prefix)


async def test_redis_store_is_shared_by_two_workers(redis_prefix: str) -> None:
    """Two checks with their own connections (as two worker processes have): a triplet first seen by one passes
    on the other after the delay, and auto-allow counts passes made on either."""
    first = RedisGreylistStore(REDIS_URL, prefix=redis_prefix)
    second = RedisGreylistStore(REDIS_URL, prefix=redis_prefix)
    try:
        a, b = Rig(store=first, auto_allow_after=2), Rig(store=second, auto_allow_after=2)
        b.clock = a.clock  # one wall clock, as on one host
        b.check.clock = a.clock
        assert greylisted(await a.rcpt(rcpt="one@dest.test"), 300)
        a.step(100)
        assert greylisted(await b.rcpt(rcpt="one@dest.test"), 200)  # b knows a's first sighting
        assert greylisted(await b.rcpt(rcpt="two@dest.test"), 300)
        a.step(DELAY)
        assert await b.rcpt(rcpt="one@dest.test") is None
        assert await a.rcpt(rcpt="two@dest.test") is None  # the second pass of this network, made on a ...
        assert await b.rcpt(rcpt="never-seen@dest.test") is None  # ... allows the network on b too
    finally:
        await first.aclose()
        await second.aclose()


async def test_redis_network_counts_are_atomic(redis_prefix: str) -> None:
    stores = [RedisGreylistStore(REDIS_URL, prefix=redis_prefix) for _ in range(2)]
    try:
        now = 1_700_000_000.0
        counts = await asyncio.gather(*(stores[n % 2].add_network_pass("192.0.2.0/24", 1, now + 60, now)
                                        for n in range(40)))
        assert sorted(counts) == list(range(1, 41))  # no two increments read the same old count
        assert await stores[0].network_passes("192.0.2.0/24", now) == 40
        assert await stores[1].network_passes("192.0.2.0/24", now + 60) == 0  # expired by its own time
        assert await stores[1].add_network_pass("192.0.2.0/24", 1, now + 200, now + 100) == 1  # lapsed: restarts
    finally:
        for store in stores:
            await store.aclose()


async def test_redis_store_never_returns_expired_entries_and_keys_expire_in_redis(redis_prefix: str) -> None:
    import redis.asyncio

    store = RedisGreylistStore(REDIS_URL, prefix=redis_prefix)
    client = redis.asyncio.Redis.from_url(REDIS_URL)
    try:
        await store.put("k", Triplet(1000.0, False), expires=1300.0, now=1000.0)
        assert await store.get("k", now=1299.0) == Triplet(1000.0, False)
        assert await store.get("k", now=1300.0) is None
        ttl = await client.pttl(f"{redis_prefix}t:k")
        assert 300_000 < ttl <= (300 + RedisGreylistStore.TTL_SLACK) * 1000  # Redis drops it soon after
        await client.set(f"{redis_prefix}t:junk", b"not a triplet")
        assert await store.get("junk", now=0.0) is None  # a foreign value is a new triplet, not an error
    finally:
        await client.aclose()
        await store.aclose()


async def test_redis_down_fails_open(caplog: pytest.LogCaptureFixture) -> None:
    pytest.importorskip("redis")
    with socket.socket() as probe:  # a loopback port with nothing listening
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    store = RedisGreylistStore(f"redis://127.0.0.1:{port}/0", timeout=0.5)
    try:
        rig = Rig(store=store, auto_allow_after=2)
        with caplog.at_level(logging.WARNING, logger="mailhop.checks.greylist"):
            for n in range(3):
                assert await rig.rcpt(rcpt=f"u{n}@dest.test") is None  # mail flows ungreylisted
        assert caplog.text.count("redis unavailable") == 1  # warned once, not once per attempt
    finally:
        await store.aclose()


class _UnavailableStore(MemoryGreylistStore):
    """A store whose reads fail as a shared store's do when its server is away (pure logic of the check)."""

    def __init__(self, *, network_too: bool) -> None:
        super().__init__()
        self.network_too = network_too
        self.writes: list[str] = []

    async def get(self, key: str, now: float) -> Triplet | None:
        raise StoreUnavailable("down")

    async def network_passes(self, network: str, now: float) -> int:
        if self.network_too:
            raise StoreUnavailable("down")
        return 0

    async def put(self, key: str, triplet: Triplet, expires: float, now: float) -> None:
        self.writes.append(key)

    async def add_network_pass(self, network: str, amount: int, expires: float, now: float) -> int:
        self.writes.append(network)
        return 0


@pytest.mark.parametrize("network_too", [False, True])
async def test_an_unavailable_store_lets_mail_through_and_records_nothing(network_too: bool) -> None:
    """Fail-open must not turn a read error into a remembered pass (which would skip greylisting for this triplet
    for ``expire`` once the store is back)."""
    store = _UnavailableStore(network_too=network_too)
    rig = Rig(store=store, auto_allow_after=2)
    assert await rig.rcpt() is None
    assert store.writes == []


async def test_a_hung_redis_costs_one_timeout_then_fails_fast(caplog: pytest.LogCaptureFixture) -> None:
    """A server that accepts and never answers: the first RCPT waits for the store's timeout, the next ones (for
    RETRY_AFTER) do not wait at all; all pass, none is recorded, one warning."""
    pytest.importorskip("redis")
    accepted: list[asyncio.StreamWriter] = []

    async def silent(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # keep it open, say nothing

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    store = RedisGreylistStore(f"redis://127.0.0.1:{port}/0", timeout=0.3)
    try:
        rig = Rig(store=store)
        loop = asyncio.get_running_loop()
        with caplog.at_level(logging.WARNING, logger="mailhop.checks.greylist"):
            started = loop.time()
            assert await rig.rcpt(rcpt="first@dest.test") is None
            first = loop.time() - started
            started = loop.time()
            for n in range(5):
                assert await rig.rcpt(rcpt=f"u{n}@dest.test") is None
            rest = loop.time() - started
        assert first >= 0.25 and rest < 0.1, (first, rest)
        assert accepted  # it did try the server
        assert caplog.text.count("redis unavailable") == 1
    finally:
        await store.aclose()
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()
