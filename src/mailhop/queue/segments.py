"""Body segments: message bodies appended to shared files, so that a body is written and synced once.

Why: a body kept in SQLite is written twice (to the WAL, then by the checkpoint into the database file) and
synced in both places; a body file costs a file and a directory fsync per message. A segment is an append-only
file that the writer thread extends with the bodies of a whole batch and syncs with one ``fdatasync``, before
the batch's COMMIT; the message row names its body as ``seg:NAME:OFFSET:LENGTH``. Measured (bench/RESULTS.md),
accepting 100 KB messages this way went from 0.98x to 1.64x Postfix with one worker.

Durability: the segment is fdatasynced, and a new segment's directory entry fsynced when it is created, before
any row that names it is committed, so a committed row never points at bytes a crash can take back. A crash
between the two leaves bytes no row names: dead space, freed with the segment.

Space: a segment is deleted once no row names it and it is not the one being written (``reclaim``, run by the
queue in its writer). A message still queued when its segment is older than ``max_age`` has its body moved into
the database (``bodies`` table, the ordinary inline form), so a few long-deferred or held messages never pin
whole segments. Only the writer thread writes, rotates and reclaims; anyone may read.

Untrusted input: a body reference read back from the database is parsed strictly (digits only), never used as a
path as such.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from ..errors import QueueError
from .faults import crash_point
from .spool import fsync_dir, queue_error_from_os

__all__ = ["DEFAULT_SEGMENT_SIZE", "SegmentStore", "is_segment_ref"]

log = logging.getLogger("mailhop.queue")

DEFAULT_SEGMENT_SIZE = 64 * 1024 * 1024  # a new segment is started once the current one is this large
DEFAULT_MAX_AGE = 600.0  # seconds; older segments have their remaining bodies moved into the database
_PREFIX = "seg:"
_REF = re.compile(r"^seg:(\d{10}):(\d{1,15}):(\d{1,15})$")
_NAME = re.compile(r"^\d{10}$")
_IOV_MAX = 1024  # buffers per pwritev (Linux's limit)
_MAX_BODY = 64 * 1024 * 1024  # no body kept in memory is larger (inline_body_max <= 16 MiB): a bigger length is damage


def is_segment_ref(body_path: object) -> bool:
    """Whether a messages.body_path value names a segment body (and not a body file)."""
    return isinstance(body_path, str) and body_path.startswith(_PREFIX)


def _range(name: str) -> tuple[str, str]:
    """The body_path bounds of one segment's references (';' sorts right after ':'), for the partial index."""
    return f"{_PREFIX}{name}:", f"{_PREFIX}{name};"


def _parse(ref: str) -> tuple[str, int, int]:
    m = _REF.match(ref)
    if m is None:
        raise QueueError(f"malformed segment reference {ref[:80]!r}")
    return m.group(1), int(m.group(2)), int(m.group(3))


class SegmentStore:
    """The ``segments/`` directory of one spool."""

    def __init__(self, root: str | os.PathLike[str], *, segment_size: int = DEFAULT_SEGMENT_SIZE,
                 max_age: float = DEFAULT_MAX_AGE, clock: Callable[[], float] = time.time) -> None:
        self.dir = Path(root) / "segments"
        self.segment_size = segment_size
        self.max_age = max_age
        self._clock = clock
        self._fd = -1  # the current segment, open for appending (writer thread only)
        self._name: str | None = None
        self._size = 0
        self._started: dict[str, float] = {}  # segment -> when this process started it (its age)
        self._last = 0  # the highest segment number made or named so far: names are never reused

    # --- any thread ---------------------------------------------------------------------------------------

    def read(self, ref: str) -> bytes:
        """The body a reference names; QueueError when it is malformed or its bytes are not all there."""
        name, offset, length = _parse(ref)
        if length > _MAX_BODY:
            raise QueueError(f"segment reference {ref[:80]!r}: implausible length")
        try:
            fd = os.open(self.dir / name, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise QueueError(f"segment {name}: cannot open: {exc}") from exc
        try:
            data = os.pread(fd, length, offset)
        except OSError as exc:
            raise QueueError(f"segment {name}: cannot read: {exc}") from exc
        finally:
            os.close(fd)
        if len(data) != length:
            raise QueueError(f"segment {name}: {len(data)} of {length} bytes at offset {offset}")
        return data

    def check(self, ref: str, size: int) -> str:
        """Why a reference cannot be read back as a body of size bytes ("" when it can): for start-up recovery."""
        try:
            name, offset, length = _parse(ref)
        except QueueError as exc:
            return exc.detail
        if length != size:
            return f"segment body of {length} bytes, expected {size}"
        try:
            size = os.stat(self.dir / name).st_size
        except FileNotFoundError:
            return f"segment {name} missing"
        except OSError as exc:
            return f"segment {name} unreadable: {exc}"
        if offset + length > size:
            return f"segment {name} has {size} bytes, the body ends at {offset + length}"
        return ""

    @staticmethod
    def used_names(conn: sqlite3.Connection) -> set[str]:
        """The segments some message row names (well-formed names only)."""
        rows = conn.execute("SELECT DISTINCT substr(body_path, 5, 10) FROM messages"
                            " WHERE body_path >= ? AND body_path < ?", (_PREFIX, "seg;"))
        return {str(row[0]) for row in rows if _NAME.match(str(row[0]))}

    def names(self) -> list[str]:
        """Every segment on disk, oldest first."""
        try:
            return sorted(entry for entry in os.listdir(self.dir) if _NAME.match(entry))
        except FileNotFoundError:
            return []

    # --- the writer thread ----------------------------------------------------------------------------------

    @property
    def current(self) -> str | None:
        return self._name

    def note_used(self, number: int) -> None:
        """A segment number the database still names: later segments get higher ones."""
        self._last = max(self._last, number)

    def append(self, bodies: Sequence[bytes | bytearray | memoryview]) -> list[str]:
        """Append bodies to the current segment (starting a new one when it is full) and fdatasync it; their
        references, in order. Raises QueueError; then nothing returned was made durable."""
        try:
            if self._fd < 0 or self._size >= self.segment_size:
                self._rotate()
            start = self._size
            refs = []
            offset = start
            for body in bodies:
                refs.append(f"{_PREFIX}{self._name}:{offset}:{len(body)}")
                offset += len(body)
            position = start
            for first in range(0, len(bodies), _IOV_MAX):
                chunk = bodies[first:first + _IOV_MAX]
                expected = sum(len(body) for body in chunk)
                if os.pwritev(self._fd, chunk, position) != expected:  # short: the disk is full, typically
                    raise OSError(errno.ENOSPC, "short write to segment")
                position += expected
            os.fdatasync(self._fd)
            crash_point("after_segment_sync")
        except OSError as exc:
            self._close()  # the next batch starts a fresh segment rather than append after a torn tail
            raise queue_error_from_os(exc, "segment write") from exc
        self._size = offset
        return refs

    def _rotate(self) -> None:
        self._close()
        existing = self.names()
        number = max(self._last, int(existing[-1]) if existing else 0) + 1
        self._last = number
        self.dir.mkdir(exist_ok=True)
        name = f"{number:010d}"
        fd = os.open(self.dir / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            fsync_dir(self.dir)  # the name must survive a crash before any committed row uses it
            fsync_dir(self.dir.parent)  # ... and the directory itself, the first time
        except BaseException:
            os.close(fd)
            raise
        self._fd, self._name, self._size = fd, name, 0
        self._started[name] = self._clock()

    def _close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
        self._fd, self._name, self._size = -1, None, 0

    def close(self) -> None:
        """Stop appending (at queue stop)."""
        self._close()

    def reclaim(self, conn: sqlite3.Connection) -> tuple[int, Callable[[], None] | None]:
        """Inside the writer's transaction: move the bodies still queued in segments older than ``max_age`` into
        the database, and name every segment (but the current one) that no row uses any more; returns how many
        bodies moved and the action that deletes those segments once the transaction is committed."""
        now = self._clock()
        moved = 0
        unused: list[str] = []
        for name in self.names():
            if name == self._name:
                continue
            rows = conn.execute("SELECT id, body_path FROM messages WHERE body_path >= ? AND body_path < ?",
                                _range(name)).fetchall()
            if rows and now - self._age_start(name) >= self.max_age:
                stuck = []
                for qid, ref in rows:
                    try:
                        data = self.read(ref)
                    except QueueError as exc:  # damaged (recovery quarantined it): leave it and its segment be
                        log.warning("queue: body of %s stays in segment %s: %s", qid, name, exc.detail)
                        stuck.append(qid)
                        continue
                    conn.execute("INSERT OR REPLACE INTO bodies (id, data) VALUES (?, ?)", (qid, data))
                    conn.execute("UPDATE messages SET body_path = NULL WHERE id = ?", (qid,))
                    moved += 1
                rows = stuck
            if not rows:
                unused.append(name)
        if not unused:
            return moved, None
        paths = [self.dir / name for name in unused]

        def remove() -> None:
            for path in paths:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                self._started.pop(path.name, None)

        return moved, remove

    def _age_start(self, name: str) -> float:
        started = self._started.get(name)
        if started is None:  # made by an earlier run: its mtime is when it was last written
            try:
                started = os.stat(self.dir / name).st_mtime
            except OSError:
                started = self._clock()
            self._started[name] = started
        return started
