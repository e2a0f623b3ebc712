"""DNS faults end to end (RFC 5321 section 5, RFC 7505): a real ``mailhop serve`` with delivery on, asking only a
loopback DNS server that misbehaves per domain, delivering to receivers on 127.0.7.x.

One daemon takes every case at once (one message per case, all submitted over one SMTP session), so the set costs
one daemon start plus the slowest case (the DNS timeout: ``[dns] lifetime``). Each recipient's outcome is read
from three places that must agree: the daemon's log line for the attempt, ``mailhop queue list --json`` (what is
still queued: status, attempts, last reply) and the peers (the receiver that got the message, or the DSN that
reached the sender's own MX). Then DNS is repaired for the deferred cases and a ``mailhop queue flush`` shows
that deferral kept the mail: each deferred recipient is delivered exactly once.

All MX hosts without an address: the code defers (451 4.4.4), it does not bounce. RFC 5321 5.1 says only that
"if MX records are present, but none of them are usable ... this situation MUST be reported as an error"; it
does not say permanent. Host records missing behind existing MX records are almost always a DNS change in
progress, and a deferral does report the error (a delay notice, then a 4.4.7 bounce when the queue lifetime
ends). This is Postfix's ``smtp_defer_if_no_mx_address_found = yes``; Postfix's default bounces instead.

The harness at the top is shared with ``test_downstream_faults.py``. ``-s`` prints a table case -> outcome:
``.venv/bin/pytest tests/faults/test_dns_faults.py -s``.
"""

from __future__ import annotations

import contextlib
import json
import re
import textwrap
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from mailhop.cli.main import main as mailhop_main
from tests.daemon.harness import Relay, run_relay
from tests.delivery.engine_harness import dsn_fields, mx_port
from tests.support.dnsserver import TestDns
from tests.support.receiver import Receiver, Transaction

LOOP = "auto"  # uvloop when installed: the loop `mailhop serve` runs on by default
SENDER = "sender@from.test"
# The daemon's per-recipient log lines (mailhop.delivery.engine._record).
_OUTCOME = re.compile(r" (delivered|failed|deferred|expired) id=\S+ to=<([^>]*)> (?:relay=\S+ )?(?:reply|last)=(.*?)"
                      r"(?: next=-?\d+s)?$")


# -- the harness, shared with test_downstream_faults.py ------------------------------------------------------


@dataclass(frozen=True)
class Expect:
    """One recipient's expected outcome: status and a regex its reply must match (re.search)."""

    status: str  # "delivered", "failed" or "deferred"
    reply: str = ""
    via: str | None = None  # delivered: the name of the receiver that must hold the message
    dsn: str | None = None  # failed: the Status: of the DSN the sender must get


@dataclass(frozen=True)
class Case:
    """One fault: a message to ``rcpts`` (all in one domain) and what each recipient must end as."""

    name: str
    expect: Mapping[str, Expect]
    body: bytes = b""

    @property
    def rcpts(self) -> list[str]:
        return list(self.expect)


@dataclass
class Snapshot:
    """Everything observable at one moment, keyed by recipient address."""

    outcomes: dict[str, list[tuple[str, str]]]  # every attempt's (status, reply) from the daemon's log, in order
    queue: dict[str, dict[str, Any]]  # recipients still in the queue: status, attempts, last_reply
    dsns: dict[str, list[str]]  # Final-Recipient address -> Status of each DSN that reached the sender
    delivered: dict[str, list[tuple[str, Transaction]]]  # address -> (receiver name, transaction) per copy
    received: dict[str, int]  # receiver name -> complete messages it got, whatever it answered
    sessions: dict[str, int]  # receiver name -> connections it accepted
    vm_hwm_kib: int | None = None


def mailhop(cfg: Path, *args: str) -> str:
    """``mailhop ARGS --config CFG`` in-process (no interpreter start per poll); its stdout."""
    result = CliRunner().invoke(mailhop_main, [*args, "--config", str(cfg)], catch_exceptions=False)
    assert result.exit_code == 0, f"mailhop {' '.join(args)} exited {result.exit_code}: {result.stderr}"
    return result.stdout


def queue_list(cfg: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in mailhop(cfg, "queue", "list", "--json").splitlines() if line.strip()]


def vm_hwm_kib(pid: int) -> int | None:
    """The process's peak resident set (VmHWM), KiB; None if it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    found = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
    return int(found.group(1)) if found else None


def message(case: Case) -> bytes:
    return (f"From: {SENDER}\r\nTo: {', '.join(case.rcpts)}\r\nSubject: fault {case.name}\r\n"
            f"Message-ID: <{re.sub(r'[^A-Za-z0-9.-]', '.', case.name)}@from.test>\r\n\r\n").encode() \
        + (case.body or b"hello\r\n")


def submit(relay: Relay, cases: Sequence[Case]) -> None:
    """One message per case over one raw SMTP session (the daemon relays for 127.0.0.0/8)."""
    import smtplib

    with smtplib.SMTP(relay.host, relay.port, timeout=20) as smtp:
        smtp.ehlo("client.test")
        for case in cases:
            assert smtp.sendmail(SENDER, case.rcpts, message(case)) == {}, case.name


class Scenario:
    """A running daemon, its receivers by name and the sender's own MX (where DSNs arrive)."""

    def __init__(self, relay: Relay, receivers: Mapping[str, Receiver], bounces: Receiver) -> None:
        self.relay = relay
        self.receivers = dict(receivers)
        self.bounces = bounces

    def outcomes(self) -> dict[str, list[tuple[str, str]]]:
        found: dict[str, list[tuple[str, str]]] = {}
        for line in list(self.relay.log_lines):
            match = _OUTCOME.search(line.rstrip("\n"))
            if match:
                found.setdefault(match.group(2), []).append((match.group(1), match.group(3)))
        return found

    def dsns(self) -> dict[str, list[str]]:
        found: dict[str, list[str]] = {}
        for tx in self.bounces.transactions:
            assert tx.mail_from == "" and [r for r, _ in tx.rcpts] == [SENDER], "a DSN goes from <> to the sender"
            _, blocks = dsn_fields(tx.data)
            for block in blocks:
                assert block["Action"] == "failed", block
                found.setdefault(block["Final-Recipient"].removeprefix("rfc822; "), []).append(block["Status"])
        return found

    def delivered(self) -> dict[str, list[tuple[str, Transaction]]]:
        """Copies a receiver took responsibility for: answered 2xx, or received whole and left unanswered (the
        connection dropped after the final dot: RFC 5321 6.1's duplicate risk, the receiver may deliver it)."""
        found: dict[str, list[tuple[str, Transaction]]] = {}
        for name, rx in self.receivers.items():
            for tx in rx.transactions:
                if tx.replies and not tx.replies[0].startswith("2"):
                    continue
                for rcpt, _ in tx.rcpts:
                    found.setdefault(rcpt, []).append((name, tx))
        return found

    def snapshot(self) -> Snapshot:
        queued = {r["address"]: r for m in queue_list(self.relay.config) for r in m["recipients"]}
        return Snapshot(self.outcomes(), queued, self.dsns(), self.delivered(),
                        {n: len(rx.transactions) for n, rx in self.receivers.items()},
                        {n: rx.connections for n, rx in self.receivers.items()}, vm_hwm_kib(self.relay.proc.pid))

    def wait(self, done: Callable[[], bool], timeout: float) -> bool:
        """Poll until done() (every 0.1 s); False on timeout: the per-case checks then say what is missing."""
        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        return True

    def settle(self, cases: Sequence[Case], timeout: float = 30.0) -> bool:
        """Until every recipient's first attempt is logged and recorded, and every expected DSN has arrived."""
        rcpts = [r for c in cases for r in c.rcpts]
        deferred = {r for c in cases for r, e in c.expect.items() if e.status == "deferred"}
        n_dsns = sum(e.dsn is not None for c in cases for e in c.expect.values())

        def done() -> bool:
            logged = self.outcomes()
            if not all(r in logged for r in rcpts) or len(self.bounces.transactions) < n_dsns:
                return False
            queued = {r["address"]: r for m in queue_list(self.relay.config) for r in m["recipients"]}
            return all(queued.get(r, {}).get("status") == "deferred" for r in deferred)

        return self.wait(done, timeout)

    def drained(self, timeout: float = 30.0) -> bool:
        """Until the queue is empty."""
        return self.wait(lambda: queue_list(self.relay.config) == [], timeout)


def check_first_attempt(snap: Snapshot, case: Case) -> None:
    """Each recipient ended its first attempt as expected, and the queue and the peers agree."""
    for rcpt, want in case.expect.items():
        attempts = snap.outcomes.get(rcpt)
        assert attempts, f"{case.name}: no outcome logged for {rcpt}"
        status, reply = attempts[0]
        assert status == want.status, f"{case.name}: {rcpt} {status} ({reply}), expected {want.status}"
        assert re.search(want.reply, reply), f"{case.name}: {rcpt} reply {reply!r} !~ /{want.reply}/"
        copies = snap.delivered.get(rcpt, [])
        if want.status == "deferred":
            queued = snap.queue.get(rcpt)
            assert queued is not None, f"{case.name}: deferred {rcpt} is not in the queue"
            assert (queued["status"], queued["attempts"]) == ("deferred", 1), queued
            assert re.search(want.reply, queued["last_reply"]), queued["last_reply"]
            assert rcpt not in snap.dsns, f"{case.name}: a deferral must not bounce"
        elif want.status == "failed":
            assert rcpt not in snap.queue or snap.queue[rcpt]["status"] == "failed", snap.queue[rcpt]
            assert copies == [], f"{case.name}: failed {rcpt} reached {[n for n, _ in copies]}"
            assert want.dsn is not None
            assert snap.dsns.get(rcpt) == [want.dsn], f"{case.name}: DSNs for {rcpt}: {snap.dsns.get(rcpt)}"
        else:
            assert [n for n, _ in copies] == [want.via], f"{case.name}: {rcpt} copies {[n for n, _ in copies]}"
            assert rcpt not in snap.dsns
            assert rcpt not in snap.queue or snap.queue[rcpt]["status"] == "delivered", snap.queue[rcpt]


def table(title: str, rows: Sequence[tuple[str, ...]], header: tuple[str, ...]) -> str:
    """A plain-text table, for -s."""
    widths = [max(len(str(r[i])) for r in (header, *rows)) for i in range(len(header))]
    lines = [title, "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def outcome_rows(cases: Sequence[Case], snaps: Sequence[Snapshot]) -> list[tuple[str, ...]]:
    """case, recipient, then the logged outcome (status: reply) of each attempt up to each snapshot."""
    rows = []
    for case in cases:
        for rcpt in case.rcpts:
            cells = [case.name, rcpt]
            for i, snap in enumerate(snaps):
                attempts = snap.outcomes.get(rcpt, [])
                status, reply = attempts[-1] if attempts else ("-", "")
                if i and len(attempts) == len(snaps[i - 1].outcomes.get(rcpt, [])):
                    status, reply = "(no new attempt)", ""
                # The peer's name and address are in the recipient column already: keep the cause visible.
                short = re.sub(r"(?:lost connection with )?mx\.\S+?\[[\d.]+\]:\d+:? ?", "", reply)
                cells.append(f"{status}: {short[:64]}" if reply else status)
            rows.append(tuple(cells))
    return rows


def delivery_config(dns: TestDns, port: int, delivery: str = "", dns_timeouts: str = "", routes: str = "") -> str:
    """Config tables turning delivery on against the test DNS server only, with short timeouts."""
    timeouts = textwrap.dedent(dns_timeouts) or "timeout = 1.0\nlifetime = 2.0\n"
    return (
        f"[delivery]\nmx_port = {port}\nconnect_timeout = 2.0\n{textwrap.dedent(delivery)}"
        f'[dns]\nnameservers = ["{dns.nameserver}"]\n{timeouts}'
        "[limits]\nshutdown_grace = 2.0\n"
        f"{textwrap.dedent(routes)}"
    )


# -- the DNS cases ---------------------------------------------------------------------------------------------

BOUNCES = "127.0.7.1"  # from.test's MX: the sender's own server, where DSNs arrive
HEALTHY = {"implicit": "127.0.7.2", "mixed": "127.0.7.3", "deadeq": "127.0.7.4", "deadlow": "127.0.7.5",
           "tc": "127.0.7.6", "healed": "127.0.7.7"}
DEAD = "127.0.7.20"  # nothing listens here: connection refused

ZONE = [
    "from.test. 60 IN MX 10 mx.from.test.", f"mx.from.test. 60 IN A {BOUNCES}",
    # NODATA for MX, an A record: the implicit MX (RFC 5321 5.1)
    f"implicit.test. 60 IN A {HEALTHY['implicit']}",
    # MX hosts that cannot be used (NXDOMAIN, NODATA, SERVFAIL for their addresses) preferred over a healthy one
    "mixed.test. 60 IN MX 5 nx.mixed.test.", "mixed.test. 60 IN MX 5 nodata.mixed.test.",
    "mixed.test. 60 IN MX 10 servfail.mixed.test.", "mixed.test. 60 IN MX 20 good.mixed.test.",
    'nodata.mixed.test. 60 IN TXT "no address here"', f"good.mixed.test. 60 IN A {HEALTHY['mixed']}",
    # every MX host without an address; TTL 0 so the repair below is seen at once
    "noaddr.test. 0 IN MX 10 nx.noaddr.test.", "noaddr.test. 0 IN MX 20 nodata.noaddr.test.",
    'nodata.noaddr.test. 60 IN TXT "no address here"',
    # a dead MX at the same preference as a live one (tried first about half the time), and a better one
    "deadeq.test. 60 IN MX 10 dead.deadeq.test.", "deadeq.test. 60 IN MX 10 live.deadeq.test.",
    f"dead.deadeq.test. 60 IN A {DEAD}", f"live.deadeq.test. 60 IN A {HEALTHY['deadeq']}",
    "deadlow.test. 60 IN MX 10 dead.deadlow.test.", "deadlow.test. 60 IN MX 20 live.deadlow.test.",
    f"dead.deadlow.test. 60 IN A {DEAD}", f"live.deadlow.test. 60 IN A {HEALTHY['deadlow']}",
    # answers truncated over UDP (TC bit): the resolver must ask again over TCP
    "tc.test. 60 IN MX 10 mx.tc.test.", f"mx.tc.test. 60 IN A {HEALTHY['tc']}",
    # RFC 7505 null MX
    "nullmx.test. 60 IN MX 0 .",
    # the MX answers of servfail.test and timeout.test once repaired
    "servfail.test. 60 IN MX 10 mx.healed.test.", "timeout.test. 60 IN MX 10 mx.healed.test.",
    f"mx.healed.test. 60 IN A {HEALTHY['healed']}",
]

DEFER_DNS = r"^451 4\.4\.3 Temporary DNS failure looking up MX"
CASES = [
    Case("MX SERVFAIL", {"x@servfail.test": Expect("deferred", DEFER_DNS)}),
    Case("MX query timeout", {"x@timeout.test": Expect("deferred", DEFER_DNS)}),
    Case("NXDOMAIN", {"x@nosuch.test": Expect("failed", r"^550 5\.1\.2 Domain nosuch\.test does not exist", dsn="5.1.2")}),
    Case("NODATA MX, A: implicit MX", {"x@implicit.test": Expect("delivered", r"^250 ", via="implicit")}),
    Case("MX hosts NX/NODATA/SERVFAIL + healthy", {"x@mixed.test": Expect("delivered", r"^250 ", via="mixed")}),
    Case("all MX hosts without address", {"x@noaddr.test": Expect("deferred", r"^451 4\.4\.4 No address for any MX")}),
    *(Case(f"dead MX, equal preference #{i}", {f"x{i}@deadeq.test": Expect("delivered", r"^250 ", via="deadeq")})
      for i in range(1, 4)),
    Case("dead MX, better preference", {"x@deadlow.test": Expect("delivered", r"^250 ", via="deadlow")}),
    Case("truncated UDP answer -> TCP", {"x@tc.test": Expect("delivered", r"^250 ", via="tc")}),
    Case("null MX", {"x@nullmx.test": Expect("failed", r"^556 5\.1\.10 .*null MX", dsn="5.1.10")}),
]
HEALED = {"x@servfail.test": "healed", "x@timeout.test": "healed", "x@noaddr.test": "healed"}


@dataclass
class DnsRun:
    first: Snapshot
    after: Snapshot
    log: str
    settled: bool
    drained: bool
    refused: list[str] = field(default_factory=list)  # log lines of refused connections to the dead MX
    queries: list[tuple[str, str, str]] = field(default_factory=list)  # what the DNS server was asked


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DnsRun]:
    port = mx_port()
    tmp = tmp_path_factory.mktemp("dnsfaults")
    with TestDns(origins=["test"]) as dns:
        dns.add(*ZONE)
        dns.zone.servfail |= {"servfail.test", "servfail.mixed.test"}
        dns.zone.drop.add("timeout.test")
        dns.zone.truncate |= {"tc.test", "mx.tc.test"}
        # One DNS timeout costs `lifetime`: keep it short (loopback answers in microseconds).
        extra = delivery_config(dns, port, dns_timeouts="timeout = 0.5\nlifetime = 1.0\n")
        with contextlib.ExitStack() as stack:
            receivers = {name: stack.enter_context(Receiver(address, port)) for name, address in HEALTHY.items()}
            bounces = stack.enter_context(Receiver(BOUNCES, port))
            relay = stack.enter_context(run_relay(tmp, extra=extra, loop=LOOP))
            scenario = Scenario(relay, receivers, bounces)
            started = time.monotonic()
            submit(relay, CASES)
            settled = scenario.settle(CASES)
            took = time.monotonic() - started
            first = scenario.snapshot()
            # Repair DNS for the deferred cases, then flush: deferral kept the mail.
            dns.zone.servfail.discard("servfail.test")
            dns.zone.drop.discard("timeout.test")
            dns.add("noaddr.test. 0 IN MX 30 mx.healed.test.")
            mailhop(relay.config, "queue", "flush")
            drained = scenario.drained()
            after = scenario.snapshot()
            result = DnsRun(first, after, relay.log(), settled, drained,
                            [line for line in relay.log_lines if DEAD in line and "Connection refused" in line],
                            list(dns.zone.queries))
        print("\n" + table("DNS faults: case -> outcome (first attempt; after DNS repair + flush)",
                           outcome_rows(CASES, [first, after]), ("case", "recipient", "first attempt", "after")))
        print(f"first attempts {'settled' if settled else 'NOT settled'} {took:.1f} s after the first submission; "
              f"dead MX tried and refused {len(result.refused)} time(s); daemon VmHWM {first.vm_hwm_kib} KiB")
        yield result


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_dns_fault_first_attempt(run: DnsRun, case: Case) -> None:
    """Each DNS fault ends the first attempt as RFC 5321 5 / RFC 7505 say (and queue, log and peers agree)."""
    check_first_attempt(run.first, case)


def test_dead_better_mx_was_tried_first(run: DnsRun) -> None:
    """The dead MX at the better preference was really tried (refused) before the healthy one took the mail."""
    assert any("dead.deadlow.test" in line for line in run.refused), run.log


def test_truncated_answers_were_asked_again_over_tcp(run: DnsRun) -> None:
    """The TC bit made the daemon repeat both the MX and the A query over TCP (RFC 7766), not give up."""
    for name, rdtype in (("tc.test", "MX"), ("mx.tc.test", "A")):
        asked = [proto for qname, qtype, proto in run.queries if (qname, qtype) == (name, rdtype)]
        assert "udp" in asked and "tcp" in asked, (name, rdtype, asked)


@pytest.mark.parametrize("rcpt", sorted(HEALED))
def test_deferred_recipient_delivered_once_after_repair(run: DnsRun, rcpt: str) -> None:
    """A DNS deferral keeps the mail: once DNS answers, a flush delivers it, exactly once, no bounce."""
    assert run.drained, f"queue not empty after the flush: {run.after.queue}"
    assert [n for n, _ in run.after.delivered.get(rcpt, [])] == [HEALED[rcpt]]
    assert [s for s, _ in run.after.outcomes[rcpt]] == ["deferred", "delivered"]
    assert rcpt not in run.after.dsns


def test_nothing_else_changed_after_the_flush(run: DnsRun) -> None:
    """Recipients that had a final outcome are not attempted again; DSNs are not sent twice."""
    finished = [r for c in CASES for r, e in c.expect.items() if e.status != "deferred"]
    for rcpt in finished:
        assert run.after.outcomes[rcpt] == run.first.outcomes[rcpt], rcpt
        assert len(run.after.delivered.get(rcpt, [])) == len(run.first.delivered.get(rcpt, [])), rcpt
    assert run.after.dsns == run.first.dsns
