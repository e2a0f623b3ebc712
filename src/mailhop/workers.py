"""Several worker processes (``workers = N``): one mailhop per core, sharing nothing but the listening addresses.

Why processes: one Python process runs its event loop on one core, and at a few thousand messages per second
that core is the limit (bench/RESULTS.md). Why shared-nothing: the durable queue's speed comes from one writer
thread doing group commit into one SQLite file; several processes writing one file would serialise on its lock
and lose the batching. So each worker is a whole relay on its own **spool shard**:

* shard 0 is ``queue.path`` itself (so going from 1 to N workers keeps the mail already queued there), shard i
  is ``queue.path/shard-i``; each has its own queue.db, bodies/ and lock, its own recovery at start and its own
  delivery engine, which delivers what that worker accepted;
* every worker binds every listener with SO_REUSEPORT and the kernel spreads new connections across them;
* the user database (``users.db``) stays at ``queue.path`` and is shared (read by all, written by the CLI);
* the queue CLI (``mailhop queue ...``, ``mailhop quarantine ...``) works across all shards.

What is per worker: connection limits, delivery concurrency (``max_connections``,
``max_connections_per_destination``), in-memory rate-limit counters (use the Redis backend to share them) and
caches. Greylisting keeps its triplets in memory, and a client's retry may reach another worker, so it is refused
with ``workers > 1`` (config error).

The supervisor (``mailhop serve`` with ``workers > 1``) starts the workers, forwards SIGTERM/SIGINT/SIGHUP/SIGUSR1
to them, and restarts one that dies (its shard recovers at start, like after any crash), with a growing delay.
Fewer workers than there are non-empty shards would strand mail: ``serve`` refuses to start then, naming them.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

from .queue.peek import message_count

__all__ = ["Supervisor", "shard_path", "shard_paths", "stranded_shards"]

log = logging.getLogger("mailhop.workers")

RESTART_DELAY_MIN = 1.0
RESTART_DELAY_MAX = 30.0
EX_CONFIG = 78


def shard_path(root: Path, index: int) -> Path:
    """The spool directory of worker ``index``."""
    return root if index == 0 else root / f"shard-{index}"


def shard_paths(root: Path, workers: int = 1) -> list[Path]:
    """Every shard the queue CLI must look at: the configured workers' and any other that exists."""
    paths = [shard_path(root, i) for i in range(workers)]
    if root.is_dir():
        extra = sorted((p for p in root.glob("shard-*") if p.is_dir() and p.name[6:].isdigit()),
                       key=lambda p: int(p.name[6:]))
        paths += [p for p in extra if p not in paths]
    return paths


def stranded_shards(root: Path, workers: int) -> list[Path]:
    """Shards beyond ``workers`` that still hold messages (nobody would deliver them)."""
    out = []
    for path in shard_paths(root, workers)[workers:]:
        count = message_count(path)
        if count is None or count:  # unreadable: assume it matters
            out.append(path)
    return out


class Supervisor:
    """Runs ``workers`` copies of ``mailhop serve --worker I`` and keeps them running until told to stop."""

    def __init__(self, config_path: Path, workers: int, loop: str) -> None:
        self.config_path = config_path
        self.workers = workers
        self.loop = loop
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self._stopping = False
        self._pending: list[int] = []

    def _start(self, index: int) -> None:
        argv = [sys.executable, "-m", "mailhop.cli", "serve", "--config", str(self.config_path), "--loop",
                self.loop, "--worker", str(index)]
        self.procs[index] = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
        log.info("worker %d started pid=%d", index, self.procs[index].pid)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self._pending.append(signum)

    def _forward(self, signum: int) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signum)

    def run(self) -> int:
        """Start the workers and supervise them; the exit status (0 after an orderly stop)."""
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
            signal.signal(sig, self._on_signal)
        for i in range(self.workers):
            self._start(i)
        delays = dict.fromkeys(range(self.workers), RESTART_DELAY_MIN)
        started = dict.fromkeys(range(self.workers), time.monotonic())
        restart_at: dict[int, float] = {}
        status = 0
        while True:
            while self._pending:
                signum = self._pending.pop(0)
                if signum in (signal.SIGTERM, signal.SIGINT):
                    self._stopping = True
                    self._forward(signal.SIGTERM)
                else:
                    self._forward(signum)
            now = time.monotonic()
            for i, proc in list(self.procs.items()):
                code = proc.poll()
                if code is None or i in restart_at:
                    continue
                if self._stopping:
                    continue
                if code == EX_CONFIG:
                    log.error("worker %d: configuration error; stopping", i)
                    self._stopping, status = True, EX_CONFIG
                    self._forward(signal.SIGTERM)
                    continue
                if now - started[i] > 60:  # it ran a good while: this is a new incident, not a crash loop
                    delays[i] = RESTART_DELAY_MIN
                log.warning("worker %d (pid %d) exited %s; restarting in %.0fs", i, proc.pid, code, delays[i])
                restart_at[i] = now + delays[i]
                delays[i] = min(delays[i] * 2, RESTART_DELAY_MAX)
            for i, when in list(restart_at.items()):
                if when <= now and not self._stopping:
                    del restart_at[i]
                    self._start(i)
                    started[i] = now
            if self._stopping and all(p.poll() is not None for p in self.procs.values()):
                bad = [p.returncode for p in self.procs.values() if p.returncode not in (0, -signal.SIGTERM)]
                return status or (1 if bad else 0)
            time.sleep(0.05)
