"""The delivery hook that DKIM-signs outgoing mail: wraps a message's body opener so the transport sends our
``DKIM-Signature`` field followed by the stored bytes.

Which mail is signed: only when some ``[[dkim.sign]]`` domain covers the From: domain (equal, or a parent of
it; the longest such domain wins, and every entry for that domain signs, e.g. an RSA and an Ed25519 key), and,
with ``sign_trusted_only`` (the default), only mail from authenticated users, trusted networks or mailhop
itself (``client_ip == ""``: bounces and notices). Signing anything that arrived from outside would make us a
signing oracle for forged mail.

Untrusted input: the stored message's header section (the From: field; see ``signing.dkim`` for the rest). A
message with several From: fields, or addresses in several domains, is not signed: verifiers and DMARC would
disagree about whose mail it is.

The signature is computed once per message per delivery attempt and shared by every destination of the
attempt (the engine delivers a message's recipient groups concurrently; they must send the same bytes), and
the work runs in worker threads, at most ``max_concurrent`` messages at a time.
"""

from __future__ import annotations

import asyncio
import email.utils
import io
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, BinaryIO

from ..address import AddressError, canonical_domain
from ..config.checks import DkimConfig
from ..delivery.transport import BodyOpener
from ..queue.model import QueuedMessage
from .dkim import CHUNK, DkimSigner, HeaderField, MessageReader, Unsignable

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

__all__ = ["OutboundSigner", "SigningFailed", "from_domain"]

log = logging.getLogger("mailhop.signing")

_CacheKey = tuple[str, tuple[int, ...]]


class SigningFailed(OSError):
    """The signature could not be made (e.g. the body could not be read). An OSError because the transport's
    contract for a body opener that cannot deliver its bytes is OSError: it defers with 451 4.3.0 and the queue
    retries, rather than sending the message unsigned."""


def from_domain(fields: Sequence[HeaderField]) -> str | None:
    """The canonical domain of the single From: field's addresses; None when there is no From:, more than one,
    no parseable address, or addresses in different domains."""
    froms = [f for f in fields if f.key == b"from"]
    if len(froms) != 1:
        return None
    text = froms[0].value.replace(b"\r\n", b"").decode("utf-8", "replace")
    domains: set[str] = set()
    for _, addr in email.utils.getaddresses([text]):
        local, at, domain = addr.rpartition("@")
        if not at or not local or not domain:
            continue
        try:
            domains.add(canonical_domain(domain))
        except AddressError:
            return None
    return domains.pop() if len(domains) == 1 else None


class _Prefixed(io.RawIOBase):
    """Reads ``prefix`` and then ``inner`` to its end; closing closes ``inner``."""

    def __init__(self, prefix: bytes, inner: BinaryIO) -> None:
        super().__init__()
        self._prefix = memoryview(prefix)
        self._inner = inner

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer, /) -> int:
        view = memoryview(buffer).cast("B")
        if self._prefix:
            n = min(len(view), len(self._prefix))
            view[:n] = self._prefix[:n]
            self._prefix = self._prefix[n:]
            return n
        data = self._inner.read(len(view))
        view[: len(data)] = data
        return len(data)

    def close(self) -> None:
        try:
            self._inner.close()
        finally:
            super().close()


class OutboundSigner:
    """Built from ``[dkim]`` (loads every key now: ValueError naming a bad key file) and the trusted-network
    test of the relay policy (client address -> bool). With no ``[[dkim.sign]]`` it signs nothing."""

    def __init__(
        self,
        config: DkimConfig,
        is_trusted: Callable[[str], bool],
        *,
        clock: Callable[[], float] = time.time,
        max_concurrent: int = 2,
        cache_size: int = 256,
    ) -> None:
        self.config = config
        self._is_trusted = is_trusted
        self.signers = [DkimSigner(entry, clock=clock) for entry in config.sign]
        self._slots = asyncio.Semaphore(max_concurrent)
        self._cache: OrderedDict[_CacheKey, asyncio.Task[bytes | None]] = OrderedDict()
        self._cache_size = cache_size
        self.signed = 0  # counters for tests and metrics: openers handed out with a signature, signatures made
        self.computed = 0

    def should_sign(self, message: QueuedMessage) -> bool:
        """Whether ``message``'s origin allows signing it (the From: domain is decided later, from the body)."""
        if not self.signers:
            return False
        if not self.config.sign_trusted_only or message.authenticated or message.client_ip == "":
            return True
        try:
            return self._is_trusted(message.client_ip)
        except ValueError:
            return False  # an unparseable address is nobody we trust

    def signers_for(self, domain: str) -> list[DkimSigner]:
        """The signers of the longest configured domain equal to ``domain`` or a parent of it."""
        best = [s for s in self.signers if domain == s.domain or domain.endswith("." + s.domain)]
        if not best:
            return []
        longest = max(len(s.domain) for s in best)
        return [s for s in best if len(s.domain) == longest]

    async def open_signed(self, message: QueuedMessage, open_body: BodyOpener) -> BodyOpener:
        """A body opener whose bytes are our DKIM-Signature field(s) and then the stored body, when the message
        is to be signed; otherwise ``open_body`` itself. Never raises for a bad message: when signing fails the
        returned opener raises SigningFailed (an OSError), which the transport turns into a deferral."""
        if not self.should_sign(message):
            return open_body
        # Attempt counts change when an attempt is recorded, so a later attempt signs afresh (new t=), while the
        # concurrent destination groups of one attempt share one computation.
        key: _CacheKey = (message.id, tuple(r.attempts for r in message.recipients))
        task = self._cache.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._compute(message.id, open_body))
            # Every waiter may be gone (cancelled at shutdown) when it fails: retrieve the exception regardless,
            # so asyncio does not report it as never retrieved (the waiters log it).
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
            self._cache[key] = task
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        try:
            # shield: one waiter being cancelled (engine shutdown) must not cancel the others' computation.
            header = await asyncio.shield(task)
        except Exception as exc:
            log.warning("DKIM: cannot sign %s: %s", message.id, exc)
            self._cache.pop(key, None)
            reason = f"cannot DKIM-sign message {message.id}: {exc}"

            async def failing() -> BinaryIO:
                raise SigningFailed(reason)

            return failing
        if header is None:
            return open_body
        self.signed += 1

        async def opener() -> BinaryIO:
            return io.BufferedReader(_Prefixed(header, await open_body()), buffer_size=CHUNK)

        return opener

    async def _compute(self, queue_id: str, open_body: Callable[[], Awaitable[BinaryIO]]) -> bytes | None:
        async with self._slots:
            fp = await open_body()
            self.computed += 1
            # Submitted at once: the worker owns (and closes) fp from here on, even if we are cancelled.
            return await asyncio.to_thread(self._sign_file, queue_id, fp)

    def _sign_file(self, queue_id: str, fp: BinaryIO) -> bytes | None:
        """Blocking: head, From: domain, body hash (only if some signer applies), signatures. Closes ``fp``."""
        try:
            reader = MessageReader(fp)
            try:
                fields = reader.header_fields()
            except Unsignable as exc:
                log.warning("DKIM: not signing %s: %s", queue_id, exc)
                return None
            domain = from_domain(fields)
            if domain is None:
                log.info("DKIM: not signing %s: no single From: domain", queue_id)
                return None
            signers = self.signers_for(domain)
            if not signers:
                return None
            body_hash = reader.body_hash()
        finally:
            fp.close()
        out = b"".join(sig for s in signers if (sig := s.signature(fields, body_hash)) is not None)
        if out:
            log.debug("DKIM: signed %s for %s (%s)", queue_id, domain,
                      ", ".join(f"d={s.domain} s={s.selector}" for s in signers))
        return out or None
