"""DkimSigner: signatures verify with independent verifiers (dkimpy, opendkim) over tricky canonicalization
inputs, for RSA-2048 and Ed25519; the body hash streams (any chunking gives dkimpy's hash); a large body is
signed off the event loop; unusable keys and unsignable messages are refused clearly."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import BinaryIO
from unittest import mock

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from dkim.canonicalization import Relaxed
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailhop.signing import dkim as signer_module
from mailhop.signing.dkim import DkimSigner, MessageReader, Unsignable, parse_header_section, relaxed_body
from mailhop.signing.keys import SigningKey, private_key_pem

from . import dkimpy_verify, key_records, make_key, need_nacl, opendkim_verify, sign_config, wire

NOW = 1_700_000_000  # a fixed t= in the past (dkimpy refuses signatures from the future)
ALGORITHMS = ["rsa", "ed25519"]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, SigningKey]]:
    directory = tmp_path_factory.mktemp("keys")
    return {"rsa": make_key(directory, "rsa"), "ed25519": make_key(directory, "ed25519")}


def signer_for(keys: dict[str, tuple[Path, SigningKey]], algorithm: str, **options: object) -> DkimSigner:
    return DkimSigner(sign_config(keys[algorithm][0], "example.test", "s1", **options), clock=lambda: NOW)


@pytest.fixture(scope="module")
def signers(keys: dict[str, tuple[Path, SigningKey]]) -> dict[tuple[str, bool], DkimSigner]:
    """Built once: loading an RSA key checks it, which takes tens of milliseconds."""
    return {(alg, over): signer_for(keys, alg, oversign=over) for alg in ALGORITHMS for over in (True, False)}


def records_for(keys: dict[str, tuple[Path, SigningKey]], algorithm: str) -> dict[str, bytes]:
    return key_records(("example.test", "s1", keys[algorithm][1]))


def opener(data: bytes) -> Callable[[], Awaitable[BinaryIO]]:
    async def open_body() -> BinaryIO:
        return io.BytesIO(data)

    return open_body


def sign_now(signer: DkimSigner, message: bytes) -> bytes | None:
    return signer.sign_file(io.BytesIO(message))


def tags(field: bytes) -> dict[str, str]:
    """The tag=value pairs of a DKIM-Signature field, whitespace removed from the values."""
    name, _, value = field.decode("ascii").partition(":")
    assert name == "DKIM-Signature"
    out: dict[str, str] = {}
    for item in value.split(";"):
        if item.strip():
            tag, _, val = item.partition("=")
            out[tag.strip()] = re.sub(r"\s+", "", val)
    return out


# Each case is stored as given; what is verified is what a receiver gets (``wire``): bare CR/LF become CRLF and
# a last line gets its CRLF, exactly as the delivery encoder sends it.
CASES = {
    "plain": b"From: a@example.test\r\nTo: b@example.test\r\nSubject: hello\r\n\r\nHello\r\n",
    "folded-headers": b"From: a@example.test\r\nSubject: a long\r\n\tsubject folded\r\n   twice\r\n"
                      b"To: b@example.test,\r\n c@example.test\r\n\r\nbody\r\n",
    "trailing-whitespace": b"From: a@example.test \t\r\nSubject:\t spaced \t out \t\r\n\r\n"
                           b"line with trailing \t \r\n\t leading and   inner\t\twsp\r\n",
    "empty-body": b"From: a@example.test\r\nSubject: x\r\n\r\n",
    "no-body-at-all": b"From: a@example.test\r\nSubject: x\r\n",
    "header-without-crlf": b"From: a@example.test\r\nSubject: x",
    "body-without-final-crlf": b"From: a@example.test\r\n\r\nlast line without CRLF",
    "final-line-only-wsp": b"From: a@example.test\r\n\r\nline\r\n   \t",
    "trailing-empty-lines": b"From: a@example.test\r\n\r\nbody\r\n\r\n\r\n \r\n\t\r\n\r\n",
    "only-empty-lines": b"From: a@example.test\r\n\r\n\r\n\r\n  \r\n",
    "inner-empty-lines": b"From: a@example.test\r\n\r\n\r\n\r\nbody\r\n\r\n \r\nmore\r\n",
    "8bit": "From: Jörg <j@example.test>\r\nSubject: Grüße\r\n\r\nÄÖÜ € \r\n".encode()
            + b"X-Raw: \xff\xfe\r\n\xff\xfe raw\t\xa0bytes\r\n",
    "odd-case-names": b"fRoM: a@example.test\r\nSUBJECT: x\r\nto: b@example.test\r\nmessage-id: <1@example.test>"
                      b"\r\n\r\nbody\r\n",
    "duplicates": b"From: a@example.test\r\nTo: one@example.test\r\nSubject: first\r\nTo: two@example.test\r\n"
                  b"Subject: second\r\nReceived: by x\r\n\r\nbody\r\n",
    "bare-line-ends": b"From: a@example.test\nSubject: lf\n\nline one\nline two\r\nthree\rfour \n\n",
    "dots": b"From: a@example.test\r\n\r\n.\r\n..two\r\n.leading dot\r\n",
    "long-lines": b"From: a@example.test\r\n\r\n" + b"x" * 200_000 + b"  \t \r\n" + b"y" * 70_000 + b" \t z\r\n"
                  + b"w" * 100_000,
}


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_signatures_verify_with_dkimpy(keys: dict[str, tuple[Path, SigningKey]],
                                      signers: dict[tuple[str, bool], DkimSigner], algorithm: str, case: str) -> None:
    need_nacl(algorithm)
    stored = CASES[case]
    header = sign_now(signers[algorithm, True], stored)
    assert header is not None
    assert dkimpy_verify(wire(header + stored), records_for(keys, algorithm))
    # And the check can fail: one changed body octet breaks it.
    tampered = wire(header + stored).replace(b"\r\n\r\n", b"\r\n\r\nX", 1)
    if tampered != wire(header + stored):
        assert not dkimpy_verify(tampered, records_for(keys, algorithm))


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_signatures_verify_with_opendkim(keys: dict[str, tuple[Path, SigningKey]], algorithm: str,
                                         tmp_path: Path) -> None:
    signer = signer_for(keys, algorithm)
    for case, stored in sorted(CASES.items()):
        header = sign_now(signer, stored)
        assert header is not None
        output = opendkim_verify(wire(header + stored), records_for(keys, algorithm), tmp_path)
        assert "succeeded" in output and "failed" not in output, (case, output)
    broken = wire((sign_now(signer, CASES["plain"]) or b"") + CASES["plain"]).replace(b"Hello", b"Hallo")
    assert "failed" in opendkim_verify(broken, records_for(keys, algorithm), tmp_path)


@pytest.mark.parametrize("oversign", [True, False])
def test_oversigning_blocks_an_added_header(keys: dict[str, tuple[Path, SigningKey]], oversign: bool) -> None:
    stored = CASES["duplicates"]
    header = sign_now(signer_for(keys, "rsa", oversign=oversign), stored)
    assert header is not None
    records = records_for(keys, "rsa")
    assert dkimpy_verify(header + stored, records)
    # A header added above the signed ones: only oversigning (one more Subject than present) catches it.
    added = header + b"Subject: forged\r\n" + stored
    assert dkimpy_verify(added, records) is not oversign
    # A Subject signed twice changes the verdict when the signed copies are edited, whichever the mode.
    assert not dkimpy_verify(header + stored.replace(b"Subject: first", b"Subject: edit"), records)


def test_h_lists_present_headers_with_from_always(keys: dict[str, tuple[Path, SigningKey]]) -> None:
    stored = CASES["duplicates"]
    header = sign_now(signer_for(keys, "rsa", headers=["Subject", "X-Absent", "to", "SUBJECT"]), stored)
    assert header is not None
    assert tags(header)["h"] == "From:From:Subject:Subject:Subject:to:to:to"
    header = sign_now(signer_for(keys, "rsa", headers=["Subject"], oversign=False), stored)
    assert header is not None
    assert tags(header)["h"] == "From:Subject:Subject"


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_signature_field_shape(keys: dict[str, tuple[Path, SigningKey]], algorithm: str) -> None:
    header = sign_now(signer_for(keys, algorithm), CASES["plain"])
    assert header is not None and header.startswith(b"DKIM-Signature: ") and header.endswith(b"\r\n")
    lines = header[:-2].split(b"\r\n")
    assert all(len(line) < 78 for line in lines), lines
    assert all(line.startswith(b"\t") for line in lines[1:])
    values = tags(header)
    assert list(values) == ["v", "a", "c", "d", "s", "t", "h", "bh", "b"]  # b= last
    assert values["v"] == "1" and values["c"] == "relaxed/relaxed" and values["t"] == str(NOW)
    assert values["a"] == f"{algorithm}-sha256" and values["d"] == "example.test" and values["s"] == "s1"
    assert len(base64.b64decode(values["b"])) == (256 if algorithm == "rsa" else 64)


def test_body_hash_equals_dkimpys(keys: dict[str, tuple[Path, SigningKey]]) -> None:
    stored = CASES["trailing-whitespace"] + b"\r\n\r\n"
    ours = sign_now(signer_for(keys, "rsa"), stored)
    pem = private_key_pem(keys["rsa"][1])
    theirs = dkim.sign(stored, b"s1", b"example.test", pem, canonicalize=(b"relaxed", b"relaxed"),
                       include_headers=[b"from", b"subject"])
    assert ours is not None
    assert tags(ours)["bh"] == tags(theirs.rstrip(b"\r\n"))["bh"]


def test_empty_body_hashes_as_empty_string(keys: dict[str, tuple[Path, SigningKey]]) -> None:
    # RFC 6376 3.4.4: relaxed canonicalization of an empty body (or one of only empty lines) is the empty
    # string (the CRLF rule is simple canonicalization's, 3.4.3).
    empty = base64.b64encode(hashlib.sha256(b"").digest()).decode()
    for case in ("empty-body", "no-body-at-all", "only-empty-lines"):
        header = sign_now(signer_for(keys, "rsa"), CASES[case])
        assert header is not None and tags(header)["bh"] == empty, case


# -- streaming: any chunking of any body gives dkimpy's canonical body hash ------------------------------------

_BODY_PIECES = [b"a", b"bc d", b" ", b"  ", b"\t", b"\r\n", b"\n", b"\r", b".", b"\xe2\x82\xac", b"\xff", b"\x00"]


@settings(max_examples=300, deadline=None)
@given(body=st.lists(st.sampled_from(_BODY_PIECES), max_size=80).map(b"".join),
       chunk=st.integers(1, 17), flush=st.integers(1, 9))
def test_streamed_body_hash_matches_dkimpy_for_any_chunking(body: bytes, chunk: int, flush: int) -> None:
    message = b"From: a@example.test\r\n\r\n" + body
    canonical_body = wire(message).split(b"\r\n\r\n", 1)[1]
    expected = hashlib.sha256(Relaxed.canonicalize_body(canonical_body)).digest()
    with mock.patch.object(signer_module, "_LINE_FLUSH", flush):  # long-line path on short lines too
        reader = MessageReader(io.BytesIO(message), chunk_size=chunk)
        assert reader.header_fields()[0].key == b"from"
        assert reader.body_hash() == expected
    assert hashlib.sha256(relaxed_body(canonical_body)).digest() == expected


# -- property: random headers and bodies sign and verify ------------------------------------------------------

_NAMES = ["To", "Subject", "Date", "Cc", "Message-ID", "X-Extra", "Reply-To", "MIME-Version"]
_VALUE_PIECES = [b"a", b"Zz", b"0", b" ", b"\t", b"  ", b";", b":", b"=", b"<x@y>", b",", b"\xc3\xa9", b"\xff", b"\""]


def _cased(name: str) -> st.SearchStrategy[str]:
    return st.lists(st.booleans(), min_size=len(name), max_size=len(name)).map(
        lambda flips: "".join(c.upper() if f else c.lower() for c, f in zip(name, flips, strict=True)))


_value = st.lists(st.lists(st.sampled_from(_VALUE_PIECES), max_size=8).map(b"".join), min_size=1, max_size=3)


@st.composite
def _messages(draw: st.DrawFn) -> bytes:
    fields = [(draw(_cased("From")), b" a@example.test" + draw(_value)[0])]
    for _ in range(draw(st.integers(0, 6))):
        name = draw(_cased(draw(st.sampled_from(_NAMES))))
        fold = b"\r\n" + draw(st.sampled_from([b" ", b"\t"]))  # folded lines start with WSP
        fields.append((name, fold.join(draw(_value))))
    order = draw(st.permutations(fields))
    head = b"".join(name.encode() + b":" + value + b"\r\n" for name, value in order)
    body = draw(st.lists(st.sampled_from(_BODY_PIECES), max_size=40).map(b"".join))
    return head + b"\r\n" + body


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(message=_messages(), oversign=st.booleans())
def test_property_random_messages_verify_with_dkimpy(keys: dict[str, tuple[Path, SigningKey]],
                                                     signers: dict[tuple[str, bool], DkimSigner], algorithm: str,
                                                     message: bytes, oversign: bool) -> None:
    need_nacl(algorithm)
    signer = signers[algorithm, oversign]
    header = sign_now(signer, message)
    assert header is not None
    assert dkimpy_verify(wire(header + message), records_for(keys, algorithm))


# -- not blocking the loop ----------------------------------------------------------------------------------


def _open_file(path: Path) -> BinaryIO:
    return open(path, "rb")


@pytest.mark.anyio
async def test_large_file_body_is_signed_while_the_loop_keeps_running(
        keys: dict[str, tuple[Path, SigningKey]], tmp_path: Path) -> None:
    path = tmp_path / "big.eml"
    line = b"word \t  word  \tmore words here and there   \r\n"  # whitespace-rich: the slow canonicalization path
    body = line * (20 * 1024 * 1024 // len(line))
    path.write_bytes(b"From: a@example.test\r\nSubject: big\r\n\r\n" + body)
    signer = signer_for(keys, "rsa")
    loop = asyncio.get_running_loop()
    gaps: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        last = loop.time()
        while not done.is_set():
            await asyncio.sleep(0.01)
            now = loop.time()
            gaps.append(now - last)
            last = now

    async def open_big() -> BinaryIO:
        return _open_file(path)

    ticking = loop.create_task(ticker())
    started = loop.time()
    header = await signer.sign(open_big)
    elapsed = loop.time() - started
    done.set()
    await ticking
    assert header is not None
    # Behaviour, not speed: had the hash run on the loop, the ticker would have stalled for all of it (one gap
    # as long as the signing). Instead it kept ticking throughout: many ticks, no gap near the total.
    assert len(gaps) >= 5, (elapsed, gaps)
    assert max(gaps) < elapsed / 2, (elapsed, max(gaps))
    canonical = b"word word more words here and there\r\n" * (len(body) // len(line))  # worked out by hand
    assert tags(header)["bh"] == base64.b64encode(hashlib.sha256(canonical).digest()).decode()


# -- refusals -----------------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_sign_through_an_opener(keys: dict[str, tuple[Path, SigningKey]]) -> None:
    header = await signer_for(keys, "rsa").sign(opener(CASES["plain"]))
    assert header is not None and dkimpy_verify(header + CASES["plain"], records_for(keys, "rsa"))


@pytest.mark.parametrize("message, reason", [
    (b"Subject: no from\r\n\r\nbody\r\n", "From"),
    (b"From: a@example.test\r\nthis line has no colon\r\n\r\nbody\r\n", "colon"),
    (b" From: continuation first\r\n\r\nbody\r\n", "continuation"),
    (b"\r\nFrom: a@example.test\r\n", "From"),  # an empty header section: all of it is body
])
def test_unsignable_messages_are_not_signed(keys: dict[str, tuple[Path, SigningKey]], message: bytes,
                                            reason: str, caplog: pytest.LogCaptureFixture) -> None:
    assert sign_now(signer_for(keys, "rsa"), message) is None
    assert reason in caplog.text


def test_header_section_over_the_limit_is_refused() -> None:
    message = b"From: a@example.test\r\n" + b"X-Pad: " + b"p" * 5000 + b"\r\n\r\nbody\r\n"
    with pytest.raises(Unsignable, match="over 1000 bytes"):
        MessageReader(io.BytesIO(message), chunk_size=100, max_head=1000).header_fields()
    assert len(MessageReader(io.BytesIO(message), chunk_size=100, max_head=10_000).header_fields()) == 2


def test_parse_keeps_folding_and_name_spelling() -> None:
    fields = parse_header_section(b"SuBject : a\r\n\tb\r\nFrom:x\r\n")
    assert [(f.name, f.value, f.key) for f in fields] == [(b"SuBject", b" a\r\n\tb", b"subject"),
                                                          (b"From", b"x", b"from")]


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_bad_key_files_raise_value_error_naming_the_file(tmp_path: Path) -> None:
    ec_pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    encrypted = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"))
    cases = {
        "missing.key": None,
        "garbage.key": b"not a key at all\n",
        "broken.key": b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        "ec.key": ec_pem,
        "encrypted.key": encrypted,
    }
    for name, data in cases.items():
        path = tmp_path / name if data is None else _write(tmp_path / name, data)
        with pytest.raises(ValueError, match=re.escape(str(path))):
            DkimSigner(sign_config(path))


def test_dknewkey_ed25519_seed_format_loads(tmp_path: Path) -> None:
    need_nacl("ed25519")
    key = ed25519.Ed25519PrivateKey.generate()
    seed = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption())
    path = _write(tmp_path / "dknewkey.key", base64.b64encode(seed) + b"\n")
    signer = DkimSigner(sign_config(path), clock=lambda: NOW)
    header = sign_now(signer, CASES["plain"])
    assert header is not None
    assert dkimpy_verify(header + CASES["plain"], key_records(("example.test", "s1", key)))


def test_bad_header_name_in_config_is_refused(keys: dict[str, tuple[Path, SigningKey]]) -> None:
    with pytest.raises(ValueError, match="not a header field name"):
        signer_for(keys, "rsa", headers=["Subject", "X Bad"])


def test_make_key_writes_a_loadable_key(tmp_path: Path) -> None:
    path, _ = make_key(tmp_path, "rsa")
    assert DkimSigner(sign_config(path)).algorithm == "rsa-sha256"
