"""Memory of a target, read from /proc: one process (mailhop) or a process tree (Postfix's master and every
process it started).

RSS counts pages shared between processes once per process, so summed over a thousand Postfix smtpd
processes it overstates what they use together; PSS (proportional set size, from ``smaps_rollup``) divides
each shared page among its sharers and sums to what the tree really holds. VmHWM is a process's peak RSS;
writing 5 to ``/proc/PID/clear_refs`` (root, Linux >= 4.0) resets it to the current RSS, so a workload can
measure the peak of its own window.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "PeakSampler",
    "TreeMemory",
    "mem_available_kb",
    "process_tree",
    "reset_peak",
    "status_kb",
    "tree_memory",
]

SAMPLE_INTERVAL = 0.02  # seconds between samples of a process tree's RSS


def status_kb(pid: int, key: str) -> int | None:
    """A ``kB`` field of /proc/PID/status (VmRSS, VmHWM), or None when the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def pss_kb(pid: int) -> int | None:
    """Proportional set size of a process in kB, or None when it is gone or unreadable."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def reset_peak(pid: int) -> bool:
    """Reset the process's VmHWM to its current RSS; False when the kernel or our rights do not allow it."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def mem_available_kb() -> int:
    """MemAvailable from /proc/meminfo: what the machine could still give without swapping."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1])
    raise OSError("no MemAvailable in /proc/meminfo")


def process_tree(root: int) -> list[int]:
    """root and every live descendant of it, from one scan of /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_text()
        except OSError:
            continue
        # Field 4, after the parenthesised command name (which may hold spaces), is the parent pid.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


@dataclass(frozen=True)
class TreeMemory:
    """Memory of a set of processes at one moment, in kB; pss is None unless asked for (it is slow)."""

    processes: int
    rss: int
    hwm: int
    pss: int | None = None


def tree_memory(root: int, with_pss: bool = False) -> TreeMemory:
    """Sum VmRSS, VmHWM (and PSS) over root's process tree; processes that exit meanwhile are skipped."""
    rss = hwm = pss = processes = 0
    for pid in process_tree(root):
        pid_rss = status_kb(pid, "VmRSS")
        if pid_rss is None:
            continue
        processes += 1
        rss += pid_rss
        hwm += status_kb(pid, "VmHWM") or pid_rss
        if with_pss:
            pss += pss_kb(pid) or 0
    return TreeMemory(processes, rss, hwm, pss if with_pss else None)


class PeakSampler:
    """Samples a measurement (kB) every SAMPLE_INTERVAL in a thread and keeps the largest value seen.

    For a process tree, whose members come and go, sampling is the only way to see the peak of the sum; a
    peak shorter than the interval can be missed, so a single process's VmHWM is preferred where it exists.
    """

    def __init__(self, measure: Callable[[], int], interval: float = SAMPLE_INTERVAL) -> None:
        self._measure = measure
        self._interval = interval
        self._stop = threading.Event()
        self.peak = measure()
        self._thread = threading.Thread(target=self._run, name="peak-sampler", daemon=True)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.peak = max(self.peak, self._measure())
