"""Acceptance throughput: Postfix's smtp-source against mailhop and against a private Postfix, alternating.

Run from the repository root: ``.venv/bin/python -m bench.accept`` for this workload alone (``--smoke`` for a
seconds-long check that the harness works); ``python -m bench.run`` runs it and the end-to-end relay workload
(``bench/relay.py``). Each run starts a fresh target (untimed), times smtp-source alone, then checks that the
work was really done: mailhop's queue must hold every message, Postfix's maillog must show every message queued
and the smtp-sink it relays to must have received every one. A run that fails a check gets no figure.

Both targets run accept-only by default: mailhop with its delivery switched off, Postfix with every message put
on hold as it is accepted (``check_client_access static:HOLD``: cleanup writes and fsyncs the queue file as
always, then files it in the hold queue, where the queue manager never looks). ``--postfix-accept relay`` runs
the older, asymmetric comparison instead: Postfix relays each message to a sink while it is still accepting,
on the same two cores, so its figure carries that work too.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .mailhop import running_mailhop
from .postfix import PrivatePostfix, private_postfix, require
from .procs import machine_cpu_seconds, tree_cpu_seconds

__all__ = [
    "ACCEPT_ONLY",
    "ASYMMETRY",
    "RunResult",
    "Workload",
    "check_postfix_relayed",
    "main",
    "postfix_at_sink",
    "time_smtp_source",
]

SENDER = "a@client.test"
RECIPIENT = "b@example.test"
ASYMMETRY = (
    "mailhop runs accept-only ([delivery] enabled = false: messages stay queued); Postfix relays every message "
    "to an smtp-sink concurrently with accepting, on the same machine, so Postfix's figure includes that load."
)
ACCEPT_ONLY = (
    "both targets run accept-only: mailhop with [delivery] enabled = false, Postfix putting every message on "
    "hold (check_client_access static:HOLD); both fsync each message before the 250; timed: smtp-source alone."
)
# Postfix's HOLD action (a non-terminal restriction): the message is queued durably, into the hold queue.
HOLD_SETTINGS = {"smtpd_recipient_restrictions": "check_client_access static:HOLD, permit_mynetworks, reject"}


@dataclass(frozen=True)
class Workload:
    """One smtp-source invocation pattern.

    kind says what is timed: "accept" (smtp-source alone) or "relay" (until the sink has every message).
    recipients is smtp-source's -r (recipients per message); same_connection is its -d (each session sends
    its messages over one connection instead of one connection per message).
    """

    sessions: int
    messages: int
    size: int
    sender: str = SENDER
    recipient: str = RECIPIENT
    kind: str = "accept"
    recipients: int = 1
    same_connection: bool = False

    @property
    def name(self) -> str:
        """The row label, e.g. "relay 5 KB, 20 sessions, 100 rcpts, -d"."""
        plural = "session" if self.sessions == 1 else "sessions"
        name = f"{self.kind} {self.size // 1024} KB, {self.sessions} {plural}"
        if self.recipients > 1:
            name += f", {self.recipients} rcpts"
        if self.same_connection:
            name += ", -d"
        return name

    def recipient_addresses(self) -> list[str]:
        """What smtp-source -r N sends: N-1 addresses numbered N down to 2 prefixed to -t, then -t itself."""
        return [f"{n}{self.recipient}" for n in range(self.recipients, 1, -1)] + [self.recipient]

    def at_sink(self, recipients_per_transaction: int) -> int:
        """Transactions a relay passes to its sink when it sends at most that many recipients in each."""
        return self.messages * math.ceil(self.recipients / recipients_per_transaction)

    def argv(self, smtp_source: str, address: str) -> list[str]:
        """The smtp-source command line for this shape against address."""
        extra = [*(["-r", str(self.recipients)] if self.recipients > 1 else []),
                 *(["-d"] if self.same_connection else [])]  # fmt: skip
        return [
            smtp_source,
            *("-s", str(self.sessions), "-m", str(self.messages), "-l", str(self.size), *extra),
            *("-f", self.sender, "-t", self.recipient, address),
        ]

    def timeout(self) -> float:
        """A bound generous enough for a slow target (20 msgs/s, 1,000 rcpts/s, 2 MB/s) yet finite, so a
        stall fails the run."""
        volume = self.messages * (1 / 20 + self.recipients / 1000 + self.size / 2e6)
        return 60.0 + volume


@dataclass
class RunResult:
    """One timed run against one target; rate is None when the run failed a check."""

    target: str
    repeat: int
    seconds: float = 0.0
    messages: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # CPU seconds the whole machine was busy during the timed part (see procs.machine_cpu_seconds)
    machine_cpu: float | None = None

    @property
    def ok(self) -> bool:
        return not self.problems and self.seconds > 0

    @property
    def rate(self) -> float | None:
        return self.messages / self.seconds if self.ok else None

    @property
    def machine_cpu_per_message(self) -> float | None:
        """Machine CPU microseconds per message, None for a failed or unmeasured run."""
        if not self.ok or self.machine_cpu is None or not self.messages:
            return None
        return self.machine_cpu / self.messages * 1e6


def note_cpu(result: RunResult, seconds: float, messages: int) -> None:
    """Note mailhop's CPU time over the timed part of a run, in all and per message."""
    result.notes.append(f"mailhop CPU {seconds:.2f} s = {seconds / messages * 1e6:.0f} us per message")


def note_machine_cpu(result: RunResult, busy: float, seconds: float) -> None:
    """Record and note how busy the whole machine was over a timed part of seconds."""
    result.machine_cpu = busy
    if seconds > 0 and result.messages:
        result.notes.append(
            f"machine CPU {busy / result.messages * 1e6:.0f} us per message, {busy / seconds:.2f} of "
            f"{os.cpu_count()} cores busy (every process and the kernel)"
        )


def time_smtp_source(workload: Workload, address: str, result: RunResult, *, machine: bool = False) -> None:
    """Run smtp-source against address and record its wall time (and with machine, the machine's CPU over it);
    any error output is a problem."""
    argv = workload.argv(require("smtp-source"), address)
    busy_before = machine_cpu_seconds()
    started = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=workload.timeout(), check=False)
    result.seconds = time.perf_counter() - started
    result.messages = workload.messages
    if machine:
        note_machine_cpu(result, machine_cpu_seconds() - busy_before, result.seconds)
    output = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    if proc.returncode != 0:
        result.problems.append(f"smtp-source exited {proc.returncode}")
    if output:
        result.problems.append(f"smtp-source printed {len(output)} lines, first: {output[0]}")


def run_mailhop(
    workload: Workload, root: Path, repeat: int, executable: str, loop: str = "auto",
    profile_dir: Path | None = None,
) -> RunResult:
    """One run against a fresh mailhop; afterwards its queue must hold exactly the messages sent."""
    from .profiling import finish_profiler, start_profiler  # profiling imports this module

    result = RunResult("mailhop", repeat)
    with running_mailhop(root, executable, loop=loop) as relay:
        profiler = start_profiler(relay, profile_dir, root.name) if profile_dir else None
        assert relay.pid is not None
        cpu_before = tree_cpu_seconds(relay.pid)
        try:
            time_smtp_source(workload, relay.address, result, machine=True)
        finally:
            if profiler is not None:
                finish_profiler(profiler, result)
        note_cpu(result, tree_cpu_seconds(relay.pid) - cpu_before, workload.messages)
        check = relay.check_queue(workload.sender, workload.recipient_addresses())
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


def run_postfix(workload: Workload, root: Path, repeat: int, mode: str = "hold") -> RunResult:
    """One run against a fresh private Postfix. mode "hold": every message must be in the hold queue when
    smtp-source ends; "relay": every message must be queued and then reach the sink."""
    result = RunResult("postfix", repeat)
    with private_postfix(root, HOLD_SETTINGS if mode == "hold" else None) as postfix:
        time_smtp_source(workload, postfix.address, result, machine=True)
        if mode == "hold":
            check_postfix_held(workload, postfix, result)
        else:
            drained = postfix.wait_relayed(postfix_at_sink(workload, postfix), workload.timeout())
            check_postfix_relayed(workload, postfix, result, drained)
    return result


def check_postfix_held(workload: Workload, postfix: PrivatePostfix, result: RunResult) -> None:
    """Accept-only: each 250 came after cleanup filed the message, so the hold queue has every one now; the
    sink must have nothing and the maillog no error."""
    held = postfix.postfix.held()
    if held != workload.messages:
        result.problems.append(f"Postfix hold queue has {held} messages, expected {workload.messages}")
    if postfix.sink.received():
        result.problems.append(f"smtp-sink received {postfix.sink.received()} messages from an accept-only run")
    result.notes.append(f"held {held} (hold queue)")
    problems = postfix.postfix.problems()
    if problems:
        result.problems.append(f"Postfix logged {len(problems)} errors, first: {problems[0]}")


def postfix_at_sink(workload: Workload, postfix: PrivatePostfix) -> int:
    """Transactions Postfix's smtp client makes to the sink: it splits a message's recipients into groups of
    smtp_destination_recipient_limit (50 by default), read from the running instance's configuration."""
    return workload.at_sink(postfix.postfix.recipient_limit())


def check_postfix_relayed(
    workload: Workload, postfix: PrivatePostfix, result: RunResult, drained: float | None
) -> None:
    """After the sink has every message: the maillog shows each queued, the sink counted exactly the
    transactions expected, the queue is empty and the maillog has no error. drained: seconds the relaying
    lagged smtp-source."""
    postfix.wait_accepted(workload.sender, workload.messages, workload.timeout())
    received = postfix.sink.received()
    expected = postfix_at_sink(workload, postfix)
    if received != expected:
        result.problems.append(f"smtp-sink received {received} messages, expected {expected}")
    if not postfix.postfix.queue_is_empty():
        result.problems.append("Postfix queue not empty after the sink received everything")
    lag = f", all relayed {drained:.1f}s after smtp-source ended" if drained is not None else ""
    result.notes.append(f"relayed {received} to smtp-sink{lag}")
    problems = postfix.postfix.problems()
    if problems:
        result.problems.append(f"Postfix logged {len(problems)} errors, first: {problems[0]}")
    warnings = postfix.postfix.warnings()
    if warnings:
        result.notes.append(f"Postfix logged {len(warnings)} warnings, first: {warnings[0]}")
    if postfix.postfix.congestion():
        result.notes.append("qmgr warned that the relay to the sink filled the active queue (congestion)")


def main(argv: Sequence[str] | None = None) -> int:
    """The acceptance workload alone, exactly as before ``bench.run`` existed; exit 1 if any run failed."""
    from .run import main as run_main  # run imports this module

    return run_main(argv, default_workloads=("accept",), prog="python -m bench.accept")


if __name__ == "__main__":
    sys.exit(main())
