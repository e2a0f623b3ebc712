"""Downstream faults end to end: a real ``mailhop serve`` delivering to scriptable receivers on 127.0.8.x that
misbehave at every step of the SMTP dialogue (RFC 5321 3-4, 6.1; RFC 3207 STARTTLS).

One daemon takes every case at once: each case is one message to its own domain, whose MX is its own receiver
with its own fault. Timeouts are short (``[delivery] command_timeout = data_timeout = 2``) so the slow peers
cost seconds. Each recipient's first attempt is checked in the daemon's log, the queue (``mailhop queue list
--json``: deferred with the right last reply) and at the peers (the receiver holding the message, or the DSN at
the sender's own MX). Then every receiver is repaired and a ``mailhop queue flush`` retries the deferred ones:
each is then delivered exactly once -- except after a disconnect that followed the final dot, where the
receiver had the whole message and the retry makes the one duplicate RFC 5321 6.1 accepts.

``-s`` prints a table case -> outcome and the daemon's peak memory (VmHWM) after the 1 MB reply line:
``.venv/bin/pytest tests/faults/test_downstream_faults.py -s``.
"""

from __future__ import annotations

import contextlib
import re
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import trustme

from tests.daemon.harness import run_relay
from tests.delivery.engine_harness import mx_port
from tests.support.dnsserver import TestDns
from tests.support.receiver import Receiver, Session

from .test_dns_faults import (
    LOOP,
    Case,
    Expect,
    Scenario,
    Snapshot,
    check_first_attempt,
    delivery_config,
    mailhop,
    outcome_rows,
    submit,
    table,
)

BOUNCE_ADDRESS = "127.0.8.1"
TIMEOUT = 2.0  # [delivery] command_timeout and data_timeout: how long a 1-byte-per-second peer is waited for
LOST = r"^451 4\.4\.2 lost connection with mx\.\S+ after"


@dataclass(frozen=True)
class Fault:
    """A case, the receiver behaviour that causes it, and what repairs it."""

    case: Case
    options: dict[str, Any]
    heal: dict[str, Any] = field(default_factory=dict)  # the receiver's options after the repair
    tls: str | None = None  # the route's TLS policy for this domain (None: opportunistic, the default)
    copies_after: int = 1  # accepted copies per recipient at the end (0 for a failed one)

    @property
    def name(self) -> str:
        return self.case.name

    @property
    def domain(self) -> str:
        return self.case.rcpts[0].split("@")[1]


def fault(name: str, domain: str, status: str, reply: str, options: dict[str, Any], *, dsn: str | None = None,
          **kw: Any) -> Fault:
    """A one-recipient fault: x@DOMAIN, delivered (if at all) by the receiver named DOMAIN."""
    return Fault(Case(name, {f"x@{domain}": Expect(status, reply, via=domain, dsn=dsn)}), options,
                 copies_after=kw.pop("copies_after", 0 if status == "failed" else 1), **kw)


def refuse(verb: str, reply: str) -> dict[str, Any]:
    """Receiver options answering ``verb`` with ``reply`` instead of processing it."""
    return {"on_command": {verb: reply}}


RCPT = Fault(
    Case("RCPT 250 / 550 / 451", {
        "good@rcpt.test": Expect("delivered", r"^250 ", via="rcpt.test"),
        "bad@rcpt.test": Expect("failed", r"^550 5\.1\.1 ", dsn="5.1.1"),
        "later@rcpt.test": Expect("deferred", r"^451 4\.2\.1 ", via="rcpt.test"),
    }),
    {"on_rcpt": {"bad@rcpt.test": "550 5.1.1 No such user", "later@rcpt.test": "451 4.2.1 Mailbox busy"}},
)
BIG_BODY = b"".join(b"line %05d of a message long enough to be cut in the middle\r\n" % i for i in range(1500))

FAULTS = [
    fault("421 at greeting", "greet421.test", "deferred", r"^421 4\.3\.2 .*said: 421 ",
          {"greeting": "421 4.3.2 Service shutting down"}),
    fault("EHLO 4xx", "ehlo4xx.test", "deferred", r"^451 4\.3\.0 .*said: 451 ", refuse("EHLO", "451 4.3.0 Later")),
    fault("EHLO 5xx -> HELO", "ehlo5xx.test", "delivered", r"^250 ", refuse("EHLO", "550 5.5.1 No ESMTP here")),
    fault("EHLO and HELO 5xx", "helo5xx.test", "deferred", r"^451 4\.5\.1 .*said: 554 ",
          {"on_command": {"EHLO": "554 5.5.1 Go away", "HELO": "554 5.5.1 Go away"}}),
    fault("MAIL 4xx", "mail4xx.test", "deferred", r"^451 4\.3\.0 ", {"on_mail": lambda _: "451 4.3.0 Sender later"}),
    fault("MAIL 5xx", "mail5xx.test", "failed", r"^550 5\.7\.1 ", {"on_mail": lambda _: "550 5.7.1 Sender refused"},
          dsn="5.7.1"),
    RCPT,
    fault("DATA 4xx", "data4xx.test", "deferred", r"^451 4\.3\.0 ", refuse("DATA", "451 4.3.0 No DATA now")),
    fault("DATA 5xx", "data5xx.test", "failed", r"^554 5\.3\.0 ", refuse("DATA", "554 5.3.0 No DATA ever"),
          dsn="5.3.0"),
    fault("end of data 4xx", "end4xx.test", "deferred", r"^451 4\.3\.0 ",
          {"on_data_end": lambda _: "451 4.3.0 Try again"}),
    fault("end of data 5xx", "end5xx.test", "failed", r"^554 5\.7\.1 ",
          {"on_data_end": lambda _: "554 5.7.1 Content rejected"}, dsn="5.7.1"),
    fault("disconnect at EHLO", "dcehlo.test", "deferred", r"^451 4\.4\.2 .*: connection closed by the server",
          {"disconnect_after": "EHLO"}),
    fault("disconnect at MAIL", "dcmail.test", "deferred", LOST + " MAIL: connection closed by the server",
          {"disconnect_after": "MAIL"}),
    fault("disconnect at RCPT", "dcrcpt.test", "deferred", LOST + " RCPT", {"disconnect_after": "RCPT"}),
    fault("disconnect at DATA", "dcdata.test", "deferred", LOST + " DATA", {"disconnect_after": "DATA"}),
    Fault(Case("disconnect mid-DATA", {"x@dcmid.test": Expect("deferred", LOST + " (message content|end of data)",
                                                              via="dcmid.test")}, BIG_BODY),
          {"disconnect_mid_data": 4096}),
    fault("disconnect after final dot", "dcdot.test", "deferred", LOST + " end of data",
          {"disconnect_after": "."}, copies_after=2),
    fault("greeting at 1 byte/s", "slowgreet.test", "deferred", rf"^451 4\.4\.2 .*: timed out after {TIMEOUT:g}s",
          {"bytes_per_second": 1, "slow_on": ["CONNECT"]}),
    fault("MAIL reply at 1 byte/s", "slowmail.test", "deferred", LOST + rf" MAIL: timed out after {TIMEOUT:g}s",
          {"bytes_per_second": 1, "slow_on": ["MAIL"]}),
    fault("1 MB reply line", "huge.test", "deferred", r"reply line longer than 2048 octets",
          {"huge_reply_line": 1_000_000}),
    fault("TLS handshake fails, opportunistic", "tlsopp.test", "delivered", r"^250 ", {"tls_handshake_fail": "close"}),
    fault("TLS handshake fails, required", "tlsreq.test", "deferred", r"^451 4\.7\.5 TLS required",
          {"tls_handshake_fail": "garbage"}, tls="required", heal={"tls_context": "good"}),
    fault("TLS certificate wrong name, verify", "tlsverify.test", "deferred", r"^451 4\.7\.5 TLS required",
          {"tls_context": "wrong"}, tls="verify", heal={"tls_context": "good"}),
    fault("STARTTLS response injection", "tlsinject.test", "delivered", r"^250 2\.0\.0 Ok: queued",
          {"tls_context": "good", "starttls_inject": True}, tls="required", heal={"tls_context": "good"}),
]
BY_NAME = {f.name: f for f in FAULTS}


@dataclass
class DownRun:
    first: Snapshot
    after: Snapshot
    scenario: Scenario
    log: str
    hwm_before_kib: int | None


def _options(spec: dict[str, Any], contexts: dict[str, ssl.SSLContext]) -> dict[str, Any]:
    return {k: contexts[v] if k == "tls_context" else v for k, v in spec.items()}


def _routes() -> str:
    return "".join(f'[[route]]\ndomains = ["{f.domain}"]\nvia = "mx"\ntls = "{f.tls}"\n' for f in FAULTS if f.tls)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DownRun]:
    port = mx_port()
    tmp = tmp_path_factory.mktemp("downstream")
    ca = trustme.CA()
    cafile = tmp / "ca.pem"
    ca.cert_pem.write_to_path(str(cafile))
    contexts = {}
    for name, host in (("good", [f"mx.{f.domain}" for f in FAULTS]), ("wrong", ["wrong-name.example"])):
        contexts[name] = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert(*host).configure_cert(contexts[name])
    addresses = {f.domain: f"127.0.8.{10 + i}" for i, f in enumerate(FAULTS)}
    with TestDns(origins=["test"]) as dns, contextlib.ExitStack() as stack:
        dns.add("from.test. 60 IN MX 10 mx.from.test.", f"mx.from.test. 60 IN A {BOUNCE_ADDRESS}")
        for domain, address in addresses.items():
            dns.add(f"{domain}. 60 IN MX 10 mx.{domain}.", f"mx.{domain}. 60 IN A {address}")
        receivers = {f.domain: stack.enter_context(Receiver(addresses[f.domain], port,
                                                            **_options(f.options, contexts))) for f in FAULTS}
        bounces = stack.enter_context(Receiver(BOUNCE_ADDRESS, port))
        extra = delivery_config(dns, port, delivery=f"command_timeout = {TIMEOUT}\ndata_timeout = {TIMEOUT}\n",
                                routes=_routes())
        # "verify" trusts the system store: point it at our CA (OpenSSL reads SSL_CERT_FILE).
        relay = stack.enter_context(run_relay(tmp, extra=extra, loop=LOOP, env={"SSL_CERT_FILE": str(cafile)}))
        scenario = Scenario(relay, receivers, bounces)
        hwm_before = scenario.snapshot().vm_hwm_kib
        started = time.monotonic()
        submit(relay, [f.case for f in FAULTS])
        settled = scenario.settle([f.case for f in FAULTS])
        took = time.monotonic() - started
        first = scenario.snapshot()
        for f in FAULTS:  # repair every receiver, then retry the deferred recipients now
            receivers[f.domain].options = type(receivers[f.domain].options)(**_options(f.heal, contexts))
        mailhop(relay.config, "queue", "flush")
        scenario.drained()
        after = scenario.snapshot()
        result = DownRun(first, after, scenario, relay.log(), hwm_before)
        print("\n" + table("Downstream faults: case -> outcome (first attempt; after repair + flush)",
                           outcome_rows([f.case for f in FAULTS], [first, after]),
                           ("case", "recipient", "first attempt", "after")))
        print(f"first attempts {'settled' if settled else 'NOT settled'} {took:.1f} s after the first submission "
              f"(command/data timeout {TIMEOUT:g} s)")
        print(f"daemon VmHWM: {hwm_before} KiB before, {first.vm_hwm_kib} KiB after the first attempts "
              f"(1 MB reply line included), {after.vm_hwm_kib} KiB at the end")
        yield result


@pytest.mark.parametrize("name", list(BY_NAME))
def test_first_attempt(run: DownRun, name: str) -> None:
    """Each fault ends the first attempt with the right per-recipient outcome; queue, log and peers agree."""
    check_first_attempt(run.first, BY_NAME[name].case)


@pytest.mark.parametrize("name", list(BY_NAME))
def test_after_repair_each_recipient_has_its_copies(run: DownRun, name: str) -> None:
    """After the repair and a flush the queue is empty and each recipient has exactly its copies: one, none for a
    failed recipient, two after the disconnect that followed the final dot (RFC 5321 6.1) -- never more."""
    f = BY_NAME[name]
    assert run.after.queue == {} or not any(r in run.after.queue for r in f.case.rcpts), run.after.queue
    for rcpt, want in f.case.expect.items():
        copies = [n for n, _ in run.after.delivered.get(rcpt, [])]
        expected = 0 if want.status == "failed" else (f.copies_after if want.status == "deferred" else 1)
        assert copies == [f.domain] * expected, f"{rcpt}: copies at {copies}, expected {expected}"
        if want.status != "deferred":  # a final outcome is never attempted again
            assert run.after.outcomes[rcpt] == run.first.outcomes[rcpt]


def _sessions(run: DownRun, domain: str) -> list[Session]:
    return run.scenario.receivers[domain].sessions


def test_ehlo_5xx_falls_back_to_helo(run: DownRun) -> None:
    [(_, tx)] = run.first.delivered["x@ehlo5xx.test"]
    assert not tx.ehlo and _sessions(run, "ehlo5xx.test")[0].verbs()[:2] == ["EHLO", "HELO"]


def test_ehlo_4xx_does_not_fall_back_to_helo(run: DownRun) -> None:
    assert "HELO" not in _sessions(run, "ehlo4xx.test")[0].verbs()


def test_no_partial_message_after_mid_data_disconnect(run: DownRun) -> None:
    """The receiver dropped the connection mid-DATA: it never had a complete message; the retry sends one whole."""
    assert run.first.received["dcmid.test"] == 0
    assert "DATA" in _sessions(run, "dcmid.test")[0].verbs()
    [(_, tx)] = run.after.delivered["x@dcmid.test"]
    assert tx.data.endswith(BIG_BODY)


@pytest.mark.parametrize("domain", ["slowgreet.test", "slowmail.test", "huge.test"])
def test_bounded_peer_is_dropped_without_sending_mail(run: DownRun, domain: str) -> None:
    """A peer too slow or too verbose is dropped before any message is sent (and nothing hangs: it settled)."""
    assert "DATA" not in _sessions(run, domain)[0].verbs()


def _mail_in_clear(session: Session) -> bool:
    verbs = session.verbs()
    if "MAIL" not in verbs:
        return False
    return not session.tls or "STARTTLS" not in verbs or verbs.index("MAIL") < verbs.index("STARTTLS")


def test_required_and_verify_never_send_in_clear(run: DownRun) -> None:
    """With tls = required / verify a failed handshake defers: no MAIL ever in plaintext, before or after, and no
    second, plaintext connection."""
    for domain in ("tlsreq.test", "tlsverify.test"):
        sessions = _sessions(run, domain)
        assert run.first.sessions[domain] == 1, domain
        assert "STARTTLS" in sessions[0].verbs() and "MAIL" not in sessions[0].verbs(), domain
        assert not any(_mail_in_clear(s) for s in sessions), domain
        [(_, tx)] = run.after.delivered[f"x@{domain}"]
        assert tx.tls, domain


def test_opportunistic_falls_back_to_plaintext(run: DownRun) -> None:
    first, second = _sessions(run, "tlsopp.test")[:2]
    assert "STARTTLS" in first.verbs() and "MAIL" not in first.verbs()
    assert "STARTTLS" not in second.verbs() and "MAIL" in second.verbs()
    [(_, tx)] = run.first.delivered["x@tlsopp.test"]
    assert not tx.tls


def test_starttls_injection_is_discarded(run: DownRun) -> None:
    """The "250-evil" sent with the 220 is thrown away: the dialogue continues in TLS, in step."""
    [session] = _sessions(run, "tlsinject.test")[:1]
    assert session.verbs()[:4] == ["EHLO", "STARTTLS", "EHLO", "MAIL"] and session.tls
    [(_, tx)] = run.first.delivered["x@tlsinject.test"]
    assert tx.tls and tx.mail_params and tx.mail_params[0].startswith("SIZE=")  # the real post-TLS EHLO was used
    assert re.search(r"discarded [1-9]\d* plaintext octets after STARTTLS from mx\.tlsinject\.test", run.log)

