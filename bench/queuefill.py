"""Build a mailhop spool holding many deferred messages, fast, for the queue-scale workload.

Going through the daemon (SMTP, one durable commit per batch) would take about ten minutes for a million
messages; this writes the rows straight into ``<spool>/queue.db`` with sqlite3, in large transactions and
with the journal off while building (a half-built spool is thrown away, so durability is not needed), then
switches the database to WAL as the daemon keeps it.

The rows are what the daemon itself writes, so they must satisfy its start-up recovery: the schema comes from
``mailhop.queue.rows.ensure_schema`` and the message and body rows from its ``INSERT_MESSAGE`` /
``INSERT_BODY``; ids from ``mailhop.queue.ids.new_queue_id``; params ``{}`` (no MAIL FROM parameters); each
body inline in ``bodies`` (a short message, far under ``inline_body_max``), so no body files. Every message has
one recipient in state ``deferred``, one attempt made, the last reply a 451, and its next attempt days ahead
(within the default five-day queue lifetime), so none is due during the benchmark. The recipients are spread
over ``domains`` domains, ``user<N>@d<K>.bench.test``. The caller checks that recovery took them all
(``held_count`` is 0 once a daemon has started on the spool: recovery holds any message it cannot decode).
"""

from __future__ import annotations

import sqlite3
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from mailhop.queue.ids import new_queue_id
from mailhop.queue.rows import INSERT_BODY, INSERT_MESSAGE, ensure_schema
from mailhop.queue.sqlite import DEFAULT_PAGE_SIZE

__all__ = ["FillStats", "domain_name", "fill_queue", "held_count"]

BATCH = 50_000
SENDER = "filler@client.test"
DEFER_SECONDS = 3 * 24 * 3600.0  # next attempt: three days ahead, inside max_queue_lifetime (5 days)
LAST_REPLY = "451 4.4.1 bench: destination not answering"
INSERT_DEFERRED = (
    "INSERT INTO recipients (msg_id, idx, address, domain, orcpt, notify, status, attempts, last_reply,"
    " next_attempt, updated) VALUES (?, 0, ?, ?, NULL, '', 'deferred', 1, ?, ?, ?)"
)


def domain_name(index: int) -> str:
    """The index-th filler domain."""
    return f"d{index:04d}.bench.test"


def body(number: int, recipient: str) -> bytes:
    """A filler message's stored content: a Received line, three headers, one line of text."""
    return (f"Received: from client.test (127.0.0.1) by mailhop.bench.test; queue-scale filler\r\n"
            f"From: <{SENDER}>\r\nTo: <{recipient}>\r\nSubject: filler {number}\r\n\r\n"
            "A deferred message that only takes up room in the queue.\r\n").encode()  # fmt: skip


@dataclass(frozen=True)
class FillStats:
    """What fill_queue built, and how long it took."""

    messages: int
    domains: int
    seconds: float
    db_bytes: int


def fill_queue(spool: Path, messages: int, domains: int) -> FillStats:
    """Create ``spool/queue.db`` holding messages deferred messages spread over domains domains."""
    started = time.perf_counter()
    spool.mkdir(parents=True, exist_ok=True)
    db = spool / "queue.db"
    if db.exists():
        raise FileExistsError(f"{db} exists: fill_queue builds a new spool")
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.execute(f"PRAGMA page_size={DEFAULT_PAGE_SIZE}")  # as mailhop would create it
        conn.execute("PRAGMA journal_mode=OFF")
        conn.execute("PRAGMA synchronous=OFF")
        conn.execute("PRAGMA cache_size=-1000000")  # 1 GB of page cache: index inserts stay in memory
        ensure_schema(conn)
        now = time.time()
        for first in range(0, messages, BATCH):
            message_rows, body_rows, recipient_rows = [], [], []
            for number in range(first, min(messages, first + BATCH)):
                qid = new_queue_id(now)
                domain = domain_name(number % domains)
                recipient = f"user{number}@{domain}"
                data = body(number, recipient)
                message_rows.append((qid, SENDER, "{}", now, len(data), "127.0.0.1", "client.test", None, 0, ""))
                body_rows.append((qid, data))
                # Spread the next attempts over an hour, so the due index is not one long run of equal keys.
                due = now + DEFER_SECONDS + (number % 3600)
                recipient_rows.append((qid, recipient, domain, LAST_REPLY, due, now))
            conn.execute("BEGIN")
            conn.executemany(INSERT_MESSAGE, message_rows)
            conn.executemany(INSERT_BODY, body_rows)
            conn.executemany(INSERT_DEFERRED, recipient_rows)
            conn.execute("COMMIT")
        conn.execute("PRAGMA journal_mode=WAL")
    finally:
        conn.close()
    return FillStats(messages, domains, time.perf_counter() - started, db.stat().st_size)


def held_count(spool: Path) -> int:
    """Messages held in the spool: start-up recovery holds (quarantines) any message it cannot use."""
    with closing(sqlite3.connect(f"file:{spool / 'queue.db'}?mode=ro", uri=True, timeout=30)) as conn:
        return int(conn.execute("SELECT count(*) FROM messages WHERE held = 1").fetchone()[0])
