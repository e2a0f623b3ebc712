"""Real write and fsync errors inside a running ``mailhop serve``: 451/452, never 250; 421 4.3.2 while the spool is
failed; nothing of a failed attempt is queued; service comes back by itself when the fault goes.

Two ways in. ``eio_shim.c`` is an LD_PRELOAD library (compiled here with gcc) that fails ``write``/``pwrite64``
(SQLite's WAL and our body files) and ``fsync``/``fdatasync`` on descriptors under the spool while a control file
exists; the test writes and removes that file while the daemon runs, and sockets and the log are never touched.
The second way is ``strace -e inject=``, attached to the running daemon and detached again. Run with ``-s`` to see
how long recovery took.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import require_program
from tests.daemon.harness import Client, Relay, free_port, start_relay, write_config

pytestmark = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="the shim needs /proc (Linux)")

PROBE_INTERVAL = 0.2  # queue.health_probe_interval for these daemons: recovery is polled, never slept for
RECOVERY_DEADLINE = 30.0  # generous: a loaded 2-core machine; the figure printed is what counts
SMALL = b"Subject: small\r\n\r\n" + b"inline body line\r\n" * 50  # stored in SQLite
LARGE = b"Subject: large\r\n\r\n" + (b"f" * 998 + b"\r\n") * 300  # 300 KB: a body file (inline max 128 KiB)


@pytest.fixture(scope="module")
def shim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    gcc = require_program("gcc")
    out = tmp_path_factory.mktemp("shim") / "eio_shim.so"
    src = Path(__file__).with_name("eio_shim.c")
    done = subprocess.run([gcc, "-shared", "-fPIC", "-O2", "-Wall", "-Wextra", "-o", str(out), str(src),
                           "-ldl"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return out


@dataclass
class Faulty:
    """A daemon whose spool writes fail on demand."""

    relay: Relay
    control: Path

    def inject(self, spec: str) -> None:
        """Make ``spec`` ("fsync EIO", "write EIO", "write ENOSPC", ...) fail from now on."""
        tmp = self.control.with_name("fault.tmp")
        tmp.write_text(spec + "\n")
        tmp.rename(self.control)  # atomic: the shim never reads a half-written spec

    def clear(self) -> None:
        self.control.unlink()


@contextmanager
def daemon(tmp_path: Path, env: dict[str, str] | None = None, expect_exit: int = 0) -> Iterator[Relay]:
    port = free_port()
    cfg = write_config(tmp_path, port)
    # write_config already has a [queue] table; TOML allows no second one.
    text = cfg.read_text()
    assert 'path = "spool"\n' in text
    cfg.write_text(text.replace('path = "spool"\n', f'path = "spool"\nhealth_probe_interval = {PROBE_INTERVAL}\n'))
    relay = start_relay(cfg, "127.0.0.1", port, tmp_path / "spool", env=env)
    try:
        yield relay
    finally:
        code = relay.stop()
    assert code == expect_exit, f"mailhop exited {code}\n{relay.log()}"


@contextmanager
def faulty_daemon(tmp_path: Path, shim: Path, expect_exit: int = 0) -> Iterator[Faulty]:
    control = tmp_path / "fault"
    env = {
        "LD_PRELOAD": str(shim),
        "MAILHOP_EIO_FILE": str(control),
        "MAILHOP_EIO_PREFIX": str((tmp_path / "spool").resolve()),
    }
    with daemon(tmp_path, env, expect_exit) as relay:
        try:
            yield Faulty(relay, control)
        finally:
            control.unlink(missing_ok=True)


def connect(relay: Relay) -> tuple[Client, str]:
    c = Client(relay.host, relay.port, timeout=15)
    return c, c.reply()


def open_session(relay: Relay) -> Client:
    """A session past EHLO, idle."""
    c, greeting = connect(relay)
    assert greeting.startswith("220"), greeting
    c.line("EHLO client.test")
    assert c.reply().startswith("250")
    return c


def start_data(c: Client) -> None:
    c.send(b"MAIL FROM:<a@client.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n")
    assert [c.reply()[:3] for _ in range(3)] == ["250", "250", "354"]


def finish_data(c: Client, body: bytes) -> str:
    c.send(body + b".\r\n")
    return c.reply()


def transaction(c: Client, body: bytes) -> str:
    """MAIL, RCPT, DATA and the body on an open session; the reply to the end of data."""
    start_data(c)
    return finish_data(c, body)


def send(relay: Relay, body: bytes) -> str:
    c = open_session(relay)
    try:
        reply = transaction(c, body)
        c.line("QUIT")
        c.reply()
        return reply
    finally:
        c.close()


def queued_id(reply: str) -> str:
    match = re.match(r"250 2\.0\.0 Ok: queued as (\S+)$", reply)
    assert match, reply
    return match.group(1)


def assert_refused_at_greeting(relay: Relay) -> None:
    c, greeting = connect(relay)
    try:
        assert greeting.startswith("421 4.3.2 "), greeting
        assert c.closed()
    finally:
        c.close()


def wait_for_service(relay: Relay) -> float:
    """Poll new connections until one gets 220; returns the seconds it took. Every refusal must be 421 4.3.2."""
    started = time.monotonic()
    while True:
        c, greeting = connect(relay)
        c.close()
        if greeting.startswith("220"):
            return time.monotonic() - started
        assert greeting.startswith("421 4.3.2 "), greeting
        assert time.monotonic() - started < RECOVERY_DEADLINE, f"the spool never recovered\n{relay.log()}"
        time.sleep(PROBE_INTERVAL / 4)


def body_files(relay: Relay) -> list[str]:
    return sorted(p.name for p in (relay.spool / "bodies").glob("*/*"))


@pytest.mark.parametrize(("spec", "body"), [
    ("fsync EIO", SMALL),  # the WAL's fdatasync at COMMIT
    ("write EIO", SMALL),  # SQLite's pwrite64 of the WAL frames
    ("fsync EIO", LARGE),  # the body file's fsync (before the COMMIT)
    ("write EIO", LARGE),  # the body file's write(), while DATA streams in
], ids=["fsync-inline", "write-inline", "fsync-file", "write-file"])
def test_io_error_gives_451_then_421_until_the_spool_recovers(tmp_path: Path, shim: Path, spec: str,
                                                               body: bytes) -> None:
    with faulty_daemon(tmp_path, shim) as fault:
        relay = fault.relay
        idle = open_session(relay)  # opened while all is well; its next MAIL comes during the failure
        try:
            before = queued_id(send(relay, body))  # the shim itself breaks nothing
            fault.inject(spec)
            with contextlib.closing(open_session(relay)) as sender:  # the failure is not known yet: 220
                reply = transaction(sender, body)
                assert reply.startswith("451 4.3.0 "), reply  # never 250
                # The same session, next transaction: the spool is now known to be failed.
                sender.line("MAIL FROM:<a@client.test>")
                assert sender.reply().startswith("421 4.3.2 ")
                assert sender.closed()
            assert_refused_at_greeting(relay)
            idle.line("MAIL FROM:<idle@client.test>")
            assert idle.reply().startswith("421 4.3.2 ")
            assert idle.closed()
        finally:
            idle.close()
        assert relay.proc.poll() is None
        assert relay.queue_ids() == [before]  # nothing of the failed attempt

        fault.clear()
        took = wait_for_service(relay)
        after = queued_id(send(relay, body))
        assert relay.queue_ids() == [before, after]
        print(f"\n[{spec}, {len(body)} bytes] service back {took:.2f}s after the fault was removed "
              f"(probe interval {PROBE_INTERVAL}s)")
    # Exactly one failure and one recovery logged, whatever the number of failed writes and probes between.
    log = relay.log()
    assert log.count("spool failed:") == 1, log
    assert log.count("spool recovered") == 1, log
    # No body file of the failed attempt or of a failed probe is left behind.
    expected = sorted(i for i in (before, after) if len(body) > 128 * 1024)
    assert body_files(relay) == expected


@pytest.mark.parametrize("body", [SMALL, LARGE], ids=["inline", "file"])
def test_enospc_gives_452_and_keeps_greeting(tmp_path: Path, shim: Path, body: bytes) -> None:
    with faulty_daemon(tmp_path, shim) as fault:
        relay = fault.relay
        before = queued_id(send(relay, body))
        fault.inject("write ENOSPC")
        assert send(relay, body).startswith("452 4.3.1 ")
        # Full is not failed: a later message may fit (this one does not), so connections are still greeted.
        assert send(relay, body).startswith("452 4.3.1 ")
        assert relay.queue_ids() == [before]
        fault.clear()
        after = queued_id(send(relay, body))  # no probe needed: the next commit marks the spool ok
        assert relay.queue_ids() == [before, after]
    log = relay.log()
    assert log.count("spool full:") == 1, log
    assert "spool failed" not in log
    assert body_files(relay) == sorted(i for i in (before, after) if len(body) > 128 * 1024)


def stored_body(relay: Relay, queue_id: str) -> bytes:
    out = subprocess.run([sys.executable, "-m", "mailhop.cli", "queue", "show", queue_id, "--body", "--config",
                          str(relay.config)], capture_output=True, check=True)
    return out.stdout


def test_kill_9_while_failed_leaves_nothing_half_written(tmp_path: Path, shim: Path) -> None:
    """A crash while the spool is failed: the restarted daemon finds every acknowledged message whole, no body file
    of a failed accept, and the inline message whose WAL fsync failed at most once, whole (see reliability.md:
    a failed fsync leaves its transaction in doubt, like a crash between COMMIT and the 250)."""
    with faulty_daemon(tmp_path, shim, expect_exit=-9) as fault:
        relay = fault.relay
        acked = {queued_id(send(relay, SMALL)): SMALL, queued_id(send(relay, LARGE)): LARGE}
        inline, filed = open_session(relay), open_session(relay)
        with contextlib.closing(inline), contextlib.closing(filed):
            start_data(inline)
            start_data(filed)
            fault.inject("fsync EIO")
            assert finish_data(inline, SMALL.replace(b"small", b"doubt")).startswith("451 4.3.0 ")
            assert finish_data(filed, LARGE.replace(b"large", b"never")).startswith("451 4.3.0 ")
        relay.proc.kill()
        relay.proc.wait()
    with daemon(tmp_path) as relay:  # the same spool, no shim: start-up recovery runs
        ids = relay.queue_ids()
        assert set(acked) <= set(ids)
        for queue_id, body in acked.items():
            assert stored_body(relay, queue_id).endswith(body)
        doubtful = [i for i in ids if i not in acked]
        assert len(doubtful) <= 1, ids
        for queue_id in doubtful:
            assert stored_body(relay, queue_id).endswith(SMALL.replace(b"small", b"doubt"))
        assert body_files(relay) == sorted(i for i, body in acked.items() if body is LARGE)
        print(f"\n[kill -9 while failed] in-doubt inline message after restart: {len(doubtful)} copy")


def test_strace_injected_fsync_error(tmp_path: Path) -> None:
    """The same contract with the fault injected by strace into the unmodified daemon, then detached."""
    strace = require_program("strace")
    with daemon(tmp_path) as relay:
        before = queued_id(send(relay, SMALL))
        tracer = subprocess.Popen(
            [strace, "-f", "-o", os.devnull, "-e", "trace=fsync,fdatasync", "-e", "inject=fsync,fdatasync:error=EIO",
             "-p", str(relay.proc.pid)],
            stderr=subprocess.PIPE, text=True)
        try:
            assert tracer.stderr is not None
            first = tracer.stderr.readline()  # "strace: Process N attached ...": injection is on from here
            if "attached" not in first:
                tracer.wait(timeout=10)
                pytest.skip(f"strace cannot attach here (ptrace not permitted?): {first.strip()}")
            reply = send(relay, SMALL)
            assert reply.startswith("451 4.3.0 "), reply
            assert_refused_at_greeting(relay)
            assert relay.queue_ids() == [before]
        finally:
            tracer.terminate()  # strace detaches on SIGTERM; the daemon runs on untraced
            tracer.communicate(timeout=10)
        took = wait_for_service(relay)
        after = queued_id(send(relay, SMALL))
        assert relay.queue_ids() == [before, after]
        print(f"\n[strace inject] service back {took:.2f}s after strace detached")
