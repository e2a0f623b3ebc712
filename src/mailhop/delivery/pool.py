"""Outbound SMTP connections on asyncio, and the pool that keeps idle ones for reuse.

Untrusted input: every byte the remote server sends. It goes straight into the sans-IO ``ReplyParser``
(bounded in line length and lines per reply); a malformed reply, a close or a timeout turns the connection
into a ``ConnectionLost`` for whoever waits on it, and the connection is never used again. Between the 220
to STARTTLS and the TLS handshake, received plaintext is discarded, never parsed (RFC 3207 5, CVE-2011-0411
style response injection).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections import deque
from dataclasses import dataclass
from typing import cast

from ..reply import Reply
from ..smtp.client import NO_CAPABILITIES, Capabilities, ReplyError, ReplyParser
from ..smtp.client import quit as quit_command

__all__ = ["ConnectionLost", "ConnectionPool", "PoolKey", "SmtpConnection"]

log = logging.getLogger("mailhop.delivery")


class ConnectionLost(Exception):
    """The connection is unusable: closed by the peer, timed out, or sent a malformed reply."""

    def __init__(self, text: str, *, timeout: bool = False) -> None:
        super().__init__(text)
        self.timeout = timeout


@dataclass(frozen=True, slots=True)
class PoolKey:
    """What makes two connections interchangeable: the endpoint and everything negotiated on it."""

    host: str  # the name TLS verified and Remote-MTA reports
    address: str
    port: int
    tls: str
    implicit_tls: bool = False
    lmtp: bool = False
    username: str | None = None


class _Protocol(asyncio.Protocol):
    """Feeds received bytes to a ReplyParser and hands complete replies to one waiting reader."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.parser = ReplyParser()
        self.replies: deque[Reply] = deque()
        self.transport: asyncio.Transport | None = None
        self.error: ConnectionLost | None = None
        self.closed = loop.create_future()  # resolved by connection_lost
        self.discarding = False
        self.discarded = 0
        self._waiter: asyncio.Future[None] | None = None
        self._writable: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing asyncio.Transport.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.discarding:
            self.discarded += len(data)
            return
        if self.error is not None:
            return
        try:
            replies = self.parser.feed(data)
        except ReplyError as exc:
            self.fail(ConnectionLost(f"malformed reply: {exc}"))
            return
        if replies:
            self.replies.extend(replies)
            self._wake()

    def eof_received(self) -> bool | None:
        if self.error is None:
            self.error = ConnectionLost("connection closed by the server")
        self._wake()
        return None  # let the transport close

    def connection_lost(self, exc: Exception | None) -> None:
        if self.error is None:
            self.error = ConnectionLost(f"connection lost: {exc}" if exc else "connection closed by the server")
        if not self.closed.done():
            self.closed.set_result(None)
        self._wake()

    def pause_writing(self) -> None:
        if self._writable is None or self._writable.done():
            self._writable = self._loop.create_future()

    def resume_writing(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    def fail(self, error: ConnectionLost) -> None:
        """Record why the connection is unusable and drop it."""
        if self.error is None:
            self.error = error
        if self.transport is not None:
            self.transport.abort()
        self._wake()

    def _wake(self) -> None:
        for fut in (self._waiter, self._writable):
            if fut is not None and not fut.done():
                fut.set_result(None)

    async def next_reply(self) -> Reply:
        while not self.replies:
            if self.error is not None:
                raise self.error
            self._waiter = self._loop.create_future()
            await self._waiter
        return self.replies.popleft()

    @property
    def write_blocked(self) -> bool:
        """The transport asked us to pause writing and has not resumed."""
        return self._writable is not None and not self._writable.done()

    async def writable(self) -> None:
        while self._writable is not None and not self._writable.done():
            if self.error is not None:
                raise self.error
            await self._writable
        if self.error is not None:
            raise self.error


class SmtpConnection:
    """One client connection: write commands, read replies (each bounded in time), STARTTLS, QUIT."""

    def __init__(self, key: PoolKey, transport: asyncio.Transport, protocol: _Protocol, *, tls: bool) -> None:
        self.key = key
        self._transport = transport
        self._proto = protocol
        self.tls = tls
        self.caps: Capabilities = NO_CAPABILITIES
        self.transactions = 0  # messages completed (final reply received) on this connection
        self.idle_since = time.monotonic()

    @classmethod
    async def open(
        cls,
        key: PoolKey,
        *,
        within: float,
        ssl_context: ssl.SSLContext | None = None,
    ) -> SmtpConnection:
        """Connect (with ``ssl_context``: and handshake, implicit TLS); OSError, ssl.SSLError or TimeoutError."""
        loop = asyncio.get_running_loop()
        protocol = _Protocol(loop)
        async with asyncio.timeout(within):
            if ssl_context is None:
                transport, _ = await loop.create_connection(lambda: protocol, key.address, key.port)
            else:
                transport, _ = await loop.create_connection(
                    lambda: protocol, key.address, key.port, ssl=ssl_context,
                    server_hostname=key.host or key.address, ssl_handshake_timeout=within,
                )
        return cls(key, transport, protocol, tls=ssl_context is not None)

    @property
    def peer(self) -> str:
        return f"{self.key.host}[{self.key.address}]:{self.key.port}"

    @property
    def usable(self) -> bool:
        """Open, in sync (no unread reply or partial input), fit for another command."""
        p = self._proto
        return (p.error is None and not p.replies and not p.parser.buffered
                and not self._transport.is_closing())

    def write(self, data: bytes) -> None:
        if self._proto.error is not None:
            raise self._proto.error
        self._transport.write(data)

    async def drain(self, within: float) -> None:
        """Wait until the transport's buffer is below its high-water mark."""
        p = self._proto
        if p.error is None and not p.write_blocked:
            return  # the common case: no timer to arm and cancel per write
        try:
            async with asyncio.timeout(within):
                await self._proto.writable()
        except TimeoutError:
            error = ConnectionLost(f"timed out after {within:g}s sending", timeout=True)
            self._proto.fail(error)
            raise self._proto.error or error from None

    async def read_reply(self, within: float) -> Reply:
        """The next reply; ConnectionLost if the connection breaks or none completes ``within`` seconds."""
        p = self._proto
        if p.replies:
            return p.replies.popleft()
        try:
            async with asyncio.timeout(within):
                return await p.next_reply()
        except TimeoutError:
            error = ConnectionLost(f"timed out after {within:g}s waiting for a reply", timeout=True)
            p.fail(error)
            raise p.error or error from None

    async def command(self, data: bytes, within: float) -> Reply:
        self.write(data)
        return await self.read_reply(within)

    async def start_tls(self, context: ssl.SSLContext, within: float) -> None:
        """Handshake after STARTTLS's 220: plaintext that came with or after the 220 is thrown away."""
        p = self._proto
        dropped = p.parser.discard() + sum(len(r.to_bytes()) for r in p.replies)
        p.replies.clear()
        if p.error is not None:
            raise p.error
        p.discarding = True  # until the TLS layer owns the socket: nothing unencrypted is a reply
        loop = asyncio.get_running_loop()
        try:
            transport = await loop.start_tls(
                self._transport, p, context, server_hostname=self.key.host or self.key.address,
                ssl_handshake_timeout=within,
            )
        except BaseException:
            # The socket is closed under the TLS layer; mark our side closed now rather than rely on
            # the news travelling back up through it.
            p.fail(ConnectionLost("TLS handshake failed"))
            p.connection_lost(None)
            raise
        finally:
            p.discarding = False
        if transport is None:
            raise ConnectionLost("TLS handshake failed")
        dropped += p.discarded
        if dropped:
            log.warning("discarded %d plaintext octets after STARTTLS from %s", dropped, self.peer)
        self._transport = p.transport = transport
        self.tls = True

    def abort(self) -> None:
        """Drop the connection at once (no QUIT): after an error, or when it cannot be trusted."""
        self._proto.fail(ConnectionLost("connection closed by us"))

    async def quit(self, within: float) -> None:
        """Say QUIT and close, politely when possible; never raises."""
        if self.usable:
            with contextlib.suppress(ConnectionLost):
                await self.command(quit_command(), within)
        await self.close(within)

    async def close(self, within: float = 5.0) -> None:
        """Close the transport and wait (bounded) for it to be gone."""
        if not self._transport.is_closing():
            self._transport.close()
        try:
            async with asyncio.timeout(within):
                await asyncio.shield(self._proto.closed)
        except TimeoutError:
            self._transport.abort()


class ConnectionPool:
    """Idle connections per ``PoolKey``, reused for later messages to the same place.

    A connection is released only in the "ready for MAIL" state. It is QUIT when it has been idle
    ``idle_timeout`` seconds (a timer reaps it; ``acquire`` and ``close_idle`` check too), after
    ``max_messages`` messages, or when ``max_idle_per_key`` idle connections to its key exist already.
    ``idle_timeout=0`` disables reuse.
    """

    def __init__(
        self, idle_timeout: float = 30.0, max_messages: int = 100, max_idle_per_key: int = 10,
        *, quit_timeout: float = 5.0,
    ) -> None:
        self.idle_timeout = idle_timeout
        self.max_messages = max_messages
        self.max_idle_per_key = max_idle_per_key
        self.quit_timeout = quit_timeout
        self._idle: dict[PoolKey, list[SmtpConnection]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    def idle_count(self, key: PoolKey | None = None) -> int:
        if key is not None:
            return len(self._idle.get(key, ()))
        return sum(len(v) for v in self._idle.values())

    def acquire(self, key: PoolKey) -> SmtpConnection | None:
        """An idle connection for ``key`` that still looks alive, or None (the caller connects)."""
        if self._closed:
            return None
        stack = self._idle.get(key)
        now = time.monotonic()
        while stack:
            conn = stack.pop()  # most recently used first: the most likely to be alive
            if conn.usable and now - conn.idle_since < self.idle_timeout:
                if not stack:
                    del self._idle[key]
                return conn
            self._retire(conn)
        self._idle.pop(key, None)
        return None

    async def release(self, conn: SmtpConnection) -> None:
        """Give back a connection in the ready-for-MAIL state; QUITs it if it is not worth keeping."""
        stack = self._idle.setdefault(conn.key, [])
        if (self._closed or not conn.usable or conn.transactions >= self.max_messages
                or len(stack) >= self.max_idle_per_key or self.idle_timeout <= 0):
            if not stack:
                del self._idle[conn.key]
            await conn.quit(self.quit_timeout)
            return
        conn.idle_since = time.monotonic()
        stack.append(conn)
        self._arm(self.idle_timeout)

    async def close_idle(self) -> int:
        """QUIT connections idle for ``idle_timeout`` or dead already; how many were closed."""
        now = time.monotonic()
        expired: list[SmtpConnection] = []
        for key, stack in list(self._idle.items()):
            keep = [c for c in stack if c.usable and now - c.idle_since < self.idle_timeout]
            expired.extend(c for c in stack if c not in keep)
            if keep:
                self._idle[key] = keep
            else:
                del self._idle[key]
        await asyncio.gather(*(c.quit(self.quit_timeout) for c in expired))
        return len(expired)

    async def close(self) -> None:
        """QUIT every idle connection and stop reusing; connections in use are QUIT when released."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        idle = [c for stack in self._idle.values() for c in stack]
        self._idle.clear()
        await asyncio.gather(*(c.quit(self.quit_timeout) for c in idle))
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _retire(self, conn: SmtpConnection) -> None:
        task = asyncio.get_running_loop().create_task(conn.quit(self.quit_timeout))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _arm(self, delay: float) -> None:
        if self._timer is None and not self._closed:
            self._timer = asyncio.get_running_loop().call_later(delay, self._reap)

    def _reap(self) -> None:
        self._timer = None
        task = asyncio.get_running_loop().create_task(self._reap_idle())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reap_idle(self) -> None:
        closed = await self.close_idle()
        if closed:
            log.debug("closed %d idle connection(s)", closed)
        if self._idle:
            oldest = min(c.idle_since for stack in self._idle.values() for c in stack)
            self._arm(max(0.0, oldest + self.idle_timeout - time.monotonic()))
