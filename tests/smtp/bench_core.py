"""Microbenchmark: 20,000 pipelined 5 KB messages through the sans-IO core (not collected by pytest).

Run: .venv/bin/python tests/smtp/bench_core.py [messages]
"""

from __future__ import annotations

import sys
import time

from mailhop.reply import R, Reply
from mailhop.smtp import (
    NEED_DATA,
    BdatChunkEnd,
    ConnectionClosed,
    DataChunk,
    DataEnd,
    DataStart,
    Ehlo,
    Mail,
    Quit,
    Rcpt,
    ServerConnection,
    ServerSettings,
)

READ_SIZE = 65536
QUEUED = Reply(250, "2.0.0", "Queued")


def body() -> bytes:
    # 5 KB of 78-octet lines, no line starting with "." (so DATA and BDAT carry identical octets).
    line = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tem\r\n"
    text = b"From: a@example.test\r\nTo: b@example.net\r\nSubject: bench\r\n\r\n" + line * 70
    return text[: 5 * 1024 - 2] + b"\r\n"


def wire(count: int, bdat: bool, distinct: bool = True) -> bytes:
    """EHLO, ``count`` transactions, QUIT. ``distinct``: new addresses each time (no path-cache hits)."""
    msg = body()
    content = b"BDAT %d LAST\r\n" % len(msg) + msg if bdat else b"DATA\r\n" + msg + b".\r\n"
    parts = [b"EHLO client.example.test\r\n"]
    for i in range(count):
        n = i if distinct else 0
        parts.append(b"MAIL FROM:<sender%d@example.test> SIZE=5120\r\nRCPT TO:<rcpt%d@example.net>\r\n" % (n, n))
        parts.append(content)
    parts.append(b"QUIT\r\n")
    return b"".join(parts)


def run(data: bytes) -> tuple[int, int, float]:
    conn = ServerConnection(ServerSettings("mx.example.test"))
    conn.send_greeting(Reply(220, "", "mx.example.test ESMTP"))
    messages = octets = 0
    out = 0
    start = time.perf_counter()
    for i in range(0, len(data) + 1, READ_SIZE):
        conn.receive_data(data[i : i + READ_SIZE])
        while True:
            event = conn.next_event()
            if event is NEED_DATA:
                break
            kind = type(event)
            if kind is DataChunk:
                assert isinstance(event, DataChunk)
                octets += len(event.data)
            elif kind is Mail:
                conn.send(R.SENDER_OK)
            elif kind is Rcpt:
                conn.send(R.RCPT_OK)
            elif kind is DataStart:
                conn.accept_data()
            elif kind is DataEnd:
                messages += 1
                conn.send(QUEUED)
            elif kind is BdatChunkEnd:
                conn.send(R.OK)
            elif kind is Ehlo:
                conn.send(conn.ehlo_reply())
            elif kind is Quit:
                conn.send(R.BYE)
            elif kind is ConnectionClosed:
                break
        out += len(conn.data_to_send())
    return messages, octets, time.perf_counter() - start


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 20_000
    for name, bdat, distinct in (("DATA", False, True), ("BDAT", True, True), ("DATA, repeated addresses", False, False)):
        data = wire(count, bdat, distinct)
        best = min(run(data)[2] for _ in range(5))
        messages, octets, _ = run(data)
        assert messages == count and octets == count * len(body()), (messages, octets)
        print(f"{name}: {count} x {octets // count} B pipelined messages in {best:.3f} s = "
              f"{count / best:,.0f} messages/s ({len(data) / best / 1e6:,.0f} MB/s)")


if __name__ == "__main__":
    main()
