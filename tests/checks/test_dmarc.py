"""DmarcCheck: DMARC records and the Tree Walk through a loopback DNS server; SPF and DKIM outcomes given as the
SPF and DKIM checks record them (one end-to-end case runs all three through a PolicyChain)."""

from __future__ import annotations

from typing import Any

import pytest

from mailhop.checks.api import Action, AuthResult, CheckContext, Phase
from mailhop.checks.chain import PolicyChain
from mailhop.checks.dkimverify import DkimCheck, DkimSignatureResult
from mailhop.checks.dmarc import DmarcCheck, DmarcOutcome, parse_record, walk_names
from mailhop.checks.spf import SpfCheck, SpfOutcome
from mailhop.config.checks import DkimVerifyConfig, DmarcConfig, SpfConfig
from mailhop.dns import Resolver
from tests.support.dnsserver import TestDns

pytestmark = pytest.mark.anyio

DEEP = "a.b.c.d.e.f.g.h.i.deep.test"


def publish(dns: TestDns) -> None:
    dns.add(
        '_dmarc.example.test. 300 IN TXT "v=DMARC1; p=reject; sp=quarantine; np=reject; rua=mailto:r@example.test"',
        "example.test. 300 IN A 192.0.2.10",
        "mail.example.test. 300 IN A 192.0.2.11",
        '_dmarc.strict.test. 300 IN TXT "v=DMARC1; p=reject; adkim=s; aspf=s"',
        '_dmarc.quar.test. 300 IN TXT "v=DMARC1; p=quarantine"',
        '_dmarc.monitor.test. 300 IN TXT "v=DMARC1; p=none"',
        '_dmarc.pct0.test. 300 IN TXT "v=DMARC1; p=reject; pct=0"',
        '_dmarc.pct50.test. 300 IN TXT "v=DMARC1; p=reject; pct=50"',
        '_dmarc.pct100.test. 300 IN TXT "v=DMARC1; p=reject; pct=100"',
        '_dmarc.testing.test. 300 IN TXT "v=DMARC1; p=reject; t=y"',
        '_dmarc.deep.test. 300 IN TXT "v=DMARC1; p=reject"',
        f"{DEEP}. 300 IN A 192.0.2.12",
        '_dmarc.psd.test. 300 IN TXT "v=DMARC1; p=reject; psd=y"',
        "x.a.psd.test. 300 IN A 192.0.2.13",
        '_dmarc.twice.test. 300 IN TXT "v=DMARC1; p=reject"',
        '_dmarc.twice.test. 300 IN TXT "v=DMARC1; p=none"',
        "tempfail.test. 300 IN A 192.0.2.14",
    )
    dns.zone.servfail.add("_dmarc.tempfail.test")


def spf(result: str, domain: str, identity: str = "mailfrom") -> SpfOutcome:
    return SpfOutcome(result, domain, "", identity)  # type: ignore[arg-type]


def dkim(result: str, domain: str) -> DkimSignatureResult:
    return DkimSignatureResult(domain, "sel", result)


def context(from_: str | list[str] | None, spf_outcome: SpfOutcome | None = None,
            dkim_results: list[DkimSignatureResult] | None = None, sender: str = "bounce@elsewhere.test",
            **kw: Any) -> CheckContext:
    ctx = CheckContext(client_ip="192.0.2.1", **kw)
    ctx.sender = sender
    froms = [] if from_ is None else [from_] if isinstance(from_, str) else from_
    ctx.header_block = b"".join(f"From: {f}\r\n".encode() for f in froms) + b"Subject: hello\r\nTo: b@dest.test"
    if spf_outcome is not None:
        ctx.results["spf"] = spf_outcome
    ctx.results["dkim"] = [] if dkim_results is None else dkim_results
    return ctx


async def evaluate(resolver: Resolver, ctx: CheckContext, sample: float = 0.5, **config: Any) -> Any:
    check = DmarcCheck(DmarcConfig(enabled=True, **config), resolver, sample=lambda: sample)
    return await check.data(ctx)


FAIL_SPF = spf("fail", "elsewhere.test")

# (id, From, SPF outcome, DKIM results, config, result, disposition, action, reply code)
CASES: list[tuple[str, Any, SpfOutcome | None, list[DkimSignatureResult], dict[str, Any], str, str, Action,
                  int | None]] = [
    ("spf-aligned-exact", "a@example.test", spf("pass", "example.test"), [], {}, "pass", "none", Action.CONTINUE,
     None),
    ("spf-aligned-relaxed", "a@example.test", spf("pass", "bounce.example.test"), [], {}, "pass", "none",
     Action.CONTINUE, None),
    ("dkim-aligned-exact", "A <a@Example.Test>", FAIL_SPF, [dkim("pass", "example.test")], {}, "pass", "none",
     Action.CONTINUE, None),
    ("dkim-aligned-relaxed", "a@example.test", FAIL_SPF, [dkim("fail", "example.test"),
                                                          dkim("pass", "mail.example.test")], {}, "pass", "none",
     Action.CONTINUE, None),
    ("strict-dkim-mismatch", "a@strict.test", FAIL_SPF, [dkim("pass", "mail.strict.test")], {}, "fail", "reject",
     Action.REJECT, 550),
    ("strict-spf-mismatch", "a@strict.test", spf("pass", "bounce.strict.test"), [], {}, "fail", "reject",
     Action.REJECT, 550),
    ("strict-exact-passes", "a@strict.test", spf("pass", "strict.test"), [], {}, "pass", "none", Action.CONTINUE,
     None),
    ("unrelated-domains", "a@example.test", spf("pass", "elsewhere.test"), [dkim("pass", "other.test")], {},
     "fail", "reject", Action.REJECT, 550),
    ("failed-signature-does-not-count", "a@example.test", FAIL_SPF, [dkim("fail", "example.test")], {}, "fail",
     "reject", Action.REJECT, 550),
    ("p-quarantine", "a@quar.test", FAIL_SPF, [], {}, "fail", "quarantine", Action.QUARANTINE, None),
    ("p-none", "a@monitor.test", FAIL_SPF, [], {}, "fail", "none", Action.CONTINUE, None),
    ("sp-existing-subdomain", "a@mail.example.test", FAIL_SPF, [], {}, "fail", "quarantine", Action.QUARANTINE,
     None),
    ("np-nonexistent-subdomain", "a@ghost.example.test", FAIL_SPF, [], {}, "fail", "reject", Action.REJECT, 550),
    ("no-record", "a@nothing.test", FAIL_SPF, [], {}, "none", "none", Action.CONTINUE, None),
    ("several-records-are-none", "a@twice.test", FAIL_SPF, [], {}, "none", "none", Action.CONTINUE, None),
    ("tree-walk-deep", f"a@{DEEP}", FAIL_SPF, [], {}, "fail", "reject", Action.REJECT, 550),
    ("tree-walk-deep-relaxed-pass", f"a@{DEEP}", FAIL_SPF, [dkim("pass", "deep.test")], {}, "pass", "none",
     Action.CONTINUE, None),
    ("psd-org-domain-aligns", "a@x.a.psd.test", FAIL_SPF, [dkim("pass", "a.psd.test")], {}, "pass", "none",
     Action.CONTINUE, None),
    ("psd-siblings-do-not-align", "a@x.a.psd.test", FAIL_SPF, [dkim("pass", "b.psd.test")], {}, "fail", "reject",
     Action.REJECT, 550),
    ("record-temperror", "a@tempfail.test", spf("pass", "tempfail.test"), [], {}, "temperror", "none",
     Action.CONTINUE, None),
    ("aligned-spf-temperror", "a@example.test", spf("temperror", "example.test"), [], {}, "temperror", "none",
     Action.CONTINUE, None),
    ("aligned-dkim-temperror", "a@example.test", FAIL_SPF, [dkim("temperror", "example.test")], {}, "temperror",
     "none", Action.CONTINUE, None),
    ("pct-0", "a@pct0.test", FAIL_SPF, [], {}, "fail", "quarantine", Action.QUARANTINE, None),
    ("pct-100", "a@pct100.test", FAIL_SPF, [], {}, "fail", "reject", Action.REJECT, 550),
    ("pct-0-not-applied", "a@pct0.test", FAIL_SPF, [], {"apply_pct": False}, "fail", "reject", Action.REJECT, 550),
    ("testing-mode", "a@testing.test", FAIL_SPF, [], {}, "fail", "quarantine", Action.QUARANTINE, None),
    ("on-reject-tag", "a@example.test", FAIL_SPF, [], {"on_reject": "tag"}, "fail", "reject", Action.CONTINUE,
     None),
    ("on-reject-tempfail", "a@example.test", FAIL_SPF, [], {"on_reject": "tempfail"}, "fail", "reject",
     Action.TEMPFAIL, 451),
    ("on-quarantine-reject", "a@quar.test", FAIL_SPF, [], {"on_quarantine": "reject"}, "fail", "quarantine",
     Action.REJECT, 550),
    ("no-from", None, FAIL_SPF, [], {}, "none", "none", Action.CONTINUE, None),
    ("several-from-fields", ["a@example.test", "b@example.test"], FAIL_SPF, [], {}, "permerror", "none",
     Action.CONTINUE, None),
    ("from-in-two-domains", "a@example.test, b@quar.test", FAIL_SPF, [], {}, "permerror", "none",
     Action.CONTINUE, None),
    ("from-twice-one-domain", "a@example.test, b@example.test", spf("pass", "example.test"), [], {}, "pass",
     "none", Action.CONTINUE, None),
    ("from-without-domain", "undisclosed-recipients:;", FAIL_SPF, [], {}, "permerror", "none", Action.CONTINUE,
     None),
]


@pytest.mark.parametrize(("from_", "spf_outcome", "dkim_results", "config", "result", "disposition", "action",
                          "code"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
async def test_dmarc(clean_dns: TestDns, clean_resolver: Resolver, from_: Any, spf_outcome: SpfOutcome | None,
                     dkim_results: list[DkimSignatureResult], config: dict[str, Any], result: str,
                     disposition: str, action: Action, code: int | None) -> None:
    publish(clean_dns)
    ctx = context(from_, spf_outcome, dkim_results)
    verdict = await evaluate(clean_resolver, ctx, **config)
    outcome = ctx.results["dmarc"]
    assert isinstance(outcome, DmarcOutcome)
    assert (outcome.result, outcome.disposition) == (result, disposition), outcome.reason
    assert verdict.action is action
    [auth] = verdict.auth_results
    assert (auth.method, auth.result) == ("dmarc", result)
    if outcome.from_domain:
        assert auth.properties == (("header.from", outcome.from_domain),)
    if code is None:
        assert verdict.reply is None
    else:
        assert verdict.reply is not None and verdict.reply.code == code
    if code == 550:
        assert verdict.reply is not None and verdict.reply.enhanced == "5.7.1"
        assert verdict.reply.text == f"Rejected by DMARC policy for {outcome.from_domain}"


async def test_reject_reply_and_result_details(clean_dns: TestDns, clean_resolver: Resolver) -> None:
    publish(clean_dns)
    ctx = context("Alice <alice@example.test>", FAIL_SPF, [dkim("pass", "other.test")])
    verdict = await evaluate(clean_resolver, ctx)
    assert verdict.reply is not None and str(verdict.reply) == "550 5.7.1 Rejected by DMARC policy for example.test"
    assert verdict.auth_results == (AuthResult("dmarc", "fail", "p=reject sp=quarantine dis=reject",
                                               (("header.from", "example.test"),)),)
    outcome = ctx.results["dmarc"]
    assert (outcome.record_domain, outcome.policy, outcome.spf_aligned, outcome.dkim_aligned) == (
        "example.test", "reject", False, False)


async def test_deep_walk_asks_at_most_eight_names(clean_dns: TestDns, clean_resolver: Resolver) -> None:
    publish(clean_dns)
    assert walk_names(DEEP) == [DEEP, "e.f.g.h.i.deep.test", "f.g.h.i.deep.test", "g.h.i.deep.test",
                                "h.i.deep.test", "i.deep.test", "deep.test", "test"]
    ctx = context(f"a@{DEEP}", FAIL_SPF, [])
    await evaluate(clean_resolver, ctx)
    assert ctx.results["dmarc"].record_domain == "deep.test"


@pytest.mark.parametrize(("sample", "disposition"), [(0.3, "reject"), (0.7, "quarantine")])
async def test_pct_sampling(clean_dns: TestDns, clean_resolver: Resolver, sample: float, disposition: str) -> None:
    publish(clean_dns)
    ctx = context("a@pct50.test", FAIL_SPF, [])
    await evaluate(clean_resolver, ctx, sample=sample)
    assert ctx.results["dmarc"].disposition == disposition


async def test_null_sender_uses_helo_spf(clean_dns: TestDns, clean_resolver: Resolver) -> None:
    publish(clean_dns)
    ctx = context("a@example.test", spf("pass", "mx.example.test", "helo"), [], sender="")
    await evaluate(clean_resolver, ctx)
    assert ctx.results["dmarc"].result == "pass" and ctx.results["dmarc"].spf_aligned


async def test_helo_spf_does_not_count_for_a_real_sender(clean_dns: TestDns, clean_resolver: Resolver) -> None:
    publish(clean_dns)
    ctx = context("a@example.test", spf("pass", "example.test", "helo"), [])
    await evaluate(clean_resolver, ctx)
    assert ctx.results["dmarc"].result == "fail"


async def test_dkim_not_verified_is_permerror_without_action(clean_dns: TestDns, clean_resolver: Resolver) -> None:
    publish(clean_dns)
    ctx = context("a@example.test", FAIL_SPF, [])
    del ctx.results["dkim"]  # the message was over the scan size
    verdict = await evaluate(clean_resolver, ctx)
    assert ctx.results["dmarc"].result == "permerror" and verdict.action is Action.CONTINUE


@pytest.mark.parametrize("who", ["authenticated", "trusted"])
async def test_skips_authenticated_and_trusted(clean_dns: TestDns, clean_resolver: Resolver, who: str) -> None:
    publish(clean_dns)
    kw: dict[str, Any] = {"user": "alice"} if who == "authenticated" else {"trusted": True}
    ctx = context("a@example.test", FAIL_SPF, [], **kw)
    assert await evaluate(clean_resolver, ctx) is None
    assert "dmarc" not in ctx.results


def test_record_parsing() -> None:
    rec = parse_record("v=DMARC1;p=Quarantine; SP=reject ;adkim=s; pct=30; psd=n; fo=1; bogus", "x.test")
    assert rec is not None
    assert (rec.p, rec.sp, rec.np, rec.adkim, rec.aspf, rec.pct, rec.psd) == ("quarantine", "reject", None, "s",
                                                                               "r", 30, "n")
    assert parse_record("v=spf1 -all", "x.test") is None
    assert parse_record("p=reject; v=DMARC1", "x.test") is None  # v= must come first
    assert parse_record("v=DMARC1; p=bogus; pct=150", "x.test") == parse_record("v=DMARC1", "x.test")


async def test_end_to_end_with_spf_and_dkim(clean_dns: TestDns, clean_resolver: Resolver) -> None:
    """SPF at MAIL and DKIM at end of data feed DMARC through a real chain: an unsigned message whose MAIL FROM
    fails SPF (tagged only) is refused by the From domain's p=reject."""
    publish(clean_dns)
    clean_dns.add('bounce.example.test. 300 IN TXT "v=spf1 ip4:198.51.100.0/24 -all"')
    spf_check = SpfCheck(SpfConfig(enabled=True, on_fail="tag"), clean_resolver)
    dkim_check = DkimCheck(DkimVerifyConfig(enabled=True), clean_resolver)
    dmarc_check = DmarcCheck(DmarcConfig(enabled=True), clean_resolver)
    chain = PolicyChain([dmarc_check, spf_check, dkim_check])
    assert [c.name for c in chain.checks] == ["spf", "dkim", "dmarc"]
    ctx = CheckContext(client_ip="192.0.2.1", helo="mx.elsewhere.test")
    try:
        ctx.sender = "b@bounce.example.test"
        assert (await chain.run(Phase.MAIL, ctx)).action is Action.CONTINUE
        ctx.message = b"From: a@example.test\r\nSubject: hi\r\n\r\nhello\r\n"
        ctx.header_block = b"From: a@example.test\r\nSubject: hi"
        verdict = await chain.run(Phase.DATA, ctx)
    finally:
        await chain.aclose()
    assert verdict.action is Action.REJECT and verdict.reply is not None and verdict.reply.code == 550
    assert [(a.method, a.result) for a in ctx.auth_results] == [("spf", "fail"), ("dkim", "none"),
                                                                 ("dmarc", "fail")]
