"""rspamd over its HTTP protocol (POST /checkv2), at end of data.

The message goes as the request body; the envelope as headers: IP, Helo, From, one Rcpt per recipient, Queue-Id,
User (when authenticated) and Password (when configured). rspamd answers JSON with an ``action``, ``score``,
``required_score``, ``symbols`` and, when its milter_headers module is on, ``milter.add_headers`` /
``milter.remove_headers``. Verdicts:

    rspamd action        verdict
    reject               REJECT 554 5.7.1 "Spam message rejected" (also at or above ``reject_score``, if set)
    soft reject          TEMPFAIL 451 4.7.1
    greylist             TEMPFAIL 451 4.7.1 (greylisted)
    discard, quarantine  DISCARD, QUARANTINE (rspamd's custom actions of those names)
    rewrite subject      Subject changed to rspamd's ``subject``; X-Spam: Yes
    add header           X-Spam: Yes
    no action            nothing

With ``add_header`` on, accepted messages also get X-Spam-Score ("<score> / <required>"), X-Spam-Action and
X-Spam-Status ("Yes|No, score=..."); such fields already in the message are removed first (a sender could
forge them). rspamd's own header changes (milter block) are applied too, except for the names we write.

Failure: connection refused, timeout, a non-200 status or an unreadable answer raise (``RspamdError`` or the
transport's error), so the chain applies ``checks.on_error`` (tempfail by default, or fail open) and logs it.

Sets ``ctx.results["rspamd"]`` to an ``RspamdResult``.
Untrusted input: the message and envelope (sent on, header values stripped of control characters) and rspamd's
answer (size-bounded, every field type-checked).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import aiohttp
from multidict import CIMultiDict

from ..config.checks import RspamdConfig
from .api import Check, CheckContext, HeaderEdit, Verdict, discard, quarantine, reject, tempfail

__all__ = ["RspamdCheck", "RspamdError", "RspamdResult"]

log = logging.getLogger("mailhop.checks.rspamd")

# An answer lists every symbol with its options; a few hundred KiB is already extreme. More is refused.
MAX_RESPONSE = 2 * 1024 * 1024
_OUR_HEADERS = ("X-Spam", "X-Spam-Score", "X-Spam-Action", "X-Spam-Status")
_SPAM_ACTIONS = ("add header", "rewrite subject")


class RspamdError(Exception):
    """rspamd answered, but not usefully (status, size, JSON)."""


@dataclass(frozen=True, slots=True)
class RspamdResult:
    action: str
    score: float
    required_score: float
    symbols: tuple[str, ...]


class RspamdCheck(Check):
    """Scans each message with rspamd (``[checks.rspamd]``)."""

    name = "rspamd"

    def __init__(self, config: RspamdConfig) -> None:
        self.config = config
        self.deadline = config.timeout + 1.0  # rspamd's own timeout fires first
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        # Created on first use, inside the running loop; one session (one connection pool) for all scans.
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.config.timeout))
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def data(self, ctx: CheckContext) -> Verdict | None:
        if ctx.message is None:
            log.info("rspamd: message %s of %d octets is over the scan limit; not scanned", ctx.queue_id, ctx.size)
            return None
        answer = await self._scan(ctx, ctx.message)
        result = _result(answer)
        ctx.results["rspamd"] = result
        log.info("rspamd: %s action=%r score=%.2f/%.2f symbols=%s", ctx.queue_id, result.action, result.score,
                 result.required_score, ",".join(result.symbols[:20]))
        return self._verdict(ctx, result, answer)

    async def _scan(self, ctx: CheckContext, message: bytes) -> dict[str, Any]:
        headers: CIMultiDict[str] = CIMultiDict()
        headers["IP"] = _clean(ctx.client_ip)
        if ctx.helo:
            headers["Helo"] = _clean(ctx.helo)
        headers["From"] = _clean(ctx.sender) if ctx.sender else "<>"
        for rcpt in ctx.recipients:
            headers.add("Rcpt", _clean(rcpt))
        if ctx.queue_id:
            headers["Queue-Id"] = _clean(ctx.queue_id)
        if ctx.user is not None:
            headers["User"] = _clean(ctx.user)
        if self.config.password:
            headers["Password"] = self.config.password
        async with self._client().post(f"{self.config.url}/checkv2", data=message, headers=headers) as resp:
            if resp.status != 200:
                raise RspamdError(f"rspamd answered HTTP {resp.status}")
            if (resp.content_length or 0) > MAX_RESPONSE:
                raise RspamdError(f"rspamd's answer is {resp.content_length} octets (the limit is {MAX_RESPONSE})")
            raw = bytearray()
            async for chunk in resp.content.iter_chunked(64 * 1024):
                raw += chunk
                if len(raw) > MAX_RESPONSE:
                    raise RspamdError(f"rspamd's answer is over {MAX_RESPONSE} octets")
        try:
            answer = json.loads(raw)
        except ValueError as exc:  # also UnicodeDecodeError
            raise RspamdError(f"rspamd's answer is not JSON: {exc}") from None
        if not isinstance(answer, dict):
            raise RspamdError("rspamd's answer is not a JSON object")
        return answer

    def _verdict(self, ctx: CheckContext, result: RspamdResult, answer: dict[str, Any]) -> Verdict | None:
        action = result.action
        why = f"rspamd {action} score={result.score:.2f}/{result.required_score:.2f}"
        limit = self.config.reject_score
        if action == "reject" or (limit is not None and result.score >= limit):
            return reject("Spam message rejected", 554, "5.7.1", reason=why)
        if action == "soft reject":
            return tempfail("Try again later", 451, "4.7.1", reason=why)
        if action == "greylist":
            return tempfail("Greylisted, please try again later", 451, "4.7.1", reason=why)
        if action == "discard":
            return discard(why)
        if action == "quarantine":
            return quarantine(why)
        if action not in ("no action", *_SPAM_ACTIONS):
            log.warning("rspamd: unknown action %r for %s; taken as no action", action, ctx.queue_id)
        edits = _milter_edits(ctx, answer, skip=_OUR_HEADERS if self.config.add_header else ())
        spam = action in _SPAM_ACTIONS
        if action == "rewrite subject":
            subject = answer.get("subject")
            if not isinstance(subject, str):
                original = (ctx.header("Subject") or [""])[0]
                subject = f"***SPAM*** {original}"
            edits.append(HeaderEdit("change", "Subject", subject, 1))
        if self.config.add_header:
            edits += _remove_all(ctx, _OUR_HEADERS)
            score = f"{result.score:.2f}"
            edits += [HeaderEdit("add", "X-Spam-Score", f"{score} / {result.required_score:.2f}"),
                      HeaderEdit("add", "X-Spam-Action", action),
                      HeaderEdit("add", "X-Spam-Status", f"{'Yes' if spam else 'No'}, score={score}")]
        if spam:
            edits.append(HeaderEdit("add", "X-Spam", "Yes"))
        return Verdict(reason=why if spam else "", headers=tuple(edits)) if edits else None


def _clean(value: str) -> str:
    # An HTTP header value must not carry CR, LF or other controls; a client's HELO could.
    return "".join(ch if ch.isprintable() else " " for ch in value)[:1000]


def _number(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RspamdError(f"rspamd's {what} is not a number: {value!r}"[:200])
    return float(value)


def _result(answer: dict[str, Any]) -> RspamdResult:
    action = answer.get("action")
    if not isinstance(action, str):
        raise RspamdError("rspamd's answer has no action")
    symbols = answer.get("symbols")
    names = tuple(str(k) for k in symbols) if isinstance(symbols, dict) else ()
    return RspamdResult(action, _number(answer.get("score"), "score"),
                        _number(answer.get("required_score"), "required_score"), names)


def _remove_all(ctx: CheckContext, names: tuple[str, ...]) -> list[HeaderEdit]:
    """Deletions of every field called one of ``names``, last first (so each index still points at its field)."""
    return [HeaderEdit("change", name, "", i)
            for name in names for i in range(len(ctx.header(name)), 0, -1)]


def _milter_edits(ctx: CheckContext, answer: dict[str, Any], skip: tuple[str, ...]) -> list[HeaderEdit]:
    """rspamd's milter block: ``remove_headers`` {name: n} (n-th field, 0 all, negative from the end) and
    ``add_headers`` {name: value | {value, order} | [those]} (an order of 0 or more inserts at that position)."""
    milter = answer.get("milter")
    if not isinstance(milter, dict):
        return []
    skipped = {s.lower() for s in skip}
    edits: list[HeaderEdit] = []
    removals = milter.get("remove_headers")
    if isinstance(removals, dict):
        for name, order in removals.items():
            if not isinstance(name, str) or not isinstance(order, int) or name.lower() in skipped:
                continue
            count = len(ctx.header(name))
            if order == 0:
                edits += _remove_all(ctx, (name,))
            else:
                index = order if order > 0 else count + order + 1
                if 1 <= index <= count:
                    edits.append(HeaderEdit("change", name, "", index))
    additions = milter.get("add_headers")
    if isinstance(additions, dict):
        for name, spec in additions.items():
            if not isinstance(name, str) or name.lower() in skipped:
                continue
            for item in spec if isinstance(spec, list) else [spec]:
                if isinstance(item, str):
                    edits.append(HeaderEdit("add", name, item))
                elif isinstance(item, dict) and isinstance(item.get("value"), str):
                    order = item.get("order")
                    if isinstance(order, int) and not isinstance(order, bool) and order >= 0:
                        edits.append(HeaderEdit("insert", name, item["value"], order))
                    else:
                        edits.append(HeaderEdit("add", name, item["value"]))
    return [e for e in edits if _valid_name(e.name)]


def _valid_name(name: str) -> bool:
    # A field name rspamd (or a Lua rule) made up must still be a legal one (RFC 5322 ftext), or it is dropped.
    return bool(name) and all(33 <= ord(ch) <= 126 and ch != ":" for ch in name)
