"""Message content decoders: dot-stuffed DATA (RFC 5321 4.5.2) and raw BDAT chunks (RFC 3030).

Untrusted input: every octet of every message. This is where SMTP smuggling is won or lost, so the rule
is absolute: DATA ends only at CRLF "." CRLF (the start of data counting as preceded by CRLF). A bare CR
or bare LF never ends anything and never starts a line; it is passed through as content and flagged so
the session can refuse the message. Inside BDAT chunks nothing is special at all.

All scanning is done by vectorised find/rfind/count (``smtp.scan``) and ``bytes.replace``, so the per-octet
work runs in C; the Python code runs per buffer (and once per line-limit window), never per line or per octet.
"""

from __future__ import annotations

from .scan import count, find, rfind

__all__ = ["BdatDecoder", "ContentScanner", "DataDecoder", "lf_gap_at_least"]

_END = b"\r\n.\r\n"
_STUFFED = b"\r\n."


def take(buf: bytes | bytearray, start: int, stop: int) -> bytes:
    """``bytes(buf[start:stop])``, copying a large bytearray slice once instead of twice."""
    if stop - start < 2048 or isinstance(buf, bytes):
        return bytes(buf[start:stop])  # short: two small copies beat setting up a memoryview
    with memoryview(buf) as view:
        return view[start:stop].tobytes()


def lf_gap_at_least(data: bytes, start: int, last: int, gap: int) -> bool:
    """Whether some LF in ``data[start:last + 1]`` lies ``gap`` or more octets after ``start`` or after the LF
    before it, ``last`` being the index of an LF (``start`` a line start): a line too long.

    From each line start p, the last LF within the next ``gap`` octets (memrchr) ends every line that starts
    before it, so the next look starts after it; a window without an LF is the long line. About one C call per
    ``gap`` octets, no regex and no loop per line."""
    p = start
    while last - p >= gap:
        q = rfind(data, b"\n", p, p + gap)
        if q < 0:
            return True
        p = q + 1
    return False


class ContentScanner:
    """Accounts for message content: size, size limit, bare CR/LF and overlong lines, across calls.

    A line, for the length check, is a maximal run of octets other than LF; it is too long when that run
    (which includes the CR of a CRLF) reaches ``max_text_line``, i.e. the line with its LF exceeds it.
    """

    __slots__ = ("_max_line", "_max_size", "_pending_cr", "_run", "bare_newline",
                 "line_too_long", "size", "too_big")

    def __init__(self, max_text_line: int, max_message_size: int) -> None:
        self._max_line = max_text_line
        self._max_size = max_message_size
        self._run = 0  # length of the unterminated line carried over from earlier content
        self._pending_cr = False  # earlier content ended with CR: its partner LF may start the next piece
        self.bare_newline = False
        self.line_too_long = False
        self.too_big = False
        self.size = 0

    def account(self, region: bytes) -> bytes:
        """Record ``region`` (content, already unstuffed) and return the part of it to pass on."""
        n = len(region)
        if not n:
            return region
        if not self.bare_newline:
            self._scan_newlines(region)
        if not self.line_too_long:
            self._scan_lines(region, n)
        before = self.size
        self.size = before + n
        if self.size <= self._max_size:
            return region
        # Over the limit: stop passing content on, but the caller keeps reading to the end so the
        # dialogue stays in sync.
        self.too_big = True
        room = self._max_size - before
        return region[:room] if room > 0 else b""

    def finish(self) -> None:
        """The content is complete: a CR still waiting for its LF was a bare CR."""
        if self._pending_cr:
            self.bare_newline = True
            self._pending_cr = False

    def _scan_newlines(self, region: bytes) -> None:
        # Three vectorised counts (~0.4 ns/octet together; bytes.count took ~1.8, a regex ~3): every CR but a
        # final one must start a CRLF, and every LF must end one (or complete a CR held over from the
        # previous piece).
        pending = self._pending_cr
        if pending and region[0] != 0x0A:
            self.bare_newline = True
            return
        ends_cr = region[-1] == 0x0D
        pairs = count(region, b"\r\n")
        if count(region, b"\r") - ends_cr != pairs or count(region, b"\n") - pending != pairs:
            self.bare_newline = True
            return
        self._pending_cr = ends_cr

    def _scan_lines(self, region: bytes, n: int) -> None:
        max_line = self._max_line
        nl = find(region, b"\n")
        if nl < 0:
            self._run += n
            if self._run >= max_line:
                self.line_too_long = True
            return
        last = rfind(region, b"\n")
        tail = n - last - 1
        if self._run + nl >= max_line or tail >= max_line:
            self.line_too_long = True
            return
        if lf_gap_at_least(region, nl + 1, last, max_line):
            self.line_too_long = True
            return
        self._run = tail


class DataDecoder(ContentScanner):
    """Decodes dot-stuffed DATA content from a connection buffer.

    ``decode`` consumes what it can and returns content as one slice per call; it holds back at most the
    4 octets that could begin the end marker, so markers split across reads are still found.
    """

    __slots__ = ("_at_start", "done")

    def __init__(self, max_text_line: int, max_message_size: int) -> None:
        super().__init__(max_text_line, max_message_size)
        self._at_start = True
        self.done = False

    def decode(self, buf: bytes | bytearray, pos: int = 0) -> tuple[bytes, int, bool]:
        """Decode from ``buf[pos:]``: returns (content, new position, whether the end marker was consumed)."""
        if self.done:
            raise RuntimeError("DATA content already ended")
        end = len(buf)
        if self._at_start:
            if pos >= end:
                return b"", pos, False
            if buf[pos] == 0x2E:  # "." on the first line: the data start counts as preceded by CRLF
                head = bytes(buf[pos : pos + 3])
                if head == b".\r\n":
                    self._at_start = False
                    return self._ended(b"", pos + 3)
                if len(head) < 3 and b".\r\n".startswith(head):
                    return b"", pos, False
                pos += 1  # unstuff the first line's leading dot
            self._at_start = False
        # One scan for CRLF "." finds both the end marker and the first dot to unstuff; in the common
        # case (no line starts with ".") it is the only scan needed to delimit the content.
        i = find(buf, _STUFFED, pos)
        if i < 0:
            stop = end - 2 if buf.endswith(b"\r\n", pos) else end - 1 if buf.endswith(b"\r", pos) else end
            if stop <= pos:
                return b"", pos, False
            return self.account(take(buf, pos, stop)), stop, False
        if i + 5 > end:
            # A possible marker at the very end: hold back those (at most 4) octets until more arrive.
            if i <= pos:
                return b"", pos, False
            return self.account(take(buf, pos, i)), i, False
        if buf[i + 3] == 0x0D and buf[i + 4] == 0x0A:
            return self._ended(take(buf, pos, i + 2), i + 5)
        # A dot-stuffed line: find the real end, then unstuff the whole region in one replace.
        j = find(buf, _END, i)
        if j >= 0:
            return self._ended(self._unstuff(buf, pos, j + 2), j + 5)
        # Hold back a suffix that may be the start of the marker (or of CRLF "." to unstuff).
        if buf.endswith(b"\r\n.\r", pos):
            stop = end - 4
        elif buf.endswith(_STUFFED, pos):
            stop = end - 3
        elif buf.endswith(b"\r\n", pos):
            stop = end - 2
        elif buf.endswith(b"\r", pos):
            stop = end - 1
        else:
            stop = end
        return self.account(self._unstuff(buf, pos, stop)), stop, False

    @staticmethod
    def _unstuff(buf: bytes | bytearray, start: int, stop: int) -> bytes:
        # RFC 5321 4.5.2: a line starting with "." loses that dot. Lines start only after CRLF, so a dot
        # after a bare LF or CR is content. The end marker is outside the region, so it cannot match.
        return take(buf, start, stop).replace(_STUFFED, b"\r\n")

    def _ended(self, region: bytes, new_pos: int) -> tuple[bytes, int, bool]:
        content = self.account(region)
        self.finish()
        self.done = True
        return content, new_pos, True


class BdatDecoder(ContentScanner):
    """Reads BDAT chunks: exactly ``size`` raw octets each, no dot handling, markers meaningless."""

    __slots__ = ("remaining",)

    def __init__(self, max_text_line: int, max_message_size: int) -> None:
        super().__init__(max_text_line, max_message_size)
        self.remaining = 0

    def start_chunk(self, size: int) -> None:
        if self.remaining:
            raise RuntimeError("previous BDAT chunk not fully read")
        self.remaining = size

    def decode(self, buf: bytes | bytearray, pos: int = 0) -> tuple[bytes, int, bool]:
        """Read chunk octets from ``buf[pos:]``: returns (content, new position, whether the chunk is complete)."""
        n = min(self.remaining, len(buf) - pos)
        if n <= 0:
            return b"", pos, self.remaining == 0
        self.remaining -= n
        return self.account(take(buf, pos, pos + n)), pos + n, self.remaining == 0
