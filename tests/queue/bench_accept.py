"""Microbenchmark: accepted messages/s for 5 KB bodies from 20 concurrent accepting tasks.

    .venv/bin/python tests/queue/bench_accept.py [--seconds 5] [--tasks 20] [--size 5120] [--uvloop]
        [--spool DIR]   (default: a temporary directory under $TMPDIR; put it on the disk you care about)

Prints messages/s, commits (= WAL fsyncs) per message and body-file fsyncs per message.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path

from contract import make_envelope

from mailhop.queue import SqliteQueue


async def bench(spool: Path, seconds: float, tasks: int, size: int) -> None:
    q = SqliteQueue(spool)
    await q.start()
    env = make_envelope(rcpts=("bob@example.com", "carol@example.net"))
    body = (b"X" * 76 + b"\r\n") * (size // 78) + b"Y" * (size % 78)
    latencies: list[float] = []
    deadline = 0.0

    async def session() -> None:
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            writer = q.body_writer()
            for i in range(0, len(body), 1024):  # as a session would: a chunk per read
                writer.write(body[i:i + 1024])
            await q.accept(env, writer)
            latencies.append(time.perf_counter() - t0)

    deadline = time.perf_counter() + 0.5  # warm-up
    await asyncio.gather(*(session() for _ in range(tasks)))
    latencies.clear()
    before = q.counters()
    cpu0, t0 = time.process_time(), time.perf_counter()
    deadline = t0 + seconds
    await asyncio.gather(*(session() for _ in range(tasks)))
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    after = q.counters()
    await q.stop()
    n = after["accepted"] - before["accepted"]
    batches = after["batches"] - before["batches"]
    latencies.sort()
    print(f"{n} messages of {size} bytes in {elapsed:.2f}s from {tasks} tasks: {n / elapsed:,.0f} msg/s")
    print(f"commits (WAL fsyncs) per message: {batches / n:.3f}  (mean batch {n / batches:.1f} messages)")
    print(f"body-file fsyncs per message: {(after['body_fsyncs'] - before['body_fsyncs']) / n:.3f}")
    print(f"accept latency p50 {latencies[len(latencies) // 2] * 1e3:.2f} ms, "
          f"p99 {latencies[int(len(latencies) * 0.99)] * 1e3:.2f} ms; CPU {cpu / n * 1e6:.0f} µs/message")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--tasks", type=int, default=20)
    p.add_argument("--size", type=int, default=5 * 1024)
    p.add_argument("--spool", type=Path)
    p.add_argument("--uvloop", action="store_true")
    args = p.parse_args()
    if args.uvloop:
        import uvloop

        uvloop.install()
    if args.spool:
        asyncio.run(bench(args.spool, args.seconds, args.tasks, args.size))
        return
    with tempfile.TemporaryDirectory(prefix="mailhop-bench-", dir=os.environ.get("TMPDIR")) as d:
        asyncio.run(bench(Path(d) / "spool", args.seconds, args.tasks, args.size))


if __name__ == "__main__":
    main()
