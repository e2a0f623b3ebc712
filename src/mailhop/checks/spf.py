"""SPF (RFC 7208) at MAIL FROM, with pyspf doing the evaluation and mailhop's resolver doing the DNS.

Identities (RFC 7208 2.3, 2.4): the MAIL FROM identity, and for the null reverse-path ``<>`` the mailbox
``postmaster@<HELO name>``. With ``helo = true`` the HELO identity is also checked (once per session and HELO
name, cached in ``ctx.session``); a HELO "fail" is conclusive (RFC 7208 2.3), so MAIL FROM is then not evaluated
and the HELO result decides. Results go to ``ctx.results["spf"]`` (an ``SpfOutcome`` DMARC reads) and to one
``spf=`` Authentication-Results entry with ``smtp.mailfrom`` or, when the HELO identity decided, ``smtp.helo``
(RFC 8601 2.7.2).

Actions are configured per result: reject answers 550 5.7.23 for fail/softfail and 550 5.7.24 for the error
results, tempfail 451 4.7.24 (RFC 7372), quarantine holds the message, tag only records the result. The reply
names the domain and our client address, never the domain's own explanation text (it is DNS data chosen by
whoever controls that domain; it is kept in the outcome and the log).

Authenticated users and trusted clients are not checked and nothing is recorded for them.

pyspf is synchronous; it runs on a bounded thread pool of ``threads`` workers and reaches DNS through
``dnsfunc.SpfDnsBridge`` (see there for why pyspf's lookup global is replaced by a per-thread dispatcher).
Untrusted input: the client address, HELO name and MAIL FROM address, and DNS answers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

from ..config.checks import SpfConfig
from ..dns import Resolver
from .api import Action, AuthResult, Check, CheckContext, Verdict, reject, tempfail
from .dnsfunc import SpfDnsBridge, install_spf_dispatch, spf_lookups

__all__ = ["SpfCheck", "SpfOutcome"]

log = logging.getLogger("mailhop.checks.spf")

# RFC 7208 4.6.4 suggests at least 20 s for the whole evaluation; we stay below the chain's default 15 s hook
# deadline so slow DNS ends as our "temperror" (with its configured action) rather than as a chain timeout.
QUERY_TIME = 10.0

_RESULTS = frozenset({"pass", "fail", "softfail", "neutral", "none", "temperror", "permerror"})
_HELO_CACHE = "spf.helo"


@dataclass(frozen=True, slots=True)
class SpfOutcome:
    """One SPF evaluation: the result, the domain whose policy was evaluated, the explanation (from the domain's
    exp= or pyspf's default text) and which identity it was (``helo`` when the HELO identity decided)."""

    result: str
    domain: str
    explanation: str = ""
    identity: Literal["mailfrom", "helo"] = "mailfrom"


def _evaluate_sync(bridge: SpfDnsBridge, ip: str, sender: str, helo: str) -> SpfOutcome:
    """Runs in a pool thread: pyspf with this thread's DNS bridge."""
    import spf

    domain = (sender.rpartition("@")[2] if sender else helo).lower()
    identity: Literal["mailfrom", "helo"] = "mailfrom" if sender else "helo"
    if not sender and not helo:
        return SpfOutcome("none", "", "no identity to check", identity)
    with spf_lookups(bridge):
        try:
            query = spf.query(i=ip, s=sender, h=helo, querytime=QUERY_TIME)
            domain = str(query.o or domain).lower()
            result, _code, explanation = query.check()
        except spf.TempError as exc:
            result, explanation = "temperror", str(exc)
        except spf.PermError as exc:
            result, explanation = "permerror", str(exc)
        except Exception as exc:  # a pyspf bug on hostile input must not become a permanent refusal
            log.exception("pyspf failed ip=%s sender=%r helo=%r", ip, sender, helo)
            result, explanation = "temperror", f"internal error: {exc.__class__.__name__}"
    if result not in _RESULTS:  # pyspf's legacy names, should a caller enable its older modes
        result = {"unknown": "permerror", "error": "temperror"}.get(result, "neutral")
    return SpfOutcome(result, domain, str(explanation or ""), identity)


RESULT_TTL = 60.0
RESULT_CACHE_SIZE = 10000


class SpfCheck(Check):
    """SPF at the mail phase (see the module docstring)."""

    name = "spf"

    def __init__(self, config: SpfConfig, resolver: Resolver) -> None:
        self.config = config
        self.resolver = resolver
        self._pool = ThreadPoolExecutor(max_workers=config.threads, thread_name_prefix="mailhop-spf")
        self._results: OrderedDict[tuple[str, str, str], tuple[float, SpfOutcome]] = OrderedDict()
        install_spf_dispatch()

    async def evaluate(self, ip: str, sender: str, helo: str) -> SpfOutcome:
        """pyspf's verdict for a client address, MAIL FROM (``""``: the HELO identity) and HELO name.

        Verdicts are remembered for RESULT_TTL seconds. An SPF result is a function of exactly these inputs and
        of DNS data that the resolver caches at least as long, so this changes no answer; it saves the thread
        hop and pyspf's evaluation (about half a millisecond) for a bulk sender's run of messages from one
        address and one sender. Temporary errors are not remembered."""
        key = (ip, sender.lower(), helo.lower())
        now = time.monotonic()
        hit = self._results.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
        loop = asyncio.get_running_loop()
        bridge = SpfDnsBridge(self.resolver, loop)
        outcome = await loop.run_in_executor(self._pool, _evaluate_sync, bridge, ip, sender, helo)
        if outcome.result != "temperror":
            self._results[key] = (now + RESULT_TTL, outcome)
            self._results.move_to_end(key)
            if len(self._results) > RESULT_CACHE_SIZE:
                self._results.popitem(last=False)
        return outcome

    async def _helo_outcome(self, ctx: CheckContext) -> SpfOutcome:
        cached = ctx.session.get(_HELO_CACHE)
        if isinstance(cached, tuple) and cached[0] == (ctx.client_ip, ctx.helo):
            outcome: SpfOutcome = cached[1]
            return outcome
        outcome = await self.evaluate(ctx.client_ip, "", ctx.helo)
        ctx.session[_HELO_CACHE] = ((ctx.client_ip, ctx.helo), outcome)
        return outcome

    async def mail(self, ctx: CheckContext) -> Verdict | None:
        if ctx.authenticated or ctx.trusted or ctx.sender is None:
            return None
        if ctx.sender == "":
            # RFC 7208 2.4: for <> the MAIL FROM identity is postmaster@HELO, i.e. the HELO check.
            outcome = await self._helo_outcome(ctx)
            outcome = dataclasses.replace(outcome, identity="helo")
            prop = ("smtp.helo", ctx.helo)
        else:
            helo = await self._helo_outcome(ctx) if self.config.helo else None
            if helo is not None and helo.result == "fail":
                outcome, prop = helo, ("smtp.helo", ctx.helo)
            else:
                outcome = await self.evaluate(ctx.client_ip, ctx.sender, ctx.helo)
                prop = ("smtp.mailfrom", ctx.sender)
        ctx.results["spf"] = outcome
        log.debug("spf %s domain=%s identity=%s ip=%s: %s", outcome.result, outcome.domain, outcome.identity,
                  ctx.client_ip, outcome.explanation)
        auth = AuthResult("spf", outcome.result, properties=(prop,))
        return self._verdict(outcome, ctx.client_ip, auth)

    def _verdict(self, outcome: SpfOutcome, ip: str, auth: AuthResult) -> Verdict:
        c = self.config
        action = {"fail": c.on_fail, "softfail": c.on_softfail, "temperror": c.on_temperror,
                  "permerror": c.on_permerror}.get(outcome.result, "tag")
        reason = f"SPF {outcome.result} for {outcome.domain or '(none)'} ({outcome.identity}) from {ip}"
        if action == "reject":
            if outcome.result in ("fail", "softfail"):
                verdict = reject(f"SPF check failed: {outcome.domain} does not permit {ip} to send its mail",
                                 550, "5.7.23", reason)
            else:
                what = "is invalid" if outcome.result == "permerror" else "could not be checked"
                verdict = reject(f"SPF record of {outcome.domain} {what}", 550, "5.7.24", reason)
        elif action == "tempfail":
            verdict = tempfail(f"SPF check of {outcome.domain} failed; try again later", 451, "4.7.24", reason)
        elif action == "quarantine":
            verdict = Verdict(Action.QUARANTINE, reason=reason)
        else:
            verdict = Verdict()
        return dataclasses.replace(verdict, auth_results=(auth,))

    async def aclose(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
