"""The policy chain's own rules: ordering by requires, deadlines, the error policy, combining verdicts."""

from __future__ import annotations

import asyncio

import pytest

from mailhop.checks.api import (
    Action,
    AuthResult,
    Check,
    CheckContext,
    FunctionCheck,
    HeaderEdit,
    Phase,
    Verdict,
    accept,
    add_header,
    quarantine,
    reject,
    tempfail,
)
from mailhop.checks.chain import ChainError, PolicyChain, order_checks

pytestmark = pytest.mark.anyio


class Recorder(Check):
    def __init__(self, name: str, verdict: Verdict | None = None, requires: tuple[str, ...] = (),
                 log: list[str] | None = None, delay: float = 0.0, error: bool = False) -> None:
        self.name, self.requires, self.verdict = name, requires, verdict
        self.log = log if log is not None else []
        self.delay, self.error = delay, error

    async def data(self, ctx: CheckContext) -> Verdict | None:
        self.log.append(self.name)
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.error:
            raise RuntimeError("boom")
        return self.verdict


def ctx() -> CheckContext:
    return CheckContext(client_ip="192.0.2.1")


def test_order_respects_requires_and_keeps_config_order_otherwise() -> None:
    a, b, c = Recorder("dmarc", requires=("spf", "dkim")), Recorder("spf"), Recorder("dkim")
    assert [x.name for x in order_checks([a, b, c])] == ["spf", "dkim", "dmarc"]
    assert [x.name for x in order_checks([b, c, a])] == ["spf", "dkim", "dmarc"]
    with pytest.raises(ChainError, match="needs check 'dkim'"):
        order_checks([Recorder("dmarc", requires=("dkim",))])
    with pytest.raises(ChainError, match="circle"):
        order_checks([Recorder("x", requires=("y",)), Recorder("y", requires=("x",))])


def test_phases_found_from_overridden_hooks() -> None:
    assert Recorder("r").phases() == frozenset({Phase.DATA})

    async def f(c: CheckContext) -> Verdict | None:
        return None

    assert FunctionCheck("f", Phase.RCPT, f).phases() == frozenset({Phase.RCPT})


async def test_reject_stops_the_phase_and_wins() -> None:
    log: list[str] = []
    chain = PolicyChain([Recorder("a", add_header("X-A", "1"), log=log), Recorder("b", reject("no"), log=log),
                         Recorder("c", None, log=log)])
    c = ctx()
    v = await chain.run(Phase.DATA, c)
    assert v.action is Action.REJECT and v.reply is not None and (v.reply.code, v.reply.enhanced) == (550, "5.7.1")
    assert log == ["a", "b"]  # c never ran
    assert c.header_edits == [HeaderEdit("add", "X-A", "1")]


async def test_accept_skips_the_rest_of_the_phase() -> None:
    log: list[str] = []
    chain = PolicyChain([Recorder("allow", accept("listed"), log=log), Recorder("b", reject("no"), log=log)])
    v = await chain.run(Phase.DATA, ctx())
    assert v.action is Action.ACCEPT and log == ["allow"]


async def test_quarantine_is_recorded_and_does_not_stop_later_checks() -> None:
    log: list[str] = []
    chain = PolicyChain([Recorder("q", quarantine("spammy"), log=log), Recorder("t", tempfail("later"), log=log)])
    c = ctx()
    v = await chain.run(Phase.DATA, c)
    assert log == ["q", "t"] and v.action is Action.TEMPFAIL
    assert c.quarantine_reason == "q: spammy"
    c2 = ctx()
    v2 = await PolicyChain([Recorder("q", quarantine("spammy"))]).run(Phase.DATA, c2)
    assert v2.action is Action.CONTINUE and c2.quarantine_reason == "q: spammy"


async def test_auth_results_accumulate_across_phases_until_reset() -> None:
    class Spf(Check):
        name = "spf"

        async def mail(self, ctx: CheckContext) -> Verdict | None:
            return Verdict(auth_results=(AuthResult("spf", "pass"),))

    class Dkim(Check):
        name = "dkim"

        async def data(self, ctx: CheckContext) -> Verdict | None:
            return Verdict(auth_results=(AuthResult("dkim", "none"),))

    chain = PolicyChain([Spf(), Dkim()])
    c = ctx()
    await chain.run(Phase.MAIL, c)
    await chain.run(Phase.DATA, c)
    assert [r.method for r in c.auth_results] == ["spf", "dkim"]
    c.reset_transaction()
    assert c.auth_results == [] and c.header_edits == []


@pytest.mark.parametrize("on_error", ["tempfail", "accept"])
async def test_errors_and_timeouts_follow_the_error_policy(on_error: str) -> None:
    for bad in (Recorder("slow", delay=5), Recorder("broken", error=True)):
        chain = PolicyChain([bad, Recorder("after", add_header("X-After", "1"))], timeout=0.2,
                            on_error=on_error)  # type: ignore[arg-type]
        c = ctx()
        v = await chain.run(Phase.DATA, c)
        if on_error == "tempfail":
            assert v.action is Action.TEMPFAIL and v.reply is not None and v.reply.code == 451
            assert v.reply.enhanced == "4.7.0" and c.header_edits == []
        else:
            assert v.action is Action.CONTINUE and c.header_edits == [HeaderEdit("add", "X-After", "1")]


def test_verdict_constructors_refuse_wrong_codes() -> None:
    with pytest.raises(ValueError):
        reject("x", code=451)
    with pytest.raises(ValueError):
        tempfail("x", enhanced="5.7.1")
    assert reject("x", code=554, enhanced="5.7.0").reply is not None
