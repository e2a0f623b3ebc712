"""``MilterCheck`` and the milter client against a scripted milter on loopback.

The fake milter (an asyncio server in this file) speaks the protocol with packets built by hand, records every
command it receives, and answers each with what the test's script says: one or more reply packets, HANG (never
answer) or CLOSE (drop the connection).
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mailhop.checks.api import Action, CheckContext, HeaderEdit, Phase
from mailhop.checks.chain import PolicyChain
from mailhop.checks.milter import MilterCheck
from mailhop.config.checks import MilterConfig
from mailhop.milter.protocol import SmfiFlag, SmfiProto
from mailhop.reply import Reply
from tests.support.rspamd import free_port

pytestmark = pytest.mark.anyio

HANG = "hang"
CLOSE = "close"
ALL_ACTIONS = SmfiFlag.ADDHDRS | SmfiFlag.CHGHDRS | SmfiFlag.QUARANTINE
MESSAGE = (b"From: Alice <a@sender.test>\r\nTo: x@dest.test\r\nSubject: hello\r\n  folded\r\n"
           b"Message-ID: <1@sender.test>\r\n\r\nline one\r\nline two\r\n")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def pkt(cmd: bytes, data: bytes = b"") -> bytes:
    return struct.pack(">I", len(data) + 1) + cmd + data


def cstr(*parts: bytes) -> bytes:
    return b"".join(part + b"\0" for part in parts)


CONTINUE = pkt(b"c")
Writer = Callable[[asyncio.StreamWriter], Awaitable[None]]
Script = Callable[[bytes, bytes], "bytes | str | Writer | None"]


@dataclass
class FakeMilter:
    """Answers OPTNEG with ``actions``/``protocol``; then ``script(cmd, data)`` for each command: packets, HANG,
    CLOSE, an async function that writes the answer itself, or None: CONTINUE (nothing for the commands that get
    no reply: MACRO, QUIT, ABORT, and the steps switched to no-reply)."""

    script: Script = lambda cmd, data: None
    actions: int = ALL_ACTIONS
    protocol: int = 0
    commands: list[tuple[bytes, bytes]] = field(default_factory=list)
    connections: int = 0
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    release: asyncio.Event = field(default_factory=asyncio.Event)  # ends a HANG when the test is done

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        no_reply = {b"L": SmfiProto.NR_HDR, b"B": SmfiProto.NR_BODY, b"C": SmfiProto.NR_CONN,
                    b"H": SmfiProto.NR_HELO, b"M": SmfiProto.NR_MAIL, b"R": SmfiProto.NR_RCPT,
                    b"T": SmfiProto.NR_DATA, b"N": SmfiProto.NR_EOH}
        try:
            while True:
                (length,) = struct.unpack(">I", await reader.readexactly(4))
                packet = await reader.readexactly(length)
                cmd, data = packet[:1], packet[1:]
                self.commands.append((cmd, data))
                if cmd == b"O":
                    writer.write(pkt(b"O", struct.pack(">III", 6, self.actions, self.protocol)))
                elif cmd == b"Q":
                    break
                elif cmd in (b"D", b"A"):
                    continue
                else:
                    answer = self.script(cmd, data)
                    if answer == HANG:
                        await self.release.wait()
                    if answer in (HANG, CLOSE):
                        break
                    if answer is None and cmd in no_reply and self.protocol & no_reply[cmd]:
                        continue
                    if callable(answer):
                        await answer(writer)
                    else:
                        assert not isinstance(answer, str)
                        writer.write(CONTINUE if answer is None else answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def sent(self, cmd: bytes) -> list[bytes]:
        return [data for c, data in self.commands if c == cmd]

    def macros(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for data in self.sent(b"D"):
            parts = data[1:].split(b"\0")[:-1]
            out.update({parts[i].decode(): parts[i + 1].decode() for i in range(0, len(parts), 2)})
        return out


@contextlib.asynccontextmanager
async def serving(milter: FakeMilter, unix: str | None = None) -> AsyncIterator[str]:
    if unix is not None:
        server = await asyncio.start_unix_server(milter.handle, unix)
        address = f"unix:{unix}"
    else:
        server = await asyncio.start_server(milter.handle, "127.0.0.1", 0)
        address = f"inet:127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        yield address
    finally:
        milter.release.set()
        if milter.tasks:  # let each handler read to the client's QUIT or close, so the record is complete
            await asyncio.wait(milter.tasks, timeout=5)
        server.close()
        await server.wait_closed()


def context(message: bytes | None = MESSAGE, recipients: tuple[str, ...] = ("x@dest.test",),
            user: str | None = None) -> CheckContext:
    ctx = CheckContext(client_ip="192.0.2.10", client_port=40000, helo="client.sender.test", user=user)
    ctx.sender = "a@sender.test"
    ctx.recipients = list(recipients)
    ctx.queue_id = "QID123"
    ctx.message = message
    ctx.size = len(message or b"")
    return ctx


def check(address: str, on_error: str = "tempfail", timeout: float = 5.0) -> MilterCheck:
    config = MilterConfig(name="fake", address=address, timeout=timeout, connect_timeout=2.0,
                          on_error=on_error)
    return MilterCheck(config, hostname="mx.mailhop.test")


def at(stage: bytes, answer: bytes | str | Writer) -> Script:
    """Answer ``answer`` at command ``stage``, CONTINUE elsewhere."""
    return lambda cmd, data: answer if cmd == stage else None


# -- what the milter is told -----------------------------------------------------------------------------------------

async def test_replay_sends_envelope_headers_body_and_macros() -> None:
    milter = FakeMilter()
    async with serving(milter) as address:
        verdict = await check(address).data(context(user="alice"))
    assert verdict is None
    assert [c for c, _ in milter.commands if c != b"D"] == [b"O", b"C", b"H", b"M", b"R", b"T", b"L", b"L", b"L",
                                                           b"L", b"N", b"B", b"E", b"Q"]
    assert milter.sent(b"C") == [b"[192.0.2.10]\x004" + struct.pack(">H", 40000) + b"192.0.2.10\x00"]
    assert milter.sent(b"H") == [cstr(b"client.sender.test")]
    assert milter.sent(b"M") == [cstr(b"<a@sender.test>")]
    assert milter.sent(b"R") == [cstr(b"<x@dest.test>")]
    assert milter.sent(b"L") == [cstr(b"From", b"Alice <a@sender.test>"), cstr(b"To", b"x@dest.test"),
                                 cstr(b"Subject", b"hello\n  folded"), cstr(b"Message-ID", b"<1@sender.test>")]
    assert milter.sent(b"B") == [b"line one\r\nline two\r\n"]
    macros = milter.macros()
    assert macros["j"] == "mx.mailhop.test" and macros["i"] == "QID123"
    assert macros["{auth_authen}"] == "alice" and macros["{client_addr}"] == "192.0.2.10"
    assert macros["{mail_addr}"] == "a@sender.test" and macros["{rcpt_addr}"] == "x@dest.test"
    # Each macro packet names the command it belongs to and comes right before it.
    order = [c + (d[:1] if c == b"D" else b"") for c, d in milter.commands]
    for stage in (b"C", b"M", b"R", b"T", b"E"):
        assert order[order.index(b"D" + stage) + 1] == stage


async def test_unauthenticated_client_gets_no_auth_macro() -> None:
    milter = FakeMilter()
    async with serving(milter) as address:
        await check(address).data(context())
    assert "{auth_authen}" not in milter.macros()


async def test_large_body_goes_in_chunks_of_at_most_65535() -> None:
    body = b"".join(b"%07d the quick brown fox jumps over the lazy dog\r\n" % i for i in range(5000))
    milter = FakeMilter()
    async with serving(milter) as address:
        await check(address).data(context(MESSAGE.split(b"\r\n\r\n")[0] + b"\r\n\r\n" + body))
    chunks = milter.sent(b"B")
    assert len(chunks) == -(-len(body) // 65535) and max(map(len, chunks)) == 65535
    assert b"".join(chunks) == body


async def test_skipped_and_no_reply_steps() -> None:
    milter = FakeMilter(protocol=SmfiProto.NOHDRS | SmfiProto.NOHELO | SmfiProto.NR_BODY | SmfiProto.NR_RCPT
                        | SmfiProto.NR_CONN)
    async with serving(milter) as address:
        assert await check(address).data(context(recipients=("x@dest.test", "y@dest.test"))) is None
    sent = [c for c, _ in milter.commands]
    assert b"L" not in sent and b"H" not in sent
    assert sent.count(b"R") == 2 and b"B" in sent and sent[-2:] == [b"E", b"Q"]


async def test_skip_reply_stops_body_chunks() -> None:
    milter = FakeMilter(protocol=SmfiProto.SKIP, script=at(b"B", pkt(b"s")))
    big = MESSAGE + b"z" * 200_000
    async with serving(milter) as address:
        assert await check(address).data(context(big)) is None
    assert len(milter.sent(b"B")) == 1 and milter.sent(b"E") == [b""]


async def test_message_over_scan_limit_is_not_sent() -> None:
    milter = FakeMilter()
    async with serving(milter) as address:
        assert await check(address).data(context(None)) is None
    assert milter.connections == 0


async def test_unix_socket_address() -> None:
    milter = FakeMilter(script=at(b"E", pkt(b"r")))
    with tempfile.TemporaryDirectory() as tmp:
        async with serving(milter, unix=str(Path(tmp) / "milter.sock")) as address:
            verdict = await check(address).data(context())
    assert verdict is not None and verdict.action is Action.REJECT


# -- what its answers become -----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("stage", "answer", "action", "reply"), [
    (b"E", pkt(b"r"), Action.REJECT, Reply(550, "5.7.1", "Message rejected by content filter")),
    (b"E", pkt(b"t"), Action.TEMPFAIL, Reply(451, "4.7.1", "Message deferred by content filter, try again later")),
    (b"M", pkt(b"t"), Action.TEMPFAIL, Reply(451, "4.7.1", "Message deferred by content filter, try again later")),
    (b"C", pkt(b"r"), Action.REJECT, Reply(550, "5.7.1", "Message rejected by content filter")),
    (b"E", pkt(b"y", b"554 5.7.0 Virus found: Eicar\0"), Action.REJECT, Reply(554, "5.7.0", "Virus found: Eicar")),
    (b"L", pkt(b"y", b"452 4.3.1 Out of memory\0"), Action.TEMPFAIL, Reply(452, "4.3.1", "Out of memory")),
    (b"E", pkt(b"y", b"550 Go away\0"), Action.REJECT, Reply(550, "5.7.1", "Go away")),
])
async def test_refusals(stage: bytes, answer: bytes, action: Action, reply: Reply) -> None:
    milter = FakeMilter(script=at(stage, answer))
    async with serving(milter) as address:
        verdict = await check(address).data(context())
    assert verdict is not None and verdict.action is action and verdict.reply == reply
    assert milter.commands[-1][0] == b"Q"


async def test_accept_early_ends_the_replay_without_changes() -> None:
    milter = FakeMilter(script=at(b"H", pkt(b"a")))
    async with serving(milter) as address:
        ctx = context()
        assert await check(address).data(ctx) is None
    assert [c for c, _ in milter.commands if c != b"D"] == [b"O", b"C", b"H", b"Q"]
    assert ctx.results["milter:fake"].decision == "accept"


async def test_discard() -> None:
    milter = FakeMilter(script=at(b"T", pkt(b"d")))
    async with serving(milter) as address:
        verdict = await check(address).data(context())
    assert verdict is not None and verdict.action is Action.DISCARD


async def test_quarantine_with_header_changes() -> None:
    def script(cmd: bytes, data: bytes) -> bytes | None:
        if cmd == b"E":
            return (pkt(b"h", cstr(b"X-Scanned", b"yes")) + pkt(b"q", cstr(b"suspicious attachment"))
                    + pkt(b"c"))
        return None

    async with serving(FakeMilter(script=script)) as address:
        verdict = await check(address).data(context())
    assert verdict is not None and verdict.action is Action.QUARANTINE
    assert verdict.reason == "suspicious attachment"
    assert verdict.headers == (HeaderEdit("add", "X-Scanned", "yes"),)


async def test_add_insert_change_headers() -> None:
    def script(cmd: bytes, data: bytes) -> bytes | None:
        if cmd == b"E":
            return (pkt(b"h", cstr(b"X-Added", b"line one\n\tline two"))
                    + pkt(b"i", struct.pack(">I", 1) + cstr(b"DKIM-Signature", b"v=1; d=sender.test"))
                    + pkt(b"i", struct.pack(">I", 0) + cstr(b"X-Top", b"t"))
                    + pkt(b"m", struct.pack(">I", 1) + cstr(b"Subject", b"[tagged] hello"))
                    + pkt(b"m", struct.pack(">I", 0) + cstr(b"Message-ID", b""))
                    + pkt(b"a"))
        return None

    async with serving(FakeMilter(script=script)) as address:
        verdict = await check(address).data(context())
    assert verdict is not None and verdict.action is Action.CONTINUE
    assert verdict.headers == (
        HeaderEdit("add", "X-Added", "line one\r\n\tline two"),
        HeaderEdit("insert", "DKIM-Signature", "v=1; d=sender.test", 0),
        HeaderEdit("insert", "X-Top", "t", 0),
        HeaderEdit("change", "Subject", "[tagged] hello", 1),
        HeaderEdit("change", "Message-ID", "", 1),
    )


async def test_progress_extends_the_wait() -> None:
    async def slow(writer: asyncio.StreamWriter) -> None:
        # Five PROGRESS replies 0.2 s apart: 1 s in all, longer than the 0.6 s timeout for one reply.
        for _ in range(5):
            await asyncio.sleep(0.2)
            writer.write(pkt(b"p"))
            await writer.drain()
        writer.write(pkt(b"h", cstr(b"X-Slow", b"done")) + CONTINUE)

    async with serving(FakeMilter(script=at(b"E", slow))) as address:
        verdict = await check(address, timeout=0.6).data(context())
    assert verdict is not None and verdict.headers == (HeaderEdit("add", "X-Slow", "done"),)


async def test_some_recipients_refused_message_goes_on_to_all() -> None:
    milter = FakeMilter(script=lambda cmd, data: pkt(b"r") if data == cstr(b"<bad@dest.test>") else None)
    async with serving(milter) as address:
        ctx = context(recipients=("bad@dest.test", "good@dest.test"))
        assert await check(address).data(ctx) is None
    assert b"E" in [c for c, _ in milter.commands]
    assert ctx.results["milter:fake"].refused_recipients[0][0] == "bad@dest.test"


async def test_every_recipient_refused_refuses_the_message() -> None:
    milter = FakeMilter(script=at(b"R", pkt(b"y", b"550 5.1.1 No such user\0")))
    async with serving(milter) as address:
        verdict = await check(address).data(context(recipients=("a@dest.test", "b@dest.test")))
    assert verdict is not None and verdict.action is Action.REJECT
    assert verdict.reply == Reply(550, "5.1.1", "No such user")
    assert b"T" not in [c for c, _ in milter.commands]


# -- failures: the check's own on_error ------------------------------------------------------------------------------

FAILURES: dict[str, Script] = {
    "hangs": at(b"E", HANG),
    "closes mid-conversation": at(b"M", CLOSE),
    "replaces the body (not negotiated)": at(b"E", pkt(b"b", b"new body")),
    "adds a recipient (not negotiated)": at(b"E", pkt(b"+", cstr(b"<x@evil.test>"))),
    "changes a header before the end": at(b"L", pkt(b"m", struct.pack(">I", 1) + cstr(b"To", b"x"))),
    "sends an oversized reply": at(b"E", struct.pack(">I", 2 * 1024 * 1024) + b"h"),
    "sends garbage": at(b"C", b"\x00\x00\x00\x02Zz"),
}


@pytest.mark.parametrize("failure", list(FAILURES))
@pytest.mark.parametrize("on_error", ["tempfail", "accept"])
async def test_misbehaving_milter_applies_on_error(failure: str, on_error: str) -> None:
    milter = FakeMilter(script=FAILURES[failure])
    async with serving(milter) as address:
        ctx = context()
        verdict = await check(address, on_error=on_error, timeout=0.3).data(ctx)
    assert ctx.results["milter:fake"] == "error"
    if on_error == "tempfail":
        assert verdict is not None and verdict.action is Action.TEMPFAIL
        assert verdict.reply == Reply(451, "4.7.1", "Content filter unavailable")
    else:
        assert verdict is None


@pytest.mark.parametrize("on_error", ["tempfail", "accept"])
async def test_milter_not_listening(on_error: str) -> None:
    ctx = context()
    verdict = await check(f"inet:127.0.0.1:{free_port()}", on_error=on_error).data(ctx)
    assert ctx.results["milter:fake"] == "error"
    assert (verdict.action if verdict else None) == (Action.TEMPFAIL if on_error == "tempfail" else None)


async def test_unsupported_protocol_version_applies_on_error() -> None:
    async def old(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(17)
        writer.write(pkt(b"O", struct.pack(">III", 1, 1, 0)))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(old, "127.0.0.1", 0)
    try:
        verdict = await check(f"inet:127.0.0.1:{server.sockets[0].getsockname()[1]}").data(context())
    finally:
        server.close()
        await server.wait_closed()
    assert verdict is not None and verdict.action is Action.TEMPFAIL


async def test_in_a_chain_the_check_decides_and_the_chain_records_edits() -> None:
    milter = FakeMilter(script=at(b"E", pkt(b"h", cstr(b"X-Filtered", b"fake")) + CONTINUE))
    async with serving(milter) as address:
        chain = PolicyChain([check(address)], on_error="tempfail")
        ctx = context()
        verdict = await chain.run(Phase.DATA, ctx)
    assert verdict.action is Action.CONTINUE
    assert ctx.header_edits == [HeaderEdit("add", "X-Filtered", "fake")]


async def test_unanswered_body_chunks_of_a_large_message_arrive_whole() -> None:
    body = bytes(range(256)) * 4000  # 1 MB: several batched writes of no-reply chunks
    milter = FakeMilter(protocol=SmfiProto.NR_BODY | SmfiProto.NR_HDR)
    async with serving(milter) as address:
        assert await check(address).data(context(MESSAGE.split(b"\r\n\r\n")[0] + b"\r\n\r\n" + body)) is None
    assert b"".join(milter.sent(b"B")) == body and milter.commands[-2][0] == b"E"
