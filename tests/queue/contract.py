"""The queue backend contract: tests every ``QueueBackend`` must pass.

A backend's test module imports these (``from contract import *``) and provides three fixtures:

``backend``  a started backend whose clock is the ``clock`` fixture (``conftest.FakeClock``), stopped after
``reopen``   ``async reopen(old) -> new``: stop ``old`` and start a new backend on the same storage
``clock``    a ``FakeClock`` (conftest provides it)

Helpers (``make_envelope``, ``queue_message``, ``read_all``) are importable for other queue tests.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from mailhop.address import parse_path
from mailhop.envelope import Envelope, MailParams, RcptParams, Recipient
from mailhop.errors import QueueError
from mailhop.queue import (
    QueueBackend,
    RcptStatus,
    is_queue_id,
    mark_deferred,
    mark_delivered,
    mark_failed,
)

__all__ = [
    "FakeClock",
    "make_envelope",
    "queue_message",
    "read_all",
    "test_aborted_or_reused_writer_is_refused",
    "test_accept_many_concurrently_shares_commits",
    "test_accept_then_get_returns_every_field",
    "test_accept_with_null_sender_and_postmaster",
    "test_cancelled_accept_does_not_break_the_queue",
    "test_delete",
    "test_due_and_next_due",
    "test_envelope_without_recipients_is_refused",
    "test_flush_makes_deferred_due_now",
    "test_hold_and_release",
    "test_ids_unique_sortable_and_returned",
    "test_list_filters",
    "test_missing_ids",
    "test_open_body_exact_bytes",
    "test_persists_across_restart",
    "test_record_completes_and_removes_message",
    "test_record_enqueues_notices_atomically",
    "test_record_on_deleted_message_does_nothing",
    "test_stats",
    "test_update_recipients_never_leaves_final_state",
]

KB = 1024
MB = 1024 * KB
Reopen = Callable[[Any], Awaitable[Any]]


class FakeClock:
    """A clock the test moves by hand; inject it as ``clock=`` into a backend."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_envelope(
    sender: str | None = "alice@example.org",
    rcpts: tuple[str, ...] = ("bob@example.com",),
    *,
    params: MailParams | None = None,
    rcpt_params: tuple[RcptParams, ...] | None = None,
    helo: str = "client.example.org",
    client_ip: str = "192.0.2.10",
    client_port: int = 40000,
    authenticated: str | None = None,
    tls: bool = False,
) -> Envelope:
    utf8 = bool(params and params.smtputf8)
    mailbox = parse_path(f"<{sender}>", smtputf8=utf8) if sender else None
    recipients = []
    for i, r in enumerate(rcpts):
        mb = parse_path(f"<{r}>", smtputf8=utf8)
        assert mb is not None
        recipients.append(Recipient(mb, rcpt_params[i] if rcpt_params else RcptParams()))
    return Envelope(mailbox, params or MailParams(), tuple(recipients), helo=helo, client_ip=client_ip,
                    client_port=client_port, authenticated=authenticated, tls=tls)


async def queue_message(backend: QueueBackend, body: bytes = b"Subject: hi\r\n\r\nhello\r\n",
                        envelope: Envelope | None = None, chunk: int = 64 * KB) -> str:
    writer = backend.body_writer()
    for i in range(0, len(body), chunk):
        writer.write(body[i:i + chunk])
    return await backend.accept(envelope or make_envelope(), writer)


async def read_all(backend: QueueBackend, queue_id: str) -> bytes:
    f = await backend.open_body(queue_id)
    with f:
        return f.read()


@pytest.mark.anyio
async def test_accept_then_get_returns_every_field(backend: QueueBackend, clock: Any) -> None:
    params = MailParams(size=1234, body="8BITMIME", smtputf8=True, ret="HDRS", envid="env-1",
                        requiretls=True)
    rparams = (
        RcptParams(notify=("SUCCESS", "FAILURE"), orcpt="rfc822;bob@example.com"),
        RcptParams(notify=("NEVER",)),
        RcptParams(),
    )
    env = make_envelope("älice@example.org", ("bob@example.com", "Carol@Sub.Example.NET", "dave@bücher.test"),
                        params=params, rcpt_params=rparams, helo="mx.client.test", client_ip="2001:db8::1",
                        client_port=2525, authenticated="alice", tls=True)
    body = b"Subject: x\r\n\r\n" + bytes(range(256)) * 4 + b"\r\n"
    writer = backend.body_writer()
    assert is_queue_id(writer.queue_id)
    writer.write(body)
    qid = await backend.accept(env, writer)
    assert qid == writer.queue_id

    m = await backend.get(qid)
    assert m is not None
    assert m.id == qid
    assert m.sender == "älice@example.org"
    assert m.params == params
    assert m.received_at == clock.now
    assert m.size == len(body)
    assert (m.held, m.hold_reason) == (False, "")
    assert (m.client_ip, m.helo, m.client_port, m.authenticated, m.tls) == ("2001:db8::1", "mx.client.test",
                                                                             2525, "alice", True)
    assert [r.idx for r in m.recipients] == [0, 1, 2]
    assert [r.address for r in m.recipients] == [str(r.mailbox) for r in env.recipients]
    assert [r.domain for r in m.recipients] == ["example.com", "sub.example.net", "xn--bcher-kva.test"]
    assert [r.notify for r in m.recipients] == [("SUCCESS", "FAILURE"), ("NEVER",), ()]
    assert [r.orcpt for r in m.recipients] == ["rfc822;bob@example.com", None, None]
    for r in m.recipients:
        assert r.status is RcptStatus.PENDING
        assert (r.attempts, r.last_reply) == (0, "")
        assert r.next_attempt == r.updated == clock.now
    assert await read_all(backend, qid) == body


@pytest.mark.anyio
async def test_accept_with_null_sender_and_postmaster(backend: QueueBackend) -> None:
    qid = await queue_message(backend, envelope=make_envelope(None, ("postmaster",)))
    m = await backend.get(qid)
    assert m is not None
    assert m.sender == ""
    assert m.params == MailParams()
    assert (m.authenticated, m.tls) == (None, False)
    assert [(r.address, r.domain) for r in m.recipients] == [("postmaster", "")]


@pytest.mark.anyio
async def test_ids_unique_sortable_and_returned(backend: QueueBackend) -> None:
    writers = []
    for _ in range(100):
        writers.append(backend.body_writer())
    ids = [w.queue_id for w in writers]
    assert len(set(ids)) == 100
    assert ids == sorted(ids)
    assert all(is_queue_id(i) and len(i) == 16 for i in ids)
    for w in writers[:3]:
        w.write(b"x\r\n")
    got = [await backend.accept(make_envelope(), w) for w in writers[:3]]
    assert got == ids[:3]
    for w in writers[3:]:
        w.abort()


@pytest.mark.anyio
async def test_missing_ids(backend: QueueBackend) -> None:
    for qid in ("0" * 16, "no-such-id", ""):
        assert await backend.get(qid) is None
        assert await backend.delete(qid) is False
        assert await backend.hold(qid) is False
        assert await backend.release(qid) is False
        with pytest.raises(KeyError):
            await backend.open_body(qid)


@pytest.mark.anyio
async def test_list_filters(backend: QueueBackend, clock: Any) -> None:
    a = await queue_message(backend, envelope=make_envelope(rcpts=("x@a.example",)))
    clock.advance(1)
    b = await queue_message(backend, envelope=make_envelope(rcpts=("x@b.example", "y@a.example")))
    clock.advance(1)
    c = await queue_message(backend, envelope=make_envelope(rcpts=("z@c.example",)))
    assert [m.id for m in await backend.list()] == [a, b, c]
    assert [m.id for m in await backend.list(domain="a.example")] == [a, b]
    assert [m.id for m in await backend.list(domain="A.Example")] == [a, b]
    assert [m.id for m in await backend.list(domain="nowhere.example")] == []
    assert [m.id for m in await backend.list(limit=2)] == [a, b]
    assert [m.id for m in await backend.list(limit=0)] == []
    listed_b = (await backend.list(domain="b.example"))[0]
    assert [r.address for r in listed_b.recipients] == ["x@b.example", "y@a.example"]
    assert listed_b == await backend.get(b)

    m = await backend.get(b)
    assert m is not None
    deferred = mark_deferred(m.recipients[1], "451 4.4.1 try later", clock.now + 600, now=clock.now)
    assert await backend.update_recipients(b, [deferred]) == 1
    assert [m.id for m in await backend.list(status=RcptStatus.DEFERRED)] == [b]
    assert [m.id for m in await backend.list(status=RcptStatus.PENDING)] == [a, b, c]
    # domain and status must match the same recipient
    assert [m.id for m in await backend.list(domain="a.example", status=RcptStatus.DEFERRED)] == [b]
    assert [m.id for m in await backend.list(domain="b.example", status=RcptStatus.DEFERRED)] == []

    assert await backend.hold(c, "spam check")
    assert [m.id for m in await backend.list(held=True)] == [c]
    assert [m.id for m in await backend.list(held=False)] == [a, b]
    assert [m.id for m in await backend.list(held=False, domain="a.example", limit=1)] == [a]


@pytest.mark.anyio
async def test_delete(backend: QueueBackend) -> None:
    small = await queue_message(backend)
    big = await queue_message(backend, b"y" * (300 * KB))
    keep = await queue_message(backend)
    assert await backend.delete(small) is True
    assert await backend.delete(big) is True
    assert await backend.delete(big) is False
    assert await backend.get(small) is None
    assert await backend.get(big) is None
    for qid in (small, big):
        with pytest.raises(KeyError):
            await backend.open_body(qid)
    assert [m.id for m in await backend.list()] == [keep]
    stats = await backend.stats()
    assert (stats["messages"], stats["pending"]) == (1, 1)


@pytest.mark.anyio
async def test_hold_and_release(backend: QueueBackend) -> None:
    qid = await queue_message(backend)
    assert await backend.release(qid) is False  # not held
    assert await backend.hold(qid, "admin: suspicious") is True
    assert await backend.hold(qid, "second reason") is True  # still held, first reason kept
    m = await backend.get(qid)
    assert m is not None
    assert (m.held, m.hold_reason) == (True, "admin: suspicious")
    assert await backend.release(qid) is True
    assert await backend.release(qid) is False
    m = await backend.get(qid)
    assert m is not None
    assert (m.held, m.hold_reason) == (False, "")
    assert await backend.hold(qid) is True
    m = await backend.get(qid)
    assert m is not None and m.hold_reason == "admin"


@pytest.mark.anyio
async def test_accept_held_for_quarantine(backend: QueueBackend) -> None:
    env = dataclasses.replace(make_envelope(), hold_reason="quarantine: rspamd: score 9.1")
    qid = await queue_message(backend, envelope=env)
    m = await backend.get(qid)
    assert m is not None and (m.held, m.hold_reason) == (True, "quarantine: rspamd: score 9.1")
    assert qid not in [d.id for d in await backend.due(limit=10)]
    assert await backend.next_due() is None
    assert [h.id for h in await backend.list(held=True)] == [qid]
    assert await backend.release(qid) is True
    assert qid in [d.id for d in await backend.due(limit=10)]


@pytest.mark.anyio
async def test_flush_makes_deferred_due_now(backend: QueueBackend, clock: Any) -> None:
    assert await backend.flush() == 0
    qid = await queue_message(backend, envelope=make_envelope(rcpts=("a@x.example", "b@x.example",
                                                                      "c@x.example")))
    m = await backend.get(qid)
    assert m is not None
    r0, r1, r2 = m.recipients
    clock.advance(10)
    changed = [
        mark_deferred(r0, "421 busy", clock.now + 3600, now=clock.now),
        mark_deferred(r1, "450 greylisted", clock.now + 900, now=clock.now),
        mark_delivered(r2, "250 ok", now=clock.now),
    ]
    assert await backend.update_recipients(qid, changed) == 3
    clock.advance(5)
    assert await backend.flush() == 2
    m = await backend.get(qid)
    assert m is not None
    assert [r.status for r in m.recipients] == [RcptStatus.DEFERRED, RcptStatus.DEFERRED, RcptStatus.DELIVERED]
    assert [r.next_attempt for r in m.recipients[:2]] == [clock.now, clock.now]
    assert [r.attempts for r in m.recipients] == [1, 1, 1]
    assert m.recipients[1].last_reply == "450 greylisted"


@pytest.mark.anyio
async def test_update_recipients_never_leaves_final_state(backend: QueueBackend, clock: Any) -> None:
    qid = await queue_message(backend, envelope=make_envelope(rcpts=("a@x.example", "b@x.example")))
    m = await backend.get(qid)
    assert m is not None
    failed = mark_failed(m.recipients[0], "550 no such user", now=clock.now)
    assert await backend.update_recipients(qid, [failed]) == 1
    # a stale writer that still thinks the recipient is pending cannot resurrect it
    stale = mark_deferred(m.recipients[0], "421 later", clock.now + 60, now=clock.now)
    assert await backend.update_recipients(qid, [stale]) == 0
    m2 = await backend.get(qid)
    assert m2 is not None
    assert [r.status for r in m2.recipients] == [RcptStatus.FAILED, RcptStatus.PENDING]
    assert m2.recipients[0].last_reply == "550 no such user"
    assert await backend.update_recipients("0" * 16, [failed]) == 0


@pytest.mark.anyio
async def test_open_body_exact_bytes(backend: QueueBackend) -> None:
    bodies = {
        "empty": b"",
        "inline": b"Subject: t\r\n\r\n" + bytes(range(256)) * 100,  # 25 KB
        "file": bytes(range(256)) * 1200,  # 300 KB: larger than the default inline limit
    }
    ids = {name: await queue_message(backend, body, chunk=4000) for name, body in bodies.items()}
    for name, body in bodies.items():
        assert await read_all(backend, ids[name]) == body, name
        m = await backend.get(ids[name])
        assert m is not None and m.size == len(body)

    # a multi-MB body streamed in 64 KB writes, read back in chunks
    chunk = hashlib.sha256(b"seed").digest() * 2048  # 64 KB
    writer = backend.body_writer()
    expected = hashlib.sha256()
    for i in range(80):  # 5 MB
        piece = bytes([i]) + chunk[1:]
        writer.write(piece)
        expected.update(piece)
    qid = await backend.accept(make_envelope(), writer)
    got = hashlib.sha256()
    f = await backend.open_body(qid)
    with f:
        while data := f.read(1 * MB):
            got.update(data)
    assert got.hexdigest() == expected.hexdigest()
    m = await backend.get(qid)
    assert m is not None and m.size == 80 * 64 * KB


@pytest.mark.anyio
async def test_accept_many_concurrently_shares_commits(backend: QueueBackend) -> None:
    before = backend.counters()
    bodies = [f"Subject: {i}\r\n\r\n".encode() + b"z" * (5 * KB) for i in range(200)]
    ids = await asyncio.gather(*(queue_message(backend, b) for b in bodies))
    assert len(set(ids)) == 200
    after = backend.counters()
    assert after["accepted"] - before["accepted"] == 200
    batches = after["batches"] - before["batches"]
    assert 1 <= batches < 200, "concurrent accepts must share commits"
    assert len(await backend.list()) == 200
    for i in (0, 99, 199):
        assert await read_all(backend, ids[i]) == bodies[i]


@pytest.mark.anyio
async def test_stats(backend: QueueBackend, clock: Any) -> None:
    assert await backend.stats() == {"messages": 0, "held": 0, "pending": 0, "deferred": 0, "delivered": 0,
                                     "failed": 0}
    a = await queue_message(backend, envelope=make_envelope(rcpts=("a@x.example", "b@x.example")))
    await queue_message(backend)
    m = await backend.get(a)
    assert m is not None
    await backend.update_recipients(a, [mark_delivered(m.recipients[0], "250 ok", now=clock.now)])
    await backend.hold(a)
    assert await backend.stats() == {"messages": 2, "held": 1, "pending": 2, "deferred": 0, "delivered": 1,
                                     "failed": 0}


@pytest.mark.anyio
async def test_aborted_or_reused_writer_is_refused(backend: QueueBackend) -> None:
    w = backend.body_writer()
    w.write(b"x" * (300 * KB))
    w.abort()
    w.abort()  # idempotent
    with pytest.raises(QueueError):
        w.write(b"more")
    with pytest.raises(QueueError):
        await backend.accept(make_envelope(), w)
    w2 = backend.body_writer()
    w2.write(b"hello\r\n")
    await backend.accept(make_envelope(), w2)
    with pytest.raises(QueueError):
        await backend.accept(make_envelope(), w2)
    assert (await backend.stats())["messages"] == 1


@pytest.mark.anyio
async def test_envelope_without_recipients_is_refused(backend: QueueBackend) -> None:
    w = backend.body_writer()
    w.write(b"x\r\n")
    with pytest.raises(ValueError):
        await backend.accept(make_envelope(rcpts=()), w)
    assert (await backend.stats())["messages"] == 0


@pytest.mark.anyio
async def test_cancelled_accept_does_not_break_the_queue(backend: QueueBackend) -> None:
    tasks = [asyncio.ensure_future(queue_message(backend, b"b" * size)) for size in (100, 300 * KB, 200)]
    await asyncio.sleep(0)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    # cancelled accepts may or may not have been committed (at-least-once); the queue keeps working
    qid = await queue_message(backend, b"after\r\n")
    assert await read_all(backend, qid) == b"after\r\n"
    for m in await backend.list():
        body = await read_all(backend, m.id)
        assert len(body) == m.size


@pytest.mark.anyio
async def test_persists_across_restart(backend: QueueBackend, reopen: Reopen) -> None:
    small = await queue_message(backend, b"small\r\n")
    big = await queue_message(backend, b"B" * (1 * MB + 7))
    await backend.hold(small, "kept")
    backend2 = await reopen(backend)
    m = await backend2.get(small)
    assert m is not None and (m.held, m.hold_reason) == (True, "kept")
    assert await read_all(backend2, small) == b"small\r\n"
    assert await read_all(backend2, big) == b"B" * (1 * MB + 7)
    assert [m.id for m in await backend2.list()] == [small, big]


@pytest.mark.anyio
async def test_due_and_next_due(backend: QueueBackend, clock: Any) -> None:
    assert await backend.due() == [] and await backend.next_due() is None
    a = await queue_message(backend)
    clock.advance(1)
    b = await queue_message(backend)
    c = await queue_message(backend)
    await backend.hold(c)
    assert [m.id for m in await backend.due()] == [a, b]
    assert [m.id for m in await backend.due(exclude={a})] == [b]
    assert [m.id for m in await backend.due(limit=1)] == [a]
    m = await backend.get(a)
    assert m is not None
    await backend.update_recipients(a, [mark_deferred(m.recipients[0], "451 later", clock.now + 600, now=clock.now)])
    assert [x.id for x in await backend.due()] == [b]
    due_at = await backend.next_due()
    assert due_at is not None and due_at <= clock.now  # b is due now
    mb = await backend.get(b)
    assert mb is not None
    await backend.record(b, [mark_delivered(mb.recipients[0], "250 ok", now=clock.now)])
    assert await backend.next_due() == clock.now + 600  # only a's deferred recipient (c is held)
    clock.advance(601)
    assert [x.id for x in await backend.due()] == [a]


@pytest.mark.anyio
async def test_record_completes_and_removes_message(backend: QueueBackend, clock: Any) -> None:
    qid = await queue_message(backend, envelope=make_envelope(rcpts=("a@x.example", "b@y.example")),
                              body=b"x" * (300 * KB))
    m = await backend.get(qid)
    assert m is not None
    r0, r1 = m.recipients
    assert await backend.record(qid, [mark_delivered(r0, "250 ok", now=clock.now),
                                      mark_deferred(r1, "451 later", clock.now + 60, now=clock.now)]) is False
    m = await backend.get(qid)
    assert m is not None and [r.status for r in m.recipients] == [RcptStatus.DELIVERED, RcptStatus.DEFERRED]
    assert await backend.record(qid, [mark_failed(m.recipients[1], "550 no", now=clock.now)]) is True
    assert await backend.get(qid) is None
    with pytest.raises(KeyError):
        await backend.open_body(qid)


@pytest.mark.anyio
async def test_record_enqueues_notices_atomically(backend: QueueBackend, clock: Any) -> None:
    qid = await queue_message(backend, envelope=make_envelope(rcpts=("a@x.example", "b@y.example")))
    m = await backend.get(qid)
    assert m is not None
    notice = make_envelope(None, ("alice@example.org",), params=MailParams(body="8BITMIME"))
    done = await backend.record(qid, [mark_failed(m.recipients[0], "550 no", now=clock.now)],
                                notices=[(notice, b"Subject: bounce\r\n\r\nsorry\r\n")], warned=True)
    assert done is False
    m = await backend.get(qid)
    assert m is not None and m.warned
    others = [x for x in await backend.list() if x.id != qid]
    assert len(others) == 1
    dsn = others[0]
    assert dsn.sender == "" and [r.address for r in dsn.recipients] == ["alice@example.org"]
    assert dsn.params.body == "8BITMIME"
    assert await read_all(backend, dsn.id) == b"Subject: bounce\r\n\r\nsorry\r\n"
    assert [x.id for x in await backend.due()] == [qid, dsn.id] or [x.id for x in await backend.due()] == [dsn.id, qid]


@pytest.mark.anyio
async def test_record_on_deleted_message_does_nothing(backend: QueueBackend, clock: Any) -> None:
    qid = await queue_message(backend)
    m = await backend.get(qid)
    assert m is not None
    await backend.delete(qid)
    notice = make_envelope(None, ("alice@example.org",))
    assert await backend.record(qid, [mark_failed(m.recipients[0], "550", now=clock.now)],
                                notices=[(notice, b"x\r\n")]) is False
    assert await backend.list() == []
