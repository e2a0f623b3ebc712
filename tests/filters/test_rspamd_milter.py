"""``MilterCheck`` against rspamd's proxy worker in milter mode (real rspamd on loopback, self-scanning)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from mailhop.checks.api import Action, CheckContext, HeaderEdit
from mailhop.checks.milter import MilterCheck
from mailhop.config.checks import MilterConfig
from mailhop.milter.conversation import Decision
from mailhop.reply import Reply
from tests.conftest import require_program
from tests.support.rspamd import Rspamd

pytestmark = pytest.mark.anyio

GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
HEAD = (b"From: Alice <alice@sender.test>\r\nTo: bob@dest.test\r\nSubject: hello\r\n  world\r\n"
        b"Message-ID: <2@sender.test>\r\nDate: Mon, 30 Nov 2026 10:00:00 +0000\r\n")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def rspamd() -> Iterator[Rspamd]:
    with Rspamd(require_program("rspamd")) as server:
        yield server


def context(body: bytes) -> CheckContext:
    ctx = CheckContext(client_ip="192.0.2.30", client_port=40100, helo="mail.sender.test")
    ctx.sender = "alice@sender.test"
    ctx.recipients = ["bob@dest.test"]
    ctx.queue_id = "MQ7"
    ctx.message = HEAD + b"\r\n" + body + b"\r\n"
    ctx.size = len(ctx.message)
    return ctx


def milter(rspamd: Rspamd) -> MilterCheck:
    return MilterCheck(MilterConfig(name="rspamd-milter", address=rspamd.milter, timeout=10))


async def test_gtube_is_rejected_with_rspamds_reply(rspamd: Rspamd) -> None:
    ctx = context(GTUBE)
    verdict = await milter(rspamd).data(ctx)
    assert verdict is not None and verdict.action is Action.REJECT
    assert verdict.reply == Reply(554, "5.7.1", "Gtube pattern")
    assert ctx.results["milter:rspamd-milter"].stage == "eob"


async def test_clean_message_passes_with_rspamds_headers(rspamd: Rspamd) -> None:
    ctx = context(b"Just a short note about lunch tomorrow.")
    verdict = await milter(rspamd).data(ctx)
    assert verdict is not None and verdict.action is Action.CONTINUE
    assert ctx.results["milter:rspamd-milter"].decision in (Decision.ACCEPT, Decision.CONTINUE)
    edits = {e.name: e for e in verdict.headers}
    # Our "i" macro is the queue id rspamd reports back; the score proves it scanned the replayed message.
    assert edits["X-Rspamd-Queue-Id"] == HeaderEdit("add", "X-Rspamd-Queue-Id", "MQ7")
    assert edits["X-Spamd-Result"].value.startswith("default: False [0.00 / 15.00]")
    assert edits["X-Spam-Status"].value == "No, score=0.00"


async def test_add_header_and_rewrite_subject_through_the_milter(rspamd: Rspamd) -> None:
    tagged = await milter(rspamd).data(context(b"Y" + GTUBE[1:]))
    assert tagged is not None and HeaderEdit("change", "X-Spam", "Yes", 1) in tagged.headers
    rewritten = await milter(rspamd).data(context(b"Z" + GTUBE[1:]))
    # rspamd saw the folded Subject as sent (fold kept) and rewrote it.
    assert rewritten is not None
    [subject] = [e for e in rewritten.headers if e.name == "Subject"]
    assert subject.kind == "change" and subject.index == 1 and subject.value.startswith("*** SPAM *** hello")
    assert "world" in subject.value
