"""Queue ids: 16 characters of Crockford base32, time-sortable, unique across processes, filename-safe.

Layout (80 bits): 45 bits of milliseconds since the Unix epoch (enough until the year 3084), then 35 bits
that are random for the first id of a millisecond and incremented for the next ones in the same process
(so ids from one process are strictly increasing, as in ULID). Two processes collide only if they draw the
same 35 random bits in the same millisecond. The alphabet has no I, L, O, U and is upper case only, so ids
are safe as file names on case-insensitive file systems and in SMTP replies and Received headers.
"""

from __future__ import annotations

import os
import re
import threading
import time

__all__ = ["ID_LENGTH", "id_timestamp", "is_queue_id", "new_queue_id"]

ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
ID_LENGTH = 16
_RAND_BITS = 35
_RAND_MASK = (1 << _RAND_BITS) - 1
_ID_RE = re.compile(f"[{ALPHABET}]{{{ID_LENGTH}}}")
_DECODE = {c: i for i, c in enumerate(ALPHABET)}

# Two characters per table entry: 10 bits per lookup, 8 lookups per id.
_PAIRS = [a + b for a in ALPHABET for b in ALPHABET]
_SHIFTS = tuple(range((ID_LENGTH - 2) * 5, -1, -10))
_POOL_SIZE = 4096  # octets of randomness drawn at once: one getrandom() per ~800 ids instead of one per id

_lock = threading.Lock()
_last_ms = 0
_last_rand = 0
_pool = b""
_pool_at = 0


def _fresh_random() -> int:
    # Called with _lock held.
    global _pool, _pool_at
    if _pool_at + 5 > len(_pool):
        _pool, _pool_at = os.urandom(_POOL_SIZE), 0
    at = _pool_at
    _pool_at = at + 5
    return int.from_bytes(_pool[at:at + 5], "big") & _RAND_MASK


def _reset_after_fork() -> None:
    # A forked child must not continue the parent's sequence, nor draw from its pool of random octets: both
    # would hand out the same ids.
    global _last_ms, _last_rand, _pool, _pool_at
    _last_ms = 0
    _last_rand = 0
    _pool, _pool_at = b"", 0


os.register_at_fork(after_in_child=_reset_after_fork)


def _encode(n: int) -> str:
    pairs = _PAIRS
    return "".join([pairs[(n >> shift) & 1023] for shift in _SHIFTS])


def new_queue_id(now: float | None = None) -> str:
    """A new id; ``now`` (epoch seconds) defaults to the wall clock."""
    global _last_ms, _last_rand
    ms = int((time.time() if now is None else now) * 1000)
    with _lock:
        if ms > _last_ms:
            rand = _fresh_random()
        else:
            ms = _last_ms
            rand = _last_rand + 1
            if rand > _RAND_MASK:
                ms += 1
                rand = _fresh_random()
        _last_ms, _last_rand = ms, rand
    return _encode((ms << _RAND_BITS) | rand)


def is_queue_id(text: str) -> bool:
    """True if ``text`` has the syntax of a queue id (use before putting untrusted text in a path)."""
    return _ID_RE.fullmatch(text) is not None


def id_timestamp(queue_id: str) -> float:
    """The creation time encoded in an id, in epoch seconds."""
    n = 0
    for c in queue_id:
        n = (n << 5) | _DECODE[c]
    return (n >> _RAND_BITS) / 1000.0
