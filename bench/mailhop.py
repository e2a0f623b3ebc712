"""A throw-away mailhop relay for benchmarks: its own config and spool in a temp dir, stopped with SIGTERM.

The relay is driven through its public interfaces only (``mailhop serve`` and ``mailhop queue list``), so the
benchmark measures what an operator would run, and its count of queued messages is what an operator would see.
It runs accept-only (delivery off, mail stays queued) or, given a smarthost, relaying everything to it.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .procs import BenchError, free_port, port_open, stop_process, wait_until

__all__ = [
    "DEFAULT_PER_DESTINATION",
    "LOOPS",
    "MAILHOP_RCPTS_PER_TRANSACTION",
    "MailhopRelay",
    "QueueCheck",
    "default_mailhop",
    "running_mailhop",
]

LOOPBACK = "127.0.0.1"
START_TIMEOUT = 60.0
STOP_TIMEOUT = 60.0
LIST_TIMEOUT = 300.0
READY_MARK = "ready listeners="
STDERR_TAIL_LINES = 8
LOOPS = ("auto", "asyncio", "uvloop")  # mailhop serve --loop; auto is uvloop when installed
DEFAULT_PER_DESTINATION = 20  # Postfix's default_destination_concurrency_limit
# mailhop's default [delivery] max_recipients_per_transaction, left at its default: a message with more
# recipients than this reaches the sink as several transactions.
MAILHOP_RCPTS_PER_TRANSACTION = 100


def default_mailhop() -> str:
    """The ``mailhop`` script beside the running interpreter (the project venv when run as .venv/bin/python)."""
    return str(Path(sys.executable).with_name("mailhop"))


def config_toml(
    port: int,
    spool: Path,
    smarthost: str | None = None,
    per_destination: int = DEFAULT_PER_DESTINATION,
    limits: Mapping[str, int] | None = None,
) -> str:
    """Benchmark config: one loopback listener, loopback trusted, a private spool, warnings only.

    Without smarthost delivery is off (accept-only); with one ("HOST:PORT") every domain is relayed there in
    clear, with at most per_destination connections to it. limits sets keys of ``[limits]`` (the idle
    connections workload raises max_connections); the others stay at their defaults.
    """
    limit_lines = ["[limits]", *(f"{key} = {value}" for key, value in (limits or {}).items()), ""]
    if smarthost is None:
        delivery = [
            "[delivery]",
            "# Accept-only, and nothing leaves the machine: example.test would go to the system resolver.",
            "enabled = false",
        ]
        route: list[str] = []
    else:
        delivery = [
            "[delivery]",
            "enabled = true",
            f"max_connections_per_destination = {per_destination}",
        ]
        route = [
            "# Everything goes to the benchmark's sink; no MX lookup is ever made.",
            "[[route]]",
            'domains = ["*"]',
            f'via = "smtp://{smarthost}"',
            'tls = "none"',
            "",
        ]
    # MAILHOP_BENCH_WORKERS=N runs mailhop with `workers = N` (one shared-nothing worker per core).
    workers = os.environ.get("MAILHOP_BENCH_WORKERS", "1")
    return "\n".join(
        [
            'hostname = "mailhop.bench.test"',
            f"workers = {int(workers)}",
            "",
            "[[listener]]",
            f'address = "{LOOPBACK}:{port}"',
            'role = "mx"',
            "",
            "[relay]",
            'trusted_networks = ["127.0.0.0/8"]',
            "",
            "[queue]",
            f"path = {json.dumps(str(spool))}",
            *([f"inline_body_max = {int(os.environ['MAILHOP_BENCH_INLINE_MAX'])}"]
              if os.environ.get("MAILHOP_BENCH_INLINE_MAX") else []),
            *([f"page_size = {int(os.environ['MAILHOP_BENCH_PAGE_SIZE'])}"]
              if os.environ.get("MAILHOP_BENCH_PAGE_SIZE") else []),
            *([f"segment_min = {int(os.environ['MAILHOP_BENCH_SEGMENT_MIN'])}"]
              if os.environ.get("MAILHOP_BENCH_SEGMENT_MIN") else []),
            "",
            *delivery,
            "",
            "[dns]",
            "# Should anything resolve anyway, it asks loopback, where nothing answers.",
            'nameservers = ["127.0.0.1:53"]',
            "",
            "[log]",
            'level = "warning"',
            "",
            *(limit_lines if limits else []),
            *route,
        ]
    )


@dataclass(frozen=True)
class QueueCheck:
    """What the queue held after a run, from the CLI and straight from the database."""

    listed: int
    matching: int
    db_rows: int | None

    def problem(self, expected: int) -> str | None:
        """Why this queue does not prove expected messages were accepted, or None when it does."""
        if self.listed != expected:
            return f"mailhop queue list shows {self.listed} messages, expected {expected}"
        if self.matching != expected:
            return f"only {self.matching} of {self.listed} queued messages have the benchmark envelope"
        if self.db_rows is not None and self.db_rows != expected:
            return f"queue.db table messages has {self.db_rows} rows, expected {expected}"
        return None


class MailhopRelay:
    """One mailhop process serving a fresh spool under root."""

    def __init__(
        self,
        root: Path,
        executable: str | None = None,
        port: int | None = None,
        *,
        smarthost: str | None = None,
        per_destination: int = DEFAULT_PER_DESTINATION,
        loop: str = "auto",
        limits: Mapping[str, int] | None = None,
        start_timeout: float = START_TIMEOUT,
    ) -> None:
        if loop not in LOOPS:
            raise ValueError(f"loop must be one of {', '.join(LOOPS)}")
        self.root = root
        self.executable = executable or default_mailhop()
        self.port = port or free_port(LOOPBACK)
        self.smarthost = smarthost
        self.per_destination = per_destination
        self.loop = loop
        self.limits = dict(limits or {})
        self.start_timeout = start_timeout
        self.config = root / "mailhop.toml"
        self.spool = root / "spool"
        self.stderr_path = root / "mailhop.stderr"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def pid(self) -> int | None:
        """PID of the running ``mailhop serve`` (for a profiler), None when stopped."""
        return self._proc.pid if self._proc is not None else None

    def start(self) -> None:
        """Write the config, start ``mailhop serve`` and wait until it is ready (log line or open port)."""
        if not Path(self.executable).exists():
            raise BenchError(f"mailhop not found at {self.executable}: run scripts/setup.sh")
        self.config.write_text(
            config_toml(self.port, self.spool, self.smarthost, self.per_destination, self.limits)
        )
        argv = [self.executable, "serve", "--loop", self.loop, "--config", str(self.config)]
        with self.stderr_path.open("wb") as err:
            self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err)
        wait_until(self._ready, self.start_timeout, f"mailhop on {self.address}")

    def stderr(self) -> str:
        """What the relay has logged so far."""
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def _ready(self) -> bool:
        # At level "warning" the info-level ready line is suppressed, so an accepting port counts too.
        if self._proc is not None and self._proc.poll() is not None:
            tail = "\n".join(self.stderr().splitlines()[-STDERR_TAIL_LINES:])
            raise BenchError(f"mailhop exited {self._proc.returncode} before it was ready:\n{tail}")
        return READY_MARK in self.stderr() or port_open(LOOPBACK, self.port)

    def stop(self) -> int | None:
        """SIGTERM the relay (it finishes in-flight transactions) and reap it; its exit status."""
        if self._proc is None:
            return None
        status = stop_process(self._proc, STOP_TIMEOUT)
        self._proc = None
        return status

    def check_queue(self, sender: str, recipients: Sequence[str]) -> QueueCheck:
        """Count queued messages via ``mailhop queue list --json`` and cross-check queue.db directly; a message
        matches when it has sender and exactly these recipients."""
        entries = self.list_queue()
        matching = sum(1 for entry in entries if _has_envelope(entry, sender, recipients))
        return QueueCheck(listed=len(entries), matching=matching, db_rows=self.db_rows())

    def list_queue(self, *options: str) -> list[dict[str, object]]:
        """``mailhop queue list --json [options]``, one dict per queued message."""
        argv = [self.executable, "queue", "list", "--json", *options, "--config", str(self.config)]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=LIST_TIMEOUT, check=False)
        if result.returncode != 0:
            raise BenchError(f"mailhop queue list failed (exit {result.returncode}): {result.stderr.strip()}")
        return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]

    def wait_drained(self, timeout: float, rows: int = 0) -> float:
        """Wait until queue.db holds only rows messages (0: every delivery recorded); seconds waited."""
        started = time.monotonic()
        wait_until(lambda: self.db_rows() == rows, timeout, f"mailhop's queue.db to be down to {rows} messages")
        return time.monotonic() - started

    def db_rows(self) -> int | None:
        """Rows in table messages of ``<spool>/queue.db`` (and of every ``shard-N/queue.db`` when mailhop runs
        several workers), read-only; None if the layout is not what we expect."""
        dbs = [self.spool / "queue.db", *sorted(self.spool.glob("shard-*/queue.db"))]
        if not dbs[0].exists():
            return None
        total = 0
        for db in dbs:
            try:
                with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as conn:
                    row = conn.execute("SELECT count(*) FROM messages").fetchone()
            except sqlite3.Error:
                return None
            total += int(row[0])
        return total


def _has_envelope(entry: object, sender: str, recipients: Sequence[str]) -> bool:
    """Whether one ``queue list --json`` object carries the benchmark's sender and exactly its recipients."""
    if not isinstance(entry, dict):
        return False
    listed = entry.get("recipients") or []
    addresses = [str(r.get("address")) for r in listed if isinstance(r, dict)]
    return bool(entry.get("sender") == sender and sorted(addresses) == sorted(recipients))


@contextmanager
def running_mailhop(
    root: Path,
    executable: str | None = None,
    *,
    smarthost: str | None = None,
    per_destination: int = DEFAULT_PER_DESTINATION,
    loop: str = "auto",
    limits: Mapping[str, int] | None = None,
    start_timeout: float = START_TIMEOUT,
) -> Iterator[MailhopRelay]:
    """A started relay under root, stopped (by PID, SIGTERM then SIGKILL) whatever happens. A spool already
    under ``root/spool`` (the queue-scale workload's) is served as it is."""
    relay = MailhopRelay(
        root, executable, smarthost=smarthost, per_destination=per_destination, loop=loop, limits=limits,
        start_timeout=start_timeout,
    )  # fmt: skip
    relay.start()
    try:
        yield relay
    finally:
        relay.stop()
