"""Body segments (segments.py): where bodies go, reading them back, freeing and moving them, recovery after a
crash or damage. Real files and a real SQLite spool; only the clock is stepped."""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import pytest
from contract import FakeClock, make_envelope, queue_message, read_all

from mailhop.errors import QueueError
from mailhop.queue import SqliteQueue
from mailhop.queue.model import mark_delivered
from mailhop.queue.segments import SegmentStore, is_segment_ref
from mailhop.queue.spool import BodyWriter

pytestmark = pytest.mark.anyio

KB = 1024
BIG = b"Subject: big\r\n\r\n" + b"x" * (40 * KB) + b"\r\n"


def body_paths(spool: Path) -> dict[str, str | None]:
    with sqlite3.connect(f"file:{spool / 'queue.db'}?mode=ro", uri=True) as conn:
        return dict(conn.execute("SELECT id, body_path FROM messages").fetchall())


def held(spool: Path) -> dict[str, str]:
    with sqlite3.connect(f"file:{spool / 'queue.db'}?mode=ro", uri=True) as conn:
        return dict(conn.execute("SELECT id, hold_reason FROM messages WHERE held = 1").fetchall())


@pytest.fixture
async def make_queue(tmp_path: Path, clock: FakeClock) -> AsyncIterator[Callable[..., SqliteQueue]]:
    """Opened queues on tmp_path/spool with segments on for bodies of 32 KB and up, stopped afterwards."""
    opened: list[SqliteQueue] = []

    def make(**options: object) -> SqliteQueue:
        settings: dict[str, object] = {"clock": clock, "segment_min": 32 * KB, "reclaim_interval": 3600.0}
        settings.update(options)
        q = SqliteQueue(tmp_path / "spool", **settings)  # type: ignore[arg-type]
        opened.append(q)
        return q

    yield make
    for q in opened:
        await q.stop()


async def test_only_large_bodies_go_to_segments_and_read_back(make_queue: Callable[..., SqliteQueue],
                                                              tmp_path: Path) -> None:
    q = make_queue()
    await q.start()
    small = await queue_message(q, b"Subject: s\r\n\r\nsmall\r\n")
    big = await queue_message(q, BIG)
    paths = body_paths(tmp_path / "spool")
    assert paths[small] is None  # in the database
    assert is_segment_ref(paths[big]) and str(paths[big]).endswith(f":{len(BIG)}")
    assert await read_all(q, big) == BIG and await read_all(q, small) == b"Subject: s\r\n\r\nsmall\r\n"
    assert q.segments.names() == [q.segments.current]


async def test_one_batch_shares_one_segment_write(make_queue: Callable[..., SqliteQueue], tmp_path: Path) -> None:
    q = make_queue()
    await q.start()
    bodies = [BIG + bytes([65 + n]) * n for n in range(6)]
    ids = await asyncio.gather(*(queue_message(q, b) for b in bodies))
    refs = body_paths(tmp_path / "spool")
    offsets = sorted(int(str(refs[i]).split(":")[2]) for i in ids)
    assert offsets[0] == 0 and all(is_segment_ref(refs[i]) for i in ids)
    for qid, body in zip(ids, bodies, strict=True):
        assert await read_all(q, qid) == body


async def test_a_full_segment_rotates_and_an_unused_one_is_freed(make_queue: Callable[..., SqliteQueue],
                                                                  tmp_path: Path, clock: FakeClock) -> None:
    q = make_queue(segment_size=64 * KB)  # two bodies fill one
    await q.start()
    first = [await queue_message(q, BIG) for _ in range(2)]
    third = await queue_message(q, BIG)
    assert len(q.segments.names()) == 2
    for qid in first:
        m = await q.get(qid)
        assert m is not None
        assert await q.record(qid, [mark_delivered(m.recipients[0], "250 ok", now=clock.now)]) is True
    assert await q.reclaim_segments() == 0
    assert q.segments.names() == [q.segments.current]  # the first one held only delivered messages
    assert await read_all(q, third) == BIG
    assert await q.delete(third) is True  # the current segment stays, though empty now
    await q.reclaim_segments()
    assert q.segments.names() == [q.segments.current]


async def test_bodies_still_queued_in_an_old_segment_move_into_the_database(
        make_queue: Callable[..., SqliteQueue], tmp_path: Path, clock: FakeClock) -> None:
    q = make_queue(segment_size=64 * KB, segment_max_age=600.0)
    await q.start()
    old = [await queue_message(q, BIG + bytes([n])) for n in range(2)]
    newer = await queue_message(q, BIG)  # a second segment, the current one
    clock.advance(599)
    assert await q.reclaim_segments() == 0  # not old enough yet
    assert len(q.segments.names()) == 2
    clock.advance(1)
    assert await q.reclaim_segments() == 2
    paths = body_paths(tmp_path / "spool")
    assert paths[old[0]] is None and paths[old[1]] is None and is_segment_ref(paths[newer])
    assert q.segments.names() == [q.segments.current]
    assert [await read_all(q, qid) for qid in old] == [BIG + b"\x00", BIG + b"\x01"]
    clock.advance(600)
    assert await q.reclaim_segments() == 0  # the current segment is never moved, whatever its age


async def test_recovery_removes_unused_segments_and_quarantines_damaged_bodies(
        make_queue: Callable[..., SqliteQueue], tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    q = make_queue(segment_size=64 * KB)
    await q.start()
    kept = await queue_message(q, BIG)
    cut = await queue_message(q, BIG)  # the same segment, after kept
    lost = await queue_message(q, BIG)  # the next segment
    await q.stop()
    names = SegmentStore(spool).names()
    assert len(names) == 2
    stray = spool / "segments" / "0000000099"
    stray.write_bytes(b"bodies of a batch that never committed")
    os.truncate(spool / "segments" / names[0], len(BIG) + 10)  # damage: the second body loses its tail
    os.unlink(spool / "segments" / names[1])
    again = make_queue(segment_size=64 * KB)
    await again.start()
    assert not stray.exists()
    reasons = held(spool)
    assert set(reasons) == {cut, lost}
    assert "the body ends at" in reasons[cut] and "missing" in reasons[lost]
    assert await read_all(again, kept) == BIG
    with pytest.raises(QueueError):
        await read_all(again, lost)


async def test_a_crash_between_segment_sync_and_commit_leaves_no_row(tmp_path: Path, clock: FakeClock) -> None:
    """The writer fails after the segment write (as a crash there would stop it): the client gets an error, no
    row names the bytes, and the next start removes the segment."""
    spool = tmp_path / "spool"
    q = SqliteQueue(spool, clock=clock, segment_min=32 * KB)
    await q.start()
    original = q.segments.append

    def append_then_fail(bodies: Sequence[bytes | bytearray | memoryview]) -> list[str]:
        original(bodies)
        raise QueueError("simulated crash after the segment sync")

    q.segments.append = append_then_fail  # type: ignore[method-assign]
    with pytest.raises(QueueError):
        await queue_message(q, BIG)
    await q.stop()
    assert body_paths(spool) == {}
    assert len(SegmentStore(spool).names()) == 1
    again = SqliteQueue(spool, clock=clock, segment_min=32 * KB)
    await again.start()
    try:
        assert again.segments.names() == []
        qid = await queue_message(again, BIG)
        assert await read_all(again, qid) == BIG
    finally:
        await again.stop()


def test_references_from_the_database_are_parsed_strictly(tmp_path: Path) -> None:
    store = SegmentStore(tmp_path)
    for bad in ("seg:../../etc:0:10", "seg:0000000001:-1:5", "seg:0000000001:0", "bodies/AB/ID", "seg:1:0:1"):
        with pytest.raises(QueueError, match="malformed"):
            store.read(bad)
        assert "malformed" in store.check(bad, 10)
    assert store.check("seg:0000000001:0:5", 6) == "segment body of 5 bytes, expected 6"  # before any file access
    assert store.check("seg:0000000001:0:5", 5) == "segment 0000000001 missing"
    assert not is_segment_ref(None) and not is_segment_ref("bodies/AB/X") and is_segment_ref("seg:0000000001:0:1")


async def test_segment_bodies_go_to_delivery_without_a_read(make_queue: Callable[..., SqliteQueue]) -> None:
    q = make_queue()
    seen: list[bytes | None] = []
    q.on_accepted = lambda message, body, canonical: seen.append(body)
    await q.start()
    await q.accept(make_envelope(), _writer(q, BIG))
    assert seen == [BIG]


def _writer(q: SqliteQueue, data: bytes) -> BodyWriter:
    w = q.body_writer()
    w.write(data)
    return w


async def test_freeing_a_segment_after_a_lazily_synced_record_syncs_first(
        make_queue: Callable[..., SqliteQueue], clock: FakeClock) -> None:
    """A delivery record commits without an fsync; the segment it freed may go only once that record is durable,
    even when the reclaim transaction itself writes nothing (and so would sync nothing)."""
    q = make_queue(segment_size=64 * KB)
    await q.start()
    committer = q._committer
    assert committer is not None
    committer._sync_delay = 3600.0  # no idle sync: only the one before the unlink can make the record durable
    first = [await queue_message(q, BIG) for _ in range(2)]
    await queue_message(q, BIG)  # the next segment: the first is no longer current
    for qid in first:
        m = await q.get(qid)
        assert m is not None
        await q.record(qid, [mark_delivered(m.recipients[0], "250 ok", now=clock.now)])
    syncs = committer.lazy_syncs
    assert await q.reclaim_segments() == 0
    assert committer.lazy_syncs == syncs + 1
    assert q.segments.names() == [q.segments.current]


async def test_a_damaged_segment_neither_blocks_the_others_nor_lends_its_name(
        make_queue: Callable[..., SqliteQueue], tmp_path: Path, clock: FakeClock) -> None:
    spool = tmp_path / "spool"
    q = make_queue(segment_size=64 * KB, segment_max_age=60.0)
    await q.start()
    damaged = [await queue_message(q, BIG) for _ in range(2)]  # segment 1
    await q.stop()
    os.unlink(spool / "segments" / "0000000001")  # lost: recovery quarantines both, keeping their references
    again = make_queue(segment_size=64 * KB, segment_max_age=60.0)
    await again.start()
    assert set(held(spool)) == set(damaged)
    fresh = [await queue_message(again, BIG) for _ in range(3)]  # segments 2 and 3, never a new "1"
    paths = body_paths(spool)
    assert all(str(paths[qid]).split(":")[1] > "0000000001" for qid in fresh)
    clock.advance(61)
    assert await again.reclaim_segments() == 2  # segment 2's bodies move, despite the damaged references
    assert [await read_all(again, qid) for qid in fresh] == [BIG] * 3
    with pytest.raises(QueueError):
        await read_all(again, damaged[0])
