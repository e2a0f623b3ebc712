"""``SqliteQueue``: the embedded queue backend. One SQLite database (WAL, ``synchronous=FULL``) plus body
files for large messages, in a spool directory::

    <spool>/queue.db        messages, bodies (inline bodies), recipients, schema_version
    <spool>/lock            flock'ed by the daemon (``start(recover=True)``)
    <spool>/bodies/XY/<id>  bodies larger than ``inline_max`` (XY = last two characters of the id)

Writes go through one writer thread (``commit.GroupCommitter``); reads use a small pool of read-only
connections in worker threads (``asyncio.to_thread``), so neither ever blocks the event loop. WAL lets
reads run concurrently with the writer and see only committed transactions. The schema and the row
encoding live in ``rows``; start-up recovery and the spool lock in ``recovery``; the spool's health (ok, full,
failed: what the sessions answer) in ``health``.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar

from ..envelope import Envelope
from ..errors import QueueError
from .backend import AcceptedHook, QueueBackend
from .commit import AcceptRequest, GroupCommitter, OpRequest, queue_error_from_exception
from .faults import crash_point
from .health import HealthReportingWriter, SpoolHealth, probe_body_file
from .ids import is_queue_id, new_queue_id
from .model import QueuedMessage, RcptStatus, RecipientState
from .recovery import lock_holder, take_lock
from .recovery import recover as recover_queue
from .rows import (
    INSERT_BODY,
    INSERT_MESSAGE,
    INSERT_RECIPIENT,
    MESSAGE_COLUMNS,
    RECIPIENT_COLUMNS,
    SCHEMA_VERSION,
    decode_message,
    ensure_schema,
    load_message,
    message_insert_row,
    queued_message,
    recipient_insert_rows,
)
from .segments import DEFAULT_MAX_AGE, DEFAULT_SEGMENT_SIZE, SegmentStore, is_segment_ref
from .spool import DEFAULT_INLINE_MAX, BodyWriter, Spool, fsync_dir

__all__ = ["DEFAULT_PAGE_SIZE", "PAGE_SIZES", "SCHEMA_VERSION", "SqliteQueue"]

T = TypeVar("T")

# SQLite page size of a new spool's database. Every page a commit touches is written whole to the WAL and again
# by the checkpoint, one system call per page each: a 100 KB body is 25 pages at SQLite's default 4 KiB and 4 at
# 32 KiB (accept 100 KB +24 %, relay 100 KB +60 % here), at the price of more bytes per small update (relay of
# 5 KB messages -10 %). bench/RESULTS.md has the figures.
DEFAULT_PAGE_SIZE = 32768
# Seconds between the writer's passes over old body segments (segments.SegmentStore.reclaim).
RECLAIM_INTERVAL = 30.0
PAGE_SIZES = (4096, 8192, 16384, 32768, 65536)
log = logging.getLogger("mailhop.queue")


def _map_read_error(exc: sqlite3.Error) -> QueueError:
    return queue_error_from_exception(exc)()


class SqliteQueue:
    """The SQLite queue backend (see ``backend.QueueBackend`` for the contract)."""

    def __init__(self, path: str | Path, *, inline_max: int = DEFAULT_INLINE_MAX,
                 clock: Callable[[], float] = time.time, busy_timeout: float = 10.0,
                 page_size: int = DEFAULT_PAGE_SIZE, segment_min: int = 0,
                 segment_size: int = DEFAULT_SEGMENT_SIZE, segment_max_age: float = DEFAULT_MAX_AGE,
                 reclaim_interval: float = RECLAIM_INTERVAL) -> None:
        if page_size not in PAGE_SIZES:
            raise ValueError(f"page_size must be one of {', '.join(map(str, PAGE_SIZES))}, not {page_size}")
        self.spool = Spool(path)
        self.db_path = self.spool.root / "queue.db"
        self.inline_max = inline_max
        # Bodies kept in memory (at most inline_max) of at least this many bytes go to a segment (0: none do).
        self.segment_min = segment_min
        # Always there: a spool written with segments stays readable whatever segment_min is now.
        self.segments = SegmentStore(self.spool.root, segment_size=segment_size, max_age=segment_max_age,
                                     clock=clock)
        self._reclaim_interval = reclaim_interval
        self._reclaimer: asyncio.Task[None] | None = None
        self.page_size = page_size  # for a database this creates; an existing one keeps its own
        self._clock = clock
        self._busy_timeout = busy_timeout
        self._state = "new"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._committer: GroupCommitter | None = None
        self._lock_fd = -1
        self._readers: list[sqlite3.Connection] = []  # idle read connections
        self._readers_lock = threading.Lock()
        self._body_fsyncs = 0
        self.health = SpoolHealth()  # every storage error of the write path and every commit reports here
        # Called on the event loop after each accepted message's commit (see QueueBackend.on_accepted).
        self.on_accepted: AcceptedHook | None = None

    # --- lifecycle -------------------------------------------------------------------------------------

    async def start(self, *, recover: bool = True) -> None:
        if self._state != "new":
            raise QueueError(f"queue already {self._state}")
        self._state = "starting"
        self._loop = asyncio.get_running_loop()
        try:
            self._committer = await asyncio.to_thread(self._open, recover)
        except BaseException:
            self._state = "stopped"
            raise
        self._committer.start()
        self._state = "started"
        if recover:  # the daemon (the CLI opens the queue without recovery): it owns the segments' upkeep
            self._reclaimer = asyncio.create_task(self._reclaim_segments())

    def _open(self, recover: bool) -> GroupCommitter:
        try:
            self.spool.ensure_layout()
        except OSError as exc:
            raise QueueError(f"cannot create spool {self.spool.root}: {exc}") from exc
        if recover:
            self._lock_fd = take_lock(self.spool.root)
        conn: sqlite3.Connection | None = None
        try:
            created = not self.db_path.exists()
            conn = self._connect_writer()
            ensure_schema(conn)
            if created:
                fsync_dir(self.spool.root)
            if recover:
                recover_queue(conn, self.spool, self.segments)
            # Never reuse a segment name a row still names (a quarantined row keeps a missing segment's name).
            self.segments.note_used(max((int(name) for name in self.segments.used_names(conn)), default=0))
            return GroupCommitter(self._connect_writer, conn, (INSERT_MESSAGE, INSERT_BODY, INSERT_RECIPIENT),
                                  self.health, self.segments)
        except BaseException as exc:
            if conn is not None:
                conn.close()
            self._release_lock()
            if isinstance(exc, sqlite3.Error | OSError):
                raise QueueError(f"cannot open queue {self.db_path}: {exc}") from exc
            raise

    def daemon_pid(self) -> int | None:
        """The pid of the daemon running on this spool (it holds the lock), or None when none runs."""
        return lock_holder(self.spool.root)

    def _release_lock(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = -1

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.db_path, timeout=self._busy_timeout, isolation_level=None,
                               check_same_thread=False)

    def _connect_writer(self) -> sqlite3.Connection:
        conn = self._connect()
        try:
            # Takes effect only while the database is empty (before the schema and WAL mode): new spools only.
            conn.execute(f"PRAGMA page_size={self.page_size}")
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise QueueError(f"{self.db_path}: cannot use WAL mode (got {mode})")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=OFF")
        except BaseException:
            conn.close()
            raise
        return conn

    def _connect_reader(self) -> sqlite3.Connection:
        conn = self._connect()
        conn.execute("PRAGMA query_only=ON")
        return conn

    async def stop(self) -> None:
        if self._state not in ("started",):
            return
        self._state = "stopping"
        if self._reclaimer is not None:
            self._reclaimer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):  # stopping must not fail on it
                await self._reclaimer
            self._reclaimer = None
        committer = self._committer
        assert committer is not None
        try:
            await asyncio.to_thread(committer.stop)
        finally:
            with self._readers_lock:
                readers, self._readers = self._readers, []
            for conn in readers:
                conn.close()
            self._release_lock()
            self._state = "stopped"

    def _require_started(self) -> GroupCommitter:
        if self._state != "started" or self._committer is None:
            raise QueueError(f"queue is {self._state}")
        return self._committer

    # --- accept ----------------------------------------------------------------------------------------

    def body_writer(self) -> BodyWriter:
        self._require_started()
        return HealthReportingWriter(self.spool, new_queue_id(), self.inline_max, health=self.health)

    async def accept(self, envelope: Envelope, body: BodyWriter) -> str:
        committer = self._require_started()
        if not envelope.recipients:
            body.abort()
            raise ValueError("an envelope without recipients cannot be queued")
        inline, rel_path = body.seal()
        crash_point("after_body_write")
        if rel_path is not None:
            await self._sync_body(body)
        qid = body.queue_id
        now = self._clock()
        message_row = message_insert_row(qid, envelope, now, body.size, rel_path)
        recipient_rows = recipient_insert_rows(qid, envelope, now)
        assert self._loop is not None
        future: asyncio.Future[str] = self._loop.create_future()
        to_segment = inline is not None and 0 < self.segment_min <= len(inline)
        try:
            committer.submit(AcceptRequest(future, qid, message_row,
                                           None if inline is None or to_segment else (qid, inline),
                                           recipient_rows, body, segment_body=inline if to_segment else None))
        except QueueError:
            body.discard_sealed()
            raise
        queue_id = await future
        hook = self.on_accepted
        if hook is not None:
            try:
                hook(queued_message(qid, envelope, now, body.size), None if inline is None else bytes(inline),
                     body.canonical)
            except Exception:  # the message is committed: the delivery engine's queue scan finds it
                log.exception("on_accepted hook failed for %s", queue_id)
        return queue_id

    async def _sync_body(self, body: BodyWriter) -> None:
        """fsync a body file and its directory in a worker thread, so a large fsync delays no other message."""
        task = asyncio.ensure_future(asyncio.to_thread(body.sync))
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            def cleanup(t: asyncio.Future[None]) -> None:
                error = None if t.cancelled() else t.exception()  # retrieved: the caller is gone, the file goes
                if error is not None:
                    self.health.report(error)
                body.discard_sealed()

            task.add_done_callback(cleanup)
            raise
        except QueueError as exc:
            self.health.report(exc)
            raise
        self._body_fsyncs += 2

    async def probe(self) -> None:
        """Write durably the way an accept does, to find out whether the spool works again (``health.watch``).

        A throw-away body file is created in a bucket, written, fsynced with its directory and removed (a crash
        in between leaves an orphan, which start-up recovery removes); then a transaction that inserts and
        deletes a row goes through the writer thread: an unchanged row would not reach the WAL, so no fsync.
        Failures are reported to ``health`` and raised (QueueError); success marks it ok."""
        self._require_started()
        try:
            await asyncio.to_thread(probe_body_file, self.spool, new_queue_id())
        except QueueError as exc:
            self.health.report(exc)
            raise

        def touch(conn: sqlite3.Connection) -> tuple[None, None]:
            conn.execute("INSERT INTO schema_version (version) VALUES (-1)")
            conn.execute("DELETE FROM schema_version WHERE version = -1")
            return None, None

        await self._write(touch)
        self.health.mark_ok()

    # --- writes through the committer -------------------------------------------------------------------

    async def _write(self, operation: Callable[[sqlite3.Connection], tuple[T, Callable[[], None] | None]], *,
                     lazy_sync: bool = False) -> T:
        committer = self._require_started()
        assert self._loop is not None
        future: asyncio.Future[T] = self._loop.create_future()
        committer.submit(OpRequest(future, operation, lazy_sync))
        return await future

    async def _reclaim_segments(self) -> None:
        """Every reclaim_interval: free unused body segments, move old ones' bodies into the database."""
        while True:
            await asyncio.sleep(self._reclaim_interval)
            try:
                moved = await self.reclaim_segments()
            except Exception as exc:  # the upkeep must outlive any one failure (it frees disk space)
                log.warning("queue: body segment upkeep failed (next try in %.0f s): %s: %s",
                            self._reclaim_interval, type(exc).__name__, exc)
                continue
            if moved:
                log.info("queue: moved %d bodies of old segments into the database", moved)

    async def reclaim_segments(self) -> int:
        """One pass of segment upkeep through the writer (segments.SegmentStore.reclaim); bodies moved."""
        return await self._write(self.segments.reclaim)

    async def delete(self, queue_id: str) -> bool:
        def op(conn: sqlite3.Connection) -> tuple[bool, Callable[[], None] | None]:
            row = conn.execute("SELECT body_path FROM messages WHERE id = ?", (queue_id,)).fetchone()
            if row is None:
                return False, None
            conn.execute("DELETE FROM recipients WHERE msg_id = ?", (queue_id,))
            conn.execute("DELETE FROM bodies WHERE id = ?", (queue_id,))
            conn.execute("DELETE FROM messages WHERE id = ?", (queue_id,))
            return True, self._body_removal(row[0], queue_id)

        return await self._write(op)

    def _body_removal(self, body_path: str | None, queue_id: str) -> Callable[[], None] | None:
        """What removes a deleted message's body file once the deletion is committed (None: nothing to remove).
        The file goes only after the commit: a crash in between leaves an orphan, never a row without its
        body. The path is derived from the id, never taken from the row. A segment's space is freed with the
        segment (segments.py, "Space"); a body in the database went with the row."""
        if body_path is None or is_segment_ref(body_path) or not is_queue_id(queue_id):
            return None
        path = self.spool.body_path(queue_id)
        return lambda: Spool.remove(path)

    async def hold(self, queue_id: str, reason: str = "admin") -> bool:
        def op(conn: sqlite3.Connection) -> tuple[bool, None]:
            cur = conn.execute(
                "UPDATE messages SET hold_reason = CASE WHEN held = 1 THEN hold_reason ELSE ? END, held = 1"
                " WHERE id = ?", (reason, queue_id))
            return cur.rowcount > 0, None

        return await self._write(op)

    async def release(self, queue_id: str) -> bool:
        def op(conn: sqlite3.Connection) -> tuple[bool, None]:
            cur = conn.execute("UPDATE messages SET held = 0, hold_reason = '' WHERE id = ? AND held = 1",
                               (queue_id,))
            return cur.rowcount > 0, None

        return await self._write(op)

    async def flush(self) -> int:
        now = self._clock()

        def op(conn: sqlite3.Connection) -> tuple[int, None]:
            cur = conn.execute(
                "UPDATE recipients SET next_attempt = min(next_attempt, ?), updated = ? WHERE status = ?",
                (now, now, RcptStatus.DEFERRED.value))
            return cur.rowcount, None

        return await self._write(op)

    async def update_recipients(self, queue_id: str, recipients: Iterable[RecipientState]) -> int:
        rows = [(r.status.value, r.attempts, r.last_reply, r.next_attempt, r.updated, queue_id, r.idx)
                for r in recipients]

        def op(conn: sqlite3.Connection) -> tuple[int, None]:
            changed = 0
            for row in rows:
                changed += conn.execute(
                    "UPDATE recipients SET status = ?, attempts = ?, last_reply = ?, next_attempt = ?,"
                    " updated = ? WHERE msg_id = ? AND idx = ? AND status NOT IN ('delivered', 'failed')", row
                ).rowcount
            return changed, None

        return await self._write(op)

    async def record(self, queue_id: str, updates: Iterable[RecipientState], *,
                     notices: Sequence[tuple[Envelope, bytes]] = (), warned: bool = False) -> bool:
        now = self._clock()
        rows = [(r.status.value, r.attempts, r.last_reply, r.next_attempt, r.updated, queue_id, r.idx)
                for r in updates]
        notice_rows = []
        for env, data in notices:
            nid = new_queue_id()
            notice_rows.append((message_insert_row(nid, env, now, len(data), None), (nid, data),
                                recipient_insert_rows(nid, env, now)))

        def op(conn: sqlite3.Connection) -> tuple[bool, Callable[[], None] | None]:
            exists = conn.execute("SELECT body_path FROM messages WHERE id = ?", (queue_id,)).fetchone()
            if exists is None:
                return False, None  # deleted by an operator meanwhile: nothing to record, no notices
            conn.executemany(
                "UPDATE recipients SET status = ?, attempts = ?, last_reply = ?, next_attempt = ?, updated = ?"
                " WHERE msg_id = ? AND idx = ? AND status NOT IN ('delivered', 'failed')", rows)
            if warned:
                conn.execute("UPDATE messages SET warned = 1 WHERE id = ?", (queue_id,))
            for message_row, body_row, recipient_rows in notice_rows:
                conn.execute(INSERT_MESSAGE, message_row)
                conn.execute(INSERT_BODY, body_row)
                conn.executemany(INSERT_RECIPIENT, recipient_rows)
            crash_point("during_record")
            open_rcpts = conn.execute(
                "SELECT count(*) FROM recipients WHERE msg_id = ? AND status IN ('pending', 'deferred')",
                (queue_id,)).fetchone()[0]
            if open_rcpts:
                return False, None
            conn.execute("DELETE FROM recipients WHERE msg_id = ?", (queue_id,))
            conn.execute("DELETE FROM bodies WHERE id = ?", (queue_id,))
            conn.execute("DELETE FROM messages WHERE id = ?", (queue_id,))
            return True, self._body_removal(exists[0], queue_id)

        # An outcome lost in a power cut only repeats the attempt: synced lazily (commit.py, "Lazy sync").
        return await self._write(op, lazy_sync=True)

    async def due(self, *, limit: int = 100, exclude: Collection[str] = ()) -> list[QueuedMessage]:
        now = self._clock()
        want = limit + len(exclude)

        def read(conn: sqlite3.Connection) -> list[QueuedMessage]:
            # One ordered index walk per status (recipients_due), each stopping after `want` rows: cheap even
            # with a million deferred recipients, unlike one IN (...) query that must sort every match.
            found: list[tuple[float, str]] = []
            for status in ("pending", "deferred"):
                found += conn.execute(
                    "SELECT r.next_attempt, r.msg_id FROM recipients r JOIN messages m ON m.id = r.msg_id"
                    " WHERE r.status = ? AND r.next_attempt <= ? AND m.held = 0"
                    " ORDER BY r.next_attempt LIMIT ?", (status, now, want * 4)).fetchall()
            found.sort()
            ids: list[str] = []
            for _, qid in found:
                if qid not in exclude and qid not in ids:
                    ids.append(qid)
                    if len(ids) >= limit:
                        break
            return self._load(conn, ids)

        return await self._read(read)

    async def next_due(self) -> float | None:
        def read(conn: sqlite3.Connection) -> float | None:
            times = [
                row[0]
                for status in ("pending", "deferred")
                for row in conn.execute(
                    "SELECT r.next_attempt FROM recipients r JOIN messages m ON m.id = r.msg_id"
                    " WHERE r.status = ? AND m.held = 0 ORDER BY r.next_attempt LIMIT 1", (status,))
            ]
            return min(times) if times else None

        return await self._read(read)

    @staticmethod
    def _load(conn: sqlite3.Connection, ids: Sequence[str]) -> list[QueuedMessage]:
        out = []
        for qid in ids:
            loaded = load_message(conn, qid)
            if loaded is not None and not loaded[1]:
                out.append(loaded[0])
        return out

    # --- reads -----------------------------------------------------------------------------------------

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        self._require_started()
        return await asyncio.to_thread(self._run_read, fn)

    def _run_read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        with self._readers_lock:
            conn = self._readers.pop() if self._readers else None
        reusable = False
        try:
            if conn is None:
                conn = self._connect_reader()
            conn.execute("BEGIN")  # one snapshot for all the statements of this read
            try:
                return fn(conn)
            finally:
                conn.execute("COMMIT")
                reusable = True
        except sqlite3.Error as exc:
            reusable = False
            raise _map_read_error(exc) from exc
        finally:
            if conn is not None:
                with self._readers_lock:
                    if reusable and self._state == "started":
                        self._readers.append(conn)
                        conn = None
                if conn is not None:
                    conn.close()

    async def get(self, queue_id: str) -> QueuedMessage | None:
        def read(conn: sqlite3.Connection) -> QueuedMessage | None:
            loaded = load_message(conn, queue_id)
            return None if loaded is None else loaded[0]

        return await self._read(read)

    async def list(self, *, domain: str | None = None, status: RcptStatus | None = None,
                   held: bool | None = None, limit: int | None = None) -> list[QueuedMessage]:
        where: list[str] = []
        args: list[Any] = []
        if held is not None:
            where.append("m.held = 1" if held else "m.held = 0")
        if domain is not None or status is not None:
            sub = []
            if domain is not None:
                sub.append("r.domain = ?")
                args.append(domain.lower())
            if status is not None:
                sub.append("r.status = ?")
                args.append(RcptStatus(status).value)
            # driven by the recipients_domain / recipients_due index, not a scan of every message
            where.append(f"m.id IN (SELECT r.msg_id FROM recipients r WHERE {' AND '.join(sub)})")
        selection = f"FROM messages m {'WHERE ' + ' AND '.join(where) if where else ''} ORDER BY m.id LIMIT ?"
        args.append(-1 if limit is None else max(limit, 0))

        def read(conn: sqlite3.Connection) -> list[QueuedMessage]:
            rows = conn.execute(f"SELECT {MESSAGE_COLUMNS} {selection}", args).fetchall()
            if not rows:
                return []
            by_id: dict[str, list[tuple[Any, ...]]] = {row[0]: [] for row in rows}
            for r in conn.execute(
                f"SELECT {RECIPIENT_COLUMNS} FROM recipients r WHERE r.msg_id IN (SELECT m.id {selection})"
                " ORDER BY r.msg_id, r.idx", args
            ):
                by_id[r[0]].append(r)
            return [decode_message(row, by_id[row[0]])[0] for row in rows]

        return await self._read(read)

    async def open_body(self, queue_id: str) -> BinaryIO:
        def read(conn: sqlite3.Connection) -> BinaryIO:
            row = conn.execute("SELECT body_path FROM messages WHERE id = ?", (queue_id,)).fetchone()
            if row is None:
                raise KeyError(queue_id)
            if row[0] is None:
                body = conn.execute("SELECT data FROM bodies WHERE id = ?", (queue_id,)).fetchone()
                if body is None:
                    raise QueueError(f"message {queue_id}: inline body missing")
                return io.BytesIO(body[0])
            if is_segment_ref(row[0]):
                return io.BytesIO(self.segments.read(row[0]))
            if not is_queue_id(queue_id):
                raise QueueError(f"message {queue_id}: invalid id for a body file")
            try:
                return open(self.spool.body_path(queue_id), "rb")  # the caller closes it
            except OSError as exc:
                raise QueueError(f"message {queue_id}: cannot open body file: {exc}") from exc

        return await self._read(read)

    async def stats(self) -> dict[str, int]:
        def read(conn: sqlite3.Connection) -> dict[str, int]:
            total, held = conn.execute("SELECT count(*), coalesce(sum(held), 0) FROM messages").fetchone()
            out = {"messages": total, "held": held}
            out.update({s.value: 0 for s in RcptStatus})
            for status, count in conn.execute("SELECT status, count(*) FROM recipients GROUP BY status"):
                out[str(status)] = count
            return out

        return await self._read(read)

    def counters(self) -> dict[str, int]:
        c = self._committer
        return {
            "batches": c.batches if c else 0,
            "failed_batches": c.failed_batches if c else 0,
            "accepted": c.accepted if c else 0,
            "operations": c.operations if c else 0,
            "body_fsyncs": self._body_fsyncs,
        }


if TYPE_CHECKING:
    _backend_check: QueueBackend = SqliteQueue("")  # SqliteQueue implements the protocol
