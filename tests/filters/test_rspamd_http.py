"""``RspamdCheck`` against a real rspamd (HTTP /checkv2) on loopback, and the answer mapping against a small
scripted HTTP server where real rspamd cannot be made to answer that way (odd actions, broken answers)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict

from mailhop.checks.api import Action, CheckContext, HeaderEdit, Phase
from mailhop.checks.chain import PolicyChain
from mailhop.checks.rspamd import RspamdCheck, RspamdError, RspamdResult
from mailhop.config.checks import RspamdConfig
from mailhop.reply import Reply
from tests.conftest import require_program
from tests.support.rspamd import Rspamd, free_port

pytestmark = pytest.mark.anyio

GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
HEAD = (b"From: Alice <alice@sender.test>\r\nTo: bob@dest.test\r\nSubject: hello world\r\n"
        b"Message-ID: <1@sender.test>\r\nDate: Mon, 30 Nov 2026 10:00:00 +0000\r\n")
CLEAN = HEAD + b"\r\nJust a short note about lunch tomorrow.\r\n"


def message(body: str, head: bytes = HEAD) -> bytes:
    return head + b"\r\n" + body.encode() + b"\r\n"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def rspamd() -> Iterator[Rspamd]:
    with Rspamd(require_program("rspamd")) as server:
        yield server


def context(msg: bytes | None, sender: str = "alice@sender.test", user: str | None = None) -> CheckContext:
    ctx = CheckContext(client_ip="192.0.2.20", client_port=50000, helo="mail.sender.test", user=user)
    ctx.sender = sender
    ctx.recipients = ["bob@dest.test", "carol@dest.test"]
    ctx.queue_id = "RQ42"
    ctx.message = msg
    ctx.size = len(msg or b"")
    if msg is not None:
        ctx.header_block = msg.split(b"\r\n\r\n", 1)[0]
    return ctx


@pytest.fixture
async def scan(rspamd: Rspamd) -> AsyncIterator[RspamdCheck]:
    check = RspamdCheck(RspamdConfig(enabled=True, url=rspamd.url, timeout=10))
    yield check
    await check.aclose()


# -- real rspamd ------------------------------------------------------------------------------------------------------

async def test_gtube_is_rejected(scan: RspamdCheck) -> None:
    ctx = context(message(GTUBE))
    verdict = await scan.data(ctx)
    assert verdict is not None and verdict.action is Action.REJECT
    assert verdict.reply == Reply(554, "5.7.1", "Spam message rejected")
    result = ctx.results["rspamd"]
    assert isinstance(result, RspamdResult) and result.action == "reject" and "GTUBE" in result.symbols


async def test_clean_message_passes_with_spam_headers(scan: RspamdCheck) -> None:
    ctx = context(CLEAN)
    verdict = await scan.data(ctx)
    assert verdict is not None and verdict.action is Action.CONTINUE
    edits = {e.name: e for e in verdict.headers}
    assert edits["X-Spam-Score"] == HeaderEdit("add", "X-Spam-Score", "0.00 / 15.00")
    assert edits["X-Spam-Action"].value == "no action"
    assert edits["X-Spam-Status"].value == "No, score=0.00"
    assert "X-Spam" not in edits
    # rspamd's milter_headers routines come through the milter block; our queue id reached it.
    assert edits["X-Rspamd-Queue-Id"].value == "RQ42"
    assert edits["X-Spamd-Result"].value.startswith("default: False [0.00 / 15.00]")


async def test_forged_spam_headers_are_removed_before_ours(scan: RspamdCheck) -> None:
    head = HEAD + b"X-Spam-Status: No, score=-100\r\nX-Spam-Score: -100\r\nX-Spam-Status: No, again\r\n"
    verdict = await scan.data(context(message("hello", head)))
    assert verdict is not None
    removals = [e for e in verdict.headers if e.kind == "change" and e.value == ""]
    assert HeaderEdit("change", "X-Spam-Status", "", 2) in removals
    assert HeaderEdit("change", "X-Spam-Status", "", 1) in removals
    assert HeaderEdit("change", "X-Spam-Score", "", 1) in removals
    # Last first, so an index still points at its field when the one before it goes.
    statuses = [e.index for e in removals if e.name == "X-Spam-Status"]
    assert statuses == [2, 1]


async def test_add_header_action(scan: RspamdCheck) -> None:
    verdict = await scan.data(context(message("Y" + GTUBE[1:])))  # rspamd's test pattern for "add header"
    assert verdict is not None and verdict.action is Action.CONTINUE
    assert HeaderEdit("add", "X-Spam", "Yes") in verdict.headers
    assert HeaderEdit("add", "X-Spam-Status", "Yes, score=6.00") in verdict.headers


async def test_rewrite_subject_action(scan: RspamdCheck) -> None:
    verdict = await scan.data(context(message("Z" + GTUBE[1:])))  # rspamd's test pattern for "rewrite subject"
    assert verdict is not None
    assert HeaderEdit("change", "Subject", "*** SPAM *** hello world", 1) in verdict.headers
    assert HeaderEdit("add", "X-Spam", "Yes") in verdict.headers


async def test_reject_score_overrides_the_action(rspamd: Rspamd) -> None:
    check = RspamdCheck(RspamdConfig(enabled=True, url=rspamd.url, reject_score=6.0))
    try:
        verdict = await check.data(context(message("Y" + GTUBE[1:])))
    finally:
        await check.aclose()
    assert verdict is not None and verdict.action is Action.REJECT


async def test_no_spam_headers_when_add_header_is_off(rspamd: Rspamd) -> None:
    check = RspamdCheck(RspamdConfig(enabled=True, url=rspamd.url, add_header=False))
    try:
        verdict = await check.data(context(CLEAN, sender="", user="alice"))
    finally:
        await check.aclose()
    names = {e.name for e in verdict.headers} if verdict else set()
    assert not names & {"X-Spam-Score", "X-Spam-Action"}
    assert "X-Spam-Status" in names  # rspamd's own routine, no longer overridden by ours


async def test_over_scan_limit_is_not_scanned() -> None:
    check = RspamdCheck(RspamdConfig(enabled=True, url=f"http://127.0.0.1:{free_port()}"))
    assert await check.data(context(None)) is None
    await check.aclose()


async def test_rspamd_not_running_raises_so_the_chain_applies_on_error() -> None:
    check = RspamdCheck(RspamdConfig(enabled=True, url=f"http://127.0.0.1:{free_port()}", timeout=2))
    try:
        with pytest.raises(aiohttp.ClientConnectionError):
            await check.data(context(CLEAN))
        chain = PolicyChain([check], on_error="tempfail")
        verdict = await chain.run(Phase.DATA, context(CLEAN))
        assert verdict.action is Action.TEMPFAIL and verdict.reply is not None and verdict.reply.code == 451
        open_chain = PolicyChain([check], on_error="accept")
        assert (await open_chain.run(Phase.DATA, context(CLEAN))).action is Action.CONTINUE
    finally:
        await check.aclose()


async def test_wrong_path_is_an_error(rspamd: Rspamd) -> None:
    check = RspamdCheck(RspamdConfig(enabled=True, url=f"{rspamd.url}/nowhere"))
    try:
        with pytest.raises(RspamdError, match="HTTP"):
            await check.data(context(CLEAN))
    finally:
        await check.aclose()


# -- scripted answers --------------------------------------------------------------------------------------------------

class Scripted:
    """A tiny HTTP server answering /checkv2 with ``body`` and ``status``; records the request headers."""

    def __init__(self) -> None:
        self.body: bytes = b"{}"
        self.status = 200
        self.requests: list[tuple[CIMultiDict[str], bytes]] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append((CIMultiDict(request.headers), await request.read()))
        return web.Response(body=self.body, status=self.status, content_type="application/json")


@pytest.fixture
async def scripted() -> AsyncIterator[tuple[Scripted, RspamdCheck]]:
    fake = Scripted()
    app = web.Application()
    app.router.add_post("/checkv2", fake.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    check = RspamdCheck(RspamdConfig(enabled=True, url=f"http://127.0.0.1:{port}", password="s3cret", timeout=5))
    try:
        yield fake, check
    finally:
        await check.aclose()
        await runner.cleanup()


def answer(action: str, score: float = 1.0, **extra: object) -> bytes:
    return json.dumps({"action": action, "score": score, "required_score": 15.0, "symbols": {}, **extra}).encode()


async def test_request_carries_the_envelope(scripted: tuple[Scripted, RspamdCheck]) -> None:
    fake, check = scripted
    fake.body = answer("no action")
    ctx = context(CLEAN, user="alice")
    ctx.helo = "evil\r\nInjected: yes"
    await check.data(ctx)
    headers, body = fake.requests[0]
    assert body == CLEAN
    assert headers["IP"] == "192.0.2.20" and headers["From"] == "alice@sender.test"
    assert headers.getall("Rcpt") == ["bob@dest.test", "carol@dest.test"]
    assert headers["Queue-Id"] == "RQ42" and headers["User"] == "alice" and headers["Password"] == "s3cret"
    assert headers["Helo"] == "evil  Injected: yes" and "Injected" not in headers


async def test_null_sender_and_no_user(scripted: tuple[Scripted, RspamdCheck]) -> None:
    fake, check = scripted
    fake.body = answer("no action")
    await check.data(context(CLEAN, sender=""))
    headers, _ = fake.requests[0]
    assert headers["From"] == "<>" and "User" not in headers


@pytest.mark.parametrize(("action", "reply"), [
    ("soft reject", Reply(451, "4.7.1", "Try again later")),
    ("greylist", Reply(451, "4.7.1", "Greylisted, please try again later")),
])
async def test_temporary_actions(scripted: tuple[Scripted, RspamdCheck], action: str, reply: Reply) -> None:
    fake, check = scripted
    fake.body = answer(action)
    verdict = await check.data(context(CLEAN))
    assert verdict is not None and verdict.action is Action.TEMPFAIL and verdict.reply == reply


async def test_milter_block_edits(scripted: tuple[Scripted, RspamdCheck]) -> None:
    fake, check = scripted
    fake.body = answer("no action", milter={
        "add_headers": {"X-A": "plain", "X-B": {"value": "top", "order": 0}, "X-C": {"value": "end", "order": -1},
                        "X-D": [{"value": "one"}, "two"], "Bad Name": "x", "X-Spam-Status": "theirs"},
        "remove_headers": {"Received": -1, "Subject": 0, "X-None": 1, "To": 5},
    })
    head = HEAD + b"Received: from a\r\nReceived: from b\r\n"
    verdict = await check.data(context(message("hi", head)))
    assert verdict is not None
    edits = [e for e in verdict.headers if not e.name.startswith("X-Spam")]
    assert edits == [
        HeaderEdit("change", "Received", "", 2),
        HeaderEdit("change", "Subject", "", 1),
        HeaderEdit("add", "X-A", "plain"),
        HeaderEdit("insert", "X-B", "top", 0),
        HeaderEdit("add", "X-C", "end"),
        HeaderEdit("add", "X-D", "one"),
        HeaderEdit("add", "X-D", "two"),
    ]
    assert HeaderEdit("add", "X-Spam-Status", "theirs") not in verdict.headers


async def test_unknown_action_is_no_action(scripted: tuple[Scripted, RspamdCheck]) -> None:
    fake, check = scripted
    fake.body = answer("frobnicate", score=2.5)
    verdict = await check.data(context(CLEAN))
    assert verdict is not None and verdict.action is Action.CONTINUE
    assert HeaderEdit("add", "X-Spam-Status", "No, score=2.50") in verdict.headers


@pytest.mark.parametrize(("status", "body"), [
    (500, answer("no action")),
    (200, b"not json"),
    (200, b"[1, 2]"),
    (200, b'{"score": 1, "required_score": 15}'),
    (200, b'{"action": "reject", "score": "high", "required_score": 15}'),
    (200, b'{"action": "no action", "score": true, "required_score": 15}'),
    (200, b"\xff\xfe"),
    (200, b'{"action": "no action", "pad": "' + b"x" * (3 * 1024 * 1024) + b'"}'),
])
async def test_bad_answers_raise(scripted: tuple[Scripted, RspamdCheck], status: int, body: bytes) -> None:
    fake, check = scripted
    fake.status, fake.body = status, body
    with pytest.raises(RspamdError):
        await check.data(context(CLEAN))


@pytest.mark.parametrize(("action", "expected"), [("discard", Action.DISCARD), ("quarantine", Action.QUARANTINE)])
async def test_custom_actions(scripted: tuple[Scripted, RspamdCheck], action: str, expected: Action) -> None:
    fake, check = scripted
    fake.body = answer(action, score=20)
    verdict = await check.data(context(CLEAN))
    assert verdict is not None and verdict.action is expected and "score=20.00" in verdict.reason
