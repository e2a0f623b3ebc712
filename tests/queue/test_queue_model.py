"""Pure parts of the queue: ids, recipient transitions, crash points."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from mailhop.queue import (
    InvalidTransition,
    RcptStatus,
    RecipientState,
    mark_deferred,
    mark_delivered,
    mark_failed,
)
from mailhop.queue.ids import id_timestamp, is_queue_id, new_queue_id


def _rcpt(status: RcptStatus = RcptStatus.PENDING) -> RecipientState:
    return RecipientState(idx=0, address="a@x.example", domain="x.example", orcpt=None, notify=(),
                          status=status, attempts=0, last_reply="", next_attempt=100.0, updated=100.0)


def test_ids_are_unique_sortable_and_filename_safe() -> None:
    ids = [new_queue_id() for _ in range(20000)]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)  # strictly increasing within a process, even within one millisecond
    assert all(len(i) == 16 and is_queue_id(i) and i.isalnum() and i.upper() == i for i in ids)


def test_id_encodes_its_time() -> None:
    before = time.time()
    qid = new_queue_id()
    assert before - 0.002 <= id_timestamp(qid) <= time.time() + 0.002


def test_is_queue_id_rejects_paths_and_bad_alphabet() -> None:
    for bad in ("", "../../etc/passwd", "0123456789ABCDEI", "0123456789abcdef", "0123456789ABCDEF0"):
        assert not is_queue_id(bad)


def test_ids_differ_across_processes() -> None:
    code = "from mailhop.queue.ids import new_queue_id; print(*(new_queue_id(1.0) for _ in range(500)))"
    outs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
            for _ in range(2)]
    assert not set(outs[0]) & set(outs[1])


def test_transitions() -> None:
    r = _rcpt()
    d = mark_deferred(r, "421 busy", 500.0, now=200.0)
    assert (d.status, d.attempts, d.last_reply, d.next_attempt, d.updated) == (RcptStatus.DEFERRED, 1, "421 busy",
                                                                              500.0, 200.0)
    d2 = mark_deferred(d, "450 again", 900.0, now=600.0)
    assert d2.attempts == 2 and not d2.is_final
    ok = mark_delivered(d2, "250 ok", now=901.0)
    assert (ok.status, ok.attempts, ok.is_final) == (RcptStatus.DELIVERED, 3, True)
    f = mark_failed(r, "550 no", now=300.0)
    assert (f.status, f.attempts) == (RcptStatus.FAILED, 1)
    expired = mark_failed(d, "expired", now=300.0, attempted=False)
    assert expired.attempts == 1
    assert r.status is RcptStatus.PENDING  # inputs are not changed


@pytest.mark.parametrize("final", [RcptStatus.DELIVERED, RcptStatus.FAILED])
def test_final_states_are_final(final: RcptStatus) -> None:
    r = _rcpt(final)
    with pytest.raises(InvalidTransition):
        mark_delivered(r, "250", now=1.0)
    with pytest.raises(InvalidTransition):
        mark_deferred(r, "421", 2.0, now=1.0)
    with pytest.raises(InvalidTransition):
        mark_failed(r, "550", now=1.0)


def test_crash_point_is_inert_unless_named() -> None:
    code = ("from mailhop.queue.faults import crash_point\n"
            "crash_point('after_commit'); print('alive', flush=True); crash_point('after_body_write'); print('no')")
    env = {**os.environ, "MAILHOP_CRASH_AT": "after_body_write"}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert (p.returncode, p.stdout) == (137, "alive\n")
