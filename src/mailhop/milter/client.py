"""The milter client: one connection per message, over TCP or a unix socket, driving ``conversation.Conversation``.

Why one connection per message: we replay the whole envelope at end of data, so the connection lives for one
message only; it needs no SMFIC_QUIT_NC reuse (which libmilter supports but other milters may not), a broken
milter cannot leave half a conversation behind for the next message, and the cost is one connect on what is
nearly always a local socket. Postfix, too, opens a new milter connection per SMTP session.

Limits: connecting is bounded by ``connect_timeout``; every write and every reply by ``timeout`` (a PROGRESS reply
starts the wait again, as in Postfix); a reply by ``max_packet`` octets. The policy chain's own deadline bounds
the whole. Untrusted input: the milter's replies (see ``protocol``).
"""

from __future__ import annotations

import asyncio
import contextlib

from .conversation import Conversation, MessageInfo, Result
from .protocol import (
    MAX_PACKET,
    Cmd,
    PacketReader,
    ProtocolError,
    Response,
    decode_response,
    encode,
    negotiate,
    optneg,
)

__all__ = ["MilterClient", "MilterError", "parse_address"]

# Unanswered steps (headers, body chunks under SMFIP_NR_*) are batched into one write up to this size, so a
# large body is not copied whole into the batch first.
_FLUSH_AT = 256 * 1024


class MilterError(Exception):
    """The milter could not be reached, went away, or did not answer in time."""


def parse_address(address: str) -> tuple[str, str, int]:
    """("inet", host, port) or ("unix", path, 0) from "inet:HOST:PORT", "inet6:[::1]:PORT" or "unix:/path"."""
    kind, _, rest = address.partition(":")
    if kind == "unix" and rest:
        return "unix", rest, 0
    if kind in ("inet", "inet6"):
        host, _, port = rest.rpartition(":")
        host = host.strip("[]")
        if host and port.isdigit() and 0 < int(port) < 65536:
            return "inet", host, int(port)
    raise ValueError(f"not a milter address: {address!r}")


class MilterClient:
    """Checks messages with the milter at ``address``."""

    def __init__(self, address: str, *, connect_timeout: float, timeout: float,
                 max_packet: int = MAX_PACKET) -> None:
        self.address = address
        self._where = parse_address(address)
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        self.max_packet = max_packet

    async def check(self, info: MessageInfo) -> Result:
        """Replay one message. Raises MilterError (transport, timeout) or ProtocolError (a misbehaving milter)."""
        reader, writer = await self._open()
        clean = False
        try:
            await self._write(writer, optneg())
            conversation = Conversation(negotiate(await self._read(reader)), info)
            pending = bytearray()
            while (step := conversation.next_step()) is not None:
                pending += step.payload
                if not step.expects_reply and len(pending) < _FLUSH_AT:
                    continue  # steps the milter will not answer go out together with the next one that it will
                await self._write(writer, bytes(pending))
                pending.clear()
                while step.expects_reply and not conversation.receive(await self._read(reader)):
                    pass
            pending += encode(Cmd.QUIT)
            await self._write(writer, bytes(pending))
            clean = True
            assert conversation.result is not None
            return conversation.result
        finally:
            await self._close(writer, clean)

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        kind, where, port = self._where
        try:
            async with asyncio.timeout(self.connect_timeout):
                if kind == "unix":
                    return await asyncio.open_unix_connection(where)
                return await asyncio.open_connection(where, port)
        except TimeoutError:
            raise MilterError(f"no connection to {self.address} within {self.connect_timeout:g}s") from None
        except OSError as exc:
            raise MilterError(f"cannot connect to {self.address}: {exc.strerror or exc}") from None

    async def _write(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        try:
            async with asyncio.timeout(self.timeout):
                writer.write(data)
                await writer.drain()
        except TimeoutError:
            raise MilterError(f"{self.address} did not take our data within {self.timeout:g}s") from None
        except OSError as exc:
            raise MilterError(f"{self.address}: {exc.strerror or exc}") from None

    async def _read(self, reader: asyncio.StreamReader) -> Response:
        packets = PacketReader(self.max_packet)
        try:
            async with asyncio.timeout(self.timeout):
                while need := packets.needed():  # raises ProtocolError for a length over the limit
                    packets.feed(await reader.readexactly(need))
        except TimeoutError:
            raise MilterError(f"{self.address} did not reply within {self.timeout:g}s") from None
        except asyncio.IncompleteReadError:
            raise MilterError(f"{self.address} closed the connection mid-conversation") from None
        except OSError as exc:
            raise MilterError(f"{self.address}: {exc.strerror or exc}") from None
        packet = packets.next_packet()
        if packet is None:  # pragma: no cover - needed() was 0
            raise ProtocolError("incomplete packet")
        return decode_response(*packet)

    async def _close(self, writer: asyncio.StreamWriter, clean: bool) -> None:
        if not clean:
            # After an error the milter may not be reading; abort rather than wait to flush.
            writer.transport.abort()
            return
        writer.close()
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(self.timeout):
                await writer.wait_closed()
