"""Named crash points for crash-consistency tests.

``crash_point(name)`` kills the process on the spot (``os._exit(137)``, as SIGKILL would: no cleanup, no
flush) when the environment variable ``MAILHOP_CRASH_AT`` equals ``name``. The variable is read once, at
import, so in production a crash point costs one string comparison.

Names used by the commit path (see ``commit.py`` and ``sqlite.py``):

``after_body_write``  the body is complete in memory / the page cache; nothing is fsynced yet
``after_body_fsync``  body files and their directories are fsynced and the batch's rows are inserted,
                      but the transaction is not committed
``after_commit``      the transaction is committed; no accept() has returned yet
``after_segment_sync`` the batch's segment bodies are written and fdatasynced, the transaction not begun
                      (only with body segments on)
"""

from __future__ import annotations

import os

__all__ = ["CRASH_AT", "CRASH_POINTS", "SEGMENT_CRASH_POINTS", "crash_point"]

CRASH_POINTS = ("after_body_write", "after_body_fsync", "after_commit")
SEGMENT_CRASH_POINTS = ("after_segment_sync",)  # reached only with body segments on
CRASH_AT = os.environ.get("MAILHOP_CRASH_AT", "")


def crash_point(name: str) -> None:
    """Die like a SIGKILL if this is the configured crash point; otherwise do nothing."""
    if name == CRASH_AT:
        os._exit(137)
