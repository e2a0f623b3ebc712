"""Acceptance throughput: Postfix's smtp-source against mailhop and against a private Postfix, alternating.

Run from the repository root: ``.venv/bin/python -m bench.accept`` for this workload alone (``--smoke`` for a
seconds-long check that the harness works); ``python -m bench.run`` runs it and the end-to-end relay workload
(``bench/relay.py``). Each run starts a fresh target (untimed), times smtp-source alone, then checks that the
work was really done: mailhop's queue must hold every message, Postfix's maillog must show every message queued
and the smtp-sink it relays to must have received every one. A run that fails a check gets no figure.

The comparison is asymmetric, and the output says so: mailhop runs accept-only (its delivery is switched off),
while Postfix relays each message to the sink while it is still accepting, on the same two cores. The relay
workload is the like-for-like one.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .mailhop import running_mailhop
from .postfix import PrivatePostfix, private_postfix, require

__all__ = ["ASYMMETRY", "RunResult", "Workload", "check_postfix_relayed", "main"]

SENDER = "a@client.test"
RECIPIENT = "b@example.test"
SMOKE_MESSAGES = 200
ASYMMETRY = (
    "mailhop runs accept-only ([delivery] enabled = false: messages stay queued); Postfix relays every message "
    "to an smtp-sink concurrently with accepting, on the same machine, so Postfix's figure includes that load."
)


@dataclass(frozen=True)
class Workload:
    """One smtp-source invocation pattern; every message is its own SMTP session (no -d).

    kind says what is timed: "accept" (smtp-source alone) or "relay" (until the sink has every message).
    """

    sessions: int
    messages: int
    size: int
    sender: str = SENDER
    recipient: str = RECIPIENT
    kind: str = "accept"

    @property
    def name(self) -> str:
        return f"{self.kind} {self.size // 1024} KB, {self.sessions} sessions"

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


def run_mailhop(
    workload: Workload, root: Path, repeat: int, executable: str, loop: str = "auto"
) -> RunResult:
    """One run against a fresh mailhop; afterwards its queue must hold exactly the messages sent."""
    result = RunResult("mailhop", repeat)
    with running_mailhop(root, executable, loop=loop) as relay:
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
        drained = postfix.wait_relayed(workload.messages, workload.timeout())
        check_postfix_relayed(workload, postfix, result, drained)
    return result


def check_postfix_relayed(
    workload: Workload, postfix: PrivatePostfix, result: RunResult, drained: float | None
) -> None:
    """After the sink has every message: the maillog shows each queued, the sink counted exactly the messages
    sent, the queue is empty and the maillog has no error. drained: seconds the relaying lagged smtp-source."""
    postfix.wait_accepted(workload.sender, workload.messages, workload.timeout())
    received = postfix.sink.received()
    if received != workload.messages:
        result.problems.append(f"smtp-sink received {received} messages, expected {workload.messages}")
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
