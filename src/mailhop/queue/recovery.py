"""Start-up recovery of the SQLite queue, run by the daemon under the spool lock (``start(recover=True)``)
before the writer thread starts: body files of messages never committed are removed, and messages whose
rows or body cannot be used are quarantined (held with a ``corrupt: ...`` reason), never deleted. The
spool lock that gives the daemon the spool to itself lives here too.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import logging
import os
import sqlite3
from pathlib import Path
from typing import Any

from ..errors import QueueError
from .ids import is_queue_id
from .rows import MESSAGE_COLUMNS, N_MESSAGE_COLUMNS, RECIPIENT_COLUMNS, decode_message
from .segments import SegmentStore, is_segment_ref
from .spool import Spool

__all__ = ["lock_holder", "recover", "take_lock"]

log = logging.getLogger("mailhop.queue")


def recover(conn: sqlite3.Connection, spool: Spool, segments: SegmentStore | None = None) -> None:
    """Daemon start, under the spool lock: drop unacknowledged bodies, quarantine corrupt messages."""
    segments = segments if segments is not None else SegmentStore(spool.root)
    referenced = {
        row[0] for row in conn.execute("SELECT body_path FROM messages WHERE body_path IS NOT NULL")
    }
    orphans = 0
    for path in spool.scan_bodies():
        if path.relative_to(spool.root).as_posix() not in referenced:
            Spool.remove(path)
            orphans += 1
    if orphans:
        log.info("queue recovery: removed %d body files of messages never committed", orphans)
    # No segment is being written yet: one that no row names holds only bodies of messages gone or never
    # committed.
    used = segments.used_names(conn)
    unused = [name for name in segments.names() if name not in used]
    for name in unused:
        Spool.remove(segments.dir / name)
    if unused:
        log.info("queue recovery: removed %d body segments no message uses", len(unused))

    corrupt: list[tuple[str, str]] = []
    messages = conn.execute(
        f"SELECT {MESSAGE_COLUMNS}, m.body_path, EXISTS (SELECT 1 FROM bodies b WHERE b.id = m.id)"
        " FROM messages m ORDER BY m.id"
    )
    # A second cursor walks the recipients in the same order: a merge join, O(1) memory.
    rcpts = conn.cursor()
    rcpts.execute(f"SELECT {RECIPIENT_COLUMNS} FROM recipients r ORDER BY r.msg_id, r.idx")
    groups = itertools.groupby(rcpts, key=lambda r: r[0])
    pending: tuple[Any, list[tuple[Any, ...]]] | None = None
    try:
        for row in messages:
            qid = row[0]
            rows: list[tuple[Any, ...]] = []
            while True:
                if pending is None:
                    nxt = next(groups, None)
                    if nxt is None:
                        break
                    pending = (nxt[0], list(nxt[1]))
                if pending[0] < qid:  # recipients of no message: ignored (delete removes both)
                    pending = None
                    continue
                if pending[0] == qid:
                    rows = pending[1]
                    pending = None
                break
            reason = _check_message(spool, segments, row, rows)
            if reason and not (row[5] == 1 and str(row[6]).startswith("corrupt:")):
                corrupt.append((qid, reason))
    finally:
        rcpts.close()
        messages.close()
    if corrupt:
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany("UPDATE messages SET held = 1, hold_reason = ? WHERE id = ?",
                         [(f"corrupt: {reason}"[:500], qid) for qid, reason in corrupt])
        conn.execute("COMMIT")
        for qid, reason in corrupt:
            log.error("queue recovery: message %s quarantined (held): %s", qid, reason)


def _check_message(spool: Spool, segments: SegmentStore, row: tuple[Any, ...],
                   rcpt_rows: list[tuple[Any, ...]]) -> str:
    try:
        message, problems = decode_message(row[:N_MESSAGE_COLUMNS], rcpt_rows)
        body_path, has_inline = row[N_MESSAGE_COLUMNS], row[N_MESSAGE_COLUMNS + 1]
        qid = message.id
        if body_path is None:
            if not has_inline:
                problems.append("inline body missing")
        elif is_segment_ref(body_path):
            problem = segments.check(body_path, message.size)
            if problem:
                problems.append(problem)
        elif not isinstance(qid, str) or not is_queue_id(qid) or body_path != Spool.relative_body_path(qid):
            problems.append(f"unexpected body path {body_path!r}")
        else:
            try:
                actual = os.stat(spool.resolve(body_path)).st_size
            except FileNotFoundError:
                problems.append("body file missing")
            except OSError as exc:
                problems.append(f"body file unreadable: {exc}")
            else:
                if actual != message.size:
                    problems.append(f"body file has {actual} bytes, expected {message.size}")
        return "; ".join(problems)
    except Exception as exc:  # recovery never fails because of one message
        return f"unreadable row: {type(exc).__name__}: {exc}"


def take_lock(root: Path) -> int:
    """Take the spool lock (``<spool>/lock``, flock'ed and holding the daemon's pid) and return its descriptor;
    closing the descriptor releases it. Recovery, and so the daemon, needs the spool to itself."""
    path = root / "lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise QueueError(f"cannot open {path}: {exc}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise QueueError(
                f"spool {root} is in use by another mailhop daemon (pid {holder}); "
                "only one daemon may run on a spool"
            ) from None
        raise QueueError(f"cannot lock {path}: {exc}") from exc
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def lock_holder(root: Path) -> int | None:
    """The pid of the daemon running on this spool (it holds the lock), or None when none runs."""
    path = root / "lock"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            return int(text) if text.isdigit() else None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
