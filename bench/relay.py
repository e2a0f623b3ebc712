"""End-to-end relay throughput: smtp-source into a relay that passes every message on to Postfix's smtp-sink.

The figure is ``messages / seconds`` from the start of smtp-source until the sink has counted the last
message, so acceptance, queueing, delivery and recording all happen inside the timed window, on the same
cores. The sink's counter (``smtp-sink -c``) is polled every few milliseconds; nothing waits a fixed time.

- mailhop: ``[delivery] enabled = true`` with a smarthost route (``smtp://127.0.0.1:SINKPORT``, ``tls =
  "none"``) for every domain, so no DNS is ever asked; after the timed window its queue must drain to empty.
- Postfix: the private instance of ``bench/postfix.py``, whose ``relayhost`` is an smtp-sink of its own.

Both targets must then show exactly the transactions expected at the sink (one per message, or more when a
message has more recipients than the target sends in one transaction), and an empty queue. Optionally
(``--profile DIR``, ``bench/profiling.py``) py-spy samples mailhop during the timed window and the run's notes
name its ten costliest functions; a profiled run is slower, so its figure is not one to publish.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

from .accept import RunResult, Workload, check_postfix_relayed, note_cpu, note_machine_cpu, postfix_at_sink
from .mailhop import DEFAULT_PER_DESTINATION, MAILHOP_RCPTS_PER_TRANSACTION, MailhopRelay, running_mailhop
from .postfix import SmtpSink, private_postfix, require
from .procs import BenchError, machine_cpu_seconds, stop_process, tree_cpu_seconds
from .profiling import finish_profiler, start_profiler

__all__ = ["check_log", "run_mailhop_relay", "run_postfix_relay", "time_relay"]

RELAY_POLL = 0.01  # seconds between looks at the sink's counter: 10 ms on a run of many seconds
STALL_TIMEOUT = 60.0  # no new message at the sink for this long, once smtp-source is done: the run failed
DRAIN_TIMEOUT = 120.0  # after the sink has everything, the relay's queue must empty within this
SERIOUS_MARKS = (" ERROR ", " CRITICAL ", "Exception in callback", "Traceback (most recent call last)")
EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception)\b")  # the last line of a traceback


def time_relay(
    workload: Workload, address: str, sink: SmtpSink, root: Path, result: RunResult, expected: int,
    already: int = 0, *, machine: bool = False,
) -> float | None:
    """Start smtp-source against address and time it until the sink has counted expected transactions more
    than the already it must hold at the start (a warm-up's); returns smtp-source's own wall time (None if it
    did not end).

    With machine, the machine's CPU over that time is recorded and noted (see note_machine_cpu). smtp-source
    must also exit 0 and print nothing. A run whose sink stops counting for STALL_TIMEOUT after
    smtp-source ended, or that exceeds the workload's timeout, fails instead of hanging.
    """
    output_path = root / "smtp-source.out"
    argv = workload.argv(require("smtp-source"), address)
    counted = sink.received()
    if counted != already:
        raise BenchError(f"smtp-sink counted {counted} messages before the run started, expected {already}")
    expected += already
    with output_path.open("wb") as output:
        busy_before = machine_cpu_seconds()
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
    result.messages = workload.messages
    if sink_done is not None:
        result.seconds = sink_done - started
        if machine:  # up to the poll that saw the last message: at most RELAY_POLL of idle machine on top
            note_machine_cpu(result, machine_cpu_seconds() - busy_before, result.seconds)
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
    return None if source_done is None else source_done - started


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
            profiler = start_profiler(relay, profile_dir, root.name) if profile_dir else None
            expected = workload.at_sink(MAILHOP_RCPTS_PER_TRANSACTION)
            assert relay.pid is not None
            cpu_before = tree_cpu_seconds(relay.pid)
            try:
                time_relay(workload, relay.address, sink, root, result, expected, machine=True)
            finally:
                if profiler is not None:
                    finish_profiler(profiler, result)
            note_cpu(result, tree_cpu_seconds(relay.pid) - cpu_before, workload.messages)
            if result.problems:
                result.notes.append(f"queue.db rows left: {relay.db_rows()}")
            else:
                check_drained(relay, workload, result)
                check_sink(sink, expected, result)
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
    check = relay.check_queue(workload.sender, workload.recipient_addresses())
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
        expected = postfix_at_sink(workload, postfix)
        time_relay(workload, postfix.address, postfix.sink, root, result, expected, machine=True)
        if result.problems:
            return result
        check_postfix_relayed(workload, postfix, result, drained=None)
    # private_postfix has stopped Postfix (closing its cached connections) and then the sink; its file remains.
    note_sessions(postfix.sink, result)
    return result
