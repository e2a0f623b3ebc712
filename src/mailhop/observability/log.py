"""Mail log: one line per event to stderr, ``key=value`` fields so it greps and parses like Postfix's maillog."""

from __future__ import annotations

import logging
import sys

__all__ = ["setup_logging"]


def setup_logging(level: str = "info") -> None:
    """Send mailhop's log to stderr at ``level``."""
    # The mail log writes a line per message event; skip the per-record process/thread lookups we never print
    # (os.getpid and threading calls showed up at ~5% of the relay profile).
    logging.logProcesses = False
    logging.logThreads = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("mailhop")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
