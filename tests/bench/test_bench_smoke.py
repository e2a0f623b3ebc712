"""The benchmark harness still runs end to end against both targets: ``python -m bench.run --smoke --workloads
all`` (every workload: accept and relay in all their shapes, one big message, idle connections, queue scale, each
shrunk to seconds) and ``python -m bench.accept --smoke`` (the acceptance workload alone).

No timing is asserted (CI machines are noisy); the harness's own checks (mailhop's queue holds every message
or, relaying, is empty and the sink counted every message; Postfix relayed every message to its sink; probes
queued or relayed; the queue-scale spool passed start-up recovery) make a zero exit meaningful, and each
workload's row must show figures, not FAILED.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require_program

REPO = Path(__file__).resolve().parents[2]
ROW = r"^\| {name} \| \d+ \| \d+ \| \d+\.\d+ \| \d+ / \d+ \|$"
ACCEPT_LINE = re.compile(ROW.format(name="accept 5 KB, 20 sessions"), re.MULTILINE)
RELAY_LINE = re.compile(ROW.format(name="relay 5 KB, 20 sessions"), re.MULTILINE)
ANY_ROW = re.compile(r"^\| (accept|relay) ", re.MULTILINE)
THROUGHPUT_ROWS = [
    f"{kind} {shape}"
    for kind in ("accept", "relay")
    for shape in ("5 KB, 20 sessions", "1 KB, 1 session", "100 KB, 20 sessions", "5 KB, 20 sessions, 10 rcpts",
                  "5 KB, 20 sessions, 100 rcpts", "5 KB, 20 sessions, -d")
]  # fmt: skip
NUMBER = r"\d+\.\d+"
BIG_ROWS = [
    rf"^\| mailhop \| accept-only \| {NUMBER} \| - \| {NUMBER} \| (met|MISSED by [\d.]+ MB) \|$",
    rf"^\| mailhop \| relay \| {NUMBER} \| {NUMBER} \| {NUMBER} \| (met|MISSED by [\d.]+ MB) \|$",
    rf"^\| postfix \| relay \(accepts while relaying\) \| {NUMBER} \| {NUMBER} \| -?{NUMBER} \| - \|$",
]
LATENCY = rf"{NUMBER} / {NUMBER}"
IDLE_ROWS = [
    # mailhop must hold all 200 and answer every probe; Postfix as shipped may stall, so only its row is required.
    rf"^\| mailhop \(limits.max_connections = 300\) \| 200 open of 200 attempted \| \d+ \| {LATENCY} \| "
    rf"{LATENCY} \| RSS (met|MISSED by \d+ MB), p99 (met|MISSED by \d+ ms) \|$",
    r"^\| Postfix, default_process_limit = 400 \| \d+ open of 200 attempted.* \| \d+ \| ",
    r"^\| Postfix as shipped \(default_process_limit = 100\) \| .* \| \d+ \| ",
]
QUEUE_ROWS = [
    r"^\| empty \| [\d.]+ \| \d+ \| \d+ \|$",
    r"^\| 10,000 deferred \| [\d.]+ \| \d+ \| \d+ \|$",
    r"^accept rate full/empty: [\d.]+ \(target >= 0.80: (met|MISSED by \d+ points)\)$",
    r"^`mailhop queue list --domain d0042.bench.test` \(10 messages of 10,000\): median [\d.]+ s",
]

pytestmark = pytest.mark.peer


def run_smoke(module: str, timeout: float, *extra: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -m module --smoke`` from the repository root once the peer programs and root are there."""
    for program in ("smtp-source", "smtp-sink", "postfix", "postconf", "postqueue"):
        require_program(program)
    if os.geteuid() != 0:
        message = "a private Postfix instance needs root (postfix -c DIR)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return subprocess.run(
        [sys.executable, "-m", module, "--smoke", *extra],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.mark.timeout(330)
def test_run_smoke_prints_every_workload() -> None:
    proc = run_smoke("bench.run", 320, "--workloads", "all")
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert ACCEPT_LINE.search(proc.stdout), output
    assert RELAY_LINE.search(proc.stdout), output
    for name in THROUGHPUT_ROWS:
        assert re.search(ROW.format(name=re.escape(name)), proc.stdout, re.MULTILINE), f"{name}:\n{output}"
    assert len(ANY_ROW.findall(proc.stdout)) == len(THROUGHPUT_ROWS), output
    for pattern in BIG_ROWS + IDLE_ROWS + QUEUE_ROWS:
        assert re.search(pattern, proc.stdout, re.MULTILINE), f"{pattern}:\n{output}"


@pytest.mark.timeout(90)
def test_accept_smoke_prints_the_accept_table_only() -> None:
    proc = run_smoke("bench.accept", timeout=80)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert ACCEPT_LINE.search(proc.stdout), output
    assert len(ANY_ROW.findall(proc.stdout)) == 1, output


@pytest.mark.timeout(120)
def test_checks_smoke_runs_both_configurations() -> None:
    proc = subprocess.run([sys.executable, "-m", "bench.checks", "--smoke"], cwd=REPO, capture_output=True,
                          text=True, timeout=110, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert re.search(r"checks off: \d+ msgs/s +SPF\+DKIM\+DMARC on: \d+ msgs/s", proc.stdout), output


def test_workload_shapes_match_smtp_source_flags_and_sink_counts() -> None:
    """Pure logic the runs rely on: the smtp-source flags of each shape, the recipients smtp-source -r sends
    (N..2 prefixed to -t, then -t itself, as smtp-sink's dump of a real run shows) and the transactions a sink
    must count when a relay splits recipients."""
    from bench.accept import Workload

    shape = Workload(sessions=20, messages=10, size=5120, kind="relay", recipients=3, same_connection=True)
    argv = shape.argv("smtp-source", "127.0.0.1:25")
    assert argv[argv.index("-r") + 1] == "3" and "-d" in argv
    assert shape.recipient_addresses() == ["3b@example.test", "2b@example.test", "b@example.test"]
    assert shape.name == "relay 5 KB, 20 sessions, 3 rcpts, -d"
    assert Workload(1, 4, 1024, recipients=100).at_sink(50) == 8
    assert Workload(1, 4, 1024, recipients=100).at_sink(100) == 4
    plain = Workload(sessions=1, messages=5, size=1024)
    assert "-r" not in plain.argv("s", "a") and "-d" not in plain.argv("s", "a")
    assert plain.name == "accept 1 KB, 1 session"


def test_idle_probe_percentiles_are_nearest_rank() -> None:
    from bench.idle import Probe, source_address

    probe = Probe(latencies=[n / 1000 for n in range(1, 301)])  # 1 ms .. 300 ms
    assert probe.percentile(50) == 0.150
    assert probe.percentile(99) == 0.297  # the third slowest of 300
    assert Probe().percentile(99) is None
    assert [source_address(i) for i in (0, 249, 250)] == ["127.1.0.1", "127.1.0.250", "127.1.1.1"]


def test_machine_cpu_seconds_counts_busy_time_of_every_process() -> None:
    """The machine-wide figure grows by at least the CPU a child process burns, and not while everything
    sleeps much longer than that."""
    from bench.procs import machine_cpu_seconds

    before = machine_cpu_seconds()
    spin = subprocess.run(
        [sys.executable, "-c", "import time\nend = time.process_time() + 0.5\nwhile time.process_time() < end: pass"],
        check=True,
    )
    assert spin.returncode == 0
    assert machine_cpu_seconds() - before >= 0.4  # clock ticks round the 0.5 s down by at most one tick each


def test_table_row_shows_median_rates_ratio_and_machine_cpu() -> None:
    from bench.accept import RunResult, Workload
    from bench.run import render_table, table_row

    shape = Workload(sessions=20, messages=1000, size=5120)
    results = [
        RunResult("mailhop", 1, seconds=0.5, messages=1000, machine_cpu=0.5),  # 2000 msgs/s, 500 us
        RunResult("mailhop", 2, seconds=0.4, messages=1000, machine_cpu=0.6),  # 2500 msgs/s, 600 us
        RunResult("mailhop", 3, seconds=1.0, messages=1000, machine_cpu=0.55),  # 1000 msgs/s, 550 us
        RunResult("postfix", 1, seconds=1.0, messages=1000, machine_cpu=1.2),  # 1000 msgs/s, 1200 us
    ]
    assert table_row(shape, results, ["mailhop", "postfix"]) == (
        "| accept 5 KB, 20 sessions | 2000 | 1000 | 2.00 | 550 / 1200 |"
    )
    # A failed run leaves the target's medians out rather than quoting the runs that passed.
    failed = [*results[:3], RunResult("postfix", 1, seconds=1.0, messages=1000, problems=["lost one"])]
    assert table_row(shape, failed, ["mailhop", "postfix"]) == (
        "| accept 5 KB, 20 sessions | 2000 | FAILED | - | 550 / - |"
    )
    assert table_row(shape, results[:3], ["mailhop"]) == "| accept 5 KB, 20 sessions | 2000 | not run | - | 550 / - |"
    assert render_table([(shape, results)], ["mailhop", "postfix"]).splitlines()[1] == "|---|---:|---:|---:|---:|"


@pytest.mark.timeout(120)
def test_stepprobe_times_every_step_beside_a_load_while_relaying() -> None:
    for program in ("smtp-source", "smtp-sink"):
        require_program(program)
    proc = subprocess.run(
        [sys.executable, "-m", "bench.stepprobe", "--seconds", "1", "--load", "2", "--size", "1024", "--relay"],
        cwd=REPO, capture_output=True, text=True, timeout=110, check=False,
    )  # fmt: skip
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert re.search(r"^mailhop relay, workers = 1, 1024-byte messages, probe beside smtp-source -s 2: "
                     r"[1-9]\d* probe messages", proc.stdout, re.MULTILINE), output
    for step in ("connect", "greeting", "EHLO", "MAIL", "RCPT", "DATA", "end of data", "QUIT"):
        assert re.search(rf"^\| {step} \| \d+\.\d\d \| \d+\.\d\d \|$", proc.stdout, re.MULTILINE), output
    assert re.search(r"^machine: \d\.\d\d of \d+ cores busy$", proc.stdout, re.MULTILINE), output
    assert re.search(r"^  mailhop thread \d+/\d+: \d\.\d\d cores$", proc.stdout, re.MULTILINE), output
