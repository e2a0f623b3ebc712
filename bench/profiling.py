"""py-spy sampling of a running mailhop during a timed run (``--profile DIR``), and the summary that ranks the
event loop thread's functions; see bench/README.md, "Profiling mailhop".
"""

from __future__ import annotations

import collections
import re
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .accept import RunResult
from .mailhop import MailhopRelay
from .procs import BenchError, find_program, stop_process

__all__ = ["Profile", "ProfileEntry", "finish_profiler", "start_profiler", "summarize_profile"]

PROFILE_RATE = 100  # py-spy samples per second
PROFILE_TOP = 10
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")



class _Profiler:
    """A running py-spy and the file it writes."""

    def __init__(self, proc: subprocess.Popen[bytes], output: Path, log: Path) -> None:
        self.proc = proc
        self.output = output
        self.log = log


def py_spy() -> str:
    """The py-spy beside the interpreter (``.venv/bin/pip install py-spy``), or on PATH."""
    beside = Path(sys.executable).with_name("py-spy")
    found = str(beside) if beside.exists() else find_program("py-spy")
    if found is None:
        raise BenchError("py-spy not found: .venv/bin/pip install py-spy")
    return found


def start_profiler(relay: MailhopRelay, profile_dir: Path, label: str) -> _Profiler:
    """py-spy record on mailhop, aggregated by function, in py-spy's raw (collapsed stacks) format, into
    ``profile_dir/mailhop-<label>.txt``."""
    if relay.pid is None:
        raise BenchError("mailhop is not running: nothing to profile")
    profile_dir.mkdir(parents=True, exist_ok=True)
    output = profile_dir / f"mailhop-{label}.txt"
    log = profile_dir / f"mailhop-{label}.py-spy.log"
    argv = [
        py_spy(), "record", "--pid", str(relay.pid), "--rate", str(PROFILE_RATE),
        "--function", "--format", "raw", "--output", str(output),
    ]  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    return _Profiler(proc, output, log)


def finish_profiler(profiler: _Profiler, result: RunResult) -> None:
    """Stop py-spy (SIGINT makes it write its file) and put the top functions in the run's notes."""
    if profiler.proc.poll() is None:
        profiler.proc.send_signal(signal.SIGINT)
    try:
        profiler.proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        stop_process(profiler.proc)
    if not profiler.output.exists():
        result.notes.append(f"py-spy wrote no profile: {profiler.log.read_text(errors='replace').strip()}")
        return
    profile = summarize_profile(profiler.output)
    result.notes.append(f"PROFILED (figure not comparable), raw stacks: {profiler.output}")
    result.notes.extend(profile.lines())


@dataclass(frozen=True)
class ProfileEntry:
    """One function's share of the event loop thread's samples: own (innermost Python frame) and total."""

    name: str
    own_pct: float
    total_pct: float


@dataclass
class Profile:
    """py-spy's samples of mailhop, summarised.

    The event loop (main) thread is what limits a single-process asyncio relay, so its samples are ranked by
    function. The other threads are only counted: py-spy reports a thread blocked on a lock or in fsync as
    busy, so their counts are an upper bound on CPU, not a measure of it.
    """

    main_samples: int = 0
    entries: list[ProfileEntry] = field(default_factory=list)
    threads: collections.Counter[str] = field(default_factory=collections.Counter)

    def lines(self, top: int = PROFILE_TOP) -> list[str]:
        others = ", ".join(f"{name} {count}" for name, count in self.threads.most_common())
        lines = [f"event loop thread: {self.main_samples} samples (other threads: {others or 'none'})"]
        lines += [f"  {e.own_pct:5.1f}% own {e.total_pct:5.1f}% total  {e.name}" for e in self.entries[:top]]
        return lines


def summarize_profile(path: Path) -> Profile:
    """Rank the event loop thread's functions by own samples, from py-spy's raw (collapsed stacks) output."""
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    profile = Profile()
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [short_frame(frame) for frame in stack.split(";")]
        if not frames[0].startswith("<module>"):  # a thread: Thread._bootstrap;...;Thread.run;<its target>
            target = next((f for f in frames if not f.startswith("Thread.")), frames[-1])
            profile.threads[target.split(" ", 1)[0]] += count
            continue
        profile.main_samples += count
        own[frames[-1]] += count
        for frame in set(frames):
            total[frame] += count
    n = profile.main_samples or 1
    profile.entries = [
        ProfileEntry(name, 100 * c / n, 100 * total[name] / n) for name, c in own.most_common()
    ]
    return profile


def short_frame(frame: str) -> str:
    """``func (/long/path/site-packages/pkg/mod.py:12)`` -> ``func (pkg/mod.py:12)``."""
    match = _FRAME.match(frame.strip())
    if match is None:
        return frame.strip()
    file = match["file"]
    for marker in ("/site-packages/", "/src/", "/lib/python3."):
        if marker in file:
            file = file.split(marker, 1)[1]
            if marker == "/lib/python3.":
                file = "stdlib/" + file.split("/", 1)[-1]
            break
    line = f":{match['line']}" if match["line"] else ""
    return f"{match['func']} ({file}{line})"
