"""SmtpTransport against Postfix's smtp-sink: a real, independent SMTP and LMTP implementation."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailhop.delivery.pool import ConnectionPool
from mailhop.delivery.transport import Candidate
from tests.conftest import require_program
from tests.support.sink import SmtpSink

from .smtp_helpers import DELIVERED, deliver, destination, kinds, message, transport

pytestmark = [pytest.mark.anyio, pytest.mark.peer]

BODY = b"Subject: sink\r\n\r\n.one dot\r\n..two dots\r\n.\r\nbare\nlf\r\n" + b"W" * 1500 + b"\r\nend\r\n"


@pytest.mark.parametrize("lmtp", [False, True])
async def test_smtp_sink_receives_intact(tmp_path: Path, lmtp: bool) -> None:
    require_program("smtp-sink")
    pool = ConnectionPool()
    t = transport(pool=pool, max_rcpts_per_transaction=2)
    try:
        with SmtpSink("127.0.0.41", 0, dump_dir=tmp_path, options=["-L"] if lmtp else []) as sink:
            dest = destination(Candidate("sink.test", sink.host, sink.port), lmtp=lmtp)
            for _ in range(2):
                msg = message(["b@example.test", "c@example.test", "d@example.test"], body=BODY)
                assert kinds(await deliver(t, dest, msg, BODY)) == [DELIVERED] * 3
            await pool.close()
            sink.wait_for(4)
            got = sink.messages()
    finally:
        await pool.close()
    assert len(got) == 4 and sorted(len(m.rcpts) for m in got) == [1, 1, 2, 2]
    # smtp-sink drops CRs: compare with LF line ends; the bare LF became a line end like the others.
    expected = BODY.replace(b"\r\n", b"\n")
    assert all(m.content.endswith(expected) for m in got), got[0].content
