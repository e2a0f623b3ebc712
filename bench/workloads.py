"""The benchmark's workloads by name (``python -m bench.run --workloads NAME,...``), and what every workload
module shares: the run options and the report a non-throughput workload hands back.

Throughput workloads are smtp-source shapes (size, sessions, recipients per message, one connection per
message or ``-d``), each measured accept-only or end to end at a sink (``bench/accept.py``,
``bench/relay.py``). The others measure something else and print their own table: one 50 MB message
(``bench/bigmsg.py``), 10,000 idle connections (``bench/idle.py``), a queue of a million deferred messages
(``bench/queuescale.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "DEFAULT_WORKLOADS",
    "OPT_IN",
    "SMOKE_MESSAGES",
    "SPECIAL",
    "THROUGHPUT",
    "WORKLOADS",
    "Options",
    "Report",
    "Shape",
]

SMOKE_MESSAGES = 200


@dataclass(frozen=True)
class Shape:
    """One throughput workload: smtp-source's -l, -s, -m (default and under --smoke), -r and -d."""

    kind: str  # "accept" (smtp-source's wall time) or "relay" (until the sink has every message)
    size: int
    sessions: int
    messages: int
    recipients: int = 1
    same_connection: bool = False
    smoke_messages: int = SMOKE_MESSAGES


# Message counts are chosen so that each run lasts long enough to swamp start-up noise (5-30 s per target
# on the 2-core VM) without making the full run take hours; --messages overrides them all.
THROUGHPUT: dict[str, Shape] = {
    "accept": Shape("accept", 5120, 20, 20000),
    "accept-1k": Shape("accept", 1024, 1, 5000),
    "accept-100k": Shape("accept", 102400, 20, 5000, smoke_messages=100),
    "accept-r10": Shape("accept", 5120, 20, 10000, recipients=10),
    "accept-r100": Shape("accept", 5120, 20, 2000, recipients=100, smoke_messages=40),
    "accept-d": Shape("accept", 5120, 20, 20000, same_connection=True),
    "relay": Shape("relay", 5120, 20, 20000),
    "relay-1k": Shape("relay", 1024, 1, 5000),
    "relay-100k": Shape("relay", 102400, 20, 5000, smoke_messages=100),
    "relay-r10": Shape("relay", 5120, 20, 10000, recipients=10),
    "relay-r100": Shape("relay", 5120, 20, 2000, recipients=100, smoke_messages=40),
    "relay-d": Shape("relay", 5120, 20, 20000, same_connection=True),
}
SPECIAL = ("big-50m", "idle-10k", "queue-scale")
WORKLOADS = (*THROUGHPUT, *SPECIAL)
# queue-scale builds a million-message spool first (minutes, ~1 GB of disk), so it runs only when named.
OPT_IN = ("queue-scale",)
DEFAULT_WORKLOADS = tuple(name for name in WORKLOADS if name not in OPT_IN)


@dataclass(frozen=True)
class Options:
    """How to run the targets, shared by every workload."""

    executable: str
    loop: str  # mailhop serve --loop
    per_destination: int
    profile_dir: Path | None
    targets: tuple[str, ...] = ("mailhop", "postfix")
    repeats: int = 3
    smoke: bool = False
    idle_connections: int = 10_000  # idle-10k: connections to hold (--idle-connections)
    queued: int = 1_000_000  # queue-scale: deferred messages in the full queue (--queued)
    postfix_accept: str = "hold"  # accept workloads: Postfix holds what it accepts ("hold") or relays it ("relay")


@dataclass
class Report:
    """What a non-throughput workload prints after the throughput table: a title, Markdown lines (a table
    and notes) and how many of its runs failed their checks."""

    title: str
    lines: list[str] = field(default_factory=list)
    failures: int = 0

    def render(self) -> str:
        """The title, a blank line and the lines."""
        return "\n".join([f"{self.title}:", "", *self.lines])
