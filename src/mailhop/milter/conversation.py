"""One message replayed to a milter, without I/O: which packets go out, which wait for a reply, what the replies
mean. The socket side is ``milter.client``; the packet formats are ``milter.protocol``.

The order, after option negotiation::

    (MACRO C) CONNECT -> (MACRO H) HELO -> (MACRO M) MAIL -> (MACRO R) RCPT ... -> (MACRO T) DATA -> HEADER ...
    -> (MACRO N) EOH -> BODY ... -> (MACRO E) BODYEOB -> [modifications] final reply      (the caller sends QUIT)

The milter may switch steps off (SMFIP_NO*) or ask for no reply (SMFIP_NR_*); BODYEOB always gets a reply. What a
reply means depends on the stage (libmilter's xxfi_* semantics):

    stage               REJECT / TEMPFAIL / REPLYCODE      ACCEPT                   DISCARD
    connect, helo       the message is refused              no more filtering        (invalid) discard
    mail, data ... eob  the message is refused              no more filtering        discard the message
    rcpt                this recipient only                 no more filtering        discard the message

If every recipient is refused, so is the message (a temporary refusal among them makes it temporary). Header
changes and QUARANTINE are only valid in reply to BODYEOB and only if negotiated; PROGRESS restarts the wait;
SKIP ends the body chunks. Anything else out of place raises ``ProtocolError``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from .protocol import (
    CHUNK_SIZE,
    AddHeader,
    ChangeHeader,
    Cmd,
    InsertHeader,
    Negotiated,
    OptNeg,
    ProtocolError,
    Quarantine,
    ReplyCode,
    Response,
    Simple,
    SmfiFlag,
    SmfiProto,
    body,
    connect,
    encode,
    header,
    helo,
    macro,
    mail,
    rcpt,
    split_message,
)

__all__ = ["Connect", "Conversation", "Decision", "MessageInfo", "Result", "Stage", "Step"]


class Stage(StrEnum):
    CONNECT = "connect"
    HELO = "helo"
    MAIL = "mail"
    RCPT = "rcpt"
    DATA = "data"
    HEADER = "header"
    EOH = "eoh"
    BODY = "body"
    EOB = "eob"


class Decision(StrEnum):
    CONTINUE = "continue"  # no objection (header changes and a quarantine may come with it)
    ACCEPT = "accept"  # no more filtering wanted (at end of message its changes stand, as with CONTINUE)
    REJECT = "reject"
    TEMPFAIL = "tempfail"
    DISCARD = "discard"


@dataclass(frozen=True, slots=True)
class Connect:
    hostname: str  # the client's name, or "[address]" when it has none we trust
    family: str  # "4", "6", "L" (unix), "U" (unknown)
    port: int
    address: str


@dataclass(frozen=True, slots=True)
class MessageInfo:
    """Everything replayed to the milter for one message."""

    connect: Connect
    helo: str
    sender: str  # "" for the null reverse-path
    recipients: tuple[str, ...]
    message: bytes  # CRLF, dot-unstuffed, as received
    # Macros per stage command (Cmd.CONNECT, ...); {mail_addr} and {rcpt_addr} are added by the conversation.
    macros: Mapping[bytes, tuple[tuple[str, str], ...]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Step:
    """Packets to write, and whether a reply must be read before the next step."""

    stage: Stage
    payload: bytes
    expects_reply: bool


@dataclass(frozen=True, slots=True)
class Result:
    decision: Decision
    stage: Stage  # where the decision was made
    reply: ReplyCode | None = None  # a custom reply for REJECT/TEMPFAIL
    headers: tuple[AddHeader | InsertHeader | ChangeHeader, ...] = ()
    quarantine: str | None = None
    refused_recipients: tuple[tuple[str, Decision, ReplyCode | None], ...] = ()


_SKIP_FLAG = {Stage.CONNECT: SmfiProto.NOCONNECT, Stage.HELO: SmfiProto.NOHELO, Stage.MAIL: SmfiProto.NOMAIL,
              Stage.RCPT: SmfiProto.NORCPT, Stage.DATA: SmfiProto.NODATA, Stage.HEADER: SmfiProto.NOHDRS,
              Stage.EOH: SmfiProto.NOEOH, Stage.BODY: SmfiProto.NOBODY}
_NR_FLAG = {Stage.CONNECT: SmfiProto.NR_CONN, Stage.HELO: SmfiProto.NR_HELO, Stage.MAIL: SmfiProto.NR_MAIL,
            Stage.RCPT: SmfiProto.NR_RCPT, Stage.DATA: SmfiProto.NR_DATA, Stage.HEADER: SmfiProto.NR_HDR,
            Stage.EOH: SmfiProto.NR_EOH, Stage.BODY: SmfiProto.NR_BODY}
_MACRO_STAGE = {Stage.CONNECT: Cmd.CONNECT, Stage.HELO: Cmd.HELO, Stage.MAIL: Cmd.MAIL, Stage.RCPT: Cmd.RCPT,
                Stage.DATA: Cmd.DATA, Stage.EOH: Cmd.EOH, Stage.EOB: Cmd.BODYEOB}


_DECISION = {Simple.ACCEPT: Decision.ACCEPT, Simple.REJECT: Decision.REJECT, Simple.TEMPFAIL: Decision.TEMPFAIL,
             Simple.DISCARD: Decision.DISCARD}


class Conversation:
    """The replay of one message as a sequence of ``Step``s, and the meaning of the milter's replies.

    Drive it: ``step = conv.next_step()``; write ``step.payload``; if ``step.expects_reply``, feed each decoded
    reply to ``conv.receive(r)`` until it returns True; repeat until ``next_step()`` is None; then read
    ``conv.result``. The caller sends SMFIC_QUIT afterwards.
    """

    def __init__(self, negotiated: Negotiated, info: MessageInfo) -> None:
        self._proto = negotiated.protocol
        self._actions = negotiated.actions
        self._info = info
        self._steps = self._plan()
        self._current: Step | None = None
        self._rcpt_index = -1
        self._refused: list[tuple[str, Decision, ReplyCode | None]] = []
        self._edits: list[AddHeader | InsertHeader | ChangeHeader] = []
        self._quarantine: str | None = None
        self._skip_body = False
        self.result: Result | None = None

    def _wanted(self, stage: Stage) -> bool:
        flag = _SKIP_FLAG.get(stage)
        return flag is None or not self._proto & flag

    def _step(self, stage: Stage, packet: bytes, extra: tuple[tuple[str, str], ...] = ()) -> Step:
        macros = (*self._info.macros.get(_MACRO_STAGE[stage], ()), *extra) if stage in _MACRO_STAGE else ()
        prefix = macro(_MACRO_STAGE[stage], macros) if macros else b""
        flag = _NR_FLAG.get(stage)
        return Step(stage, prefix + packet, flag is None or not self._proto & flag)

    def _plan(self) -> Iterator[Step]:
        info = self._info
        c = info.connect
        if self._wanted(Stage.CONNECT):
            yield self._step(Stage.CONNECT, connect(c.hostname, c.family, c.port, c.address))
        if self._wanted(Stage.HELO) and info.helo:
            yield self._step(Stage.HELO, helo(info.helo))
        if self._wanted(Stage.MAIL):
            yield self._step(Stage.MAIL, mail(info.sender), (("{mail_addr}", info.sender),))
        if self._wanted(Stage.RCPT):
            for r in info.recipients:
                self._rcpt_index += 1
                yield self._step(Stage.RCPT, rcpt(r), (("{rcpt_addr}", r),))
            if len(self._refused) == len(info.recipients) and info.recipients:
                return  # every recipient refused: the message is (see _finish_rcpts)
        if self._wanted(Stage.DATA):
            yield self._step(Stage.DATA, encode(Cmd.DATA))
        fields, body_bytes = split_message(info.message)
        if self._wanted(Stage.HEADER):
            for name, value in fields:
                yield self._step(Stage.HEADER, header(name, value))
        if self._wanted(Stage.EOH):
            yield self._step(Stage.EOH, encode(Cmd.EOH))
        if self._wanted(Stage.BODY):
            for start in range(0, len(body_bytes), CHUNK_SIZE):
                if self._skip_body:
                    break
                yield self._step(Stage.BODY, body(body_bytes[start:start + CHUNK_SIZE]))
        yield self._step(Stage.EOB, encode(Cmd.BODYEOB))

    def next_step(self) -> Step | None:
        """The next packets to send, or None when the conversation is over (``result`` is set)."""
        if self.result is not None:
            return None
        self._current = next(self._steps, None)
        if self._current is None and self.result is None:
            self._finish_rcpts()
        return self._current

    def _finish_rcpts(self) -> None:
        # Only reached when the plan stopped after RCPT: every recipient was refused.
        # A temporary refusal among them makes the whole a temporary one: a retry may get through.
        tempfails = [r for r in self._refused if r[1] is Decision.TEMPFAIL]
        first = tempfails[0] if tempfails else self._refused[0]
        self.result = Result(first[1], Stage.RCPT, first[2], refused_recipients=tuple(self._refused))

    def _decide(self, decision: Decision, reply: ReplyCode | None = None) -> bool:
        assert self._current is not None
        stage = self._current.stage
        if stage is Stage.RCPT and decision in (Decision.REJECT, Decision.TEMPFAIL):
            # Per-recipient refusal: recorded; the message goes on for the other recipients.
            self._refused.append((self._info.recipients[self._rcpt_index], decision, reply))
            return True
        # Changes made before the final reply stand when it accepts (at end of message CONTINUE and ACCEPT
        # both accept); a refusal or discard drops them.
        kept = decision in (Decision.CONTINUE, Decision.ACCEPT)
        edits = tuple(self._edits) if kept else ()
        quarantine = self._quarantine if kept else None
        self.result = Result(decision, stage, reply, edits, quarantine, tuple(self._refused))
        return True

    def receive(self, response: Response) -> bool:
        """Apply one reply to the current step. True: the step is complete (a final reply came)."""
        step = self._current
        if step is None:
            raise ProtocolError(f"unexpected reply {type(response).__name__} with no command outstanding")
        stage = step.stage
        if isinstance(response, Simple):
            return self._simple(stage, response)
        if isinstance(response, ReplyCode):
            return self._decide(Decision.TEMPFAIL if response.code < 500 else Decision.REJECT, response)
        if isinstance(response, Quarantine):
            self._need(stage, SmfiFlag.QUARANTINE, "quarantine")
            self._quarantine = response.reason or "milter"
            return False
        if isinstance(response, OptNeg):
            raise ProtocolError("option negotiation reply in the middle of a message")
        self._need(stage, SmfiFlag.CHGHDRS if isinstance(response, ChangeHeader) else SmfiFlag.ADDHDRS,
                   f"{type(response).__name__}")
        self._edits.append(response)
        return False

    def _simple(self, stage: Stage, response: Simple) -> bool:
        if response is Simple.PROGRESS:
            return False
        if response is Simple.SKIP:
            # SMFIS_SKIP: no more body chunks. Anywhere else it makes no sense; it is taken as "continue".
            if stage is Stage.BODY:
                self._skip_body = True
            return True
        if response is Simple.CONTINUE:
            return self._decide(Decision.CONTINUE) if stage is Stage.EOB else True
        return self._decide(_DECISION[response])

    def _need(self, stage: Stage, action: SmfiFlag, what: str) -> None:
        if stage is not Stage.EOB:
            raise ProtocolError(f"the milter tried to {what} at {stage}; only allowed at end of message")
        if not self._actions & action:
            raise ProtocolError(f"the milter tried to {what} without negotiating it")
