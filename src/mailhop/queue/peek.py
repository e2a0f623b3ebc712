"""Read-only looks at a spool without opening it as a queue (no lock, no recovery): for the worker supervisor."""

from __future__ import annotations

import sqlite3
from pathlib import Path

__all__ = ["message_count"]


def message_count(spool: Path) -> int | None:
    """Messages stored in the spool at ``spool`` (0 when it has no database; None when it cannot be read)."""
    db = spool / "queue.db"
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            (count,) = conn.execute("SELECT count(*) FROM messages").fetchone()
    except sqlite3.Error:
        return None
    return int(count)
