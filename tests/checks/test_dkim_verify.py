"""DkimCheck: messages signed here with dkimpy (RSA and Ed25519 keys made with cryptography), keys served by a
loopback DNS server, verified through the real Resolver."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from mailhop.checks.api import Action, AuthResult, CheckContext
from mailhop.checks.dkimverify import DkimCheck, DkimSignatureResult
from mailhop.checks.dnsfunc import ensure_ed25519
from mailhop.config.checks import DkimVerifyConfig
from mailhop.dns import Resolver
from tests.support.dnsserver import TestDns

pytestmark = pytest.mark.anyio

MESSAGE = (b"From: Alice <alice@example.test>\r\nTo: bob@dest.test\r\nSubject: lunch\r\n"
           b"Date: Mon, 02 Mar 2026 10:00:00 +0000\r\nMessage-ID: <1@example.test>\r\n\r\n"
           b"Shall we meet at noon?\r\n")
SIGNED = [b"from", b"to", b"subject", b"date", b"message-id"]


@dataclass(frozen=True)
class Key:
    private: bytes  # what dkimpy's sign() takes
    record: str  # the TXT record to publish


def txt_line(name: str, record: str) -> str:
    """A zone line; the record is split into character-strings of at most 255 octets (RFC 6376 3.6.2.2)."""
    parts = " ".join(f'"{record[i:i + 200]}"' for i in range(0, len(record), 200))
    return f"{name}. 300 IN TXT {parts}"


def new_rsa_key() -> Key:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption())
    der = key.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    return Key(pem, f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}")


@pytest.fixture(scope="module")
def rsa_key() -> Key:
    return new_rsa_key()


@pytest.fixture(scope="module")
def other_rsa_key() -> Key:
    return new_rsa_key()


@pytest.fixture(scope="module")
def ed_key() -> Key:
    ensure_ed25519()  # dkimpy signs Ed25519 through PyNaCl or our stand-in
    key = ed25519.Ed25519PrivateKey.generate()
    seed = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return Key(base64.b64encode(seed), f"v=DKIM1; k=ed25519; p={base64.b64encode(pub).decode()}")


def sign(message: bytes, key: Key, selector: str = "sel", domain: str = "example.test", **kw: Any) -> bytes:
    import dkim

    algorithm = b"ed25519-sha256" if b"ed25519" in key.record.encode() else b"rsa-sha256"
    header: bytes = dkim.sign(message, selector.encode(), domain.encode(), key.private, include_headers=SIGNED,
                              signature_algorithm=algorithm, **kw)
    return header + message


def sign_expired(message: bytes, key: Key) -> bytes:
    """A valid signature whose x= (and t=) lie in the past: dkimpy's sign() has no x=, so add it before hashing."""
    import dkim

    class Expiring(dkim.DKIM):  # type: ignore[misc]
        def gen_header(self, fields: list[tuple[bytes, bytes]], *args: Any, **kw: Any) -> bytes:
            fields = [(k, b"1000000000" if k == b"t" else v) for k, v in fields]
            fields.insert(len(fields) - 1, (b"x", b"1000086400"))
            out: bytes = super().gen_header(fields, *args, **kw)
            return out

    header: bytes = Expiring(message).sign(b"sel", b"example.test", key.private, include_headers=SIGNED)
    return header + message


def context(message: bytes | None) -> CheckContext:
    ctx = CheckContext(client_ip="192.0.2.1", helo="mx.example.test")
    ctx.sender = "alice@example.test"
    ctx.message = message
    if message is not None:
        ctx.header_block = message.partition(b"\r\n\r\n")[0]
        ctx.size = len(message)
    return ctx


async def run(resolver: Resolver, message: bytes | None, **config: Any) -> tuple[Any, CheckContext]:
    check = DkimCheck(DkimVerifyConfig(enabled=True, **config), resolver)
    ctx = context(message)
    try:
        verdict = await check.data(ctx)
    finally:
        await check.aclose()
    return verdict, ctx


def results(ctx: CheckContext) -> list[tuple[str, str]]:
    return [(r.result, r.reason) for r in ctx.results["dkim"]]


async def test_valid_rsa_signature(clean_dns: TestDns, clean_resolver: Resolver, rsa_key: Key) -> None:
    clean_dns.add(txt_line("sel._domainkey.example.test", rsa_key.record))
    message = sign(MESSAGE, rsa_key)
    verdict, ctx = await run(clean_resolver, message)
    assert verdict.action is Action.CONTINUE and verdict.reply is None
    [res] = ctx.results["dkim"]
    assert isinstance(res, DkimSignatureResult)
    assert (res.domain, res.selector, res.result, res.key_bits) == ("example.test", "sel", "pass", 2048)
    b_tag = message.split(b" b=", 1)[1].replace(b"\r\n ", b"")[:8].decode()
    assert verdict.auth_results == (AuthResult("dkim", "pass", "", (("header.d", "example.test"),
                                                                     ("header.s", "sel"), ("header.b", b_tag))),)


async def test_valid_ed25519_signature(clean_dns: TestDns, clean_resolver: Resolver, ed_key: Key) -> None:
    clean_dns.add(txt_line("ed._domainkey.example.test", ed_key.record))
    _verdict, ctx = await run(clean_resolver, sign(MESSAGE, ed_key, selector="ed"))
    [res] = ctx.results["dkim"]
    assert (res.result, res.algorithm, res.key_bits) == ("pass", "ed25519-sha256", 256)


async def test_body_modified_fails_body_hash(clean_dns: TestDns, clean_resolver: Resolver, rsa_key: Key) -> None:
    clean_dns.add(txt_line("sel._domainkey.example.test", rsa_key.record))
    message = sign(MESSAGE, rsa_key).replace(b"noon", b"one")
    verdict, ctx = await run(clean_resolver, message)
    assert results(ctx) == [("fail", "body hash did not verify")]
    assert verdict.auth_results[0].result == "fail" and verdict.action is Action.CONTINUE


async def test_header_modified_fails_signature(clean_dns: TestDns, clean_resolver: Resolver, rsa_key: Key) -> None:
    clean_dns.add(txt_line("sel._domainkey.example.test", rsa_key.record))
    message = sign(MESSAGE, rsa_key).replace(b"Subject: lunch", b"Subject: dinner")
    _verdict, ctx = await run(clean_resolver, message)
    assert results(ctx) == [("fail", "signature did not verify")]


async def test_expired_signature_fails(clean_dns: TestDns, clean_resolver: Resolver, rsa_key: Key) -> None:
    clean_dns.add(txt_line("sel._domainkey.example.test", rsa_key.record))
    message = sign_expired(MESSAGE, rsa_key)
    assert b"x=1000086400" in message
    _verdict, ctx = await run(clean_resolver, message)
    assert results(ctx) == [("fail", "signature expired")]


async def test_missing_key_is_permerror(clean_dns: TestDns, clean_resolver: Resolver, rsa_key: Key) -> None:
    _verdict, ctx = await run(clean_resolver, sign(MESSAGE, rsa_key))  # nothing published: NXDOMAIN
    [(result, reason)] = results(ctx)
    assert result == "permerror" and reason.startswith("no key for signature")


async def test_revoked_key_is_permerror(clean_dns: TestDns, clean_resolver: Resolver, rsa_key: Key) -> None:
    clean_dns.add(txt_line("sel._domainkey.example.test", "v=DKIM1; k=rsa; p="))
    _verdict, ctx = await run(clean_resolver, sign(MESSAGE, rsa_key))
    assert results(ctx) == [("permerror", "key revoked")]


async def test_key_lookup_servfail_is_temperror(clean_dns: TestDns, clean_resolver: Resolver,
                                                rsa_key: Key) -> None:
    clean_dns.add(txt_line("sel._domainkey.example.test", rsa_key.record))
    clean_dns.zone.servfail.add("sel._domainkey.example.test")
    verdict, ctx = await run(clean_resolver, sign(MESSAGE, rsa_key))
    assert results(ctx) == [("temperror", "key lookup failed temporarily")]
    assert verdict.action is Action.CONTINUE  # DKIM never refuses by itself


async def test_short_rsa_key_is_policy(clean_dns: TestDns, clean_resolver: Resolver, rsa_key: Key) -> None:
    clean_dns.add(txt_line("sel._domainkey.example.test", rsa_key.record))
    _verdict, ctx = await run(clean_resolver, sign(MESSAGE, rsa_key), min_rsa_bits=4096)
    assert results(ctx) == [("policy", "RSA key of 2048 bits is shorter than 4096")]


async def test_two_signatures_one_good_one_bad(clean_dns: TestDns, clean_resolver: Resolver, rsa_key: Key,
                                               other_rsa_key: Key) -> None:
    clean_dns.add(txt_line("good._domainkey.example.test", rsa_key.record),
                  txt_line("bad._domainkey.other.test", rsa_key.record))  # not the key "bad" signs with
    once = sign(MESSAGE, rsa_key, selector="good")
    twice = sign(once, other_rsa_key, selector="bad", domain="other.test")
    verdict, ctx = await run(clean_resolver, twice)
    got = [(r.domain, r.selector, r.result) for r in ctx.results["dkim"]]
    assert got == [("other.test", "bad", "fail"), ("example.test", "good", "pass")]  # topmost first
    assert [a.result for a in verdict.auth_results] == ["fail", "pass"]


async def test_max_signatures_bounds_the_work(clean_dns: TestDns, clean_resolver: Resolver, rsa_key: Key) -> None:
    clean_dns.add(txt_line("sel._domainkey.example.test", rsa_key.record))
    message = sign(sign(MESSAGE, rsa_key), rsa_key)
    _verdict, ctx = await run(clean_resolver, message, max_signatures=1)
    assert len(ctx.results["dkim"]) == 1


async def test_unparsable_signature_is_neutral(clean_resolver: Resolver) -> None:
    message = b"DKIM-Signature: v=1; this is not a tag list\r\n" + MESSAGE
    _verdict, ctx = await run(clean_resolver, message)
    [(result, reason)] = results(ctx)
    assert result == "neutral" and reason.startswith("signature syntax error")


async def test_missing_required_tag_is_permerror(clean_resolver: Resolver) -> None:
    message = b"DKIM-Signature: v=1; a=rsa-sha256; d=example.test; s=sel; h=from; bh=AAAA\r\n" + MESSAGE
    _verdict, ctx = await run(clean_resolver, message)
    [(result, reason)] = results(ctx)
    assert result == "permerror" and "missing" in reason


async def test_no_signature_is_none(clean_resolver: Resolver) -> None:
    verdict, ctx = await run(clean_resolver, MESSAGE)
    assert verdict.auth_results == (AuthResult("dkim", "none"),)
    assert ctx.results["dkim"] == []


async def test_message_over_scan_size_is_not_verified(clean_resolver: Resolver) -> None:
    verdict, ctx = await run(clean_resolver, None)
    assert verdict is None and "dkim" not in ctx.results
