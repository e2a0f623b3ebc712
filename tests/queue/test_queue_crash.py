"""Crash consistency: kill a process that is accepting messages (at each crash point and with SIGKILL at
random moments); after a restart every acknowledged message is present, intact and not quarantined, and
no body file is left without its committed row."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mailhop.queue import SqliteQueue
from mailhop.queue.faults import CRASH_POINTS, SEGMENT_CRASH_POINTS

WORKER = Path(__file__).with_name("crash_worker.py")
Acked = dict[str, tuple[int, str]]


def run_worker(spool: Path, *, crash_at: str = "", kill_after: float | None = None, warmup: int = 0,
               segment_min: int = 0) -> Acked:
    env = {**os.environ, "MAILHOP_CRASH_AT": crash_at}
    cmd = [sys.executable, str(WORKER), str(spool), "--warmup", str(warmup), "--segment-min", str(segment_min)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        assert proc.stdout is not None
        ready = proc.stdout.readline()
        assert ready == b"READY\n", (ready, proc.stderr.read() if proc.stderr else b"")
        if kill_after is not None:
            time.sleep(kill_after)
            proc.send_signal(signal.SIGKILL)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    expected = -signal.SIGKILL if kill_after is not None else 137
    assert proc.returncode == expected, err.decode(errors="replace")
    acked: Acked = {}
    for line in out.decode().splitlines():
        qid, size, digest = line.split()
        acked[qid] = (int(size), digest)
    return acked


async def verify(spool: Path, acked: Acked) -> int:
    q = SqliteQueue(spool)
    await q.start(recover=True)
    try:
        messages = {m.id: m for m in await q.list()}
        assert not [m for m in messages.values() if m.held], "a committed message was quarantined"
        missing = set(acked) - set(messages)
        assert not missing, f"{len(missing)} acknowledged messages lost"
        for qid, (size, digest) in acked.items():
            f = await q.open_body(qid)
            with f:
                data = f.read()
            assert (len(data), hashlib.sha256(data).hexdigest()) == (size, digest), qid
            assert len(messages[qid].recipients) == 2
        files = {p.name for p in q.spool.scan_bodies()}
        file_backed = {m.id for m in messages.values() if m.size > q.inline_max}
        assert files == file_backed, "orphan or missing body files after recovery"
        in_segments = {m.id for m in messages.values() if 0 < m.size <= q.inline_max}
        if q.segments.names():  # recovery left only segments that committed messages use
            used = {ref.split(":")[1] for ref in await _segment_refs(spool)}
            assert set(q.segments.names()) == used, "unused segments after recovery"
            assert in_segments
        return len(messages)
    finally:
        await q.stop()


async def _segment_refs(spool: Path) -> list[str]:
    import sqlite3

    with sqlite3.connect(f"file:{spool / 'queue.db'}?mode=ro", uri=True) as conn:
        return [r[0] for r in conn.execute("SELECT body_path FROM messages WHERE body_path LIKE 'seg:%'")]


@pytest.mark.parametrize("segment_min", [0, 1000], ids=["database-bodies", "segment-bodies"])
def test_no_acknowledged_message_is_lost(tmp_path: Path, segment_min: int) -> None:
    spool = tmp_path / "spool"
    rng = random.Random()
    acked: Acked = {}
    points = CRASH_POINTS + (SEGMENT_CRASH_POINTS if segment_min else ())
    runs: list[dict[str, object]] = [{"crash_at": p, "warmup": 30, "segment_min": segment_min} for p in points]
    runs += [{"kill_after": rng.uniform(0.02, 0.4), "segment_min": segment_min} for _ in range(4)]
    started = time.monotonic()
    for run in runs:
        new = run_worker(spool, **run)  # type: ignore[arg-type]
        if "warmup" in run:
            assert len(new) >= 30, run
        acked.update(new)
        total = asyncio.run(verify(spool, acked))
        assert total >= len(acked)
    assert len(acked) > 100
    assert bool(asyncio.run(_segment_refs(spool))) == bool(segment_min)  # the storage form under test was used
    assert time.monotonic() - started < 60
