"""The benchmark harness still runs end to end: ``python -m bench.accept --smoke`` against both targets.

No timing is asserted (CI machines are noisy); the harness's own checks (mailhop's queue holds every message,
Postfix relayed every message to its sink) make a zero exit meaningful.
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
TABLE_LINE = re.compile(r"^\| accept 5 KB, 20 sessions \| \d+ \| \d+ \| \d+\.\d+ \|$", re.MULTILINE)

pytestmark = pytest.mark.peer


@pytest.mark.timeout(90)
def test_accept_smoke_prints_the_table() -> None:
    for program in ("smtp-source", "smtp-sink", "postfix", "postconf", "postqueue"):
        require_program(program)
    if os.geteuid() != 0:
        message = "a private Postfix instance needs root (postfix -c DIR)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    proc = subprocess.run(
        [sys.executable, "-m", "bench.accept", "--smoke"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=80,
        check=False,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert TABLE_LINE.search(proc.stdout), output
