"""The spool health state machine, and the SQLite backend reporting into it (faults through the ``spool.fsync`` /
``spool.write`` seams and real SQLite errors). The daemon side (421 4.3.2 at the greeting and at MAIL, with real
I/O errors injected into a running daemon) is ``tests/faults/test_io_faults.py``."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from contract import FakeClock, queue_message, read_all

from mailhop.errors import QueueError, QueueFullError
from mailhop.queue import SqliteQueue, spool
from mailhop.queue.health import SpoolHealth, SpoolState, classify, watch

KB = 1024


def state_of(health: SpoolHealth) -> SpoolState:
    """The state now (a call: mypy narrows ``health.state`` after an assert and would not see it change)."""
    return health.state


def os_error(code: int) -> OSError:
    return OSError(code, os.strerror(code))


def chained(error: QueueError, cause: BaseException) -> QueueError:
    error.__cause__ = cause
    return error


def sqlite_error(code: int) -> sqlite3.Error:
    """An error as SQLite raises it for an I/O failure (which no test can provoke without a faulty disk)."""
    exc = sqlite3.OperationalError("disk I/O error")
    exc.sqlite_errorcode = code
    return exc


def real_sqlite_error(tmp_path: Path, kind: str) -> sqlite3.Error:
    try:
        if kind == "cantopen":
            sqlite3.connect(tmp_path / "missing" / "dir" / "q.db")
        elif kind == "notadb":
            (tmp_path / "junk.db").write_bytes(b"not a database" * 300)
            sqlite3.connect(tmp_path / "junk.db").execute("SELECT 1 FROM sqlite_master")
        elif kind == "readonly":
            sqlite3.connect(tmp_path / "ro.db").execute("CREATE TABLE t (x)").connection.commit()
            ro = sqlite3.connect(f"file:{tmp_path / 'ro.db'}?mode=ro", uri=True)
            ro.execute("INSERT INTO t VALUES (1)")
        elif kind == "constraint":
            conn = sqlite3.connect(":memory:")
            conn.execute("CREATE TABLE t (x PRIMARY KEY)")
            conn.execute("INSERT INTO t VALUES (1)")
            conn.execute("INSERT INTO t VALUES (1)")
    except sqlite3.Error as exc:
        return exc
    raise AssertionError(f"no error for {kind}")


# --- classification -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("exc", "state"), [
    (os_error(errno.EIO), SpoolState.FAILED),
    (os_error(errno.EROFS), SpoolState.FAILED),
    (os_error(errno.EACCES), SpoolState.FAILED),
    (os_error(errno.ENOSPC), SpoolState.FULL),
    (os_error(errno.EDQUOT), SpoolState.FULL),
    (os_error(errno.EMFILE), None),  # the process's limit, not the disk's
    (os_error(errno.ENOMEM), None),
    (chained(QueueError("fsync body X"), os_error(errno.EIO)), SpoolState.FAILED),
    (chained(QueueFullError("write body X"), os_error(errno.ENOSPC)), SpoolState.FULL),
    (QueueError("queue is stopped"), None),
    (ValueError("no recipients"), None),
    (sqlite_error(1034), SpoolState.FAILED),  # SQLITE_IOERR_FSYNC
    (sqlite_error(778), SpoolState.FAILED),  # SQLITE_IOERR_WRITE
    (sqlite_error(13), SpoolState.FULL),  # SQLITE_FULL
    (sqlite_error(5), None),  # SQLITE_BUSY: another writer, not a broken disk
], ids=lambda v: repr(v)[:40] if not isinstance(v, SpoolState) else v.value)
def test_classify(exc: BaseException, state: SpoolState | None) -> None:
    assert classify(exc) is state


@pytest.mark.parametrize(("kind", "state"), [
    ("cantopen", SpoolState.FAILED),
    ("notadb", SpoolState.FAILED),
    ("readonly", SpoolState.FAILED),
    ("constraint", None),
])
def test_classify_real_sqlite_errors(tmp_path: Path, kind: str, state: SpoolState | None) -> None:
    assert classify(real_sqlite_error(tmp_path, kind)) is state


# --- the state machine ---------------------------------------------------------------------------------------


def test_transitions_are_logged_once(caplog: pytest.LogCaptureFixture, clock: FakeClock) -> None:
    caplog.set_level(logging.INFO, logger="mailhop.queue")
    health = SpoolHealth(clock=clock)
    assert health.state is SpoolState.OK and not health.unavailable

    for _ in range(3):  # a burst of failing messages: one log line
        assert health.report(os_error(errno.EIO)) is SpoolState.FAILED
    assert state_of(health) is SpoolState.FAILED and health.unavailable
    assert "Input/output error" in health.detail
    assert health.report(ValueError("not storage")) is None
    assert health.state is SpoolState.FAILED

    clock.advance(7)
    health.report(os_error(errno.ENOSPC))
    assert health.state is SpoolState.FULL and not health.unavailable  # full refuses nothing early

    clock.advance(3)
    health.mark_ok()
    health.mark_ok()
    assert health.state is SpoolState.OK and not health.unavailable and health.detail == ""
    assert health.transitions == 3
    lines = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert [level for level, _ in lines] == [logging.ERROR, logging.WARNING, logging.INFO]
    assert lines[0][1].startswith("spool failed: OSError: [Errno 5]") and "421 4.3.2" in lines[0][1]
    assert lines[1][1].startswith("spool full: OSError: [Errno 28]") and "452 4.3.1" in lines[1][1]
    assert lines[2][1] == "spool recovered (was full for 3.0s)"


def test_concurrent_reports_keep_the_flag_in_step(caplog: pytest.LogCaptureFixture) -> None:
    """Writer thread, worker threads and the loop report at once: ``unavailable`` always matches ``state``."""
    caplog.set_level(logging.INFO, logger="mailhop.queue")
    health = SpoolHealth()
    start = threading.Barrier(4)

    def hammer(fail: bool) -> None:
        start.wait()
        for _ in range(2000):
            if fail:
                health.report(os_error(errno.EIO))
            else:
                health.mark_ok()

    threads = [threading.Thread(target=hammer, args=(i % 2 == 0,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert health.unavailable is (health.state is SpoolState.FAILED)
    assert len(caplog.records) == health.transitions  # one line per change, none lost or doubled


# --- the backend reports -------------------------------------------------------------------------------------


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


def failing(code: int) -> Callable[..., Any]:
    def fail(*args: Any) -> Any:
        raise os_error(code)

    return fail


@pytest.mark.anyio
async def test_body_fsync_eio_fails_the_spool_until_a_probe_succeeds(q: SqliteQueue,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spool, "fsync", failing(errno.EIO))
    with pytest.raises(QueueError):
        await queue_message(q, b"x" * (300 * KB))
    assert q.health.state is SpoolState.FAILED and q.health.unavailable
    with pytest.raises(QueueError):
        await q.probe()  # the disk still fails: the probe says so and changes nothing
    assert q.health.state is SpoolState.FAILED
    assert body_files(q) == []  # neither the message's nor the probe's file is left
    monkeypatch.undo()
    operations = q.counters()["operations"]
    await q.probe()
    assert state_of(q.health) is SpoolState.OK
    assert q.counters()["operations"] == operations + 1  # the probe went through the writer thread
    assert body_files(q) == []
    assert (await q.stats())["messages"] == 0


@pytest.mark.anyio
@pytest.mark.parametrize(("code", "state"), [(errno.EIO, SpoolState.FAILED), (errno.ENOSPC, SpoolState.FULL)])
async def test_body_write_error_is_reported_by_the_writer(q: SqliteQueue, monkeypatch: pytest.MonkeyPatch,
                                                          code: int, state: SpoolState) -> None:
    """The session answers a failed chunk itself and never calls accept: the writer must report it."""
    writer = q.body_writer()
    writer.write(b"a" * (200 * KB))  # now a file
    monkeypatch.setattr(spool, "write", failing(code))
    with pytest.raises(QueueError):
        writer.write(b"more")
    assert q.health.state is state
    writer.abort()
    monkeypatch.undo()
    qid = await queue_message(q, b"fine")  # a committed accept marks the spool ok again
    assert q.health.state is SpoolState.OK
    assert await read_all(q, qid) == b"fine"


@pytest.mark.anyio
async def test_database_full_marks_full_and_a_commit_marks_ok(q: SqliteQueue) -> None:
    pages = await q._write(lambda c: (c.execute("PRAGMA page_count").fetchone()[0], None))
    await q._write(lambda c: (c.execute(f"PRAGMA max_page_count = {pages}").fetchone(), None))
    with pytest.raises(QueueFullError):
        await queue_message(q, b"x" * (100 * KB))
    assert q.health.state is SpoolState.FULL and not q.health.unavailable
    await q._write(lambda c: (c.execute("PRAGMA max_page_count = 1073741823").fetchone(), None))
    await queue_message(q, b"y" * (100 * KB))
    assert state_of(q.health) is SpoolState.OK


@pytest.mark.anyio
async def test_a_failed_batch_that_is_not_a_storage_error_changes_nothing(q: SqliteQueue) -> None:
    await q._write(lambda c: (c.execute(
        "CREATE TEMP TRIGGER fail_insert BEFORE INSERT ON main.messages BEGIN SELECT RAISE(ABORT, 'bug'); END"),
        None))
    with pytest.raises(QueueError):
        await queue_message(q)
    assert q.counters()["failed_batches"] == 1
    assert q.health.state is SpoolState.OK


@pytest.mark.anyio
async def test_a_commit_without_new_mail_does_not_mark_ok(q: SqliteQueue) -> None:
    """A COMMIT that wrote nothing (hold of an unknown id) proves nothing about the disk."""
    q.health.report(os_error(errno.EIO))
    assert await q.hold("1M8NOSUCHMESSAGE") is False
    assert q.health.state is SpoolState.FAILED
    await q.probe()
    assert state_of(q.health) is SpoolState.OK


# --- the watch -------------------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_watch_probes_only_while_not_ok_and_survives_a_broken_probe(
        anyio_backend: str, caplog: pytest.LogCaptureFixture) -> None:
    health = SpoolHealth()
    calls: list[SpoolState] = []
    recovered = asyncio.Event()
    outcomes: list[BaseException | None] = [RuntimeError("bug in the probe"), QueueError("still failing"), None]

    async def probe() -> None:
        calls.append(health.state)
        outcome = outcomes.pop(0) if outcomes else None
        if outcome is not None:
            raise outcome
        health.mark_ok()
        recovered.set()

    task = asyncio.create_task(watch(health, probe, 0.01))
    try:
        await asyncio.sleep(0.05)
        assert calls == []  # ok: no probe
        health.report(os_error(errno.EIO))
        await asyncio.wait_for(recovered.wait(), 10)
        assert calls == [SpoolState.FAILED] * 3  # the RuntimeError did not end the watch
        assert health.state is SpoolState.OK
        await asyncio.sleep(0.05)
        assert len(calls) == 3  # ok again: no more probes
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert any("spool probe: unexpected error" in r.getMessage() for r in caplog.records)
