"""SmtpTransport against the scriptable Receiver on loopback: dialogue, classification, faults, bounds."""

from __future__ import annotations

import asyncio
import io
import time
from typing import BinaryIO

import pytest

from mailhop.delivery.pool import ConnectionPool
from mailhop.delivery.smtp import Timeouts
from mailhop.envelope import MailParams
from tests.support.receiver import DISCONNECT, Receiver

from .smtp_helpers import (
    BODY,
    DEFERRED,
    DELIVERED,
    FAILED,
    HOST,
    OTHER,
    deliver,
    destination,
    kinds,
    message,
    refused_port,
    transport,
)

pytestmark = pytest.mark.anyio


async def test_plain_delivery_is_byte_exact() -> None:
    msg = message(["b@example.test", "c@example.test"])
    async with Receiver(HOST, 0) as r:
        outcomes = await deliver(transport(), destination(r), msg)
        [tx] = await r.wait_for_async(1)
    assert kinds(outcomes) == [DELIVERED, DELIVERED]
    assert outcomes[0].remote_host == "receiver.test" and outcomes[0].reply.code == 250
    assert tx.data == BODY and tx.via == "DATA" and tx.bare_newlines == 0 and not tx.early_data
    assert tx.mail_from == "a@example.test" and [a for a, _ in tx.rcpts] == ["b@example.test", "c@example.test"]
    assert tx.helo == "relay.example.test" and tx.ehlo
    assert r.sessions[0].verbs()[-1] == "QUIT"


async def test_pipelining_used_when_offered() -> None:
    msg = message(["b@example.test", "c@example.test", "d@example.test"])
    async with Receiver(HOST, 0) as r:
        await deliver(transport(), destination(r), msg)
        await r.wait_for_async(1)
    batches = r.sessions[0].batches()
    assert ["MAIL", "RCPT", "RCPT", "RCPT", "DATA"] in [[c.split()[0].split(":")[0] for c in b] for b in batches]


async def test_lock_step_without_pipelining() -> None:
    msg = message(["b@example.test", "c@example.test"])
    async with Receiver(HOST, 0, drop_capabilities=["PIPELINING"]) as r:
        assert kinds(await deliver(transport(), destination(r), msg)) == [DELIVERED, DELIVERED]
        await r.wait_for_async(1)
    assert all(len(b) == 1 for b in r.sessions[0].batches())


async def test_helo_fallback() -> None:
    async with Receiver(HOST, 0, ehlo_supported=False) as r:
        assert kinds(await deliver(transport(), destination(r), message())) == [DELIVERED]
        [tx] = await r.wait_for_async(1)
    assert r.sessions[0].verbs()[:2] == ["EHLO", "HELO"] and not tx.ehlo
    assert tx.mail_params == []  # no extensions after HELO: no SIZE even though we know it


async def test_421_greeting_moves_to_the_next_candidate() -> None:
    async with Receiver(HOST, 0, greeting="421 4.3.2 busy") as busy, Receiver(OTHER, 0) as good:
        outcomes = await deliver(transport(), destination(busy, good), message())
        await good.wait_for_async(1)
    assert kinds(outcomes) == [DELIVERED] and busy.connections == 1


async def test_554_greeting_everywhere_defers() -> None:
    async with Receiver(HOST, 0, greeting="554 5.3.2 go away") as r:
        [o] = (await deliver(transport(), destination(r), message())).values()
    assert o.kind is DEFERRED and o.reply.code == 451 and "554 5.3.2 go away" in o.reply.text
    assert r.sessions[0].verbs() == ["QUIT"]


async def test_refused_connection_moves_to_the_next_candidate() -> None:
    async with Receiver(OTHER, 0) as good:
        outcomes = await deliver(transport(), destination(refused_port(HOST), good), message())
        await good.wait_for_async(1)
    assert kinds(outcomes) == [DELIVERED]


async def test_all_candidates_refused_defers_4_4_1() -> None:
    [o] = (await deliver(transport(), destination(refused_port(HOST), refused_port(OTHER)), message())).values()
    assert o.kind is DEFERRED and o.reply.enhanced == "4.4.1" and "refused" in o.reply.text.lower()
    assert o.remote_host is None


async def test_per_recipient_outcomes_in_one_transaction() -> None:
    replies = {"bad@example.test": "550 5.1.1 No such user", "later@example.test": "450 4.2.1 Try later"}
    msg = message(["ok@example.test", "bad@example.test", "later@example.test", "ok2@example.test"])
    async with Receiver(HOST, 0, on_rcpt=replies) as r:
        outcomes = await deliver(transport(), destination(r), msg)
        [tx] = await r.wait_for_async(1)
    assert kinds(outcomes) == [DELIVERED, FAILED, DEFERRED, DELIVERED]
    assert outcomes[1].reply.code == 550 and outcomes[1].reply.enhanced == "5.1.1"
    assert outcomes[2].reply.text == "Try later"
    assert [a for a, _ in tx.rcpts] == ["ok@example.test", "ok2@example.test"]


async def test_no_recipient_accepted_resets_instead_of_data() -> None:
    msg = message(["bad@example.test", "later@example.test"])
    hooks = {"bad@example.test": "550 5.1.1 No", "later@example.test": "451 4.3.0 Later"}
    for options in ({}, {"drop_capabilities": ["PIPELINING"]}):
        async with Receiver(HOST, 0, on_rcpt=hooks, **options) as r:
            assert kinds(await deliver(transport(), destination(r), msg)) == [FAILED, DEFERRED]
            r.wait_for_connections(1, closed=True)
        verbs = r.sessions[0].verbs()
        assert "RSET" in verbs and r.transactions == []
        assert ("DATA" in verbs) == (not options)  # pipelined DATA is answered 554; no content follows


@pytest.mark.parametrize(("reply", "kind"), [("451 4.3.0 Local problem", DEFERRED), ("554 5.7.1 Spam", FAILED)])
async def test_final_reply_decides_for_all(reply: str, kind: object) -> None:
    async with Receiver(HOST, 0, on_data_end=[reply]) as r:
        outcomes = await deliver(transport(), destination(r), message(["b@example.test", "c@example.test"]))
    assert [o.kind for o in outcomes.values()] == [kind, kind]
    assert str(outcomes[0].reply) == reply


@pytest.mark.parametrize(("reply", "kind"), [("452 4.3.1 Full", DEFERRED), ("550 5.7.1 No", FAILED)])
async def test_mail_reply_decides_for_all(reply: str, kind: object) -> None:
    async with Receiver(HOST, 0, on_mail={"a@example.test": reply}) as r:
        outcomes = await deliver(transport(), destination(r), message(["b@example.test", "c@example.test"]))
        r.wait_for_connections(1, closed=True)
    assert [o.kind for o in outcomes.values()] == [kind, kind] and r.transactions == []


async def test_data_refused() -> None:
    async with Receiver(HOST, 0, on_command={"DATA": "554 5.6.0 No data for you"}) as r:
        [o] = (await deliver(transport(), destination(r), message())).values()
    assert o.kind is FAILED and o.reply.code == 554


async def test_disconnect_after_rcpt_defers() -> None:
    async with Receiver(HOST, 0, disconnect_after="RCPT") as r:
        [o] = (await deliver(transport(), destination(r), message())).values()
    assert o.kind is DEFERRED and o.reply.enhanced == "4.4.2"


async def test_disconnect_mid_data_defers() -> None:
    body = b"Subject: big\r\n\r\n" + b"0123456789" * 50_000 + b"\r\n"
    async with Receiver(HOST, 0, disconnect_mid_data=10_000) as r:
        [o] = (await deliver(transport(), destination(r), message(body=body), body)).values()
    assert o.kind is DEFERRED and o.reply.enhanced == "4.4.2" and r.transactions == []


async def test_disconnect_before_final_reply_defers() -> None:
    async with Receiver(HOST, 0, disconnect_after=".") as r:
        [o] = (await deliver(transport(), destination(r), message())).values()
        assert len(r.transactions) == 1  # it got the message: the duplicate window
    assert o.kind is DEFERRED and "end of data" in o.reply.text


@pytest.mark.parametrize("slow_on", [None, ["."]])
async def test_slow_replies_time_out(slow_on: list[str] | None) -> None:
    async with Receiver(HOST, 0, bytes_per_second=1, slow_on=slow_on) as r:
        start = time.monotonic()
        [o] = (await deliver(transport(timeouts=Timeouts.all(0.5)), destination(r), message())).values()
        elapsed = time.monotonic() - start
    assert o.kind is DEFERRED and "timed out" in o.reply.text
    assert elapsed < 3.0


async def test_huge_reply_line_is_refused_without_buffering_it() -> None:
    async with Receiver(HOST, 0, huge_reply_line=1024 * 1024) as r:
        [o] = (await deliver(transport(), destination(r), message())).values()
    assert o.kind is DEFERRED and "malformed reply" in o.reply.text and "2048" in o.reply.text


async def test_smtputf8_message_to_server_without_it_fails() -> None:
    msg = message(["j\u00f6@example.test"], params=MailParams(size=len(BODY), smtputf8=True))
    async with Receiver(HOST, 0, drop_capabilities=["SMTPUTF8"]) as r:
        [o] = (await deliver(transport(), destination(r), msg)).values()
    assert o.kind is FAILED and (o.reply.code, o.reply.enhanced) == (553, "5.6.7")
    assert "MAIL" not in r.sessions[0].verbs()


async def test_smtputf8_message_to_server_with_it() -> None:
    msg = message(["j\u00f6@example.test"], sender="\u00e5@example.test",
                  params=MailParams(size=len(BODY), smtputf8=True))
    async with Receiver(HOST, 0) as r:
        assert kinds(await deliver(transport(), destination(r), msg)) == [DELIVERED]
        [tx] = await r.wait_for_async(1)
    assert "SMTPUTF8" in tx.mail_params and tx.rcpts[0][0] == "j\u00f6@example.test"


async def test_message_too_big_for_remote_fails() -> None:
    async with Receiver(HOST, 0, capabilities=["SIZE 100", "PIPELINING"]) as r:
        [o] = (await deliver(transport(), destination(r), message())).values()
    assert o.kind is FAILED and (o.reply.code, o.reply.enhanced) == (552, "5.3.4")
    assert "MAIL" not in r.sessions[0].verbs()


async def test_mail_parameters_only_when_supported() -> None:
    params = MailParams(size=len(BODY), body="8BITMIME", ret="HDRS", envid="env id+1")
    msg = message(["b@example.test"], params=params, notify=("SUCCESS", "FAILURE"), orcpt=True)
    async with Receiver(HOST, 0) as r:
        [o] = (await deliver(transport(), destination(r), msg)).values()
        [tx] = await r.wait_for_async(1)
    assert o.dsn_passed_on
    assert tx.mail_params == [f"SIZE={len(BODY)}", "BODY=8BITMIME", "RET=HDRS", "ENVID=env+20id+2B1"]
    assert tx.rcpts == [("b@example.test", ["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;b@example.test"])]
    async with Receiver(HOST, 0, drop_capabilities=["DSN", "8BITMIME", "SIZE"]) as r:
        [o] = (await deliver(transport(), destination(r), msg)).values()
        [tx] = await r.wait_for_async(1)
    assert not o.dsn_passed_on and o.kind is DELIVERED
    assert tx.mail_params == [] and tx.rcpts == [("b@example.test", [])]


async def test_dots_and_long_lines_arrive_intact() -> None:
    body = b"Subject: dots\r\n\r\n.\r\n..\r\n.leading\r\n" + b"L" * 2000 + b"\r\n. \r\nend"
    async with Receiver(HOST, 0) as r:
        await deliver(transport(), destination(r), message(body=body), body)
        [tx] = await r.wait_for_async(1)
    assert tx.data == body + b"\r\n"  # intact; only the missing final line end added


async def test_no_bare_cr_or_lf_ever_leaves() -> None:
    body = b"Subject: bare\n\nlf only\nCR only\rmixed\r\r\n\n.\n.dot after lf\r.\r\n\r\n.\nend\r"
    async with Receiver(HOST, 0) as r:
        await deliver(transport(), destination(r), message(body=body), body)
        [tx] = await r.wait_for_async(1)
    assert tx.bare_newlines == 0
    assert tx.data == (b"Subject: bare\r\n\r\nlf only\r\nCR only\r\nmixed\r\n\r\n\r\n.\r\n.dot after lf\r\n.\r\n"
                       b"\r\n.\r\nend\r\n")


async def test_recipients_over_the_limit_use_several_transactions_on_one_connection() -> None:
    addresses = [f"r{i}@example.test" for i in range(7)]
    async with Receiver(HOST, 0) as r:
        outcomes = await deliver(transport(max_rcpts_per_transaction=3), destination(r), message(addresses))
        txs = await r.wait_for_async(3)
    assert kinds(outcomes) == [DELIVERED] * 7
    assert [len(tx.rcpts) for tx in txs] == [3, 3, 1] and r.connections == 1
    assert all(tx.data == BODY for tx in txs)


async def test_452_too_many_recipients_continue_in_the_next_transaction() -> None:
    seen: list[str] = []

    def on_rcpt(address: str) -> str | None:
        seen.append(address)
        return "452 4.5.3 Too many recipients" if len(seen) == 2 else None

    async with Receiver(HOST, 0, on_rcpt=on_rcpt) as r:
        outcomes = await deliver(transport(), destination(r), message(["b@example.test", "c@example.test"]))
        txs = await r.wait_for_async(2)
    assert kinds(outcomes) == [DELIVERED, DELIVERED] and [len(t.rcpts) for t in txs] == [1, 1]


async def test_lmtp_per_recipient_replies() -> None:
    replies = {"full@example.test": "452 4.2.2 Mailbox full", "gone@example.test": "550 5.1.1 Gone"}
    msg = message(["ok@example.test", "full@example.test", "gone@example.test"])
    async with Receiver(HOST, 0, lmtp=True, on_lmtp_rcpt=replies) as r:
        outcomes = await deliver(transport(), destination(r, lmtp=True), msg)
        [tx] = await r.wait_for_async(1)
    assert kinds(outcomes) == [DELIVERED, DEFERRED, FAILED]
    assert r.sessions[0].verbs()[0] == "LHLO" and len(tx.replies) == 3


async def test_body_that_cannot_be_read_is_deferred_locally() -> None:
    async def open_body() -> BinaryIO:
        raise FileNotFoundError("body gone")

    async with Receiver(HOST, 0) as r:
        msg = message()
        [o] = await transport().deliver(destination(r), msg, msg.recipients, open_body)
    assert o.kind is DEFERRED and o.reply.enhanced == "4.3.0" and "MAIL" not in r.sessions[0].verbs()


async def test_connection_reuse_across_messages() -> None:
    pool = ConnectionPool(idle_timeout=30.0)
    t = transport(pool=pool)
    try:
        async with Receiver(HOST, 0) as r:
            for _ in range(3):
                assert kinds(await deliver(t, destination(r), message())) == [DELIVERED]
            await r.wait_for_async(3)
            assert r.connections == 1 and pool.idle_count() == 1
            await pool.close()
            r.wait_for_connections(1, closed=True)
        assert r.sessions[0].verbs().count("QUIT") == 1 and r.sessions[0].closed_by == "client"
    finally:
        await pool.close()


async def test_pool_idle_timeout_closes_and_reconnects() -> None:
    pool = ConnectionPool(idle_timeout=0.3)
    t = transport(pool=pool)
    try:
        async with Receiver(HOST, 0) as r:
            await deliver(t, destination(r), message())
            await asyncio.to_thread(r.wait_for_connections, 1, 5.0, closed=True)  # the reaper QUITs it
            assert r.sessions[0].verbs()[-1] == "QUIT"
            await deliver(t, destination(r), message())
            assert r.connections == 2
    finally:
        await pool.close()


async def test_pool_max_messages() -> None:
    pool = ConnectionPool(max_messages=2)
    t = transport(pool=pool)
    try:
        async with Receiver(HOST, 0) as r:
            for _ in range(3):
                await deliver(t, destination(r), message())
            assert r.connections == 2
    finally:
        await pool.close()


async def test_stale_pooled_connection_is_retried_once_on_a_fresh_one() -> None:
    pool = ConnectionPool()
    t = transport(pool=pool)
    dropped: list[str] = []

    def on_mail(sender: str) -> object:
        if r.connections == 1 and len(r.transactions) == 1 and not dropped:
            dropped.append(sender)
            return DISCONNECT  # the server silently dropped the idle connection
        return None

    try:
        async with Receiver(HOST, 0, on_mail=on_mail) as r:
            await deliver(t, destination(r), message())
            assert kinds(await deliver(t, destination(r), message())) == [DELIVERED]
            await r.wait_for_async(2)
        assert dropped and r.connections == 2
    finally:
        await pool.close()


async def test_server_closing_idle_pooled_connection_is_noticed() -> None:
    pool = ConnectionPool()
    t = transport(pool=pool)
    try:
        async with Receiver(HOST, 0, idle_timeout=0.2) as r:
            await deliver(t, destination(r), message())
            await asyncio.to_thread(r.wait_for_connections, 1, 5.0, closed=True)  # 421 timeout, closed
            assert kinds(await deliver(t, destination(r), message())) == [DELIVERED]
            assert r.connections == 2
    finally:
        await pool.close()


async def test_open_body_called_with_fresh_file_each_transaction() -> None:
    opened: list[io.BytesIO] = []

    async def open_body() -> BinaryIO:
        f = io.BytesIO(BODY)
        opened.append(f)
        return f

    async with Receiver(HOST, 0) as r:
        msg = message([f"r{i}@example.test" for i in range(4)])
        await transport(max_rcpts_per_transaction=2).deliver(destination(r), msg, msg.recipients, open_body)
        txs = await r.wait_for_async(2)
    assert len(opened) == 2 and all(f.closed for f in opened) and all(tx.data == BODY for tx in txs)


async def test_pool_idle_timeout_zero_disables_reuse() -> None:
    pool = ConnectionPool(idle_timeout=0)
    t = transport(pool=pool)
    try:
        async with Receiver(HOST, 0) as r:
            for _ in range(2):
                await deliver(t, destination(r), message())
            assert r.connections == 2 and pool.idle_count() == 0
    finally:
        await pool.close()


async def test_pool_keeps_at_most_max_idle_per_key() -> None:
    pool = ConnectionPool(max_idle_per_key=2)
    t = transport(pool=pool)
    try:
        async with Receiver(HOST, 0) as r:
            await asyncio.gather(*(deliver(t, destination(r), message()) for _ in range(4)))
            assert r.connections == 4 and pool.idle_count() == 2
            await pool.close()
            r.wait_for_connections(4, closed=True)
        assert all(s.verbs()[-1] == "QUIT" for s in r.sessions)
    finally:
        await pool.close()
