"""SqliteQueue specifics: storage layout, durability settings, fault injection, memory bound."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import os
import sqlite3
import stat
import threading
import tracemalloc
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from contract import FakeClock, make_envelope, queue_message, read_all

from mailhop.envelope import MailParams, RcptParams
from mailhop.errors import QueueError, QueueFullError
from mailhop.queue import SqliteQueue, commit, mark_delivered, mark_failed, rows, spool
from mailhop.queue.commit import GroupCommitter
from mailhop.queue.model import QueuedMessage
from mailhop.queue.sqlite import DEFAULT_PAGE_SIZE, SCHEMA_VERSION

pytestmark = pytest.mark.anyio
KB = 1024
MB = 1024 * KB


@pytest.fixture
async def q(anyio_backend: str, tmp_path: Path, clock: FakeClock) -> AsyncIterator[SqliteQueue]:
    backend = SqliteQueue(tmp_path / "spool", clock=clock)
    await backend.start()
    try:
        yield backend
    finally:
        await backend.stop()


def body_files(q: SqliteQueue) -> list[Path]:
    return sorted(q.spool.scan_bodies())


async def on_writer(q: SqliteQueue, fn: Callable[[sqlite3.Connection], Any]) -> Any:
    """Run fn on the writer connection, in the writer thread (a test seam; not for production code)."""
    return await q._write(lambda conn: (fn(conn), None))


async def test_layout_and_durability_settings(q: SqliteQueue) -> None:
    root = q.spool.root
    assert (root / "queue.db").is_file()
    assert (root / "lock").read_text().strip() == str(os.getpid())
    assert len(os.listdir(root / "bodies")) == 1024
    assert await on_writer(q, lambda c: c.execute("PRAGMA journal_mode").fetchone()[0]) == "wal"
    assert await on_writer(q, lambda c: c.execute("PRAGMA synchronous").fetchone()[0]) == 2  # FULL
    assert await on_writer(q, lambda c: c.execute("SELECT version FROM schema_version").fetchone()[0]) == \
        SCHEMA_VERSION


async def test_small_bodies_inline_large_in_files(q: SqliteQueue) -> None:
    small = await queue_message(q, b"s" * q.inline_max)  # exactly the limit: still inline
    assert body_files(q) == []
    big = await queue_message(q, b"b" * (q.inline_max + 1))
    files = body_files(q)
    assert files == [q.spool.root / "bodies" / big[-2:] / big]
    assert stat.S_IMODE(files[0].stat().st_mode) == 0o600
    assert files[0].read_bytes() == b"b" * (q.inline_max + 1)
    assert q.counters()["body_fsyncs"] == 2  # the file and its directory, nothing for the inline one
    assert await q.delete(big)
    assert body_files(q) == []
    assert await read_all(q, small) == b"s" * q.inline_max


async def test_inline_max_is_configurable(tmp_path: Path) -> None:
    backend = SqliteQueue(tmp_path / "s", inline_max=10)
    await backend.start()
    try:
        qid = await queue_message(backend, b"12345678901")
        assert body_files(backend) == [backend.spool.body_path(qid)]
    finally:
        await backend.stop()


@contextlib.asynccontextmanager
async def opened(path: Path, **options: Any) -> AsyncIterator[SqliteQueue]:
    """A started queue on ``path``, stopped on the way out."""
    backend = SqliteQueue(path, **options)
    await backend.start()
    try:
        yield backend
    finally:
        await backend.stop()


async def test_page_size_applies_to_a_new_spool_only(tmp_path: Path) -> None:
    async def page_size_of(backend: SqliteQueue) -> int:
        return int(await on_writer(backend, lambda c: c.execute("PRAGMA page_size").fetchone()[0]))

    async with opened(tmp_path / "s") as fresh:
        assert await page_size_of(fresh) == DEFAULT_PAGE_SIZE == 32768
        qid = await queue_message(fresh, b"x" * (100 * KB))
    # Reopened with another setting: the database keeps the size it was made with, and its mail.
    async with opened(tmp_path / "s", page_size=4096) as again:
        assert await page_size_of(again) == 32768
        assert await read_all(again, qid) == b"x" * (100 * KB)
    async with opened(tmp_path / "t", page_size=4096) as small:
        assert await page_size_of(small) == 4096
    with pytest.raises(ValueError, match="page_size must be one of"):
        SqliteQueue(tmp_path / "u", page_size=5000)


async def test_a_spool_made_with_rowid_tables_still_works(tmp_path: Path, clock: FakeClock,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Spools made before messages and bodies became WITHOUT ROWID tables (same columns, same schema version)
    keep working: every query is the same on both layouts."""
    old = tuple(stmt.replace(") WITHOUT ROWID", ")") if "TABLE messages" in stmt or "TABLE bodies" in stmt
                else stmt for stmt in rows.SCHEMA)
    assert old != rows.SCHEMA
    monkeypatch.setattr(rows, "SCHEMA", old)
    async with opened(tmp_path / "s", clock=clock) as made:
        kept = await queue_message(made, b"kept\r\n")
    monkeypatch.undo()
    async with opened(tmp_path / "s", clock=clock) as q:
        sql = await on_writer(q, lambda c: c.execute("SELECT sql FROM sqlite_master WHERE name = 'messages'")
                              .fetchone()[0])
        assert "WITHOUT ROWID" not in sql
        assert await read_all(q, kept) == b"kept\r\n"
        qid = await queue_message(q, b"new\r\n")
        m = await q.get(qid)
        assert m is not None
        assert await q.record(qid, [mark_delivered(m.recipients[0], "250 ok", now=clock.now)]) is True
        assert await q.get(qid) is None and await q.get(kept) is not None
    async with opened(tmp_path / "t", clock=clock) as fresh:
        sql = await on_writer(fresh, lambda c: c.execute("SELECT sql FROM sqlite_master WHERE name = 'bodies'")
                              .fetchone()[0])
        assert "WITHOUT ROWID" in sql


@pytest.mark.parametrize(("err", "exc_type"), [(errno.EIO, QueueError), (errno.ENOSPC, QueueFullError)])
async def test_body_fsync_failure(q: SqliteQueue, monkeypatch: pytest.MonkeyPatch, err: int,
                                  exc_type: type[QueueError]) -> None:
    def failing_fsync(fd: int) -> None:
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(spool, "fsync", failing_fsync)
    with pytest.raises(exc_type) as info:
        await queue_message(q, b"x" * (300 * KB))
    assert type(info.value) is exc_type
    assert body_files(q) == []
    assert (await q.stats())["messages"] == 0
    monkeypatch.undo()
    qid = await queue_message(q, b"y" * (300 * KB))  # the queue keeps working
    assert await read_all(q, qid) == b"y" * (300 * KB)


@pytest.mark.parametrize(("err", "exc_type"), [(errno.EIO, QueueError), (errno.ENOSPC, QueueFullError)])
async def test_body_write_failure(q: SqliteQueue, monkeypatch: pytest.MonkeyPatch, err: int,
                                  exc_type: type[QueueError]) -> None:
    writer = q.body_writer()
    writer.write(b"a" * (200 * KB))  # spilled to a file

    def failing_write(fd: int, data: Any) -> int:
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(spool, "write", failing_write)
    with pytest.raises(exc_type):
        writer.write(b"more")
    assert body_files(q) == []
    with pytest.raises(exc_type):  # the session keeps reading the data; later writes fail the same way
        writer.write(b"more")
    with pytest.raises(exc_type):
        await q.accept(make_envelope(), writer)
    writer.abort()
    monkeypatch.undo()
    assert await read_all(q, await queue_message(q, b"ok")) == b"ok"


async def test_unwritable_bodies_dir(q: SqliteQueue, monkeypatch: pytest.MonkeyPatch) -> None:
    real_open = os.open

    def deny_bodies(path: Any, flags: int, mode: int = 0o777) -> int:
        if "bodies" in str(path) and flags & os.O_CREAT:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, mode)

    monkeypatch.setattr(os, "open", deny_bodies)
    writer = q.body_writer()
    with pytest.raises(QueueError) as info:
        writer.write(b"x" * (200 * KB))
    assert not isinstance(info.value, QueueFullError)
    monkeypatch.undo()
    await queue_message(q, b"fine")


async def test_database_full_fails_the_batch_then_recovers(q: SqliteQueue) -> None:
    keep = await queue_message(q, b"before")
    pages = await on_writer(q, lambda c: c.execute("PRAGMA page_count").fetchone()[0])
    # SQLITE_FULL from a real SQLite code path: the database may not grow by a single page
    await on_writer(q, lambda c: c.execute(f"PRAGMA max_page_count = {pages}").fetchone())
    results = await asyncio.gather(
        *(queue_message(q, b"x" * size) for size in (5 * KB, 100 * KB, 64 * KB)), return_exceptions=True
    )
    assert all(type(r) is QueueFullError for r in results), results
    assert q.counters()["failed_batches"] >= 1
    await on_writer(q, lambda c: c.execute("PRAGMA max_page_count = 1073741823").fetchone())
    qid = await queue_message(q, b"after" * 70000)
    assert [m.id for m in await q.list()] == [keep, qid]


async def test_commit_failure_fails_the_whole_batch_and_removes_its_files(q: SqliteQueue) -> None:
    await on_writer(q, lambda c: c.execute(
        "CREATE TEMP TRIGGER fail_insert BEFORE INSERT ON main.messages BEGIN SELECT RAISE(ABORT, 'injected'); END"))
    writers = []
    for size in (5 * KB, 300 * KB, 1 * MB):
        w = q.body_writer()
        w.write(b"x" * size)
        writers.append(w)
    assert len(body_files(q)) == 2
    before = q.counters()
    results = await asyncio.gather(*(q.accept(make_envelope(), w) for w in writers), return_exceptions=True)
    assert [type(r) for r in results] == [QueueError] * 3, results
    assert all("injected" in str(r) for r in results)
    assert body_files(q) == []
    assert q.counters()["failed_batches"] > before["failed_batches"]
    assert q.counters()["accepted"] == before["accepted"]
    await on_writer(q, lambda c: c.execute("DROP TRIGGER temp.fail_insert"))
    qid = await queue_message(q, b"z" * (300 * KB))
    assert await read_all(q, qid) == b"z" * (300 * KB)
    assert (await q.stats())["messages"] == 1


async def test_failing_admin_operation_is_isolated(q: SqliteQueue) -> None:
    def boom(conn: sqlite3.Connection) -> tuple[None, None]:
        conn.execute("UPDATE messages SET held = 1")
        raise RuntimeError("bug in an operation")

    qid = await queue_message(q)
    results = await asyncio.gather(q._write(boom), queue_message(q), return_exceptions=True)
    assert isinstance(results[0], RuntimeError)
    assert isinstance(results[1], str)
    m = await q.get(qid)
    assert m is not None and not m.held  # the failed operation was rolled back to its savepoint


async def test_large_body_does_not_grow_memory(q: SqliteQueue) -> None:
    chunk = os.urandom(64 * KB)
    tracemalloc.start()
    try:
        writer = q.body_writer()
        for _ in range(800):  # 50 MB
            writer.write(chunk)
        qid = await q.accept(make_envelope(), writer)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * MB, f"peak {peak} bytes while queueing 50 MB"
    m = await q.get(qid)
    assert m is not None and m.size == 50 * MB
    assert q.spool.body_path(qid).stat().st_size == 50 * MB


async def test_stopped_queue_refuses_work(tmp_path: Path) -> None:
    backend = SqliteQueue(tmp_path / "s")
    with pytest.raises(QueueError):
        backend.body_writer()
    await backend.start()
    writer = backend.body_writer()
    writer.write(b"x" * (200 * KB))
    await backend.stop()
    await backend.stop()  # idempotent
    with pytest.raises(QueueError):
        await backend.accept(make_envelope(), writer)
    writer.abort()
    with pytest.raises(QueueError):
        await backend.get("0" * 16)
    with pytest.raises(QueueError):
        await backend.start()


async def test_on_accepted_hands_over_the_message_as_stored(q: SqliteQueue) -> None:
    # What delivery is handed must be what it would read back: every field, both body kinds.
    handed: list[tuple[Any, bytes | None]] = []
    vouched: list[bool] = []

    def hook(message: Any, body: bytes | None, canonical: bool) -> None:
        handed.append((message, body))
        vouched.append(canonical)

    q.on_accepted = hook
    params = MailParams(size=1234, body="8BITMIME", smtputf8=True, ret="HDRS", envid="env-1", requiretls=True)
    rparams = (RcptParams(notify=("SUCCESS", "FAILURE"), orcpt="rfc822;bob@example.com"),
               RcptParams(notify=("NEVER",)), RcptParams())
    env = make_envelope("älice@example.org", ("bob@example.com", "Carol@Sub.Example.NET", "dave@bücher.test"),
                        params=params, rcpt_params=rparams, client_ip="2001:db8::1", authenticated="alice",
                        tls=True)
    small = await queue_message(q, b"Subject: s\r\n\r\nsmall\r\n", env)
    big_body = b"b" * (q.inline_max + 1)
    big = await queue_message(q, big_body, make_envelope(sender=None))
    held = await queue_message(q, envelope=dataclasses.replace(make_envelope(), hold_reason="quarantine: x"))
    writer = q.body_writer()
    writer.write(b"Subject: c\r\n\r\nchecked\r\n")
    writer.canonical = True  # what the SMTP server sets after its decoder found no bare CR or LF
    checked = await q.accept(make_envelope(), writer)
    assert [m.id for m, _ in handed] == [small, big, held, checked]
    assert vouched == [False, False, False, True]
    for message, _ in handed:
        assert message == await q.get(message.id)
    assert handed[0][1] == b"Subject: s\r\n\r\nsmall\r\n"
    assert handed[1][1] is None  # file-backed: delivery reads it from the file
    assert handed[2][0].held


async def test_a_failing_on_accepted_hook_loses_nothing(q: SqliteQueue) -> None:
    def broken(message: Any, body: bytes | None, canonical: bool) -> None:
        raise RuntimeError("hook bug")

    q.on_accepted = broken
    qid = await queue_message(q)
    assert (await q.get(qid)) is not None


async def wait_for(predicate: Callable[[], bool], within: float) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def two_recipient_message(q: SqliteQueue) -> tuple[GroupCommitter, str, QueuedMessage]:
    """The queue's writer, and a queued message with two recipients (as stored)."""
    committer = q._committer
    assert committer is not None
    qid = await queue_message(q, envelope=make_envelope(rcpts=("a@x.example", "b@y.example")))
    m = await q.get(qid)
    assert m is not None
    return committer, qid, m


async def test_delivery_records_are_synced_lazily_and_then_for_sure(q: SqliteQueue, clock: FakeClock) -> None:
    committer, qid, m = await two_recipient_message(q)
    # A record alone commits without its own fsync; with nothing else to write, the writer syncs within the delay.
    assert await q.record(qid, [mark_delivered(m.recipients[0], "250 ok", now=clock.now)]) is False
    assert committer.lazy_commits == 1
    await wait_for(lambda: committer.lazy_syncs == 1, within=10 * commit.LAZY_SYNC_DELAY + 1)
    assert await on_writer(q, lambda c: c.execute("PRAGMA user_version").fetchone()[0]) == 1
    # An accept right after a record is a synchronous commit whose fsync covers the record: no extra sync.
    again = await q.get(qid)
    assert again is not None
    assert await q.record(qid, [mark_failed(again.recipients[1], "550 no", now=clock.now)]) is True
    await queue_message(q)
    assert committer.lazy_commits == 2
    await asyncio.sleep(3 * commit.LAZY_SYNC_DELAY)
    assert committer.lazy_syncs == 1
    assert await on_writer(q, lambda c: c.execute("PRAGMA synchronous").fetchone()[0]) == 2  # FULL for accepts


async def test_a_record_that_removes_a_body_file_syncs_before_the_file_goes(q: SqliteQueue, clock: FakeClock) -> None:
    committer = q._committer
    assert committer is not None
    qid = await queue_message(q, b"f" * (q.inline_max + 1))
    path = q.spool.body_path(qid)
    m = await q.get(qid)
    assert m is not None and path.exists()
    syncs = committer.lazy_syncs
    assert await q.record(qid, [mark_delivered(m.recipients[0], "250 ok", now=clock.now)]) is True
    # Synced in the same round, before the removal and before record() returned: not left to the timer.
    assert committer.lazy_syncs == syncs + 1
    assert not path.exists()


async def test_stop_syncs_a_pending_record(tmp_path: Path, clock: FakeClock) -> None:
    backend = SqliteQueue(tmp_path / "s", clock=clock)
    await backend.start()
    qid = await queue_message(backend)
    m = await backend.get(qid)
    assert m is not None
    committer = backend._committer
    assert committer is not None
    await backend.record(qid, [mark_delivered(m.recipients[0], "250 ok", now=clock.now)])
    await backend.stop()  # at once, well inside the delay
    assert committer.lazy_syncs == 1
    async with opened(tmp_path / "s", clock=clock) as again:
        assert await again.get(qid) is None


class _FailingSync:
    """The writer connection, except that the lazy sync's one-page write fails like a dying disk."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        if sql.startswith("PRAGMA user_version"):
            raise sqlite3.OperationalError("disk I/O error")
        return self._conn.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


async def test_a_failing_sync_backs_off_and_the_next_commit_covers_it(q: SqliteQueue, clock: FakeClock) -> None:
    committer, qid, m = await two_recipient_message(q)
    real = committer._conn
    committer._conn = _FailingSync(real)  # type: ignore[assignment]
    try:
        await q.record(qid, [mark_delivered(m.recipients[0], "250 ok", now=clock.now)])
        await wait_for(lambda: committer._sync_delay == commit._SYNC_RETRY_DELAY, within=2.0)
        assert committer.lazy_syncs == 0 and committer._unsynced
        await asyncio.sleep(3 * commit.LAZY_SYNC_DELAY)
        assert committer.lazy_syncs == 0  # not retried every 0.1 s while the disk fails
    finally:
        committer._conn = real
    q.health.mark_ok()
    await queue_message(q)  # a synchronous commit: its fsync covers the record too
    assert not committer._unsynced


# -- lazy hold: a delivery record waits briefly for an accept to share its commit --------------------------------


async def test_a_record_held_while_mail_comes_in_shares_the_next_accepts_commit(q: SqliteQueue,
                                                                                clock: FakeClock) -> None:
    committer, qid, m = await two_recipient_message(q)
    committer._hold = 30.0  # long enough that only the accept below can release it
    committer._hold_window = 60.0  # the accept above counts as recent however slow this machine is
    batches, lazy = committer.batches, committer.lazy_commits
    record = asyncio.ensure_future(q.record(qid, [mark_delivered(m.recipients[0], "250 ok", now=clock.now)]))
    await wait_for(lambda: committer.held_batches == 1, within=5)
    assert not record.done()
    other = await queue_message(q)
    assert await asyncio.wait_for(record, 5) is False
    # One transaction, synchronous (the accept's): the record needed neither a commit nor a sync of its own.
    assert committer.batches == batches + 1 and committer.lazy_commits == lazy
    assert not committer._unsynced
    stored = await q.get(qid)
    assert stored is not None and stored.recipients[0].status.value == "delivered"
    assert await q.get(other) is not None


async def test_a_held_record_without_company_commits_after_the_hold(q: SqliteQueue, clock: FakeClock) -> None:
    committer, qid, m = await two_recipient_message(q)
    committer._hold_window = 60.0
    committer._hold = 0.3
    lazy = committer.lazy_commits
    started = asyncio.get_running_loop().time()
    assert await q.record(qid, [mark_delivered(m.recipients[0], "250 ok", now=clock.now)]) is False
    assert 0.25 < asyncio.get_running_loop().time() - started < 5  # held for the hold, then on its own
    assert committer.held_batches == 1 and committer.lazy_commits == lazy + 1


async def test_records_commit_at_once_when_no_mail_is_coming_in(q: SqliteQueue, clock: FakeClock) -> None:
    committer, qid, m = await two_recipient_message(q)
    committer._hold = 30.0
    committer._hold_window = 0.05
    await asyncio.sleep(0.1)  # the last accept is no longer recent
    assert await asyncio.wait_for(q.record(qid, [mark_delivered(m.recipients[0], "250 ok", now=clock.now)]), 5) \
        is False
    assert committer.held_batches == 0


async def test_stop_commits_a_held_record(tmp_path: Path, clock: FakeClock) -> None:
    backend = SqliteQueue(tmp_path / "s", clock=clock)
    await backend.start()
    committer, qid, m = await two_recipient_message(backend)
    committer._hold = 30.0
    committer._hold_window = 60.0
    record = asyncio.ensure_future(backend.record(qid, [mark_delivered(m.recipients[0], "250 ok", now=clock.now)]))
    await wait_for(lambda: committer.held_batches == 1, within=5)
    await asyncio.wait_for(backend.stop(), 5)
    assert record.done() and record.result() is False
    async with opened(tmp_path / "s", clock=clock) as again:
        stored = await again.get(qid)
        assert stored is not None and stored.recipients[0].status.value == "delivered"


async def test_one_batch_of_many_messages_and_recipients_stores_every_row(q: SqliteQueue) -> None:
    """Six messages with 1 to 150 recipients committed as one batch: every row in place, in order."""
    entered, gate = threading.Event(), threading.Event()

    def hold_the_writer(conn: sqlite3.Connection) -> None:
        entered.set()
        gate.wait(10)

    blocked = asyncio.ensure_future(on_writer(q, hold_the_writer))
    assert await asyncio.to_thread(entered.wait, 10)
    shapes = [1, 2, 3, 150, 64, 65]
    envelopes = [
        make_envelope(rcpts=tuple(f"r{n}-{i}@d{i % 7}.example" for i in range(n)),
                      rcpt_params=tuple(RcptParams(notify=("FAILURE",) if i % 2 else (),
                                                   orcpt=f"rfc822;o{i}@x.example" if i % 3 == 0 else None)
                                        for i in range(n)))
        for n in shapes
    ]
    before = q.counters()["batches"]
    accepts = [asyncio.ensure_future(queue_message(q, f"Subject: {n}\r\n\r\n{n}\r\n".encode(), env))
               for n, env in zip(shapes, envelopes, strict=True)]
    for _ in range(1000):  # until all six wait behind the blocked batch
        if q._committer is not None and q._committer._requests.qsize() == len(shapes):
            break
        await asyncio.sleep(0.01)
    else:
        pytest.fail("the accepts never reached the writer's queue")
    gate.set()
    await blocked
    ids = await asyncio.gather(*accepts)
    assert q.counters()["batches"] - before == 2  # the blocked operation's, then one for all six messages
    for n, env, qid in zip(shapes, envelopes, ids, strict=True):
        stored = await q.get(qid)
        assert stored is not None
        assert [r.idx for r in stored.recipients] == list(range(n))
        assert [r.address for r in stored.recipients] == [str(r.mailbox) for r in env.recipients]
        assert [r.domain for r in stored.recipients] == [f"d{i % 7}.example" for i in range(n)]
        assert [r.notify for r in stored.recipients] == [r.params.notify for r in env.recipients]
        assert [r.orcpt for r in stored.recipients] == [r.params.orcpt for r in env.recipients]
        assert await read_all(q, qid) == f"Subject: {n}\r\n\r\n{n}\r\n".encode()
