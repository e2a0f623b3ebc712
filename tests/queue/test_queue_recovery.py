"""Daemon start (recover=True): spool lock, orphan bodies, quarantine of corrupt messages."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from contract import FakeClock, make_envelope, queue_message, read_all

from mailhop.errors import QueueError
from mailhop.queue import SqliteQueue, new_queue_id

pytestmark = pytest.mark.anyio
KB = 1024

Open = Callable[..., Awaitable[SqliteQueue]]


@pytest.fixture
def spool(tmp_path: Path) -> Path:
    return tmp_path / "spool"


@pytest.fixture
async def open_queue(anyio_backend: str, spool: Path, clock: FakeClock) -> AsyncIterator[Open]:
    """``await open_queue(recover=...)`` starts a backend on the spool; all are stopped at the end."""
    opened: list[SqliteQueue] = []

    async def _open(*, recover: bool = True) -> SqliteQueue:
        q = SqliteQueue(spool, clock=clock)
        await q.start(recover=recover)
        opened.append(q)
        return q

    try:
        yield _open
    finally:
        for q in opened:
            await q.stop()


def tamper(spool: Path, sql: str, *args: object) -> None:
    conn = sqlite3.connect(spool / "queue.db", isolation_level=None)
    try:
        conn.execute(sql, args)
    finally:
        conn.close()


async def test_orphan_body_files_removed_on_start(open_queue: Open, spool: Path) -> None:
    q = await open_queue()
    kept = await queue_message(q, b"k" * (300 * KB))
    # a body streamed to disk whose accept never committed (the daemon died before the commit)
    writer = q.body_writer()
    writer.write(b"o" * (200 * KB))
    orphan = q.spool.body_path(writer.queue_id)
    assert orphan.exists()
    stray = spool / "bodies" / "ZZ" / new_queue_id()
    stray.write_bytes(b"garbage")
    await q.stop()
    writer.abort()  # only closes the descriptor now; put the file back as a crash would leave it
    orphan.write_bytes(b"o" * (200 * KB))

    q2 = await open_queue()
    assert not orphan.exists() and not stray.exists()
    assert sorted(q2.spool.scan_bodies()) == [q2.spool.body_path(kept)]
    assert await read_all(q2, kept) == b"k" * (300 * KB)


async def test_missing_or_short_body_file_is_quarantined(open_queue: Open) -> None:
    q = await open_queue()
    good = await queue_message(q, b"g" * (300 * KB))
    missing = await queue_message(q, b"m" * (300 * KB))
    short = await queue_message(q, b"s" * (300 * KB))
    inline = await queue_message(q, b"inline body")
    await q.stop()
    q.spool.body_path(missing).unlink()
    with q.spool.body_path(short).open("r+b") as f:
        f.truncate(1000)

    q2 = await open_queue()
    by_id = {m.id: m for m in await q2.list()}
    assert set(by_id) == {good, missing, short, inline}
    assert not by_id[good].held and not by_id[inline].held
    assert by_id[missing].held and by_id[missing].hold_reason == "corrupt: body file missing"
    assert by_id[short].held and by_id[short].hold_reason.startswith("corrupt: body file has 1000 bytes")
    assert {m.id for m in await q2.list(held=True)} == {missing, short}
    assert await read_all(q2, good) == b"g" * (300 * KB)
    with pytest.raises(QueueError):
        await q2.open_body(missing)
    assert await q2.delete(missing)  # an admin can remove a quarantined message
    assert await q2.get(missing) is None


async def test_undecodable_rows_are_quarantined(open_queue: Open, spool: Path) -> None:
    q = await open_queue()
    bad_params = await queue_message(q)
    bad_status = await queue_message(q, envelope=make_envelope(rcpts=("a@x.example", "b@x.example")))
    no_inline = await queue_message(q)
    no_rcpts = await queue_message(q)
    fine = await queue_message(q)
    await q.stop()
    tamper(spool, "UPDATE messages SET params = '{not json' WHERE id = ?", bad_params)
    tamper(spool, "UPDATE recipients SET status = 'exploded' WHERE msg_id = ? AND idx = 1", bad_status)
    tamper(spool, "DELETE FROM bodies WHERE id = ?", no_inline)
    tamper(spool, "DELETE FROM recipients WHERE msg_id = ?", no_rcpts)

    q2 = await open_queue()  # must not crash
    held = {m.id: m.hold_reason for m in await q2.list(held=True)}
    assert set(held) == {bad_params, bad_status, no_inline, no_rcpts}
    assert held[bad_params].startswith("corrupt: params is not JSON")
    assert held[bad_status].startswith("corrupt: recipient row")
    assert held[no_inline] == "corrupt: inline body missing"
    assert held[no_rcpts] == "corrupt: no recipients"
    m = await q2.get(bad_params)  # still readable, with default parameters
    assert m is not None and m.held and m.recipients
    m = await q2.get(bad_status)
    assert m is not None and [r.address for r in m.recipients] == ["a@x.example"]
    assert not (await q2.get(fine) or pytest.fail("fine message lost")).held
    await q2.stop()

    q3 = await open_queue()  # a second recovery keeps the first reason and does not fail
    assert {m.id: m.hold_reason for m in await q3.list(held=True)} == held


async def test_second_daemon_on_same_spool_fails(open_queue: Open, spool: Path, clock: FakeClock) -> None:
    q = await open_queue()
    other = SqliteQueue(spool, clock=clock)
    with pytest.raises(QueueError, match="in use by another mailhop daemon"):
        await other.start(recover=True)
    await other.stop()  # harmless on a backend that failed to start
    await q.stop()
    q2 = await open_queue()  # the lock is released by stop
    assert await q2.stats()


async def test_recover_false_takes_no_lock_and_changes_nothing(open_queue: Open, spool: Path) -> None:
    daemon = await open_queue()
    qid = await queue_message(daemon, b"d" * (300 * KB))
    writer = daemon.body_writer()  # an accept in progress in the daemon
    writer.write(b"p" * (200 * KB))
    in_progress = daemon.spool.body_path(writer.queue_id)

    cli = await open_queue(recover=False)  # works while the daemon holds the lock
    assert in_progress.exists()  # the CLI did not treat the daemon's body as an orphan
    assert [m.id for m in await cli.list()] == [qid]
    assert await cli.hold(qid, "by cli")
    m = await daemon.get(qid)
    assert m is not None and m.hold_reason == "by cli"
    await daemon.accept(make_envelope(), writer)
    assert len(await cli.list()) == 2
    await cli.stop()
    assert (spool / "lock").exists()


async def test_newer_schema_is_refused(open_queue: Open, spool: Path, clock: FakeClock) -> None:
    q = await open_queue()
    await q.stop()
    tamper(spool, "UPDATE schema_version SET version = 99")
    newer = SqliteQueue(spool, clock=clock)
    with pytest.raises(QueueError, match="newer"):
        await newer.start()
    again = SqliteQueue(spool, clock=clock)  # the lock was released on the failed start
    with pytest.raises(QueueError, match="newer"):
        await again.start()
