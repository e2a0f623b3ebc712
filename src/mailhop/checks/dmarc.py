"""DMARC (RFC 7489, with the DNS Tree Walk of DMARCbis) at the end of data, from the SPF and DKIM results.

Untrusted input: the From header field, the DMARC records in DNS, and the SPF/DKIM results derived from both.

The author domain (RFC5322.From) comes from ``ctx.header_block``. RFC 7489 6.6.1 leaves odd From fields to the
receiver; we choose: no From field -> ``dmarc=none`` (nothing to evaluate); several From fields, addresses in
several domains, or no usable domain -> ``dmarc=permerror``. Several addresses in one domain are evaluated once.
Neither case refuses mail here (a From-less message is a matter for other policy).

What we implement of the Tree Walk (draft-ietf-dmarc-dmarcbis section 4.10, now RFC 9989):

- The walk queries ``_dmarc.<name>`` for the author domain, then for its parents by removing one label at a time,
  except that from a name of more than 8 labels it jumps straight to the rightmost 7: at most 8 queries, the
  last one for the top-level label (a PSD such as ``_dmarc.gov`` publishes there). At each name, TXT records not
  starting with ``v=DMARC1`` are discarded; if more than one remains, all are (no record at that name).
- Policy discovery: the first record found on the walk (the author domain's own, else the nearest ancestor's).
  Its ``p`` applies when it was found at the author domain; for a sub-domain, ``np`` when the author domain does
  not exist (NXDOMAIN, or no A, AAAA and MX records: RFC 9091 2.1) and ``np`` is given, else ``sp``, else ``p``.
- Organizational domain (for relaxed alignment) of any name: walk from it; a record with ``psd=n`` makes its
  domain the organizational domain; ``psd=y`` (on any name but the starting one) makes the name one label below
  it the organizational domain; otherwise the record with the fewest labels; without records, the name itself.
- Alignment: strict compares names exactly; relaxed compares organizational domains (names under different
  top-level domains never align and need no DNS). Only SPF "pass" for MAIL FROM (the HELO identity for ``<>``)
  and DKIM "pass" signatures count.

Results: ``dmarc=pass|fail|none|temperror|permerror`` with ``header.from`` and a reason ``p=.. sp=.. dis=..``
(dis: the disposition applied), and ``ctx.results["dmarc"]`` (a ``DmarcOutcome``). A DNS failure anywhere in
the walk, or an aligned identifier whose own check ended in temperror when nothing passed, gives temperror and
no action. When DKIM could not run (the message was over the scan size) and SPF did not pass aligned, the result
is permerror and no action: we could not evaluate it, and must not refuse mail on half the evidence.

Policy: on failure, ``reject`` -> ``on_reject`` (reject: 550 5.7.1), ``quarantine`` -> ``on_quarantine``,
``none`` -> nothing. When ``apply_pct`` is on, a message outside the ``pct=`` sample, or under ``t=y``
(DMARCbis testing mode), gets the next milder policy (RFC 7489 6.6.4): reject -> quarantine -> none. Other tags
(rua, ruf, fo, rf, ri) are read past; we send no reports. Authenticated users and trusted clients are not
evaluated (nothing is recorded), as with SPF.
"""

from __future__ import annotations

import email.utils
import logging
import random as _random
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from ..config.checks import DmarcConfig
from ..dns import DnsPermanentError, DnsTemporaryError, Resolver
from .api import Action, AuthResult, Check, CheckContext, Verdict, reject, tempfail

__all__ = ["DmarcCheck", "DmarcOutcome", "DmarcRecord", "TreeWalk", "parse_record", "walk_names"]

log = logging.getLogger("mailhop.checks.dmarc")

MAX_QUERIES = 8  # DMARCbis 4.10: the walk asks at most 8 names
_VERSION = re.compile(r"^v\s*=\s*DMARC1\s*(?:;|$)")
_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_DOMAIN = re.compile(rf"^{_LABEL}(?:\.{_LABEL})*$")
_POLICIES = ("none", "quarantine", "reject")
_MILDER = {"reject": "quarantine", "quarantine": "none", "none": "none"}


@dataclass(frozen=True, slots=True)
class DmarcRecord:
    """A parsed DMARC record (tags we act on; defaults per RFC 7489 6.3)."""

    domain: str  # where it was found (the name under _dmarc.)
    p: str = "none"
    sp: str | None = None
    np: str | None = None
    adkim: str = "r"
    aspf: str = "r"
    pct: int = 100
    psd: str = "u"
    testing: bool = False  # t=y


def parse_record(text: str, domain: str) -> DmarcRecord | None:
    """The record in a TXT string, or None when it is not a DMARC1 record. Unknown tags are ignored; a missing
    or unknown ``p`` counts as none; other invalid values fall back to their defaults."""
    if not _VERSION.match(text):
        return None
    tags: dict[str, str] = {}
    for part in text.split(";")[1:]:
        key, sep, value = part.partition("=")
        if sep:
            tags.setdefault(key.strip().lower(), value.strip())

    def policy(name: str) -> str | None:
        value = tags.get(name, "").lower()
        return value if value in _POLICIES else None

    def mode(name: str) -> str:
        return "s" if tags.get(name, "").lower() == "s" else "r"

    pct_text = tags.get("pct", "100")
    pct = int(pct_text) if pct_text.isdigit() and int(pct_text) <= 100 else 100
    psd = tags.get("psd", "u").lower()
    return DmarcRecord(domain, policy("p") or "none", policy("sp"), policy("np"), mode("adkim"), mode("aspf"), pct,
                       psd if psd in ("y", "n") else "u", tags.get("t", "").lower() == "y")


def walk_names(domain: str) -> list[str]:
    """The names the Tree Walk asks, in order: the domain, then parents (from at most 7 labels) up to the TLD."""
    labels = domain.split(".")
    names = [domain]
    for k in range(min(len(labels) - 1, MAX_QUERIES - 1), 0, -1):
        names.append(".".join(labels[-k:]))
    return names


class TreeWalk:
    """DMARC record lookups for one message, each name asked at most once."""

    def __init__(self, resolver: Resolver) -> None:
        self.resolver = resolver
        self._records: dict[str, DmarcRecord | None] = {}

    async def record_at(self, name: str) -> DmarcRecord | None:
        """The one DMARC record at ``_dmarc.<name>`` (None: none, or several). Raises DnsTemporaryError."""
        if name in self._records:
            return self._records[name]
        try:
            texts = await self.resolver.txt(f"_dmarc.{name}")
        except DnsPermanentError:
            texts = []
        found = [r for r in (parse_record(t.decode("latin-1"), name) for t in texts) if r is not None]
        record = found[0] if len(found) == 1 else None
        self._records[name] = record
        return record

    async def policy_record(self, domain: str) -> DmarcRecord | None:
        """Policy discovery: the first record on the walk up from ``domain``."""
        for name in walk_names(domain):
            record = await self.record_at(name)
            if record is not None:
                return record
        return None

    async def org_domain(self, domain: str) -> str:
        """The organizational domain of ``domain`` by the Tree Walk (see the module docstring)."""
        labels = domain.split(".")
        fewest: str | None = None
        for i, name in enumerate(walk_names(domain)):
            record = await self.record_at(name)
            if record is None:
                continue
            if record.psd == "n":
                return name
            if record.psd == "y" and i > 0:
                return ".".join(labels[-(name.count(".") + 2):])
            fewest = name
        return fewest or domain

    async def aligned(self, a: str, b: str, mode: str) -> bool:
        if a == b:
            return True
        if mode == "s" or a.rpartition(".")[2] != b.rpartition(".")[2]:
            return False
        return await self.org_domain(a) == await self.org_domain(b)


@dataclass(frozen=True, slots=True)
class DmarcOutcome:
    """The DMARC evaluation of one message, as recorded in ``ctx.results["dmarc"]``."""

    result: str  # pass, fail, none, temperror, permerror
    from_domain: str = ""
    policy: str = "none"  # the policy the record asks for this domain (p, sp or np)
    disposition: str = "none"  # what we applied: none, quarantine, reject
    record_domain: str = ""
    spf_aligned: bool = False
    dkim_aligned: bool = False
    reason: str = ""
    record: DmarcRecord | None = field(default=None, compare=False)

    def auth_result(self) -> AuthResult:
        props = (("header.from", self.from_domain),) if self.from_domain else ()
        return AuthResult("dmarc", self.result, self.reason, props)


def author_domain(values: list[str]) -> tuple[str | None, str]:
    """(domain, "") from the From field values, or (None, result) with result "none" or "permerror: why"."""
    if not values:
        return None, "none"
    if len(values) > 1:
        return None, "permerror: several From header fields"
    domains = set()
    for _name, addr in email.utils.getaddresses(values):
        _local, at, dom = addr.rpartition("@")
        if not at:
            continue
        dom = dom.strip().rstrip(".").lower()
        try:
            dom = dom.encode("idna").decode("ascii") if not dom.isascii() else dom
        except UnicodeError:
            return None, "permerror: From domain is not a valid IDN"
        domains.add(dom)
    domains.discard("")
    if not domains:
        return None, "permerror: no domain in From"
    if len(domains) > 1:
        return None, "permerror: From addresses in several domains"
    dom = domains.pop()
    if not _DOMAIN.match(dom):
        return None, "permerror: From domain is not a domain name"
    return dom, ""


class DmarcCheck(Check):
    """DMARC at the data phase (see the module docstring). ``sample`` is the pct= sampler (0 <= x < 1)."""

    name = "dmarc"
    requires = ("spf", "dkim")

    def __init__(self, config: DmarcConfig, resolver: Resolver, *,
                 sample: Callable[[], float] = _random.random) -> None:
        self.config = config
        self.resolver = resolver
        self.sample = sample

    async def data(self, ctx: CheckContext) -> Verdict | None:
        if ctx.authenticated or ctx.trusted:
            return None
        outcome = await self.evaluate(ctx)
        ctx.results["dmarc"] = outcome
        log.debug("dmarc %s from=%s policy=%s dis=%s %s", outcome.result, outcome.from_domain, outcome.policy,
                  outcome.disposition, outcome.reason)
        auth = (outcome.auth_result(),)
        if outcome.result != "fail" or outcome.disposition == "none":
            return Verdict(auth_results=auth)
        action = self.config.on_reject if outcome.disposition == "reject" else self.config.on_quarantine
        why = f"DMARC {outcome.disposition} policy of {outcome.from_domain}"
        if action == "reject":
            verdict = reject(f"Rejected by DMARC policy for {outcome.from_domain}", 550, "5.7.1", why)
        elif action == "tempfail":
            verdict = tempfail(f"Deferred by DMARC policy for {outcome.from_domain}", 451, "4.7.1", why)
        elif action == "quarantine":
            verdict = Verdict(Action.QUARANTINE, reason=why)
        else:
            return Verdict(auth_results=auth)
        return replace(verdict, auth_results=auth)

    async def evaluate(self, ctx: CheckContext) -> DmarcOutcome:
        """The DMARC outcome of the message in ``ctx`` (reads ctx.results["spf"] and ctx.results["dkim"])."""
        domain, problem = author_domain(ctx.header("From"))
        if domain is None:
            result, _, why = problem.partition(": ")
            return DmarcOutcome(result, reason=why or "no From header field")
        walk = TreeWalk(self.resolver)
        try:
            record = await walk.policy_record(domain)
        except DnsTemporaryError as exc:
            return DmarcOutcome("temperror", domain, reason=f"record lookup: {exc}")
        if record is None:
            return DmarcOutcome("none", domain, reason="no DMARC record")
        policy = await self._policy_for(domain, record)
        spf_ok, dkim_ok, pending = await self._alignment(ctx, walk, domain, record)
        tags = f"p={record.p} sp={record.sp or record.p}"
        base = DmarcOutcome("fail", domain, policy, "none", record.domain, spf_ok, dkim_ok, record=record)
        if spf_ok or dkim_ok:
            return replace(base, result="pass", reason=f"{tags} dis=none")
        if pending:
            return replace(base, result="temperror", reason=f"{tags} {pending}")
        if "dkim" not in ctx.results:
            return replace(base, result="permerror", reason=f"{tags} DKIM not verified (message over the scan size)")
        disposition = policy
        if self.config.apply_pct and (record.testing or not self._sampled(record.pct)):
            disposition = _MILDER[policy]
        return replace(base, disposition=disposition, reason=f"{tags} dis={disposition}")

    def _sampled(self, pct: int) -> bool:
        return pct >= 100 or (pct > 0 and self.sample() * 100 < pct)

    async def _policy_for(self, domain: str, record: DmarcRecord) -> str:
        if record.domain == domain:
            return record.p
        if record.np is not None and await self._nonexistent(domain):
            return record.np
        return record.sp or record.p

    async def _nonexistent(self, domain: str) -> bool:
        """RFC 9091 2.1: NXDOMAIN, or no A, AAAA and MX records. A temporary failure counts as existing."""
        for rdtype in ("A", "AAAA", "MX"):
            try:
                if await self.resolver.records(domain, rdtype):
                    return False
            except DnsPermanentError:
                return True
            except DnsTemporaryError:
                return False
        return True

    async def _alignment(self, ctx: CheckContext, walk: TreeWalk, domain: str,
                         record: DmarcRecord) -> tuple[bool, bool, str]:
        """(SPF aligned pass, DKIM aligned pass, why the result is temperror: an aligned identifier's check, or
        the alignment lookups, failed for now)."""
        from .dkimverify import DkimSignatureResult
        from .spf import SpfOutcome

        pending: list[str] = []

        async def aligned(ident: str, mode: str, what: str) -> bool:
            try:
                return await walk.aligned(ident, domain, mode)
            except DnsTemporaryError:
                pending.append(f"{what} alignment lookup failed")
                return False

        candidates: list[tuple[str, str, str, str]] = []  # (what, result, identifier domain, mode)
        spf = ctx.results.get("spf")
        if isinstance(spf, SpfOutcome) and spf.domain and (spf.identity == "mailfrom" or ctx.sender == ""):
            candidates.append(("SPF", spf.result, spf.domain, record.aspf))
        for sig in ctx.results.get("dkim") or []:
            if isinstance(sig, DkimSignatureResult) and sig.domain:
                candidates.append(("DKIM", sig.result, sig.domain, record.adkim))
        # Exact matches first: they need no DNS, so a lookup failure cannot hide a pass they give.
        candidates.sort(key=lambda c: c[2] != domain)
        passed = {"SPF": False, "DKIM": False}
        for what, result, ident, mode in candidates:
            if result not in ("pass", "temperror") or passed[what]:
                continue
            if await aligned(ident, mode, what):
                if result == "pass":
                    passed[what] = True
                else:
                    pending.append(f"{what} temperror")
        return passed["SPF"], passed["DKIM"], "; ".join(pending)
