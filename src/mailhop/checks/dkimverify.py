"""DKIM verification (RFC 6376; RSA per RFC 8301, Ed25519 per RFC 8463) at the end of data, with dkimpy.

Every DKIM-Signature (up to ``max_signatures``, topmost first) gets its own result, recorded as one ``dkim=``
Authentication-Results entry with header.d, header.s and header.b (RFC 6008: the first 8 characters of b=) and
in ``ctx.results["dkim"]`` as a list of ``DkimSignatureResult`` (DMARC reads it). A message without signatures
records ``dkim=none`` and an empty list. DKIM never refuses mail by itself.

How each signature's result is chosen (RFC 8601 2.7.1):

============  =============================================================================================
pass          the signature verifies with the published key
fail          the signature or the body hash does not verify; the signature has expired (x= in the past)
policy        verifiable but unacceptable here: an RSA key shorter than ``min_rsa_bits``, or rsa-sha1
              (RFC 8301 says verifiers must not accept either)
neutral       the signature's tag list cannot be parsed
temperror     the key lookup failed temporarily (SERVFAIL, timeout)
permerror     no key (NXDOMAIN, no TXT record), a revoked key (empty p=), an unusable key record, or a
              signature missing required tags or otherwise invalid (unknown algorithm, i= outside d=, ...)
============  =============================================================================================

Nothing here blocks the event loop: parsing the message and the signatures, and verifying them, run on a small
thread pool (or, with ``processes`` > 0, in worker processes); the keys are fetched in between with the async
resolver, and dkimpy gets a ``dnsfunc`` that only serves those answers. dkimpy verifies in pure Python (~1 ms of
CPU per signature, under the GIL), so in threads that time is taken from the event loop's core; a worker process
runs it on another core, at the price of two hand-offs per message (the message and the prefetched keys go over a
pipe, and it parses the message again). Measured on 2 cores the hand-offs cost more than they saved (threads 492
signatures/s, one process 370/s, two 265/s), so threads are the default; processes are for machines with cores
to spare. Messages over ``checks.max_scan_size`` (``ctx.message`` is None) are not verified: no
result is recorded and a line is logged. Authenticated and trusted clients are verified like any other: DKIM
does not depend on the path the message took.

Untrusted input: the whole message and the key records in DNS.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import re
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

from ..config.checks import DkimVerifyConfig
from ..dns import Resolver
from .api import AuthResult, Check, CheckContext, Verdict
from .dnsfunc import LibraryLog, TxtAnswer, ensure_ed25519, prefetch_txt, served_dnsfunc

__all__ = ["DkimCheck", "DkimSignatureResult", "SignaturePlan", "prepare_signatures"]

log = logging.getLogger("mailhop.checks.dkim")
_LIB_LOG = LibraryLog("mailhop.checks.dkimpy")

THREADS = 4  # parsing, hashing and RSA in pure Python: a few threads keep big messages off the event loop
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_NAME = re.compile(rf"^{_LABEL}(?:\.{_LABEL})*$")


@dataclass(frozen=True, slots=True)
class DkimSignatureResult:
    """The outcome for one DKIM-Signature: signing domain (d=), selector (s=), result, reason."""

    domain: str
    selector: str
    result: str  # pass, fail, policy, neutral, temperror, permerror
    reason: str = ""
    algorithm: str = ""
    b_prefix: str = ""  # first 8 characters of b= (RFC 6008 header.b)
    key_bits: int = 0

    def auth_result(self) -> AuthResult:
        props = (("header.d", self.domain), ("header.s", self.selector), ("header.b", self.b_prefix))
        return AuthResult("dkim", self.result, self.reason, tuple((k, v) for k, v in props if v))


@dataclass
class SignaturePlan:
    """A parsed signature waiting for its key (``final`` is set when it failed before needing one)."""

    index: int
    domain: str = ""
    selector: str = ""
    algorithm: str = ""
    b_prefix: str = ""
    final: DkimSignatureResult | None = None

    @property
    def key_name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}"

    def result(self, result: str, reason: str = "", key_bits: int = 0) -> DkimSignatureResult:
        return DkimSignatureResult(self.domain, self.selector, result, reason, self.algorithm, self.b_prefix,
                                   key_bits)


def _text(value: bytes | None) -> str:
    return (value or b"").decode("ascii", "replace").strip()


def plan_signature(index: int, value: bytes, *, arc: bool = False) -> tuple[SignaturePlan, dict[bytes, bytes]]:
    """Parse and check one signature header value (DKIM-Signature, or an ARC one with ``arc``)."""
    import dkim
    from dkim.util import InvalidTagValueList, parse_tag_value

    plan = SignaturePlan(index)
    try:
        sig: dict[bytes, bytes] = parse_tag_value(value)
    except InvalidTagValueList as exc:
        plan.final = plan.result("neutral", f"signature syntax error: {exc.__class__.__name__}")
        return plan, {}
    plan.domain = _text(sig.get(b"d")).lower()
    plan.selector = _text(sig.get(b"s"))
    plan.algorithm = _text(sig.get(b"a")).lower()
    plan.b_prefix = re.sub(rb"\s+", b"", sig.get(b"b", b""))[:8].decode("ascii", "replace")
    if arc:
        return plan, sig
    try:
        dkim.validate_signature_fields(sig)
    except dkim.ValidationError as exc:
        message = str(exc)
        if message.startswith("x= value is past"):
            plan.final = plan.result("fail", "signature expired")
        else:
            plan.final = plan.result("permerror", f"invalid signature: {message[:100]}")
        return plan, sig
    if not (_NAME.match(plan.domain) and _NAME.match(plan.selector)):
        plan.final = plan.result("permerror", "d= or s= is not a domain name")
    elif plan.algorithm == "rsa-sha1":
        plan.final = plan.result("policy", "rsa-sha1 is not accepted (RFC 8301)")
    return plan, sig


def prepare_signatures(message: bytes, max_signatures: int, minkey: int) -> tuple[Any, list[SignaturePlan], int]:
    """Thread side, step 1: parse the message and its DKIM-Signatures. Returns (dkimpy DKIM object or None when
    the header section cannot be parsed, plans, number of signatures present)."""
    import dkim

    try:
        d = dkim.DKIM(message, logger=_LIB_LOG, minkey=minkey)
    except dkim.MessageFormatError:
        return None, [], 0
    values = [v for k, v in d.headers if k.lower() == b"dkim-signature"]
    return d, [plan_signature(i, v)[0] for i, v in enumerate(values[:max_signatures])], len(values)


def classify_key(plan: SignaturePlan, answer: TxtAnswer | None, min_rsa_bits: int) -> DkimSignatureResult | int:
    """The result a key lookup decides on its own, or the key's size when the signature must be verified."""
    import binascii

    import dkim
    from dkim.util import InvalidTagValueList, parse_tag_value

    if answer is None or answer.status == "absent":
        return plan.result("permerror", f"no key for signature ({answer.error if answer else 'not looked up'})")
    if answer.status == "temperror":
        return plan.result("temperror", "key lookup failed temporarily")
    record = answer.records[0]
    try:
        tags = parse_tag_value(record)
    except InvalidTagValueList:
        return plan.result("permerror", "key record syntax error")
    if tags.get(b"p") == b"":
        return plan.result("permerror", "key revoked")
    try:
        _pk, bits, ktag, _tlsrpt = dkim.evaluate_pk(plan.key_name.encode(), record)
    except (dkim.DKIMException, binascii.Error, ValueError) as exc:
        return plan.result("permerror", f"unusable key: {exc.__class__.__name__}")
    if ktag is None:
        return plan.result("permerror", "key is not for email (s= service type)")
    if ktag == b"rsa" and bits < min_rsa_bits:
        return plan.result("policy", f"RSA key of {bits} bits is shorter than {min_rsa_bits}", bits)
    return int(bits or 0)


def verify_signatures(d: Any, plans: list[SignaturePlan], answers: dict[str, TxtAnswer],
                      min_rsa_bits: int) -> list[DkimSignatureResult]:
    """Thread side, step 2: verify every plan still open, with dkimpy serving only the prefetched keys."""
    import dkim

    dnsfunc = served_dnsfunc(answers)
    out: list[DkimSignatureResult] = []
    for plan in plans:
        if plan.final is not None:
            out.append(plan.final)
            continue
        decided = classify_key(plan, answers.get(plan.key_name.lower()), min_rsa_bits)
        if isinstance(decided, DkimSignatureResult):
            out.append(decided)
            continue
        try:
            ok = d.verify(idx=plan.index, dnsfunc=dnsfunc)
        except dkim.ValidationError as exc:
            if str(exc).startswith("body hash mismatch"):
                out.append(plan.result("fail", "body hash did not verify", decided))
            else:
                out.append(plan.result("permerror", f"invalid signature: {str(exc)[:100]}", decided))
            continue
        except dkim.MessageFormatError as exc:
            out.append(plan.result("neutral", f"signature could not be processed: {str(exc)[:100]}", decided))
            continue
        except dkim.DKIMException as exc:
            out.append(plan.result("permerror", f"{exc.__class__.__name__}: {str(exc)[:100]}", decided))
            continue
        except Exception as exc:  # dkimpy on hostile input: record it, never take the session down
            log.exception("dkimpy failed on signature %d (d=%s s=%s)", plan.index, plan.domain, plan.selector)
            out.append(plan.result("permerror", f"internal error: {exc.__class__.__name__}", decided))
            continue
        out.append(plan.result("pass", "", decided) if ok else plan.result("fail", "signature did not verify",
                                                                          decided))
    return out


_POOLS: dict[int, ProcessPoolExecutor] = {}


def _process_pool(size: int) -> ProcessPoolExecutor:
    """One pool per size for the whole process: a daemon builds one DKIM check, but a reload or a test suite
    builds many, and each pool holds worker processes until it is shut down."""
    pool = _POOLS.get(size)
    if pool is None:
        # forkserver: the daemon has threads (the queue writer, resolver pools), and forking a threaded process
        # copies its locks in whatever state they are; workers start clean from the fork server instead.
        pool = ProcessPoolExecutor(size, mp_context=multiprocessing.get_context("forkserver"))
        _POOLS[size] = pool
    return pool


def scan_message(message: bytes, max_signatures: int, minkey: int) -> tuple[bool, list[SignaturePlan], int]:
    """Worker side, step 1: (parsable, signature plans, signatures present) — the plans name the keys to fetch."""
    ensure_ed25519()
    d, plans, present = prepare_signatures(message, max_signatures, minkey)
    return d is not None, plans, present


def verify_message(message: bytes, max_signatures: int, min_rsa_bits: int,
                   answers: dict[str, TxtAnswer]) -> list[DkimSignatureResult]:
    """Worker side, step 2: parse again (the parsed object stays in the worker that made it) and verify."""
    ensure_ed25519()
    d, plans, _ = prepare_signatures(message, max_signatures, min_rsa_bits)
    if d is None:  # cannot happen: step 1 parsed the same bytes
        return []
    return verify_signatures(d, plans, answers, min_rsa_bits)


class DkimCheck(Check):
    """DKIM verification at the data phase (see the module docstring)."""

    name = "dkim"

    def __init__(self, config: DkimVerifyConfig, resolver: Resolver) -> None:
        self.config = config
        self.resolver = resolver
        self._threads = ThreadPoolExecutor(max_workers=THREADS, thread_name_prefix="mailhop-dkim")
        self._processes: ProcessPoolExecutor | None = None
        ensure_ed25519()

    def _executor(self) -> Executor:
        if self.config.processes == 0:
            return self._threads
        if self._processes is None:
            self._processes = _process_pool(self.config.processes)
        return self._processes

    async def _run(self, func: Any, *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor(), func, *args)
        except BrokenProcessPool:
            # A worker died (killed, out of memory): start a fresh pool next time; this call runs in a thread.
            log.warning("dkim: a verification worker died; restarting the pool")
            broken, self._processes = self._processes, None
            if broken is not None:
                _POOLS.pop(self.config.processes, None)
                broken.shutdown(wait=False, cancel_futures=True)
            return await loop.run_in_executor(self._threads, func, *args)

    async def verify(self, message: bytes) -> list[DkimSignatureResult] | None:
        """Every signature's result (``[]``: no signature; None: the header section could not be parsed)."""
        c = self.config
        parsable, plans, present = await self._run(scan_message, message, c.max_signatures, c.min_rsa_bits)
        if not parsable:
            return None
        if present > len(plans):
            log.info("dkim: %d signatures, verifying the first %d", present, len(plans))
        open_plans = [p for p in plans if p.final is None]
        if not open_plans:
            return [p.final for p in plans if p.final is not None]
        answers = await prefetch_txt(self.resolver, [p.key_name for p in open_plans])
        results: list[DkimSignatureResult] = await self._run(verify_message, message, c.max_signatures,
                                                             c.min_rsa_bits, answers)
        return results

    async def data(self, ctx: CheckContext) -> Verdict | None:
        if ctx.message is None:
            log.info("dkim: message %s (%d octets) is over the scan size; not verified", ctx.queue_id, ctx.size)
            return None
        results = await self.verify(ctx.message)
        if results is None:
            ctx.results["dkim"] = []
            if re.search(rb"(?im)^dkim-signature[ \t]*:", ctx.header_block):
                return Verdict(auth_results=(AuthResult("dkim", "permerror", "malformed header section"),))
            return Verdict(auth_results=(AuthResult("dkim", "none"),))
        ctx.results["dkim"] = results
        for r in results:
            log.debug("dkim %s d=%s s=%s %s", r.result, r.domain, r.selector, r.reason)
        if not results:
            return Verdict(auth_results=(AuthResult("dkim", "none"),))
        return Verdict(auth_results=tuple(r.auth_result() for r in results))

    async def aclose(self) -> None:
        # The process pool is shared by the process (see _process_pool) and ends with it.
        self._threads.shutdown(wait=False, cancel_futures=True)
