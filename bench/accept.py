"""Acceptance throughput: Postfix's smtp-source against mailhop and against a private Postfix, alternating.

Run from the repository root: ``.venv/bin/python -m bench.accept`` (``--smoke`` for a seconds-long check that
the harness works). Each run starts a fresh target (untimed), times smtp-source alone, then checks that the
work was really done: mailhop's queue must hold every message, Postfix's maillog must show every message queued
and the smtp-sink it relays to must have received every one. A run that fails a check gets no figure.

The comparison is asymmetric, and the output says so: mailhop runs accept-only (its delivery is switched off,
and was not written when this harness was), while Postfix relays each message to the sink while it is still
accepting, on the same two cores.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

from .mailhop import default_mailhop, running_mailhop
from .postfix import private_postfix, require
from .procs import BenchError

__all__ = ["RunResult", "Workload", "main"]

TARGETS = ("mailhop", "postfix")
SENDER = "a@client.test"
RECIPIENT = "b@example.test"
SMOKE_MESSAGES = 200
ASYMMETRY = (
    "mailhop runs accept-only ([delivery] enabled = false: messages stay queued); Postfix relays every message "
    "to an smtp-sink concurrently with accepting, on the same machine, so Postfix's figure includes that load."
)


@dataclass(frozen=True)
class Workload:
    """One smtp-source invocation pattern; every message is its own SMTP session (no -d)."""

    sessions: int
    messages: int
    size: int
    sender: str = SENDER
    recipient: str = RECIPIENT

    @property
    def name(self) -> str:
        return f"accept {self.size // 1024} KB, {self.sessions} sessions"

    def argv(self, smtp_source: str, address: str) -> list[str]:
        return [
            smtp_source,
            *("-s", str(self.sessions), "-m", str(self.messages), "-l", str(self.size)),
            *("-f", self.sender, "-t", self.recipient, address),
        ]

    def timeout(self) -> float:
        """A bound generous enough for a slow target (20 msgs/s) yet finite, so a stall fails the run."""
        return 60.0 + self.messages / 20.0


@dataclass
class RunResult:
    """One timed run against one target; rate is None when the run failed a check."""

    target: str
    repeat: int
    seconds: float = 0.0
    messages: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and self.seconds > 0

    @property
    def rate(self) -> float | None:
        return self.messages / self.seconds if self.ok else None


def time_smtp_source(workload: Workload, address: str, result: RunResult) -> None:
    """Run smtp-source against address and record its wall time; any error output is a problem."""
    argv = workload.argv(require("smtp-source"), address)
    started = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=workload.timeout(), check=False)
    result.seconds = time.perf_counter() - started
    result.messages = workload.messages
    output = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    if proc.returncode != 0:
        result.problems.append(f"smtp-source exited {proc.returncode}")
    if output:
        result.problems.append(f"smtp-source printed {len(output)} lines, first: {output[0]}")


def run_mailhop(workload: Workload, root: Path, repeat: int, executable: str) -> RunResult:
    """One run against a fresh mailhop; afterwards its queue must hold exactly the messages sent."""
    result = RunResult("mailhop", repeat)
    with running_mailhop(root, executable) as relay:
        time_smtp_source(workload, relay.address, result)
        check = relay.check_queue(workload.sender, workload.recipient)
        problem = check.problem(workload.messages)
        if problem:
            result.problems.append(problem)
        result.notes.append(f"queued {check.listed} (queue.db rows: {check.db_rows})")
        status = relay.stop()
    if status not in (0, None):
        result.problems.append(f"mailhop exited {status} on SIGTERM")
    logged = [line for line in relay.stderr().splitlines() if line.strip()]
    if logged:
        result.notes.append(f"mailhop logged {len(logged)} lines at warning+, first: {logged[0]}")
    return result


def run_postfix(workload: Workload, root: Path, repeat: int) -> RunResult:
    """One run against a fresh private Postfix; every message must be queued and then reach the sink."""
    result = RunResult("postfix", repeat)
    with private_postfix(root) as postfix:
        time_smtp_source(workload, postfix.address, result)
        drain_timeout = workload.timeout()
        postfix.wait_accepted(workload.sender, workload.messages, drain_timeout)
        drained = postfix.wait_relayed(workload.messages, drain_timeout)
        received = postfix.sink.received()
        if received != workload.messages:
            result.problems.append(f"smtp-sink received {received} messages, expected {workload.messages}")
        if not postfix.postfix.queue_is_empty():
            result.problems.append("Postfix queue not empty after the sink received everything")
        result.notes.append(
            f"relayed {received} to smtp-sink, all relayed {drained:.1f}s after smtp-source ended"
        )
        problems = postfix.postfix.problems()
        if problems:
            result.problems.append(f"Postfix logged {len(problems)} errors, first: {problems[0]}")
        warnings = postfix.postfix.warnings()
        if warnings:
            result.notes.append(f"Postfix logged {len(warnings)} warnings, first: {warnings[0]}")
        if postfix.postfix.congestion():
            result.notes.append("qmgr warned that the relay to the sink filled the active queue (congestion)")
    return result


def run_target(target: str, run: Callable[[], RunResult], repeat: int) -> RunResult:
    """Run one target, turning a start/stop/verify failure into a failed result instead of an abort."""
    try:
        return run()
    except (BenchError, OSError, subprocess.TimeoutExpired) as exc:
        return RunResult(target, repeat, problems=[f"{type(exc).__name__}: {exc}"])


def run_all(
    workload: Workload, targets: Sequence[str], repeats: int, base: Path, mailhop: str
) -> list[RunResult]:
    """Alternate the targets, reversing the order every other repeat so drift hits both alike."""
    results: list[RunResult] = []
    for repeat in range(1, repeats + 1):
        order = list(targets) if repeat % 2 else list(reversed(targets))
        for target in order:
            root = base / f"{target}-{repeat}"
            root.mkdir()
            run: Callable[[], RunResult]
            if target == "mailhop":
                run = partial(run_mailhop, workload, root, repeat, mailhop)
            else:
                run = partial(run_postfix, workload, root, repeat)
            result = run_target(target, run, repeat)
            print(describe(result), flush=True)
            results.append(result)
    return results


def describe(result: RunResult) -> str:
    """One line per run: the rate, or why there is none."""
    head = f"  run {result.repeat} {result.target:8}"
    if result.ok:
        line = f"{head} {result.messages} msgs in {result.seconds:.2f}s = {result.rate:.0f} msgs/s"
    else:
        measured = f" ({result.messages / result.seconds:.0f} msgs/s measured)" if result.seconds else ""
        line = f"{head} FAILED{measured}: {'; '.join(result.problems)}"
    return "\n".join([line, *(f"      {note}" for note in result.notes)])


def median_rate(results: Sequence[RunResult], target: str) -> float | None:
    """Median msgs/s over the target's runs; None unless every one of its runs passed its checks."""
    mine = [r for r in results if r.target == target]
    rates = [r.rate for r in mine if r.rate is not None]
    return statistics.median(rates) if mine and len(rates) == len(mine) else None


def render_table(workload: Workload, results: Sequence[RunResult], targets: Sequence[str]) -> str:
    """The Markdown summary table: medians and the mailhop/Postfix ratio."""

    def cell(target: str, value: float | None) -> str:
        if target not in targets:
            return "not run"
        return f"{value:.0f}" if value is not None else "FAILED"

    mailhop, postfix = median_rate(results, "mailhop"), median_rate(results, "postfix")
    ratio = f"{mailhop / postfix:.2f}" if mailhop is not None and postfix else "-"
    return "\n".join(
        [
            "| workload | mailhop msgs/s (median) | Postfix msgs/s (median) | ratio mailhop/Postfix |",
            "|---|---:|---:|---:|",
            f"| {workload.name} | {cell('mailhop', mailhop)} | {cell('postfix', postfix)} | {ratio} |",
        ]
    )


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo, for the results' machine line."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def postfix_version() -> str:
    """Installed Postfix version, so results name the reference they were measured against."""
    try:
        out = subprocess.run(
            [require("postconf"), "-d", "mail_version"], capture_output=True, text=True, check=False
        )
    except BenchError:
        return "not installed"
    return out.stdout.split("=", 1)[-1].strip() or "unknown"


def header(workload: Workload, args: argparse.Namespace) -> str:
    """What, when and where: enough to reproduce the figures and to read them correctly."""
    command = workload.argv("smtp-source", "127.0.0.1:PORT")
    return "\n".join(
        [
            f"command: {shlex.join([Path(sys.executable).name, '-m', 'bench.accept', *args.raw])}",
            f"date: {datetime.now(UTC):%Y-%m-%d %H:%M UTC}",
            f"machine: nproc={os.cpu_count()}, cpu={cpu_model()}, python={platform.python_version()}, "
            f"postfix={postfix_version()}, loadavg={' '.join(f'{x:.2f}' for x in os.getloadavg())}",
            f"workload: {shlex.join(command)}  ({args.repeats} repeat(s) per target, timing smtp-source wall time only)",
            f"note: {ASYMMETRY}",
        ]
    )


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Command-line options; --smoke shrinks the run to a quick harness check."""
    parser = argparse.ArgumentParser(prog="python -m bench.accept", description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20000, help="messages per run (smtp-source -m)")
    parser.add_argument("--sessions", type=int, default=20, help="parallel sessions (smtp-source -s)")
    parser.add_argument("--size", type=int, default=5120, help="message size in bytes (smtp-source -l)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per target; the table shows medians")
    parser.add_argument(
        "--smoke", action="store_true", help=f"-m {SMOKE_MESSAGES}, 1 repeat: checks the harness"
    )
    parser.add_argument(
        "--targets", default=",".join(TARGETS), help="comma-separated subset of mailhop,postfix"
    )
    parser.add_argument("--mailhop", default=default_mailhop(), help="the mailhop executable")
    parser.add_argument("--keep", action="store_true", help="keep the temp dirs (configs, logs, spools)")
    args = parser.parse_args(argv)
    args.raw = list(argv)
    if args.smoke:
        args.messages, args.repeats = SMOKE_MESSAGES, 1
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = set(args.targets) - set(TARGETS)
    if unknown or not args.targets:
        parser.error(f"--targets must name some of {', '.join(TARGETS)}")
    if min(args.messages, args.sessions, args.size, args.repeats) < 1:
        parser.error("--messages, --sessions, --size and --repeats must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print the table; exit 1 if any run failed its checks."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    workload = Workload(sessions=args.sessions, messages=args.messages, size=args.size)
    print(header(workload, args), flush=True)
    base = Path(tempfile.mkdtemp(prefix="mailhop-bench-"))
    base.chmod(0o755)  # Postfix's daemons run as the postfix user and must reach their queue under it.
    try:
        results = run_all(workload, args.targets, args.repeats, base, args.mailhop)
    finally:
        if args.keep:
            print(f"kept: {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    print()
    print(render_table(workload, results, args.targets))
    failed = [r for r in results if not r.ok]
    if failed:
        print(f"\n{len(failed)} run(s) failed their checks; their targets have no figure.")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
