"""Cost of the authentication checks: accept rate of 5 KB DKIM-signed messages with SPF + DKIM + DMARC on versus
off, alternating in one run (``.venv/bin/python -m bench.checks``; ``--smoke`` for a seconds-long harness check).

Everything is loopback: a dnslib server started here publishes the sender domain's SPF record, its DKIM key and
a DMARC p=reject record, and mailhop resolves through it. smtp-source cannot send a signed message, so the load
comes from a small asyncio client: ``sessions`` connections, each sending its share of messages over one SMTP
session (MAIL, RCPT, DATA repeated). A run counts only if mailhop's queue holds every message afterwards and,
with checks on, a sampled stored message carries spf=pass, dkim=pass and dmarc=pass.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from tests.support.dnsserver import TestDns

from .mailhop import default_mailhop
from .procs import BenchError, free_port, port_open, stop_process, wait_until

SENDER = "news@sender.test"
RECIPIENT = "user@example.test"
SELECTOR = "bench"


def make_message(key_pem: bytes, size: int = 5120) -> bytes:
    """A DKIM-signed message (RSA-2048, relaxed/relaxed) of about ``size`` octets."""
    line = b"The quick brown fox jumps over the lazy dog, again and again and again.\r\n"
    body = line * (size // len(line))
    headers = (f"From: News <{SENDER}>\r\nTo: <{RECIPIENT}>\r\nSubject: benchmark\r\n"
               "Date: Mon, 30 Nov 2026 10:00:00 +0000\r\nMessage-ID: <bench@sender.test>\r\n").encode()
    msg = headers + b"\r\n" + body
    sig = dkim.sign(msg, SELECTOR.encode(), b"sender.test", key_pem, canonicalize=(b"relaxed", b"relaxed"),
                    include_headers=[b"from", b"to", b"subject", b"date", b"message-id"])
    return bytes(sig) + msg


def dns_records(dns: TestDns, public_b64: str) -> None:
    dns.add('sender.test. 300 IN TXT "v=spf1 ip4:127.0.0.0/8 -all"',
            "sender.test. 300 IN A 127.0.0.99",
            '_dmarc.sender.test. 300 IN TXT "v=DMARC1; p=reject; adkim=r; aspf=r"')
    chunks = " ".join(f'"{public_b64[i:i + 200]}"' for i in range(0, len(public_b64), 200))
    dns.add(f'{SELECTOR}._domainkey.sender.test. 300 IN TXT "v=DKIM1; k=rsa; p=" {chunks}')


def config(port: int, spool: Path, nameserver: str, checks: bool) -> str:
    lines = [
        'hostname = "mailhop.bench.test"',
        "[[listener]]", f'address = "127.0.0.1:{port}"', 'role = "mx"',
        # Not trusted: SPF and DMARC are skipped for trusted clients, and we want them evaluated.
        "[relay]", 'trusted_networks = ["10.255.255.0/24"]', 'domains = ["example.test"]',
        "[queue]", f"path = {json.dumps(str(spool))}",
        "[delivery]", "enabled = false",
        "[dns]", f'nameservers = ["{nameserver}"]',
        "[log]", 'level = "warning"',
    ]
    if checks:
        lines += ["[checks.spf]", "enabled = true", "[checks.dkim]", "enabled = true", "[checks.dmarc]",
                  "enabled = true"]
    return "\n".join(lines) + "\n"


async def _session(port: int, count: int, payload: bytes) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def reply() -> bytes:
        while True:
            line = await reader.readline()
            if not line:
                raise BenchError("mailhop closed the connection")
            if line[3:4] != b"-":
                return line

    await reply()
    writer.write(b"EHLO load.sender.test\r\n")
    await reply()
    ok = 0
    for _ in range(count):
        # Pipelined (RFC 2920), as a bulk sender would: one write for the envelope, one for the content.
        writer.write(f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{RECIPIENT}>\r\nDATA\r\n".encode())
        codes = [await reply() for _ in range(3)]
        if not codes[2].startswith(b"354"):
            raise BenchError(f"unexpected replies {codes!r}")
        writer.write(payload)
        final = await reply()
        if not final.startswith(b"250"):
            raise BenchError(f"message refused: {final!r}")
        ok += 1
    writer.write(b"QUIT\r\n")
    await reply()
    writer.close()
    return ok


async def _load(port: int, sessions: int, messages: int, payload: bytes) -> int:
    share = [messages // sessions + (1 if i < messages % sessions else 0) for i in range(sessions)]
    return sum(await asyncio.gather(*(_session(port, n, payload) for n in share if n)))


def one_run(root: Path, nameserver: str, payload: bytes, *, checks: bool, sessions: int, messages: int) -> float:
    """Messages per second for one fresh relay; raises BenchError when the result cannot be trusted."""
    root.mkdir(parents=True)
    port = free_port()
    cfg = root / "mailhop.toml"
    cfg.write_text(config(port, root / "spool", nameserver, checks))
    err = (root / "stderr").open("wb")
    proc = subprocess.Popen([default_mailhop(), "serve", "--config", str(cfg)], stdout=err, stderr=err)
    try:
        wait_until(lambda: port_open("127.0.0.1", port), 60, "mailhop")
        started = time.perf_counter()
        sent = asyncio.run(_load(port, sessions, messages, payload))
        seconds = time.perf_counter() - started
        out = subprocess.run([default_mailhop(), "queue", "list", "--json", "--config", str(cfg)],
                             capture_output=True, text=True, timeout=300, check=True).stdout.splitlines()
        if sent != messages or len(out) != messages:
            raise BenchError(f"sent {sent}, queued {len(out)}, expected {messages}")
        if checks:
            qid = json.loads(out[0])["id"]
            shown = subprocess.run([default_mailhop(), "queue", "show", qid, "--body", "--config", str(cfg)],
                                   capture_output=True, text=True, timeout=60, check=True).stdout
            for want in ("spf=pass", "dkim=pass", "dmarc=pass"):
                if want not in shown:
                    raise BenchError(f"stored message lacks {want}: the checks did not run as configured")
        return messages / seconds
    finally:
        stop_process(proc, 60)
        err.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a few hundred messages, one repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--sessions", type=int, default=20)
    args = parser.parse_args(argv)
    if args.smoke:
        args.repeats, args.messages = 1, 200
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.DER,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    payload = make_message(pem).replace(b"\r\n.", b"\r\n..") + b".\r\n"
    rates: dict[bool, list[float]] = {False: [], True: []}
    with TestDns(origins=("test",)) as dns, tempfile.TemporaryDirectory(prefix="mailhop-bench-") as tmp:
        dns_records(dns, base64.b64encode(public).decode())
        for repeat in range(args.repeats):
            for checks in (False, True):
                rate = one_run(Path(tmp) / f"{repeat}-{checks}", dns.nameserver, payload, checks=checks,
                               sessions=args.sessions, messages=args.messages)
                rates[checks].append(rate)
                print(f"repeat {repeat + 1}: checks {'on ' if checks else 'off'} {rate:8.0f} msgs/s", flush=True)
    off, on = statistics.median(rates[False]), statistics.median(rates[True])
    print(f"\n5 KB signed, {args.sessions} sessions, {args.messages} messages, median of {args.repeats}:")
    print(f"  checks off: {off:.0f} msgs/s   SPF+DKIM+DMARC on: {on:.0f} msgs/s   ratio {on / off:.2f}   "
          f"cost {1000 * (1 / on - 1 / off):.2f} ms per message")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
