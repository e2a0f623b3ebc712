"""A private, throw-away Postfix instance relaying to an smtp-sink, as the reference MTA for benchmarks.

It lives entirely in one temp directory (config, queue, data, log) and never reads or touches the system
instance in /etc/postfix beyond copying its master.cf. fsync stays on (Postfix's default) so the comparison
with mailhop, which also fsyncs before 250, is like for like on durability.

Postfix only accepts ``postfix -c DIR`` for a directory outside ``alternate_config_directories`` when run as
root, and it drops to ``mail_owner`` (postfix) itself, so the harness needs root.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .procs import BenchError, find_program, free_port, port_open, stop_process, wait_pid_gone, wait_until

__all__ = ["PostfixInstance", "PrivatePostfix", "SmtpSink", "private_postfix"]

LOOPBACK = "127.0.0.1"
START_TIMEOUT = 60.0
STOP_TIMEOUT = 60.0
SYSTEM_MASTER_CF = Path("/etc/postfix/master.cf")
MAIL_OWNER = "postfix"
# smtp-sink -c rewrites one status line, "sess=N quit=N mesg=N", after each event.
SINK_COUNTER = re.compile(rb"mesg=(\d+)")
SINK_SESSIONS = re.compile(rb"sess=(\d+)")
SINK_TAIL_BYTES = 512
LOG_POLL_INTERVAL = 0.5
MAILLOG_TAIL_LINES = 5
# qmgr's advice when one destination fills the active queue; it is informational, not a failure.
# The block's middle lines vary with the cause qmgr guesses (qmgr_entry.c); these cover all its variants.
CONGESTION_PHRASES = (
    "active queue entries",
    "this may slow down other mail deliveries",
    "you may need ",
    "so that Postfix ",
    "avoid flushing the whole queue",
    "lots of deferred mail",
    "qmgr_clog_warn_time",
)


def require(name: str) -> str:
    """Path of a Postfix program, or a BenchError that says which Debian package brings it."""
    path = find_program(name)
    if path is None:
        raise BenchError(f"{name} not found: apt-get install postfix (with policy-rc.d exiting 101)")
    return path


def run_quiet(argv: list[str], what: str) -> str:
    """Run a short admin command; its stdout, or a BenchError carrying its stderr."""
    result = subprocess.run(argv, capture_output=True, text=True, timeout=START_TIMEOUT, check=False)
    if result.returncode != 0:
        raise BenchError(f"{what} failed (exit {result.returncode}): {result.stderr.strip()}")
    return result.stdout


class SmtpSink:
    """Postfix's smtp-sink on loopback: the relayhost, so Postfix's outbound leg costs little and is counted."""

    def __init__(self, workdir: Path, host: str = LOOPBACK, port: int | None = None) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.output = workdir / "smtp-sink.out"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the sink and wait until its port accepts connections."""
        argv = [require("smtp-sink"), "-c", "-u", MAIL_OWNER, f"{self.host}:{self.port}", "256"]
        with self.output.open("wb") as out:
            self._proc = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        wait_until(self._ready, START_TIMEOUT, f"smtp-sink on {self.host}:{self.port}")

    def _ready(self) -> bool:
        if self._proc is not None and self._proc.poll() is not None:
            raise BenchError(
                f"smtp-sink exited {self._proc.returncode}: {self.output.read_text(errors='replace')}"
            )
        return port_open(self.host, self.port)

    def received(self) -> int:
        """Messages the sink has accepted so far (the last counter it printed)."""
        return self._last(SINK_COUNTER)

    def sessions(self) -> int:
        """SMTP sessions that have ended so far (smtp-sink counts a session when it ends)."""
        return self._last(SINK_SESSIONS)

    def _last(self, counter: re.Pattern[bytes]) -> int:
        try:
            with self.output.open("rb") as out:
                # The counter line is rewritten in place after each event, so the last one is in the tail.
                out.seek(max(0, out.seek(0, 2) - SINK_TAIL_BYTES))
                counts = counter.findall(out.read())
        except OSError:
            return 0
        return int(counts[-1]) if counts else 0

    def stop(self) -> None:
        """Terminate and reap the sink."""
        if self._proc is not None:
            stop_process(self._proc)
            self._proc = None


@dataclass(frozen=True)
class PostfixLayout:
    """Where one private instance keeps its files, all under one root."""

    root: Path

    @property
    def config_dir(self) -> Path:
        return self.root / "etc"

    @property
    def queue_dir(self) -> Path:
        return self.root / "queue"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def maillog(self) -> Path:
        return self.root / "maillog"


def main_cf_settings(layout: PostfixLayout, relayhost: str) -> dict[str, str]:
    """main.cf for a relay-only instance: trusts loopback, delivers nothing locally, logs to a file."""
    return {
        # Debian's shipped level; it also settles the defaults that changed across versions.
        "compatibility_level": "3.6",
        "queue_directory": str(layout.queue_dir),
        "data_directory": str(layout.data_dir),
        "inet_interfaces": LOOPBACK,
        "inet_protocols": "ipv4",
        "myhostname": "postfix.bench.test",
        "mynetworks": "127.0.0.0/8",
        "smtpd_recipient_restrictions": "permit_mynetworks, reject",
        # mailhop does no reverse lookup of clients either, and this keeps every query off the system resolver.
        "smtpd_peername_lookup": "no",
        # No local delivery: nothing is "local", and if something were, it bounces instead of writing mboxes.
        "mydestination": "",
        "local_recipient_maps": "",
        "local_transport": "error:5.1.1 local delivery disabled",
        "alias_maps": "",
        "alias_database": "",
        "relayhost": relayhost,
        # The workload is ASCII; pin this instead of inheriting it from compatibility_level.
        "smtputf8_enable": "no",
        # postlogd writes here, so no syslog is needed; the prefix list must allow the temp dir.
        "maillog_file": str(layout.maillog),
        "maillog_file_prefixes": str(layout.root),
    }


class PostfixInstance:
    """One private Postfix: configured, started and stopped with ``postfix -c DIR``, never the system one."""

    def __init__(
        self,
        root: Path,
        listen_port: int,
        relayhost: str,
        listen_host: str = LOOPBACK,
        settings: Mapping[str, str] | None = None,
    ) -> None:
        self.layout = PostfixLayout(root)
        self.listen_host = listen_host
        self.listen_port = listen_port
        self.relayhost = relayhost
        self.settings = dict(settings or {})  # main.cf overrides of a workload, e.g. message_size_limit
        self._master_pid: int | None = None

    @property
    def address(self) -> str:
        return f"{self.listen_host}:{self.listen_port}"

    def _postconf(self, *args: str) -> str:
        return run_quiet(
            [require("postconf"), "-c", str(self.layout.config_dir), *args], f"postconf {args[0]}"
        )

    def _postfix(self, command: str) -> str:
        return run_quiet(
            [require("postfix"), "-c", str(self.layout.config_dir), command], f"postfix {command}"
        )

    def configure(self) -> None:
        """Write main.cf and master.cf and create the directories with the owners Postfix insists on."""
        if os.geteuid() != 0:
            raise BenchError(
                "a private Postfix needs root: postfix -c DIR outside alternate_config_directories"
            )
        layout = self.layout
        # Postfix's daemons run as mail_owner and must traverse every directory down to their queue.
        layout.root.chmod(0o755)
        blocked = [str(p) for p in layout.root.parents if not p.stat().st_mode & 0o001]
        if blocked:
            raise BenchError(f"{MAIL_OWNER} cannot traverse {', '.join(blocked)}: chmod o+x them")
        for directory in (layout.config_dir, layout.queue_dir, layout.data_dir):
            directory.mkdir(parents=True, exist_ok=True)
        shutil.chown(layout.data_dir, user=MAIL_OWNER)
        shutil.copyfile(SYSTEM_MASTER_CF, layout.config_dir / "master.cf")
        (layout.config_dir / "main.cf").touch()
        settings = main_cf_settings(layout, self.relayhost) | self.settings
        self._postconf("-e", *(f"{key}={value}" for key, value in settings.items()))
        self._configure_master_cf()
        # Creates the queue subdirectories owned by postfix / setgid postdrop, as a fresh install would.
        self._postfix("check")

    def _configure_master_cf(self) -> None:
        """Replace the port-25 listener with ours; no chroot, since nothing was copied into the queue dir."""
        self._postconf("-M#", "smtp/inet")
        service = f"{self.address}/inet"
        self._postconf("-M", f"{service}={self.address} inet n - n - - smtpd")
        self._postconf("-F", "*/*/chroot=n")

    def start(self) -> None:
        """``postfix start`` and wait until our smtpd listener accepts connections."""
        try:
            self._postfix("start")
        except BenchError as exc:
            # postfix start reports its reason to the maillog, not to stderr.
            tail = " | ".join(self._log().splitlines()[-MAILLOG_TAIL_LINES:])
            raise BenchError(f"{exc}; maillog: {tail or '(empty)'}") from exc
        self._master_pid = self.master_pid()
        wait_until(
            lambda: port_open(self.listen_host, self.listen_port), START_TIMEOUT, f"Postfix on {self.address}"
        )

    def master_pid(self) -> int | None:
        """PID recorded by the running master, if any."""
        pid_file = self.layout.queue_dir / "pid" / "master.pid"
        try:
            return int(pid_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def stop(self) -> None:
        """``postfix stop``, then make sure the master really exited (SIGKILL by PID as a last resort)."""
        pid = self._master_pid or self.master_pid()
        try:
            self._postfix("stop")
        except BenchError:
            if pid is None:
                raise
        if pid is not None and not wait_pid_gone(pid, STOP_TIMEOUT):
            os.kill(pid, 9)
            if not wait_pid_gone(pid, 5.0):
                raise BenchError(f"Postfix master pid {pid} survived SIGKILL")
        self._master_pid = None

    def recipient_limit(self) -> int:
        """Recipients the smtp client sends per transaction to the relayhost (smtp_destination_recipient_limit,
        expanded): a message with more reaches the sink as several transactions."""
        return int(self._postconf("-x", "-h", "smtp_destination_recipient_limit").strip())

    def _log(self) -> str:
        return self.layout.maillog.read_text(errors="replace") if self.layout.maillog.exists() else ""

    def accepted(self, sender: str) -> int:
        """Messages from sender that reached the queue manager, i.e. were accepted and queued."""
        needle = f"from=<{sender}>"
        return sum(1 for line in self._log().splitlines() if "/qmgr[" in line and needle in line)

    def held(self) -> int:
        """Messages in the hold queue (accept-only runs: everything accepted is put on hold)."""
        hold = self.layout.queue_dir / "hold"
        return sum(1 for _, _, files in os.walk(hold) for _ in files) if hold.exists() else 0

    def relayed(self) -> int:
        """Recipients the smtp client handed to the relayhost."""
        return self._log().count(" status=sent ")

    def _lines_marked(self, *marks: str) -> list[str]:
        return [line for line in self._log().splitlines() if any(mark in line for mark in marks)]

    def problems(self) -> list[str]:
        """Errors, fatals and panics from the maillog: a run with any of these is not trusted."""
        return self._lines_marked(": error: ", ": fatal: ", ": panic: ")

    def warnings(self) -> list[str]:
        """Warnings other than queue congestion (e.g. clock skew under load): reported, not fatal."""
        return [line for line in self._lines_marked(": warning: ") if not _is_congestion(line)]

    def congestion(self) -> list[str]:
        """qmgr's "active queue full" advice: the relay leg lagging acceptance, expected under this load."""
        return [line for line in self._lines_marked(": warning: ") if _is_congestion(line)]

    def queue_is_empty(self) -> bool:
        """Whether ``postqueue -p`` reports an empty queue."""
        out = run_quiet([require("postqueue"), "-c", str(self.layout.config_dir), "-p"], "postqueue -p")
        return "Mail queue is empty" in out


def _is_congestion(line: str) -> bool:
    """Whether a maillog line belongs to qmgr's multi-line congestion warning (see qmgr_clog_warn_time)."""
    return "/qmgr[" in line and any(phrase in line for phrase in CONGESTION_PHRASES)


@dataclass
class PrivatePostfix:
    """A running private Postfix and the sink it relays to."""

    postfix: PostfixInstance
    sink: SmtpSink

    @property
    def address(self) -> str:
        return self.postfix.address

    def wait_relayed(self, expected: int, timeout: float) -> float:
        """Wait until the sink has received expected messages; seconds waited (Postfix's drain time)."""
        started = time.monotonic()
        wait_until(
            lambda: self.sink.received() >= expected, timeout, f"smtp-sink to receive {expected} messages"
        )
        return time.monotonic() - started

    def wait_accepted(self, sender: str, expected: int, timeout: float) -> None:
        """Wait until the maillog shows expected messages from sender queued (postlogd writes asynchronously)."""
        what = f"the maillog to show {expected} queued messages from {sender}"
        wait_until(lambda: self.postfix.accepted(sender) >= expected, timeout, what, LOG_POLL_INTERVAL)


@contextmanager
def private_postfix(root: Path, settings: Mapping[str, str] | None = None) -> Iterator[PrivatePostfix]:
    """Start an smtp-sink and a private Postfix relaying to it under root; stop both whatever happens.
    settings override main.cf parameters (a workload's raised limits); everything else is as configured
    by ``main_cf_settings``."""
    root.chmod(0o755)
    sink = SmtpSink(root)
    sink.start()
    try:
        relayhost = f"[{sink.host}]:{sink.port}"
        postfix = PostfixInstance(root / "postfix", free_port(), relayhost, settings=settings)
        postfix.layout.root.mkdir(parents=True, exist_ok=True)
        postfix.configure()
        postfix.start()
        try:
            yield PrivatePostfix(postfix, sink)
        finally:
            postfix.stop()
    finally:
        sink.stop()
