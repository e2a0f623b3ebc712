"""Substring search and counting over message octets, vectorised (StringZilla).

Every octet of every message passes through a few scans: the end-of-data search, the bare CR/LF counts
(SMTP smuggling) and the line-length windows on the way in, dot-stuffing on the way out. CPython's
``bytes.count``/``find`` step through the buffer one octet at a time for these short patterns (0.4-0.9 ns
per octet here); StringZilla's SIMD kernels do the same in 0.04-0.15 ns, which at 100 KB per message is the
largest single per-message cost on the accept path (bench/RESULTS.md). Same results as the ``bytes`` methods
for non-negative ``start``/``end`` (checked by tests/smtp/test_scan.py against them), on ``bytes`` and
``bytearray``.
"""

from __future__ import annotations

from typing import Protocol, cast

import stringzilla  # no type information: see the mypy override in pyproject.toml

__all__ = ["count", "find", "rfind"]


class _Search(Protocol):
    def __call__(self, text: bytes | bytearray, pattern: bytes, start: int = ..., end: int = ..., /) -> int: ...


count = cast(_Search, stringzilla.count)
"""Non-overlapping occurrences of ``pattern`` in ``text[start:end]``, as ``bytes.count``."""
find = cast(_Search, stringzilla.find)
"""Lowest index of ``pattern`` in ``text[start:end]`` or -1, as ``bytes.find``."""
rfind = cast(_Search, stringzilla.rfind)
"""Highest index of ``pattern`` in ``text[start:end]`` or -1, as ``bytes.rfind``."""
