"""mailhop against a private Postfix, every workload (``bench/workloads.py``): acceptance
(``bench/accept.py``) and end-to-end relay (``bench/relay.py``) in several shapes, targets alternating,
medians and the mailhop/Postfix ratio in one table; then one 50 MB message (``bench/bigmsg.py``), 10,000 idle
connections (``bench/idle.py``) and, when named, a million-message queue (``bench/queuescale.py``), each with
its own table.

Run from the repository root, as root: ``.venv/bin/python -m bench.run`` (``--smoke`` for a quick check that
the harness works). A run that fails a check gets no figure, and the command exits 1.
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
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

from .accept import ACCEPT_ONLY, ASYMMETRY, RunResult, Workload, run_mailhop, run_postfix
from .bigmsg import run_big
from .idle import run_idle
from .mailhop import DEFAULT_PER_DESTINATION, LOOPS, default_mailhop
from .postfix import require
from .procs import BenchError
from .queuescale import run_queue_scale
from .relay import run_mailhop_relay, run_postfix_relay
from .workloads import DEFAULT_WORKLOADS, OPT_IN, THROUGHPUT, WORKLOADS, Options, Report

__all__ = ["main"]

TARGETS = ("mailhop", "postfix")
SPECIAL_RUNNERS: dict[str, Callable[[Options, Path], Report]] = {
    "big-50m": run_big,
    "idle-10k": run_idle,
    "queue-scale": run_queue_scale,
}
NOTES = {
    "accept": ACCEPT_ONLY,
    "relay": (
        "both targets relay every message to an smtp-sink on loopback (mailhop: smarthost route, Postfix: "
        "relayhost); timed from the start of smtp-source until the sink has counted the last message."
    ),
}


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
        return partial(run_mailhop, workload, root, repeat, options.executable, loop, options.profile_dir)
    return partial(run_postfix, workload, root, repeat, options.postfix_accept)


def run_all(
    key: str, workload: Workload, targets: Sequence[str], repeats: int, base: Path, options: Options
) -> list[RunResult]:
    """Alternate the targets, reversing the order every other repeat so drift hits both alike."""
    results: list[RunResult] = []
    for repeat in range(1, repeats + 1):
        order = list(targets) if repeat % 2 else list(reversed(targets))
        for target in order:
            root = base / f"{key}-{target}-{repeat}"
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


def median_machine_cpu(results: Sequence[RunResult], target: str) -> float | None:
    """Median machine CPU us per message over the target's runs; None unless every one of them has it."""
    mine = [r for r in results if r.target == target]
    costs = [c for c in (r.machine_cpu_per_message for r in mine) if c is not None]
    return statistics.median(costs) if mine and len(costs) == len(mine) else None


def table_row(workload: Workload, results: Sequence[RunResult], targets: Sequence[str]) -> str:
    """One workload's row: medians, the mailhop/Postfix ratio and each target's machine CPU per message."""

    def cell(target: str, value: float | None) -> str:
        if target not in targets:
            return "not run"
        return f"{value:.0f}" if value is not None else "FAILED"

    mailhop, postfix = median_rate(results, "mailhop"), median_rate(results, "postfix")
    ratio = f"{mailhop / postfix:.2f}" if mailhop is not None and postfix else "-"
    costs = " / ".join(
        "-" if cost is None else f"{cost:.0f}"
        for cost in (median_machine_cpu(results, target) if target in targets else None
                     for target in ("mailhop", "postfix"))
    )  # fmt: skip
    return f"| {workload.name} | {cell('mailhop', mailhop)} | {cell('postfix', postfix)} | {ratio} | {costs} |"


def render_table(rows: Sequence[tuple[Workload, Sequence[RunResult]]], targets: Sequence[str]) -> str:
    """The Markdown summary table, one row per workload."""
    return "\n".join(
        [
            "| workload | mailhop msgs/s (median) | Postfix msgs/s (median) | ratio mailhop/Postfix "
            "| machine CPU us/msg, mailhop / Postfix |",
            "|---|---:|---:|---:|---:|",
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
    lines = [
        f"command: {shlex.join([Path(sys.executable).name, '-m', args.module, *args.raw])}",
        f"date: {datetime.now(UTC):%Y-%m-%d %H:%M UTC}",
        f"machine: nproc={os.cpu_count()}, cpu={cpu_model()}, python={platform.python_version()}, "
        f"postfix={postfix_version()}, loadavg={loadavg()}",
        f"workloads: {', '.join(args.workloads)} ({args.repeats} repeat(s) per target; mailhop --loop "
        f"{args.options.loop}, relay: mailhop max_connections_per_destination={args.per_destination})",
    ]
    for kind in sorted({workload.kind for workload in workloads}):
        note = ASYMMETRY if kind == "accept" and args.options.postfix_accept == "relay" else NOTES[kind]
        lines.append(f"{kind}: {note}")
    workers = os.environ.get("MAILHOP_BENCH_WORKERS", "1")
    lines.append(f"mailhop: workers = {workers} (MAILHOP_BENCH_WORKERS)")
    for workload in workloads:
        command = shlex.join(workload.argv("smtp-source", "127.0.0.1:PORT"))
        lines.append(f"{workload.name}: {command}")
    return "\n".join(lines)


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def parse_args(argv: Sequence[str], default_workloads: Sequence[str], prog: str) -> argparse.Namespace:
    """Command-line options; --smoke shrinks the run to a quick harness check."""
    parser = argparse.ArgumentParser(prog=prog, description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--messages", type=int, default=None,
        help="messages per run of every throughput workload (smtp-source -m; default: each workload's own)",
    )  # fmt: skip
    parser.add_argument(
        "--sessions", type=int, default=20, help="parallel sessions (smtp-source -s) of accept and relay"
    )
    parser.add_argument(
        "--size", type=int, default=5120, help="message size in bytes (smtp-source -l) of accept and relay"
    )
    parser.add_argument("--repeats", type=int, default=3, help="runs per target; the table shows medians")
    parser.add_argument(
        "--smoke", action="store_true",
        help="1 repeat, a few messages per workload, 200 idle connections, 10,000 queued: checks the harness",
    )  # fmt: skip
    parser.add_argument(
        "--workloads", default=",".join(default_workloads),
        help=f"comma-separated subset of {','.join(WORKLOADS)}, or all (default: all but {','.join(OPT_IN)})",
    )  # fmt: skip
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
        help="accept, relay: sample mailhop with py-spy into DIR and print its top functions (slows it down)",
    )  # fmt: skip
    parser.add_argument(
        "--idle-connections", type=int, default=10_000, help="idle-10k: idle connections to hold (default 10000)"
    )
    parser.add_argument(
        "--queued", type=int, default=1_000_000, help="queue-scale: deferred messages queued (default 1000000)"
    )
    parser.add_argument(
        "--postfix-accept", choices=("hold", "relay"), default="hold",
        help="accept workloads: Postfix puts what it accepts on hold (like-for-like, default) or relays it",
    )  # fmt: skip
    parser.add_argument("--keep", action="store_true", help="keep the temp dirs (configs, logs, spools)")
    args = parser.parse_args(argv)
    args.raw = list(argv)
    args.module = prog.rsplit(" ", 1)[-1]
    if args.smoke:
        args.repeats = 1
    args.targets = _subset(parser, "--targets", args.targets, TARGETS)
    text = ",".join(WORKLOADS) if args.workloads.strip() == "all" else args.workloads
    args.workloads = _subset(parser, "--workloads", text, WORKLOADS)
    sizes = [args.sessions, args.size, args.repeats, args.per_destination, args.idle_connections, args.queued]
    if min(sizes) < 1 or (args.messages is not None and args.messages < 1):
        parser.error("counts, sizes and --repeats must be positive")
    args.options = Options(
        args.mailhop, args.mailhop_loop, args.per_destination, args.profile,
        targets=tuple(args.targets), repeats=args.repeats, smoke=args.smoke,
        idle_connections=args.idle_connections, queued=args.queued, postfix_accept=args.postfix_accept,
    )  # fmt: skip
    return args


def make_workload(key: str, args: argparse.Namespace) -> Workload:
    """The smtp-source shape of a throughput workload, with the command line's overrides applied."""
    shape = THROUGHPUT[key]
    base = key in ("accept", "relay")  # --sessions and --size reshape only these two, as before
    messages = shape.smoke_messages if args.smoke else (args.messages or shape.messages)
    return Workload(
        sessions=args.sessions if base else shape.sessions, messages=messages,
        size=args.size if base else shape.size, kind=shape.kind, recipients=shape.recipients,
        same_connection=shape.same_connection,
    )  # fmt: skip


def _subset(parser: argparse.ArgumentParser, option: str, text: str, allowed: Sequence[str]) -> list[str]:
    chosen = [item.strip() for item in text.split(",") if item.strip()]
    if not chosen or set(chosen) - set(allowed):
        parser.error(f"{option} must name some of {', '.join(allowed)}")
    return [item for item in allowed if item in chosen]


def main(
    argv: Sequence[str] | None = None,
    default_workloads: Sequence[str] = DEFAULT_WORKLOADS,
    prog: str = "python -m bench.run",
) -> int:
    """Run the benchmark and print the tables; exit 1 if any run failed its checks."""
    args = parse_args(sys.argv[1:] if argv is None else argv, default_workloads, prog)
    keys = [key for key in args.workloads if key in THROUGHPUT]
    workloads = {key: make_workload(key, args) for key in keys}
    print(header(list(workloads.values()), args), flush=True)
    base = Path(tempfile.mkdtemp(prefix="mailhop-bench-"))
    base.chmod(0o755)  # Postfix's daemons run as the postfix user and must reach their queue under it.
    rows: list[tuple[Workload, list[RunResult]]] = []
    reports: list[Report] = []
    try:
        for key, workload in workloads.items():
            if len(args.workloads) > 1:
                print(f"{workload.name}:", flush=True)
            rows.append((workload, run_all(key, workload, args.targets, args.repeats, base, args.options)))
        for key in args.workloads:
            if key in SPECIAL_RUNNERS:
                print(f"{key}:", flush=True)
                reports.append(SPECIAL_RUNNERS[key](args.options, base))
    finally:
        if args.keep:
            print(f"kept: {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    print(f"\nloadavg at the end: {loadavg()}\n")
    if rows:
        print(render_table(rows, args.targets))
    for report in reports:
        print(f"\n{report.render()}")
    failed = sum(1 for _, results in rows for r in results if not r.ok) + sum(r.failures for r in reports)
    if failed:
        print(f"\n{failed} run(s) failed their checks; their targets have no figure.")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
