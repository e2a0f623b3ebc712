"""ARC chain verification (RFC 8617) at the end of data, with dkimpy's ARC validator.

Records ``arc=pass|fail|none`` in Authentication-Results (with ``header.oldest-pass`` when the chain passes,
RFC 8617 5.2 step 5: 0 when every ARC-Message-Signature still verifies, else the oldest instance from which
all newer ones verify) and ``ctx.results["arc"]`` as an ``ArcOutcome``. ARC never refuses mail by itself.

The keys of every ARC-Seal and ARC-Message-Signature are fetched first with the async resolver; dkimpy then
runs on a small thread pool and is served only those answers. A key lookup that fails temporarily makes the
chain ``fail`` with a reason saying so (RFC 8617 defines no temporary result; a chain we cannot check is not one
we can vouch for). More than 50 ARC sets (RFC 8617 4.2.1: i= is at most 50) is a failed chain, checked before any
DNS is asked. Messages over ``checks.max_scan_size`` are not verified (no result, logged).

Untrusted input: the message and the key records in DNS.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from ..config.checks import ArcConfig
from ..dns import Resolver
from .api import AuthResult, Check, CheckContext, Verdict
from .dkimverify import plan_signature
from .dnsfunc import LibraryLog, TxtAnswer, ensure_ed25519, prefetch_txt, served_dnsfunc

__all__ = ["ArcCheck", "ArcOutcome"]

log = logging.getLogger("mailhop.checks.arc")
_LIB_LOG = LibraryLog("mailhop.checks.dkimpy")

THREADS = 2
MAX_INSTANCES = 50


@dataclass(frozen=True, slots=True)
class ArcOutcome:
    """The chain validation status (``cv``: pass, fail or none), how many ARC sets, why, and oldest-pass."""

    cv: str
    instances: int = 0
    reason: str = ""
    oldest_pass: int | None = None

    def auth_result(self) -> AuthResult:
        props = (("header.oldest-pass", str(self.oldest_pass)),) if self.oldest_pass is not None else ()
        return AuthResult("arc", self.cv, self.reason if self.cv != "pass" else "", props)


def _key_names(message: bytes) -> tuple[Any, int, list[str]]:
    """Thread side: the ARC object, the highest instance and the key names of every seal and signature."""
    import dkim

    try:
        a = dkim.ARC(message, logger=_LIB_LOG)
        instance, headers = a.sorted_arc_headers()
    except dkim.DKIMException:
        return None, 0, []
    names = []
    for _i, (name, value) in headers:
        if name.lower() in (b"arc-seal", b"arc-message-signature"):
            plan, _sig = plan_signature(0, value, arc=True)
            if plan.domain and plan.selector:
                names.append(plan.key_name)
    return a, int(instance), names


def _oldest_pass(results: list[dict[str, Any]]) -> int:
    # results run from the newest instance to the oldest (dkimpy's order).
    for r in results[1:]:
        if not r.get("ams-valid"):
            return int(r["instance"]) + 1
    return 0


def _validate(a: Any, answers: dict[str, TxtAnswer]) -> ArcOutcome:
    """Thread side: run dkimpy's chain validation with only the prefetched keys."""
    import dkim

    try:
        cv, results, reason = a.verify(dnsfunc=served_dnsfunc(answers))
    except dkim.DKIMException as exc:
        cv, results, reason = dkim.CV_Fail, [], str(exc)
    except Exception as exc:  # dkimpy on hostile input: a failed chain, never a failed session
        log.exception("dkimpy ARC validation failed")
        cv, results, reason = dkim.CV_Fail, [], f"internal error: {exc.__class__.__name__}"
    count = max((int(r.get("instance", 0)) for r in results), default=0)
    if cv == dkim.CV_Pass:
        return ArcOutcome("pass", count, "", _oldest_pass(results))
    if cv == dkim.CV_None:
        return ArcOutcome("none", 0, str(reason))
    # None: an ARC-Seal recorded cv=fail, so the chain ended before it reached us (RFC 8617 5.2 step 2).
    return ArcOutcome("fail", count, str(reason)[:200])


class ArcCheck(Check):
    """ARC verification at the data phase (see the module docstring)."""

    name = "arc"

    def __init__(self, config: ArcConfig, resolver: Resolver) -> None:
        self.config = config
        self.resolver = resolver
        self._pool = ThreadPoolExecutor(max_workers=THREADS, thread_name_prefix="mailhop-arc")
        ensure_ed25519()

    async def verify(self, message: bytes) -> ArcOutcome:
        """The chain validation status of ``message``."""
        loop = asyncio.get_running_loop()
        a, instances, names = await loop.run_in_executor(self._pool, _key_names, message)
        if a is None:
            return ArcOutcome("fail", 0, "ARC header fields could not be parsed")
        if instances == 0:
            return ArcOutcome("none")
        if instances > MAX_INSTANCES:
            return ArcOutcome("fail", instances, f"more than {MAX_INSTANCES} ARC sets")
        answers = await prefetch_txt(self.resolver, names)
        failed = sorted(n for n, ans in answers.items() if ans.status == "temperror")
        if failed:
            return ArcOutcome("fail", instances, f"key lookup failed temporarily for {failed[0]}")
        outcome: ArcOutcome = await loop.run_in_executor(self._pool, _validate, a, answers)
        return outcome

    async def data(self, ctx: CheckContext) -> Verdict | None:
        if ctx.message is None:
            log.info("arc: message %s (%d octets) is over the scan size; not verified", ctx.queue_id, ctx.size)
            return None
        outcome = await self.verify(ctx.message)
        ctx.results["arc"] = outcome
        log.debug("arc %s instances=%d %s", outcome.cv, outcome.instances, outcome.reason)
        return Verdict(auth_results=(outcome.auth_result(),))

    async def aclose(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
