"""End-to-end relay throughput: smtp-source into a relay that passes every message on to Postfix's smtp-sink.

The figure is ``messages / seconds`` from the start of smtp-source until the sink has counted the last
message, so acceptance, queueing, delivery and recording all happen inside the timed window, on the same
cores. The sink's counter (``smtp-sink -c``) is polled every few milliseconds; nothing waits a fixed time.

- mailhop: ``[delivery] enabled = true`` with a smarthost route (``smtp://127.0.0.1:SINKPORT``, ``tls =
  "none"``) for every domain, so no DNS is ever asked; after the timed window its queue must drain to empty.
- Postfix: the private instance of ``bench/postfix.py``, whose ``relayhost`` is an smtp-sink of its own.

Both targets must then show exactly the messages sent at the sink, and an empty queue. Optionally (``--profile
DIR``) py-spy samples mailhop during the timed window and the run's notes name its ten costliest functions;
a profiled run is slower, so its figure is not one to publish.
"""

from __future__ import annotations

import collections
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .accept import RunResult, Workload, check_postfix_relayed
from .mailhop import DEFAULT_PER_DESTINATION, MailhopRelay, running_mailhop
from .postfix import SmtpSink, private_postfix, require
from .procs import BenchError, find_program, stop_process

__all__ = [
    "Profile",
    "ProfileEntry",
    "run_mailhop_relay",
    "run_postfix_relay",
    "summarize_profile",
    "time_relay",
]

RELAY_POLL = 0.01  # seconds between looks at the sink's counter: 10 ms on a run of many seconds
STALL_TIMEOUT = 60.0  # no new message at the sink for this long, once smtp-source is done: the run failed
DRAIN_TIMEOUT = 120.0  # after the sink has everything, the relay's queue must empty within this
PROFILE_RATE = 100  # py-spy samples per second
PROFILE_TOP = 10
SERIOUS_MARKS = (" ERROR ", " CRITICAL ", "Exception in callback", "Traceback (most recent call last)")
EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception)\b")  # the last line of a traceback
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def time_relay(workload: Workload, address: str, sink: SmtpSink, root: Path, result: RunResult) -> None:
    """Start smtp-source against address and time it until the sink has counted every message.

    smtp-source must also exit 0 and print nothing. A run whose sink stops counting for STALL_TIMEOUT after
    smtp-source ended, or that exceeds the workload's timeout, fails instead of hanging.
    """
    expected = workload.messages
    output_path = root / "smtp-source.out"
    argv = workload.argv(require("smtp-source"), address)
    already = sink.received()
    if already:
        raise BenchError(f"smtp-sink counted {already} messages before the run started")
    with output_path.open("wb") as output:
        started = time.perf_counter()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT)
    deadline = started + workload.timeout()
    source_done: float | None = None
    sink_done: float | None = None
    count, last_change = 0, started
    try:
        while source_done is None or sink_done is None:
            now = time.perf_counter()
            if source_done is None and proc.poll() is not None:
                source_done = now
            if sink_done is None:
                seen = sink.received()
                if seen >= expected:
                    sink_done = now
                elif seen != count:
                    count, last_change = seen, now
                elif source_done is not None and now - last_change > STALL_TIMEOUT:
                    result.problems.append(
                        f"smtp-sink stalled at {count} of {expected} messages for {STALL_TIMEOUT:.0f}s"
                    )
                    break
            if now > deadline:
                result.problems.append(
                    f"timed out after {workload.timeout():.0f}s, sink at {count}/{expected}"
                )
                break
            time.sleep(RELAY_POLL)
    finally:
        status = stop_process(proc) if proc.poll() is None else proc.returncode
    result.messages = expected
    if sink_done is not None:
        result.seconds = sink_done - started
    if source_done is not None:
        result.notes.append(
            f"smtp-source ended at {source_done - started:.2f}s, the sink had everything at "
            + (f"{sink_done - started:.2f}s" if sink_done is not None else "-")
        )
    if status != 0:
        result.problems.append(f"smtp-source exited {status}")
    lines = [line for line in output_path.read_text(errors="replace").splitlines() if line.strip()]
    if lines:
        result.problems.append(f"smtp-source printed {len(lines)} lines, first: {lines[0]}")


def check_sink(sink: SmtpSink, expected: int, result: RunResult) -> None:
    """The sink must have counted exactly the messages sent: fewer is loss, more is duplicate delivery."""
    received = sink.received()
    if received != expected:
        result.problems.append(f"smtp-sink received {received} messages, expected exactly {expected}")


def note_sessions(sink: SmtpSink, result: RunResult) -> None:
    """How many SMTP connections the relay opened to the sink, read once the relay has stopped (smtp-sink
    counts a session when it ends, and a stopping relay closes the connections it kept for reuse)."""
    result.notes.append(f"smtp-sink: {sink.received()} messages over {sink.sessions()} SMTP connections")


def run_mailhop_relay(
    workload: Workload,
    root: Path,
    repeat: int,
    executable: str,
    *,
    loop: str = "auto",
    per_destination: int = DEFAULT_PER_DESTINATION,
    profile_dir: Path | None = None,
) -> RunResult:
    """One run against a fresh mailhop relaying to a fresh sink; afterwards its queue must be empty."""
    result = RunResult("mailhop", repeat)
    sink = SmtpSink(root)
    sink.start()
    try:
        with running_mailhop(
            root, executable, smarthost=f"{sink.host}:{sink.port}", per_destination=per_destination, loop=loop
        ) as relay:
            profiler = start_profiler(relay, profile_dir, repeat) if profile_dir else None
            try:
                time_relay(workload, relay.address, sink, root, result)
            finally:
                if profiler is not None:
                    finish_profiler(profiler, result)
            if result.problems:
                result.notes.append(f"queue.db rows left: {relay.db_rows()}")
            else:
                check_drained(relay, workload, result)
                check_sink(sink, workload.messages, result)
            status = relay.stop()
            note_sessions(sink, result)
    finally:
        sink.stop()
    if status not in (0, None):
        result.problems.append(f"mailhop exited {status} on SIGTERM")
    check_log(relay, result)
    return result


def check_drained(relay: MailhopRelay, workload: Workload, result: RunResult) -> None:
    """mailhop records each delivery just after the sink's 250: wait for that, then both counts must be 0."""
    try:
        waited = relay.wait_drained(DRAIN_TIMEOUT)
    except BenchError as exc:
        result.problems.append(str(exc))
        return
    check = relay.check_queue(workload.sender, workload.recipient)
    problem = check.problem(0)
    if problem:
        result.problems.append(problem)
    result.notes.append(
        f"relayed {workload.messages}; queue list {check.listed}, queue.db rows {check.db_rows} "
        f"({waited:.2f}s after the sink's last message)"
    )


def check_log(relay: MailhopRelay, result: RunResult) -> None:
    """At level warning a clean run logs nothing; an error or a traceback fails it, a warning is a note."""
    logged = [line for line in relay.stderr().splitlines() if line.strip()]
    serious = [line for line in logged if any(mark in line for mark in SERIOUS_MARKS)]
    if serious:
        raised = [line for line in logged if EXCEPTION_LINE.match(line)]
        what = f"; first exception: {raised[0]}" if raised else ""
        result.problems.append(f"mailhop logged {len(serious)} error lines, first: {serious[0]}{what}")
    elif logged:
        result.notes.append(f"mailhop logged {len(logged)} lines at warning+, first: {logged[0]}")


def run_postfix_relay(workload: Workload, root: Path, repeat: int) -> RunResult:
    """One run against a fresh private Postfix, timed until its relayhost sink has every message."""
    result = RunResult("postfix", repeat)
    with private_postfix(root) as postfix:
        time_relay(workload, postfix.address, postfix.sink, root, result)
        if result.problems:
            return result
        check_postfix_relayed(workload, postfix, result, drained=None)
    # private_postfix has stopped Postfix (closing its cached connections) and then the sink; its file remains.
    note_sessions(postfix.sink, result)
    return result


# -- profiling ---------------------------------------------------------------------------------------------------


class _Profiler:
    """A running py-spy and the file it writes."""

    def __init__(self, proc: subprocess.Popen[bytes], output: Path, log: Path) -> None:
        self.proc = proc
        self.output = output
        self.log = log


def py_spy() -> str:
    """The py-spy beside the interpreter (``.venv/bin/pip install py-spy``), or on PATH."""
    beside = Path(sys.executable).with_name("py-spy")
    found = str(beside) if beside.exists() else find_program("py-spy")
    if found is None:
        raise BenchError("py-spy not found: .venv/bin/pip install py-spy")
    return found


def start_profiler(relay: MailhopRelay, profile_dir: Path, repeat: int) -> _Profiler:
    """py-spy record on mailhop, aggregated by function, in py-spy's raw (collapsed stacks) format."""
    if relay.pid is None:
        raise BenchError("mailhop is not running: nothing to profile")
    profile_dir.mkdir(parents=True, exist_ok=True)
    output = profile_dir / f"mailhop-relay-{repeat}.txt"
    log = profile_dir / f"mailhop-relay-{repeat}.py-spy.log"
    argv = [
        py_spy(), "record", "--pid", str(relay.pid), "--rate", str(PROFILE_RATE),
        "--function", "--format", "raw", "--output", str(output),
    ]  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    return _Profiler(proc, output, log)


def finish_profiler(profiler: _Profiler, result: RunResult) -> None:
    """Stop py-spy (SIGINT makes it write its file) and put the top functions in the run's notes."""
    if profiler.proc.poll() is None:
        profiler.proc.send_signal(signal.SIGINT)
    try:
        profiler.proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        stop_process(profiler.proc)
    if not profiler.output.exists():
        result.notes.append(f"py-spy wrote no profile: {profiler.log.read_text(errors='replace').strip()}")
        return
    profile = summarize_profile(profiler.output)
    result.notes.append(f"PROFILED (figure not comparable), raw stacks: {profiler.output}")
    result.notes.extend(profile.lines())


@dataclass(frozen=True)
class ProfileEntry:
    """One function's share of the event loop thread's samples: own (innermost Python frame) and total."""

    name: str
    own_pct: float
    total_pct: float


@dataclass
class Profile:
    """py-spy's samples of mailhop, summarised.

    The event loop (main) thread is what limits a single-process asyncio relay, so its samples are ranked by
    function. The other threads are only counted: py-spy reports a thread blocked on a lock or in fsync as
    busy, so their counts are an upper bound on CPU, not a measure of it.
    """

    main_samples: int = 0
    entries: list[ProfileEntry] = field(default_factory=list)
    threads: collections.Counter[str] = field(default_factory=collections.Counter)

    def lines(self, top: int = PROFILE_TOP) -> list[str]:
        others = ", ".join(f"{name} {count}" for name, count in self.threads.most_common())
        lines = [f"event loop thread: {self.main_samples} samples (other threads: {others or 'none'})"]
        lines += [f"  {e.own_pct:5.1f}% own {e.total_pct:5.1f}% total  {e.name}" for e in self.entries[:top]]
        return lines


def summarize_profile(path: Path) -> Profile:
    """Rank the event loop thread's functions by own samples, from py-spy's raw (collapsed stacks) output."""
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    profile = Profile()
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [short_frame(frame) for frame in stack.split(";")]
        if not frames[0].startswith("<module>"):  # a thread: Thread._bootstrap;...;Thread.run;<its target>
            target = next((f for f in frames if not f.startswith("Thread.")), frames[-1])
            profile.threads[target.split(" ", 1)[0]] += count
            continue
        profile.main_samples += count
        own[frames[-1]] += count
        for frame in set(frames):
            total[frame] += count
    n = profile.main_samples or 1
    profile.entries = [
        ProfileEntry(name, 100 * c / n, 100 * total[name] / n) for name, c in own.most_common()
    ]
    return profile


def short_frame(frame: str) -> str:
    """``func (/long/path/site-packages/pkg/mod.py:12)`` -> ``func (pkg/mod.py:12)``."""
    match = _FRAME.match(frame.strip())
    if match is None:
        return frame.strip()
    file = match["file"]
    for marker in ("/site-packages/", "/src/", "/lib/python3."):
        if marker in file:
            file = file.split(marker, 1)[1]
            if marker == "/lib/python3.":
                file = "stdlib/" + file.split("/", 1)[-1]
            break
    line = f":{match['line']}" if match["line"] else ""
    return f"{match['func']} ({file}{line})"
