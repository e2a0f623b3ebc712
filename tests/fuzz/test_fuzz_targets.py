"""The fuzz targets of ``fuzz/targets.py`` under hypothesis (every run) and atheris (3 s each, if installed).

Long runs: ``python -m fuzz.run TARGET --seconds 600`` (see fuzz/README.md). Crashes the targets found are
named regression tests below.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fuzz.targets import TARGETS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailhop.queue.rows import decode_message
from mailhop.reply import Reply
from mailhop.smtp.client import ReplyParser, parse_ehlo

ROOT = Path(__file__).resolve().parents[2]

# SMTP-shaped fragments so hypothesis reaches past the verb dispatch (libFuzzer gets fuzz/smtp.dict).
FRAGMENTS = st.sampled_from([
    b"EHLO a.test\r\n", b"HELO a\r\n", b"MAIL FROM:<a@b.test>", b"MAIL FROM:<>", b" SIZE=12", b" BODY=8BITMIME",
    b" SMTPUTF8", b"RCPT TO:<c@d.test>", b" NOTIFY=SUCCESS", b" ORCPT=rfc822;x+40y", b"DATA\r\n", b"BDAT 3",
    b" LAST", b"\r\n", b"\r\n.\r\n", b"\r\n.", b".", b"\r", b"\n", b"AUTH PLAIN", b" AGFAAGI=", b"*\r\n",
    b"STARTTLS\r\n", b"QUIT\r\n", b"RSET\r\n", b"250-", b"250 ", b"2.0.0 ", b"SIZE 10\r\n", b"<", b">", b"@",
    b"\"q\"", b"[IPv6:::1]", b"[1.2.3.4]", b"xn--", b"\xc3\xa9", b"{\"size\":1}", b"pending", b"\x00", b"\xff",
])
INPUTS = st.binary(max_size=300) | st.lists(FRAGMENTS | st.binary(max_size=12), max_size=30).map(b"".join)
SEEDS = st.binary(min_size=0, max_size=4)  # the settings bytes each target reads first


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_target_hypothesis(name: str) -> None:
    target = TARGETS[name]

    @settings(max_examples=300, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(seed=SEEDS, body=INPUTS)
    def run(seed: bytes, body: bytes) -> None:
        target(seed.ljust(4, b"\x00") + body if len(seed) < 4 and body else seed + body)

    run()


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_target_smoke_inputs(name: str) -> None:
    for data in (b"", b"\x00", b"\xff" * 64, bytes(range(256)), b"\x01\x03\x07" + b"EHLO x\r\nDATA\r\n.\r\n" * 20):
        TARGETS[name](data)


@pytest.mark.skipif(importlib.util.find_spec("atheris") is None, reason="atheris not installed")
@pytest.mark.parametrize("name", sorted(TARGETS))
def test_target_atheris_3s(name: str, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(
        [sys.executable, "-m", "fuzz.run", name, "--seconds", "3", "--artifacts", str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"fuzz.run {name}:" in proc.stdout


# -- crashes the fuzz targets found, fixed: named regressions ---------------------------------------------


def test_decode_message_deeply_nested_params_json() -> None:
    """decode_message let RecursionError escape json.loads on a deeply nested params column."""
    row = ("q1", "a@b.test", "[" * 100_000, 0.0, 0, 0, "", "", "", 0)
    _, problems = decode_message(row, [])
    assert problems


def test_parse_ehlo_unicode_digit_size() -> None:
    """str.isdigit() accepts digits like "²" that int() refuses: a '250 SIZE ²' line raised ValueError."""
    (reply,) = ReplyParser().feed("250-mx.example\r\n250 SIZE \u00b2\r\n".encode())
    assert parse_ehlo(reply).size == 0


def test_decode_message_junk_json_is_a_problem() -> None:
    """Control for the case above: ordinary bad JSON is reported, not raised."""
    _, problems = decode_message(("q1", "", json.dumps([1]), 0.0, 0, 0, "", "", "", 0), [])
    assert any("params" in p for p in problems)
    assert isinstance(Reply(250, "", "x"), Reply)
