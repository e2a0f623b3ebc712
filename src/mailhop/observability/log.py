"""Mail log: one line per event to stderr, ``key=value`` fields so it greps and parses like Postfix's maillog."""

from __future__ import annotations

import logging
import sys

__all__ = ["setup_logging"]


def setup_logging(level: str = "info") -> None:
    """Send mailhop's log to stderr at ``level``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("mailhop")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
