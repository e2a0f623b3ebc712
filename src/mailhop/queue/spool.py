"""Body storage. This module is the only mailhop code that calls fsync.

Why small bodies live in SQLite and large ones in files
--------------------------------------------------------
A 250 reply to DATA promises the message is on stable storage, so every accepted message costs at least
one fsync somewhere, and on a fast SSD an fsync (~150 µs) dwarfs everything else we do per message. Where
the body goes decides how many fsyncs a message costs:

* Small bodies (up to ``inline_max``, 128 KiB by default; almost all mail) are stored inline, as a BLOB in
  the same SQLite transaction as the envelope and the recipient rows. SQLite in WAL mode with
  ``synchronous=FULL`` makes a transaction durable with one fsync of the write-ahead log, and the group
  committer puts every message waiting at that moment into one transaction. So the common case costs one
  fsync per *batch*, not per message: at 20 concurrent sessions, a twentieth of an fsync per message, and
  there is no separate file whose data and directory entry would each need their own fsync.
* Large bodies are spilled to a file as soon as they pass ``inline_max``: memory stays bounded (a 50 MB
  message costs ``inline_max`` of RAM at most, the rest goes through the page cache with ``os.write``),
  SQLite pages and the WAL are not bloated by megabytes that are written once and read once, and the
  body is streamed back from the file at delivery. Such a file is made durable before the envelope row
  that points to it is committed: the file is fsynced, then its directory (so the name survives a crash),
  then the transaction commits. The commit is the marker: a file without a committed row is garbage and is
  removed at the next start; a committed row always has its file.

Layout: ``<spool>/bodies/<id[-2:]>/<id>``. The bucket is the *last* two characters of the id (random bits),
not the first two (a timestamp that changes about once a year), so the 1024 buckets fill evenly. All
buckets are created (and their parent fsynced) at start, so creating a body never creates a directory.

``write()`` is synchronous and runs on the event loop: appending to a bytearray or an ``os.write`` into
the page cache is cheap. The fsyncs run in a worker thread (``BodyWriter.sync``).
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path

from ..errors import QueueError, QueueFullError
from .ids import ALPHABET

__all__ = ["DEFAULT_INLINE_MAX", "BodyWriter", "Spool", "fsync_dir", "queue_error_from_os"]

DEFAULT_INLINE_MAX = 128 * 1024
BUCKETS = tuple(a + b for a in ALPHABET for b in ALPHABET)
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})

# Seams for fault-injection tests: looked up at call time through the module, so a test can
# monkeypatch ``spool.fsync`` or ``spool.write`` to raise OSError(EIO) or OSError(ENOSPC).
fsync = os.fsync
write = os.write


def queue_error_from_os(exc: OSError, what: str) -> QueueError:
    """ENOSPC and EDQUOT become QueueFullError (452 4.3.1); any other OSError a QueueError (451)."""
    cls = QueueFullError if exc.errno in _FULL_ERRNOS else QueueError
    return cls(f"{what}: {exc}")


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make the directory entries in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike[str]) -> None:
    """fsync an existing file by name (used for the database file at creation)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """The spool directory: ``queue.db``, ``lock`` and ``bodies/``."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.bodies = self.root / "bodies"

    def ensure_layout(self) -> None:
        """Create the spool, ``bodies/`` and every bucket; fsync each parent whose entries changed."""
        created_root = not self.root.is_dir()
        self.root.mkdir(parents=True, exist_ok=True)
        created_bodies = False
        if not self.bodies.is_dir():
            self.bodies.mkdir(exist_ok=True)
            created_bodies = True
        existing = set(os.listdir(self.bodies))
        missing = [b for b in BUCKETS if b not in existing]
        for bucket in missing:
            (self.bodies / bucket).mkdir(exist_ok=True)
        if missing:
            fsync_dir(self.bodies)
        if created_bodies:
            fsync_dir(self.root)
        if created_root:
            fsync_dir(self.root.parent)

    @staticmethod
    def relative_body_path(queue_id: str) -> str:
        return f"bodies/{queue_id[-2:]}/{queue_id}"

    def body_path(self, queue_id: str) -> Path:
        return self.bodies / queue_id[-2:] / queue_id

    def resolve(self, relative: str) -> Path:
        return self.root / relative

    def scan_bodies(self) -> Iterator[Path]:
        """Every file in a bucket directory (for recovery)."""
        for bucket in BUCKETS:
            try:
                with os.scandir(self.bodies / bucket) as it:
                    for entry in it:
                        if entry.is_file(follow_symlinks=False):
                            yield Path(entry.path)
            except FileNotFoundError:
                continue

    @staticmethod
    def remove(path: str | os.PathLike[str]) -> None:
        """Unlink, ignoring a file that is already gone. Not fsynced: a removal that is lost in a crash
        leaves an orphan, which the next start removes again."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

    def writer(self, queue_id: str, inline_max: int = DEFAULT_INLINE_MAX) -> BodyWriter:
        return BodyWriter(self, queue_id, inline_max)


_OPEN, _SEALED, _FAILED, _ABORTED = "open", "sealed", "failed", "aborted"


class BodyWriter:
    """Receives one message body, chunk by chunk, from the SMTP session.

    ``queue_id`` is assigned at creation so the session can put it in the Received header before the data
    arrives. Call ``write`` for each chunk (on the event loop), then hand the writer to
    ``QueueBackend.accept`` (which owns it from then on), or call ``abort`` to discard it. If ``write``
    raises (QueueFullError on ENOSPC, QueueError otherwise) the partial body is already removed, later
    ``write`` calls raise the same class again, and ``accept`` refuses the writer.
    """

    __slots__ = ("_buf", "_error", "_fd", "_inline_max", "_path", "_size", "_spool", "_state", "canonical",
                 "queue_id")

    def __init__(self, spool: Spool, queue_id: str, inline_max: int = DEFAULT_INLINE_MAX) -> None:
        self.queue_id = queue_id
        self._spool = spool
        self._inline_max = inline_max
        self._buf = bytearray()
        self._fd = -1
        self._path: Path | None = None
        self._size = 0
        self._state = _OPEN
        self._error: QueueError | None = None
        #: Set by a writer that checked the content has CRLF line ends only (the SMTP server does): delivery
        #: then sends it without re-checking them. False (unknown) by default.
        self.canonical = False

    @property
    def size(self) -> int:
        """Body bytes written so far."""
        return self._size

    @property
    def is_file_backed(self) -> bool:
        return self._path is not None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._state is not _OPEN:
            if self._error is not None:
                raise type(self._error)(self._error.detail)
            raise QueueError(f"body {self.queue_id} is {self._state}")
        if self._fd < 0:
            self._buf += data
            self._size += len(data)
            if len(self._buf) > self._inline_max:
                self._spill()
            return
        self._write_all(data)
        self._size += len(data)

    def _spill(self) -> None:
        path = self._spool.body_path(self.queue_id)
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            self._fail(exc, "create body file")
        self._path = path
        self._write_all(self._buf)
        self._buf = bytearray()

    def _write_all(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        try:
            while view:
                view = view[write(self._fd, view):]
        except OSError as exc:
            self._fail(exc, "write body file")
        finally:
            view.release()

    def _fail(self, exc: OSError, what: str) -> None:
        error = queue_error_from_os(exc, f"{what} {self.queue_id}")
        self._discard()
        self._state = _FAILED
        self._error = error
        raise error from exc

    def _discard(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._path is not None:
            Spool.remove(self._path)
        self._buf = bytearray()

    def read_back(self, offset: int = 0) -> bytes:
        """The body written so far from ``offset`` (for content checks before the commit). Blocking for a
        file-backed body: run it in a thread then."""
        self._check_open()
        if self._path is None:
            return bytes(self._buf[offset:])
        with open(self._path, "rb") as f:
            f.seek(offset)
            return f.read()

    def replace_head(self, old_len: int, new_head: bytes) -> None:
        """Replace the first ``old_len`` bytes with ``new_head`` (header edits made by policy checks).

        Inline bodies are edited in memory. A file-backed body is rewritten into a new file (the new head, then
        the rest copied in the kernel) that is renamed over the old one: a crash in between leaves only
        files without a committed row, which recovery removes. Blocking for a file-backed body: run it in a
        thread then."""
        self._check_open()
        if self._path is None:
            self._buf[:old_len] = new_head
            self._size = len(self._buf)
            if len(self._buf) > self._inline_max:
                self._spill()
            return
        tmp = self._path.with_name(self._path.name + ".edit")
        try:
            out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            self._fail(exc, "create edited body")
        try:
            view = memoryview(new_head)
            while view:
                view = view[write(out, view):]
            with open(self._path, "rb") as src:
                src.seek(old_len)
                remaining = self._size - old_len
                while remaining > 0:
                    n = os.copy_file_range(src.fileno(), out, min(remaining, 1 << 30))
                    if n == 0:
                        break
                    remaining -= n
            os.replace(tmp, self._path)
        except OSError as exc:
            os.close(out)
            Spool.remove(tmp)
            self._fail(exc, "write edited body")
        os.close(self._fd)
        self._fd = out
        self._size = self._size - old_len + len(new_head)

    def _check_open(self) -> None:
        if self._state is not _OPEN:
            if self._error is not None:
                raise type(self._error)(self._error.detail)
            raise QueueError(f"body {self.queue_id} is {self._state}")

    def abort(self) -> None:
        """Discard the body (idempotent). Not for a writer already handed to ``accept``."""
        if self._state is _OPEN or self._state is _FAILED:
            self._discard()
            if self._state is _OPEN:
                self._state = _ABORTED

    # --- used by the backend ---------------------------------------------------------------------------

    def seal(self) -> tuple[bytearray | None, str | None]:
        """End of data: returns (inline body, None) or (None, relative file path). No more writes."""
        if self._state is not _OPEN:
            if self._error is not None:
                raise type(self._error)(self._error.detail)
            raise QueueError(f"body {self.queue_id} is {self._state}")
        self._state = _SEALED
        if self._path is None:
            return self._buf, None
        return None, Spool.relative_body_path(self.queue_id)

    def sync(self) -> None:
        """Blocking (run it in a thread): fsync the body file, close it, fsync its directory.

        On error the file is removed and QueueError/QueueFullError raised. No-op for inline bodies."""
        if self._path is None:
            return
        fd, self._fd = self._fd, -1
        try:
            try:
                fsync(fd)
            finally:
                os.close(fd)
            fsync_dir(self._path.parent)
        except OSError as exc:
            Spool.remove(self._path)
            raise queue_error_from_os(exc, f"fsync body {self.queue_id}") from exc

    def discard_sealed(self) -> None:
        """After a failed commit: remove the file of a sealed writer (its fd is already closed)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._path is not None:
            Spool.remove(self._path)
        self._buf = bytearray()
