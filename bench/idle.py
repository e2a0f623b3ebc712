"""10,000 idle SMTP connections: each target's memory while it holds them, and the latency of a normal
transaction meanwhile.

The benchmark opens the connections itself (asyncio, 100 connects in flight), from 250 loopback source
addresses (127.1.0.1 ... 127.1.0.250, 40 each, under mailhop's default max_connections_per_ip of 50), reads each
greeting and then stays silent. Meanwhile a probe makes one transaction at a time from 127.0.0.1 (connect,
greeting, EHLO, MAIL, RCPT, DATA with 5 KB, 250; then QUIT, not timed) and its latencies give p50 and p99; the
same probe runs first with no idle connection, as the baseline. Connections that the server closes during the
run are counted (Postfix under stress closes idle clients after 10 s).

- mailhop (delivery off, as in the accept workload): limits.max_connections raised from its default 1,000 to
  10,100, nothing else changed. Memory: VmHWM of the one process (peak RSS), VmRSS before. Targets: peak RSS
  under 150 MB, transaction under 50 ms (judged on p99).
- Postfix, raised: default_process_limit = 10,200 (the default, 100, caps smtpd processes and so concurrent
  clients). One smtpd process per connection, so its memory is summed over the master and every child:
  the sum of VmHWM (peak RSS, counting shared pages once per process, as the issue asks), and the sum of PSS
  (shared pages divided among their sharers: what the processes occupy together). The opening stops early if
  the machine's MemAvailable falls under 3 GiB, and says so.
- Postfix, as shipped (default_process_limit = 100): what it does by default. Connections beyond its smtpd
  processes and listen backlog wait for a free process; the opening phase is capped at 60 s and the probes
  give up after three that each took 30 s.

Checks: every probe that got its 250 must be queued (mailhop's queue list) or relayed to the sink (Postfix),
mailhop must exit 0 on SIGTERM with no error logged, Postfix's maillog must have no error.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .accept import RECIPIENT, SENDER, RunResult, Workload, check_postfix_relayed
from .mailhop import running_mailhop
from .memory import mem_available_kb, status_kb, tree_memory
from .postfix import private_postfix
from .procs import BenchError
from .relay import check_log
from .workloads import Options, Report

__all__ = ["run_idle"]

SMOKE_CONNECTIONS = 200
PROBES = 300
SMOKE_PROBES = 20
PER_SOURCE = 40
OPEN_CONCURRENCY = 100
OPEN_DEADLINE = 600.0
DEFAULT_POSTFIX_OPEN_DEADLINE = 60.0
MEMORY_FLOOR_KB = 3 * 1024 * 1024
RSS_TARGET_MB = 150.0
LATENCY_TARGET_MS = 50.0
BODY = b"Subject: idle-connection probe\r\n\r\n" + (b"x" * 76 + b"\r\n") * 66  # about 5 KB


@dataclass(frozen=True)
class Pace:
    """How long to wait for a connect, a greeting and a probe's 250; how many probe timeouts end probing.
    The smoke run waits less: it only shows that the harness works, Postfix's stalls included."""

    connect: float = 10.0
    greeting: float = 10.0
    probe: float = 30.0
    max_probe_timeouts: int = 3


SMOKE_PACE = Pace(connect=5.0, greeting=2.0, probe=3.0, max_probe_timeouts=1)


@dataclass(frozen=True)
class Plan:
    """Idle connections to hold, probes to make while holding them, and the pace."""

    count: int
    probes: int
    pace: Pace


class SmtpFailure(Exception):
    """The server answered with an unexpected reply code."""


async def expect(reader: asyncio.StreamReader, code: int) -> None:
    """Read one (possibly multi-line) reply and require its code."""
    while True:
        line = await reader.readline()
        if not line:
            raise SmtpFailure(f"connection closed waiting for {code}")
        if line[3:4] != b"-":
            break
    if not line.startswith(str(code).encode()):
        raise SmtpFailure(f"expected {code}, got {line.decode(errors='replace').strip()}")


async def transaction(host: str, port: int) -> float:
    """One mail transaction on a new connection; seconds from connect to the 250 after the data."""
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port)
    try:
        await expect(reader, 220)
        for command, code in ((b"EHLO probe.bench.test", 250), (f"MAIL FROM:<{SENDER}>".encode(), 250),
                              (f"RCPT TO:<{RECIPIENT}>".encode(), 250), (b"DATA", 354)):  # fmt: skip
            writer.write(command + b"\r\n")
            await expect(reader, code)
        writer.write(BODY + b".\r\n")
        await expect(reader, 250)
        elapsed = time.perf_counter() - started
        writer.write(b"QUIT\r\n")
        await expect(reader, 221)
        return elapsed
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


@dataclass
class Probe:
    """Latencies of the probe's transactions, in seconds, and how many failed or timed out."""

    latencies: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    timeouts: int = 0

    @property
    def errors(self) -> list[str]:
        """Failures other than timeouts: a refused or broken transaction, which fails the run."""
        return [failure for failure in self.failures if not failure.startswith("no 250 within")]

    def percentile(self, pct: float) -> float | None:
        """Nearest-rank percentile: with 300 samples p99 is the third slowest."""
        if not self.latencies:
            return None
        ordered = sorted(self.latencies)
        return ordered[max(0, math.ceil(pct / 100 * len(ordered)) - 1)]

    def cell(self) -> str:
        p50, p99 = self.percentile(50), self.percentile(99)
        if p50 is None or p99 is None:
            return f"none completed ({len(self.failures)} failed)"
        total = len(self.failures) + len(self.latencies)
        failed = f" ({len(self.failures)} of {total} failed)" if self.failures else ""
        return f"{p50 * 1000:.1f} / {p99 * 1000:.1f}{failed}"


async def probe(host: str, port: int, count: int, pace: Pace) -> Probe:
    """count transactions one after another; stop after pace.max_probe_timeouts that took pace.probe."""
    result = Probe()
    for _ in range(count):
        try:
            result.latencies.append(await asyncio.wait_for(transaction(host, port), pace.probe))
        except TimeoutError:
            result.timeouts += 1
            result.failures.append(f"no 250 within {pace.probe:.0f}s")
            if result.timeouts >= pace.max_probe_timeouts:
                break
        except (OSError, SmtpFailure) as exc:
            result.failures.append(f"{type(exc).__name__}: {exc}")
    return result


def source_address(index: int) -> str:
    """The index-th client address for idle connections: 127.1.0.1, ..., 127.1.0.250, 127.1.1.1, ... (all of
    127.0.0.0/8 is loopback on Linux; the probe's 127.0.0.1 stays apart)."""
    return f"127.1.{index // 250}.{index % 250 + 1}"


class IdleHolder:
    """Opens and holds the idle connections, noticing those the server closes."""

    def __init__(self, host: str, port: int, pace: Pace) -> None:
        self.host = host
        self.port = port
        self.pace = pace
        self.attempted = 0
        self.greeted = 0
        self.not_greeted = 0  # connected, no greeting within pace.greeting: waiting for a server process
        self.refused = 0  # connect failed or timed out
        self.rejected: list[str] = []  # a greeting other than 220 (e.g. 421 too many connections)
        self.closed_by_server = 0
        self.stop_reason = ""
        self._writers: list[asyncio.StreamWriter] = []
        self._watchers: list[asyncio.Task[None]] = []

    @property
    def open(self) -> int:
        return len(self._writers) - self.closed_by_server

    async def open_all(self, count: int, deadline: float, memory_ok: Callable[[], bool]) -> float:
        """Open count connections, OPEN_CONCURRENCY at a time, until done, deadline or memory runs low;
        seconds taken."""
        started = time.monotonic()
        sources = [source_address(n // PER_SOURCE) for n in range(count)]
        for first in range(0, count, OPEN_CONCURRENCY):
            if time.monotonic() - started > deadline:
                self.stop_reason = f"stopped after {deadline:.0f}s with {self.attempted} attempted"
                break
            if not memory_ok():
                floor = MEMORY_FLOOR_KB >> 20
                self.stop_reason = f"stopped at {self.attempted}: MemAvailable under {floor} GiB"
                break
            chunk = sources[first:first + OPEN_CONCURRENCY]
            self.attempted += len(chunk)
            await asyncio.gather(*(self._open_one(source) for source in chunk))
        return time.monotonic() - started

    async def _open_one(self, source: str) -> None:
        try:
            connecting = asyncio.open_connection(self.host, self.port, local_addr=(source, 0))
            reader, writer = await asyncio.wait_for(connecting, self.pace.connect)
        except (OSError, TimeoutError):
            self.refused += 1
            return
        self._writers.append(writer)
        try:
            greeting = await asyncio.wait_for(reader.readline(), self.pace.greeting)
        except TimeoutError:
            self.not_greeted += 1
            greeting = None
        except OSError:
            greeting = b""
        if greeting is not None:
            if greeting.startswith(b"220"):
                self.greeted += 1
            else:
                self.rejected.append(greeting.decode(errors="replace").strip() or "closed")
        self._watchers.append(asyncio.ensure_future(self._watch(reader)))

    async def _watch(self, reader: asyncio.StreamReader) -> None:
        """An idle client never gets anything more; any data or EOF means the server dropped it."""
        with contextlib.suppress(OSError):
            await reader.read(4096)
        self.closed_by_server += 1

    async def close(self) -> None:
        for watcher in self._watchers:
            watcher.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)
        for writer in self._writers:
            writer.close()
        await asyncio.gather(*(w.wait_closed() for w in self._writers), return_exceptions=True)

    def cell(self) -> str:
        parts = [f"{self.open} open of {self.attempted} attempted"]
        if self.not_greeted:
            parts.append(f"{self.not_greeted} never greeted")
        if self.refused:
            parts.append(f"{self.refused} failed to connect")
        if self.rejected:
            parts.append(f"{len(self.rejected)} refused ({self.rejected[0]})")
        if self.closed_by_server:
            parts.append(f"{self.closed_by_server} closed by the server")
        return ", ".join(parts)


@dataclass
class IdleRun:
    """One target configuration holding the idle connections."""

    label: str
    baseline: Probe = field(default_factory=Probe)
    loaded: Probe = field(default_factory=Probe)
    holder_cell: str = ""
    open_seconds: float = 0.0
    memory_mb: float | None = None  # mailhop: VmHWM; Postfix: sum of VmHWM
    memory_detail: str = ""
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    is_mailhop: bool = False

    def verdict(self) -> str:
        if not self.is_mailhop:
            return "-"
        p99 = self.loaded.percentile(99)
        parts = []
        if self.memory_mb is not None:
            over = self.memory_mb - RSS_TARGET_MB
            parts.append("RSS met" if over < 0 else f"RSS MISSED by {over:.0f} MB")
        if p99 is not None:
            over_ms = p99 * 1000 - LATENCY_TARGET_MS
            parts.append("p99 met" if over_ms < 0 else f"p99 MISSED by {over_ms:.0f} ms")
        return ", ".join(parts) or "-"


async def exercise(run: IdleRun, address: str, plan: Plan, deadline: float,
                   memory: Callable[[], tuple[float, str]]) -> int:  # fmt: skip
    """Baseline probe, open the idle connections, probe again, read memory, close; probes that got 250."""
    host, port_text = address.rsplit(":", 1)
    port = int(port_text)
    run.baseline = await probe(host, port, max(1, plan.probes // 3), plan.pace)
    holder = IdleHolder(host, port, plan.pace)
    try:
        run.open_seconds = await holder.open_all(
            plan.count, deadline, lambda: mem_available_kb() > MEMORY_FLOOR_KB
        )
        run.loaded = await probe(host, port, plan.probes, plan.pace)
        run.memory_mb, run.memory_detail = memory()
        run.holder_cell = holder.cell()
        if holder.stop_reason:
            run.notes.append(holder.stop_reason)
    finally:
        await holder.close()
    for failure in run.baseline.errors + run.loaded.errors:
        run.problems.append(f"probe transaction failed: {failure}")
    return len(run.baseline.latencies) + len(run.loaded.latencies)


def run_mailhop_idle(root: Path, options: Options, plan: Plan) -> IdleRun:
    """mailhop with max_connections raised to hold plan.count; its queue must hold every answered probe."""
    limit = plan.count + 100
    run = IdleRun(f"mailhop (limits.max_connections = {limit})", is_mailhop=True)
    with running_mailhop(root, options.executable, loop=options.loop,
                         limits={"max_connections": limit}) as relay:  # fmt: skip
        pid = relay.pid
        assert pid is not None
        before = status_kb(pid, "VmRSS") or 0

        def memory() -> tuple[float, str]:
            hwm, rss = status_kb(pid, "VmHWM") or 0, status_kb(pid, "VmRSS") or 0
            return hwm / 1024, f"VmRSS {before / 1024:.0f} MB before, {rss / 1024:.0f} MB holding them"

        accepted = asyncio.run(exercise(run, relay.address, plan, OPEN_DEADLINE, memory))
        problem = relay.check_queue(SENDER, [RECIPIENT]).problem(accepted)
        if problem:
            run.problems.append(problem)
        status = relay.stop()
    if status not in (0, None):
        run.problems.append(f"mailhop exited {status} on SIGTERM")
    result = RunResult("mailhop", 1)
    check_log(relay, result)
    run.problems += result.problems
    run.notes += result.notes
    return run


def run_postfix_idle(root: Path, plan: Plan, raised: bool) -> IdleRun:
    """Postfix with default_process_limit raised (or as shipped); its sink must get every answered probe."""
    limit = plan.count + 200
    settings = {"default_process_limit": str(limit)} if raised else {}
    label = f"Postfix, default_process_limit = {limit}"
    if not raised:
        label = "Postfix as shipped (default_process_limit = 100)"
    run = IdleRun(label)
    deadline = OPEN_DEADLINE if raised else DEFAULT_POSTFIX_OPEN_DEADLINE
    with private_postfix(root, settings) as postfix:
        master = postfix.postfix.master_pid()
        if master is None:
            raise BenchError("Postfix master pid not found")
        before = tree_memory(master)

        def memory() -> tuple[float, str]:
            now = tree_memory(master, with_pss=True)
            return now.hwm / 1024, (
                f"{now.processes} processes: sum of VmHWM {now.hwm / 1024:.0f} MB, of VmRSS {now.rss / 1024:.0f} "
                f"MB, of PSS {(now.pss or 0) / 1024:.0f} MB (before: {before.processes} processes, RSS "
                f"{before.rss / 1024:.0f} MB)"
            )

        accepted = asyncio.run(exercise(run, postfix.address, plan, deadline, memory))
        result = RunResult("postfix", 1)
        work = Workload(sessions=1, messages=accepted, size=len(BODY))
        try:
            postfix.wait_relayed(accepted, 120.0)
        except BenchError as exc:
            result.problems.append(str(exc))
        check_postfix_relayed(work, postfix, result, drained=None)
    run.problems += result.problems
    run.notes += result.notes
    return run


def run_idle(options: Options, base: Path) -> Report:
    """mailhop, Postfix with a raised process limit, Postfix as shipped; one run each (see module doc)."""
    if options.smoke:
        plan = Plan(SMOKE_CONNECTIONS, SMOKE_PROBES, SMOKE_PACE)
    else:
        plan = Plan(options.idle_connections, PROBES, Pace())
    raise_fd_limit(plan.count)
    runs: list[IdleRun] = []
    steps: list[tuple[str, Callable[[Path], IdleRun]]] = []
    if "mailhop" in options.targets:
        steps.append(("mailhop", lambda root: run_mailhop_idle(root, options, plan)))
    if "postfix" in options.targets:
        steps.append(("postfix-raised", lambda root: run_postfix_idle(root, plan, raised=True)))
        steps.append(("postfix-default", lambda root: run_postfix_idle(root, plan, raised=False)))
    for name, step in steps:
        root = base / f"idle-{name}"
        root.mkdir()
        try:
            run = step(root)
        except (BenchError, OSError) as exc:
            run = IdleRun(name, problems=[f"{type(exc).__name__}: {exc}"])
        print(describe(run), flush=True)
        runs.append(run)
    title = f"{plan.count:,} idle connections; transaction latency from {plan.probes} probes (one at a time)"
    return Report(title, table(runs), sum(1 for run in runs if run.problems))


def raise_fd_limit(count: int) -> None:
    """The benchmark holds the client side of every connection: lift its own descriptor limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard == resource.RLIM_INFINITY else min(hard, max(soft, count + 1024))
    if want != soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    if want != resource.RLIM_INFINITY and want < count + 256:
        raise BenchError(f"RLIMIT_NOFILE hard limit {hard} is too low to hold {count} connections")


def describe(run: IdleRun) -> str:
    """The progress lines of one run: status, connections, memory, latencies, notes."""
    status = f"FAILED: {'; '.join(run.problems)}" if run.problems else "ok"
    lines = [f"  {run.label}: {status}", f"      idle: {run.holder_cell} in {run.open_seconds:.1f}s",
             f"      memory: {run.memory_detail}",
             f"      transaction p50/p99 ms: {run.baseline.cell()} with no idle connection, "
             f"{run.loaded.cell()} holding them"]  # fmt: skip
    failures = run.baseline.failures + run.loaded.failures
    if failures:
        lines.append(f"      probe failures: {failures[0]}")
    return "\n".join([*lines, *(f"      {note}" for note in run.notes)])


def table(runs: Sequence[IdleRun]) -> list[str]:
    """The Markdown table of the idle runs and their memory details."""
    lines = [
        "| target | idle connections | peak memory MB | transaction p50 / p99 ms, no idle | "
        "p50 / p99 ms, holding them | targets (RSS < 150 MB, < 50 ms) |",
        "|---|---|---:|---|---|---|",
    ]
    for run in runs:
        memory = "FAILED" if run.problems else (f"{run.memory_mb:.0f}" if run.memory_mb is not None else "-")
        lines.append(f"| {run.label} | {run.holder_cell} | {memory} | {run.baseline.cell()} | "
                     f"{run.loaded.cell()} | {run.verdict()} |")  # fmt: skip
    lines += ["", "Peak memory: mailhop's VmHWM; Postfix's sum of VmHWM over all its processes. Details:"]
    lines += [f"- {run.label}: {run.memory_detail}" for run in runs if run.memory_detail]
    return lines
