"""Rewriting a message's header section: the edits policy checks ask for, applied once before queueing.

Untrusted input: the header block (client) and the edit values (checks, milters, rspamd). Values are sanitized so
no edit can inject a header field or end the header section: a CR or LF that is not part of a fold becomes a space,
and a name must be a valid field name (RFC 5322 3.6.8).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from ..checks.api import HeaderEdit

__all__ = ["fold", "rewrite_header_block", "split_fields"]

_NAME = re.compile(r"^[!-9;-~]+$")
_FIELD_START = re.compile(rb"\r\n(?=[^ \t])")


def split_fields(block: bytes) -> list[bytes]:
    """The fields of a header block (without the blank line), each with its continuation lines, no final CRLF."""
    if not block:
        return []
    return _FIELD_START.split(block)


def field_name(raw: bytes) -> str:
    return raw.partition(b":")[0].strip().decode("latin-1").lower()


def fold(name: str, value: str) -> bytes:
    """One field, ``Name: value``. A value the caller already folded (a milter's DKIM-Signature, whose signature
    may cover its exact folding) is kept as given; otherwise it is folded at spaces to stay under 78 octets."""
    if not _NAME.match(name):
        raise ValueError(f"invalid header field name {name!r}")
    if re.search(r"\r?\n[ \t]", value):
        kept = re.sub(r"\r?\n(?=[ \t])", "\x00FOLD", value)
        kept = re.sub(r"[\r\n\x00](?!FOLD)", " ", kept).replace("\x00FOLD", "\r\n")
        sep = "" if kept[:1] in (" ", "\t") else " "
        return f"{name}:{sep}{kept}".encode("utf-8", "replace")
    line = f"{name}:"
    lines: list[str] = []
    first = True
    for word in re.sub(r"[\r\n\x00]", " ", value).split(" "):
        if not word:
            continue
        if not first and len(line) + 1 + len(word) > 76:
            lines.append(line)
            line = "\t" + word
        else:
            line += " " + word
        first = False
    lines.append(line)
    return "\r\n".join(lines).encode("utf-8", "replace")


def rewrite_header_block(block: bytes, edits: Sequence[HeaderEdit], *, top: Sequence[bytes] = (),
                         drop: Callable[[str, bytes], bool] | None = None) -> bytes:
    """Apply ``edits`` to a header block; put the ``top`` fields (already formatted) first. ``drop(name, raw)``
    removes matching fields (forged Authentication-Results). Returns the new block, no final CRLF."""
    fields = split_fields(block)
    if drop is not None:
        fields = [f for f in fields if not drop(field_name(f), f)]
    for edit in edits:
        raw = fold(edit.name, edit.value)
        if edit.kind == "add":
            fields.append(raw)
        elif edit.kind == "insert":
            fields.insert(max(0, min(edit.index, len(fields))), raw)
        else:
            positions = [i for i, f in enumerate(fields) if field_name(f) == edit.name.lower()]
            nth = edit.index if edit.index >= 1 else 1
            if nth <= len(positions):
                if edit.value:
                    fields[positions[nth - 1]] = raw
                else:
                    del fields[positions[nth - 1]]
            elif edit.value:  # milter CHGHEADER semantics: changing a field that is not there adds it
                fields.append(raw)
    return b"\r\n".join([*top, *fields])
