"""dkimpy's own test vectors (dkim/tests/data in the dkimpy 1.1.8 sources) replayed through DkimCheck, with the
key records dkimpy's tests expect served by a loopback DNS server and read through mailhop's Resolver.

Which record each vector needs is taken from dkimpy's test_dkim.py, test_dkim_ed25519.py and
test_dkim_rsavariants.py: some are data files (test.txt, eximtest.dns, ...), two are written inline in
test_dkim.py (the 2012 gmail.com key and the RFC 8463 "brisbane" key) and are read from there. Messages are
given to the check with CRLF line ends, as the SMTP session hands them over.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mailhop.checks.api import CheckContext
from mailhop.checks.dkimverify import DkimCheck
from mailhop.checks.dnsfunc import ensure_ed25519
from mailhop.config.checks import DkimVerifyConfig
from mailhop.dns import Resolver
from tests.support.dnsserver import TestDns

pytestmark = pytest.mark.anyio

TESTS = Path(__file__).resolve().parents[2] / ".venv/vectors/dkimpy-1.1.8/dkim/tests"
DATA = TESTS / "data"

if not DATA.is_dir():
    _message = f"{DATA} missing: run scripts/setup.sh --test to fetch the upstream test vectors"
    if os.environ.get("CI") == "true":
        pytest.fail(_message, pytrace=False)
    pytest.skip(_message, allow_module_level=True)


def data(name: str) -> bytes:
    return (DATA / name).read_bytes()


def crlf(message: bytes) -> bytes:
    return re.sub(rb"(?<!\r)\n", b"\r\n", message)


def inline_records() -> dict[str, str]:
    """The key records test_dkim.py writes inline, by name (first occurrence; later ones repeat or break them)."""
    source = (TESTS / "test_dkim.py").read_text()
    out: dict[str, str] = {}
    for name, body in re.findall(r"'([^']+\._domainkey\.[^']+)\.':\s*\"\"\"(.*?)\"\"\"", source, re.DOTALL):
        out.setdefault(name, body.replace("\\\n", ""))
    return out


def txt_line(name: str, record: str | bytes) -> str:
    text = record.decode() if isinstance(record, bytes) else record
    text = text.strip().replace('"', "")
    parts = " ".join(f'"{text[i:i + 200]}"' for i in range(0, len(text), 200))
    return f"{name}. 300 IN TXT {parts}"


@pytest.fixture(scope="module")
def server() -> Iterator[TestDns]:
    with TestDns(origins=("com", "net", "ex")) as dns:
        yield dns


def publish(server: TestDns, records: dict[str, str | bytes]) -> Resolver:
    server.zone.records.clear()
    server.zone.servfail.clear()
    server.add(*(txt_line(name, record) for name, record in records.items()))
    return Resolver([server.nameserver], timeout=1.0, lifetime=2.0)


async def verify(resolver: Resolver, message: bytes, **config: Any) -> list[tuple[str, str, str]]:
    check = DkimCheck(DkimVerifyConfig(enabled=True, **config), resolver)
    ctx = CheckContext(client_ip="192.0.2.1")
    ctx.message = crlf(message)
    ctx.header_block = ctx.message.partition(b"\r\n\r\n")[0]
    try:
        await check.data(ctx)
    finally:
        await check.aclose()
    return [(r.domain, r.selector, r.result) for r in ctx.results["dkim"]]


def football(server: TestDns, rsa_record: str | bytes | None = None) -> Resolver:
    inline = inline_records()
    return publish(server, {
        "test._domainkey.football.example.com": rsa_record or data("test.txt"),
        "brisbane._domainkey.football.example.com": inline["brisbane._domainkey.football.example.com"],
    })


async def test_rfc6376_signed_ed25519_and_rsa(server: TestDns) -> None:
    # test_double_previous_verifies: the RFC 8463 Ed25519 signature and dkimpy's RSA one both verify.
    got = await verify(football(server), data("rfc6376.signed.msg"))
    assert got == [("football.example.com", "brisbane", "pass"), ("football.example.com", "test", "pass")]


async def test_rfc6376_signed_rsa(server: TestDns) -> None:
    assert await verify(football(server), data("rfc6376.signed.rsa.msg")) == [
        ("football.example.com", "test", "pass")]


async def test_rfc6376_signed_rsa_with_a_corrupt_key(server: TestDns) -> None:
    # test_catch_bad_key: the published key is damaged (a character of p= removed).
    record = data("test.txt").decode().replace("MIGfMA0GCSqGSIb3DQEBAQUAA4GNADCBiQKBgQ", "MIGfMA0GCSqGSIb3DQEBAQUAA4GNADCBiQKBg")
    got = await verify(football(server, record), data("rfc6376.signed.rsa.msg"))
    assert got == [("football.example.com", "test", "permerror")]


async def test_rfc6376_signed_without_t(server: TestDns) -> None:
    # test_no_t: the signature was made with t=, so without it the header hash differs.
    assert await verify(football(server), data("rfc6376.signed.no_t.msg")) == [
        ("football.example.com", "test", "fail")]


async def test_exim_ed25519(server: TestDns) -> None:
    # test_verify_third_party: signed by Exim's prototype Ed25519 implementation.
    resolver = publish(server, {"sed._domainkey.test.ex": data("eximtest.dns")})
    assert await verify(resolver, data("ed25519test2.msg")) == [("test.ex", "sed", "pass")]


async def test_degenerate_folding(server: TestDns) -> None:
    resolver = publish(server, {"20120113._domainkey.gmail.com": inline_records()["20120113._domainkey.gmail.com"]})
    assert await verify(resolver, data("test2.message")) == [("gmail.com", "20120113", "pass")]


async def test_invalid_domain(server: TestDns) -> None:
    # test_invalid_domain_verify: d=legitimate.com(.attacker.com is refused before any DNS.
    resolver = publish(server, {})
    assert await verify(resolver, data("test.message.baddomain")) == [
        ("legitimate.com(.attacker.com", "test", "permerror")]


@pytest.mark.parametrize("header", [b"simple", b"relaxed"])
@pytest.mark.parametrize("body", [b"simple", b"relaxed"])
async def test_sign_and_verify(server: TestDns, header: bytes, body: bytes) -> None:
    import dkim

    resolver = publish(server, {"test._domainkey.example.com": data("test.txt")})
    message = data("test.message")
    signed = dkim.sign(message, b"test", b"example.com", data("test.private"), canonicalize=(header, body))
    assert await verify(resolver, signed + message) == [("example.com", "test", "pass")]
    assert await verify(resolver, signed + message + b"foo") == [("example.com", "test", "fail")]


async def test_extra_from_fails(server: TestDns) -> None:
    # test_multiple_from_fails: a From field added above the signed one breaks the signature.
    import dkim

    resolver = publish(server, {"test._domainkey.example.com": data("test.txt")})
    message = data("test.message")
    signed = dkim.sign(message, b"test", b"example.com", data("test.private"))
    spam = b'From: "Resident Evil" <sales@spammer.com>\r\n'
    assert await verify(resolver, signed + message) == [("example.com", "test", "pass")]
    assert await verify(resolver, spam + signed + message) == [("example.com", "test", "fail")]


@pytest.mark.parametrize(("selector", "key", "record"), [
    ("test", "1024_testkey.key", "1024_testkey_wo_markers.pub.txt"),
    ("test2", "1024_testkey.key", "1024_testkey_wo_markers.pub.rsa.txt"),
    ("test3", "2048_testkey.key", "2048_testkey_wo_markers.pub.txt"),
    ("test4", "2048_testkey.key", "2048_testkey_wo_markers.pub.rsa.txt"),
    ("test5", "2048_testkey_PKCS8.key", "2048_testkey_PKCS8.key.pub.txt"),
])
async def test_rsa_key_variants(server: TestDns, selector: str, key: str, record: str) -> None:
    # test_dkim_rsavariants: SubjectPublicKeyInfo and bare RSAPublicKey records, PKCS#1 and PKCS#8 private keys.
    import dkim

    resolver = publish(server, {f"{selector}._domainkey.example.com": data(record)})
    message = data("test.message")
    signed = dkim.sign(message, selector.encode(), b"example.com", data(key))
    assert await verify(resolver, signed + message) == [("example.com", selector, "pass")]


async def test_ed25519_sign_and_verify(server: TestDns) -> None:
    import dkim

    ensure_ed25519()
    resolver = publish(server, {"test._domainkey.example.net": data("ed25519test.dns")})
    message = data("ed25519test.msg")
    signed = dkim.sign(message, b"test", b"example.net", data("ed25519test.key"),
                       signature_algorithm=b"ed25519-sha256")
    assert await verify(resolver, signed + message) == [("example.net", "test", "pass")]
    assert await verify(resolver, signed + message + b"foo") == [("example.net", "test", "fail")]


async def test_rfc8032_key(server: TestDns) -> None:
    # test_rfc8032_verifies: RFC 8032 7.1's key as RFC 8463's "brisbane".
    import dkim

    ensure_ed25519()
    resolver = football(server)
    message = data("rfc6376.msg")
    signed = dkim.sign(message, b"brisbane", b"football.example.com", data("rfc8032_7_1.key"),
                       signature_algorithm=b"ed25519-sha256")
    assert await verify(resolver, signed + message) == [("football.example.com", "brisbane", "pass")]
