"""The queue backend contract. ``SqliteQueue`` implements it; a PostgreSQL backend will too, and both must
pass ``tests/queue/contract.py``.

Call order: construct, ``await start()``, then any mix of the other methods from the event loop that ran
``start()``, concurrently; ``await stop()`` once at the end (not concurrently with other calls). Every
method but ``body_writer`` may block on I/O, so all of them are coroutines and none blocks the loop.

Failure semantics: storage failures raise ``QueueError`` (transient: the SMTP session answers 451 4.3.0)
or its subclass ``QueueFullError`` (out of space: 452 4.3.1). A failure affects only the calls it answers;
the backend keeps serving and later calls may succeed. Nothing is half-done: a failed ``accept`` leaves no
trace, a failed admin change changes nothing.
"""

from __future__ import annotations

import builtins
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import BinaryIO, Protocol

from ..envelope import Envelope
from .model import QueuedMessage, RcptStatus, RecipientState
from .spool import BodyWriter

__all__ = ["AcceptedHook", "QueueBackend"]

# (the message as committed, its body when stored inline else None, whether the writer vouched that the body has
# CRLF line ends only: BodyWriter.canonical)
AcceptedHook = Callable[[QueuedMessage, bytes | None, bool], None]


class QueueBackend(Protocol):
    on_accepted: AcceptedHook | None
    """Set by the daemon: called on the event loop right after each ``accept`` committed, with the message
    exactly as ``get`` would return it, its body when small enough to be stored inline (None otherwise) and
    ``BodyWriter.canonical`` of its writer.
    The delivery engine starts on it at once, without reading back what it was just handed. A hook that
    raises fails nothing: the message is committed and stays queued."""

    async def start(self, *, recover: bool = True) -> None:
        """Open the queue. ``recover=True`` is for the daemon only: take the spool's exclusive lock (a second
        daemon on the same spool gets a QueueError naming the holder), remove body files that no committed
        message refers to (bodies of messages that were never acknowledged), and check every committed
        message: one whose body is missing or short, or whose row cannot be decoded, is put on hold with
        ``hold_reason`` 'corrupt: ...' (quarantined); recovery never fails because of one bad message.
        ``recover=False`` (the CLI while a daemon runs) takes no lock and changes nothing at start."""
        ...

    async def stop(self) -> None:
        """Finish every write already submitted, then close. Releases the spool lock."""
        ...

    def body_writer(self) -> BodyWriter:
        """A writer for one message body, its queue id already assigned (for the Received header).
        Hand it to ``accept`` or call its ``abort``."""
        ...

    async def accept(self, envelope: Envelope, body: BodyWriter) -> str:
        """Store the message; returns its queue id only once the body, the envelope and every recipient row
        are durable (the 250 reply may then be sent). Recipients start ``pending`` with 0 attempts and
        ``next_attempt`` = ``received_at`` = the backend clock's now. The backend owns ``body`` from the
        call on. Raises QueueFullError when out of space, QueueError for any other storage failure (the body
        is then discarded and the message does not exist), ValueError for an envelope without recipients.
        If the caller is cancelled, the message may still be committed (at-least-once: the client,
        never having seen a 250, will send it again)."""
        ...

    async def get(self, queue_id: str) -> QueuedMessage | None:
        """The message with every recipient, or None if there is no such message."""
        ...

    async def list(self, *, domain: str | None = None, status: RcptStatus | None = None,
                   held: bool | None = None, limit: int | None = None) -> list[QueuedMessage]:
        """Messages in id (arrival) order. ``domain`` and ``status`` select messages with at least one
        recipient matching both; ``held`` filters on the hold flag; ``limit`` caps the count."""
        ...

    async def delete(self, queue_id: str) -> bool:
        """Remove the message, its recipients and its body. False if there was no such message."""
        ...

    async def hold(self, queue_id: str, reason: str = "admin") -> bool:
        """Hold the message (delivery skips it). Holding a held message keeps its first reason.
        False if there is no such message."""
        ...

    async def release(self, queue_id: str) -> bool:
        """Release a held message. False if there is no such message or it was not held."""
        ...

    async def flush(self) -> int:
        """Make every deferred recipient due now (like ``postqueue -f``); returns how many."""
        ...

    async def update_recipients(self, queue_id: str, recipients: Iterable[RecipientState]) -> int:
        """Store recipient states computed with ``model.mark_*`` (matched by ``idx``); returns how many rows
        changed. A recipient already delivered or failed in storage is never changed (a final state is
        final even if two writers race). For the delivery side; ``flush`` and the tests use it too."""
        ...

    async def record(self, queue_id: str, updates: Iterable[RecipientState], *,
                     notices: Sequence[tuple[Envelope, bytes]] = (), warned: bool = False) -> bool:
        """Record one delivery attempt's results in ONE transaction: the recipient states (final ones
        in storage never change), the notices it produced (DSNs, enqueued as new messages with inline bodies),
        and the message's delay-warned flag. When no recipient is left pending or deferred, the message and
        its body are removed in the same transaction. Returns True when the message was completed. A crash
        before the commit records nothing (the attempt in flight may be repeated); after it, all of it. A
        backend may make the commit durable a little later (SQLite: with the next accept, or within 0.1 s):
        a power cut in between can only undo the record, i.e. repeat the attempt."""
        ...

    async def due(self, *, limit: int = 100, exclude: Collection[str] = ()) -> builtins.list[QueuedMessage]:
        """Messages not held that have a recipient pending or deferred whose next attempt is due (by the
        backend's clock), most overdue first, at most ``limit``, skipping the ids in ``exclude`` (in flight).
        Each message carries all its recipients; the caller picks the due ones."""
        ...

    async def next_due(self) -> float | None:
        """The earliest next-attempt time of any open recipient of a message not held, or None."""
        ...

    async def open_body(self, queue_id: str) -> BinaryIO:
        """A readable binary file object with exactly the body bytes; the caller closes it. KeyError if
        there is no such message, QueueError if its body file cannot be opened."""
        ...

    async def stats(self) -> dict[str, int]:
        """``messages``, ``held`` (messages), and recipients by status: ``pending``, ``deferred``,
        ``delivered``, ``failed``."""
        ...

    def counters(self) -> dict[str, int]:
        """Write-path counters of this process, for metrics and tests: ``batches`` (committed
        transactions), ``failed_batches``, ``accepted`` (messages committed), ``operations`` (admin
        changes committed), ``body_fsyncs`` (file and directory fsyncs for file-backed bodies)."""
        ...
