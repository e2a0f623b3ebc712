"""ArcCheck: chains sealed here with dkimpy's arc_sign, keys served by a loopback DNS server."""

from __future__ import annotations

import base64

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from mailhop.checks.api import Action, AuthResult, CheckContext, Verdict
from mailhop.checks.arc import ArcCheck, ArcOutcome
from mailhop.config.checks import ArcConfig
from mailhop.dns import Resolver
from tests.support.dnsserver import TestDns

pytestmark = pytest.mark.anyio

MESSAGE = (b"From: Alice <alice@example.test>\r\nTo: list@list.test\r\nSubject: minutes\r\n"
           b"Date: Mon, 02 Mar 2026 10:00:00 +0000\r\nMessage-ID: <7@example.test>\r\n\r\n"
           b"The minutes are attached.\r\n")


@pytest.fixture(scope="module")
def key() -> tuple[bytes, str]:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
    der = private.public_key().public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    record = f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"
    parts = " ".join(f'"{record[i:i + 200]}"' for i in range(0, len(record), 200))
    return pem, parts


def publish(dns: TestDns, key: tuple[bytes, str]) -> None:
    dns.add(f"sel._domainkey.example.test. 300 IN TXT {key[1]}", f"lst._domainkey.list.test. 300 IN TXT {key[1]}")


def seal(message: bytes, pem: bytes, srv_id: str, selector: str, domain: str, results: str) -> bytes:
    """One ARC hop: record our Authentication-Results, then add the ARC set dkimpy makes from them."""
    import dkim

    message = f"Authentication-Results: {srv_id}; {results}\r\n".encode() + message
    lines = dkim.arc_sign(message, selector.encode(), domain.encode(), pem, srv_id.encode())
    assert lines, "dkimpy made no ARC set"
    return b"".join(lines) + message


async def run(resolver: Resolver, message: bytes | None) -> tuple[Verdict | None, CheckContext]:
    check = ArcCheck(ArcConfig(enabled=True), resolver)
    ctx = CheckContext(client_ip="192.0.2.1")
    ctx.message = message
    try:
        verdict = await check.data(ctx)
    finally:
        await check.aclose()
    return verdict, ctx


async def test_valid_chain(clean_dns: TestDns, clean_resolver: Resolver, key: tuple[bytes, str]) -> None:
    publish(clean_dns, key)
    sealed = seal(MESSAGE, key[0], "mx.example.test", "sel", "example.test", "spf=pass smtp.mailfrom=a@example.test")
    verdict, ctx = await run(clean_resolver, sealed)
    assert verdict is not None and verdict.action is Action.CONTINUE
    assert verdict.auth_results == (AuthResult("arc", "pass", "", (("header.oldest-pass", "0"),)),)
    assert ctx.results["arc"] == ArcOutcome("pass", 1, "", 0)


async def test_two_hops_with_a_modifying_list(clean_dns: TestDns, clean_resolver: Resolver,
                                              key: tuple[bytes, str]) -> None:
    """The list checks the chain (pass), adds a footer and seals again: the first AMS no longer verifies but the
    chain still passes, and oldest-pass says from which instance on the signatures hold (RFC 8617 5.2)."""
    publish(clean_dns, key)
    first = seal(MESSAGE, key[0], "mx.example.test", "sel", "example.test", "spf=pass smtp.mailfrom=a@example.test")
    footer = first + b"--\r\nTo unsubscribe, write to list-request@list.test\r\n"
    second = seal(footer, key[0], "mx.list.test", "lst", "list.test", "arc=pass")
    verdict, ctx = await run(clean_resolver, second)
    assert ctx.results["arc"] == ArcOutcome("pass", 2, "", 2)
    assert verdict is not None and verdict.auth_results[0].properties == (("header.oldest-pass", "2"),)


async def test_broken_chain(clean_dns: TestDns, clean_resolver: Resolver, key: tuple[bytes, str]) -> None:
    publish(clean_dns, key)
    sealed = seal(MESSAGE, key[0], "mx.example.test", "sel", "example.test", "spf=pass smtp.mailfrom=a@example.test")
    verdict, ctx = await run(clean_resolver, sealed.replace(b"minutes are", b"minutes were"))
    outcome = ctx.results["arc"]
    assert outcome.cv == "fail" and outcome.instances == 1 and "Message-Signature" in outcome.reason
    assert verdict is not None and verdict.auth_results[0].result == "fail" and verdict.action is Action.CONTINUE


async def test_seal_broken_by_a_changed_arc_header(clean_dns: TestDns, clean_resolver: Resolver,
                                                   key: tuple[bytes, str]) -> None:
    publish(clean_dns, key)
    sealed = seal(MESSAGE, key[0], "mx.example.test", "sel", "example.test", "spf=pass smtp.mailfrom=a@example.test")
    _verdict, ctx = await run(clean_resolver, sealed.replace(b"spf=pass", b"spf=fail"))
    assert ctx.results["arc"].cv == "fail"


async def test_no_chain_is_none(clean_resolver: Resolver) -> None:
    verdict, ctx = await run(clean_resolver, MESSAGE)
    assert verdict is not None and verdict.auth_results == (AuthResult("arc", "none"),)
    assert ctx.results["arc"].cv == "none"


async def test_key_lookup_failure_fails_the_chain(clean_dns: TestDns, clean_resolver: Resolver,
                                                  key: tuple[bytes, str]) -> None:
    publish(clean_dns, key)
    clean_dns.zone.servfail.add("sel._domainkey.example.test")
    sealed = seal(MESSAGE, key[0], "mx.example.test", "sel", "example.test", "spf=pass smtp.mailfrom=a@example.test")
    _verdict, ctx = await run(clean_resolver, sealed)
    outcome = ctx.results["arc"]
    assert outcome.cv == "fail" and "temporarily" in outcome.reason


async def test_message_over_scan_size_is_not_verified(clean_resolver: Resolver) -> None:
    verdict, ctx = await run(clean_resolver, None)
    assert verdict is None and "arc" not in ctx.results
