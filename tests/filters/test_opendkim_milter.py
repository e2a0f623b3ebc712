"""``MilterCheck`` against a real OpenDKIM milter on loopback, both ways round.

Signing: mail from the signing domain gets a DKIM-Signature as a header edit; dkimpy verifies it against the
generated public key, both on the message with the field put in by hand and on the header block rewritten by
``message.edit`` (what the session does). Verifying: a message dkimpy signed with simple/simple (byte-exact)
canonicalization verifies in OpenDKIM, which proves the replay hands over header values and body unchanged.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from mailhop.checks.api import Action, CheckContext, HeaderEdit, Verdict
from mailhop.checks.milter import MilterCheck
from mailhop.config.checks import MilterConfig
from mailhop.message.edit import rewrite_header_block
from tests.conftest import require_program
from tests.support.opendkim import OpenDkim

pytestmark = pytest.mark.anyio

DOMAIN, SELECTOR = "sender.test", "s2026"
KEYNAME = f"{SELECTOR}._domainkey.{DOMAIN}"
MESSAGE = (b"From: Alice <alice@sender.test>\r\nTo: bob@dest.test\r\nSubject: quarterly  report\r\n"
           b"\t and some  folded\r\n  whitespace\r\nDate: Mon, 30 Nov 2026 10:00:00 +0000\r\n"
           b"Message-ID: <3@sender.test>\r\n\r\nHello Bob,\r\n\r\n  indented line  \r\n.dot line\r\n\r\n\r\n")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def key() -> tuple[bytes, str]:
    """A fresh RSA key: the PEM for OpenDKIM and the DNS TXT record for verifiers."""
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
    der = private.public_key().public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    return pem, f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"


@pytest.fixture(scope="module", params=["relaxed/simple", "simple/simple"])
def opendkim(request: pytest.FixtureRequest, key: tuple[bytes, str]) -> Iterator[OpenDkim]:
    pem, record = key
    with OpenDkim(require_program("opendkim"), DOMAIN, SELECTOR, pem, canonicalization=request.param,
                  public_keys={KEYNAME: record}) as server:
        yield server


def dnsfunc_for(record: str):  # type: ignore[no-untyped-def]
    def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
        return record.encode() if name.decode().rstrip(".").lower() == KEYNAME else None
    return dnsfunc


def context(message: bytes, client_ip: str, user: str | None = None) -> CheckContext:
    ctx = CheckContext(client_ip=client_ip, client_port=40200, helo="client.sender.test", user=user)
    ctx.sender = "alice@sender.test"
    ctx.recipients = ["bob@dest.test"]
    ctx.queue_id = "DQ1"
    ctx.message = message
    ctx.size = len(message)
    return ctx


async def run(server: OpenDkim, ctx: CheckContext) -> Verdict:
    verdict = await MilterCheck(MilterConfig(name="opendkim", address=server.milter, timeout=10)).data(ctx)
    assert verdict is not None and verdict.action is Action.CONTINUE, verdict
    return verdict


def signed_by_edit(message: bytes, edits: tuple[HeaderEdit, ...]) -> bytes:
    head, _, body = message.partition(b"\r\n\r\n")
    return rewrite_header_block(head, edits) + b"\r\n\r\n" + body


async def test_internal_client_gets_a_signature_that_verifies(opendkim: OpenDkim, key: tuple[bytes, str]) -> None:
    verdict = await run(opendkim, context(MESSAGE, "127.0.0.1"))
    [edit] = [e for e in verdict.headers if e.name == "DKIM-Signature"]
    # OpenDKIM inserts at 1 (below the MTA's Received:), which is our 0 (just below ours).
    assert edit.kind == "insert" and edit.index == 0
    assert f"d={DOMAIN}" in edit.value and f"s={SELECTOR}" in edit.value
    assert f"c={opendkim.canonicalization}" in edit.value
    dnsfunc = dnsfunc_for(key[1])
    by_hand = b"DKIM-Signature: " + edit.value.encode() + b"\r\n" + MESSAGE
    assert dkim.verify(by_hand, dnsfunc=dnsfunc)
    assert dkim.verify(signed_by_edit(MESSAGE, verdict.headers), dnsfunc=dnsfunc)
    assert not dkim.verify(by_hand.replace(b"Hello Bob", b"Hello Eve"), dnsfunc=dnsfunc)


async def test_authenticated_client_from_outside_is_signed(opendkim: OpenDkim) -> None:
    verdict = await run(opendkim, context(MESSAGE, "198.51.100.7", user="alice"))
    assert any(e.name == "DKIM-Signature" for e in verdict.headers)


async def test_outside_client_is_verified_not_signed(opendkim: OpenDkim, key: tuple[bytes, str]) -> None:
    pem, _ = key
    signature = dkim.sign(MESSAGE, SELECTOR.encode(), DOMAIN.encode(), pem, canonicalize=(b"simple", b"simple"),
                          include_headers=[b"from", b"to", b"subject", b"date", b"message-id"])
    verdict = await run(opendkim, context(signature + MESSAGE, "198.51.100.7"))
    assert not any(e.name == "DKIM-Signature" for e in verdict.headers)
    [result] = [e.value for e in verdict.headers if e.name == "Authentication-Results"]
    assert result.startswith(f"{opendkim.authserv_id};") and "dkim=pass" in result and f"header.d={DOMAIN}" in result


async def test_tampered_message_fails_verification(opendkim: OpenDkim, key: tuple[bytes, str]) -> None:
    pem, _ = key
    signature = dkim.sign(MESSAGE, SELECTOR.encode(), DOMAIN.encode(), pem, canonicalize=(b"simple", b"simple"))
    tampered = signature + MESSAGE.replace(b"indented line", b"indented  line")
    verdict = await run(opendkim, context(tampered, "198.51.100.7"))
    [result] = [e.value for e in verdict.headers if e.name == "Authentication-Results"]
    assert "dkim=fail" in result
