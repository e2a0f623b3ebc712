"""Outbound encodings: message content to the DATA wire form (RFC 5321 4.5.2) and xtext (RFC 3461 4).

Untrusted input: message content as stored, which arrived from some client and may hold bare CR, bare LF,
lines starting with "." and overlong lines, split at arbitrary chunk boundaries. Whatever it holds, the
output is canonical: every line ends in CRLF, no bare CR or LF leaves mailhop (so no receiver can be
tricked into seeing an end of data we did not mean: SMTP smuggling), and the only end marker is ours.

All work is whole-chunk ``bytes.replace`` and vectorised ``count``/``find``/``rfind`` (``smtp.scan``), never a
loop per line.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

from .data import lf_gap_at_least
from .scan import count, find, rfind

__all__ = ["MAX_LINE", "DotStuffer", "canonicalize", "encode_data", "xtext"]

MAX_LINE = 998  # RFC 5321 4.5.3.1.6: octets per text line, CRLF excluded
_END = b".\r\n"
# A canonical line of more than MAX_LINE octets has its LF at least this far from its first octet.
_WINDOW = MAX_LINE + 2
# xtext: "!".."~" except "+" and "=" pass; everything else is "+XX" (uppercase hex).
_XTEXT_SPECIAL = re.compile(rb"[^\x21-\x2a\x2c-\x3c\x3e-\x7e]")


def canonicalize(data: bytes) -> bytes:
    """Every CRLF, bare CR and bare LF becomes CRLF (the reference meaning of "line end")."""
    n = count(data, b"\n")
    if count(data, b"\r") == n and count(data, b"\r\n") == n:
        return data  # already canonical: the common case costs three counts
    return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")


class DotStuffer:
    """Incremental DATA encoder: ``feed`` content chunks, then ``finish`` for the tail and the end marker.

    ``long_lines`` becomes True when some line exceeds 998 octets; such lines are sent intact (breaking
    them would break DKIM signatures), leaving the decision to the receiver.
    """

    __slots__ = ("_at_line_start", "_canonical", "_empty", "_pending_cr", "_run", "long_lines")

    def __init__(self, *, canonical: bool = False) -> None:
        # canonical: the caller vouches that the content has CRLF line ends only (delivery.CanonicalBody);
        # then only dot-stuffing is done, and long lines are not looked for (the server refused lines over its
        # max_text_line on the way in; long_lines only feeds a log line).
        self._canonical = canonical
        self._pending_cr = False  # the last chunk ended in CR: it may pair with an LF in the next one
        self._at_line_start = True  # the next octet sent starts a line (data start counts as one)
        self._empty = True
        self._run = 0  # length of the unterminated line sent so far
        self.long_lines = False

    def feed(self, chunk: bytes) -> bytes:
        """Encode one chunk of content; may return b"" (a lone held-back CR)."""
        if self._pending_cr:
            chunk = b"\r" + chunk
            self._pending_cr = False
        if chunk.endswith(b"\r"):
            # Undecided until the next octet: CR LF split across chunks must stay one line end.
            chunk = chunk[:-1]
            self._pending_cr = True
        if not chunk:
            return b""
        self._empty = False
        if self._canonical:
            out = chunk
        else:
            out = canonicalize(chunk)
            if not self.long_lines:
                self._scan(out)
        if find(out, b"\r\n.") >= 0:  # bytes.replace would scan for it at a fifth of the speed
            out = out.replace(b"\r\n.", b"\r\n..")
        if self._at_line_start and out[0] == 0x2E:
            out = b"." + out
        self._at_line_start = out.endswith(b"\r\n")
        return out

    def finish(self) -> bytes:
        """The final line end if the content lacked one, and the end marker ``.CRLF``."""
        if self._pending_cr:
            self._pending_cr = False
            return b"\r\n" + _END  # a trailing bare CR is a line end like any other
        if self._empty or self._at_line_start:
            return _END
        return b"\r\n" + _END

    def _scan(self, out: bytes) -> None:
        # ``out`` is canonical: every CR starts a CRLF, so CR positions are line ends.
        first = find(out, b"\r")
        if first < 0:
            self._run += len(out)
            self.long_lines = self._run > MAX_LINE
            return
        last = rfind(out, b"\n")
        tail = len(out) - last - 1
        run, self._run = self._run, tail
        # Lines between the first and the last line end: too long when the LF lies _WINDOW or more octets on.
        if run + first > MAX_LINE or tail > MAX_LINE or lf_gap_at_least(out, first + 2, last, _WINDOW):
            self.long_lines = True


def encode_data(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """The DATA wire form of content given as chunks, ending with ``.CRLF``; empty pieces are skipped."""
    stuffer = DotStuffer()
    for chunk in chunks:
        out = stuffer.feed(chunk)
        if out:
            yield out
    yield stuffer.finish()


def _hex(m: re.Match[bytes]) -> bytes:
    return b"+%02X" % m.group(0)[0]


def xtext(value: bytes) -> str:
    """RFC 3461 4 xtext encoding; the result is printable ASCII without "=" or space."""
    return _XTEXT_SPECIAL.sub(_hex, value).decode("ascii")
