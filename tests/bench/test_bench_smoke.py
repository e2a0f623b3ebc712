"""The benchmark harness still runs end to end against both targets: ``python -m bench.run --smoke`` (both
workloads, accept and relay) and ``python -m bench.accept --smoke`` (the acceptance workload alone).

No timing is asserted (CI machines are noisy); the harness's own checks (mailhop's queue holds every message
or, relaying, is empty and the sink counted every message; Postfix relayed every message to its sink) make a
zero exit meaningful.
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
ROW = r"^\| {name} \| \d+ \| \d+ \| \d+\.\d+ \|$"
ACCEPT_LINE = re.compile(ROW.format(name="accept 5 KB, 20 sessions"), re.MULTILINE)
RELAY_LINE = re.compile(ROW.format(name="relay 5 KB, 20 sessions"), re.MULTILINE)
ANY_ROW = re.compile(r"^\| (accept|relay) ", re.MULTILINE)

pytestmark = pytest.mark.peer


def run_smoke(module: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run ``python -m module --smoke`` from the repository root once the peer programs and root are there."""
    for program in ("smtp-source", "smtp-sink", "postfix", "postconf", "postqueue"):
        require_program(program)
    if os.geteuid() != 0:
        message = "a private Postfix instance needs root (postfix -c DIR)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return subprocess.run(
        [sys.executable, "-m", module, "--smoke"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.mark.timeout(200)
def test_run_smoke_prints_both_workloads() -> None:
    proc = run_smoke("bench.run", timeout=190)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert ACCEPT_LINE.search(proc.stdout), output
    assert RELAY_LINE.search(proc.stdout), output


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
