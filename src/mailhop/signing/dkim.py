"""Our DKIM signer (RFC 6376, relaxed/relaxed; RSA-SHA256 and Ed25519-SHA256 per RFC 8463) on ``cryptography``.

Why not dkimpy: its pure-Python RSA costs milliseconds per message on the event loop, and it wants the whole
message in memory. Here the stored message is read once, in bounded chunks, in a worker thread: the header
section (capped at MAX_HEAD) is parsed, the body is canonicalized and hashed as it streams (memory stays at a
few chunks whatever the size), and the signature is made there too (OpenSSL releases the GIL).

Untrusted input: the stored message, exactly as some client sent it. It may have bare CR or LF, header lines
without a colon, huge headers, lines of any length, 8-bit bytes. What we sign is what the receiver will see:
the delivery encoder turns every CR, LF and CRLF into CRLF and ends the content with CRLF
(``mailhop.smtp.encode``), so the same line-end rule is applied here before canonicalization. A message whose
header section we cannot parse the way verifiers do (a line without a colon, no From:, a header section over
MAX_HEAD) is not signed: ``sign`` returns None and the reason is logged.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import BinaryIO

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from ..config.checks import DkimSignConfig
from ..smtp.encode import canonicalize
from .keys import SigningKey, key_algorithm, load_private_key

__all__ = [
    "CHUNK",
    "MAX_HEAD",
    "DkimSigner",
    "HeaderField",
    "MessageReader",
    "RelaxedBodyHasher",
    "Unsignable",
    "parse_header_section",
    "relaxed_body",
    "relaxed_header",
]

log = logging.getLogger("mailhop.signing")

CHUNK = 64 * 1024  # one read: big enough that per-chunk Python overhead vanishes, small enough to stay in cache
MAX_HEAD = 1024 * 1024  # header section bytes we parse; more is an abuse, and such a message goes unsigned
_LINE_FLUSH = 64 * 1024  # an unterminated line longer than this is hashed in pieces (memory stays bounded)
_WIDTH = 76  # folded DKIM-Signature lines stay under RFC 5322's 78 characters
# RFC 5322 field name (printable ASCII but ":"), optionally followed by obsolete WSP before the colon.
_FIELD = re.compile(rb"([\x21-\x39\x3b-\x7e]+)[ \t]*:")


class Unsignable(Exception):
    """The message cannot be signed as verifiers would see it; the text says why (for the log)."""


@dataclass(frozen=True, slots=True)
class HeaderField:
    name: bytes  # as written, without WSP before the colon
    value: bytes  # everything after the colon, folding CRLFs included, without the final CRLF

    @property
    def key(self) -> bytes:
        """The lowercase name that h= entries are matched against."""
        return self.name.lower()


def _collapse(data: bytes) -> bytes:
    """Every run of SP/HTAB becomes one SP. Whole-buffer replaces run in C: each pass halves every run, so a run
    of n costs log2(n) passes, and text without tabs or double spaces costs two searches. (A regex substitution
    is several times slower on whitespace-rich text and holds the GIL throughout.)"""
    if b"\t" in data:
        data = data.replace(b"\t", b" ")
    while b"  " in data:
        data = data.replace(b"  ", b" ")
    return data


def relaxed_header(name: bytes, value: bytes) -> bytes:
    """RFC 6376 3.4.2: lowercase name, unfolded value with WSP runs as one SP and no WSP at either end; CRLF."""
    return name.lower() + b":" + _collapse(value.replace(b"\r\n", b"")).strip(b" ") + b"\r\n"


class RelaxedBodyHasher:
    """RFC 6376 3.4.4 relaxed body canonicalization fed in chunks of CRLF-canonical content, hashed on the fly.

    Empty lines are held back as a count until a non-empty line follows (trailing ones are dropped); an
    unterminated line waits for its end, except that past _LINE_FLUSH its content up to the last non-WSP octet
    is hashed early (its final WSP might still be trailing).
    """

    __slots__ = ("_empty", "_hash", "_partial", "_started")

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self._empty = 0  # empty lines seen since the last non-empty one
        self._partial = b""  # the current line so far (no line end yet)
        self._started = False  # part of the current line is already hashed: its CRLF is not an empty line

    def feed(self, chunk: bytes) -> None:
        """Add content whose line ends are all CRLF (a CR at the very end of ``chunk`` is not allowed)."""
        data = self._partial + chunk if self._partial else chunk
        cut = data.rfind(b"\n") + 1
        if cut == 0:
            self._partial = data
            if len(data) > _LINE_FLUSH:
                self._flush_partial()
            return
        self._partial = data[cut:]
        lines = _collapse(data[:cut])
        if b" \r\n" in lines:
            lines = lines.replace(b" \r\n", b"\r\n")
        if self._started:
            # The first CRLF ends a line whose content was hashed early: it is that line's end, not empty.
            self._started = False
            if lines.startswith(b"\r\n"):
                self._hash.update(b"\r\n")
                lines = lines[2:]
        text = lines.rstrip(b"\r\n")
        if text:
            self._hash.update(b"\r\n" * self._empty + text + b"\r\n")
            self._empty = (len(lines) - len(text)) // 2 - 1
        else:
            self._empty += len(lines) // 2
        if len(self._partial) > _LINE_FLUSH:
            self._flush_partial()

    def _flush_partial(self) -> None:
        line = _collapse(self._partial)
        keep = len(line.rstrip(b" "))
        if keep:
            self._hash.update(b"\r\n" * self._empty + line[:keep])
            self._empty = 0
            self._started = True
        self._partial = line[keep:]

    def digest(self) -> bytes:
        """The SHA-256 of the canonical body; call once, after the last ``feed``."""
        line = _collapse(self._partial).rstrip(b" ")
        if line or self._started:
            # A last line without CRLF gets one (the delivery encoder adds it on the wire too).
            self._hash.update(b"\r\n" * self._empty + line + b"\r\n")
        self._partial = b""
        return self._hash.digest()


def relaxed_body(body: bytes) -> bytes:
    """The canonical form of a whole (CRLF-canonical) body; a reference for tests, not used when signing."""
    lines = _collapse(body).replace(b" \r\n", b"\r\n")
    if lines.endswith(b" "):
        lines = lines.rstrip(b" ")
    text = lines.rstrip(b"\r\n")
    return text + b"\r\n" if text else b""


def parse_header_section(head: bytes) -> list[HeaderField]:
    """Split a CRLF-canonical header section (without the empty line) into fields; Unsignable when malformed."""
    fields: list[HeaderField] = []
    name = b""
    parts: list[bytes] = []
    lines = head.split(b"\r\n")
    if lines and lines[-1] == b"":
        lines.pop()
    for line in lines:
        if line[:1] in (b" ", b"\t"):
            if not parts:
                raise Unsignable("the header section starts with a continuation line")
            parts.append(line)
            continue
        match = _FIELD.match(line)
        if match is None:
            raise Unsignable("a header line has no field name and colon")
        if parts:
            fields.append(HeaderField(name, b"\r\n".join(parts)))
        name = match.group(1)
        parts = [line[match.end() :]]
    if parts:
        fields.append(HeaderField(name, b"\r\n".join(parts)))
    return fields


class MessageReader:
    """One pass over a stored message: ``header_fields()`` first, then (optionally) ``body_hash()``.

    Blocking (file reads and CPU): call it in a worker thread. The caller owns and closes ``fp``.
    """

    def __init__(self, fp: BinaryIO, *, chunk_size: int = CHUNK, max_head: int = MAX_HEAD) -> None:
        self._fp = fp
        self._chunk_size = chunk_size
        self._max_head = max_head
        self._pending_cr = False
        self._eof = False
        self._rest = b""  # canonical content read past the header section

    def _read(self) -> bytes:
        """The next piece of CRLF-canonical content; b"" at the end."""
        while not self._eof:
            chunk = self._fp.read(self._chunk_size)
            if not chunk:
                self._eof = True
                if self._pending_cr:
                    self._pending_cr = False
                    return b"\r\n"  # a lone CR at the very end is a line end, as on the wire
                return b""
            if self._pending_cr:
                chunk = b"\r" + chunk
                self._pending_cr = False
            if chunk.endswith(b"\r"):
                # It may be the first half of a CRLF split across reads: decide with the next read.
                chunk = chunk[:-1]
                self._pending_cr = True
            if chunk:
                return canonicalize(chunk)
        return b""

    def header_fields(self) -> list[HeaderField]:
        """The parsed header section; Unsignable when it is malformed or over ``max_head``."""
        buf = b""
        start = 0
        while True:
            if buf.startswith(b"\r\n"):
                self._rest = buf[2:]
                return []
            end = buf.find(b"\r\n\r\n", start)
            if end >= 0:
                self._rest = buf[end + 4 :]
                return parse_header_section(buf[: end + 2])
            if len(buf) > self._max_head:
                raise Unsignable(f"the header section is over {self._max_head} bytes")
            piece = self._read()
            if not piece:
                return parse_header_section(buf)  # no body at all: everything is header
            start = max(0, len(buf) - 3)
            buf += piece

    def body_hash(self) -> bytes:
        """SHA-256 of the relaxed-canonical body (everything after the header section's empty line)."""
        hasher = RelaxedBodyHasher()
        if self._rest:
            hasher.feed(self._rest)
            self._rest = b""
        while piece := self._read():
            hasher.feed(piece)
        return hasher.digest()


class _Folder:
    """Builds a folded header: words separated by SP or a fold, base64 broken anywhere."""

    def __init__(self, start: str) -> None:
        self.lines = [start]

    def word(self, token: str, *, space: bool = True) -> None:
        sep = " " if space else ""
        if len(self.lines[-1]) + len(sep) + len(token) <= _WIDTH:
            self.lines[-1] += sep + token
        else:
            self.lines.append("\t" + token)

    def breakable(self, text: str) -> None:
        while text:
            room = _WIDTH - len(self.lines[-1])
            if room <= 0:
                self.lines.append("\t")
                room = _WIDTH - 1
            self.lines[-1] += text[:room]
            text = text[room:]

    def text(self) -> str:
        return "\r\n".join(self.lines)


def _dedupe_names(names: Sequence[str]) -> list[str]:
    seen: set[str] = set()
    out: list[str] = []
    for name in ["From", *names]:
        if not re.fullmatch(r"[\x21-\x39\x3b-\x7e]+", name):
            raise ValueError(f"dkim.sign headers: {name!r} is not a header field name (e.g. \"Subject\")")
        if name.lower() not in seen:
            seen.add(name.lower())
            out.append(name)
    return out


class DkimSigner:
    """Signs messages for one ``[[dkim.sign]]`` entry (d=, s=, key). The key is loaded at construction:
    ValueError naming the file when it is unusable."""

    def __init__(self, config: DkimSignConfig, *, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.domain = config.domain
        self.selector = config.selector
        self.key: SigningKey = load_private_key(config.key_file)
        self.algorithm = f"{key_algorithm(self.key)}-sha256"
        self._names = _dedupe_names(config.headers)
        self._clock = clock

    async def sign(self, open_body: Callable[[], Awaitable[BinaryIO]]) -> bytes | None:
        """The ``DKIM-Signature: ...\\r\\n`` field to put in front of the stored message, or None when the message
        cannot be signed (logged). Reading, hashing and signing run in a worker thread."""
        fp = await open_body()
        # Submitted at once, so the thread owns fp from here on, even if this coroutine is cancelled.
        return await asyncio.to_thread(self.sign_file, fp)

    def sign_file(self, fp: BinaryIO) -> bytes | None:
        """Blocking form of ``sign`` over an open message; closes ``fp``."""
        try:
            reader = MessageReader(fp)
            fields = reader.header_fields()
            if not any(f.key == b"from" for f in fields):
                raise Unsignable("no From: header")
            body_hash = reader.body_hash()
        except Unsignable as exc:
            log.warning("DKIM: not signing for %s: %s", self.domain, exc)
            return None
        finally:
            fp.close()
        return self.signature(fields, body_hash)

    def signed_names(self, fields: Sequence[HeaderField]) -> list[str]:
        """The h= list for a message with ``fields``: each configured name present, as many times as present
        (plus one when oversigning)."""
        counts: dict[bytes, int] = {}
        for f in fields:
            counts[f.key] = counts.get(f.key, 0) + 1
        out: list[str] = []
        for name in self._names:
            n = counts.get(name.lower().encode("ascii"), 0)
            if n:
                out += [name] * (n + (1 if self.config.oversign else 0))
        return out

    def signature(self, fields: Sequence[HeaderField], body_hash: bytes) -> bytes | None:
        """The signature field for a message with header ``fields`` and relaxed body hash ``body_hash``; None
        without a From: field. CPU work: call it in a worker thread."""
        names = self.signed_names(fields)
        if not names:
            return None  # no From: (it is always in the configured list)
        folder = _Folder("DKIM-Signature:")
        for tag in ("v=1", f"a={self.algorithm}", "c=relaxed/relaxed", f"d={self.domain}", f"s={self.selector}",
                    f"t={int(self._clock())}"):
            folder.word(tag + ";")
        folder.word(f"h={names[0]}" + (":" if len(names) > 1 else ";"))
        for i, name in enumerate(names[1:], 2):
            folder.word(name + (":" if i < len(names) else ";"), space=False)
        folder.word(f"bh={base64.b64encode(body_hash).decode('ascii')};")
        folder.word("b=")
        prefix = folder.text()
        data = b"".join(relaxed_header(f.name, f.value) for f in _select(fields, names))
        # The signature field itself is hashed relaxed, with b= empty and without its CRLF (RFC 6376 3.7).
        data += relaxed_header(b"DKIM-Signature", prefix.encode("ascii")[len(b"DKIM-Signature:") :])[:-2]
        folder.breakable(base64.b64encode(self._sign(data)).decode("ascii"))
        return folder.text().encode("ascii") + b"\r\n"

    def _sign(self, data: bytes) -> bytes:
        if isinstance(self.key, rsa.RSAPrivateKey):
            return self.key.sign(data, padding.PKCS1v15(), hashes.SHA256())
        # RFC 8463 3: Ed25519 (pure) over the SHA-256 of the canonical data.
        return self.key.sign(hashlib.sha256(data).digest())


def _select(fields: Sequence[HeaderField], names: Sequence[str]) -> Iterator[HeaderField]:
    """RFC 6376 5.4.2: each h= name takes the last not yet used instance, from the bottom up; names with no
    instance left (oversigning) contribute nothing."""
    instances: dict[bytes, list[HeaderField]] = {}
    for f in fields:
        instances.setdefault(f.key, []).append(f)
    for name in names:
        stack = instances.get(name.lower().encode("ascii"))
        if stack:
            yield stack.pop()
