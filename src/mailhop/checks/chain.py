"""The policy chain: runs the checks of one listener, phase by phase, and combines their verdicts.

Order: checks run in the configured order, except that a check runs after every check it ``requires`` (DMARC
after SPF and DKIM). Within a phase they run one after another: a terminal verdict (accept, reject, tempfail,
discard) ends the phase, so a cheap check that rejects saves the cost of the expensive ones after it.

Failure containment: each hook runs under ``timeout``. A hook that raises or overruns does not end the session;
the chain logs it and applies ``on_error``: "tempfail" answers 451 4.7.0 (the client retries; nothing is lost),
"accept" carries on as if the check had no opinion (fail-open, for checks that must never block mail).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Literal

from ..reply import Reply
from .api import SEVERITY, Action, Check, CheckContext, Phase, Verdict

__all__ = ["ChainError", "PolicyChain", "order_checks"]

log = logging.getLogger("mailhop.checks")

_ERROR_REPLY = Reply(451, "4.7.0", "Temporary failure in a policy check; try again later")
_DEFAULT_REJECT = Reply(550, "5.7.1", "Message refused by policy")
_DEFAULT_TEMPFAIL = Reply(451, "4.7.1", "Try again later")


class ChainError(ValueError):
    """The chain's checks cannot be ordered (a missing or circular requirement)."""


def order_checks(checks: Sequence[Check]) -> list[Check]:
    """Configured order, moved only as far as each check's ``requires`` demands (a stable topological sort)."""
    by_name = {c.name: c for c in checks}
    for c in checks:
        for need in c.requires:
            if need not in by_name:
                raise ChainError(f"check {c.name!r} needs check {need!r}, which is not enabled for this listener")
    out: list[Check] = []
    placed: set[str] = set()
    visiting: set[str] = set()

    def place(c: Check) -> None:
        if c.name in placed:
            return
        if c.name in visiting:
            raise ChainError(f"checks require each other in a circle through {c.name!r}")
        visiting.add(c.name)
        for need in c.requires:
            place(by_name[need])
        visiting.discard(c.name)
        placed.add(c.name)
        out.append(c)

    for c in checks:
        place(c)
    return out


def with_default_reply(verdict: Verdict) -> Verdict:
    if verdict.reply is not None:
        return verdict
    if verdict.action is Action.REJECT:
        return Verdict(verdict.action, _DEFAULT_REJECT, verdict.reason, verdict.headers, verdict.auth_results)
    if verdict.action is Action.TEMPFAIL:
        return Verdict(verdict.action, _DEFAULT_TEMPFAIL, verdict.reason, verdict.headers, verdict.auth_results)
    return verdict


class PolicyChain:
    """The checks of one listener."""

    def __init__(self, checks: Sequence[Check], *, timeout: float = 15.0,
                 on_error: Literal["tempfail", "accept"] = "tempfail") -> None:
        self.checks = order_checks(checks)
        self.timeout = timeout
        self.on_error = on_error
        self._by_phase = {p: [c for c in self.checks if p in c.phases()] for p in Phase}

    def has(self, phase: Phase) -> bool:
        """Whether any check runs in ``phase`` (the session skips the work of preparing a phase nobody reads)."""
        return bool(self._by_phase[phase])

    async def run(self, phase: Phase, ctx: CheckContext) -> Verdict:
        """Run every hook of ``phase``; the combined verdict. Header edits, authentication results and a
        quarantine reason are also recorded in ``ctx`` so later phases (and the end of data) see them."""
        action = Action.CONTINUE
        reply: Reply | None = None
        reasons: list[str] = []
        for check in self._by_phase[phase]:
            verdict = await self._run_one(check, phase, ctx)
            if verdict is None:
                continue
            ctx.header_edits.extend(verdict.headers)
            ctx.auth_results.extend(verdict.auth_results)
            if verdict.action is Action.QUARANTINE and not ctx.quarantine_reason:
                ctx.quarantine_reason = f"{check.name}: {verdict.reason}" if verdict.reason else check.name
            if SEVERITY[verdict.action] > SEVERITY[action]:
                action = verdict.action
                reply = with_default_reply(verdict).reply
            if verdict.action is not Action.CONTINUE:
                reasons.append(f"{check.name}: {verdict.reason or verdict.action.value}")
            if verdict.is_terminal:
                break
        if action is Action.QUARANTINE:
            action = Action.CONTINUE  # recorded in ctx.quarantine_reason; the message goes on to be accepted
        return Verdict(action, reply, "; ".join(reasons))

    async def _run_one(self, check: Check, phase: Phase, ctx: CheckContext) -> Verdict | None:
        try:
            async with asyncio.timeout(max(self.timeout, check.deadline)):
                return await check.hook(phase)(ctx)
        except TimeoutError:
            log.warning("check %s timed out after %.1fs at %s client=%s", check.name,
                        max(self.timeout, check.deadline), phase, ctx.client_ip)
        except Exception:
            log.exception("check %s failed at %s client=%s", check.name, phase, ctx.client_ip)
        if self.on_error == "tempfail":
            return Verdict(Action.TEMPFAIL, _ERROR_REPLY, "error")
        return None

    async def aclose(self) -> None:
        for check in self.checks:
            try:
                await check.aclose()
            except Exception:
                log.exception("closing check %s", check.name)
