"""Property tests of the whole core: any input, split anywhere, gives the same replies and events."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailhop.smtp import DataChunk, Event

from .helpers import Harness, replies

PIECES = st.sampled_from(
    [b"EHLO a.test\r\n", b"HELO a.test\r\n", b"MAIL FROM:<a@b.test>\r\n", b"MAIL FROM:<>\r\n",
     b"RCPT TO:<c@d.test>\r\n", b"DATA\r\n", b"BDAT 3\r\n", b"BDAT 2 LAST\r\n", b"BDAT 0 LAST\r\n", b"RSET\r\n",
     b"NOOP\r\n", b"QUIT\r\n", b"STARTTLS\r\n", b"VRFY x\r\n", b"XYZZY\r\n", b"\r\n.\r\n", b".\r\n", b"\r\n",
     b"\n", b"\r", b".", b"\x00", b"x" * 300, b"abc", b"GET / HTTP/1.1\r\n", b"MAIL FROM:<a@b.test> SIZE=99999999999\r\n"]
)
STREAM = st.lists(PIECES | st.binary(max_size=20), max_size=40).map(b"".join)


def normalised(events: list[Event]) -> list[Event]:
    """Events with consecutive DataChunks merged: chunk boundaries may follow read boundaries."""
    out: list[Event] = []
    for event in events:
        if isinstance(event, DataChunk) and out and isinstance(out[-1], DataChunk):
            out[-1] = DataChunk(out[-1].data + event.data)
        else:
            out.append(event)
    return out


def run(pieces: list[bytes], eof: bool) -> tuple[bytes, list[Event], int]:
    h = Harness(max_command_line=64, max_text_line=20, max_message_size=50, max_recipients=3, max_errors=8)
    out = h.feed(*[p for p in pieces if p])
    if eof and h.closed is None:
        out += h.feed(b"")
    return out, normalised(h.events), h.conn.discarded_after_starttls


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(stream=STREAM, cuts=st.lists(st.integers(0, 2000), max_size=10), eof=st.booleans())
def test_split_invariance(stream: bytes, cuts: list[int], eof: bool) -> None:
    whole = run([stream], eof)
    points = sorted({c % (len(stream) + 1) for c in cuts})
    pieces = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
    assert run(pieces, eof) == whole
    replies(whole[0])  # well-formed: every reply line terminated, codes in place


@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(stream=STREAM)
def test_bytewise_equals_whole(stream: bytes) -> None:
    assert run([stream[i : i + 1] for i in range(len(stream))], True) == run([stream], True)
