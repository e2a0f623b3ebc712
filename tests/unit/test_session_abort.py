"""The shutdown's last resort, ``SmtpSession.abort()``, ends a session whatever it is doing: also when the step it
handed to a task (here the commit at the end of DATA) has not started yet. Real loopback sockets, a real queue."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from mailhop.policy.relay import RelayPolicy
from mailhop.queue import SqliteQueue
from mailhop.server.listener import ConnectionLimiter
from mailhop.server.session import ServerState, SessionContext, SmtpSession
from mailhop.smtp import ServerSettings

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_abort_before_the_commit_step_starts_ends_the_session(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    queue = SqliteQueue(tmp_path / "spool")
    await queue.start()
    state = ServerState(limiter=ConnectionLimiter(10, 10), health=queue.health)
    ctx = SessionContext(settings=ServerSettings(hostname="relay.test"),
                         relay=RelayPolicy(["127.0.0.0/8"], ["example.test"]), queue=queue, state=state)
    aborted: list[SmtpSession] = []
    suspend = SmtpSession._suspend

    def suspend_then_abort(self: SmtpSession, step: object) -> None:
        suspend(self, step)  # type: ignore[arg-type]
        if not aborted:  # the first step of this client's session is the end of DATA's commit
            aborted.append(self)
            self.abort()  # the task exists but has not run yet, as when the grace period ends mid-message

    monkeypatch.setattr(SmtpSession, "_suspend", suspend_then_abort)
    server = await asyncio.get_running_loop().create_server(lambda: SmtpSession(ctx), "127.0.0.1", 0)
    try:
        host, port = server.sockets[0].getsockname()[:2]
        reader, writer = await asyncio.open_connection(host, port)
        assert (await reader.readline()).startswith(b"220")
        writer.write(b"EHLO c\r\nMAIL FROM:<a@c.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n")
        writer.write(b"Subject: cut off\r\n\r\nbody\r\n.\r\n")
        await writer.drain()
        rest = await asyncio.wait_for(reader.read(), 5)  # read to EOF: the connection must close
        assert b"queued" not in rest
        session = aborted[0]
        await asyncio.wait_for(session.closed_waiter(), 5)
        assert session not in state.sessions and state.limiter.total == 0
        writer.close()
    finally:
        server.close()
        await server.wait_closed()
        await queue.stop()
    # Nothing was committed, and the body in progress was removed with the session.
    again = SqliteQueue(tmp_path / "spool")
    await again.start()
    try:
        assert (await again.stats())["messages"] == 0
    finally:
        await again.stop()
    assert [p for p in (tmp_path / "spool" / "bodies").rglob("*") if p.is_file()] == []
