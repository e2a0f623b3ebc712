"""The outbound hook (``OutboundSigner.open_signed``) at the delivery seam: which mail is signed (trust, From:
domain, sub-domains, longest match), that the bytes it yields verify with three independent verifiers (dkimpy,
OpenDKIM's ``opendkim -t``, dkimpy's ``dkimverify`` command over real DNS) also after the real SMTP transport
carried them, that one attempt signs once for all destinations, and that a failure defers instead of sending
unsigned mail."""

from __future__ import annotations

import asyncio
import dataclasses
import io
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import BinaryIO

import pytest

from mailhop.config.checks import DkimConfig
from mailhop.delivery.transport import BodyOpener, OutcomeKind
from mailhop.envelope import MailParams
from mailhop.policy.relay import RelayPolicy
from mailhop.queue.model import QueuedMessage, RcptStatus, RecipientState
from mailhop.signing.dkim import parse_header_section
from mailhop.signing.keys import SigningKey, dns_record
from mailhop.signing.outbound import OutboundSigner, SigningFailed, from_domain
from tests.delivery.smtp_helpers import destination, transport
from tests.support.receiver import Receiver

from . import dkimpy_verify, dkimverify, key_records, make_key, need_nacl, opendkim_verify, sign_config, wire

pytestmark = pytest.mark.anyio

TRUSTED = RelayPolicy(["127.0.0.0/8", "2001:db8::/32"], []).is_trusted
STORED = (b"From: Alice <alice@example.test>\r\nTo: bob@elsewhere.test\r\nSubject: outbound\r\n"
          b"Message-ID: <m1@example.test>\r\n\r\nHello Bob,\r\n\r\n.a dotted line\r\n")

Keys = dict[str, tuple[Path, SigningKey]]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    directory = tmp_path_factory.mktemp("keys")
    return {"rsa": make_key(directory, "rsa"), "ed": make_key(directory, "ed25519", "ed.key"),
            "sub": make_key(directory, "ed25519", "sub.key")}


def outbound(keys: Keys, *, trusted_only: bool = True, dual: bool = False, sub: bool = True) -> OutboundSigner:
    """example.test signed with RSA (s=rsa) [and Ed25519 (s=ed) when dual]; sub.example.test with Ed25519."""
    entries = [sign_config(keys["rsa"][0], selector="rsa")]
    if dual:
        entries.append(sign_config(keys["ed"][0], selector="ed"))
    if sub:
        entries.append(sign_config(keys["sub"][0], domain="sub.example.test", selector="sub"))
    return OutboundSigner(DkimConfig(sign=entries, sign_trusted_only=trusted_only), TRUSTED)


def records(keys: Keys) -> dict[str, bytes]:
    return key_records(("example.test", "rsa", keys["rsa"][1]), ("example.test", "ed", keys["ed"][1]),
                       ("sub.example.test", "sub", keys["sub"][1]))


def queued(client_ip: str = "127.0.0.9", *, authenticated: str | None = None, attempts: int = 0,
           body: bytes = STORED) -> QueuedMessage:
    rcpt = RecipientState(0, "bob@elsewhere.test", "elsewhere.test", None, (), RcptStatus.PENDING, attempts, "",
                          0.0, 0.0)
    return QueuedMessage("Q0001", "alice@example.test", MailParams(size=len(body)), 0.0, len(body), False, "",
                         client_ip, "client.test", (rcpt,), authenticated=authenticated)


def body_opener(data: bytes, opened: list[int] | None = None) -> BodyOpener:
    async def open_body() -> BinaryIO:
        if opened is not None:
            opened.append(1)
        return io.BytesIO(data)

    return open_body


async def read_all(opener: Callable[[], Awaitable[BinaryIO]], sizes: tuple[int, ...] = ()) -> bytes:
    fp = await opener()
    try:
        parts = [fp.read(n) for n in sizes]
        parts.append(fp.read())
        return b"".join(parts)
    finally:
        fp.close()


def d_tags(data: bytes) -> list[str]:
    """The d= of each DKIM-Signature field at the top of ``data``."""
    head = data.split(b"\r\n\r\n", 1)[0]
    out = []
    for field in parse_header_section(head + b"\r\n"):
        if field.key == b"dkim-signature":
            value = field.value.replace(b"\r\n", b"").decode()
            out += [t.strip()[2:] for t in value.split(";") if t.strip().startswith("d=")]
    return out


async def test_trusted_mail_is_signed_and_three_verifiers_agree(keys: Keys, tmp_path: Path) -> None:
    signer = outbound(keys)
    original = body_opener(STORED)
    opener = await signer.open_signed(queued(), original)
    assert opener is not original
    data = await read_all(opener, (1, 7, 100))  # odd read sizes across the signature/body seam
    assert data.endswith(b"\r\n" + STORED) and data.startswith(b"DKIM-Signature: ")
    assert d_tags(data) == ["example.test"]
    assert dkimpy_verify(data, records(keys))
    output = opendkim_verify(data, records(keys), tmp_path)
    assert "s=rsa, d=example.test" in output and "succeeded" in output and "dkim=pass" in output, output
    status, output = dkimverify(data, [dns_record("example.test", "rsa", keys["rsa"][1])], tmp_path)
    assert status == 0 and "signature ok" in output, output
    # The verifiers can say no: the same bytes with one body octet changed.
    forged = data.replace(b"Hello Bob", b"Hello Eve")
    assert not dkimpy_verify(forged, records(keys))
    assert "failed" in opendkim_verify(forged, records(keys), tmp_path)
    status, output = dkimverify(forged, [dns_record("example.test", "rsa", keys["rsa"][1])], tmp_path)
    assert status != 0 and "signature ok" not in output


async def test_dual_signing_rsa_and_ed25519_for_one_domain(keys: Keys, tmp_path: Path) -> None:
    need_nacl("ed25519")
    data = await read_all(await outbound(keys, dual=True).open_signed(queued(), body_opener(STORED)))
    assert d_tags(data) == ["example.test", "example.test"]
    assert dkimpy_verify(data, records(keys), index=0) and dkimpy_verify(data, records(keys), index=1)
    output = opendkim_verify(data, records(keys), tmp_path)
    assert output.count("dkim=pass") == 2 and "header.s=rsa" in output and "header.s=ed" in output, output
    assert "fail" not in output, output
    zone = [dns_record("example.test", "rsa", keys["rsa"][1]), dns_record("example.test", "ed", keys["ed"][1])]
    for index in (0, 1):
        status, output = dkimverify(data, zone, tmp_path, index=index)
        assert status == 0 and "signature ok" in output, (index, output)


@pytest.mark.parametrize("from_header, signed_by", [
    (b"alice@example.test", "example.test"),
    (b"Alice <alice@MAIL.Example.Test>", "example.test"),  # a sub-domain, any case
    (b"x@sub.example.test", "sub.example.test"),  # the longest configured domain wins
    (b"\"Deep, Down\" <x@a.b.sub.example.test> (comment)", "sub.example.test"),
    (b"=?utf-8?q?J=C3=B6rg?= <j@example.test>", "example.test"),
    (b"alice@notexample.test", None),  # a suffix, but not a sub-domain
    (b"alice@example.test.evil", None),
    (b"alice@elsewhere.test", None),  # not configured
    (b"alice@example.test, mallory@elsewhere.test", None),  # two domains: whose mail is it?
    (b"undisclosed-recipients:;", None),
])
async def test_the_from_domain_chooses_the_signer(keys: Keys, from_header: bytes, signed_by: str | None) -> None:
    need_nacl("ed25519")
    stored = STORED.replace(b"Alice <alice@example.test>", from_header)
    original = body_opener(stored)
    opener = await outbound(keys).open_signed(queued(), original)
    if signed_by is None:
        assert opener is original
        return
    data = await read_all(opener)
    assert d_tags(data) == [signed_by]
    assert dkimpy_verify(data, records(keys))


async def test_two_from_fields_are_not_signed(keys: Keys) -> None:
    stored = b"From: a@example.test\r\n" + STORED
    original = body_opener(stored)
    assert await outbound(keys).open_signed(queued(), original) is original


@pytest.mark.parametrize("client_ip, authenticated, trusted_only, signs", [
    ("127.0.0.9", None, True, True),  # a trusted network
    ("2001:db8::25", None, True, True),
    ("203.0.113.7", None, True, False),  # from outside: never, or we sign forgeries
    ("203.0.113.7", "alice", True, True),  # an authenticated user, wherever they are
    ("", None, True, True),  # made by mailhop itself (bounces, notices)
    ("not an address", None, True, False),
    ("203.0.113.7", None, False, True),  # sign_trusted_only = false: everything from a configured domain
])
async def test_trust_rules(keys: Keys, client_ip: str, authenticated: str | None, trusted_only: bool,
                           signs: bool) -> None:
    signer = outbound(keys, trusted_only=trusted_only)
    opened: list[int] = []
    original = body_opener(STORED, opened)
    opener = await signer.open_signed(queued(client_ip, authenticated=authenticated), original)
    if not signs:
        assert opener is original and opened == [] and signer.computed == 0  # not even read
        return
    assert dkimpy_verify(await read_all(opener), records(keys))


async def test_nothing_configured_signs_nothing(keys: Keys) -> None:
    original = body_opener(STORED)
    signer = OutboundSigner(DkimConfig(), TRUSTED)
    assert await signer.open_signed(queued(""), original) is original


async def test_one_signature_per_attempt_shared_by_all_destinations(keys: Keys) -> None:
    signer = outbound(keys)
    message = queued()
    opened: list[int] = []
    original = body_opener(STORED, opened)
    # The engine delivers a message's recipient groups concurrently; each wraps its own opener.
    openers = await asyncio.gather(*(signer.open_signed(message, original) for _ in range(3)))
    assert signer.computed == 1 and len(opened) == 1
    sent = [await read_all(o) for o in [*openers, openers[0]]]  # each opener also works again (a retry)
    assert len(set(sent)) == 1 and len(opened) == 5
    # The next attempt (attempt counts changed when the last one was recorded) signs afresh.
    await signer.open_signed(dataclasses.replace(message, recipients=tuple(
        dataclasses.replace(r, attempts=1) for r in message.recipients)), original)
    assert signer.computed == 2


async def test_unreadable_body_defers_instead_of_sending_unsigned(keys: Keys,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    async def broken() -> BinaryIO:
        raise OSError("disk on fire")

    opener = await outbound(keys).open_signed(queued(), broken)
    with pytest.raises(SigningFailed, match=r"Q0001.*disk on fire") as info:
        await opener()
    assert isinstance(info.value, OSError)  # what the transport's contract turns into a 451 deferral
    assert "disk on fire" in caplog.text


async def test_signed_bytes_survive_the_real_transport(keys: Keys, tmp_path: Path) -> None:
    # Stored as some client sent it: bare LF, a bare CR, dot lines, no final CRLF. The transport canonicalizes
    # line ends and dot-stuffs; what the receiver reassembles must verify.
    stored = (b"From: alice@example.test\nTo: bob@elsewhere.test\nSubject: wire\n\n.leading dot\n..two\r"
              b"trailing space \t\nlast line")
    message = queued(body=stored)
    opener = await outbound(keys).open_signed(message, body_opener(stored))
    async with Receiver("127.0.0.31", 0) as r:
        outcomes = await transport().deliver(destination(r), message, message.recipients, opener)
        [tx] = await r.wait_for_async(1)
    assert [o.kind for o in outcomes] == [OutcomeKind.DELIVERED]
    received = tx.data
    assert received.startswith(b"DKIM-Signature: ") and received.endswith(wire(stored))
    assert dkimpy_verify(received, records(keys))
    output = opendkim_verify(received, records(keys), tmp_path)
    assert "succeeded" in output and "failed" not in output, output


def test_from_domain_parsing() -> None:
    def domain(head: bytes) -> str | None:
        return from_domain(parse_header_section(head))

    assert domain(b"From: A <a@B\xc3\xbccher.example>\r\n") == "xn--bcher-kva.example"  # UTF-8 (SMTPUTF8) to A-label
    assert domain(b"From: a@example.test,\r\n b@EXAMPLE.test\r\n") == "example.test"  # folded, same domain
    assert domain(b"From: <a@[192.0.2.1]>\r\n") is None  # an address literal has no DKIM domain
    assert domain(b"Sender: a@example.test\r\n") is None
