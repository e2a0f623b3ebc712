"""Crash-test worker: accept messages forever, print ``<id> <size> <sha256>`` after each accept() returns.

Run by test_queue_crash.py as ``python crash_worker.py SPOOL [--warmup N]``. The crash point named by
MAILHOP_CRASH_AT is armed only after N messages have been acknowledged, so the crash happens with a
populated queue and accepts in flight. A line is written with one os.write (unbuffered, atomic on a pipe)
after accept() returned: every printed id was acknowledged, i.e. would have been a 250.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import random

from contract import make_envelope

from mailhop.queue import SqliteQueue, faults

SIZES = (0, 100, 3000, 5000, 20000, 140 * 1024, 400 * 1024)  # inline and file-backed


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("spool")
    parser.add_argument("--warmup", type=int, default=0)
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--segment-min", type=int, default=0)
    args = parser.parse_args()
    armed, faults.CRASH_AT = faults.CRASH_AT, ""
    q = SqliteQueue(args.spool, segment_min=args.segment_min)
    await q.start()
    os.write(1, b"READY\n")
    acked = 0

    async def session(n: int) -> None:
        nonlocal acked
        rng = random.Random(n)
        while True:
            body = os.urandom(rng.choice(SIZES))
            writer = q.body_writer()
            for i in range(0, len(body), 65536):
                writer.write(body[i:i + 65536])
            qid = await q.accept(make_envelope(rcpts=(f"r{n}@x{n}.example", "other@y.example")), writer)
            os.write(1, f"{qid} {len(body)} {hashlib.sha256(body).hexdigest()}\n".encode())
            acked += 1
            if acked == args.warmup:
                faults.CRASH_AT = armed

    await asyncio.gather(*(session(n) for n in range(args.tasks)))


if __name__ == "__main__":
    asyncio.run(main())
