"""Header edits: folding, injection safety, milter CHGHEADER semantics, and rewriting the spooled head (inline and
file-backed bodies) at every header-section shape the session can meet."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailhop.checks.api import AuthResult, CheckContext, HeaderEdit
from mailhop.message.edit import fold, rewrite_header_block, split_fields
from mailhop.message.headers import HeaderScanner
from mailhop.queue.spool import Spool
from mailhop.server.checkflow import apply_header_edits, read_for_checks

RECEIVED = b"Received: from x ([192.0.2.1])\r\n\tby relay.test; Mon, 30 Nov 2026 10:00:00 +0000\r\n"


def test_fold_keeps_lines_short_and_values_whole() -> None:
    value = "relay.test; " + "; ".join(f"dkim=pass header.d=d{i}.example header.s=s{i}" for i in range(5))
    raw = fold("Authentication-Results", value)
    assert all(len(line) <= 78 for line in raw.split(b"\r\n"))
    assert raw.replace(b"\r\n\t", b" ") == b"Authentication-Results: " + value.encode()


def test_fold_cannot_inject_fields() -> None:
    raw = fold("X-Spam", "yes\r\nBcc: victim@example.test\nX: y\r")
    assert len(split_fields(raw)) == 1 and b"\r\nBcc" not in raw


def test_fold_keeps_a_callers_folding() -> None:
    assert fold("DKIM-Signature", "v=1; a=rsa-sha256;\n\tb=abc") == b"DKIM-Signature: v=1; a=rsa-sha256;\r\n\tb=abc"


def test_fold_refuses_bad_names() -> None:
    with pytest.raises(ValueError):
        fold("Bad Name", "x")
    with pytest.raises(ValueError):
        fold("X:Y", "x")


def test_change_delete_insert_add() -> None:
    block = b"From: a@b\r\nX-Tag: 1\r\nSubject: s\r\n folded\r\nX-Tag: 2"
    out = rewrite_header_block(block, [
        HeaderEdit("change", "X-Tag", "two", 2),
        HeaderEdit("change", "x-tag", "", 1),
        HeaderEdit("insert", "X-Top", "t", 0),
        HeaderEdit("change", "X-New", "added", 1),  # absent: CHGHEADER adds it
        HeaderEdit("add", "X-End", "e"),
    ])
    assert out == b"X-Top: t\r\nFrom: a@b\r\nSubject: s\r\n folded\r\nX-Tag: two\r\nX-New: added\r\nX-End: e"


@given(st.lists(st.tuples(st.from_regex(r"[A-Za-z][A-Za-z0-9-]{0,15}", fullmatch=True),
                          st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=200)),
                min_size=1, max_size=8))
def test_any_edit_values_give_a_well_formed_header_block(fields: list[tuple[str, str]]) -> None:
    out = rewrite_header_block(b"From: a@b", [HeaderEdit("add", n, v) for n, v in fields])
    parts = split_fields(out)
    assert len(parts) == 1 + len(fields)
    assert b"\r\n\r\n" not in out and b"\n" not in out.replace(b"\r\n", b"")
    for p in parts:
        assert b":" in p


def _spool(tmp_path: Path) -> Spool:
    spool = Spool(tmp_path / "spool")
    spool.ensure_layout()
    return spool


MESSAGES = [
    b"Subject: hi\r\nAuthentication-Results: relay.test; dkim=pass\r\n\r\nbody\r\n",  # ordinary
    b"\r\nbody without headers\r\n",  # no header section at all
    b"Subject: only headers\r\n",  # no blank line: all header
    b"Authentication-Results: relay.test; spf=pass\r\n\r\nbody\r\n",  # every field removed
]


@pytest.mark.parametrize("inline_max", [1 << 20, 16], ids=["inline", "file"])
@pytest.mark.parametrize("message", MESSAGES)
def test_spooled_head_rewrite(tmp_path: Path, message: bytes, inline_max: int) -> None:
    spool = _spool(tmp_path)
    writer = spool.writer("AAAAAAAAAAAAAABB", inline_max)
    writer.write(RECEIVED)
    scanner = HeaderScanner()
    for i in range(0, len(message), 7):  # chunked as the session feeds it
        writer.write(message[i:i + 7])
        scanner.feed(message[i:i + 7])
    scanner.finish()
    ctx = CheckContext(client_ip="192.0.2.1")
    ctx.auth_results.append(AuthResult("spf", "pass", properties=(("smtp.mailfrom", "a@b.test"),)))
    ctx.header_edits.append(HeaderEdit("add", "X-Added", "yes"))

    async def go() -> bytes:
        assert await read_for_checks(writer, len(RECEIVED), 1 << 20) == message
        assert await read_for_checks(writer, len(RECEIVED), 3) is None
        await apply_header_edits(writer, RECEIVED, scanner, ctx, "relay.test")
        return writer.read_back(0)

    out = asyncio.run(go())
    head, sep, body = out.partition(b"\r\n\r\n")
    assert out.startswith(RECEIVED + b"Authentication-Results: relay.test; spf=pass smtp.mailfrom=a@b.test\r\n")
    assert b"X-Added: yes" in head and b"dkim=pass" not in out and b"relay.test; spf=pass\r\n\r\n" not in out
    if b"\r\n\r\n" not in message and not message.startswith(b"\r\n"):
        assert sep == b"" and out.endswith(b"X-Added: yes\r\n")  # still all header, still CRLF-terminated
    else:
        assert sep == b"\r\n\r\n"
    original_body = message.partition(b"\r\n\r\n")[2] if b"\r\n\r\n" in message else (
        message[2:] if message.startswith(b"\r\n") else b"")
    assert body == original_body
    assert writer.size == len(out)
    writer.abort()
    assert list(spool.scan_bodies()) == []  # no .edit file or body left behind


def test_nothing_to_edit_leaves_the_body_untouched(tmp_path: Path) -> None:
    writer = _spool(tmp_path).writer("AAAAAAAAAAAAAABC")
    writer.write(RECEIVED + b"Subject: x\r\n\r\nbody\r\n")
    scanner = HeaderScanner()
    scanner.feed(b"Subject: x\r\n\r\nbody\r\n")
    asyncio.run(apply_header_edits(writer, RECEIVED, scanner, None, "relay.test"))
    assert writer.read_back(0) == RECEIVED + b"Subject: x\r\n\r\nbody\r\n"
