"""The check API: what a check sees (``CheckContext``) and what it answers (``Verdict``).

A check is an object with any of the async hooks ``connect``, ``helo``, ``mail``, ``rcpt`` and ``data``; each
returns a ``Verdict`` or None (no opinion). The chain (``checks.chain``) runs every check's hook for a phase in
dependency order, under a deadline, and combines the verdicts. A user check can be a plain function::

    # mychecks.py, named in the config as  [[checks.custom]] callable = "mychecks:no_exe" phase = "data"
    from mailhop.checks.api import CheckContext, Verdict, reject

    async def no_exe(ctx: CheckContext) -> Verdict | None:
        if ctx.message is not None and b'filename="' in ctx.message and b'.exe"' in ctx.message:
            return reject("Executable attachments are not accepted")
        return None

Untrusted input: everything in the context comes from the client or from DNS. Checks must not raise on bad
input; if one does (or overruns the deadline) the chain applies ``checks.on_error`` and logs it.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Literal

from ..message.headers import field_values
from ..reply import Reply

if TYPE_CHECKING:
    from ..dns import Resolver

__all__ = [
    "Action",
    "AuthResult",
    "Check",
    "CheckContext",
    "FunctionCheck",
    "HeaderEdit",
    "Phase",
    "Verdict",
    "accept",
    "add_header",
    "discard",
    "quarantine",
    "reject",
    "tempfail",
]


class Phase(StrEnum):
    CONNECT = "connect"
    HELO = "helo"
    MAIL = "mail"
    RCPT = "rcpt"
    DATA = "data"


class Action(StrEnum):
    CONTINUE = "continue"  # no objection; later checks run
    ACCEPT = "accept"  # accept now: later checks of this phase are skipped (a whitelist hit)
    REJECT = "reject"  # permanent refusal with ``reply`` (5xx)
    TEMPFAIL = "tempfail"  # transient refusal with ``reply`` (4xx)
    DISCARD = "discard"  # accept with 250 and drop the message (data phase; elsewhere it discards the transaction)
    QUARANTINE = "quarantine"  # accept with 250 and hold the message for an operator (``mailhop quarantine``)


# The order in which one verdict overrides another when the chain combines them.
SEVERITY = {Action.CONTINUE: 0, Action.ACCEPT: 1, Action.QUARANTINE: 2, Action.DISCARD: 3, Action.TEMPFAIL: 4,
            Action.REJECT: 5}


@dataclass(frozen=True, slots=True)
class AuthResult:
    """One resinfo of an Authentication-Results header (RFC 8601 2.2), e.g. spf=pass smtp.mailfrom=a@b."""

    method: str  # "spf", "dkim", "dmarc", "arc", "iprev", ...
    result: str  # "pass", "fail", "softfail", "neutral", "none", "temperror", "permerror", "policy"
    reason: str = ""  # free text for reason="..."
    properties: tuple[tuple[str, str], ...] = ()  # (("smtp.mailfrom", "a@b"), ("header.d", "example.org"))


@dataclass(frozen=True, slots=True)
class HeaderEdit:
    """A change to the message's header section (applied once, at the end of data, before the message is queued).

    ``add``: append at the end of the header section. ``insert``: insert at ``index`` (0 = the top, just below
    our own Received:). ``change``: replace the ``index``-th (1-based) field called ``name``; an empty ``value``
    deletes it (the milter CHGHEADER semantics).
    """

    kind: Literal["add", "insert", "change"]
    name: str
    value: str
    index: int = 0


@dataclass(frozen=True, slots=True)
class Verdict:
    action: Action = Action.CONTINUE
    reply: Reply | None = None  # for REJECT and TEMPFAIL; a default is used when None
    reason: str = ""  # for the log and the quarantine reason; never shown to the client
    headers: tuple[HeaderEdit, ...] = ()
    auth_results: tuple[AuthResult, ...] = ()

    @property
    def is_terminal(self) -> bool:
        """Whether later checks of the phase are skipped."""
        return self.action in (Action.ACCEPT, Action.REJECT, Action.TEMPFAIL, Action.DISCARD)


_CODE = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")


def reject(text: str, code: int = 550, enhanced: str = "5.7.1", reason: str = "") -> Verdict:
    """Refuse permanently (5xx)."""
    if not 500 <= code < 600 or not _CODE.match(enhanced) or not enhanced.startswith("5"):
        raise ValueError(f"a rejection needs a 5xx code and a 5.x.x enhanced code, got {code} {enhanced}")
    return Verdict(Action.REJECT, Reply(code, enhanced, text), reason or text)


def tempfail(text: str, code: int = 451, enhanced: str = "4.7.1", reason: str = "") -> Verdict:
    """Refuse for now (4xx): the client retries later."""
    if not 400 <= code < 500 or not _CODE.match(enhanced) or not enhanced.startswith("4"):
        raise ValueError(f"a temporary failure needs a 4xx code and a 4.x.x enhanced code, got {code} {enhanced}")
    return Verdict(Action.TEMPFAIL, Reply(code, enhanced, text), reason or text)


def accept(reason: str = "") -> Verdict:
    """Accept now; later checks of this phase do not run."""
    return Verdict(Action.ACCEPT, reason=reason)


def discard(reason: str) -> Verdict:
    """Answer 250 and drop the message."""
    return Verdict(Action.DISCARD, reason=reason)


def quarantine(reason: str) -> Verdict:
    """Answer 250 and hold the message in the quarantine."""
    return Verdict(Action.QUARANTINE, reason=reason)


def add_header(name: str, value: str) -> Verdict:
    """No objection; add a header field at the end of the header section."""
    return Verdict(headers=(HeaderEdit("add", name, value),))


@dataclass
class CheckContext:
    """What checks know about the session and the current transaction. One per SMTP session.

    Session fields are set when the session learns them; transaction fields are reset by ``reset_transaction``
    (RSET, a new MAIL, or the end of a message).
    """

    client_ip: str
    client_port: int = 0
    role: str = "mx"  # the listener's role: "mx", "submission", "submissions"
    trusted: bool = False  # the client is in relay.trusted_networks
    resolver: Resolver | None = None
    tls: bool = False
    helo: str = ""
    user: str | None = None  # the SASL identity once authenticated
    session: dict[str, Any] = field(default_factory=dict)  # results that last the whole session (e.g. DNSBL)
    connect_verdict: Verdict | None = None  # a connect-phase refusal, enforced at MAIL for unauthenticated clients

    # -- the transaction --------------------------------------------------------------------------------------------
    sender: str | None = None  # None before MAIL; "" is the null reverse-path
    recipient: str | None = None  # during the rcpt phase: the recipient being checked
    recipients: list[str] = field(default_factory=list)  # recipients accepted so far
    queue_id: str = ""  # set at the data phase
    message: bytes | None = None  # data phase: the message as the client sent it; None if over max_scan_size
    header_block: bytes = b""  # data phase: the header section as sent (bounded)
    size: int = 0  # data phase: octets the client sent
    results: dict[str, Any] = field(default_factory=dict)  # per-transaction results (e.g. "spf" for DMARC)
    auth_results: list[AuthResult] = field(default_factory=list)
    header_edits: list[HeaderEdit] = field(default_factory=list)
    quarantine_reason: str = ""

    @property
    def sender_domain(self) -> str:
        """The domain of MAIL FROM ('' for the null sender or before MAIL)."""
        return (self.sender or "").rpartition("@")[2].lower()

    @property
    def authenticated(self) -> bool:
        return self.user is not None

    def header(self, name: str) -> list[str]:
        """Every value of a header field of the message (data phase), unfolded, in order."""
        return field_values(self.header_block, name)

    def reset_transaction(self) -> None:
        self.sender = None
        self.recipient = None
        self.recipients = []
        self.queue_id = ""
        self.message = None
        self.header_block = b""
        self.size = 0
        self.results = {}
        self.auth_results = []
        self.header_edits = []
        self.quarantine_reason = ""


Hook = Callable[[CheckContext], Awaitable[Verdict | None]]


class Check:
    """Base class for built-in checks. Override the hooks you need; ``phases`` finds them."""

    name: str = "check"
    requires: tuple[str, ...] = ()  # names of checks whose results this one reads (run first, same phase or earlier)
    # A check with its own, longer timeouts (a milter, rspamd) raises the chain's deadline for itself to this, so
    # its own timeout and error policy act first; the chain's deadline stays the outer bound.
    deadline: float = 0.0

    async def connect(self, ctx: CheckContext) -> Verdict | None:
        return None

    async def helo(self, ctx: CheckContext) -> Verdict | None:
        return None

    async def mail(self, ctx: CheckContext) -> Verdict | None:
        return None

    async def rcpt(self, ctx: CheckContext) -> Verdict | None:
        return None

    async def data(self, ctx: CheckContext) -> Verdict | None:
        return None

    async def aclose(self) -> None:
        """Release resources (sessions, pools) at shutdown."""

    def phases(self) -> frozenset[Phase]:
        """The phases whose hook this check overrides."""
        return frozenset(p for p in Phase if getattr(type(self), p.value) is not getattr(Check, p.value))

    def hook(self, phase: Phase) -> Hook:
        hook: Hook = getattr(self, phase.value)
        return hook


class FunctionCheck(Check):
    """Wraps a user's plain ``async def check(ctx) -> Verdict | None`` as a check for one phase."""

    def __init__(self, name: str, phase: Phase, func: Hook, requires: tuple[str, ...] = ()) -> None:
        self.name = name
        self.requires = requires
        self._phase = phase
        self._func = func

    def phases(self) -> frozenset[Phase]:
        return frozenset({self._phase})

    def hook(self, phase: Phase) -> Hook:
        return self._func
