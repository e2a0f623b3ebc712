"""DKIM verification off the daemon's core: the worker-process pool gives the same results as the thread
path, and a worker that dies is replaced without failing the message."""

from __future__ import annotations

import base64
import os
import signal

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from mailhop.checks import dkimverify
from mailhop.checks.dkimverify import DkimCheck
from mailhop.config.checks import DkimVerifyConfig
from mailhop.dns import Resolver
from tests.support.dnsserver import TestDns

pytestmark = pytest.mark.anyio


def key_record(public: str) -> str:
    value = f"v=DKIM1; k=rsa; p={public}"
    return "sel._domainkey.pool.test. 300 IN TXT " + " ".join(f'"{value[i:i + 200]}"'
                                                                for i in range(0, len(value), 200))


@pytest.fixture(scope="module")
def signed() -> tuple[bytes, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption())
    der = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    msg = b"From: <a@pool.test>\r\nTo: <b@example.test>\r\nSubject: pool\r\n\r\nbody\r\n"
    return dkim.sign(msg, b"sel", b"pool.test", pem) + msg, base64.b64encode(der).decode()


@pytest.mark.parametrize("processes", [0, 1, 2])
async def test_threads_and_processes_agree(dns: TestDns, resolver: Resolver, signed: tuple[bytes, str],
                                           processes: int) -> None:
    message, public = signed
    dns.add(key_record(public))
    check = DkimCheck(DkimVerifyConfig(enabled=True, processes=processes), resolver)
    results = await check.verify(message)
    assert results is not None and [r.result for r in results] == ["pass"]
    tampered = await check.verify(message.replace(b"body", b"bodY"))
    assert tampered is not None and [r.result for r in tampered] == ["fail"]
    await check.aclose()


async def test_a_dead_worker_is_replaced(dns: TestDns, resolver: Resolver, signed: tuple[bytes, str]) -> None:
    message, public = signed
    dns.add(key_record(public))
    check = DkimCheck(DkimVerifyConfig(enabled=True, processes=3), resolver)
    assert [r.result for r in await check.verify(message) or []] == ["pass"]
    pool = dkimverify._POOLS[3]
    for pid in list(pool._processes or {}):  # the workers are private to the pool
        os.kill(pid, signal.SIGKILL)
    # The call that meets the broken pool still gets its answer (from a thread), and the next gets a new pool.
    assert [r.result for r in await check.verify(message) or []] == ["pass"]
    assert dkimverify._POOLS.get(3) is not pool
    assert [r.result for r in await check.verify(message) or []] == ["pass"]
    assert dkimverify._POOLS[3] is not pool
    await check.aclose()
