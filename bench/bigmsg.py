"""One 50 MB message: how much a target's memory grows while it accepts (and relays) it, and how long it takes.

``smtp-source -s 1 -m 1 -l 50000000`` sends one message of 50,000,000 bytes of body (plus smtp-source's few
headers) over one session.

Each target first takes (and, relaying, delivers) one 1 KB warm-up message, untimed, so that what grows
afterwards is the big message's doing, not the first transaction's: Postfix starts its smtpd, cleanup,
trivial-rewrite and smtp processes on demand and keeps them for reuse, mailhop fills its caches.

- mailhop, twice per repeat: accept-only (delivery off; timed by smtp-source) and relaying to an smtp-sink
  (timed until the sink has the message). Its peak RSS growth is VmHWM at the end minus VmRSS before the big
  message, after resetting VmHWM through /proc/PID/clear_refs. Target: < 10 MB. Checks: accept-only, the
  queue holds the big message with its full size; relaying, the sink counted it and the queue is empty; no
  error in mailhop's log; SIGTERM exits 0.
- Postfix, once per repeat: its message_size_limit (10,240,000 by default) raised to 52,428,800, mailhop's
  default limits.max_message_size, so both accept the same sizes. Postfix relays while it accepts, so one run
  gives smtp-source's time and the time until the sink has the message. Its processes come and go, so the
  growth is the peak of the summed RSS of the master and all its children, sampled every 20 ms, minus that
  sum before the big message; the notes add the same for PSS (shared pages divided among their sharers) and
  the upper bound "sum of VmHWM at the end minus the RSS before". Checks as in the relay workload.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .accept import RunResult, Workload, check_postfix_relayed, postfix_at_sink, time_smtp_source
from .mailhop import MailhopRelay, running_mailhop
from .memory import PeakSampler, reset_peak, status_kb, tree_memory
from .postfix import SmtpSink, private_postfix
from .procs import BenchError, wait_until
from .relay import check_log, time_relay
from .workloads import Options, Report

__all__ = ["BIG_SIZE", "run_big"]

BIG_SIZE = 50_000_000
SMOKE_SIZE = 2_000_000  # still far above the 128 KiB inline limit, so the body goes to a file as in full size
GROWTH_TARGET_KB = 10 * 1024
POSTFIX_SIZE_LIMIT = 52_428_800  # mailhop's default [limits] max_message_size
WARM_UP = Workload(sessions=1, messages=1, size=1024)
WARM_UP_TIMEOUT = 60.0


@dataclass
class BigRun:
    """One run of one message through one target in one mode."""

    target: str
    mode: str  # "accept-only" or "relay"
    repeat: int
    source_seconds: float | None = None
    sink_seconds: float | None = None
    growth_kb: int | None = None
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and self.growth_kb is not None


def workload(size: int, kind: str) -> Workload:
    """One message of size bytes over one session."""
    return Workload(sessions=1, messages=1, size=size, kind=kind)


def warm_up(address: str, sink: SmtpSink | None, result: RunResult) -> None:
    """Send the warm-up message and, relaying, wait until the sink has it."""
    time_smtp_source(WARM_UP, address, result)
    if sink is not None:
        wait_until(lambda: sink.received() >= 1, WARM_UP_TIMEOUT, "the sink to receive the warm-up message")
    result.seconds = 0.0


def run_mailhop_big(size: int, root: Path, repeat: int, options: Options, relay_mode: bool) -> BigRun:
    """One message through a fresh mailhop, accept-only or relaying to a fresh sink."""
    run = BigRun("mailhop", "relay" if relay_mode else "accept-only", repeat)
    work = workload(size, "relay" if relay_mode else "accept")
    result = RunResult("mailhop", repeat)
    sink = SmtpSink(root) if relay_mode else None
    if sink is not None:
        sink.start()
    try:
        smarthost = f"{sink.host}:{sink.port}" if sink else None
        with running_mailhop(root, options.executable, smarthost=smarthost, loop=options.loop) as relay:
            pid = relay.pid
            assert pid is not None
            warm_up(relay.address, sink, result)
            if not reset_peak(pid):
                run.notes.append("could not reset VmHWM (not root?): the peak may be start-up's")
            base = status_kb(pid, "VmRSS")
            if sink is not None:
                run.source_seconds = time_relay(work, relay.address, sink, root, result, 1, already=1)
                run.sink_seconds = result.seconds or None
            else:
                time_smtp_source(work, relay.address, result)
                run.source_seconds = result.seconds
            peak = status_kb(pid, "VmHWM")
            if base is not None and peak is not None:
                run.growth_kb = peak - base
                run.notes.append(f"VmRSS before {base / 1024:.1f} MB, VmHWM after {peak / 1024:.1f} MB")
            if not result.problems:
                check_mailhop_queue(relay, size, relay_mode, run)
            status = relay.stop()
    finally:
        if sink is not None:
            sink.stop()
    if sink is not None and sink.received() != 2:
        run.problems.append(f"smtp-sink received {sink.received()} messages, expected 2 (warm-up and big)")
    if status not in (0, None):
        run.problems.append(f"mailhop exited {status} on SIGTERM")
    check_log(relay, result)
    run.problems.extend(result.problems)
    run.notes.extend(result.notes)
    return run


def check_mailhop_queue(relay: MailhopRelay, size: int, relay_mode: bool, run: BigRun) -> None:
    """Accept-only: the queue holds the warm-up and one message of at least size bytes. Relaying: it drains to
    empty."""
    if relay_mode:
        try:
            relay.wait_drained(120.0)
        except BenchError as exc:
            run.problems.append(str(exc))
        return
    entries = relay.list_queue()
    sizes = sorted(n for entry in entries if isinstance(n := entry.get("size"), int))
    if len(entries) != 2 or len(sizes) != 2 or sizes[1] < size:
        run.problems.append(f"queue holds sizes {sizes}, expected the warm-up and one of at least {size} bytes")


def run_postfix_big(size: int, root: Path, repeat: int) -> BigRun:
    """One message through a fresh private Postfix with message_size_limit raised, timed to its sink."""
    run = BigRun("postfix", "relay", repeat)
    work = workload(size, "relay")
    result = RunResult("postfix", repeat)
    with private_postfix(root, {"message_size_limit": str(POSTFIX_SIZE_LIMIT)}) as postfix:
        master = postfix.postfix.master_pid()
        if master is None:
            raise BenchError("Postfix master pid not found")
        warm_up(postfix.address, postfix.sink, result)
        before = tree_memory(master, with_pss=True)
        with (
            PeakSampler(lambda: tree_memory(master).rss) as rss,
            PeakSampler(lambda: tree_memory(master, with_pss=True).pss or 0) as pss,
        ):
            expected = postfix_at_sink(work, postfix)
            run.source_seconds = time_relay(work, postfix.address, postfix.sink, root, result, expected, 1)
        end = tree_memory(master)
        run.sink_seconds = result.seconds or None
        run.growth_kb = rss.peak - before.rss
        run.notes.append(
            f"{before.processes} processes before, {end.processes} after; summed RSS before "
            f"{before.rss / 1024:.1f} MB, sampled peak {rss.peak / 1024:.1f} MB; summed PSS growth "
            f"{(pss.peak - (before.pss or 0)) / 1024:.1f} MB; upper bound (sum of VmHWM at the end minus RSS "
            f"before) {(end.hwm - before.rss) / 1024:.1f} MB"
        )
        if not result.problems:
            both = Workload(sessions=1, messages=2, size=size)  # the warm-up and the big message
            check_postfix_relayed(both, postfix, result, drained=None)
    run.problems.extend(result.problems)
    run.notes.extend(result.notes)
    return run


def run_big(options: Options, base: Path) -> Report:
    """Every repeat: mailhop accept-only, mailhop relaying and Postfix, alternating their order."""
    size = SMOKE_SIZE if options.smoke else BIG_SIZE
    runs: list[BigRun] = []
    for repeat in range(1, options.repeats + 1):
        order = [t for t in ("mailhop", "postfix") if t in options.targets]
        for target in order if repeat % 2 else reversed(order):
            modes = (False, True) if target == "mailhop" else (True,)
            for relay_mode in modes:
                root = base / f"big-{target}-{'relay' if relay_mode else 'accept'}-{repeat}"
                root.mkdir()
                try:
                    if target == "mailhop":
                        run = run_mailhop_big(size, root, repeat, options, relay_mode)
                    else:
                        run = run_postfix_big(size, root, repeat)
                except (BenchError, OSError) as exc:
                    run = BigRun(target, "relay" if relay_mode else "accept-only", repeat)
                    run.problems.append(f"{type(exc).__name__}: {exc}")
                print(describe(run), flush=True)
                runs.append(run)
    return Report(f"one {size:,}-byte message (smtp-source -s 1 -m 1 -l {size})", table(runs),
                  sum(1 for run in runs if not run.ok))


def describe(run: BigRun) -> str:
    """One line per run and its notes."""
    head = f"  run {run.repeat} {run.target:8} {run.mode:11}"
    if run.ok and run.growth_kb is not None:
        sink = f", at sink {run.sink_seconds:.2f}s" if run.sink_seconds else ""
        line = f"{head} smtp-source {run.source_seconds or 0:.2f}s{sink}, RSS +{run.growth_kb / 1024:.1f} MB"
    else:
        line = f"{head} FAILED: {'; '.join(run.problems)}"
    return "\n".join([line, *(f"      {note}" for note in run.notes)])


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present and len(present) == len(values) else None


def _cell(ok: bool, value: float | None, digits: int = 2) -> str:
    return "FAILED" if not ok else ("-" if value is None else f"{value:.{digits}f}")


def table(runs: Sequence[BigRun]) -> list[str]:
    """Medians per target and mode, the target verdict for mailhop, and the mailhop/Postfix ratios."""
    lines = [
        "| target | run | smtp-source s | at the sink s | peak RSS growth MB | target < 10 MB |",
        "|---|---|---:|---:|---:|---|",
    ]
    medians: dict[tuple[str, str], tuple[float | None, float | None, float | None]] = {}
    for target, mode in (("mailhop", "accept-only"), ("mailhop", "relay"), ("postfix", "relay")):
        mine = [r for r in runs if r.target == target and r.mode == mode]
        if not mine:
            continue
        ok = all(r.ok for r in mine)
        source = _median([r.source_seconds for r in mine]) if ok else None
        sink = _median([r.sink_seconds for r in mine]) if ok and mode == "relay" else None
        growths = [r.growth_kb / 1024 if r.growth_kb is not None else None for r in mine]
        growth = _median(growths) if ok else None
        medians[(target, mode)] = (source, sink, growth)
        verdict = "-"
        if target == "mailhop" and growth is not None:
            limit = GROWTH_TARGET_KB / 1024
            verdict = "met" if growth < limit else f"MISSED by {growth - limit:.1f} MB"
        label = "relay (accepts while relaying)" if target == "postfix" else mode
        cells = [_cell(ok, source), _cell(ok, sink), _cell(ok, growth, 1)]
        lines.append(f"| {target} | {label} | {' | '.join(cells)} | {verdict} |")
    mailhop, postfix = medians.get(("mailhop", "relay")), medians.get(("postfix", "relay"))
    if mailhop and postfix and None not in (mailhop[1], postfix[1]):
        assert mailhop[1] is not None and postfix[1] is not None
        memory = (
            f"; RSS growth {mailhop[2]:.1f} vs {postfix[2]:.1f} MB"
            if mailhop[2] is not None and postfix[2] is not None else ""
        )  # fmt: skip
        lines += ["", f"ratio mailhop/Postfix, relay time to the sink: {mailhop[1] / postfix[1]:.2f}{memory}"]
    return lines
