"""mailhop against a private Postfix, every workload: acceptance (``bench/accept.py``) and end-to-end relay
(``bench/relay.py``), targets alternating, medians and the mailhop/Postfix ratio in one table.

Run from the repository root, as root: ``.venv/bin/python -m bench.run`` (``--smoke`` for a seconds-long check
that the harness works). A run that fails a check gets no figure, and the command exits 1.
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

from .accept import ASYMMETRY, SMOKE_MESSAGES, RunResult, Workload, run_mailhop, run_postfix
from .mailhop import DEFAULT_PER_DESTINATION, LOOPS, default_mailhop
from .postfix import require
from .procs import BenchError
from .relay import run_mailhop_relay, run_postfix_relay

__all__ = ["main"]

TARGETS = ("mailhop", "postfix")
WORKLOADS = ("accept", "relay")
NOTES = {
    "accept": ASYMMETRY,
    "relay": (
        "both targets relay every message to an smtp-sink on loopback (mailhop: smarthost route, Postfix: "
        "relayhost); timed from the start of smtp-source until the sink has counted the last message."
    ),
}


@dataclass(frozen=True)
class Options:
    """How to run mailhop, shared by all its runs."""

    executable: str
    loop: str  # mailhop serve --loop
    per_destination: int
    profile_dir: Path | None


def run_target(target: str, run: Callable[[], RunResult], repeat: int) -> RunResult:
    """Run one target, turning a start/stop/verify failure into a failed result instead of an abort."""
    try:
        return run()
    except (BenchError, OSError, subprocess.TimeoutExpired) as exc:
        return RunResult(target, repeat, problems=[f"{type(exc).__name__}: {exc}"])


def runner(
    workload: Workload, target: str, root: Path, repeat: int, options: Options
) -> Callable[[], RunResult]:
    """The function that makes one run of workload against target."""
    loop = options.loop
    if workload.kind == "relay":
        if target == "mailhop":
            return partial(
                run_mailhop_relay, workload, root, repeat, options.executable, loop=loop,
                per_destination=options.per_destination, profile_dir=options.profile_dir,
            )  # fmt: skip
        return partial(run_postfix_relay, workload, root, repeat)
    if target == "mailhop":
        return partial(run_mailhop, workload, root, repeat, options.executable, loop)
    return partial(run_postfix, workload, root, repeat)


def run_all(
    workload: Workload, targets: Sequence[str], repeats: int, base: Path, options: Options
) -> list[RunResult]:
    """Alternate the targets, reversing the order every other repeat so drift hits both alike."""
    results: list[RunResult] = []
    for repeat in range(1, repeats + 1):
        order = list(targets) if repeat % 2 else list(reversed(targets))
        for target in order:
            root = base / f"{workload.kind}-{target}-{repeat}"
            root.mkdir()
            result = run_target(target, runner(workload, target, root, repeat, options), repeat)
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


def table_row(workload: Workload, results: Sequence[RunResult], targets: Sequence[str]) -> str:
    """One workload's row: medians and the mailhop/Postfix ratio."""

    def cell(target: str, value: float | None) -> str:
        if target not in targets:
            return "not run"
        return f"{value:.0f}" if value is not None else "FAILED"

    mailhop, postfix = median_rate(results, "mailhop"), median_rate(results, "postfix")
    ratio = f"{mailhop / postfix:.2f}" if mailhop is not None and postfix else "-"
    return f"| {workload.name} | {cell('mailhop', mailhop)} | {cell('postfix', postfix)} | {ratio} |"


def render_table(rows: Sequence[tuple[Workload, Sequence[RunResult]]], targets: Sequence[str]) -> str:
    """The Markdown summary table, one row per workload."""
    return "\n".join(
        [
            "| workload | mailhop msgs/s (median) | Postfix msgs/s (median) | ratio mailhop/Postfix |",
            "|---|---:|---:|---:|",
            *(table_row(workload, results, targets) for workload, results in rows),
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


def header(workloads: Sequence[Workload], args: argparse.Namespace) -> str:
    """What, when and where: enough to reproduce the figures and to read them correctly."""
    command = workloads[0].argv("smtp-source", "127.0.0.1:PORT")
    lines = [
        f"command: {shlex.join([Path(sys.executable).name, '-m', args.module, *args.raw])}",
        f"date: {datetime.now(UTC):%Y-%m-%d %H:%M UTC}",
        f"machine: nproc={os.cpu_count()}, cpu={cpu_model()}, python={platform.python_version()}, "
        f"postfix={postfix_version()}, loadavg={loadavg()}",
        f"workload: {shlex.join(command)}  ({args.repeats} repeat(s) per target)",
    ]
    for workload in workloads:
        loop = args.options.loop
        extra = ""
        if workload.kind == "relay":
            extra = f", mailhop max_connections_per_destination={args.per_destination}"
        lines.append(f"{workload.name}: mailhop --loop {loop}{extra}; {NOTES[workload.kind]}")
    return "\n".join(lines)


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def parse_args(argv: Sequence[str], default_workloads: Sequence[str], prog: str) -> argparse.Namespace:
    """Command-line options; --smoke shrinks the run to a quick harness check."""
    parser = argparse.ArgumentParser(prog=prog, description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20000, help="messages per run (smtp-source -m)")
    parser.add_argument("--sessions", type=int, default=20, help="parallel sessions (smtp-source -s)")
    parser.add_argument("--size", type=int, default=5120, help="message size in bytes (smtp-source -l)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per target; the table shows medians")
    parser.add_argument(
        "--smoke", action="store_true", help=f"-m {SMOKE_MESSAGES}, 1 repeat: checks the harness"
    )
    parser.add_argument(
        "--workloads", default=",".join(default_workloads), help="comma-separated subset of accept,relay"
    )
    parser.add_argument(
        "--targets", default=",".join(TARGETS), help="comma-separated subset of mailhop,postfix"
    )
    parser.add_argument("--mailhop", default=default_mailhop(), help="the mailhop executable")
    parser.add_argument(
        "--mailhop-loop", choices=LOOPS, default="auto",
        help="mailhop serve --loop for every workload (default: auto, i.e. uvloop when installed)",
    )  # fmt: skip
    parser.add_argument(
        "--per-destination", type=int, default=DEFAULT_PER_DESTINATION,
        help="relay: mailhop's [delivery] max_connections_per_destination (Postfix's default is 20)",
    )  # fmt: skip
    parser.add_argument(
        "--profile", type=Path, default=None, metavar="DIR",
        help="relay: sample mailhop with py-spy into DIR and print its top functions (slows mailhop down)",
    )  # fmt: skip
    parser.add_argument("--keep", action="store_true", help="keep the temp dirs (configs, logs, spools)")
    args = parser.parse_args(argv)
    args.raw = list(argv)
    args.module = prog.rsplit(" ", 1)[-1]
    if args.smoke:
        args.messages, args.repeats = SMOKE_MESSAGES, 1
    args.targets = _subset(parser, "--targets", args.targets, TARGETS)
    args.workloads = _subset(parser, "--workloads", args.workloads, WORKLOADS)
    if min(args.messages, args.sessions, args.size, args.repeats, args.per_destination) < 1:
        parser.error("--messages, --sessions, --size, --repeats and --per-destination must be positive")
    args.options = Options(args.mailhop, args.mailhop_loop, args.per_destination, args.profile)
    return args


def _subset(parser: argparse.ArgumentParser, option: str, text: str, allowed: Sequence[str]) -> list[str]:
    chosen = [item.strip() for item in text.split(",") if item.strip()]
    if not chosen or set(chosen) - set(allowed):
        parser.error(f"{option} must name some of {', '.join(allowed)}")
    return [item for item in allowed if item in chosen]


def main(
    argv: Sequence[str] | None = None,
    default_workloads: Sequence[str] = WORKLOADS,
    prog: str = "python -m bench.run",
) -> int:
    """Run the benchmark and print the table; exit 1 if any run failed its checks."""
    args = parse_args(sys.argv[1:] if argv is None else argv, default_workloads, prog)
    workloads = [
        Workload(sessions=args.sessions, messages=args.messages, size=args.size, kind=kind)
        for kind in args.workloads
    ]
    print(header(workloads, args), flush=True)
    base = Path(tempfile.mkdtemp(prefix="mailhop-bench-"))
    base.chmod(0o755)  # Postfix's daemons run as the postfix user and must reach their queue under it.
    rows: list[tuple[Workload, list[RunResult]]] = []
    try:
        for workload in workloads:
            if len(workloads) > 1:
                print(f"{workload.name}:", flush=True)
            rows.append((workload, run_all(workload, args.targets, args.repeats, base, args.options)))
    finally:
        if args.keep:
            print(f"kept: {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    print(f"\nloadavg at the end: {loadavg()}\n")
    print(render_table(rows, args.targets))
    failed = [r for _, results in rows for r in results if not r.ok]
    if failed:
        print(f"\n{len(failed)} run(s) failed their checks; their targets have no figure.")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
