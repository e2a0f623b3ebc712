"""Group commit: one writer thread owns the SQLite write connection and commits waiting work in batches.

Requests arrive on a ``queue.SimpleQueue``. The thread blocks for the first one, then drains every other
request already waiting (it never sleeps to gather more), and handles them all in one transaction::

    append the batch's segment bodies to the current segment; fdatasync it    -- only when segments are on
    BEGIN IMMEDIATE
    executemany(INSERT messages) ; executemany(INSERT bodies) ; executemany(INSERT recipients)
    each admin operation, inside its own SAVEPOINT
    COMMIT            -- synchronous=FULL in WAL mode: one fsync of the WAL covers the whole batch

and only then resolves the batch's futures, all with one ``loop.call_soon_threadsafe``. A request that
arrives while a batch is being committed is not in that batch's transaction, so it waits for the next
commit: no caller is answered by an fsync that did not cover its rows.

Body files are fsynced (file, then directory) before their accept request is queued (``accept`` does it
in a worker thread, see ``sqlite.py``), so by the time a row that points to a file is inserted, the file is
durable; the COMMIT is the marker that makes the message exist.

Lazy sync: a batch of nothing but delivery records (``OpRequest.lazy_sync``) commits with
``synchronous=NORMAL``: written to the WAL (so no process crash can lose it) but not fsynced. The WAL is written
in order, so the next synchronous commit's fsync (any accept) covers it too; when none comes within
``LAZY_SYNC_DELAY`` the thread syncs on its own (a one-page write committed with ``synchronous=FULL``), and
it syncs at once when an operation asks to remove a body file after its commit, and when it stops. Only a power
cut inside that window can undo such a record, and an undone record only makes its delivery attempt run again
(a duplicate, never a loss): the accepted mail itself is always committed synchronously. Postfix, for
comparison, never syncs the removal of a delivered queue file.

Lazy hold: while mail is coming in (an accept committed in the last ``HOLD_WHILE_ACCEPTING`` seconds), a batch of
only delivery records waits up to ``LAZY_HOLD`` for a request to share its transaction with, normally the next
accept. SQLite writes every page a transaction touches as a whole WAL frame, and a message's insert and a
delivered message's delete touch the same few leaf pages (messages, bodies, recipients and its two indexes), so
one shared commit writes about half the bytes of two; with one client sending one message at a time every commit
is otherwise a batch of one. The hold delays only the record's caller (the delivery engine); without incoming
mail nothing would come to share with, so records commit at once.

Failure: if any statement of the batch's transaction or the COMMIT fails, the transaction is rolled back,
every waiter of the batch gets the error (SQLITE_FULL/ENOSPC -> QueueFullError, anything else ->
QueueError), the body files of the batch's accepts are removed, and the thread goes on with the next batch
(space may come back). An admin operation that raises is rolled back to its savepoint and only its caller
gets the error. The thread never dies of an exception. Each batch's outcome goes to the spool's health
(``health.SpoolHealth``): a storage error marks it full or failed, a COMMIT of accepted mail marks it ok.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import QueueError, QueueFullError
from .faults import crash_point
from .health import SpoolHealth
from .rows import BODY_PATH_PARAM
from .segments import SegmentStore
from .spool import BodyWriter, queue_error_from_os

__all__ = ["AcceptRequest", "GroupCommitter", "OpRequest", "queue_error_from_exception"]

log = logging.getLogger("mailhop.queue")

SQLITE_FULL = 13
# A lazily synced commit reaches stable storage with the next synchronous commit, or this many seconds later.
LAZY_SYNC_DELAY = 0.1
# After a failed sync (the disk is failing: health already says so), try again this much later, not every 0.1 s.
_SYNC_RETRY_DELAY = 5.0
# A batch of only delivery records waits this long for company while an accept came this recently ("Lazy hold").
LAZY_HOLD = 0.002
HOLD_WHILE_ACCEPTING = 0.05
# ... and no longer once it holds this many.
_MAX_HELD = 256

# An admin operation runs in the writer thread inside the batch's transaction. It returns its result and
# an optional callback to run after the COMMIT succeeded (e.g. unlink the body file of a deleted message).
Operation = Callable[[sqlite3.Connection], "tuple[Any, Callable[[], None] | None]"]


@dataclass(slots=True)
class AcceptRequest:
    future: asyncio.Future[str]
    queue_id: str
    message_row: tuple[Any, ...]
    body_row: tuple[str, Any] | None  # (id, inline body) or None when the body is a file
    recipient_rows: list[tuple[Any, ...]]
    body: BodyWriter
    # A body for a segment (segments.py): appended and synced by the writer, which puts its reference in the row.
    segment_body: bytes | bytearray | None = None


@dataclass(slots=True)
class OpRequest:
    future: asyncio.Future[Any]
    operation: Operation
    # Committed without its own fsync (see "Lazy sync" in the module docstring): only for writes whose loss in a
    # power cut is harmless to repeat, i.e. delivery outcomes.
    lazy_sync: bool = False


def queue_error_from_exception(exc: BaseException) -> Callable[[], QueueError]:
    """A factory of the error each waiter gets (one instance per waiter, so tracebacks don't pile up)."""
    if isinstance(exc, QueueError):
        cls, detail = type(exc), exc.detail
    elif isinstance(exc, OSError):
        err = queue_error_from_os(exc, "queue write")
        cls, detail = type(err), err.detail
    elif isinstance(exc, sqlite3.Error) and (getattr(exc, "sqlite_errorcode", 0) & 0xFF) == SQLITE_FULL:
        cls, detail = QueueFullError, f"queue database full: {exc}"
    else:
        cls, detail = QueueError, f"queue write failed: {type(exc).__name__}: {exc}"
    return lambda: cls(detail)


def _only_lazy(batch: Sequence[AcceptRequest | OpRequest]) -> bool:
    return all(isinstance(r, OpRequest) and r.lazy_sync for r in batch)


def _settle(results: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
    for future, value, error in results:
        if future.done():  # the caller was cancelled; the work is done (or undone) regardless
            continue
        if error is None:
            future.set_result(value)
        else:
            future.set_exception(error)


class GroupCommitter:
    """The single writer. ``submit`` from any thread; ``start``/``stop`` from the owner."""

    def __init__(self, connect: Callable[[], sqlite3.Connection], conn: sqlite3.Connection,
                 insert_sql: tuple[str, str, str], health: SpoolHealth | None = None,
                 segments: SegmentStore | None = None) -> None:
        self._connect = connect
        self._segments = segments
        self._health = health if health is not None else SpoolHealth()
        self._conn = conn
        self._insert_message, self._insert_body, self._insert_recipient = insert_sql
        self._requests: queue.SimpleQueue[AcceptRequest | OpRequest | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="mailhop-queue-writer", daemon=True)
        self._closed = False
        self._synchronous_full = True  # the connection's current PRAGMA synchronous: FULL, or NORMAL
        self._unsynced = False  # a lazily synced commit is not yet covered by an fsync
        self._sync_delay = LAZY_SYNC_DELAY
        self._hold = LAZY_HOLD
        self._hold_window = HOLD_WHILE_ACCEPTING
        self._last_accept = float("-inf")  # time.monotonic() of the last committed accept
        # Counters for tests and metrics (written by the writer thread only).
        self.batches = 0  # committed transactions
        self.failed_batches = 0
        self.accepted = 0  # messages committed
        self.operations = 0  # admin operations committed
        self.lazy_commits = 0  # transactions committed without their own fsync
        self.lazy_syncs = 0  # syncs the thread made on its own for them
        self.held_batches = 0  # lazy batches that waited for company (see "Lazy hold")

    def start(self) -> None:
        self._thread.start()

    def submit(self, request: AcceptRequest | OpRequest) -> None:
        if self._closed:
            raise QueueError("queue is stopped")
        self._requests.put(request)

    def stop(self) -> None:
        """Blocking: finish every request submitted so far, stop the thread, close the connection."""
        if not self._closed:
            self._closed = True
            self._requests.put(None)
        if self._thread.is_alive():
            self._thread.join()
        if self._segments is not None:
            self._segments.close()
        self._conn.close()

    # --- writer thread ---------------------------------------------------------------------------------

    def _run(self) -> None:
        requests = self._requests
        stopping = False
        while not stopping:
            if self._unsynced:
                try:
                    first = requests.get(timeout=self._sync_delay)
                except queue.Empty:
                    self._sync()
                    continue
            else:
                first = requests.get()
            if first is None:
                break
            batch: list[AcceptRequest | OpRequest] = [first]
            stopping = self._drain(batch)
            if not stopping and self._hold > 0 and _only_lazy(batch) \
                    and time.monotonic() - self._last_accept < self._hold_window:
                stopping = self._gather(batch)
            try:
                self._process(batch)
            except BaseException:  # never let the writer die: every later accept would hang
                log.exception("queue writer: unexpected error")
        if self._unsynced:
            self._sync()
        # Anything submitted after the stop marker (a race with stop()) is answered, not left hanging.
        leftover: list[AcceptRequest | OpRequest] = []
        while True:
            try:
                item = requests.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                leftover.append(item)
        if leftover:
            self._resolve([(r.future, None, QueueError("queue is stopped")) for r in leftover])

    def _gather(self, batch: list[AcceptRequest | OpRequest]) -> bool:
        """Hold a lazy-only batch for up to LAZY_HOLD until another kind of request joins it; True when the
        stop marker came meanwhile."""
        self.held_batches += 1
        requests = self._requests
        deadline = time.monotonic() + self._hold
        while len(batch) < _MAX_HELD:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                item = requests.get(timeout=remaining)
            except queue.Empty:
                break
            if item is None:
                return True
            batch.append(item)
            if not (isinstance(item, OpRequest) and item.lazy_sync):
                return self._drain(batch)  # company came: take whatever else is already waiting, and go
        return False

    def _drain(self, batch: list[AcceptRequest | OpRequest]) -> bool:
        """Add every request already waiting to the batch, without waiting; True when the stop marker came."""
        while True:
            try:
                item = self._requests.get_nowait()
            except queue.Empty:
                return False
            if item is None:
                return True
            batch.append(item)

    def _process(self, batch: Sequence[AcceptRequest | OpRequest]) -> None:
        accepts = [r for r in batch if isinstance(r, AcceptRequest)]
        ops = [r for r in batch if isinstance(r, OpRequest)]
        conn = self._conn
        op_outcomes: list[tuple[OpRequest, Any, Callable[[], None] | None, BaseException | None]] = []
        lazy = not accepts and all(op.lazy_sync for op in ops)
        try:
            self._set_synchronous(full=not lazy)
            changes_before = conn.total_changes
            message_rows = [a.message_row for a in accepts]
            to_segment = [(i, a.segment_body) for i, a in enumerate(accepts) if a.segment_body is not None]
            if to_segment:
                # Synced before the COMMIT that makes any row name them (segments.py, "Durability").
                assert self._segments is not None
                refs = self._segments.append([body for _, body in to_segment])
                for (i, _), ref in zip(to_segment, refs, strict=True):
                    row = message_rows[i]
                    message_rows[i] = (*row[:BODY_PATH_PARAM], ref, *row[BODY_PATH_PARAM + 1:])
            conn.execute("BEGIN IMMEDIATE")
            if accepts:
                conn.executemany(self._insert_message, message_rows)
                bodies = [a.body_row for a in accepts if a.body_row is not None]
                if bodies:
                    conn.executemany(self._insert_body, bodies)
                conn.executemany(self._insert_recipient,
                                 itertools.chain.from_iterable(a.recipient_rows for a in accepts))
            for op in ops:
                op_outcomes.append(self._run_operation(conn, op))
            crash_point("after_body_fsync")
            conn.execute("COMMIT")
        except Exception as exc:
            self.failed_batches += 1
            self._health.report(exc)
            make_error = queue_error_from_exception(exc)
            log.error("queue writer: batch of %d failed: %s", len(batch), exc)
            try:
                self._rollback()
            finally:  # even if the database cannot be reopened, nobody may be left waiting
                for a in accepts:
                    a.body.discard_sealed()
                self._resolve([(r.future, None, make_error()) for r in batch])
            return
        crash_point("after_commit")
        if accepts:
            # New rows always reach the WAL and its fsync. An operation-only batch may have changed nothing
            # (a hold of an unknown id), and a COMMIT that wrote nothing proves nothing about the disk.
            self._health.mark_ok()
            self._last_accept = time.monotonic()
        self.batches += 1
        self.accepted += len(accepts)
        wrote = conn.total_changes != changes_before
        if lazy:
            self.lazy_commits += 1
            self._unsynced = True
        elif wrote:
            self._unsynced = False  # this commit's fsync covered every earlier WAL frame as well
        # (A COMMIT that changed nothing wrote and synced nothing: earlier lazy commits are still unsynced.)
        if self._unsynced and any(after is not None for _, _, after, error in op_outcomes if error is None):
            self._sync()  # a body file or segment goes only once the row that named it is gone for good
        results: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = [
            (a.future, a.queue_id, None) for a in accepts
        ]
        for op, value, after, error in op_outcomes:
            if error is None:
                self.operations += 1
                if after is not None and self._unsynced:
                    # The sync above failed: the row's removal may not survive a power cut, so its body stays
                    # (an orphan the next start removes, or a segment the next reclaim frees).
                    log.error("queue writer: a body is kept: the removal of its message is not yet durable")
                elif after is not None:
                    try:
                        after()
                    except Exception:
                        log.exception("queue writer: post-commit action failed")
            results.append((op.future, value, error))
        self._resolve(results)

    def _set_synchronous(self, *, full: bool) -> None:
        # SQLite refuses to change it inside a transaction: set before BEGIN, only when it changes.
        if full != self._synchronous_full:
            self._conn.execute("PRAGMA synchronous=FULL" if full else "PRAGMA synchronous=NORMAL")
            self._synchronous_full = full

    def _sync(self) -> None:
        """Make every lazily synced commit durable: a one-page commit with synchronous=FULL fsyncs the WAL."""
        try:
            self._set_synchronous(full=True)
            # A COMMIT that changes nothing writes and syncs nothing; the header's user_version (unused by the
            # queue) is a change of one page.
            self._conn.execute(f"PRAGMA user_version = {(self.lazy_syncs + 1) % (1 << 31)}")
        except sqlite3.Error as exc:
            self._health.report(exc)
            log.error("queue writer: sync failed (retrying in %.0f s): %s", _SYNC_RETRY_DELAY, exc)
            self._sync_delay = _SYNC_RETRY_DELAY
            return
        self.lazy_syncs += 1
        self._unsynced = False
        self._sync_delay = LAZY_SYNC_DELAY

    @staticmethod
    def _run_operation(
        conn: sqlite3.Connection, op: OpRequest
    ) -> tuple[OpRequest, Any, Callable[[], None] | None, BaseException | None]:
        conn.execute("SAVEPOINT op")
        try:
            value, after = op.operation(conn)
        except Exception as exc:
            # If SQLite already rolled the whole transaction back this raises, and the batch fails.
            conn.execute("ROLLBACK TO op")
            conn.execute("RELEASE op")
            error: BaseException = exc if not isinstance(exc, sqlite3.Error) else queue_error_from_exception(exc)()
            return op, None, None, error
        conn.execute("RELEASE op")
        return op, value, after, None

    def _rollback(self) -> None:
        try:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
        except sqlite3.Error:
            log.exception("queue writer: rollback failed; reopening the database")
            try:
                self._conn.close()
                self._conn = self._connect()
                self._synchronous_full = True  # as every new writer connection starts
            except Exception as exc:
                # Keep the closed connection: the next batch fails on it and comes back here to try again.
                self._health.report(exc)
                log.error("queue writer: cannot reopen the database: %s", exc)

    @staticmethod
    def _resolve(results: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
        """Hand every result to its loop: one call_soon_threadsafe per loop (normally exactly one)."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], Any, BaseException | None]]] = {}
        for item in results:
            by_loop.setdefault(item[0].get_loop(), []).append(item)
        for loop, items in by_loop.items():
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
                loop.call_soon_threadsafe(_settle, items)
