"""Where a message's time goes: one probe client timing every step of its SMTP dialogue with mailhop, alone or
beside an ``smtp-source`` load, plus the machine's and each mailhop thread's CPU over the same time.

    .venv/bin/python -m bench.stepprobe                       # accept, probe + smtp-source -s 19 -l 5120
    .venv/bin/python -m bench.stepprobe --load 0 --size 1024  # one client alone (the 1 KB / 1 session shape)
    .venv/bin/python -m bench.stepprobe --relay --load 0 --size 1024
    MAILHOP_BENCH_WORKERS=2 .venv/bin/python -m bench.stepprobe

The probe connects, reads the greeting, sends EHLO, MAIL, RCPT, DATA, the message and QUIT, one at a time (no
pipelining, like smtp-source), and waits for each reply; every message is a new connection. The table gives
each step's median and mean in milliseconds: what a session waits for (the group commit shows as "end of data").
mailhop only (Postfix's processes come and go; its dialogue is not the question here). Nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .mailhop import default_mailhop, running_mailhop
from .postfix import SmtpSink, require
from .procs import machine_cpu_seconds, thread_cpu_seconds

__all__ = ["STEPS", "ProbeResult", "main", "message_bytes", "probe"]

STEPS = ("connect", "greeting", "EHLO", "MAIL", "RCPT", "DATA", "end of data", "QUIT")
SENDER, RECIPIENT = "probe@client.test", "probe@example.test"
REPLY_LIMIT = 64 * 1024  # a reply longer than this is not an SMTP reply: stop instead of buffering on


@dataclass
class ProbeResult:
    """Seconds per step for every completed message."""

    steps: dict[str, list[float]] = field(default_factory=lambda: {step: [] for step in STEPS})
    messages: int = 0

    def row(self, step: str) -> str:
        values = self.steps[step]
        if not values:
            return f"| {step} | - | - |"
        return f"| {step} | {statistics.median(values) * 1e3:.2f} | {statistics.mean(values) * 1e3:.2f} |"

    def table(self) -> str:
        total = sum(statistics.mean(v) for v in self.steps.values() if v) * 1e3
        return "\n".join([
            "| step | median ms | mean ms |",
            "|---|---:|---:|",
            *(self.row(step) for step in STEPS),
            f"| whole message (sum of means) | | {total:.2f} |",
        ])  # fmt: skip


def message_bytes(size: int) -> bytes:
    """A message of about size bytes, lines of 78 octets, ended by the CRLF.CRLF of DATA."""
    line = b"x" * 76 + b"\r\n"
    head = b"Subject: probe\r\n\r\n"
    return head + line * max(1, (size - len(head)) // len(line)) + b".\r\n"


def _reply(sock: socket.socket) -> bytes:
    """One whole reply (the last line has a space after the code)."""
    buf = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed by the server after {buf!r}")
        buf += chunk
        lines = buf.split(b"\r\n")
        if len(lines) > 1 and len(lines[-2]) >= 4 and lines[-2][3:4] == b" ":
            return buf
        if len(buf) > REPLY_LIMIT:
            raise ConnectionError("reply too long")


def probe(host: str, port: int, seconds: float, size: int) -> ProbeResult:
    """Send messages one at a time for seconds; each must be accepted (250), or this raises."""
    result = ProbeResult()
    body = message_bytes(size)
    commands = (("EHLO", b"EHLO probe.test\r\n"), ("MAIL", f"MAIL FROM:<{SENDER}>\r\n".encode()),
                ("RCPT", f"RCPT TO:<{RECIPIENT}>\r\n".encode()), ("DATA", b"DATA\r\n"),
                ("end of data", body), ("QUIT", b"QUIT\r\n"))  # fmt: skip
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        started = time.perf_counter()
        with socket.create_connection((host, port), timeout=30) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            connected = time.perf_counter()
            result.steps["connect"].append(connected - started)
            _reply(sock)
            result.steps["greeting"].append(time.perf_counter() - connected)
            for step, data in commands:
                sent = time.perf_counter()
                sock.sendall(data)
                reply = _reply(sock)
                result.steps[step].append(time.perf_counter() - sent)
                if step == "end of data" and not reply.startswith(b"250"):
                    raise RuntimeError(f"message refused: {reply!r}")
        result.messages += 1
    return result


@contextmanager
def _load(address: str, sessions: int, size: int) -> Iterator[None]:
    """smtp-source with sessions sessions running for as long as the block does (stopped by PID after)."""
    if sessions <= 0:
        yield
        return
    argv = [require("smtp-source"), "-s", str(sessions), "-m", "100000000", "-l", str(size),
            "-f", "a@client.test", "-t", "b@example.test", address]  # fmt: skip
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.0)  # let the load reach its steady state before the probe starts
        yield
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.stepprobe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="how long the probe sends (default 5)")
    parser.add_argument("--size", type=int, default=5120, help="message size in bytes, probe and load")
    parser.add_argument("--load", type=int, default=19, help="smtp-source sessions beside the probe (0: none)")
    parser.add_argument("--relay", action="store_true", help="relay everything to an smtp-sink (default: accept)")
    parser.add_argument("--mailhop", default=default_mailhop(), help="the mailhop to run")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mailhop-probe-") as tmp, ExitStack() as stack:
        root = Path(tmp)
        root.chmod(0o755)  # smtp-sink drops to the postfix user
        smarthost = None
        if args.relay:
            sink = SmtpSink(root)
            sink.start()
            stack.callback(sink.stop)
            smarthost = f"{sink.host}:{sink.port}"
        relay = stack.enter_context(running_mailhop(root, args.mailhop, smarthost=smarthost))
        assert relay.pid is not None
        host, port = relay.address.rsplit(":", 1)
        with _load(relay.address, args.load, args.size):
            threads_before, busy_before = thread_cpu_seconds(relay.pid), machine_cpu_seconds()
            started = time.perf_counter()
            result = probe(host, int(port), args.seconds, args.size)
            elapsed = time.perf_counter() - started
            busy, threads = machine_cpu_seconds() - busy_before, thread_cpu_seconds(relay.pid)
    workers = os.environ.get("MAILHOP_BENCH_WORKERS", "1")
    print(f"mailhop {'relay' if args.relay else 'accept'}, workers = {workers}, {args.size}-byte messages, "
          f"probe beside smtp-source -s {args.load}: {result.messages} probe messages in {elapsed:.1f} s")
    print(result.table())
    print(f"machine: {busy / elapsed:.2f} of {os.cpu_count()} cores busy")
    for key in sorted(threads):
        used = threads[key] - threads_before.get(key, 0.0)
        if used >= 0.01:
            print(f"  mailhop thread {key}: {used / elapsed:.2f} cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
