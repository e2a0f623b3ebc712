"""Queue scale: mailhop's accept and relay rates with a million deferred messages already queued, against an
empty queue, and the time of ``mailhop queue list --domain ONE_DOMAIN`` in that queue. mailhop only.

Opt-in (``--workloads queue-scale``): building the spool takes a minute or two and about 700 MB of disk, in
the run's temp dir. The spool is built once (``bench/queuefill.py``: 1,000,000 messages, one recipient each,
deferred with the next attempt three days ahead, spread over 1,000 domains, small inline bodies) and copied
for each run, so every run starts from the same queue.

Each run starts a fresh mailhop relaying to a fresh smtp-sink, as in the relay workload (delivery on: its
scheduler runs against the big queue, which has nothing due), and sends the relay workload's load,
``smtp-source -s 20 -m 20000 -l 5120``. Two figures per run: the accept rate (messages / smtp-source's wall
time) and the relay rate (messages / time until the sink has them all). Runs alternate empty and full queue.
Target: the accept rate with the full queue within 20 % of the empty queue's. The time from starting
``mailhop serve`` until it accepts connections is reported too: start-up recovery reads every queued message.

Checks: the sink counts exactly the messages sent, the queue then drains back to the rows it started with,
no message is held after start (recovery holds any message it cannot use, so this proves the filler's rows
are valid), ``queue list --domain`` lists exactly that domain's messages, mailhop exits 0 on SIGTERM and logs
no error.
"""

from __future__ import annotations

import os
import re
import shutil
import statistics
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .accept import RunResult, Workload
from .mailhop import MailhopRelay, running_mailhop
from .postfix import SmtpSink
from .procs import BenchError
from .queuefill import domain_name, fill_queue, held_count
from .relay import check_log, time_relay
from .workloads import Options, Report

__all__ = ["run_queue_scale"]

SMOKE_QUEUED = 10_000
DOMAINS = 1000
MESSAGES = 20_000
START_TIMEOUT = 900.0  # recovery reads every message before the listener opens
DRAIN_TIMEOUT = 120.0
LIST_REPEATS = 3
LIST_DOMAIN = 42
ACCEPT_TARGET = 0.8  # full-queue accept rate at least this fraction of the empty queue's
LISTED = re.compile(r"^(\d+) message\(s\)$", re.MULTILINE)


@dataclass
class ScaleRun:
    """One run with an empty or a full queue."""

    queued: int
    repeat: int
    start_seconds: float = 0.0
    accept_rate: float | None = None
    relay_rate: float | None = None
    list_seconds: list[float] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and self.accept_rate is not None and self.relay_rate is not None


def time_list(relay: MailhopRelay, domain: str, expected: int, run: ScaleRun, repeats: int) -> None:
    """``mailhop queue list --domain`` as an operator runs it (table output), timed, repeats times."""
    argv = [relay.executable, "queue", "list", "--domain", domain, "--config", str(relay.config)]
    for _ in range(repeats):
        started = time.perf_counter()
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
        run.list_seconds.append(time.perf_counter() - started)
        found = LISTED.findall(proc.stdout)
        if proc.returncode != 0 or not found or int(found[-1]) != expected:
            run.problems.append(
                f"queue list --domain {domain}: exit {proc.returncode}, listed {found[-1] if found else '?'}, "
                f"expected {expected}: {proc.stderr.strip()[:200]}"
            )
            return


def one_run(template: Path | None, queued: int, domains: int, root: Path, repeat: int, options: Options,
            messages: int) -> ScaleRun:  # fmt: skip
    """One mailhop on a copy of template (or an empty spool) relaying messages to a fresh sink."""
    run = ScaleRun(queued, repeat)
    if template is not None:
        shutil.copytree(template, root / "spool")
        # Write the copy out now: its dirty pages flushed during the run would slow mailhop's fsyncs.
        os.sync()
    work = Workload(sessions=20, messages=messages, size=5120, kind="relay")
    result = RunResult("mailhop", repeat)
    sink = SmtpSink(root)
    sink.start()
    try:
        started = time.perf_counter()
        with running_mailhop(root, options.executable, smarthost=f"{sink.host}:{sink.port}",
                             per_destination=options.per_destination, loop=options.loop,
                             start_timeout=START_TIMEOUT) as relay:  # fmt: skip
            run.start_seconds = time.perf_counter() - started
            held = held_count(relay.spool) if queued else 0
            if held:
                run.problems.append(f"{held} messages held after start: recovery refused them")
            source = time_relay(work, relay.address, sink, root, result, messages)
            if source:
                run.accept_rate = messages / source
            run.relay_rate = result.rate
            if result.ok:
                try:
                    relay.wait_drained(DRAIN_TIMEOUT, rows=queued)
                except BenchError as exc:
                    run.problems.append(str(exc))
                if sink.received() != messages:
                    run.problems.append(f"smtp-sink received {sink.received()}, expected exactly {messages}")
                # On the empty queue too: that time is the command's own start-up, the baseline.
                repeats = 1 if options.smoke else LIST_REPEATS
                time_list(relay, domain_name(LIST_DOMAIN % domains), queued // domains, run, repeats)
            status = relay.stop()
    finally:
        sink.stop()
    if status not in (0, None):
        run.problems.append(f"mailhop exited {status} on SIGTERM")
    check_log(relay, result)
    run.problems += result.problems
    run.notes += result.notes
    return run


def run_queue_scale(options: Options, base: Path) -> Report:
    """Build the spool once, then alternate empty and full queue for options.repeats repeats."""
    queued = SMOKE_QUEUED if options.smoke else options.queued
    domains = DOMAINS if queued >= DOMAINS * 10 else max(1, queued // 10)
    messages = 200 if options.smoke else MESSAGES
    title = f"queue scale: {queued:,} deferred messages queued vs an empty queue (mailhop only)"
    if "mailhop" not in options.targets:
        return Report(title, ["not run: mailhop is not among --targets"])
    template = base / "queue-template" / "spool"
    stats = fill_queue(template, queued, domains)
    print(f"  built {stats.messages:,} deferred messages over {stats.domains} domains in {stats.seconds:.1f}s "
          f"(queue.db {stats.db_bytes / 1e6:.0f} MB)", flush=True)  # fmt: skip
    runs: list[ScaleRun] = []
    for repeat in range(1, options.repeats + 1):
        order = [0, queued] if repeat % 2 else [queued, 0]
        for size in order:
            root = base / f"queue-scale-{size}-{repeat}"
            root.mkdir()
            try:
                run = one_run(template if size else None, size, domains, root, repeat, options, messages)
            except (BenchError, OSError, subprocess.TimeoutExpired) as exc:
                run = ScaleRun(size, repeat, problems=[f"{type(exc).__name__}: {exc}"])
            print(describe(run), flush=True)
            runs.append(run)
    lines = [
        f"Spool built in {stats.seconds:.0f} s ({stats.db_bytes / 1e6:.0f} MB); load per run: "
        f"smtp-source -s 20 -m {messages} -l 5120, relayed to an smtp-sink.",
        "",
        *table(runs, queued, domains),
    ]
    return Report(title, lines, sum(1 for run in runs if not run.ok))


def describe(run: ScaleRun) -> str:
    """The progress line of one run and its notes."""
    head = f"  run {run.repeat} queue {run.queued:>9,}"
    if run.ok and run.accept_rate is not None and run.relay_rate is not None:
        listed = f", queue list {statistics.median(run.list_seconds):.2f}s" if run.list_seconds else ""
        line = (f"{head} start {run.start_seconds:.1f}s, accept {run.accept_rate:.0f} msgs/s, "
                f"relay {run.relay_rate:.0f} msgs/s{listed}")  # fmt: skip
    else:
        line = f"{head} FAILED: {'; '.join(run.problems)}"
    return "\n".join([line, *(f"      {note}" for note in run.notes)])


def table(runs: Sequence[ScaleRun], queued: int, domains: int) -> list[str]:
    """Medians per queue size, the full/empty verdict and the queue list timing."""
    lines = ["| queue before the run | start-up s | accept msgs/s (median) | relay msgs/s (median) |",
             "|---|---:|---:|---:|"]  # fmt: skip
    medians: dict[int, float] = {}
    for size, label in ((0, "empty"), (queued, f"{queued:,} deferred")):
        mine = [r for r in runs if r.queued == size]
        if not mine:
            continue
        if not all(r.ok for r in mine):
            lines.append(f"| {label} | - | FAILED | FAILED |")
            continue
        accept = statistics.median(r.accept_rate for r in mine if r.accept_rate is not None)
        relay = statistics.median(r.relay_rate for r in mine if r.relay_rate is not None)
        start = statistics.median(r.start_seconds for r in mine)
        medians[size] = accept
        lines.append(f"| {label} | {start:.1f} | {accept:.0f} | {relay:.0f} |")
    if 0 in medians and queued in medians:
        ratio = medians[queued] / medians[0]
        verdict = "met" if ratio >= ACCEPT_TARGET else f"MISSED by {(ACCEPT_TARGET - ratio) * 100:.0f} points"
        lines += ["", f"accept rate full/empty: {ratio:.2f} (target >= {ACCEPT_TARGET:.2f}: {verdict})"]
    listed = [s for r in runs if r.queued == queued for s in r.list_seconds]
    empty = [s for r in runs if r.queued == 0 for s in r.list_seconds]
    if listed:
        baseline = f"; on the empty queue {statistics.median(empty):.2f} s (start-up)" if empty else ""
        lines.append(f"`mailhop queue list --domain {domain_name(LIST_DOMAIN % domains)}` "
                     f"({queued // domains} messages of {queued:,}): median {statistics.median(listed):.2f} s, "
                     f"max {max(listed):.2f} s over {len(listed)} calls{baseline}")  # fmt: skip
    return lines
