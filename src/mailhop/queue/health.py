"""The spool's health: can the queue write mail right now?

States and what clients see (the session reads one attribute per connection and per MAIL):

``ok``      normal service.
``full``    the last storage error was ENOSPC/EDQUOT or SQLITE_FULL. Each transaction that cannot be stored gets
            its ``452 4.3.1`` as before; nothing is refused early, because one oversized message filling the
            disk says nothing about the small one that follows (its partial body was removed again).
``failed``  the last storage error was an I/O error (EIO, EROFS, a permission lost, SQLITE_IOERR, corruption):
            a write that fails this way most likely fails for the next message too, so new connections get
            ``421 4.3.2`` at the greeting and open sessions at their next MAIL, and are closed; a client
            already in DATA gets its ``451 4.3.0`` from the failed accept.

Every storage error of the write path is reported here (the writer thread's failed batches, body writes and
body fsyncs); every committed batch of new mail marks ``ok``. Errors that are not the spool's fault (a constraint
violation, EMFILE, a busy database) change nothing. While the state is not ``ok``, ``watch`` asks the backend
for a probe every ``queue.health_probe_interval`` seconds: a throw-away body file written and fsynced exactly as
a large body is, and a write transaction through the writer thread. When it succeeds the state is ``ok`` again.

Each change of state is logged once (failed: error, full: warning, recovered: info), never once per message.
No untrusted input reaches this module: it sees errors from the OS and SQLite only.
"""

from __future__ import annotations

import asyncio
import enum
import errno
import logging
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable

from ..errors import QueueError
from .spool import DEFAULT_INLINE_MAX, BodyWriter, Spool

__all__ = ["HealthReportingWriter", "SpoolHealth", "SpoolState", "classify", "probe_body_file", "watch"]

log = logging.getLogger("mailhop.queue")

_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
# Resource limits of the process, not properties of the spool: refusing every client for them would turn a
# connection flood into a full outage, and they clear without a probe.
_NOT_STORAGE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EINTR, errno.EAGAIN})
# SQLite primary result codes (the low byte of sqlite_errorcode) that say the file cannot be written.
_SQLITE_FULL = 13
_SQLITE_FAILED = frozenset({
    3,   # SQLITE_PERM
    8,   # SQLITE_READONLY
    10,  # SQLITE_IOERR (write, fsync, truncate, ...)
    11,  # SQLITE_CORRUPT
    14,  # SQLITE_CANTOPEN
    26,  # SQLITE_NOTADB
})


class SpoolState(enum.Enum):
    OK = "ok"
    FULL = "full"
    FAILED = "failed"


def classify(exc: BaseException) -> SpoolState | None:
    """The state a storage error puts the spool in, or None when the error is not about the spool."""
    seen = 0
    while isinstance(exc, QueueError) and exc.__cause__ is not None and seen < 5:
        exc, seen = exc.__cause__, seen + 1  # QueueErrors of the write path chain the OS/SQLite error
    if isinstance(exc, OSError):
        if exc.errno in _FULL_ERRNOS:
            return SpoolState.FULL
        return None if exc.errno in _NOT_STORAGE_ERRNOS else SpoolState.FAILED
    if isinstance(exc, sqlite3.Error):
        code = (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF
        if code == _SQLITE_FULL:
            return SpoolState.FULL
        return SpoolState.FAILED if code in _SQLITE_FAILED else None
    return None


class SpoolHealth:
    """The spool's current state, shared by the queue (which reports) and the sessions (which read).

    Written from the writer thread, worker threads and the event loop: transitions take a lock, reads do not
    (one attribute read, atomic in CPython). ``unavailable`` is the hot-path flag: True only while failed."""

    __slots__ = ("_clock", "_lock", "detail", "since", "state", "transitions", "unavailable")

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self.state = SpoolState.OK
        self.unavailable = False
        self.detail = ""
        self.since = clock()
        self.transitions = 0  # for tests and metrics

    def report(self, exc: BaseException) -> SpoolState | None:
        """Record a storage error; returns the state it implies (None: not a storage error, nothing changed)."""
        state = classify(exc)
        if state is not None:
            self._set(state, f"{type(exc).__name__}: {exc}")
        return state

    def mark_ok(self) -> None:
        """A write reached stable storage (a committed batch, a successful probe)."""
        if self.state is not SpoolState.OK:  # the common case costs this one comparison
            self._set(SpoolState.OK, "")

    def _set(self, state: SpoolState, detail: str) -> None:
        with self._lock:
            previous = self.state
            if state is previous:
                return
            now = self._clock()
            lasted = now - self.since
            self.state, self.detail, self.since = state, detail, now
            self.unavailable = state is SpoolState.FAILED
            self.transitions += 1
        if state is SpoolState.FAILED:
            log.error("spool failed: %s; answering 421 4.3.2 until a probe write succeeds", detail)
        elif state is SpoolState.FULL:
            log.warning("spool full: %s; transactions get 452 4.3.1 until space returns", detail)
        else:
            log.info("spool recovered (was %s for %.1fs)", previous.value, lasted)


class HealthReportingWriter(BodyWriter):
    """A ``BodyWriter`` whose write errors (body file create, write, header rewrite) also reach the health.

    The session sees those errors as a failed chunk and answers at the end of DATA without calling the
    backend again, so the writer is the only place that learns about them."""

    __slots__ = ("_health",)

    def __init__(self, spool: Spool, queue_id: str, inline_max: int = DEFAULT_INLINE_MAX, *,
                 health: SpoolHealth) -> None:
        super().__init__(spool, queue_id, inline_max)
        self._health = health

    def _fail(self, exc: OSError, what: str) -> None:
        self._health.report(exc)
        super()._fail(exc, what)


def probe_body_file(spool: Spool, queue_id: str) -> None:
    """Blocking: create, write, fsync (file and directory) and remove a body file, exactly as a large body is
    stored. Raises QueueError/QueueFullError like an accept would. A crash in between leaves an orphan file,
    which start-up recovery removes."""
    writer = BodyWriter(spool, queue_id, inline_max=0)  # 0: straight to a file
    try:
        writer.write(b"probe\r\n")
        writer.seal()
        writer.sync()
    finally:
        writer.discard_sealed()


async def watch(health: SpoolHealth, probe: Callable[[], Awaitable[None]], interval: float) -> None:
    """Run until cancelled: every ``interval`` seconds, if the spool is not ok, await ``probe``.

    ``probe`` writes durably and reports its own outcome to ``health`` (a failure keeps the state, a success
    marks ok). A timer rather than a wake-up from the failure: failures come from threads, and an idle check
    every few seconds costs nothing."""
    while True:
        await asyncio.sleep(interval)
        if health.state is SpoolState.OK:
            continue
        try:
            await probe()
        except QueueError as exc:
            log.debug("spool probe failed: %s", exc.detail)
        except Exception:  # a bug in the probe must not end the watch: the spool would never recover
            log.exception("spool probe: unexpected error")
