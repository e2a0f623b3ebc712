"""SpfCheck through a loopback DNS server and the real Resolver: results, actions and replies per result."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import pytest

from mailhop.checks.api import Action, AuthResult, CheckContext
from mailhop.checks.spf import SpfCheck, SpfOutcome
from mailhop.config.checks import SpfConfig
from mailhop.dns import Resolver
from tests.support.dnsserver import TestDns

pytestmark = pytest.mark.anyio

CLIENT = "192.0.2.1"


def publish(dns: TestDns) -> None:
    dns.add(
        'pass.test. 300 IN TXT "v=spf1 ip4:192.0.2.1 -all"',
        'fail.test. 300 IN TXT "v=spf1 ip4:198.51.100.1 -all"',
        'soft.test. 300 IN TXT "v=spf1 ~all"',
        'neutral.test. 300 IN TXT "v=spf1 ?all"',
        "none.test. 300 IN A 192.0.2.9",
        'none.test. 300 IN TXT "not an spf record"',
        'syntax.test. 300 IN TXT "v=spf1 ip4:192.0.2.300 -all"',
        'many.test. 300 IN TXT "v=spf1 ' + " ".join(f"include:i{n}.test" for n in range(11)) + ' -all"',
        *(f'i{n}.test. 300 IN TXT "v=spf1 -all"' for n in range(11)),
        'mx.good.test. 300 IN TXT "v=spf1 ip4:192.0.2.0/24 -all"',
        'mx.bad.test. 300 IN TXT "v=spf1 -all"',
        "servfail.test. 300 IN A 192.0.2.9",
        "drop.test. 300 IN A 192.0.2.9",
    )
    dns.zone.servfail.add("servfail.test")
    dns.zone.drop.add("drop.test")


def context(sender: str, helo: str = "mx.good.test", **kw: Any) -> CheckContext:
    ctx = CheckContext(client_ip=CLIENT, helo=helo, **kw)
    ctx.sender = sender
    return ctx


MAILFROM = "smtp.mailfrom"
HELO = "smtp.helo"

# (id, MAIL FROM, HELO, config, action, reply code, enhanced code, spf result, (ptype.property, value))
CASES: list[tuple[str, str, str, dict[str, Any], Action, int | None, str | None, str, tuple[str, str]]] = [
    ("pass", "a@pass.test", "mx.good.test", {}, Action.CONTINUE, None, None, "pass", (MAILFROM, "a@pass.test")),
    ("fail-reject", "a@fail.test", "mx.good.test", {}, Action.REJECT, 550, "5.7.23", "fail",
     (MAILFROM, "a@fail.test")),
    ("fail-tempfail", "a@fail.test", "mx.good.test", {"on_fail": "tempfail"}, Action.TEMPFAIL, 451, "4.7.24",
     "fail", (MAILFROM, "a@fail.test")),
    ("fail-quarantine", "a@fail.test", "mx.good.test", {"on_fail": "quarantine"}, Action.QUARANTINE, None, None,
     "fail", (MAILFROM, "a@fail.test")),
    ("fail-tag", "a@fail.test", "mx.good.test", {"on_fail": "tag"}, Action.CONTINUE, None, None, "fail",
     (MAILFROM, "a@fail.test")),
    ("softfail-tag", "a@soft.test", "mx.good.test", {}, Action.CONTINUE, None, None, "softfail",
     (MAILFROM, "a@soft.test")),
    ("softfail-reject", "a@soft.test", "mx.good.test", {"on_softfail": "reject"}, Action.REJECT, 550, "5.7.23",
     "softfail", (MAILFROM, "a@soft.test")),
    ("neutral", "a@neutral.test", "mx.good.test", {}, Action.CONTINUE, None, None, "neutral",
     (MAILFROM, "a@neutral.test")),
    ("none-no-record", "a@none.test", "mx.good.test", {}, Action.CONTINUE, None, None, "none",
     (MAILFROM, "a@none.test")),
    ("none-nxdomain", "a@nowhere.test", "mx.good.test", {}, Action.CONTINUE, None, None, "none",
     (MAILFROM, "a@nowhere.test")),
    ("temperror-servfail-tempfail", "a@servfail.test", "mx.good.test", {"on_temperror": "tempfail"},
     Action.TEMPFAIL, 451, "4.7.24", "temperror", (MAILFROM, "a@servfail.test")),
    ("temperror-servfail-reject", "a@servfail.test", "mx.good.test", {"on_temperror": "reject"},
     Action.REJECT, 550, "5.7.24", "temperror", (MAILFROM, "a@servfail.test")),
    ("temperror-timeout-tag", "a@drop.test", "mx.good.test", {}, Action.CONTINUE, None, None, "temperror",
     (MAILFROM, "a@drop.test")),
    ("permerror-syntax-reject", "a@syntax.test", "mx.good.test", {"on_permerror": "reject"}, Action.REJECT, 550,
     "5.7.24", "permerror", (MAILFROM, "a@syntax.test")),
    ("permerror-too-many-lookups", "a@many.test", "mx.good.test", {}, Action.CONTINUE, None, None, "permerror",
     (MAILFROM, "a@many.test")),
    ("null-sender-helo-pass", "", "mx.good.test", {}, Action.CONTINUE, None, None, "pass", (HELO, "mx.good.test")),
    ("null-sender-helo-fail", "", "mx.bad.test", {}, Action.REJECT, 550, "5.7.23", "fail", (HELO, "mx.bad.test")),
    ("null-sender-without-helo-check", "", "mx.bad.test", {"helo": False}, Action.REJECT, 550, "5.7.23", "fail",
     (HELO, "mx.bad.test")),
    ("helo-fail-decides", "a@pass.test", "mx.bad.test", {}, Action.REJECT, 550, "5.7.23", "fail",
     (HELO, "mx.bad.test")),
    ("helo-check-off", "a@pass.test", "mx.bad.test", {"helo": False}, Action.CONTINUE, None, None, "pass",
     (MAILFROM, "a@pass.test")),
    ("helo-pass-then-mailfrom-fail", "a@fail.test", "mx.good.test", {}, Action.REJECT, 550, "5.7.23", "fail",
     (MAILFROM, "a@fail.test")),
]


@pytest.mark.parametrize(("sender", "helo", "config", "action", "code", "enhanced", "result", "prop"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
async def test_spf_results(clean_dns: TestDns, clean_resolver: Resolver, sender: str, helo: str,
                           config: dict[str, Any], action: Action, code: int | None, enhanced: str | None,
                           result: str, prop: tuple[str, str]) -> None:
    publish(clean_dns)
    check = SpfCheck(SpfConfig(enabled=True, **config), clean_resolver)
    ctx = context(sender, helo)
    try:
        verdict = await check.mail(ctx)
    finally:
        await check.aclose()
    assert verdict is not None
    assert verdict.action is action
    if code is None:
        assert verdict.reply is None
    else:
        assert verdict.reply is not None and (verdict.reply.code, verdict.reply.enhanced) == (code, enhanced)
    assert verdict.auth_results == (AuthResult("spf", result, properties=(prop,)),)
    outcome = ctx.results["spf"]
    assert isinstance(outcome, SpfOutcome) and outcome.result == result
    expected_domain = prop[1].rpartition("@")[2]
    assert outcome.domain == expected_domain
    assert outcome.identity == ("helo" if prop[0] == HELO else "mailfrom")


async def test_reject_reply_names_domain_and_client(clean_dns: TestDns, clean_resolver: Resolver) -> None:
    publish(clean_dns)
    clean_dns.add('exp.fail.test. 300 IN TXT "go away %{i}"', 'xfail.test. 300 IN TXT "v=spf1 -all exp=exp.fail.test"')
    check = SpfCheck(SpfConfig(enabled=True), clean_resolver)
    ctx = context("a@xfail.test")
    try:
        verdict = await check.mail(ctx)
    finally:
        await check.aclose()
    assert verdict is not None and verdict.reply is not None
    assert "xfail.test" in verdict.reply.text and CLIENT in verdict.reply.text
    assert "go away" not in verdict.reply.text  # the domain's explanation stays out of our reply ...
    assert ctx.results["spf"].explanation == f"go away {CLIENT}"  # ... but is kept for the log


@pytest.mark.parametrize("who", ["authenticated", "trusted"])
async def test_skips_authenticated_and_trusted(clean_dns: TestDns, clean_resolver: Resolver, who: str) -> None:
    publish(clean_dns)
    check = SpfCheck(SpfConfig(enabled=True), clean_resolver)
    ctx = context("a@fail.test", user="alice") if who == "authenticated" else context("a@fail.test", trusted=True)
    try:
        assert await check.mail(ctx) is None
    finally:
        await check.aclose()
    assert "spf" not in ctx.results and not ctx.session


async def test_helo_result_is_cached_per_session(clean_dns: TestDns, clean_resolver: Resolver) -> None:
    publish(clean_dns)
    check = SpfCheck(SpfConfig(enabled=True), clean_resolver)
    ctx = context("a@pass.test", "mx.good.test")
    try:
        first = await check.mail(ctx)
        assert first is not None and first.action is Action.CONTINUE
        key, cached = ctx.session["spf.helo"]
        assert key == (CLIENT, "mx.good.test") and cached.result == "pass"
        # A planted cached result proves the next transaction reads the cache instead of asking DNS again.
        ctx.session["spf.helo"] = (key, dataclasses.replace(cached, result="fail"))
        ctx.reset_transaction()
        ctx.sender = "a@pass.test"
        second = await check.mail(ctx)
        assert second is not None and second.action is Action.REJECT
        # A new HELO name is evaluated afresh.
        ctx.helo = "mx.bad.test"
        ctx.reset_transaction()
        ctx.sender = "a@pass.test"
        await check.mail(ctx)
        assert ctx.session["spf.helo"][0] == (CLIENT, "mx.bad.test")
    finally:
        await check.aclose()


async def test_concurrent_checks_keep_their_own_resolver(clean_dns: TestDns, clean_resolver: Resolver) -> None:
    """Two checks with different DNS servers evaluating at once never see each other's answers (pyspf's lookup
    global is dispatched per worker thread, not swapped per call)."""
    clean_dns.add('x.test. 300 IN TXT "v=spf1 ip4:192.0.2.1 -all"')
    with TestDns(origins=("test",)) as other:
        other.add('x.test. 300 IN TXT "v=spf1 -all"')
        good = SpfCheck(SpfConfig(enabled=True, threads=3), clean_resolver)
        bad = SpfCheck(SpfConfig(enabled=True, threads=3), Resolver([other.nameserver], timeout=1.0, lifetime=2.0))
        try:
            runs = [(good if i % 2 else bad).evaluate(CLIENT, f"u{i}@x.test", "mx.good.test") for i in range(24)]
            outcomes = await asyncio.gather(*runs)
        finally:
            await good.aclose()
            await bad.aclose()
    assert [o.result for o in outcomes] == ["fail" if i % 2 == 0 else "pass" for i in range(24)]


async def test_pyspf_outside_our_workers_keeps_its_own_lookup() -> None:
    import spf

    from mailhop.checks import dnsfunc

    dnsfunc.install_spf_dispatch()
    dnsfunc.install_spf_dispatch()  # idempotent: the fallback is pyspf's original, not our dispatcher
    assert spf.DNSLookup is dnsfunc._dispatch
    assert dnsfunc._fallback is not dnsfunc._dispatch and dnsfunc._fallback is not None
