"""Process and port helpers shared by the benchmark targets.

Everything here is about starting servers on loopback without guessing: readiness is observed (a port that
accepts, a log line), never assumed after a fixed sleep, and every wait has a deadline so a broken server
fails the run instead of hanging it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "BenchError",
    "find_program",
    "free_port",
    "machine_cpu_seconds",
    "pid_alive",
    "port_open",
    "stop_process",
    "thread_cpu_seconds",
    "tree_cpu_seconds",
    "wait_pid_gone",
    "wait_until",
]

POLL_INTERVAL = 0.05
_TICKS = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int, tid: int | None = None) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2 :].split()  # after "pid (comm) ": field 3 (state) is index 0


def thread_cpu_seconds(pid: int) -> dict[str, float]:
    """User + system CPU seconds per thread of ``pid`` and of its child processes (workers), keyed "pid/tid"."""
    children = Path(f"/proc/{pid}/task/{pid}/children")
    try:
        pids = [pid, *(int(p) for p in children.read_text().split())]
    except OSError:
        pids = [pid]
    out: dict[str, float] = {}
    for proc in pids:
        try:
            tids = [int(t) for t in os.listdir(f"/proc/{proc}/task")]
        except OSError:
            continue
        for tid in tids:
            fields = _stat_fields(proc, tid)
            if fields is not None:
                out[f"{proc}/{tid}"] = (int(fields[11]) + int(fields[12])) / _TICKS  # fields 14, 15: utime, stime
    return out


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by ``pid``, all its threads and its live descendants.

    A steadier measure than throughput on a shared VM: the work per message, whoever else runs."""
    children: dict[int, list[int]] = {}
    own: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields is None:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))  # field 4: ppid
        own[int(entry)] = (int(fields[11]) + int(fields[12])) / _TICKS  # fields 14, 15: utime, stime
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        total += own.get(p, 0.0)
        todo.extend(children.get(p, ()))
    return total


def machine_cpu_seconds() -> float:
    """CPU seconds all cores of the machine have been busy since boot (user, nice, system, irq, softirq in
    ``/proc/stat``; not idle, I/O wait or time stolen by the hypervisor).

    Over a run this counts every process, the kernel's loopback TCP work included, so it compares targets whose
    processes come and go (Postfix's) with ones that stay (mailhop's), on a machine doing nothing else."""
    with open("/proc/stat") as stat:
        fields = stat.readline().split()
    if fields[0] != "cpu":
        raise BenchError(f"/proc/stat does not start with the cpu line: {fields[:1]}")
    user, nice, system, _idle, _iowait, irq, softirq = (int(value) for value in fields[1:8])
    return (user + nice + system + irq + softirq) / _TICKS


class BenchError(RuntimeError):
    """A target could not be started, stopped or verified: the run's figures cannot be trusted."""


def find_program(name: str) -> str | None:
    """Path of a program on PATH or in /usr/sbin (where Debian puts Postfix's tools, often off a user's PATH)."""
    found = shutil.which(name)
    if found:
        return found
    candidate = Path("/usr/sbin") / name
    return str(candidate) if os.access(candidate, os.X_OK) else None


def free_port(host: str = "127.0.0.1") -> int:
    """A port the kernel just considered free on host; each target gets its own so runs never collide."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def port_open(host: str, port: int) -> bool:
    """Whether something accepts TCP connections on host:port right now."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_until(
    condition: Callable[[], bool], timeout: float, what: str, interval: float = POLL_INTERVAL
) -> None:
    """Poll condition every interval seconds until true; BenchError naming what was awaited after timeout."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def pid_alive(pid: int) -> bool:
    """Whether pid is a live process; a zombie left to an absent reaper counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # Field 3, after the parenthesised command name, is the state; Z is a zombie, X is dead.
    state = stat.rsplit(")", 1)[1].split()[0]
    return state not in ("Z", "X")


def wait_pid_gone(pid: int, timeout: float) -> bool:
    """Wait for pid to exit; True when it did within timeout."""
    try:
        wait_until(lambda: not pid_alive(pid), timeout, f"pid {pid} to exit")
    except BenchError:
        return False
    return True


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> int:
    """SIGTERM one child we started, SIGKILL it if it ignores that, and reap it; returns its exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()
