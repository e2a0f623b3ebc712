"""SmtpTransport TLS and AUTH: STARTTLS policies, response injection, verification, implicit TLS, AUTH."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import AsyncIterator, Callable

import pytest

from mailhop.delivery.transport import Candidate, TlsPolicy
from tests.support.receiver import Receiver

from .smtp_helpers import BODY, DEFERRED, DELIVERED, HOST, deliver, destination, message, transport

pytestmark = pytest.mark.anyio
Factory = Callable[[bool], ssl.SSLContext]


async def test_opportunistic_starttls(server_tls: ssl.SSLContext) -> None:
    async with Receiver(HOST, 0, tls_context=server_tls) as r:
        [o] = (await deliver(transport(), destination(r, tls=TlsPolicy.OPPORTUNISTIC), message())).values()
        [tx] = await r.wait_for_async(1)
    assert o.kind is DELIVERED and tx.tls and r.sessions[0].tls and tx.data == BODY
    assert r.sessions[0].verbs()[:3] == ["EHLO", "STARTTLS", "EHLO"]


async def test_opportunistic_without_starttls_offered_goes_plain() -> None:
    async with Receiver(HOST, 0) as r:
        [o] = (await deliver(transport(), destination(r, tls=TlsPolicy.OPPORTUNISTIC), message())).values()
        [tx] = await r.wait_for_async(1)
    assert o.kind is DELIVERED and not tx.tls


async def test_tls_none_never_starttls(server_tls: ssl.SSLContext) -> None:
    async with Receiver(HOST, 0, tls_context=server_tls) as r:
        await deliver(transport(), destination(r, tls=TlsPolicy.NONE), message())
        [tx] = await r.wait_for_async(1)
    assert not tx.tls and "STARTTLS" not in r.sessions[0].verbs()


@pytest.mark.parametrize("injected", [True, b"220 Ready\r\n250 evil\r\n", b"220 Ready\r\n250-evil\r\n250 more\r\n"])
async def test_starttls_response_injection_is_discarded(
    server_tls: ssl.SSLContext, injected: bool | bytes, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "mailhop.delivery")
    msg = message(["b@example.test", "c@example.test"])
    async with Receiver(HOST, 0, tls_context=server_tls, starttls_inject=injected) as r:
        outcomes = await deliver(transport(), destination(r, tls=TlsPolicy.REQUIRED), msg)
        [tx] = await r.wait_for_async(1)
    # Were "250 evil" taken as the reply to the EHLO after TLS, every later reply would be off by one.
    assert [o.kind for o in outcomes.values()] == [DELIVERED, DELIVERED]
    assert all(o.reply.code == 250 and o.reply.text.startswith("Ok: queued") for o in outcomes.values())
    assert tx.tls and tx.mail_params[0].startswith("SIZE=")  # the real post-TLS EHLO reply was used
    assert any("discarded" in rec.getMessage() and "plaintext" in rec.getMessage() for rec in caplog.records)


@pytest.mark.parametrize("mode", ["close", "garbage"])
async def test_opportunistic_handshake_failure_falls_back_to_plaintext(mode: str) -> None:
    async with Receiver(HOST, 0, tls_handshake_fail=mode) as r:
        [o] = (await deliver(transport(), destination(r, tls=TlsPolicy.OPPORTUNISTIC), message())).values()
        [tx] = await r.wait_for_async(1)
    assert o.kind is DELIVERED and not tx.tls and r.connections == 2
    assert "STARTTLS" in r.sessions[0].verbs() and "STARTTLS" not in r.sessions[1].verbs()


@pytest.mark.parametrize("mode", ["close", "garbage"])
async def test_required_tls_handshake_failure_defers(mode: str) -> None:
    async with Receiver(HOST, 0, tls_handshake_fail=mode) as r:
        [o] = (await deliver(transport(), destination(r, tls=TlsPolicy.REQUIRED), message())).values()
    assert o.kind is DEFERRED and o.reply.enhanced == "4.7.5" and "TLS required but unavailable" in o.reply.text
    assert r.transactions == [] and r.connections == 1


async def test_required_tls_not_offered_defers() -> None:
    async with Receiver(HOST, 0) as r:
        [o] = (await deliver(transport(), destination(r, tls=TlsPolicy.REQUIRED), message())).values()
    assert o.kind is DEFERRED and o.reply.enhanced == "4.7.5" and "MAIL" not in r.sessions[0].verbs()


async def test_required_tls_tries_the_next_candidate(server_tls: ssl.SSLContext) -> None:
    async with Receiver(HOST, 0) as plain, Receiver("127.0.0.32", 0, tls_context=server_tls) as secure:
        [o] = (await deliver(transport(), destination(plain, secure, tls=TlsPolicy.REQUIRED), message())).values()
        [tx] = await secure.wait_for_async(1)
    assert o.kind is DELIVERED and tx.tls and plain.transactions == []


async def test_required_does_not_verify(server_tls: ssl.SSLContext) -> None:
    # The test CA is not trusted by the default factory: fine for "required", which does not verify.
    async with Receiver(HOST, 0, tls_context=server_tls) as r:
        [o] = (await deliver(transport(), destination(r, tls=TlsPolicy.REQUIRED), message())).values()
    assert o.kind is DELIVERED


async def test_verify_with_trusted_ca(server_tls: ssl.SSLContext, trusting: Factory) -> None:
    async with Receiver(HOST, 0, tls_context=server_tls) as r:
        [o] = (await deliver(transport(ssl_context_factory=trusting), destination(r, tls=TlsPolicy.VERIFY),
                             message())).values()
        [tx] = await r.wait_for_async(1)
    assert o.kind is DELIVERED and tx.tls


async def test_verify_wrong_host_name_defers(server_tls: ssl.SSLContext, trusting: Factory) -> None:
    async with Receiver(HOST, 0, tls_context=server_tls) as r:
        dest = destination(Candidate("wrong.example", r.host, r.port), tls=TlsPolicy.VERIFY)
        [o] = (await deliver(transport(ssl_context_factory=trusting), dest, message())).values()
    assert o.kind is DEFERRED and o.reply.enhanced == "4.7.5" and r.transactions == []
    assert "certificate" in o.reply.text.lower()


async def test_verify_untrusted_ca_defers(server_tls: ssl.SSLContext) -> None:
    async with Receiver(HOST, 0, tls_context=server_tls) as r:
        [o] = (await deliver(transport(), destination(r, tls=TlsPolicy.VERIFY), message())).values()
    assert o.kind is DEFERRED and o.reply.enhanced == "4.7.5"


class TlsProxy:
    """Implicit TLS in front of a plaintext receiver (the Receiver speaks STARTTLS only)."""

    def __init__(self, target: Receiver, context: ssl.SSLContext) -> None:
        self.target = target
        self.context = context
        self.versions: list[str | None] = []
        self._handlers: set[asyncio.Task[None]] = set()
        self.server: asyncio.AbstractServer | None = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        ssl_object = writer.get_extra_info("ssl_object")
        self.versions.append(ssl_object.version() if ssl_object else None)
        up_reader, up_writer = await asyncio.open_connection(self.target.host, self.target.port)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer), return_exceptions=True)
        for w in (writer, up_writer):
            await asyncio.gather(w.wait_closed(), return_exceptions=True)
        self._handlers.discard(task)

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.33", 0, ssl=self.context)
        return int(self.server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()
        await asyncio.gather(*self._handlers, return_exceptions=True)


@pytest.fixture
async def smtps(server_tls: ssl.SSLContext) -> AsyncIterator[tuple[Receiver, TlsProxy, int]]:
    async with Receiver(HOST, 0) as r:
        proxy = TlsProxy(r, server_tls)
        port = await proxy.start()
        try:
            yield r, proxy, port
        finally:
            await proxy.stop()


async def test_implicit_tls(smtps: tuple[Receiver, TlsProxy, int], trusting: Factory) -> None:
    r, proxy, port = smtps
    dest = destination(Candidate("receiver.test", "127.0.0.33", port), tls=TlsPolicy.VERIFY, implicit_tls=True)
    [o] = (await deliver(transport(ssl_context_factory=trusting), dest, message())).values()
    [tx] = await r.wait_for_async(1)
    assert o.kind is DELIVERED and tx.data == BODY
    assert proxy.versions and (proxy.versions[0] or "").startswith("TLSv1.")
    assert "STARTTLS" not in r.sessions[0].verbs()


async def test_implicit_tls_against_plaintext_server_defers() -> None:
    async with Receiver(HOST, 0) as r:
        [o] = (await deliver(transport(), destination(r, tls=TlsPolicy.REQUIRED, implicit_tls=True),
                             message())).values()
    assert o.kind is DEFERRED and r.transactions == []


AUTH = {"auth_users": {"relayuser": "s3cret"}, "require_auth": True, "require_tls": True}


def refuse_plain(line: str) -> str | None:
    return "504 5.5.4 Unrecognized authentication type" if line.upper().startswith("AUTH PLAIN") else None


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
async def test_auth_over_starttls(server_tls: ssl.SSLContext, mechanism: str) -> None:
    hook = refuse_plain if mechanism == "LOGIN" else None  # PLAIN is preferred; LOGIN when PLAIN is refused
    async with Receiver(HOST, 0, tls_context=server_tls, on_command=hook, **AUTH) as r:
        dest = destination(r, tls=TlsPolicy.REQUIRED, username="relayuser", password="s3cret")
        [o] = (await deliver(transport(), dest, message())).values()
        [tx] = await r.wait_for_async(1)
    assert o.kind is DELIVERED and tx.auth == "relayuser" and tx.tls
    commands = r.sessions[0].commands
    assert r.sessions[0].verbs()[:4] == ["EHLO", "STARTTLS", "EHLO", "AUTH"]
    assert commands[3].upper().startswith("AUTH PLAIN ")
    assert mechanism == "PLAIN" or commands[4] == "AUTH LOGIN"
    assert not any("s3cret" in c for c in commands)  # base64 only, never the password in clear


async def test_auth_wrong_password_defers_and_stops(server_tls: ssl.SSLContext) -> None:
    async with Receiver(HOST, 0, tls_context=server_tls, **AUTH) as r, \
            Receiver("127.0.0.32", 0, tls_context=server_tls, **AUTH) as other:
        dest = destination(r, other, tls=TlsPolicy.REQUIRED, username="relayuser", password="wrong")
        [o] = (await deliver(transport(), dest, message())).values()
    assert o.kind is DEFERRED and o.reply.is_transient and "535" in o.reply.text
    assert o.reply.enhanced == "4.7.8" and other.connections == 0  # no point trying more hosts


async def test_auth_never_in_plaintext_unless_tls_none(server_tls: ssl.SSLContext) -> None:
    options = {"auth_users": {"u": "p"}, "require_auth": True}
    async with Receiver(HOST, 0, **options) as r:
        [o] = (await deliver(transport(), destination(r, tls=TlsPolicy.OPPORTUNISTIC, username="u", password="p"),
                             message())).values()
        assert o.kind is DEFERRED and "AUTH" not in r.sessions[0].verbs()
        [o] = (await deliver(transport(), destination(r, tls=TlsPolicy.NONE, username="u", password="p"),
                             message())).values()
        assert o.kind is DELIVERED and r.sessions[1].verbs()[1] == "AUTH"


def test_client_contexts() -> None:
    from mailhop.delivery.tls import make_client_context

    loose = make_client_context(False)
    assert loose.verify_mode is ssl.CERT_NONE and not loose.check_hostname
    strict = make_client_context(True)
    assert strict.verify_mode is ssl.CERT_REQUIRED and strict.check_hostname
    assert loose.minimum_version is strict.minimum_version is ssl.TLSVersion.TLSv1_2
