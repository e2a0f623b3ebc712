"""The crash-point matrix: kill a real ``mailhop serve`` (delivery on) at every named crash point, restart it
without the crash, let it drain its queue into loopback receivers, and check what arrived against what the
clients were told.

Crash points (``MAILHOP_CRASH_AT``; the process ``os._exit(137)``s there, like SIGKILL):

accept side    ``after_body_write``, ``after_body_fsync`` (before the COMMIT), ``after_commit`` (before the 250)
delivery side  ``after_delivery_before_record`` (after the remote 250), ``during_record`` (inside the recording
               transaction)

Each case runs three daemons on one spool:

0. no crash: a two-recipient message ``pre`` is accepted (250); ``x@dest.test`` is delivered and recorded,
   ``y@later.test`` gets 451 and is deferred (first retry minutes away, so it is not due in step 1).
1. with ``MAILHOP_CRASH_AT``: a client leaves a DATA unfinished on one connection, and messages are submitted one at
   a time (raw SMTP) until the daemon dies. Each submission ends "accepted" (250), "in doubt" (the whole DATA
   was sent but the reply was lost to the crash) or "unsent" (the DATA never fully left the client).
   For the delivery-side points the deferred recipient is flushed first, so the crash hits the second attempt of
   ``pre``, whose other recipient is already recorded as delivered; the clients connect only after that crash
   (a message accepted before it would be handed to delivery at once and might be the attempt that crashes).
2. no crash: flush, restart, submit one more message, wait for an empty queue.

The oracle (deliveries counted per unique ``X-Token`` header and recipient at the receivers):

* every message that got a 250 is delivered at least once, to every recipient;
* a message whose DATA was never fully sent is never delivered;
* accept side: the in-doubt message is delivered 0 or 1 times (0 before the COMMIT, 1 after it);
* delivery side: a message delivered before the crash is delivered at most twice (the documented duplicate
  window: only the attempt in flight), and a recipient recorded as delivered is never sent again.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from mailhop.cli.main import main as mailhop_main
from tests.daemon.harness import Client, Relay, free_port, start_relay, write_config
from tests.delivery.engine_harness import mx_port
from tests.support.dnsserver import TestDns
from tests.support.receiver import Receiver

ACCEPT_SIDE = ("after_body_write", "after_body_fsync", "after_commit")
DELIVERY_SIDE = ("after_delivery_before_record", "during_record")
POINTS = ACCEPT_SIDE + DELIVERY_SIDE
LOOP = "auto"  # uvloop when installed: the loop `mailhop serve` uses by default
TOKEN = re.compile(rb"^X-Token: (\S+)\r?$", re.MULTILINE)

ACCEPTED, IN_DOUBT, UNSENT = "accepted", "in doubt", "unsent"


@pytest.fixture(scope="module")
def port() -> int:
    return mx_port()


@pytest.fixture
def dns() -> Iterator[TestDns]:
    with TestDns(origins=["test"]) as server:
        yield server


def mailhop(cfg: Path, *args: str) -> str:
    result = CliRunner().invoke(mailhop_main, [*args, "--config", str(cfg)], catch_exceptions=False)
    assert result.exit_code == 0, f"mailhop {' '.join(args)} exited {result.exit_code}: {result.stderr}"
    return result.stdout


def queue_list(cfg: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in mailhop(cfg, "queue", "list", "--json").splitlines() if line.strip()]


def wait_queue(cfg: Path, predicate: Callable[[list[dict[str, Any]]], bool], what: str,
               timeout: float = 20.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        listing = queue_list(cfg)
        if predicate(listing):
            return listing
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; queue: {listing}")
        time.sleep(0.05)


def statuses(listing: list[dict[str, Any]]) -> dict[str, str]:
    return {r["address"]: r["status"] for m in listing for r in m["recipients"]}


def body(token: str, rcpts: list[str]) -> bytes:
    return (f"From: a@client.test\r\nTo: {', '.join(rcpts)}\r\nSubject: crash matrix {token}\r\n"
            f"X-Token: {token}\r\nMessage-ID: <{token}@client.test>\r\n\r\nbody of {token}\r\n").encode()


def open_transaction(relay: Relay, rcpts: list[str]) -> Client:
    """Connect and get as far as 354; the caller sends the data."""
    client = Client(relay.host, relay.port, timeout=10)
    try:
        assert client.reply().startswith("220")
        client.line("EHLO client.test")
        assert client.reply().startswith("250")
        client.line("MAIL FROM:<a@client.test>")
        assert client.reply().startswith("250")
        for rcpt in rcpts:
            client.line(f"RCPT TO:<{rcpt}>")
            assert client.reply().startswith("250")
        client.line("DATA")
        assert client.reply().startswith("354")
    except BaseException:
        client.close()
        raise
    return client


def submit(relay: Relay, token: str, rcpts: list[str]) -> str:
    """One message on its own connection: ACCEPTED, IN_DOUBT or UNSENT."""
    try:
        client = open_transaction(relay, rcpts)
    except (OSError, AssertionError):
        return UNSENT  # refused, reset or closed before the data could be sent
    try:
        try:
            client.send(body(token, rcpts) + b".\r\n")
        except OSError:
            return UNSENT  # the final dot never left: the server cannot have taken it
        try:
            reply = client.reply()
        except OSError:
            return IN_DOUBT
        assert reply.startswith("250"), f"{token}: {reply!r}"
        client.line("QUIT")
        return ACCEPTED
    finally:
        client.close()


def deliveries(*receivers: Receiver) -> Counter[tuple[str, str]]:
    """(token, recipient) -> times received."""
    counts: Counter[tuple[str, str]] = Counter()
    for rx in receivers:
        for tx in rx.transactions:
            match = TOKEN.search(tx.data)
            assert match, tx.data[:300]
            for rcpt, _ in tx.rcpts:
                counts[(match.group(1).decode(), rcpt)] += 1
    return counts


@pytest.mark.parametrize("point", POINTS)
def test_crash_point_matrix(tmp_path: Path, dns: TestDns, port: int, point: str) -> None:
    n = POINTS.index(point)
    dest_ip, later_ip = f"127.0.0.{70 + 2 * n}", f"127.0.0.{71 + 2 * n}"
    dns.add("dest.test. 60 IN MX 10 mx.dest.test.", f"mx.dest.test. 60 IN A {dest_ip}")
    dns.add("later.test. 60 IN MX 10 mx.later.test.", f"mx.later.test. 60 IN A {later_ip}")
    extra = (f"[delivery]\nmx_port = {port}\n"
             f'[dns]\nnameservers = ["{dns.nameserver}"]\ntimeout = 1.0\nlifetime = 2.0\n'
             "[limits]\nshutdown_grace = 2.0\n")
    relay_port = free_port()
    cfg = write_config(tmp_path, relay_port, extra)
    spool = tmp_path / "spool"
    outcome: dict[str, tuple[str, list[str]]] = {}  # token -> (ACCEPTED | IN_DOUBT | UNSENT, recipients)

    with Receiver(dest_ip, port) as dest, \
            Receiver(later_ip, port, on_rcpt=lambda _: "451 4.3.0 Try again later") as later:
        # 0. A recipient recorded as delivered, its sibling deferred.
        relay = start_relay(cfg, "127.0.0.1", relay_port, spool, loop=LOOP)
        try:
            pre = ["x@dest.test", "y@later.test"]
            outcome["pre"] = (submit(relay, "pre", pre), pre)
            assert outcome["pre"][0] == ACCEPTED
            wait_queue(cfg, lambda q: statuses(q) == {"x@dest.test": "delivered", "y@later.test": "deferred"},
                       "x delivered and y deferred")
        finally:
            assert relay.stop() == 0, relay.log()
        later.options.on_rcpt = None
        assert deliveries(dest, later) == {("pre", "x@dest.test"): 1}

        # 1. The crash.
        if point in DELIVERY_SIDE:
            assert "1 recipient(s)" in mailhop(cfg, "queue", "flush")  # y is due: its attempt will crash
        relay = start_relay(cfg, "127.0.0.1", relay_port, spool, env={"MAILHOP_CRASH_AT": point}, loop=LOOP)
        unfinished: Client | None = None
        if point in DELIVERY_SIDE:
            # Let y's attempt be the one that crashes: a message accepted meanwhile is handed to delivery at
            # once and could finish first. The clients below then find the daemon gone (unsent).
            assert relay.proc.wait(timeout=20) == 137, relay.log()
        try:
            try:
                unfinished = open_transaction(relay, ["u@dest.test"])
                unfinished.send(body("unfinished", ["u@dest.test"])[:-20])  # no end of data, ever
            except (OSError, AssertionError):
                pass  # the daemon may already be gone (delivery side)
            outcome["unfinished"] = (UNSENT, ["u@dest.test"])
            for i in range(3):
                token = f"m{i}"
                rcpts = [f"m{i}@dest.test"]
                outcome[token] = (submit(relay, token, rcpts), rcpts)
                if relay.proc.poll() is not None:
                    break
            assert relay.proc.wait(timeout=20) == 137, relay.log()
        finally:
            if unfinished is not None:
                unfinished.close()
            code = relay.stop()
        assert code == 137, relay.log()
        at_crash = deliveries(dest, later)
        if point in ACCEPT_SIDE:
            assert outcome["m0"][0] == IN_DOUBT, outcome  # the first accept dies: its 250 is lost
        else:
            assert at_crash[("pre", "y@later.test")] == 1  # the remote took y; the crash came before the record

        # 2. Restart without the crash point and drain.
        mailhop(cfg, "queue", "flush")
        relay = start_relay(cfg, "127.0.0.1", relay_port, spool, loop=LOOP)
        try:
            outcome["post"] = (submit(relay, "post", ["post@dest.test"]), ["post@dest.test"])
            assert outcome["post"][0] == ACCEPTED
            wait_queue(cfg, lambda q: q == [], "an empty queue")
        finally:
            assert relay.stop() == 0, relay.log()
        final = deliveries(dest, later)

    # The oracle.
    tokens = {token for token, _ in final}
    assert tokens <= set(outcome), f"unknown deliveries: {final}"
    for token, (status, rcpts) in outcome.items():
        for rcpt in rcpts:
            count = final[(token, rcpt)]
            if status == ACCEPTED:
                assert count >= 1, f"{token} to {rcpt} got a 250 but was never delivered ({point})"
            elif status == UNSENT:
                assert count == 0, f"{token} to {rcpt}: DATA never completed, yet delivered {count}x ({point})"
            else:
                assert count <= 1, f"{token} to {rcpt} (in doubt) delivered {count}x ({point})"
            if point in ACCEPT_SIDE:
                assert count <= 1, f"{token} to {rcpt} delivered {count}x after an accept-side crash ({point})"
            else:
                assert count <= 2, f"{token} to {rcpt} delivered {count}x: beyond the duplicate window ({point})"
    # The recipient recorded as delivered before the crash is never sent again.
    assert final[("pre", "x@dest.test")] == 1, final
    if point in ACCEPT_SIDE:
        # Tighter than 0-or-1: before the COMMIT the message is gone, after it the restart delivers it.
        assert final[("m0", "m0@dest.test")] == (1 if point == "after_commit" else 0), final
        assert final[("pre", "y@later.test")] == 1, final
    else:
        # Exactly the attempt in flight is repeated: y once before the crash, once after.
        assert final[("pre", "y@later.test")] == 2, final
    # Every delivery that happened before the crash is at most duplicated once.
    for key, before in at_crash.items():
        assert final[key] <= before + 1, (key, before, final[key])
