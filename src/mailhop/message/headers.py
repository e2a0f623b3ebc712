"""Bounded scanning of the header block as it streams past, and our Received: header (RFC 5321 4.4).

Untrusted input: message content. The scanner keeps at most ``max_header_bytes`` of the header block; a header
block larger than that is not counted further (the loop limit is then judged on what was seen).
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime
from email.utils import format_datetime

__all__ = ["HeaderScanner", "field_values", "received_header"]

_RECEIVED = re.compile(rb"(?:^|\r?\n)received[ \t]*:", re.IGNORECASE)


class HeaderScanner:
    """Counts Received: headers in the header block of a message fed in chunks, and keeps the block (bounded)
    so policy can read a field such as From:."""

    def __init__(self, max_header_bytes: int = 1024 * 1024) -> None:
        self._buf = bytearray()
        self._max = max_header_bytes
        self.truncated = False  # the header section was longer than max_header_bytes; ``block`` is its start
        self.done = False
        self.received_count = 0
        self.block = b""

    def feed(self, chunk: bytes) -> None:
        if self.done:
            return
        start = max(0, len(self._buf) - 3)
        self._buf += chunk
        end = self._buf.find(b"\r\n\r\n", start)
        if self._buf.startswith(b"\r\n"):
            end = 0
        if end >= 0 or len(self._buf) >= self._max:
            self.truncated = end < 0
            self.block = bytes(self._buf[: end if end >= 0 else self._max])
            self.received_count = len(_RECEIVED.findall(self.block))
            self.done = True
            self._buf = bytearray()

    def finish(self) -> None:
        """The message ended; a message without a blank line is all header."""
        if not self.done:
            self.block = bytes(self._buf)
            self.received_count = len(_RECEIVED.findall(self.block))
            self.done = True
            self._buf = bytearray()

    def field(self, name: str) -> list[str]:
        """Every value of header field ``name`` (unfolded, decoded leniently), in order."""
        return field_values(self.block, name)


def field_values(block: bytes, name: str) -> list[str]:
    """Every value of header field ``name`` in a header block (unfolded, decoded leniently), in order."""
    out = []
    pattern = re.compile(rb"(?:^|\r?\n)" + re.escape(name.encode()) + rb"[ \t]*:(.*?)(?=\r?\n[^ \t]|\r?\n?\Z)",
                         re.IGNORECASE | re.DOTALL)
    for m in pattern.finditer(block):
        value = re.sub(rb"\r?\n[ \t]", b" ", m.group(1)).strip()
        out.append(value.decode("utf-8", "replace"))
    return out


# What cannot stand in the HELO name we echo inside "from ... ( )": anything but printable ASCII, and ( ) \\.
_NOT_IN_COMMENT = re.compile(r"[^\x21-\x27\x2a-\x5b\x5d-\x7e]")

_date_cache: tuple[int, str] = (0, "")


def _now_text() -> str:
    """RFC 5322 date-time of now, formatted once per second (every message of that second shares it)."""
    global _date_cache
    second = int(time.time())
    if _date_cache[0] != second:
        _date_cache = (second, format_datetime(datetime.fromtimestamp(second, UTC)))
    return _date_cache[1]


def received_header(
    *,
    helo: str,
    client_ip: str,
    hostname: str,
    protocol: str,
    queue_id: str,
    recipient: str | None,
    when: datetime | None = None,
    user: str | None = None,
) -> bytes:
    """Our trace header. ``recipient`` is named only when the message has exactly one (privacy, as Postfix)."""
    helo_clean = _NOT_IN_COMMENT.sub("", helo)[:255] or "unknown"
    lines = [f"Received: from {helo_clean} ([{client_ip}])"]
    if user:
        lines.append(f"\t(Authenticated sender: {''.join(ch for ch in user if 32 < ord(ch) < 127 and ch not in '()')})")
    lines.append(f"\tby {hostname} (mailhop) with {protocol} id {queue_id}")
    if recipient:
        lines.append(f"\tfor <{recipient}>")
    lines[-1] += ";"
    lines.append(f"\t{format_datetime(when) if when is not None else _now_text()}")
    return ("\r\n".join(lines) + "\r\n").encode("utf-8", "replace")
